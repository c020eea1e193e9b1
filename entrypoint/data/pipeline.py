"""Files -> documents -> tokens -> training rows, streamed into a token cache on disk (see shards.py).

Plain text takes a fast batched path; instruction and chat records (formats.py) a per-record one that also writes
each token's loss mask. Every document gets BOS first where the tokenizer adds one, and EOS last.

Packing (the default) concatenates every document, each followed by EOS, and cuts the stream into
`block_size` blocks: no padding, and only the final remainder (< one block) is dropped. Without packing each
document (split into block-sized pieces when longer) is its own row, training batches group rows of similar
length (job.py), and the collator (collate.py) pads per batch, masking pad positions out of the labels by the
attention mask, never by token id, so real EOS tokens stay targets even when pad == eos.

The cache key (cache.py) covers the inputs' bytes, the tokenizer, every option that changes the result,
and FORMAT_VERSION: bump it whenever pipeline.py or shards.py changes what they write.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from entrypoint import fsutil, logs
from entrypoint.data import formats, mixture, shards
from entrypoint.data.cache import FORMAT_VERSION, cache_key, pre_key, wait_for_builder
from entrypoint.data.mixture import discover
from entrypoint.data.options import DataOptions
from entrypoint.data.sources import Source, read_documents, record_format
from entrypoint.data.textfiles import TextFiles, text_files
from entrypoint.data.tokendataset import Layout, PairDataset, TokenDataset
from entrypoint.errors import DataError, OutputError
from entrypoint.fsutil import COMPLETE
from entrypoint.logs import WorkProgress
from entrypoint.runtime.cpus import tokenizing_workers

log = logs.area("data")
PROGRESS_SECONDS = 10.0  # between progress lines while tokenizing


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
    data_format: str = "text"  # text, instruction or chat (FORMAT_NAMES)
    train_target_tokens: int = 0  # tokens of the training split that carry loss
    isolated: bool = False  # packed rows restart position ids at every document (set when loaded)
    source_tokens: dict = field(default_factory=dict)  # --dataset label -> its tokens in the training split
    cut_pairs: int = 0  # preference pairs with an answer cut to --block-size (both splits)


# formats.py's names -> the names users see in logs, metrics and the model card
FORMAT_NAMES = {formats.TEXT: "text", formats.INSTRUCTION: "instruction", formats.CHAT: "chat",
                formats.PRETOKENIZED: "pretokenized", formats.PREFERENCE: "preference"}


def laid_out(opts: DataOptions, fmt: str) -> DataOptions:
    """`opts` as the cache of `fmt` records is laid out: preference pairs are never packed (each answer is a row of
    its own, chosen then rejected, which the DPO loss compares)."""
    return replace(opts, packing=False) if fmt == formats.PREFERENCE else opts


def prepare(opts: DataOptions, tokenizer, block_size: int, builds: bool = True, stop=None):
    """Return (train, validation, stats), building and caching them unless an identical build exists.

    A process with `builds=False` waits for another to finish the cache instead, and never reads the inputs
    (no collective is open yet, so a long tokenization cannot hit a NCCL timeout). `stop` (a StopRequest) is
    checked between pieces of work: a signal ends the build within seconds, leaving no partial cache."""
    start = time.perf_counter()
    opts = with_vocabulary(opts, tokenizer)
    if not builds:
        target = wait_for_builder(opts.data_cache_dir, pre_key(opts, tokenizer, *discover(opts), block_size), stop)
        log.info(f"cache hit {target.name}, built by another process")
        return load(opts, target, start, hit=True)
    stats = prepare_shard(opts, tokenizer, block_size, stop=stop)
    return load(opts, opts.data_cache_dir / f"blocks-{stats.fingerprint}", start, hit=stats.cache_hit)


def with_vocabulary(opts: DataOptions, tokenizer) -> DataOptions:
    """`opts` with the vocabulary pretokenized ids are checked against: the model's, else the tokenizer's length."""
    return opts if opts.vocab_size else replace(opts, vocab_size=len(tokenizer))


def token_dtype(opts: DataOptions, tokenizer, fmt: str):
    """The cache's token dtype: wide enough for the tokenizer's ids, or for the model's vocabulary (which every
    pretokenized id was checked to be below) for pretokenized rows."""
    return shards.token_dtype(opts.vocab_size if fmt == formats.PRETOKENIZED else len(tokenizer))


@dataclass(frozen=True)
class Build:
    """One process's share of a cache build: what it reads, how it tokenizes, and where it writes."""

    opts: DataOptions
    tokenizer: object
    block_size: int
    train_src: Source
    valid_src: Source  # empty: hold documents of the training input out
    key: str  # the content key (cache.cache_key)
    shard: int  # this process's share of the documents, of `num_shards` equal runs
    num_shards: int
    stop: object  # a StopRequest, checked between pieces of work, or None
    workers: int  # tokenizing processes

    @property
    def target(self) -> Path:
        """The cache folder the shards go to."""
        return self.opts.data_cache_dir / f"blocks-{self.key}"

    @property
    def name(self) -> str:
        return shard_name(self.shard, self.num_shards)


