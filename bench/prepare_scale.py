"""Data preparation at scale: `finetune prepare` on corpora of growing size (the standard-library docstring
corpus repeated to each size) with the GPT-2-sized (50,257-token) byte-level BPE, each in a fresh process.
For each size: tokens/s of the cold build, the cost of a cache hit, and the peak anonymous resident memory of
the whole process tree (the CLI and its tokenizing workers), sampled from /proc every SAMPLE_SECONDS.

Anonymous memory is counted two ways: the sum of each process's RssAnon (pages a forked worker still shares
with its parent count once per process, so this overstates) and the sum of Pss_Anon from smaps_rollup (shared
pages divided among their sharers: the tree's true anonymous footprint). File-backed pages (memory-mapped
Arrow and token files, page cache) are not counted: the kernel can drop them.

    python -m bench.prepare_scale --sizes 256M,1G,4G --workers 2 --json .bench/prepare-scale.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import assets

REPO = Path(__file__).resolve().parent.parent
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
# Reading smaps_rollup walks every mapped page of a process (the memory-mapped Arrow table and token files too),
# so the sampler's own CPU time grows with the corpus: at 0.2 s it took a fifth of a core from the 2 it measures
# and lowered the 4 GB figure more than the 256 MB one. Once a second, at the lowest priority, it costs little
# (memory is flat through a build, so a finer grid finds no higher peak).
SAMPLE_SECONDS = 1.0


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256M,1G,4G", help="Corpus sizes, comma-separated (K, M, G suffixes).")
    parser.add_argument("--workers", type=int, default=2, help="--preprocessing-workers.")
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--model", type=Path, help="Model directory whose tokenizer to use [default: a random GPT-2 "
                        "with the 50,257-token BPE, built once under --workdir].")
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench")
    parser.add_argument("--keep-corpora", action="store_true", help="Keep the corpora for a rerun.")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    model = args.model or assets.model(workdir, "tiny", assets.GPT2_VOCAB)  # only its tokenizer and config are used
    results = []
    print(f"{'text':>8} {'tokens':>14} {'seconds':>9} {'tokens/s':>12} {'tok/CPU-s':>10} {'cores':>5} {'hit s':>7} "
          f"{'hit %':>6} {'Pss_Anon peak':>14} {'RssAnon sum peak':>17}  load", flush=True)
    for size in [parse_size(s) for s in args.sizes.split(",")]:
        data_dir = corpus(workdir, size)
        cache = workdir / "prepare-scale-cache"
        shutil.rmtree(cache, ignore_errors=True)
        command = [sys.executable, "-m", "entrypoint", "prepare", "--model", str(model), "--data-dir", str(data_dir),
                   "--output-dir", str(workdir / "prepare-scale-out"), "--cache-dir", str(cache), "--block-size",
                   str(args.block_size), "--preprocessing-workers", str(args.workers), "--log-format", "text"]
        load = os.getloadavg()[0]
        cold = run_sampled(command)
        hit = run_sampled(command)
        stats = json.loads(next(cache.glob("blocks-*/stats.json")).read_text())
        tokens = stats["train_tokens"] + stats["dropped_tokens"] + stats["valid_tokens"]
        hit_seconds = float(re.search(r"cache hit \S+ .* in ([0-9.]+) s", hit["log"]).group(1))
        row = {"text_bytes": size, "tokens": tokens, "prepare_seconds": stats["prepare_seconds"],
               "tokens_per_second": tokens / stats["prepare_seconds"], "wall_seconds": cold["seconds"],
               "cache_hit_seconds": hit_seconds, "cache_hit_ratio": hit_seconds / stats["prepare_seconds"],
               "peak_pss_anon_bytes": cold["pss_anon"], "peak_rss_anon_sum_bytes": cold["rss_anon"],
               "cpu_seconds": cold["cpu_seconds"], "tokens_per_cpu_second": tokens / cold["cpu_seconds"],
               "cores_used": cold["cpu_seconds"] / cold["seconds"], "peak_processes": cold["processes"],
               "workers": args.workers, "load_average_1m": load, "peak_parent_pss_anon_bytes": cold["parent_pss_anon"],
               "peak_worker_pss_anon_bytes": cold["worker_pss_anon"]}
        results.append(row)
        print(f"{size / 2**20:>6.0f}MB {tokens:>14,} {row['prepare_seconds']:>9.1f} {row['tokens_per_second']:>12,.0f} "
              f"{row['tokens_per_cpu_second']:>10,.0f} {row['cores_used']:>5.2f} "
              f"{hit_seconds:>7.2f} {100 * row['cache_hit_ratio']:>5.1f}% {cold['pss_anon'] / 2**30:>10.2f} GiB "
              f"{cold['rss_anon'] / 2**30:>13.2f} GiB  {load:.1f}", flush=True)
        shutil.rmtree(cache, ignore_errors=True)
        if not args.keep_corpora:
            shutil.rmtree(data_dir, ignore_errors=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return results


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B")
    return int(float(text[:-1]) * UNITS[text[-1]]) if text[-1] in UNITS else int(text)


def corpus(workdir: Path, size: int) -> Path:
    """The docstring corpus's train.txt repeated to about `size` bytes; valid.txt as it is."""
    source = assets.corpus(workdir)
    directory = workdir / f"prepare-scale-{size}"
    if (directory / "valid.txt").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    text = (source / "train.txt").read_bytes()
    with (directory / "train.txt").open("wb") as out:
        for _ in range(max(1, round(size / len(text)))):
            out.write(text)
    shutil.copy(source / "valid.txt", directory / "valid.txt")
    return directory


def run_sampled(command: list[str]) -> dict:
    """Run `command`, sampling its process tree's anonymous memory; its exit must be 0."""
    start, cpu = time.perf_counter(), children_cpu_seconds()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"})
    peak = {"pss_anon": 0, "rss_anon": 0, "processes": 0, "parent_pss_anon": 0, "worker_pss_anon": 0}
    done = threading.Event()

    def sample():
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only
        while not done.wait(SAMPLE_SECONDS):
            tree = process_tree(proc.pid)
            each, rss = [], 0
            for p in tree:  # RssAnon read beside each process's Pss_Anon: the walk of smaps_rollup takes long
                before = read_kib(f"/proc/{p}/status", "RssAnon")  # enough on a busy machine for memory to move
                each.append(read_kib(f"/proc/{p}/smaps_rollup", "Pss_Anon") * 1024)
                rss += max(before, read_kib(f"/proc/{p}/status", "RssAnon")) * 1024
            peak.update(pss_anon=max(peak["pss_anon"], sum(each)), rss_anon=max(peak["rss_anon"], rss),
                        processes=max(peak["processes"], len(tree)), parent_pss_anon=max(peak["parent_pss_anon"],
                                                                                        each[0]),
                        worker_pss_anon=max([peak["worker_pss_anon"], *each[1:]]))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    log = proc.communicate()[0]
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {proc.returncode}:\n{log[-3000:]}")
    return {**peak, "seconds": time.perf_counter() - start, "cpu_seconds": children_cpu_seconds() - cpu, "log": log}


def children_cpu_seconds() -> float:
    """User + system time of finished child processes and theirs (the CLI reaps its workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):  # children of every thread, not only the main one
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return found


def read_kib(path: str, field: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    main()
