"""What reading the data decided, cached by the source files' bytes, so a warm start does not parse them again.

Reading a million records (parsing, validating, holding out a share, drawing a mix) costs more than
the rest of a warm start together, and what training needs of it is small: the held-out records (at
most `max_eval_samples` of each split), the mix's counts, and the training records' content hash,
which keys their tokenised examples in the dataset cache. An entry stores just those, keyed by the
bytes of every file read and every setting that changes what is read. On a hit the training records
are `DeferredRecords`: read, the usual way, only if their examples are not cached as well (another
tokenizer or max_seq_length).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from deltatune.data.formats import Record

VERSION = 1  # bump when what an entry holds, or how records are read, changes


def records_digest(records: Sequence[Record]) -> str:
    """sha256 of the records' content (deferred records know theirs without being read)."""
    if isinstance(records, DeferredRecords):
        return records.digest
    digest = hashlib.sha256()
    for r in records:
        digest.update(json.dumps([r.messages, r.text, r.text_pair, r.label, r.source, r.tools, r.chosen, r.rejected],
                                 ensure_ascii=False).encode())
    return digest.hexdigest()


class DeferredRecords(Sequence):
    """A warm start's training records: their count and content hash now, the records only when asked for."""

    def __init__(self, count: int, digest: str, read: Callable[[], list[Record]]):
        self.count, self.digest, self.read, self.loaded = count, digest, read, None

    @classmethod
    def of(cls, records: list[Record]) -> "DeferredRecords":
        """Records already read, with their hash taken once."""
        deferred = cls(len(records), records_digest(records), lambda: records)
        deferred.loaded = records
        return deferred

    def records(self) -> list[Record]:
        if self.loaded is None:
            self.loaded = self.read()
        return self.loaded

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):
        return self.records()[index]

    def __iter__(self):
        return iter(self.records())


def source_digest(path: str | Path) -> str | None:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes); None for a hub id, whose
    content only the hub knows, and for what cannot be read (reading it then says why, in one line)."""
    if str(path).startswith("hf://"):
        return None
    path = Path(path)
    digest = hashlib.sha256()
    try:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(path) if path.is_dir() else "").encode() + b"\0")
            with open(file, "rb") as fh:
                digest.update(hashlib.file_digest(fh, "sha256").digest())
    except OSError:
        return None
    return digest.hexdigest()


def reading_key(files: list[str | Path | None], settings: dict) -> str | None:
    """The entry's name: every file read (None: not given) and the settings; None when a source has no digest."""
    digests = [None if f is None else source_digest(f) for f in files]
    if any(d is None for f, d in zip(files, digests) if f is not None):
        return None
    blob = json.dumps({"version": VERSION, "files": digests, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def save_reading(folder: Path, key: str, entry: dict) -> None:
    """Write the entry whole (a temporary file renamed into place); a cache that cannot be written only
    costs the reading next time."""
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(entry, fh, ensure_ascii=False, default=record_dict)
        os.replace(tmp, folder / f"{key}.json")
    except OSError:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def record_dict(obj) -> dict:
    if isinstance(obj, Record):
        return dataclasses.asdict(obj)
    raise TypeError(f"{type(obj).__name__} is not a record")


def load_reading(folder: Path, key: str) -> dict | None:
    """The entry (records as Record again), or None when there is none or it cannot be read."""
    try:
        entry = json.loads((folder / f"{key}.json").read_text(encoding="utf-8"))
        for split in ("val", "test"):
            entry[split] = [Record(**r) for r in entry[split]]
        return entry
    except (OSError, ValueError, TypeError, KeyError):
        return None
