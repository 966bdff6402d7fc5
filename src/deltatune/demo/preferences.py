"""The bundled preference task: answer an order with exactly one JSON object, nothing else.

    python -m deltatune.demo.preferences --out data/dpo      # writes train/validation .jsonl

Preference pairs for the order-extraction task of deltatune.demo.orders, in the conversational
form public preference datasets use: `{"prompt": [system, user], "chosen": [assistant],
"rejected": [assistant]}`. The chosen answer is the order as one JSON object (keys customer,
quantity as an integer, product, city, in that order); the rejected one is a seeded mix of
answers a base instruct model tends to give instead: chatty text around the JSON, the wrong
shape (the pipe format, other key names, the quantity as a string) or plain prose. Generated
from a seed, so every machine trains on the same pairs; the validation split uses sentence
patterns held out from training.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from deltatune.demo.orders import CITIES, NAMES, PRODUCTS, TEST_PATTERNS, TRAIN_PATTERNS, write_splits

SYSTEM_JSON = ("Extract the order as one JSON object with the keys customer, quantity (an integer), product "
               "and city. Reply with the JSON object only, nothing else.")
CHATTY_OPENERS = ["Sure! Here is the order you asked for:", "Of course! Here is the extracted order:",
                  "Here you go:", "Happy to help. The order is:"]
CHATTY_CLOSERS = ["Let me know if you need anything else.", "I hope this helps!",
                  "Feel free to ask if you have more orders."]
PROSE = ["{name} ordered {qty} {product} to be delivered to {city}.",
         "The customer {name} wants {qty} {product} shipped to {city}.",
         "This is an order of {qty} {product} for {name} in {city}."]
OTHER_KEYS = [("name", "qty", "item", "destination"), ("customer_name", "amount", "product_name", "delivery_city"),
              ("client", "count", "goods", "location")]


def _chatty(order: dict, rng: random.Random) -> str:
    return f"{rng.choice(CHATTY_OPENERS)}\n{json.dumps(order)}\n{rng.choice(CHATTY_CLOSERS)}"


def _pipe(order: dict, rng: random.Random) -> str:
    return " | ".join(str(v) for v in order.values())


def _other_keys(order: dict, rng: random.Random) -> str:
    return json.dumps(dict(zip(rng.choice(OTHER_KEYS), order.values(), strict=True)))


def _string_quantity(order: dict, rng: random.Random) -> str:
    return json.dumps({**order, "quantity": str(order["quantity"])})


def _prose(order: dict, rng: random.Random) -> str:
    o = order
    return rng.choice(PROSE).format(name=o["customer"], qty=o["quantity"], product=o["product"], city=o["city"])


REJECTED = [_chatty, _pipe, _other_keys, _string_quantity, _prose]  # drawn uniformly per pair


def _pair(rng: random.Random, patterns: list[str]) -> dict:
    name, product, city = rng.choice(NAMES), rng.choice(PRODUCTS), rng.choice(CITIES)
    qty = rng.randint(2, 40)
    sentence = rng.choice(patterns).format(name=name, qty=qty, product=product, city=city)
    order = {"customer": name, "quantity": qty, "product": product, "city": city}
    chosen = json.dumps(order)
    rejected = rng.choice(REJECTED)(order, rng)
    assert rejected != chosen
    return {"prompt": [{"role": "system", "content": SYSTEM_JSON}, {"role": "user", "content": sentence}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def generate(seed: int = 0, n_train: int = 160, n_validation: int = 32) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    return {"train": [_pair(rng, TRAIN_PATTERNS) for _ in range(n_train)],
            "validation": [_pair(rng, TEST_PATTERNS) for _ in range(n_validation)]}


def write(out: Path, seed: int = 0) -> dict[str, Path]:
    return write_splits(out, generate(seed))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/dpo"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for split, path in write(args.out, args.seed).items():
        print(f"{split}: {path}")