def prepare_shard(opts: DataOptions, tokenizer, block_size: int, shard: int = 0, num_shards: int = 1,
                  stop=None) -> DataStats | None:
    """Tokenize shard `shard` of `num_shards` (equal runs of documents) into the cache with --preprocessing-workers
    processes (or one per CPU). Returns the cache's statistics once every shard is present (this call completing
    it, or an earlier one), else None."""
    start = time.perf_counter()
    opts = with_vocabulary(opts, tokenizer)
    train_src, valid_src = discover(opts)
    pre = pre_key(opts, tokenizer, train_src, valid_src, block_size)
    key = cache_key(opts, tokenizer, train_src, valid_src, block_size)
    build = Build(opts, tokenizer, block_size, train_src, valid_src, key, shard, num_shards, stop,
                  tokenizing_workers(opts.preprocessing_workers))
    target = build.target
    if not (target / COMPLETE).is_file():
        log.info(f"cache miss; reading {train_src.describe()}"
                 f"{f' (shard {shard} of {num_shards})' if num_shards > 1 else ''}")
        build_shard(build)
        if not finalize(build, time.perf_counter() - start):
            log.info(f"shard {shard} of {num_shards} written to {target}; the cache is complete once every shard is")
            return None
        stats = DataStats(**json.loads((target / "stats.json").read_text()))
    else:
        stats = DataStats(**json.loads((target / "stats.json").read_text()))
        stats.cache_hit = True
    try:
        fsutil.write_atomic(opts.data_cache_dir / f"ready-{pre}", key)
    except OSError as exc:
        error = fsutil.storage_error(exc, opts.data_cache_dir, f"ready-{pre}", after=f"{target.name} is complete")
        if error is None:
            raise
        raise error from None
    stats.prepare_seconds = time.perf_counter() - start
    if stats.source_tokens:
        log.info(mixture.summary(stats.source_tokens))
    if stats.cache_hit:
        log.info(f"cache hit {target.name} ({stats.train_rows} train {'blocks' if opts.packing else 'rows'}, "
                 f"{stats.valid_rows} validation rows) in {stats.prepare_seconds:.2f} s")
    return stats


def build_shard(build: Build) -> None:
    """Read, split, tokenize and write this shard, then move it into the cache under its final name."""
    target, name, stop = build.target, build.name, build.stop
    # datasets' own Arrow files go to a scratch folder private to this process: builders on several nodes
    # sharing one cache volume must not delete each other's. The shard is staged privately too (publish_dir).
    scratch = build.opts.data_cache_dir / f".scratch-{fsutil.writer_tag()}"
    built = False
    try:
        if stop is not None:  # reading the inputs below takes a while on large corpora
            stop.raise_if_requested("while preparing data; nothing was written")
        jobs, fmt = _read_jobs(build, scratch)
        ranges = mixture.shares(jobs, build.shard, build.num_shards) if build.train_src.parts else \
            [shards.share(docs, build.shard, build.num_shards) for docs, *_ in jobs]
        if stop is not None:
            stop.raise_if_requested("while preparing data; nothing was written")
        # An identical shard already there (a retried pod, a racing builder) is kept. Not flushed: see finalize.
        fsutil.publish_dir(target / name, lambda staging: _write_shard(build, jobs, ranges, fmt, staging),
                           if_exists="keep", sync=False)
        built = True
    except OSError as exc:
        raise cache_error(exc, target.parent) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not built:  # nor an empty cache folder; one holding another builder's shards stays
            with contextlib.suppress(OSError):
                target.rmdir()


def cache_error(exc: OSError, cache_dir: Path) -> OutputError:
    """A failed write to the dataset cache as one line: the volume's fault with its free space and fix, or the
    system's words (a file where a folder should be)."""
    kept = "no partial cache is kept (--cache-dir can point to another volume)"
    return fsutil.storage_error(exc, cache_dir, "the dataset cache", after=kept) \
        or OutputError(f"cannot write the dataset cache to {cache_dir} ({exc.strerror or exc}); free space or set "
                       "--cache-dir to a writable place.")


