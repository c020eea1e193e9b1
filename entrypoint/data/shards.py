"""Streaming tokenization into token shards on disk; tokendataset.py reads them back for training.

A shard is a directory holding, for each split, `<split>.tokens` (every document's ids, BOS first where the
tokenizer adds one and EOS last, concatenated, raw uint16 when the vocabulary fits in 65,536 ids, else uint32) and
`<split>.docs` (each document's token count with its BOS and EOS, int64), plus `stats.json` with the counts.
Instruction and chat records also write `<split>.mask` (uint8, one per token: 1 where the token carries loss),
written in the same pieces as the tokens; plain text has no mask (every token is a target).

A cache is an ordered list of shards; a split's token stream is their concatenation, so packed blocks may
straddle two shards and a sharded build yields exactly the rows of a single-process one. Memory stays bounded:
documents are read in spans (from `.txt` files directly, textfiles.py, or from the memory-mapped Arrow table of
`datasets`' loaders), tokenized by forked workers and appended to the files as results arrive.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from entrypoint.data import formats, preference, textfiles
from entrypoint.data import split as splitting
from entrypoint.errors import DataError
from entrypoint.runtime import forkpool

SPLITS = ("train", "valid")
CUT = "cut"  # in a result of preference pairs: how many had an answer cut to the block (not a split)
TOKENIZE_BATCH = 2000  # documents per task at most: amortises the transfer, and still balances the load
SPAN_BYTES = 4 << 20  # text per task at most, so a few huge documents (--txt-split file) spread out too
PARALLEL_MIN_BYTES = 4 << 20  # about a million tokens of text; below it, starting processes costs more than it saves


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class Job:
    """One source's documents and what to do with them; forked workers inherit it (never pickled)."""

    docs: object  # textfiles.TextFiles, or a memory-mapped datasets.Dataset (sources.read_documents)
    backend: object  # a tokenizers.Tokenizer without truncation or padding
    eos: int
    dtype: np.dtype
    target: str = "train"  # where every document goes, unless `hold_out` routes some to valid
    hold_out: tuple[float, int] | None = None  # (percent, seed)
    bos: int | None = None  # prepended to every document (formats.convention)
    fmt: str = formats.TEXT  # records (formats.INSTRUCTION, formats.CHAT) take the slower per-record path
    tokenizer: object = None  # the transformers tokenizer, for records
    train_on_prompt: bool = False
    block_size: int = 0  # the longest preference sequence (preference.encode)


_JOB: Job | None = None


def share(docs, shard: int, num_shards: int) -> tuple[int, int]:
    """Shard `shard` of `num_shards`: equal runs of documents, or of bytes for TextFiles (whose pieces begin
    within it). The shards' documents, in shard order, are all the documents in order."""
    count = docs.nbytes if isinstance(docs, textfiles.TextFiles) else len(docs)
    return count * shard // num_shards, count * (shard + 1) // num_shards


def text_bytes(docs, lo: int, hi: int) -> int:
    """Input bytes of `share` [lo, hi), for progress: of TextFiles, the range itself; of text documents, their
    UTF-8 bytes from the string arrays' offsets (no per-document array); of records, the Arrow bytes of their rows."""
    import pyarrow as pa

    if isinstance(docs, textfiles.TextFiles):
        return hi - lo
    if "text" not in docs.column_names:
        return docs.data.table.slice(lo, hi - lo).nbytes
    total = 0
    for chunk in docs.data.table.column("text").slice(lo, hi - lo).chunks:
        if len(chunk):
            kind = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
            offsets = np.frombuffer(chunk.buffers()[1], dtype=kind)
            total += int(offsets[chunk.offset + len(chunk)]) - int(offsets[chunk.offset])
    return total


