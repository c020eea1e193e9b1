"""Data preparation throughput: `pipeline.prepare` on a large corpus with a GPT-2-sized (50,257-token) byte-level
BPE, cold and then again on unchanged data (a cache hit).

The corpus is the stdlib docstring corpus repeated to about --tokens tokens (one paragraph a line). Phases are
timed too: reading the text into documents through the `datasets` loader (the path formats other than `.txt`
take; `.txt` is read straight from the file since entrypoint/data/textfiles.py), and tokenizing (`shards.tokenize`,
in memory).

    python -m bench.prepare --tokens 30000000 --json .bench/prepare.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import sys
import time
from pathlib import Path

from entrypoint.runtime.cpus import available_cpus

from . import assets

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> dict:
    args = arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    import datasets

    datasets.disable_progress_bars()

    from entrypoint.config.schema import TrainConfig
    from entrypoint.train.model import load_tokenizer

    workdir = args.workdir.resolve()
    model = assets.model(workdir, "tiny", assets.GPT2_VOCAB)  # only its tokenizer is used
    data_dir = big_corpus(workdir, model, args.tokens)
    cache = workdir / "prepare-cache"
    shutil.rmtree(cache, ignore_errors=True)
    cfg = TrainConfig(model=str(model), data_dir=data_dir, output_dir=workdir / "prepare-out", cache_dir=cache,
                      preprocessing_workers=args.workers, packing=not args.no_packing)
    tokenizer = load_tokenizer(cfg)

    cold = timed_prepare(cfg, tokenizer, args.block_size)
    warm = timed_prepare(cfg, tokenizer, args.block_size)
    phases = timed_phases(cfg, tokenizer, args.block_size)
    shutil.rmtree(cache, ignore_errors=True)
    report = figures(data_dir, args.workers, cold, warm, phases)
    for key, value in report.items():
        print(f"{key:<28} {value:,.3f}" if isinstance(value, float) else f"{key:<28} {value:,}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=30_000_000, help="Approximate corpus size in tokens.")
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=0, help="--preprocessing-workers [default 0: one per core].")
    parser.add_argument("--no-packing", action="store_true", help="Prepare padded rows instead of packed blocks.")
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    return parser.parse_args(argv)


def figures(data_dir: Path, workers: int, cold: dict, warm: dict, phases: dict) -> dict:
    """The report: corpus size, cold and cache-hit timings, and the phases."""
    tokens = cold["train_tokens"] + cold["valid_tokens"]
    return {
        "corpus_bytes": sum(p.stat().st_size for p in data_dir.glob("*.txt")),
        "tokens": tokens,
        "cpu_cores": os.cpu_count(),
        "workers": workers or available_cpus(),
        "cold_seconds": cold["seconds"],
        "cold_tokens_per_second": tokens / cold["seconds"],
        # Other jobs share this machine's cores; per CPU-second the figure does not depend on how busy it is.
        "cold_cpu_seconds": cold["cpu_seconds"],
        "cold_tokens_per_cpu_second": tokens / cold["cpu_seconds"],
        "cache_hit_seconds": warm["seconds"],
        "cache_hit_ratio": warm["seconds"] / cold["seconds"],
        **phases,
        "tokenize_tokens_per_second": cold["train_tokens"] / phases["tokenize_pack_seconds"],
    }


def big_corpus(workdir: Path, model: Path, tokens: int) -> Path:
    """The docstring corpus's train.txt repeated until about `tokens` tokens; valid.txt as it is."""
    from transformers import AutoTokenizer

    source = assets.corpus(workdir)
    directory = workdir / f"prepare-data-{tokens}"
    if (directory / "valid.txt").is_file():
        return directory
    text = (source / "train.txt").read_text()
    tokenizer = AutoTokenizer.from_pretrained(model)
    per_copy = sum(len(ids) + 1 for ids in tokenizer(text.splitlines(), add_special_tokens=False)["input_ids"])
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "train.txt").open("w") as out:
        for _ in range(max(1, round(tokens / per_copy))):
            out.write(text)
    shutil.copy(source / "valid.txt", directory / "valid.txt")
    return directory


def timed_prepare(cfg, tokenizer, block_size: int) -> dict:
    from entrypoint.data import pipeline
    from entrypoint.data.options import DataOptions

    start, cpu = time.perf_counter(), cpu_seconds()
    _, _, stats = pipeline.prepare(DataOptions.of(cfg), tokenizer, block_size)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": cpu_seconds() - cpu,
            "train_tokens": stats.train_tokens + stats.dropped_tokens, "valid_tokens": stats.valid_tokens}


def cpu_seconds() -> float:
    """User + system time of this process and its finished children (the tokenizing workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_phases(cfg, tokenizer, block_size: int) -> dict:
    """Reading and tokenizing the training text separately, outside the cache (a fresh raw cache too)."""
    from entrypoint.data import shards
    from entrypoint.data.options import DataOptions
    from entrypoint.data.sources import discover, read_documents
    from entrypoint.runtime.cpus import available_cpus

    train, _ = discover(DataOptions.of(cfg))
    raw = cfg.data_cache_dir / "phases-raw"
    start = time.perf_counter()
    docs = read_documents(train, DataOptions.of(cfg), raw)
    read = time.perf_counter() - start
    start = time.perf_counter()
    shards.tokenize(docs, tokenizer, cfg.preprocessing_workers or available_cpus())
    return {"read_documents_seconds": read, "tokenize_pack_seconds": time.perf_counter() - start}


if __name__ == "__main__":
    main()