def _read_jobs(build: Build, scratch: Path) -> tuple[list, str]:
    """The documents to tokenize as (documents, split, hold-out, source label) jobs, and their record format
    (formats.py), which the validation data must share."""
    opts, valid_src = build.opts, build.valid_src
    if build.train_src.parts:  # datasets by name, maybe mixed
        return mixture.read_jobs(build.train_src.parts, opts, build.tokenizer, scratch)
    train_docs = _documents(build.train_src, opts, scratch)
    fmt = _format(train_docs)
    jobs = [(train_docs, "train", None if valid_src else (opts.validation_split, opts.seed), "")]
    if valid_src:
        valid_docs = _documents(valid_src, opts, scratch)
        if _format(valid_docs) != fmt:
            raise DataError(f"the training data is {FORMAT_NAMES[fmt]} but the validation data is "
                            f"{FORMAT_NAMES[_format(valid_docs)]}; give both in one format.")
        jobs.append((valid_docs, "valid", None, ""))
    return jobs, fmt


def _documents(source: Source, opts: DataOptions, scratch: Path):
    """`.txt` files split by line or paragraph as TextFiles (read as they are tokenized), anything else through
    `datasets`' loaders (a memory-mapped Arrow copy in `scratch`)."""
    return text_files(source, opts.txt_split) or read_documents(source, opts, scratch)


def _format(docs) -> str:
    return formats.TEXT if isinstance(docs, TextFiles) else record_format(docs)


def _write_shard(build: Build, jobs: list, ranges: list, fmt: str, staging: Path) -> None:
    """Tokenize each job's documents [lo, hi) into the shard directory `staging`, logging progress as its name."""
    tokenizer, name, stop, workers = build.tokenizer, build.name, build.stop, build.workers
    dtype = token_dtype(build.opts, tokenizer, fmt)
    backend = shards.backend(tokenizer)
    bos = formats.convention(tokenizer).bos_id
    total = sum(shards.text_bytes(docs, lo, hi) for (docs, *_), (lo, hi) in zip(jobs, ranges, strict=True))
    log.info(f"tokenizing {total / 2**20:.1f} MiB of text with {workers} processes into {name}")
    writer = shards.ShardWriter(staging, build.block_size, masked=fmt != formats.TEXT)
    try:
        progress = WorkProgress("data", total, PROGRESS_SECONDS)
        for (docs, split, hold_out, source), (lo, hi) in zip(jobs, ranges, strict=True):
            job = shards.Job(docs, backend, tokenizer.eos_token_id, dtype, split, hold_out, bos, fmt, tokenizer,
                             build.opts.train_on_prompt, build.block_size)
            with contextlib.closing(shards.tokenized(job, lo, hi, workers, stop)) as results:
                for result, nbytes in results:
                    if shards.CUT in result:  # preference pairs: summed over shards by finalize
                        writer.counts["cut_pairs"] = writer.counts.get("cut_pairs", 0) + result.pop(shards.CUT)
                    for part, (tokens, lengths, mask) in result.items():
                        writer.add(part, tokens, lengths, mask)
                        if source and part == "train":  # summed over shards by finalize, as every count is
                            key = f"source {source}"
                            writer.counts[key] = writer.counts.get(key, 0) + int(lengths.sum())
                    progress.update(nbytes, sum(len(piece[0]) for piece in result.values()))
        progress.close()
        (staging / "format").write_text(fmt)
        writer.close()
    except BaseException:
        writer.abandon()  # closes the files; build_shard removes the folder
        raise


def shard_name(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}"


