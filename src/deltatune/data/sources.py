"""Data in Hugging Face `datasets` form: parquet and Arrow files, `save_to_disk` folders and hub ids (`hf://owner/name`).

Each is opened with the `datasets` library (memory-mapped Arrow) and read row by row into the same raw objects
a JSONL line gives, so the formats, their checks and their `FILE:row N` errors are the ones every file gets.
`columns` renames a source's columns onto the fields the formats read (`{instruction: question}` reads the
`instruction` field from the `question` column), for any kind of file.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from deltatune.config import DataArgs, DataSource
from deltatune.errors import UserError

HUB = "hf://"
DATASET_SUFFIXES = (".parquet", ".arrow")


def is_dataset_source(path: str | Path) -> bool:
    """Whether `path` is read through `datasets` rather than as a JSONL/JSON/CSV text file."""
    text = str(path)
    if text.startswith(HUB):
        return True
    local = Path(text)
    return local.suffix.lower() in DATASET_SUFFIXES or (
        local.is_dir() and any((local / name).is_file() for name in ("state.json", "dataset_dict.json")))


def open_dataset(path: str | Path, split: str | None = None, config: str | None = None, role: str = "train"):
    """The `datasets.Dataset` a source names; `role` picks the split of a multi-split source when `split` is not
    given (train_file reads `train`, validation_file `validation`, test_file `test`)."""
    import datasets

    if os.environ.get("DELTATUNE_PROGRESS", "1") == "0":  # its own bars follow ours
        datasets.disable_progress_bars()
    text = str(path)
    try:
        if text.startswith(HUB):
            name = text[len(HUB):]
            try:
                found = datasets.load_dataset(name, config, split=None)
            except (ConnectionError, OSError) as err:
                raise UserError(f"{text}: cannot read it from the Hugging Face hub ({str(err).splitlines()[0]}); "
                                "where the hub is not reachable, save the dataset elsewhere with "
                                "save_to_disk or to parquet and give that path") from None
        elif Path(text).suffix.lower() == ".parquet":
            found = datasets.Dataset.from_parquet(text)
        elif Path(text).suffix.lower() == ".arrow":
            found = datasets.Dataset.from_file(text)
        else:
            found = datasets.load_from_disk(text)
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{text}: file not found (check the path; relative paths are relative to the config "
                        "file)") from None
    except Exception as err:  # pyarrow and datasets raise many types on a damaged or foreign file
        raise UserError(f"{text}: cannot read it as a dataset ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else 'no detail'})") from None
    if isinstance(found, datasets.DatasetDict):
        wanted = split or role
        if wanted not in found:
            raise UserError(f"{text}: split '{wanted}' does not exist (splits: {', '.join(found)}; set the "
                            "source's split:)")
        return found[wanted]
    if split not in (None, "train"):
        raise UserError(f"{text}: split '{split}' does not exist (this source is a single split; delete split:)")
    return found


def dataset_rows(path: str | Path, split: str | None = None, config: str | None = None,
                 role: str = "train") -> Iterator[tuple[str, dict]]:
    """(`row N`, raw object) for every row; missing values (Arrow's nulls) are left out, as an empty CSV cell is."""
    dataset = open_dataset(path, split, config, role)
    if len(dataset) == 0:
        raise UserError(f"{path}: the dataset has no rows (add at least one)")
    for index, row in enumerate(dataset):
        yield f"row {index + 1}", {key: value for key, value in row.items() if value is not None}


def renamed(obj: dict, columns: dict[str, str] | None, loc: str) -> dict:
    """The record with each field read from the column `columns` maps it to."""
    if not columns:
        return obj
    out = {key: value for key, value in obj.items() if key not in columns.values()}
    for field, column in columns.items():
        if column in obj:
            out[field] = obj[column]
        elif field not in obj:
            raise UserError(f"{loc}: column '{column}' (columns: {field}: {column}) is not in this record; its "
                            f"columns are {', '.join(sorted(obj))}")
    return out


@dataclass(frozen=True)
class SourceShare:
    """What one source of a training mix gives."""

    name: str
    available: int  # its training records (after its validation share is held out)
    drawn: int  # the records it puts in the mix: its weight's share of all sources' records
    weight: float

    def as_record(self) -> dict:
        return {"source": self.name, "available": self.available, "drawn": self.drawn, "weight": self.weight}


def draw_mix(sources: list[tuple[str, list, float]], seed: int) -> tuple[list, list[SourceShare]]:
    """The training records of a weighted mix, seeded: each source gives `weight / sum of weights` of all the
    sources' records together, drawn without replacement up to its size and repeated whole beyond it (a small
    source weighted up is seen several times an epoch, a big one weighted down is sampled)."""
    draws = mix_draws([len(records) for _, records, _ in sources], [weight for _, _, weight in sources])
    rng = random.Random(seed)
    mixed, shares = [], []
    for (name, records, weight), want in zip(sources, draws):
        copies, rest = divmod(want, len(records))
        mixed += records * copies + rng.sample(records, rest)
        shares.append(SourceShare(name, len(records), want, weight))
    return mixed, shares


def mix_draws(sizes: list[int], weights: list[float]) -> list[int]:
    """How many of an epoch's draws each source gives: its weight's share of all the sources' records."""
    return [round(sum(sizes) * weight / sum(weights)) for weight in weights]


def seeded_sample(records: list, limit: int | None, seed: int) -> list:
    """At most `limit` records, a seeded sample in their file order, so a big split does not dominate a run."""
    if limit is None or len(records) <= limit:
        return records
    keep = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in keep]


def training_sources(data: DataArgs) -> list[DataSource]:
    """The run's training sources: the `datasets:` mix, or `train_file` as a source of weight 1."""
    return data.datasets or [DataSource(path=data.train_file, format=data.format, columns=data.columns)]
