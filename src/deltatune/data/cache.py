"""Tokenised datasets, prepared once and cached on disk.

Rendering every conversation turn by turn through the chat template is the slow part of data
preparation; a rerun with the same data, tokenizer and settings reads the result back instead.
The key hashes the records' content, the tokenizer (its full serialisation and chat template)
and every setting that changes the examples, so any change makes a new entry. Entries are
JSON under `$DELTATUNE_CACHE/datasets` (default ~/.cache/deltatune/datasets), written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

from deltatune.data.examples import DatasetStats, Example, build_sft_examples
from deltatune.data.formats import Record
from deltatune.files import inject_write_fault, is_no_space, no_space

FORMAT_VERSION = 2  # bump when the tokenisation or masking logic changes (2: trailing text, turn by turn, tools)


def cache_dir() -> Path:
    """Where deltatune keeps what it can rebuild: converted GGUF models, tokenised datasets."""
    return Path(os.environ.get("DELTATUNE_CACHE", Path.home() / ".cache" / "deltatune"))


def dataset_key(records: list[Record], tokenizer, **settings) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"version": FORMAT_VERSION, "settings": settings}, sort_keys=True).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else repr(tokenizer)).encode())
    digest.update(str(tokenizer.chat_template).encode())
    for r in records:
        digest.update(json.dumps([r.messages, r.text, r.text_pair, r.label, r.source, r.tools],
                                 ensure_ascii=False).encode())
    return digest.hexdigest()[:32]


def cached_sft_examples(records: list[Record], tokenizer, *, max_seq_length: int, train_on_inputs: bool = False,
                        name: str = "data", cache: Path | None = None, progress=None, reasoning_format: str = "auto",
                        train_on_reasoning: bool = True) -> tuple[list[Example], DatasetStats]:
    """build_sft_examples, read from the cache when the same data was prepared before."""
    folder = (cache or cache_dir()) / "datasets"
    rule = {"train_on_inputs": train_on_inputs, "reasoning_format": reasoning_format,
            "train_on_reasoning": train_on_reasoning}
    key = dataset_key(records, tokenizer, max_seq_length=max_seq_length, **rule)
    path = folder / f"{key}.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            examples = [Example(**e) for e in saved["examples"]]
            if progress is not None:
                progress(len(records))
            return examples, DatasetStats(**saved["stats"])
        except (ValueError, KeyError, TypeError):
            pass  # a damaged entry is rebuilt below
    examples, stats = build_sft_examples(records, tokenizer, max_seq_length=max_seq_length, name=name,
                                         progress=progress, **rule)
    try:
        inject_write_fault("cache")
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"examples": [dataclasses.asdict(e) for e in examples], "stats": dataclasses.asdict(stats)}, f)
        os.replace(tmp, path)
    except OSError as err:
        if is_no_space(err):  # the next run would fail the same way: say so now
            raise no_space(f"the dataset cache {folder}", folder, None,
                           "free some space, or set DELTATUNE_CACHE to another folder") from None
        # An unwritable cache is refused before training (pipeline.preflight); elsewhere it only
        # costs the re-tokenisation next time.
    return examples, stats
