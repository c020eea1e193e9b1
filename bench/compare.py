"""Side by side on one machine, one model and one text file: the tutorial recipe (bench/tutorial.py) against
`finetune train` with its defaults and the tutorial's hyperparameters (batch 4 x accumulation 8, learning
rate 2e-5, 512-token blocks, the same epochs or optimizer steps).

Each run of each side is a fresh process with cold caches; the sides alternate order between repeats. The
table shows medians over --repeats; each ratio (ours / tutorial) is the median of the ratios within a repeat.

    python -m bench.compare   # CPU: tiny model, 2 optimizer steps, 128 validation lines, 3 repeats
    python -m bench.compare   # GPU: GPT-2 124M's shape, the tutorial's 3 epochs, all validation lines
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import assets

REPO = Path(__file__).resolve().parent.parent
SIDES = ("tutorial", "ours")
HYPERPARAMETERS = ["--batch-size", "4", "--grad-accum", "8", "--learning-rate", "2e-5", "--block-size", "512"]
# (metric key, label, format, which way is better: "higher", "lower", or "" for no ratio)
ROWS = [
    ("useful_tokens_per_second", "useful tokens/s (training loop)", "{:,.0f}", "higher"),
    ("padding_fraction", "padding fraction", "{:.1%}", ""),
    ("mfu", "MFU", "{:.1%}", "higher"),
    ("wall_seconds", "wall time, process start to exit (s)", "{:,.1f}", "lower"),
    ("train_runtime", "training loop (s)", "{:,.1f}", "lower"),
    ("data_prepare_seconds", "data preparation (s)", "{:,.2f}", "lower"),
    ("peak_memory_mib", "peak memory (MiB)", "{:,.0f}", "lower"),
    ("eval_loss", "final eval loss", "{:.3f}", ""),
    ("global_step", "optimizer steps", "{:,.0f}", ""),
    ("train_tokens", "useful tokens trained", "{:,.0f}", "higher"),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-file", type=Path, help="Line-by-line text [default: the stdlib docstring corpus].")
    parser.add_argument("--valid-file", type=Path, help="Validation text [default: every 20th line of the train "
                                                        "file, or the corpus's valid.txt].")
    parser.add_argument("--valid-lines", type=int, help="Use only the first N validation lines: the tutorial "
                        "evaluates every line padded to 512, which dominates short CPU runs [default: 128 on CPU, "
                        "all on CUDA].")
    parser.add_argument("--model", type=Path, help="Model directory [default: a random GPT-2 of --size, built "
                                                   "locally]; its context must reach 512.")
    parser.add_argument("--size", choices=("tiny", "small", "gpt2"),
                        help="Shape of the built model [default: gpt2 on CUDA, tiny on CPU].")
    parser.add_argument("--vocab-size", type=int, default=assets.GPT2_VOCAB, help="Tokenizer vocabulary.")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=float, help="Equal epochs on both sides [default on CUDA: 3].")
    budget.add_argument("--max-steps", type=int, help="Equal optimizer steps on both sides [default on CPU: 2].")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per side; the table shows medians.")
    parser.add_argument("--ours-args", default="", help="Extra `finetune train` options, e.g. '--compile on'.")
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench", help="Corpus, models and run outputs.")
    parser.add_argument("--json", type=Path, help="Also write every run, the medians and the ratios here.")
    parser.add_argument("--keep", action="store_true", help="Keep each run's output directory.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    workdir = args.workdir.resolve()
    if args.valid_lines is None and not cuda:
        args.valid_lines = 128
    train_file, valid_file = data_files(args, workdir)
    size = args.size or ("gpt2" if cuda else "tiny")
    model = args.model.resolve() if args.model else assets.model(workdir, size, args.vocab_size)
    if args.epochs is None and args.max_steps is None:
        budget = ["--epochs", "3"] if cuda else ["--max-steps", "2"]
    else:
        budget = ["--epochs", str(args.epochs)] if args.epochs is not None else ["--max-steps", str(args.max_steps)]
    compared_at = f"equal {'epochs' if budget[0] == '--epochs' else 'optimizer steps'} ({budget[1]})"
    print(f"bench: {model.name} on {train_file} ({'CUDA ' + torch.cuda.get_device_name(0) if cuda else 'CPU'}), "
          f"{compared_at}, {args.repeats} repeat(s)", file=sys.stderr)

    runs_dir = workdir / "runs" / time.strftime("%Y%m%d-%H%M%S")
    runs = []
    for repeat in range(args.repeats):
        order = SIDES if repeat % 2 == 0 else SIDES[::-1]
        run = {}
        for side in order:
            out = runs_dir / f"{side}-{repeat}"
            run[side] = run_side(side, model, train_file, valid_file, budget, shlex.split(args.ours_args), out)
            print(f"bench: repeat {repeat + 1}/{args.repeats} {side}: "
                  f"{run[side]['useful_tokens_per_second']:,.0f} useful tokens/s, "
                  f"{run[side]['wall_seconds']:.1f} s wall", file=sys.stderr)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
        runs.append(run)

    report = summarize(runs)
    report["config"] = {"model": str(model), "train_file": str(train_file), "valid_file": str(valid_file),
                        "compared_at": compared_at, "repeats": args.repeats, "ours_args": args.ours_args,
                        "device": runs[0]["ours"].get("device"), "hyperparameters": " ".join(HYPERPARAMETERS)}
    print(table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return report


def data_files(args: argparse.Namespace, workdir: Path) -> tuple[Path, Path]:
    train, valid = _data_files(args, workdir)
    if args.valid_lines:
        lines = valid.read_text().splitlines(keepends=True)[: args.valid_lines]
        valid = workdir / "split" / f"{valid.stem}-{args.valid_lines}-lines.txt"
        valid.parent.mkdir(parents=True, exist_ok=True)
        valid.write_text("".join(lines))
    return train, valid


def _data_files(args: argparse.Namespace, workdir: Path) -> tuple[Path, Path]:
    if args.train_file is None:
        directory = assets.corpus(workdir)
        return directory / "train.txt", (args.valid_file or directory / "valid.txt").resolve()
    if args.valid_file:
        return args.train_file.resolve(), args.valid_file.resolve()
    # Both sides need the same held-out lines: every 20th line, written once beside the other bench files.
    lines = args.train_file.read_text().splitlines(keepends=True)
    directory = workdir / "split" / args.train_file.stem
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train.txt").write_text("".join(line for i, line in enumerate(lines) if i % 20))
    (directory / "valid.txt").write_text("".join(line for i, line in enumerate(lines) if not i % 20))
    return directory / "train.txt", directory / "valid.txt"


def run_side(side: str, model: Path, train_file: Path, valid_file: Path, budget: list[str],
             ours_args: list[str], out: Path, timeout: float | None = None) -> dict:
    """One fresh process; returns its metrics plus the wall time measured from here. A failure or a run past
    `timeout` seconds raises SystemExit with the log's tail."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FINETUNE_", "SM_", "AIP_"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(out / "hf-datasets"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    if side == "tutorial":
        command = ["-m", "bench.tutorial", "--model", str(model), "--train-file", str(train_file),
                   "--valid-file", str(valid_file), "--output-dir", str(out), "--metrics", str(out / "metrics.json"),
                   *budget]
    else:
        command = ["-m", "entrypoint", "train", "--model", str(model), "--data-dir", str(train_file.parent),
                   "--train-file", str(train_file), "--valid-file", str(valid_file), "--output-dir", str(out),
                   *HYPERPARAMETERS, *budget, *ours_args]
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, *command], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"bench: the {side} run passed its {timeout:.0f} s limit") from None
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"bench: the {side} run failed (exit {done.returncode}); its log tail is above.")
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["wall_seconds"] = wall
    metrics["peak_memory_mib"] = metrics["peak_memory_bytes"] / 2**20
    return metrics


