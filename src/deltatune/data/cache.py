"""Tokenised datasets, prepared once (in parallel) and cached on disk as memory-mapped Arrow.

Rendering every conversation turn by turn through the chat template is the slow part of data
preparation; a rerun with the same data, tokenizer and settings reads the result back instead.
The key hashes the records' content, the tokenizer (its full serialisation and chat template)
and every setting that changes the examples, so any change makes a new entry. An entry is a
folder under `$DELTATUNE_CACHE/datasets` (default ~/.cache/deltatune/datasets) of Arrow files, one
per chunk of records, and their stats, renamed into place whole. Training reads examples from the
files as it needs them (`ExampleTable`), cold or warm, so both runs see the same thing.

Chunks are prepared by `dataset_num_proc` worker processes (spawned: each imports only the data
code and gets the tokenizer once), each writing its own file; one process for small data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from deltatune.data.examples import DatasetStats, Example, build_sft_examples, no_examples_left
from deltatune.data.formats import Record
from deltatune.data.split_cache import records_digest
from deltatune.files import inject_write_fault, is_no_space, no_space

FORMAT_VERSION = 3  # bump when the tokenisation, masking or storage changes (3: Arrow chunks, reasoning keys)
STATS = "stats.json"
CHUNK = 5000  # records a worker prepares at a time: progress moves, and no worker holds much
MIN_PARALLEL = 4 * CHUNK  # below this, starting workers costs more than it saves


def cache_dir() -> Path:
    """Where deltatune keeps what it can rebuild: converted GGUF models, tokenised datasets."""
    return Path(os.environ.get("DELTATUNE_CACHE", Path.home() / ".cache" / "deltatune"))


def dataset_key(records: Sequence[Record], tokenizer, **settings) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"version": FORMAT_VERSION, "settings": settings}, sort_keys=True).encode())
    digest.update(tokenizer_digest(tokenizer).encode())
    digest.update(records_digest(records).encode())
    return digest.hexdigest()[:32]


def tokenizer_digest(tokenizer) -> str:
    """sha256 of the tokenizer's full serialisation and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest = hashlib.sha256((backend.to_str() if backend is not None else repr(tokenizer)).encode())
    digest.update(str(tokenizer.chat_template).encode())
    return digest.hexdigest()


class ExampleTable(Sequence):
    """Tokenised examples in memory-mapped Arrow files, indexed and iterated like a list of Example."""

    def __init__(self, files: list[Path]):
        import pyarrow as pa

        tables = [pa.ipc.open_file(pa.memory_map(str(f), "r")).read_all() for f in files]
        self.table = pa.concat_tables(tables)
        self._ids, self._labels = self.table.column("input_ids"), self.table.column("labels")
        self._sources = self.table.column("source")

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return Example(self._ids[index].as_py(), self._labels[index].as_py(), self._sources[index].as_py())

    def __iter__(self):
        for batch in self.table.to_batches(max_chunksize=4096):
            columns = batch.to_pydict()
            yield from (Example(i, lab, s) for i, lab, s in
                        zip(columns["input_ids"], columns["labels"], columns["source"]))

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and list(self) == list(other)

    def lengths(self) -> list[int]:
        import pyarrow.compute as pc

        return pc.list_value_length(self._ids).to_pylist()

    def sources(self) -> list[str]:
        return self._sources.to_pylist()

    def fingerprint(self, digest) -> None:
        """Feed `digest` what checkpoint.data_fingerprint feeds it for each example (its length, input ids
        and labels as int64), a batch of examples at a time: a million examples hash in seconds, not minutes."""
        import numpy as np

        for batch in self.table.to_batches(max_chunksize=16384):
            ids, labels = batch.column("input_ids"), batch.column("labels")
            lengths = np.diff(ids.offsets.to_numpy()).astype(np.int64)
            before = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # each example's first token
            owner = np.repeat(np.arange(len(lengths)), lengths)  # the example of each token
            at = owner + before[owner] + 1 + np.arange(len(owner))  # where each input id goes
            out = np.empty(len(lengths) + 2 * len(owner), dtype=np.int64)
            out[np.arange(len(lengths)) + 2 * before] = lengths
            out[at] = ids.flatten().to_numpy()
            out[at + lengths[owner]] = labels.flatten().to_numpy()
            digest.update(out.tobytes())