def finalize(build: Build, seconds: float) -> bool:
    """When all shards are present, check the result, write stats.json and manifest.json, then COMPLETE."""
    opts, target, block_size, key = build.opts, build.target, build.block_size, build.key
    if (target / COMPLETE).is_file():
        return True
    names = [shard_name(i, build.num_shards) for i in range(build.num_shards)]
    if not all((target / n / "stats.json").is_file() for n in names):
        return False
    counts = {}
    for n in names:
        for count, value in json.loads((target / n / "stats.json").read_text()).items():
            counts[count] = counts.get(count, 0) + value
    fmt = (target / names[0] / "format").read_text()
    opts = laid_out(opts, fmt)
    stats = summarize(opts, counts, block_size, holds_out=not build.valid_src)
    stats.prepare_seconds, stats.fingerprint = seconds, key
    dtype = token_dtype(opts, build.tokenizer, fmt).name
    stats.data_format, stats.train_target_tokens = FORMAT_NAMES[fmt], counts.get("train_targets", 0)
    stats.cut_pairs = counts.get("cut_pairs", 0)
    if stats.cut_pairs:
        log.warning(f"{stats.cut_pairs} preference pairs had an answer cut to --block-size {block_size} tokens; "
                    "raise --block-size to train on whole answers", cut_pairs=stats.cut_pairs)
    stats.source_tokens = {k.removeprefix("source "): v for k, v in counts.items() if k.startswith("source ")}
    manifest = {"format": FORMAT_VERSION, "key": key, "block_size": block_size, "packing": opts.packing,
                "dtype": dtype, "shards": names, "data_format": fmt, "masked": fmt != formats.TEXT}
    try:
        saved = {k: v for k, v in asdict(stats).items() if k != "isolated"}  # decided when the cache is read
        fsutil.write_atomic(target / "stats.json", json.dumps(saved, indent=1))
        fsutil.write_atomic(target / "manifest.json", json.dumps(manifest, indent=1))
        # Not flushed, as the cache never was: flushing every shard would slow each build by the time the disk needs
        # to take them; a cache a power loss damaged is deleted and built again.
        fsutil.write_marker(target / COMPLETE, sync=False)
    except OSError as exc:
        raise cache_error(exc, target.parent) from None
    log.info(f"{stats.train_documents} documents -> {stats.train_tokens} tokens -> {stats.train_rows} "
             f"{'blocks' if opts.packing else 'rows'} of {block_size} tokens ({stats.dropped_tokens} remainder tokens "
             f"dropped), cached as {target.name}")
    return True


def summarize(opts: DataOptions, counts: dict, block_size: int, holds_out: bool) -> DataStats:
    """The cache's statistics from the shards' counts, or the DataError that makes it unusable."""
    train_docs, valid_docs = counts["train_documents"], counts["valid_documents"]
    if holds_out and (train_docs == 0 or valid_docs == 0):
        raise DataError(f"only {train_docs + valid_docs} document(s), too few to hold out {opts.validation_split:g}% "
                        "for validation; add --valid-file, add text, or split .txt by line (--txt-split line).")
    for docs, which in ((train_docs, "training"), (valid_docs, "validation")):
        if docs == 0:
            raise DataError(f"the {which} input contains no text; check --text-field and the files' contents.")
    stats = {}
    for split in ("train", "valid"):
        tokens = counts[f"{split}_tokens"]
        rows = tokens // block_size if opts.packing else counts[f"{split}_rows"]
        if rows == 0:
            which = "training" if split == "train" else "validation"
            raise DataError(f"the {which} text has fewer than --block-size {block_size} tokens, so no full block "
                            "can be made; add text, lower --block-size, or use --no-packing.")
        stats[split] = (rows, rows * block_size if opts.packing else tokens)
    return DataStats(train_documents=counts["train_documents"], valid_documents=counts["valid_documents"],
                     train_tokens=stats["train"][1], valid_tokens=stats["valid"][1], train_rows=stats["train"][0],
                     valid_rows=stats["valid"][0], dropped_tokens=counts["train_tokens"] - stats["train"][1],
                     prepare_seconds=0.0)


def load(opts: DataOptions, target: Path, start: float, hit: bool):
    """The complete cache at `target` as (train, validation, stats), evaluation capped by --max-eval-tokens."""
    manifest = json.loads((target / "manifest.json").read_text())
    stats = DataStats(**json.loads((target / "stats.json").read_text()))
    stats.cache_hit, stats.prepare_seconds = hit, time.perf_counter() - start
    layout = Layout(tuple(target / name for name in manifest["shards"]), manifest["block_size"], manifest["packing"],
                    manifest["dtype"], manifest["masked"])
    stats.isolated = layout.packing and formats.isolate_by_default(manifest["data_format"], opts.isolate_documents)
    train = TokenDataset(layout, "train", isolate=stats.isolated)
    valid = TokenDataset(layout, "valid", isolate=stats.isolated)
    if manifest["data_format"] == formats.PREFERENCE:
        train, valid = PairDataset(train), PairDataset(valid)
    capped = valid.capped(opts.max_eval_tokens)
    if capped is not valid:
        log.info(f"evaluation scores {len(capped)} of {len(valid)} validation rows ({capped.tokens()} of "
                 f"{valid.tokens()} tokens, evenly spaced; --max-eval-tokens {opts.max_eval_tokens})")
    return train, capped, stats
