"""The bundled demo task: turn a free-text order into one fixed-format line.

    python -m deltatune.demo.orders --out data/demo      # writes train/validation/test .jsonl

The data is generated from a seed, so every machine trains on the same examples. A base
instruct model does not know the exact output format (it scores near zero on exact match);
a few hundred examples teach it, which is what fine-tuning is for. The test split uses
sentence patterns and name/city/product combinations held out from training.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Maria", "James", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tom", "Fatima", "Ivan", "Chloe",
         "Kwame", "Sofia", "Liam", "Mei", "Noah", "Amara", "Lucas", "Ingrid", "Ravi", "Elena", "Hugo",
         "Yara", "Felix", "Nadia", "Oscar", "Zoe", "Mateo", "Hana", "Arjun"]
PRODUCTS = ["lamps", "chairs", "notebooks", "kettles", "umbrellas", "backpacks", "candles", "mugs",
            "blankets", "helmets", "scarves", "batteries", "pillows", "clocks", "jackets", "towels",
            "headphones", "bottles", "gloves", "tables"]
CITIES = ["Oslo", "Lima", "Cairo", "Tokyo", "Dublin", "Nairobi", "Lisbon", "Denver", "Seoul", "Prague",
          "Austin", "Hanoi", "Quito", "Porto", "Zurich", "Accra", "Perth", "Riga", "Boston", "Milan"]
TRAIN_PATTERNS = [
    "{name} ordered {qty} {product} for delivery to {city}.",
    "Please send {qty} {product} to {city}; the customer is {name}.",
    "Ship to {city}: {qty} {product}, ordered by {name}.",
    "{name} from {city} wants {qty} {product}.",
    "New order from {name}: {qty} {product}, destination {city}.",
    "Could you deliver {qty} {product} to {city}? Thanks, {name}",
]
TEST_PATTERNS = [
    "Customer {name} needs {qty} {product} shipped to {city}.",
    "{qty} {product} should go to {city} for {name}.",
]
SYSTEM = "Extract the order as: customer | quantity | product | city"


def _example(rng: random.Random, patterns: list[str]) -> dict:
    name, product, city = rng.choice(NAMES), rng.choice(PRODUCTS), rng.choice(CITIES)
    qty = rng.randint(2, 40)
    sentence = rng.choice(patterns).format(name=name, qty=qty, product=product, city=city)
    answer = f"{name} | {qty} | {product} | {city}"
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": sentence},
                         {"role": "assistant", "content": answer}]}


def generate(seed: int = 0, n_train: int = 240, n_validation: int = 40, n_test: int = 60) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    train = [_example(rng, TRAIN_PATTERNS) for _ in range(n_train)]
    validation = [_example(rng, TRAIN_PATTERNS) for _ in range(n_validation)]
    seen = {json.dumps(r) for r in train}
    test = []
    while len(test) < n_test:
        record = _example(rng, TEST_PATTERNS)
        if json.dumps(record) not in seen:
            test.append(record)
    return {"train": train, "validation": validation, "test": test}


def write_splits(out: Path, splits: dict[str, list[dict]]) -> dict[str, Path]:
    """One `<split>.jsonl` per split; returns their paths (shared with the classification task)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, records in splits.items():
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return paths


def write(out: Path, seed: int = 0) -> dict[str, Path]:
    return write_splits(out, generate(seed))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/demo"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for split, path in write(args.out, args.seed).items():
        print(f"{split}: {path}")
