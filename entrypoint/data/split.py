"""Which documents are held out for validation, decided per document from its position and the seed, and
which validation rows an evaluation scores.

The split streams: a document's fate depends only on (position, seed, percent), so no pass over the corpus and
no list of documents is needed, every shard of a sharded preparation decides the same way, and a rerun holds
out the same documents. Positions are cut into consecutive groups of about 100/percent documents and a hash of
(seed, group) picks the one document of each group that is held out, so the held-out share is exact (not a
coin flip per document) and spread evenly through the corpus.
"""

from __future__ import annotations

import numpy as np

MILLION = 1_000_000
_MASK = (1 << 64) - 1


def held_out(positions: np.ndarray, percent: float, seed: int) -> np.ndarray:
    """A boolean array: True where the document at that position (int64, counted from 0) is held out."""
    positions = np.asarray(positions, dtype=np.int64)
    rate = max(1, round(percent * 10_000))  # held-out documents per million
    group = positions * rate // MILLION
    start = -(-group * MILLION // rate)  # the first position of each group (ceil division, exact integers)
    size = -(-(group + 1) * MILLION // rate) - start
    pick = (_mix(group, seed) % size.astype(np.uint64)).astype(np.int64)
    return positions - start == pick


def _mix(values: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of each value offset by the seed: uniform, deterministic, the same on every machine."""
    x = values.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def capped_rows(row_lengths: np.ndarray, max_tokens: int) -> np.ndarray | None:
    """Indices of evenly spaced rows holding at most `max_tokens` tokens (at least one row), or None when every
    row fits (or max_tokens is 0: no cap). Evenly spaced, so a capped evaluation still samples the whole
    held-out set, and the same rows every time."""
    total = int(row_lengths.sum(dtype=np.int64))
    count = len(row_lengths)
    if max_tokens <= 0 or total <= max_tokens or count == 0:
        return None
    keep = max(1, min(count, int(max_tokens * count // total)))
    rows = np.arange(keep, dtype=np.int64) * count // keep
    within = np.cumsum(row_lengths[rows], dtype=np.int64) <= max_tokens
    return rows[within] if within.any() else rows[:1]
