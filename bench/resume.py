"""Resume latency: seconds from `finetune train` process start to the first resumed optimizer step, on CPU, for a
GPT-2 124M-shaped model.

A first run trains one step and checkpoints it. Each timed run then restarts the same job with one more step,
as a preempted Job's retry would, and is stopped once the resumed step is logged. Times are taken here, as each
log line arrives: the plan line (imports and preflight), the resume line (data cache hit, model loaded), the
training-start line (checkpoint restored: the resumed step begins) and the first logged step (one step
trained). A fresh start (--no-resume) of the same command is timed alike, so the difference is what resuming
itself costs.

    python -m bench.resume --repeats 3 --json .bench/resume.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import assets

REPO = Path(__file__).resolve().parent.parent
MARKS = {"plan": "plan:", "resume": "resume:", "ready": "train: starting", "first_step": "train step "}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "small", "gpt2"), default="gpt2")
    parser.add_argument("--batch-size", type=int, default=1, help="Sequences in the one timed step.")
    parser.add_argument("--block-size", type=int, default=128, help="Tokens per sequence in the timed step.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args(argv)

    workdir = args.workdir.resolve()
    model = assets.model(workdir, args.size)
    data = assets.corpus(workdir)
    valid = workdir / "split" / "valid-8-lines.txt"  # evaluation is not what this measures; keep it short
    valid.parent.mkdir(parents=True, exist_ok=True)
    valid.write_text("".join((data / "valid.txt").read_text().splitlines(keepends=True)[:8]))
    out = workdir / "resume-run"
    shutil.rmtree(out, ignore_errors=True)
    common = ["--model", str(model), "--data-dir", str(data), "--train-file", "train.txt", "--valid-file",
              str(valid), "--output-dir", str(out), "--batch-size", str(args.batch_size), "--grad-accum", "1",
              "--block-size", str(args.block_size), "--save-steps", "1", "--logging-steps", "1",
              "--log-format", "json"]
    first = run(common + ["--max-steps", "1"], until=None)  # trains, checkpoints step 1, publishes
    print(f"resume: first run {first['exit']:.1f} s (checkpoint-1 written)", file=sys.stderr)

    samples = {"resumed": [], "fresh": []}
    for repeat in range(args.repeats):
        # Fresh runs checkpoint elsewhere: a run stopped mid-save must not touch the checkpoint resumed from.
        for kind, extra in (("resumed", []), ("fresh", ["--no-resume", "--checkpoint-dir", str(out / "fresh")])):
            # Another step than the published run, so it is new work (--overwrite) and step 1 is resumed from.
            marks = run(common + ["--max-steps", "2", "--overwrite", *extra], until="first_step")
            for stale in (out / "checkpoints").glob("checkpoint-*"):
                if stale.name != "checkpoint-1":
                    shutil.rmtree(stale)
            shutil.rmtree(out / "fresh", ignore_errors=True)
            samples[kind].append(marks)
            print(f"resume: repeat {repeat + 1}/{args.repeats} {kind}: first step logged after "
                  f"{marks['first_step']:.1f} s", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    report = {"model": model.name, "parameters_shape": args.size, "step": f"{args.batch_size} x {args.block_size}",
              "repeats": args.repeats, "runs": samples,
              **{f"{kind}_{mark}_seconds": statistics.median(m[mark] for m in marks)
                 for kind, marks in samples.items() for mark in MARKS}}
    report["resume_cost_seconds"] = report["resumed_first_step_seconds"] - report["fresh_first_step_seconds"]
    for key, value in report.items():
        if key.endswith("_seconds"):
            print(f"{key:<34} {value:6.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


def run(arguments: list[str], until: str | None) -> dict:
    """Start `finetune train`; seconds from start to each marked log line; stop at `until` (None: let it end)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FINETUNE_", "SM_", "AIP_"))}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "entrypoint", "train", *arguments], env=env, cwd=REPO,
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    marks: dict[str, float] = {}
    tail: list[str] = []
    for line in process.stderr:
        tail = (tail + [line])[-20:]
        try:
            message = json.loads(line).get("message", "")
        except ValueError:
            continue
        for mark, prefix in MARKS.items():
            if mark not in marks and message.startswith(prefix):
                marks[mark] = time.perf_counter() - start
        if until and until in marks:
            process.kill()  # the bench's own child; what it would do next is not measured
            break
    process.wait()
    marks["exit"] = time.perf_counter() - start
    if until and until not in marks or not until and process.returncode != 0:
        sys.stderr.write("".join(tail))
        raise SystemExit(f"resume bench: finetune train exited {process.returncode} before the mark {until!r}.")
    return marks


if __name__ == "__main__":
    main()
