"""The memory-mapped dataset training reads from token shards (shards.py writes them and describes their files):
rows of fixed blocks (packed) or of documents (unpacked), read through np.memmap, so memory does not grow with the
cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from entrypoint.data import split as splitting


@dataclass(frozen=True)
class Layout:
    """How a cache's shards hold their tokens (its manifest.json): the shard folders, in order, the block size,
    packed or not, the token dtype, and whether each token has a loss mask."""

    shards: tuple[Path, ...]
    block_size: int
    packing: bool
    dtype: str
    masked: bool = False


class TokenDataset(torch.utils.data.Dataset):
    """One split of a cache as rows for the collators, read through np.memmap: {"input_ids": int64 array}, plus
    "labels" (-100 where no loss) when the cache is `masked`, plus "position_ids" restarting at every document
    (and at the row start) when packed rows `isolate` documents.

    Packed: row i is tokens [i*block, (i+1)*block) of the concatenated stream (the remainder is never read).
    Unpacked: one row per document, a document longer than a block continuing in the next row. Offsets are
    int64 throughout, so streams past 2**31 tokens index correctly."""

    def __init__(self, layout: Layout, split: str, rows: np.ndarray | None = None, isolate: bool = False):
        self.layout, self.split = layout, split
        self.shards, self.block_size = layout.shards, layout.block_size
        self.packing, self.dtype = layout.packing, layout.dtype
        self.rows = rows  # a subset of row indices (the evaluation cap), or None for all
        self.masked, self.isolate = layout.masked, isolate and layout.packing  # an unpacked row holds one document
        self._open()

    def _open(self) -> None:
        paths = [d / f"{self.split}.tokens" for d in self.shards]
        self.parts = _mapped(paths, self.dtype)
        self.masks = _mapped([d / f"{self.split}.mask" for d in self.shards], "uint8") if self.masked else None
        self.bounds = np.cumsum([0] + [len(p) for p in self.parts], dtype=np.int64)
        total = int(self.bounds[-1])
        lengths = None
        if not self.packing or self.isolate:
            lengths = np.concatenate([np.fromfile(d / f"{self.split}.docs", dtype=np.int64) for d in self.shards])
        self.starts = np.cumsum(lengths) - lengths if self.isolate else None  # each document's first token
        if self.packing:
            self.count, self.offsets = total // self.block_size, None
        else:
            self.offsets = row_offsets(lengths, self.block_size)
            self.count = len(self.offsets) - 1

    def __getstate__(self):  # DataLoader workers under spawn: send paths, not mapped arrays
        return {k: v for k, v in self.__dict__.items() if k not in ("parts", "masks", "bounds", "offsets", "starts")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return self.count if self.rows is None else len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, str):  # a column, as with a datasets.Dataset: every row as a list
            return [row[index].tolist() for row in self]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        row = int(self.rows[index]) if self.rows is not None else index % len(self)
        if self.packing:
            start, end = row * self.block_size, (row + 1) * self.block_size
        else:
            start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        ids = self.read(start, end)
        item = {"input_ids": ids}
        if self.masks is not None:
            item["labels"] = np.where(self.read(start, end, self.masks) != 0, ids, -100)
        if self.starts is not None:
            at = np.arange(start, end, dtype=np.int64)
            first = self.starts[np.searchsorted(self.starts, at, side="right") - 1]
            item["position_ids"] = at - np.maximum(first, start)
        return item

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def read(self, start: int, end: int, parts: list | None = None) -> np.ndarray:
        """Tokens (or, from `parts`, mask values) [start, end) of the concatenated stream, as int64, crossing shard
        ends where needed."""
        parts = self.parts if parts is None else parts
        pieces = []
        part = int(np.searchsorted(self.bounds, start, side="right")) - 1
        while start < end:
            base = int(self.bounds[part])
            stop = min(end, int(self.bounds[part + 1]))
            pieces.append(parts[part][start - base:stop - base])
            start, part = stop, part + 1
        return np.concatenate(pieces).astype(np.int64) if len(pieces) > 1 else pieces[0].astype(np.int64)

    def row_lengths(self) -> np.ndarray:
        """Each row's length (Trainer's group_by_length batches rows of similar length)."""
        lengths = np.full(self.count, self.block_size, dtype=np.int64) if self.packing else np.diff(self.offsets)
        return lengths if self.rows is None else lengths[self.rows]

    def capped(self, max_tokens: int) -> TokenDataset:
        """This split limited to evenly spaced rows of at most `max_tokens` tokens in all (itself if they fit)."""
        rows = splitting.capped_rows(self.row_lengths(), max_tokens)
        return self if rows is None else TokenDataset(self.layout, self.split,
                                                      rows if self.rows is None else self.rows[rows], self.isolate)

    def tokens(self) -> int:
        return int(self.row_lengths().sum(dtype=np.int64))


def _mapped(paths: list[Path], dtype: str) -> list[np.ndarray]:
    return [np.memmap(p, dtype=dtype, mode="r") if p.stat().st_size else np.zeros(0, dtype) for p in paths]


def row_offsets(lengths: np.ndarray, block_size: int) -> np.ndarray:
    """Where each unpacked row starts in the stream, and the end (int64): documents of `lengths` tokens, each
    cut into pieces of at most `block_size`. For lengths [5, 2] and block 4: rows of 4, 1 and 2 -> [0, 4, 5, 7]."""
    lengths = lengths.astype(np.int64)
    pieces = np.maximum(1, -(-lengths // block_size))
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    within = np.arange(int(pieces.sum()), dtype=np.int64) - first  # each row's index within its document
    row_lengths = np.minimum(block_size, lengths.repeat(pieces) - within * block_size)
    return np.concatenate([np.zeros(1, np.int64), np.cumsum(row_lengths, dtype=np.int64)])


class PairDataset(torch.utils.data.Dataset):
    """Preference pairs over an unpacked TokenDataset whose rows alternate chosen, rejected (shards.py writes each
    pair's two documents together, and preference.encode keeps each within one row): item i is
    {"chosen": row 2i, "rejected": row 2i + 1}."""

    def __init__(self, rows: TokenDataset):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows) // 2

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        return {"chosen": self.rows[2 * index], "rejected": self.rows[2 * index + 1]}

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def row_lengths(self) -> np.ndarray:
        """Each pair's longer row (a batch is padded to its longest)."""
        return self.rows.row_lengths().reshape(-1, 2).max(axis=1)

    def capped(self, max_tokens: int) -> PairDataset:
        """Evenly spaced whole pairs of at most `max_tokens` tokens in all (itself if they fit)."""
        pairs = splitting.capped_rows(self.rows.row_lengths().reshape(-1, 2).sum(axis=1), max_tokens)
        if pairs is None:
            return self
        rows = np.stack([2 * pairs, 2 * pairs + 1], axis=1).reshape(-1)
        base = self.rows
        return PairDataset(TokenDataset(base.layout, base.split, rows if base.rows is None else base.rows[rows],
                                        base.isolate))

    def tokens(self) -> int:
        return self.rows.tokens()