def summarize(runs: list[dict]) -> dict:
    medians = {side: {key: _median([r[side].get(key) for r in runs]) for key, *_ in ROWS} for side in SIDES}
    ratios = {}
    for key, _, _, better in ROWS:
        if not better:
            continue
        pairs = [(r["ours"].get(key), r["tutorial"].get(key)) for r in runs]
        ratios[key] = _median([ours / tutorial if ours is not None and tutorial else None for ours, tutorial in pairs])
    return {"runs": runs, "median": medians, "ratio": ratios}


def _median(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def table(report: dict) -> str:
    """Medians per side and the ratio ours / tutorial, one metric a row."""
    medians, ratios = report["median"], report["ratio"]
    lines = [f"{'metric':<40}{'tutorial':>14}{'ours':>14}{'ours/tutorial':>16}"]
    for key, label, fmt, better in ROWS:
        cells = [fmt.format(medians[side][key]) if medians[side][key] is not None else "n/a" for side in SIDES]
        ratio = ratios.get(key)
        ratio_cell = f"{ratio:.2f}x" if ratio is not None else ("n/a" if better else "")
        note = f"  {better} is better" if better else ""
        lines.append(f"{label:<40}{cells[0]:>14}{cells[1]:>14}{ratio_cell:>16}{note}")
    config = report.get("config", {})
    if config:
        lines.append(f"compared at {config['compared_at']}; medians of {config['repeats']} run(s); device "
                     f"{config['device']}; finetune args: {config['hyperparameters']} {config['ours_args']}".rstrip())
    return "\n".join(lines)


if __name__ == "__main__":
    main()
