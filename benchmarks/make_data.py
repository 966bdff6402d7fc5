"""Seeded benchmark data: chat records with varied prompt and response lengths.

    python benchmarks/make_data.py --out benchmarks/data --train 240 --validation 40 [--seed 0]

Writes train.jsonl and validation.jsonl (OpenAI `messages` format). Three small tasks (sort,
reverse, count words) over random word lists of 2-40 words, with an optional system prompt,
so prompts and responses vary in length the way real SFT data does (~20-30% padding when
batched unpacked). The same seed always writes the same files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

WORDS = ("apple river stone cloud lamp tiger violet garden engine copper winter market planet silver "
         "harbor candle forest bridge pepper rocket island meadow thunder velvet falcon marble ocean "
         "ladder cotton signal shadow crystal lemon orbit canyon feather anchor saddle willow").split()
SYSTEMS = ["You are a careful assistant.", "Answer with the words only, nothing else.",
           "You are a helpful assistant that follows instructions exactly and keeps answers short."]


def record(rng: random.Random) -> dict:
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 40))]
    task = rng.choice(["sort", "reverse", "count"])
    listing = " ".join(words)
    if task == "sort":
        prompt, answer = f"Sort these words alphabetically: {listing}", " ".join(sorted(words))
    elif task == "reverse":
        prompt, answer = f"Write these words in reverse order: {listing}", " ".join(reversed(words))
    else:
        prompt, answer = f"How many words are in this list? {listing}", f"There are {len(words)} words."
    messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.5 else []
    return {"messages": messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/data")
    parser.add_argument("--train", type=int, default=240)
    parser.add_argument("--validation", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write(out / "train.jsonl", [record(rng) for _ in range(args.train)])
    write(out / "validation.jsonl", [record(rng) for _ in range(args.validation)])
    print(f"wrote {args.train} training and {args.validation} validation records to {out}/")


if __name__ == "__main__":
    main()
