"""File helpers every layer shares: content hashes and fsync.

Checkpoints list each file's SHA-256 in their manifest, and the GGUF conversion cache is keyed
by the file's hash: one way to hash a file, so both read it the same way.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MB chunks (weight files do not fit a single read)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') writes to the disk before anything relies on them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
