"""Exact and near-duplicate detection for texts, shared by `prepare` and `lint`.

Exact: the same text after case folding and whitespace collapsing. Near: Jaccard similarity of
word 3-gram shingles at or above a threshold. Candidates come from MinHash with banded LSH
(32 bands of 4 rows: a pair at similarity 0.8 shares fewer than the `MIN_SHARED` two bands
with probability ~1e-6), and are verified with the exact Jaccard, most shared bands first, so
the result never contains a false positive. The bands are matched by sorting each band's keys
(numpy), not in per-text buckets, so memory stays a few hundred bytes a text. Texts of a narrow
vocabulary crowd a band's groups with weak candidates, so within a group each text is paired
with its `GROUP_REACH` predecessors only, and only its `MAX_VERIFIED` candidates that share the
most bands are verified: a pair at 0.8 shares about 13 bands, so it is found unless all of them
are crowded. The work stays linear in the number of texts.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np

NEAR_DUPLICATE_THRESHOLD = 0.8
BANDS, ROWS = 32, 4
GROUP_REACH = 8  # earlier members of the same band group a text is paired with
MAX_VERIFIED = 32  # candidates verified per text, those sharing the most bands first
MIN_SHARED = 2  # bands a candidate must share (a pair at 0.8 shares fewer with probability ~1e-6)
PRIME = (1 << 31) - 1
HASH_RNG = np.random.default_rng(20240601)  # fixed: the same texts always give the same answer
HASH_A = HASH_RNG.integers(1, PRIME, size=BANDS * ROWS, dtype=np.uint64)
HASH_B = HASH_RNG.integers(0, PRIME, size=BANDS * ROWS, dtype=np.uint64)
MIX = HASH_RNG.integers(1, 1 << 63, size=ROWS, dtype=np.uint64) | np.uint64(1)  # folds a band's rows into one key


def normalise(text: str) -> str:
    return " ".join(text.casefold().split())


WORD = re.compile(r"\w+")


def shingles(text: str, n: int = 3) -> frozenset[int]:
    """Hashed word n-grams; a text shorter than n words is one shingle of all its words."""
    words = WORD.findall(text.casefold())
    if not words:
        return frozenset()
    if len(words) < n:
        return frozenset((zlib.crc32(" ".join(words).encode("utf-8")),))
    grams = map(" ".join, zip(*(words[k:] for k in range(n))))
    return frozenset(map(zlib.crc32, map(str.encode, grams)))


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def band_keys(shingle_set: frozenset[int]) -> np.ndarray:
    """The text's MinHash signature, each band's rows folded into one uint64 key (a collision only adds a
    candidate, which the exact Jaccard then rejects)."""
    x = np.fromiter(shingle_set, dtype=np.uint64)
    # (a*x + b) mod p for every hash function at once; a < 2^31 and x < 2^32 keep it inside uint64.
    minima = ((HASH_A[:, None] * x[None, :] + HASH_B[:, None]) % PRIME).min(axis=1).reshape(BANDS, ROWS)
    return np.bitwise_xor.reduce(minima * MIX, axis=1)  # wraps around: a hash, not arithmetic


@dataclass
class Duplicate:
    index: int  # the later text
    of: int  # the earlier text it repeats (which is kept)
    kind: str  # "exact" or "near"
    similarity: float


def find_duplicates(texts: list[str], threshold: float = NEAR_DUPLICATE_THRESHOLD) -> list[Duplicate]:
    """Every text that repeats an earlier one, exactly or nearly; the first of a group is kept (a repeat is
    never the earlier text of another repeat)."""
    found: dict[int, Duplicate] = {}
    first_seen: dict[str, int] = {}
    signed: list[int] = []  # texts with shingles that repeat nothing exactly: the near-duplicate search's
    keys = np.zeros((len(texts), BANDS), dtype=np.uint64)
    for i, text in enumerate(texts):
        key = normalise(text)
        if key in first_seen:
            found[i] = Duplicate(i, first_seen[key], "exact", 1.0)
            continue
        first_seen[key] = i
        shingle_set = shingles(text)
        if shingle_set:
            keys[len(signed)] = band_keys(shingle_set)
            signed.append(i)
    del first_seen
    for i, candidates in near_candidates(np.asarray(signed, dtype=np.int64), keys[:len(signed)]):
        mine = shingles(texts[i])
        for j in candidates:
            if j in found:  # a repeat is not an original
                continue
            similarity = jaccard(mine, shingles(texts[j]))
            if similarity >= threshold:
                found[i] = Duplicate(i, j, "near", round(similarity, 4))
                break
    return [found[i] for i in sorted(found)]


def near_candidates(index: np.ndarray, keys: np.ndarray):
    """(text, its earlier candidates, most shared bands first) for each text sharing a band key with an
    earlier one, in text order."""
    n = len(index)
    if n < 2:
        return
    codes = []
    for band in range(BANDS):
        order = np.lexsort((np.arange(n), keys[:, band]))  # by key, then position: earlier first in a group
        band_keys_sorted = keys[order, band]
        for reach in range(1, min(GROUP_REACH, n - 1) + 1):
            same = band_keys_sorted[reach:] == band_keys_sorted[:-reach]
            later, earlier = order[reach:][same], order[:-reach][same]
            codes.append(later.astype(np.int64) * n + earlier)
    pairs, shared = np.unique(np.concatenate(codes), return_counts=True)
    pairs, shared = pairs[shared >= MIN_SHARED], shared[shared >= MIN_SHARED]
    later, earlier = pairs // n, pairs % n
    ranked = np.lexsort((earlier, -shared, later))  # each text's candidates, most shared bands first
    later, earlier = later[ranked], earlier[ranked]
    starts = np.flatnonzero(np.diff(later, prepend=-1))
    for start, stop in zip(starts, [*starts[1:], len(later)]):
        yield int(index[later[start]]), [int(index[j]) for j in earlier[start:stop][:MAX_VERIFIED]]


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
