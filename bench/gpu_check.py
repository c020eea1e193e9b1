"""`make gpu-check`: the GPU path proven in one command, sized for a short GPU window (under 8 minutes on one
H100/H200, compile included). Writes gpu-check.json and gpu-check.md into --out after every stage, so a run cut
short still leaves what it measured.

Stages, in order of value:
1. environment: Python, torch and its CUDA version, the NVIDIA driver, the GPU, the library versions in use;
2. the GPU tests: `pytest -m gpu tests/test_gpu.py` (bf16, fp16 with its loss scaler, fused AdamW, --compile
   on/auto, --batch-size auto's probe, torchrun with NCCL, SIGTERM -> exit 7 -> resume, generate);
3. the benchmark: GPT-2 124M's shape (random weights, 50,257-token vocabulary), the tutorial recipe against
   `finetune train` at equal optimizer steps, ours at block 1,024 in bf16 with compile off/on and micro-batch
   16/32/8 (32 sequences an optimizer step): useful tokens/s, MFU (the job's own, from its step time, and this
   benchmark's, from the training loop's time, through the same mfu.mfu_from), peak memory, step-time
   spread, compile time.
A run that would not finish inside --budget is skipped and listed as such. Without CUDA (or with --dry) every
stage runs on the CPU on tiny shapes and the report says so: `make test` runs that, so this script cannot rot.

    python -m bench.gpu_check --out .gpu-check          # scripts/gpu-check.sh adds the carried wheels first
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from . import assets
from .compare import REPO, run_side
from .gpu_report import SEQUENCES_PER_STEP, markdown, write

PACKAGES = ("torch", "transformers", "datasets", "accelerate", "tokenizers", "pyarrow", "click", "pytest")
# (tokens a block, micro-batches, compile settings, optimizer steps, seconds a run may take at most)
GPU_PLAN = {"block": 1024, "micro_batches": (16, 32, 8), "compile": ("off", "on"), "steps": 50, "run_limit": 150}
DRY_PLAN = {"block": 128, "micro_batches": (8,), "compile": ("off",), "steps": 1, "run_limit": 900}
PER_TEST_SECONDS = 240  # pytest-timeout per GPU test; the compile and torchrun tests take well under a minute there
# A run is started only if this many seconds of the budget are left (compiling GPT-2 takes about a minute).
MIN_SECONDS = {"off": 30, "on": 90}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / ".gpu-check", help="Where gpu-check.json/.md go.")
    parser.add_argument("--workdir", type=Path, help="Corpus, models and runs [default: a temporary folder].")
    parser.add_argument("--dry", action="store_true", help="Tiny shapes on the CPU even where CUDA is present "
                        "[default: dry exactly when there is no CUDA, or GPU_CHECK_DRY=1].")
    parser.add_argument("--budget", type=float, default=450.0, help="Seconds for everything; runs that would "
                        "not fit are skipped and listed.")
    parser.add_argument("--tests-limit", type=float, default=210.0, help="Seconds the GPU tests may take of the "
                        "budget (about 150 on an H100: eight short runs, one compile, the memory probe).")
    parser.add_argument("--skip-tests", action="store_true", help="Only the benchmark.")
    parser.add_argument("--skip-bench", action="store_true", help="Only the tests.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    dry = args.dry or os.environ.get("GPU_CHECK_DRY") == "1" or not torch.cuda.is_available()
    start = time.monotonic()
    if dry:  # a busy CPU's time says nothing about a GPU window: dry mode has no budget, only generous limits
        args.budget, args.tests_limit = 3600.0, 3600.0
    deadline = start + args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"mode": "dry" if dry else "gpu", "ok": False, "budget_seconds": args.budget,
              "environment": environment(), "tests": None, "bench": None, "skipped_for_time": []}
    env = report["environment"]
    say(f"gpu-check: {'DRY MODE: tiny shapes on the CPU, no GPU figure' if dry else 'GPU mode'}; "
        f"GPU {env['gpu'] or 'none'}, NVIDIA driver {env['driver'] or 'none'}, torch {env['versions']['torch']} "
        f"(CUDA {env['cuda'] or 'none'}), python {env['python']}")
    write(args.out, report, start)

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        workdir = (args.workdir or Path(scratch)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        if not args.skip_tests:
            report["tests"] = run_tests(args.out, dry, deadline, workdir, args.tests_limit)
            write(args.out, report, start)
        if not args.skip_bench:
            report["bench"] = {"runs": [], "plan": DRY_PLAN if dry else GPU_PLAN}
            for _ in run_bench(workdir, dry, deadline, report):
                write(args.out, report, start)
    tests_ok = report["tests"] is None or report["tests"]["exit_code"] == 0
    bench_ok = report["bench"] is None or all(r["ok"] for r in report["bench"]["runs"])
    report["ok"] = tests_ok and bench_ok
    write(args.out, report, start)
    say(f"gpu-check: {'passed' if report['ok'] else 'FAILED'} in {time.monotonic() - start:.0f} s; "
        f"{args.out / 'gpu-check.json'} and gpu-check.md")
    print(markdown(report))
    return 0 if report["ok"] else 1


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def environment() -> dict:
    import torch

    from entrypoint import cuda

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    pins = dict(line.strip().split("==", 1) for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    pins = {k.lower().replace("_", "-"): v for k, v in pins.items()}
    return {
        "python": platform.python_version(),
        "executable": sys.executable,
        "cuda": torch.version.cuda,
        "driver": cuda.driver_version(),
        "driver_needed": cuda.required_driver(torch.version.cuda) if torch.version.cuda else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_memory_gib": (torch.cuda.get_device_properties(0).total_memory / 2**30
                           if torch.cuda.is_available() else None),
        "versions": versions,
        "differs_from_constraints": {n: {"installed": v, "pinned": pins[n]} for n, v in versions.items()
                                     if n in pins and v and v.split("+")[0] != pins[n]},
        "carried_wheels": os.environ.get("GPU_CHECK_SITE"),
    }


def run_tests(out: Path, dry: bool, deadline: float, workdir: Path, limit: float) -> dict:
    """pytest -m gpu in a fresh process, for at most `limit` seconds; per-test outcomes from its JUnit XML."""
    junit = out / "gpu-tests.xml"
    env = {**os.environ, **({"GPU_CHECK_DRY": "1"} if dry else {})}
    # -v prints one line per test as it ends, so a run cut short still tells which tests passed; a test that
    # hangs fails alone after --timeout seconds.
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-v", "-p", "no:cacheprovider",
               f"--junitxml={junit}", f"--basetemp={workdir / 'pytest'}"]
    command += [] if dry else [f"--timeout={PER_TEST_SECONDS}"]
    say(f"gpu-check: tests: {' '.join(command[1:])}")
    began = time.monotonic()
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=max(30.0, min(limit, deadline - time.monotonic())))
        code, tail = done.returncode, (done.stdout + done.stderr)[-4000:]
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        code, tail = 124, f"{partial[-3000:]}\npytest passed its time limit ({exc.timeout:.0f} s)"
        junit.unlink(missing_ok=True)
    seconds = time.monotonic() - began
    cases = junit_cases(junit) if junit.is_file() else verbose_cases(tail)
    counts = {o: sum(c["outcome"] == o for c in cases) for o in ("passed", "failed", "skipped")}
    say(f"gpu-check: tests: exit {code} in {seconds:.0f} s: {counts}")
    if code != 0:
        say(tail)
    return {"exit_code": code, "seconds": seconds, **counts, "cases": cases, "log_tail": tail if code else ""}


def verbose_cases(log: str) -> list[dict]:
    """Outcomes from pytest -v lines ('tests/test_gpu.py::name PASSED'), for a run that never wrote its XML."""
    return [{"name": name, "outcome": {"PASSED": "passed", "SKIPPED": "skipped"}.get(word, "failed"),
             "seconds": 0.0, "message": "from the log of a run cut short"}
            for name, word in re.findall(r"::(\w+) (PASSED|FAILED|ERROR|SKIPPED)", log)]


def junit_cases(path: Path) -> list[dict]:
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "skipped" if child.tag == "skipped" else "failed"
                message = (child.get("message") or "")[:300]
        cases.append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time") or 0),
                      "message": message})
    return cases


def bench_assets(workdir: Path, dry: bool) -> tuple[Path, Path, Path]:
    """(model, train file, validation file): GPT-2 124M's shape on a GPU; a tiny GPT-2 with a 512-token BPE on
    the CPU (its context still 512, the tutorial's padding length)."""
    from entrypoint.config import InitModelConfig
    from entrypoint.corpus import build
    from entrypoint.modelinit import init_model

    if not dry:
        data = assets.corpus(workdir)
        return assets.model(workdir, "gpt2"), data / "train.txt", data / "valid.txt"
    data = workdir / "dry-data"
    if not (data / "valid.txt").is_file():
        build(data, max_documents=1500)
    valid = data / "valid-32-lines.txt"
    valid.write_text("".join((data / "valid.txt").read_text().splitlines(keepends=True)[:32]))
    model = workdir / "dry-model"
    if not (model / "config.json").is_file():
        init_model(InitModelConfig(output_dir=model, corpus=data / "train.txt", size="tiny", vocab_size=512,
                                   context=512))
    return model, data / "train.txt", valid


def run_bench(workdir: Path, dry: bool, deadline: float, report: dict):
    """Runs the tutorial, then ours per (micro-batch, compile); yields after each so the report is rewritten."""
    plan = DRY_PLAN if dry else GPU_PLAN
    say("gpu-check: bench: building the corpus and the model")
    model, train_file, valid_file = bench_assets(workdir, dry)
    budget = ["--max-steps", str(plan["steps"])]
    # Compiled runs share one inductor cache, so kernels one micro-batch compiled need not be built again.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(workdir / "inductor-cache"))
    runs = [("tutorial", None, None)] + [("ours", mb, c) for mb in plan["micro_batches"] for c in plan["compile"]]
    tutorial_tps = None
    for side, micro_batch, compiled in runs:
        name = "tutorial recipe" if side == "tutorial" else f"ours, micro-batch {micro_batch}, compile {compiled}"
        left = deadline - time.monotonic()
        if left < MIN_SECONDS[compiled or "off"]:
            report["skipped_for_time"].append(name)
            say(f"gpu-check: bench: skipped {name}: {left:.0f} s of the budget left")
            continue
        ours_args = [] if side == "tutorial" else [
            "--block-size", str(plan["block"]), "--batch-size", str(micro_batch),
            "--grad-accum", str(SEQUENCES_PER_STEP // micro_batch), "--compile", compiled, "--report-to", "none",
            "--precision", "fp32" if dry else "bf16", "--logging-steps", "10"]
        out = workdir / "runs" / name.replace(", ", "-").replace(" ", "-")
        row = {"name": name, "side": side, "micro_batch": micro_batch, "compile": compiled, "ok": False}
        say(f"gpu-check: bench: {name}")
        try:
            metrics = run_side(side, model, train_file, valid_file, budget, ours_args, out,
                               timeout=min(plan["run_limit"], left))
            row.update(ok=True, **summary(metrics))
            tutorial_tps = row["useful_tokens_per_second"] if side == "tutorial" else tutorial_tps
            if tutorial_tps:
                row["vs_tutorial"] = row["useful_tokens_per_second"] / tutorial_tps
        except SystemExit as exc:
            row["error"] = str(exc)
            say(str(exc))
        report["bench"]["runs"].append(row)
        yield row


def summary(metrics: dict) -> dict:
    """What the report keeps of one run's metrics.json, plus this benchmark's own MFU: the useful tokens over the
    training loop's time (evaluations excluded), through the same formula the job uses."""
    from entrypoint import mfu

    keep = ("useful_tokens_per_second", "mfu", "peak_memory_mib", "step_seconds", "step_seconds_p90",
            "compile_seconds", "wall_seconds", "train_runtime", "eval_loss", "global_step", "train_tokens",
            "precision", "device", "block_size", "padding_fraction")
    row = {k: metrics.get(k) for k in keep}
    flops = metrics.get("flops_per_token")
    world = metrics.get("world_size") or 1
    # The tutorial's metrics carry no flops_per_token: its own MFU is already the loop-time figure.
    row["mfu_bench"] = metrics.get("mfu")
    if flops:
        row["mfu_bench"] = mfu.mfu_from(flops, metrics["device"], metrics["precision"],
                                               metrics["useful_tokens_per_second"] / world)
    if row["step_seconds"] and row["step_seconds_p90"]:
        row["step_spread"] = row["step_seconds_p90"] / row["step_seconds"]
    return row


if __name__ == "__main__":
    sys.exit(main())
