"""`make gpu-check`: the GPU path proven and measured in one command, sized for a short GPU window. It prints a
plan first, each stage with its time budget (the budgets sum to at most 7 minutes, stages.WINDOW_SECONDS), then
runs the stages one after another; a stage past its budget is killed with every process it started (stages.py)
and the next one starts on time. gpu-check.json and gpu-check.md are rewritten into --out after every stage, so a
run cut short still leaves a table of what it measured.

Stages, in order of value:
1. environment: Python, torch and its CUDA version, the NVIDIA driver, the GPU, the library versions in use;
2. assets: GPT-2 124M's shape (random weights, 50,257-token BPE) and the stdlib corpus, from what
   `make gpu-assets` carried (only the weights are drawn there) or built from scratch (a larger budget);
3. the benchmark at block 1,024 in bf16, 32 sequences an optimizer step: the tutorial recipe, then ours at
   micro-batch 16 with compile off; then compile on twice, sharing one inductor cache: a short cold run whose
   wall and compile time are the warm-up, and a full run on the warm cache whose median step is the steady
   step time;
4. the GPU tests: `pytest -m gpu tests/train/test_gpu.py` (bf16, fp16 with its loss scaler, fused AdamW, --compile
   on/auto, --batch-size auto's probe, torchrun with NCCL, SIGTERM -> exit 7 -> resume, generate).
Without CUDA (or with --dry / GPU_CHECK_DRY=1) the same plan is printed and every stage runs on the CPU on tiny
shapes, with each budget stretched (DRY_FACTOR) and compile left off; the report says so.
tests/project/test_gpu_check.py
runs that, so this script cannot rot.

    python -m bench.gpu_check --out .gpu-check          # scripts/gpu-check.sh adds the carried wheels first
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from . import stages
from .compare import REPO
from .gpu_report import SEQUENCES_PER_STEP, markdown, write
from .stages import Stage

PACKAGES = ("torch", "transformers", "datasets", "accelerate", "tokenizers", "pyarrow", "click", "pytest")
# The benchmark's shape: block, micro-batch, optimizer steps of a full run and of the compile warm-up, precision.
GPU_SHAPE = {"block": 1024, "micro_batch": 16, "steps": 50, "warmup_steps": 4, "precision": "bf16"}
DRY_SHAPE = {"block": 128, "micro_batch": 8, "steps": 1, "warmup_steps": 1, "precision": "fp32"}
DRY_FACTOR = 10  # a loaded 2-core CPU starting torch ten times: dry mode's limits are the budgets x this
PER_TEST_SECONDS = 100  # pytest-timeout per GPU test: the one compile is the longest, about 30-60 s expected
XDIST_WORKERS = 3  # tests/train/test_gpu.py's three classes run side by side on a GPU machine (pytest-xdist is there)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / ".gpu-check", help="Where gpu-check.json/.md go.")
    parser.add_argument("--workdir", type=Path, help="Corpus, models and runs [default: a temporary folder].")
    parser.add_argument("--assets", type=Path, default=REPO / ".gpu-assets", help="What make gpu-assets wrote; "
                        "without it the assets stage trains the tokenizer itself (a larger budget).")
    parser.add_argument("--dry", action="store_true", help="Tiny shapes on the CPU even where CUDA is present "
                        "[default: dry exactly when there is no CUDA, or GPU_CHECK_DRY=1].")
    parser.add_argument("--only", nargs="+", metavar="STAGE", help="Run only these stages (the plan still shows "
                        "all of them).")
    return parser.parse_args(argv)


def plan(carried: bool) -> list[Stage]:
    """The stages and their budgets in seconds, as on a GPU (dry mode shows the same): 420 in all whether or not the
    assets were carried (building them takes 40 s more, taken from the tests). commands() adds the commands."""
    steps, warm, mb = GPU_SHAPE["steps"], GPU_SHAPE["warmup_steps"], GPU_SHAPE["micro_batch"]
    return [
        Stage("environment", 5, "GPU, NVIDIA driver, torch's CUDA, library versions"),
        Stage("assets", 20 if carried else 60, "draw GPT-2 124M's random weights on the carried tokenizer and corpus"
              if carried else "train the 50,257-token BPE and build the corpus (nothing carried: make gpu-assets)"),
        Stage("tutorial", 45, f"the tutorial recipe, {steps} steps of 4 x 8 x 512, fp16"),
        Stage("ours", 45, f"finetune train, micro-batch {mb}, block {GPU_SHAPE['block']}, compile off, {steps} steps"),
        Stage("compile-warmup", 120, f"the same, compile on, {warm} steps, cold cache: the warm-up"),
        Stage("compiled", 60, f"the same, compile on, {steps} steps, warm cache: the steady step"),
        Stage("tests", 125 if carried else 85,
              f"pytest -m gpu tests/train/test_gpu.py, {PER_TEST_SECONDS} s a test at most"),
    ]


DRY_NOTE = (f"gpu-check: dry mode runs these stages on the CPU: block {DRY_SHAPE['block']}, micro-batch "
            f"{DRY_SHAPE['micro_batch']}, {DRY_SHAPE['steps']} step a run, fp32, compile off, each stage stopped at "
            f"{DRY_FACTOR}x its budget")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    dry = args.dry or os.environ.get("GPU_CHECK_DRY") == "1" or not torch.cuda.is_available()
    start = time.monotonic()
    carried = (args.assets / "data" / "valid.txt").is_file()
    steps = plan(carried)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"mode": "dry" if dry else "gpu", "ok": False, "plan": [[s.name, s.budget, s.what] for s in steps],
              "environment": environment(), "stages": [], "tests": None,
              "bench": {"runs": [], "shape": DRY_SHAPE if dry else GPU_SHAPE}}
    env = report["environment"]
    say(f"gpu-check: {'DRY MODE: tiny shapes on the CPU, no GPU figure' if dry else 'GPU mode'}; "
        f"GPU {env['gpu'] or 'none'}, NVIDIA driver {env['driver'] or 'none'}, torch {env['versions']['torch']} "
        f"(CUDA {env['cuda'] or 'none'}), python {env['python']}")
    say(stages.plan_table(steps) + (f"\n{DRY_NOTE}" if dry else ""))
    report["stages"].append({"name": "environment", "budget": 5, "seconds": time.monotonic() - start, "exit": 0})
    write(args.out, report, start)

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        workdir = (args.workdir or Path(scratch)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        # The compiled runs share one inductor cache: the warm-up fills it, the steady run reads it.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(workdir / "inductor-cache"))
        for stage in commands(steps[1:], args, dry, workdir):
            if args.only and stage.name not in args.only:
                continue
            say(f"gpu-check: {stage.name}: {stage.budget:.0f} s budget: {' '.join(stage.command[1:])}")
            outcome = stages.run(stage, args.out / "stages.log", REPO, stage.budget * (DRY_FACTOR if dry else 1))
            record(report, stage, outcome, args.out, workdir)
            write(args.out, report, start)
    runs = report["bench"]["runs"]
    report["ok"] = all(s["exit"] == 0 for s in report["stages"]) and all(r["ok"] for r in runs)
    write(args.out, report, start)
    say(f"gpu-check: {'passed' if report['ok'] else 'FAILED'} in {time.monotonic() - start:.0f} s; "
        f"{args.out / 'gpu-check.json'} and gpu-check.md")
    print(markdown(report))
    return 0 if report["ok"] else 1


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def commands(steps: list[Stage], args: argparse.Namespace, dry: bool, workdir: Path) -> list[Stage]:
    """The plan's stages with their commands. Rows read the assets' paths from the assets stage's JSON."""
    python, shape = sys.executable, DRY_SHAPE if dry else GPU_SHAPE
    found = workdir / "assets.json"
    assets = [python, "-m", "bench.assets", "--workdir", str(workdir), "--json", str(found)]
    assets += ["--dry"] if dry else ["--carried", str(args.assets.resolve())]
    ours = ["--block-size", str(shape["block"]), "--batch-size", str(shape["micro_batch"]),
            "--grad-accum", str(SEQUENCES_PER_STEP // shape["micro_batch"]), "--report-to", "none",
            "--precision", shape["precision"], "--logging-steps", "10"]
    compiled = "off" if dry else "on"
    junit = args.out / "gpu-tests.xml"
    tests = [python, "-m", "pytest", "-m", "gpu", "tests/train/test_gpu.py", "-v", "-p", "no:cacheprovider",
             f"--junitxml={junit}", f"--basetemp={workdir / 'pytest'}",
             f"--timeout={PER_TEST_SECONDS * (DRY_FACTOR if dry else 1)}"]
    if not dry and importlib.util.find_spec("xdist"):  # each test is mostly a process starting: 3 at once
        tests += ["-n", str(XDIST_WORKERS), "--dist", "loadscope"]
    by_name = {
        "assets": assets,
        "tutorial": row(workdir, "tutorial", shape["steps"], []),
        "ours": row(workdir, "ours", shape["steps"], [*ours, "--compile", "off"]),
        "compile-warmup": row(workdir, "compile-warmup", shape["warmup_steps"], [*ours, "--compile", compiled]),
        "compiled": row(workdir, "compiled", shape["steps"], [*ours, "--compile", compiled]),
        "tests": tests,
    }
    env = {"GPU_CHECK_DRY": "1"} if dry else {}
    return [Stage(s.name, s.budget, s.what, by_name[s.name], env) for s in steps]


def row(workdir: Path, name: str, steps: int, ours_args: list[str]) -> list[str]:
    """A benchmark row's command: one bench.gpu_row process on the paths the assets stage wrote."""
    side = "tutorial" if name == "tutorial" else "ours"
    runs = workdir / "runs"
    return [sys.executable, "-m", "bench.gpu_row", "--side", side, "--assets", str(workdir / "assets.json"),
            "--steps", str(steps), "--out", str(runs / name), "--json", str(runs / f"{name}.json"), "--", *ours_args]


def record(report: dict, stage: Stage, outcome: stages.Outcome, out: Path, workdir: Path) -> None:
    """Adds a stage's outcome to the report: its time and exit, a benchmark row, or the tests' cases."""
    entry = {"name": stage.name, "budget": stage.budget, "seconds": outcome.seconds,
             "exit": 124 if outcome.timed_out else outcome.exit_code}
    if entry["exit"] != 0:
        entry["log_tail"] = outcome.log_tail[-3000:]
        entry["stacks"] = outcome.stacks[-6000:]
    report["stages"].append(entry)
    verdict = f"killed at its {stage.budget:.0f} s budget" if outcome.timed_out else f"exit {outcome.exit_code}"
    say(f"gpu-check: {stage.name}: {verdict} after {outcome.seconds:.0f} s")
    if entry["exit"] != 0:
        say(outcome.log_tail[-2000:])
    if stage.name == "tests":
        report["tests"] = test_cases(out / "gpu-tests.xml", outcome, entry["exit"])
    elif stage.name != "assets":
        report["bench"]["runs"].append(bench_row(stage.name, workdir / "runs" / f"{stage.name}.json", report, entry))


def bench_row(name: str, metrics_file: Path, report: dict, entry: dict) -> dict:
    row = {"name": name, "side": "tutorial" if name == "tutorial" else "ours", "ok": False,
           "seconds": entry["seconds"], "budget": entry["budget"]}
    if entry["exit"] != 0 or not metrics_file.is_file():
        row["error"] = ("killed at its budget" if entry["exit"] == 124 else
                        (entry.get("log_tail") or "no metrics").strip().splitlines()[-1][:200])
        return row
    row.update(ok=True, **summary(json.loads(metrics_file.read_text())))
    tutorial = next((r for r in report["bench"]["runs"] if r["side"] == "tutorial" and r["ok"]), None)
    if tutorial and row["side"] == "ours" and tutorial["useful_tokens_per_second"]:
        row["vs_tutorial"] = row["useful_tokens_per_second"] / tutorial["useful_tokens_per_second"]
    return row


def test_cases(junit: Path, outcome: stages.Outcome, code: int) -> dict:
    """Per-test outcomes from the JUnit XML, or from pytest -v's lines when a killed run never wrote it."""
    cases = junit_cases(junit) if junit.is_file() and not outcome.timed_out else verbose_cases(outcome.log_tail)
    counts = {o: sum(c["outcome"] == o for c in cases) for o in ("passed", "failed", "skipped")}
    return {"exit_code": code, "seconds": outcome.seconds, **counts, "cases": cases,
            "log_tail": outcome.log_tail[-3000:] if code else ""}


def environment() -> dict:
    import torch

    from entrypoint.runtime import cuda

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


def verbose_cases(log: str) -> list[dict]:
    """Outcomes from pytest -v lines, for a run that never wrote its XML: 'tests/train/test_gpu.py::Class::name PASSED',
    or under xdist '[gw0] [ 12%] PASSED tests/train/test_gpu.py::Class::name'."""
    words = "PASSED|FAILED|ERROR|SKIPPED"
    found = [(name, word) for name, word in re.findall(rf"::(\w+) ({words})\b", log)]
    found += [(name, word) for word, name in re.findall(rf"\b({words}) \S+::(\w+)\s*$", log, re.M)]
    return [{"name": name, "outcome": {"PASSED": "passed", "SKIPPED": "skipped"}.get(word, "failed"),
             "seconds": 0.0, "message": "from the log of a run cut short"} for name, word in found]


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


def summary(metrics: dict) -> dict:
    """What the report keeps of one run's metrics.json, plus this benchmark's own MFU: the useful tokens over the
    training loop's time (evaluations excluded), through the same formula the job uses."""
    from entrypoint.train import mfu

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