def spans(docs, start: int, end: int, workers: int):
    """(first, last) document ranges covering [start, end): at most TOKENIZE_BATCH documents and about
    SPAN_BYTES of text each, and at least 8 per worker so small inputs still spread over every process."""
    import pyarrow.compute as pc

    size = max(1, min(TOKENIZE_BATCH, -(-(end - start) // (8 * workers))))
    table = docs.data.table
    if "text" not in table.column_names:  # records: a few fields each, so a count bounds the bytes well enough
        size = max(1, size // 8)
        yield from ((first, min(end, first + size)) for first in range(start, end, size))
        return
    for window in range(start, end, 64 * size):
        stop = min(end, window + 64 * size)
        sizes = pc.binary_length(table.column("text").slice(window, stop - window)).fill_null(0)
        sizes = np.asarray(sizes.to_numpy(zero_copy_only=False), dtype=np.int64)
        first = window
        while first < stop:
            cut = min(stop, first + size)
            within = np.cumsum(sizes[first - window:cut - window])
            cut = first + max(1, int(np.searchsorted(within, SPAN_BYTES, side="right")))
            yield first, min(cut, stop)
            first = cut


def tokenize_span(span: tuple[int, int]) -> tuple[dict, int]:
    """Tokenize documents [first, last) of the inherited job: ({split: (tokens, lengths, mask)}, input bytes);
    mask is None for plain text."""
    import pyarrow.compute as pc

    job = _JOB
    first, last = span
    if job.fmt != formats.TEXT:
        return _tokenize_records(job, first, last)
    column = job.docs.data.table.column("text").slice(first, last - first)
    return _tokenize_texts(job, first, column.to_pylist()), int(pc.sum(pc.binary_length(column)).as_py() or 0)


def tokenize_piece(piece: tuple[int, bytes]) -> tuple[dict, int]:
    """tokenize_span for a piece of `.txt` files (textfiles.TextFiles.pieces): (index of its first document, text)."""
    first, text = piece
    return _tokenize_texts(_JOB, first, textfiles.documents(text, _JOB.docs.mode)), len(text)


def _tokenize_texts(job: Job, first: int, texts: list[str]) -> dict:
    """Documents numbered from `first`, whitespace-only ones skipped, as {split: (tokens, lengths, None)}."""
    keep = np.fromiter((i for i, t in enumerate(texts) if t and t.strip()), dtype=np.int64)
    ids = [e.ids for e in job.backend.encode_batch_fast([texts[i] for i in keep], add_special_tokens=False)]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=job.dtype, count=int(lengths.sum()))
    # BOS first and EOS last, each unless the document's text already tokenizes to it (never doubled).
    if job.bos is not None and len(lengths):
        starts = np.cumsum(lengths) - lengths
        missing = flat[starts] != job.bos
        flat = np.insert(flat, starts[missing], job.bos)
        lengths += missing
    ends = np.cumsum(lengths)
    missing = flat[ends - 1] != job.eos if len(lengths) else np.zeros(0, bool)
    tokens = np.insert(flat, ends[missing], job.eos)
    lengths += missing
    return _route(job, first + keep, tokens, lengths, None)


def _tokenize_records(job: Job, first: int, last: int) -> tuple[dict, int]:
    """The per-record path (formats.encode): tokens, lengths and each token's loss mask."""
    table = job.docs.data.table.slice(first, last - first)
    conv = formats.Convention(job.bos, job.eos)
    indices = np.arange(first, last, dtype=np.int64)
    docs = [_encode(job, conv, first + n, record) for n, record in enumerate(table.to_pylist())]
    cut = 0
    if job.fmt == formats.PREFERENCE:  # each pair: its chosen, then its rejected document, held out together
        cut = sum(pair[2] for pair in docs)
        docs, indices = [doc for pair in docs for doc in pair[:2]], np.repeat(indices, 2)
    lengths = np.fromiter((len(d.ids) for d in docs), dtype=np.int64, count=len(docs))
    total = int(lengths.sum())
    tokens = np.fromiter(itertools.chain.from_iterable(d.ids for d in docs), dtype=job.dtype, count=total)
    mask = np.fromiter((label != formats.IGNORE for d in docs for label in d.labels), dtype=np.uint8, count=total)
    routed = _route(job, indices, tokens, lengths, mask)
    return (routed | {CUT: cut} if job.fmt == formats.PREFERENCE else routed), table.nbytes


def _encode(job: Job, conv: formats.Convention, index: int, record: dict):
    """The record's document, or for a preference pair, preference.encode's (chosen, rejected, cut)."""
    try:
        if job.fmt == formats.PREFERENCE:
            return preference.encode(record, job.tokenizer, conv, job.block_size)
        return formats.encode(record, job.fmt, job.tokenizer, conv, train_on_prompt=job.train_on_prompt)
    except DataError as exc:  # which record: the files are one table here (`finetune doctor` names file and line)
        data = "validation" if job.target == "valid" else "training"
        raise DataError(f"record {index + 1} of the {data} data: {exc.problems[0]}") from None


def _route(job: Job, indices: np.ndarray, tokens: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None) -> dict:
    """{split: (tokens, lengths, mask)}: all to the job's target, or each document (by its index) held out or not."""
    if job.hold_out is None:
        return {job.target: (tokens, lengths, mask)}
    held = splitting.held_out(indices, *job.hold_out)
    by_token = np.repeat(held, lengths)
    return {"train": (tokens[~by_token], lengths[~held], None if mask is None else mask[~by_token]),
            "valid": (tokens[by_token], lengths[held], None if mask is None else mask[by_token])}


def tokenized(job: Job, start: int, end: int, workers: int, stop=None):
    """Yield tokenize_span's results for documents [start, end) (for TextFiles, the pieces that begin in bytes
    [start, end)), in order, from `workers` forked processes (forkpool.ordered).

    Processes, not the tokenizer's own thread pool: encode_batch used one core here (bench/prepare.py). Each
    worker reads its own pieces from the files (or its spans from the inherited Arrow table), so no text passes
    between processes. `stop` (a StopRequest) is checked twice a second while waiting; the workers are killed
    when the consumer stops early (an error, a signal)."""
    global _JOB
    _JOB = job
    try:
        if isinstance(job.docs, textfiles.TextFiles):
            task, nbytes, work = tokenize_piece, job.docs.nbytes, functools.partial(job.docs.pieces, start, end)
        else:
            task, nbytes = tokenize_span, job.docs.data.nbytes
            work = functools.partial(spans, job.docs, start, end, workers)
        check = None if stop is None else (lambda: stop.raise_if_requested(STOPPED))
        if workers > 1 and nbytes >= PARALLEL_MIN_BYTES:
            yield from forkpool.ordered(work, task, workers, check, what="tokenizing")
        else:
            for span in work():
                yield task(span)
                if check is not None:
                    check()
    finally:
        _JOB = None


STOPPED = "while preparing data; the partial cache was removed"


def tokenize(docs, tokenizer, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Every document's ids then EOS, concatenated, and each document's length with its EOS (in memory: for
    tests and benchmarks; preparation streams the same results to disk)."""
    job = Job(docs, backend(tokenizer), tokenizer.eos_token_id, np.dtype(np.int32),
              bos=formats.convention(tokenizer).bos_id)
    parts = [result["train"] for result, _ in tokenized(job, *share(docs, 0, 1), workers)]
    if not parts:
        return np.zeros(0, np.int32), np.zeros(0, np.int64)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def backend(tokenizer):
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # a copy we may change
    copy.no_truncation()
    copy.no_padding()
    return copy


class ShardWriter:
    """Appends tokenized documents to one shard directory; `close` writes stats.json, which marks it whole.
    `masked` shards also hold each token's loss mask."""

    def __init__(self, directory: Path, block_size: int, masked: bool = False):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.block_size = directory, block_size
        self.open = contextlib.ExitStack()
        kinds = ("tokens", "docs", "mask") if masked else ("tokens", "docs")
        self.files = {s: [self.open.enter_context((directory / f"{s}.{kind}").open("wb")) for kind in kinds]
                      for s in SPLITS}
        self.counts = {f"{s}_{k}": 0 for s in SPLITS for k in ("tokens", "documents", "rows", "targets")}

    def add(self, split: str, tokens: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None = None) -> None:
        tokens_file, docs_file, *mask_file = self.files[split]
        tokens_file.write(memoryview(np.ascontiguousarray(tokens)).cast("B"))
        docs_file.write(memoryview(np.ascontiguousarray(lengths, dtype=np.int64)).cast("B"))
        if mask_file:
            mask_file[0].write(memoryview(np.ascontiguousarray(mask, dtype=np.uint8)).cast("B"))
        self.counts[f"{split}_targets"] += int(mask.sum(dtype=np.int64)) if mask is not None else len(tokens)
        self.counts[f"{split}_tokens"] += int(lengths.sum())
        self.counts[f"{split}_documents"] += len(lengths)
        self.counts[f"{split}_rows"] += int((-(-lengths // self.block_size)).sum())  # rows without packing

    def close(self) -> dict:
        self.open.close()
        (self.directory / "stats.json").write_text(json.dumps(self.counts))
        return self.counts

    def abandon(self) -> None:
        self.open.close()
