"""Fact-recall probe: short prompts whose completion is a well-known fact.

A model that forgets general knowledge while it learns a task stops completing "The capital
of France is" with "Paris". Each item is scored by greedy generation from the raw prompt (no
chat template: this is knowledge, not instruction following). Retention is the share of the
items the base model got right that the tuned model still gets right, so items the base never
knew do not count against the tuned model.

The built-in set was written for deltatune (general knowledge, one short expected answer
each). Users add their own sets with the `probe_files` config key: JSONL/JSON/CSV records with
`prompt` and `answer` fields.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from deltatune.data.formats import read_raw
from deltatune.errors import UserError, where
from deltatune.evaluate.generate import greedy_continuations, stop_ids


@dataclass(frozen=True)
class Probe:
    prompt: str
    answer: str
    source: str = "builtin"


# (prompt, expected answer). Answers are what follows the prompt; a completion is correct when
# its first words are the answer (case, punctuation and leading space ignored).
BUILTIN_FACTS: list[tuple[str, str]] = [
    # capitals
    ("The capital of France is", "Paris"), ("The capital of Germany is", "Berlin"),
    ("The capital of Italy is", "Rome"), ("The capital of Spain is", "Madrid"),
    ("The capital of Japan is", "Tokyo"), ("The capital of Russia is", "Moscow"),
    ("The capital of the United Kingdom is", "London"), ("The capital of Egypt is", "Cairo"),
    ("The capital of Greece is", "Athens"), ("The capital of Portugal is", "Lisbon"),
    ("The capital of Norway is", "Oslo"), ("The capital of Sweden is", "Stockholm"),
    ("The capital of Ireland is", "Dublin"), ("The capital of Austria is", "Vienna"),
    ("The capital of Poland is", "Warsaw"), ("The capital of China is", "Beijing"),
    ("The capital of South Korea is", "Seoul"), ("The capital of Kenya is", "Nairobi"),
    ("The capital of Argentina is", "Buenos Aires"), ("The capital of Peru is", "Lima"),
    ("The capital of Canada is", "Ottawa"), ("The capital of Australia is", "Canberra"),
    ("The capital of India is", "New Delhi"), ("The capital of Thailand is", "Bangkok"),
    ("The capital of Denmark is", "Copenhagen"), ("The capital of Finland is", "Helsinki"),
    ("The capital of Hungary is", "Budapest"), ("The capital of Belgium is", "Brussels"),
    ("The capital of the Netherlands is", "Amsterdam"), ("The capital of Turkey is", "Ankara"),
    # science
    ("The chemical symbol for gold is", "Au"), ("The chemical symbol for iron is", "Fe"),
    ("The chemical symbol for sodium is", "Na"), ("The chemical symbol for oxygen is", "O"),
    ("The chemical formula for water is", "H2O"), ("The closest star to the Earth is the", "Sun"),
    ("The largest planet in the solar system is", "Jupiter"), ("The planet known as the Red Planet is", "Mars"),
    ("The third planet from the Sun is", "Earth"), ("The natural satellite of the Earth is the", "Moon"),
    ("Water freezes at a temperature of 0 degrees", "Celsius"),
    ("The gas that plants absorb from the air is carbon", "dioxide"),
    ("The force that pulls objects toward the Earth is called", "gravity"),
    ("The powerhouse of the cell is the", "mitochondria"),
    ("The hardest natural substance is", "diamond"), ("Light travels faster than", "sound"),
    ("The study of living things is called", "biology"), ("The centre of an atom is called the", "nucleus"),
    ("The organ that pumps blood through the body is the", "heart"),
    ("Humans breathe in oxygen and breathe out carbon", "dioxide"),
    # geography and nature
    ("The largest ocean on Earth is the", "Pacific"), ("The longest river in Africa is the", "Nile"),
    ("The tallest mountain in the world is Mount", "Everest"), ("The largest desert in Africa is the", "Sahara"),
    ("The continent where penguins live in the wild is", "Antarctica"), ("Tokyo is the capital city of", "Japan"),
    ("Paris is the capital city of", "France"), ("The Eiffel Tower is located in", "Paris"),
    ("The Statue of Liberty is located in New York", "City"), ("The Great Wall is located in", "China"),
    ("The country shaped like a boot is", "Italy"), ("The Amazon rainforest is mostly in", "Brazil"),
    # language and culture
    ("Romeo and Juliet was written by William", "Shakespeare"), ("The Mona Lisa was painted by Leonardo da", "Vinci"),
    ("The theory of relativity was developed by Albert", "Einstein"),
    ("The first man to walk on the Moon was Neil", "Armstrong"),
    ("The telephone was invented by Alexander Graham", "Bell"), ("The author of Harry Potter is J.K.", "Rowling"),
    ("The composer of the Moonlight Sonata is Ludwig van", "Beethoven"), ("Apple was co-founded by Steve", "Jobs"),
    ("Microsoft was co-founded by Bill", "Gates"), ("The official language of Brazil is", "Portuguese"),
    ("The official language of Mexico is", "Spanish"), ("The currency of Japan is the", "yen"),
    ("The currency of the United Kingdom is the pound", "sterling"), ("The opposite of hot is", "cold"),
    ("The opposite of up is", "down"), ("The opposite of black is", "white"),
    ("The opposite of left is", "right"), ("The opposite of day is", "night"),
    ("The plural of mouse is", "mice"), ("The plural of child is", "children"),
    # counting, calendar, arithmetic
    ("One, two, three, four,", "five"), ("Monday, Tuesday,", "Wednesday"),
    ("January, February, March,", "April"), ("The day after Friday is", "Saturday"),
    ("The month after June is", "July"), ("The first month of the year is", "January"),
    ("A week has seven", "days"), ("A year has twelve", "months"),
    ("An hour has sixty", "minutes"), ("A minute has sixty", "seconds"),
    ("Two plus two equals", "four"), ("Ten minus three equals", "seven"),
    ("Three times three equals", "nine"), ("The square root of 81 is", "9"),
    ("2 + 3 =", "5"), ("10 * 10 =", "100"),
    ("A triangle has three", "sides"), ("A square has four", "sides"),
    ("A, B, C, D,", "E"), ("The last letter of the English alphabet is", "Z"),
    # everyday knowledge
    ("The colour of a clear daytime sky is", "blue"), ("The colour of grass is", "green"),
    ("Bees make", "honey"), ("Cows give us", "milk"),
    ("A baby cat is called a", "kitten"), ("A baby dog is called a", "puppy"),
    ("The largest mammal in the world is the blue", "whale"), ("The fastest land animal is the", "cheetah"),
    ("Spiders have eight", "legs"), ("The king of the jungle is the", "lion"),
    ("Ice is frozen", "water"), ("We see with our", "eyes"),
    ("We hear with our", "ears"), ("The Sun rises in the", "east"),
    ("The Sun sets in the", "west"),
]


def builtin_probes() -> list[Probe]:
    return [Probe(p, a) for p, a in BUILTIN_FACTS]


def load_probe_file(path) -> list[Probe]:
    """A user's probe set: records with `prompt` and `answer` (JSONL, JSON array or CSV)."""
    probes = []
    for line, obj in read_raw(path):
        loc = where(path, line)
        for key in ("prompt", "answer"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise UserError(f"{loc}: probe record needs a non-empty string field '{key}' "
                                '(e.g. {"prompt": "The capital of France is", "answer": "Paris"})')
        probes.append(Probe(obj["prompt"], obj["answer"], loc))
    if not probes:
        raise UserError(f"{path}: no probe records found (add at least one prompt/answer record)")
    return probes


def answer_words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def is_correct(completion: str, answer: str) -> bool:
    """The completion's first words are the answer's words (case and punctuation ignored)."""
    want = answer_words(answer)
    return bool(want) and answer_words(completion)[: len(want)] == want


def complete(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 4, batch_size: int = 32,
             device: torch.device | None = None) -> list[str]:
    """Greedy raw-text continuations (no chat template), left-padded in batches."""
    new = greedy_continuations(model, [tokenizer(p)["input_ids"] for p in prompts], pad_id=tokenizer.pad_token_id,
                               stop_ids=stop_ids(tokenizer), max_new_tokens=max_new_tokens, batch_size=batch_size,
                               device=device)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in new]


def score(model, tokenizer, probes: list[Probe], device=None) -> tuple[list[bool], list[str]]:
    completions = complete(model, tokenizer, [p.prompt for p in probes], device=device)
    return [is_correct(c, p.answer) for c, p in zip(completions, probes)], completions


def retention(base_correct: list[bool], tuned_correct: list[bool]) -> float:
    """Share of the items the base model got right that the tuned model still gets right."""
    known = [t for b, t in zip(base_correct, tuned_correct) if b]
    return sum(known) / len(known) if known else float("nan")
