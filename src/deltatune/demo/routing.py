"""The bundled classification task: route a customer message to one of four support teams.

    python -m deltatune.demo.routing --out data/classify    # writes train/validation/test .jsonl

Generated from a seed, so every machine trains on the same examples. The test split uses
sentence templates held out from training, so a model must learn what the messages are about,
not memorise the wording. An untrained classification head scores near chance (25%).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from deltatune.demo.orders import write_splits

TOPICS = {
    "billing": {
        "things": ["invoice", "refund", "charge", "payment", "receipt", "subscription fee", "credit card bill"],
        "problems": ["was charged twice", "is wrong", "never arrived", "shows the wrong amount",
                     "was taken from my account without asking", "is higher than last month"],
    },
    "shipping": {
        "things": ["parcel", "package", "delivery", "order", "shipment", "box"],
        "problems": ["is late", "was left at the wrong address", "arrived damaged", "is stuck at customs",
                     "has not moved for a week", "went to my neighbour"],
    },
    "technical": {
        "things": ["app", "website", "login page", "password reset", "mobile app", "download link"],
        "problems": ["crashes when I open it", "shows an error", "does not load", "keeps freezing",
                     "logs me out every minute", "gives a blank screen"],
    },
    "account": {
        "things": ["account", "email address", "username", "profile", "phone number on file", "membership"],
        "problems": ["needs to be closed", "has to be changed", "is under the wrong name",
                     "should be merged with my other one",
                     "must be updated", "needs a new owner"],
    },
}
TRAIN_TEMPLATES = [
    "Hi, my {thing} {problem}.",
    "Hello team, the {thing} {problem}. Can you help?",
    "Why is it that my {thing} {problem}?",
    "The {thing} {problem}, please sort this out.",
    "Quick question: my {thing} {problem}.",
    "I am writing because the {thing} {problem}.",
]
TEST_TEMPLATES = [
    "Good morning. It seems my {thing} {problem} again.",
    "Urgent!!! {thing} {problem}",
]


def _record(rng: random.Random, templates: list[str]) -> dict:
    label = rng.choice(sorted(TOPICS))
    topic = TOPICS[label]
    text = rng.choice(templates).format(thing=rng.choice(topic["things"]), problem=rng.choice(topic["problems"]))
    return {"text": text[0].upper() + text[1:], "label": label}


def generate(seed: int = 0, n_train: int = 320, n_validation: int = 80, n_test: int = 120) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    return {"train": [_record(rng, TRAIN_TEMPLATES) for _ in range(n_train)],
            "validation": [_record(rng, TRAIN_TEMPLATES) for _ in range(n_validation)],
            "test": [_record(rng, TEST_TEMPLATES) for _ in range(n_test)]}


def write(out: Path, seed: int = 0) -> dict[str, Path]:
    return write_splits(out, generate(seed))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/classify"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for split, path in write(args.out, args.seed).items():
        print(f"{split}: {path}")
