"""Files -> documents -> tokens -> training blocks, cached on disk.

Packing (the default) concatenates every document, each followed by EOS, and cuts the stream into
`block_size` blocks: no padding, and only the final remainder (< one block) is dropped. Without packing each
document (split into block-sized pieces when longer) is its own row, training batches group rows of similar
length (train.py), and the collator pads per batch, masking pad positions out of the labels by the attention
mask, never by token id, so real EOS tokens stay targets even when pad == eos.

The cache key covers the inputs' bytes, the tokenizer, every option that changes the result, and
FORMAT_VERSION: bump it whenever this file changes what it writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig
from .errors import DataError, OutputError
from .sources import Source, discover, fingerprint, load_documents

log = logging.getLogger(__name__)
FORMAT_VERSION = 2  # 2: unpacked rows carry a length column
COMPLETE = "COMPLETE"


@dataclass
class DataStats:
    train_documents: int
    valid_documents: int
    train_tokens: int  # real (non-padding) tokens, EOS included
    valid_tokens: int
    train_rows: int
    valid_rows: int
    dropped_tokens: int  # the packing remainder
    prepare_seconds: float
    fingerprint: str = ""  # the cache key: inputs' bytes, tokenizer and options
    cache_hit: bool = False


def cache_key(cfg: TrainConfig, tokenizer, train: Source, valid: Source, block_size: int) -> str:
    parts = {
        "format": FORMAT_VERSION,
        "train": fingerprint(train),
        "valid": fingerprint(valid) if valid else None,
        "tokenizer": hashlib.blake2b(tokenizer.backend_tokenizer.to_str().encode(), digest_size=16).hexdigest(),
        "eos": tokenizer.eos_token_id,
        "block_size": block_size,
        "packing": cfg.packing,
        "txt_split": cfg.txt_split,
        "text_field": cfg.text_field,
        # The held-out split depends on these only when there is no validation input.
        "split": None if valid else [cfg.validation_split, cfg.seed],
    }
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=12).hexdigest()


def prepare(cfg: TrainConfig, tokenizer, block_size: int, builds: bool = True, stop=None):
    """Return (train, validation, stats), building and caching them unless an identical build exists. `stop`, a
    StopRequest, is checked before the cache is written, so a signal leaves no cache behind.

    A process with `builds=False` waits for another to finish the cache instead (no collective is open yet, so
    a long tokenization cannot hit a NCCL timeout)."""
    import datasets

    start = time.perf_counter()
    train_src, valid_src = discover(cfg)
    key = cache_key(cfg, tokenizer, train_src, valid_src, block_size)
    target = cfg.data_cache_dir / f"blocks-{key}"
    if not builds:
        wait_for(target / COMPLETE)
    if (target / COMPLETE).is_file():
        stats = DataStats(**json.loads((target / "stats.json").read_text()))
        stats.cache_hit, stats.prepare_seconds = True, time.perf_counter() - start
        log.info("data: cache hit %s (%d train blocks, %d validation rows) in %.2f s", target.name,
                 stats.train_rows, stats.valid_rows, stats.prepare_seconds)
        loaded = datasets.load_from_disk(str(target))
        return loaded["train"], loaded["validation"], stats

    log.info("data: cache miss; reading %s", train_src.describe())
    # The datasets library's own intermediate files go to a scratch folder private to this process: builders on
    # several nodes sharing one cache volume must not delete each other's, and a miss re-reads the files anyway.
    scratch = cfg.data_cache_dir / f".scratch-{socket.gethostname()}-{os.getpid()}"
    try:
        datasets_dict, stats = build(cfg, tokenizer, block_size, train_src, valid_src, scratch)
        stats.prepare_seconds, stats.fingerprint = time.perf_counter() - start, key
        if stop is not None:
            stop.raise_if_requested("during data preparation (no cache was written)")
        save_atomically(datasets_dict, stats, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("data: %d documents -> %d tokens -> %d %s of %d tokens (%d remainder tokens dropped) in %.1f s, "
             "cached as %s", stats.train_documents, stats.train_tokens, stats.train_rows,
             "blocks" if cfg.packing else "rows", block_size, stats.dropped_tokens, stats.prepare_seconds, target.name)
    loaded = datasets.load_from_disk(str(target))
    return loaded["train"], loaded["validation"], stats


def build(cfg: TrainConfig, tokenizer, block_size: int, train_src: Source, valid_src: Source, scratch: Path):
    """Read, split, tokenize and pack: the DatasetDict to cache and its statistics."""
    import datasets

    train_docs = load_documents(train_src, cfg, scratch)
    if valid_src:
        valid_docs = load_documents(valid_src, cfg, scratch)
    else:
        train_docs, valid_docs = split_documents(train_docs, cfg.validation_split, cfg.seed)
    workers = cfg.preprocessing_workers or os.cpu_count() or 1
    train_ds, train_tokens, dropped = build_rows(train_docs, tokenizer, block_size, cfg.packing, workers)
    valid_ds, valid_tokens, _ = build_rows(valid_docs, tokenizer, block_size, cfg.packing, workers)
    if len(train_ds) == 0 or len(valid_ds) == 0:
        which = "training" if len(train_ds) == 0 else "validation"
        raise DataError(f"the {which} text has fewer than --block-size {block_size} tokens, so no full block "
                        "can be made; add text, lower --block-size, or use --no-packing.")
    stats = DataStats(train_documents=len(train_docs), valid_documents=len(valid_docs), train_tokens=train_tokens,
                      valid_tokens=valid_tokens, train_rows=len(train_ds), valid_rows=len(valid_ds),
                      dropped_tokens=dropped, prepare_seconds=0.0)
    return datasets.DatasetDict(train=train_ds, validation=valid_ds), stats


def wait_for(marker: Path, poll_seconds: float = 1.0) -> None:
    waited = 0.0
    while not marker.is_file():
        if waited % 60 < poll_seconds and waited:
            log.info("data: waiting for another process to build %s (%.0f s)", marker.parent.name, waited)
        time.sleep(poll_seconds)
        waited += poll_seconds


def split_documents(docs, percent: float, seed: int):
    """Hold out `percent` of documents (not blocks, so no text is in both), the same ones every run."""
    held_out = max(1, round(len(docs) * percent / 100))
    if len(docs) < 2 or held_out >= len(docs):
        raise DataError(f"only {len(docs)} document(s), too few to hold out {percent}% for validation; "
                        "add --valid-file, add text, or split .txt by line (--txt-split line).")
    parts = docs.train_test_split(test_size=held_out, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def build_rows(docs, tokenizer, block_size: int, packing: bool, workers: int):
    """Tokenize (see `tokenize`) and pack or chunk. Returns (dataset, tokens, dropped)."""
    import datasets
    import pyarrow as pa

    flat, lengths = tokenize(docs, tokenizer, workers)
    total = len(flat)
    if packing:
        blocks = total // block_size
        array = pa.FixedSizeListArray.from_arrays(pa.array(flat[: blocks * block_size]), block_size)
        return datasets.Dataset(pa.table({"input_ids": array})), blocks * block_size, total - blocks * block_size
    # One row per document; a document longer than a block continues in the next row, so nothing is cut.
    pieces = np.maximum(1, -(-lengths // block_size))
    row_lengths = np.minimum(block_size, lengths.repeat(pieces) - _piece_index(pieces) * block_size)
    offsets = np.concatenate([[0], np.cumsum(row_lengths)]).astype(np.int32)
    array = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.int32()))
    # `length` lets Trainer group rows of similar length into batches without reading every row.
    table = pa.table({"input_ids": array, "length": pa.array(row_lengths.astype(np.int32))})
    return datasets.Dataset(table), total, 0


def tokenize(docs, tokenizer, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Every document's ids followed by EOS, concatenated (int32), and each document's length with its EOS.

    Batches of documents go to `workers` forked processes, which inherit the documents and the Rust tokenizer
    instead of receiving them pickled, and send back compact int32 arrays rather than lists of lists.
    Processes, not the tokenizer's own thread pool: encode_batch used one core here (bench/prepare.py).
    """
    global _JOB
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # a copy we may change
    backend.no_truncation()
    backend.no_padding()
    # At least 8 tasks per process, so a few very long documents (--txt-split file) still spread out.
    size = max(1, min(TOKENIZE_BATCH, -(-len(docs) // (8 * workers))))
    spans = [(start, min(start + size, len(docs))) for start in range(0, len(docs), size)]
    _JOB = (docs, backend, tokenizer.eos_token_id)
    try:
        if workers > 1 and docs.data.nbytes >= PARALLEL_MIN_BYTES:
            with multiprocessing.get_context("fork").Pool(min(workers, len(spans))) as pool:
                parts = pool.map(_tokenize_span, spans, chunksize=1)
        else:
            parts = [_tokenize_span(span) for span in spans]
    finally:
        _JOB = None
    if not parts:
        return np.zeros(0, np.int32), np.zeros(0, np.int64)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


TOKENIZE_BATCH = 2000  # documents per task at most: amortises the transfer, and still balances the load
PARALLEL_MIN_BYTES = 4 << 20  # about a million tokens of text; below it, starting processes costs more than it saves
_JOB = None  # (documents, tokenizer, eos) while `tokenize` runs; forked workers inherit it


def _tokenize_span(span: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    docs, backend, eos = _JOB
    texts = docs[span[0]:span[1]]["text"]
    ids = [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    return np.insert(flat, np.cumsum(lengths), eos), lengths + 1


def _piece_index(pieces: np.ndarray) -> np.ndarray:
    """For pieces [2, 1, 3]: [0, 1, 0, 0, 1, 2], each row's index within its document."""
    starts = np.repeat(np.cumsum(pieces) - pieces, pieces)
    return np.arange(pieces.sum()) - starts


def save_atomically(dataset_dict, stats: DataStats, target: Path) -> None:
    """Write to a sibling staging folder and rename it into place, so a reader never sees half a cache. When
    nodes sharing a cache volume build at once, the first rename wins and the others discard their copy."""
    staging = target.with_name(f"{target.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        dataset_dict.save_to_disk(str(staging))
        (staging / "stats.json").write_text(json.dumps(asdict(stats), indent=1))
        (staging / COMPLETE).write_text("")
        if not (target / COMPLETE).is_file():
            shutil.rmtree(target, ignore_errors=True)  # an interrupted build's leftovers
            with contextlib.suppress(FileExistsError, OSError):
                staging.rename(target)
        shutil.rmtree(staging, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputError(f"cannot write the dataset cache to {target.parent} ({exc.strerror or exc}); "
                          "free space or set --cache-dir to a writable place.") from None


class PackedCollator:
    """Full blocks: labels are the inputs (the model shifts them); no attention mask, so SDPA's causal
    kernel runs without a mask tensor."""

    def __call__(self, rows):
        ids = torch.stack([torch.as_tensor(r["input_ids"], dtype=torch.long) for r in rows])
        return {"input_ids": ids, "labels": ids.clone()}


class PaddingCollator:
    """Pads to the longest row in the batch (not to a fixed 512) and sets labels to -100 exactly where the
    attention mask is 0, so a real EOS stays a target even when pad_token_id == eos_token_id."""

    def __init__(self, pad_token_id: int, block_size: int, multiple_of: int = 8):
        self.pad_token_id = pad_token_id
        self.block_size = block_size
        self.multiple_of = multiple_of  # tensor-core friendly lengths on GPUs

    def __call__(self, rows):
        seqs = [torch.as_tensor(r["input_ids"], dtype=torch.long) for r in rows]
        longest = max(len(s) for s in seqs)
        width = max(longest, min(self.block_size, -(-longest // self.multiple_of) * self.multiple_of))
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq)] = seq
            mask[i, : len(seq)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