def write_examples(path: Path, examples: list[Example]) -> None:
    import pyarrow as pa

    table = pa.table({"input_ids": pa.array([e.input_ids for e in examples], pa.list_(pa.int32())),
                      "labels": pa.array([e.labels for e in examples], pa.list_(pa.int32())),
                      "source": pa.array([e.source for e in examples], pa.string())})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


WORKER: dict = {}  # a worker process's tokenizer and settings, set once by its initializer


def start_worker(tokenizer, settings: dict) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    WORKER.update(tokenizer=tokenizer, settings=settings)


def prepare_chunk(task: tuple[list[Record], str]) -> DatasetStats:
    """Tokenise one chunk of records into its own Arrow file."""
    records, path = task
    examples, stats = build_sft_examples(records, WORKER["tokenizer"], require_examples=False, **WORKER["settings"])
    write_examples(Path(path), examples)
    return stats


def prepare(records: list[Record], tokenizer, folder: Path, settings: dict, num_proc: int, progress
            ) -> DatasetStats:
    """Every chunk's Arrow file in `folder`; the chunks' stats together."""
    chunks = [(records[i:i + CHUNK], str(folder / f"chunk-{i // CHUNK:05d}.arrow"))
              for i in range(0, len(records), CHUNK)]
    parts = []
    with contextlib.ExitStack() as stack:
        if num_proc > 1 and len(records) >= MIN_PARALLEL:
            context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's threads
            pool = stack.enter_context(context.Pool(min(num_proc, len(chunks)), initializer=start_worker,
                                                    initargs=(tokenizer, settings)))
            done = pool.imap(prepare_chunk, chunks)
        else:
            start_worker(tokenizer, settings)
            done = map(prepare_chunk, chunks)
        for (chunk, _), stats in zip(chunks, done):
            parts.append(stats)
            if progress is not None:
                progress(len(chunk))
    return DatasetStats.merged(parts)


def cache_full(folder: Path):
    return no_space(f"the dataset cache {folder}", folder, None,
                    "free some space, or set DELTATUNE_CACHE to another folder")


def open_entry(entry: Path) -> ExampleTable:
    return ExampleTable(sorted(entry.glob("chunk-*.arrow")))


def default_num_proc() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cached_sft_examples(records: list[Record], tokenizer, *, max_seq_length: int, train_on_inputs: bool = False,
                        name: str = "data", cache: Path | None = None, progress=None, reasoning_format: str = "auto",
                        train_on_reasoning: bool = True, num_proc: int | None = None
                        ) -> tuple[ExampleTable | list[Example], DatasetStats]:
    """build_sft_examples, prepared in chunks by `num_proc` processes (default: the cores) and read from the
    cache when the same data was prepared before. Returns an ExampleTable over the cached files, or the
    examples themselves where the cache cannot be written."""
    folder = (cache or cache_dir()) / "datasets"
    rule = {"train_on_inputs": train_on_inputs, "reasoning_format": reasoning_format,
            "train_on_reasoning": train_on_reasoning}
    key = dataset_key(records, tokenizer, max_seq_length=max_seq_length, **rule)
    entry = folder / key
    if (entry / STATS).is_file():
        try:
            stats = DatasetStats(**json.loads((entry / STATS).read_text(encoding="utf-8")))
            table = open_entry(entry)
            if progress is not None:
                progress(len(records))
            return table, stats
        except Exception:  # noqa: BLE001 - a damaged entry (bad JSON, a cut Arrow file) is rebuilt below
            shutil.rmtree(entry, ignore_errors=True)
    settings = {"max_seq_length": max_seq_length, "name": name, **rule}
    try:
        inject_write_fault("cache")
        folder.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=folder, prefix=".tmp-"))
    except OSError as err:
        if is_no_space(err):  # the next run would fail the same way: say so now
            raise cache_full(folder) from None
        # An unwritable cache is refused before training (pipeline.preflight); elsewhere it only
        # costs the re-tokenisation next time.
        examples, stats = build_sft_examples(records, tokenizer, progress=progress, **settings)
        return examples, stats
    try:
        stats = prepare(records, tokenizer, work, settings, num_proc or default_num_proc(), progress)
        if stats.examples == 0:
            raise no_examples_left(name, max_seq_length)
        (work / STATS).write_text(json.dumps(dataclasses.asdict(stats)), encoding="utf-8")
        try:
            os.rename(work, entry)
        except OSError:  # another process (a second rank) put the same entry in place first
            if not (entry / STATS).is_file():
                raise
    except OSError as err:
        if is_no_space(err):
            raise cache_full(folder) from None
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return open_entry(entry), stats
