"""Exact and near-duplicate detection for texts, shared by `prepare` and `lint`.

Exact: the same text after case folding and whitespace collapsing. Near: Jaccard similarity of
word 3-gram shingles at or above a threshold. Candidates come from MinHash with banded LSH
(16 bands of 2 rows: a pair at similarity 0.8 is missed with probability ~1e-7), and every
candidate is verified with the exact Jaccard, so the result never contains a false positive and
the work stays near-linear in the number of texts.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np

NEAR_DUPLICATE_THRESHOLD = 0.8
_BANDS, _ROWS = 16, 2
_PRIME = (1 << 31) - 1
_rng = np.random.default_rng(20240601)  # fixed: the same texts always give the same answer
_A = _rng.integers(1, _PRIME, size=_BANDS * _ROWS, dtype=np.uint64)
_B = _rng.integers(0, _PRIME, size=_BANDS * _ROWS, dtype=np.uint64)


def normalise(text: str) -> str:
    return " ".join(text.casefold().split())


def shingles(text: str, n: int = 3) -> frozenset[int]:
    """Hashed word n-grams; a text shorter than n words is one shingle of all its words."""
    words = re.findall(r"\w+", text.casefold())
    if not words:
        return frozenset()
    grams = [" ".join(words[i: i + n]) for i in range(max(1, len(words) - n + 1))]
    return frozenset(zlib.crc32(g.encode("utf-8")) for g in grams)


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def _band_keys(shingle_set: frozenset[int]) -> list[tuple]:
    x = np.fromiter(shingle_set, dtype=np.uint64)
    # (a*x + b) mod p for every hash function at once; a < 2^31 and x < 2^32 keep it inside uint64.
    minima = ((_A[:, None] * x[None, :] + _B[:, None]) % _PRIME).min(axis=1)
    return [(band, *minima[band * _ROWS:(band + 1) * _ROWS].tolist()) for band in range(_BANDS)]


@dataclass
class Duplicate:
    index: int  # the later text
    of: int  # the earlier text it repeats (which is kept)
    kind: str  # "exact" or "near"
    similarity: float


def find_duplicates(texts: list[str], threshold: float = NEAR_DUPLICATE_THRESHOLD) -> list[Duplicate]:
    """Every text that repeats an earlier one, exactly or nearly; the first of a group is kept."""
    found: list[Duplicate] = []
    first_seen: dict[str, int] = {}
    buckets: dict[tuple, list[int]] = {}
    sets: dict[int, frozenset] = {}
    for i, text in enumerate(texts):
        key = normalise(text)
        if key in first_seen:
            found.append(Duplicate(i, first_seen[key], "exact", 1.0))
            continue
        first_seen[key] = i
        sets[i] = shingles(text)
        if not sets[i]:
            continue
        keys = _band_keys(sets[i])
        candidates = sorted({j for k in keys for j in buckets.get(k, ())})
        match = next(((j, s) for j in candidates if (s := jaccard(sets[i], sets[j])) >= threshold), None)
        if match:
            found.append(Duplicate(i, match[0], "near", round(match[1], 4)))
            continue
        for k in keys:
            buckets.setdefault(k, []).append(i)
    return found


def overlaps(texts: list[str], others: list[str], threshold: float = NEAR_DUPLICATE_THRESHOLD) -> list[Duplicate]:
    """Texts of `others` that repeat (exactly or nearly) one of `texts`: `index` is into `others`."""
    combined = find_duplicates(list(texts) + list(others), threshold)
    n = len(texts)
    parent = {d.index: d for d in combined}
    out = []
    for d in combined:
        if d.index < n:
            continue
        root = d
        while root.of in parent:  # a repeat of a repeat: follow it back to the first text
            root = parent[root.of]
        if root.of < n:
            kind = "exact" if d.kind == root.kind == "exact" else "near"
            out.append(Duplicate(d.index - n, root.of, kind, d.similarity if d is root else root.similarity))
    return out
