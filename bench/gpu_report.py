"""The GPU check's report: gpu-check.json as measured, and gpu-check.md, the table that goes into the performance
doc (bench/gpu_check.py runs the stages). Both are rewritten after every stage, so a run cut short leaves the
rows it finished, with the stages still to come listed as not run."""

from __future__ import annotations

import json
import time
from pathlib import Path

SEQUENCES_PER_STEP = 32  # the tutorial's 4 x 8, kept by ours as micro-batch x accumulation


def write(out: Path, report: dict, start: float) -> None:
    report["seconds"] = time.monotonic() - start
    for name, text in (("gpu-check.json", json.dumps(report, indent=1)), ("gpu-check.md", markdown(report) + "\n")):
        staging = out / f".{name}.tmp"
        staging.write_text(text)
        staging.replace(out / name)  # whole or not at all: the run may be killed while writing


def _cell(value, fmt: str) -> str:
    return fmt.format(value) if value is not None else "n/a"


def markdown(report: dict) -> str:
    env = report["environment"]
    mode = "DRY MODE: tiny shapes on the CPU; these are not GPU figures" if report["mode"] == "dry" else "GPU"
    lines = [f"# GPU check ({mode})", "",
             f"GPU {env['gpu'] or 'none'} ({_cell(env['gpu_memory_gib'], '{:.0f}')} GiB), NVIDIA driver "
             f"{env['driver'] or 'none'} (torch's CUDA {env['cuda'] or 'none'} needs {env['driver_needed'] or 'n/a'}), "
             f"torch {env['versions']['torch']}, transformers {env['versions']['transformers']}, datasets "
             f"{env['versions']['datasets']}, python {env['python']}; {report.get('seconds', 0):.0f} s in all, "
             f"{'passed' if report['ok'] else 'not passed'}."]
    if env["differs_from_constraints"]:
        lines.append("Versions other than constraints.txt: " + ", ".join(
            f"{n} {v['installed']} (pinned {v['pinned']})" for n, v in env["differs_from_constraints"].items()) + ".")
    lines += ["", *stage_table(report)]
    bench = report.get("bench")
    if bench and bench["runs"]:
        lines += ["", *bench_table(bench)]
    tests = report.get("tests")
    if tests:
        lines += ["", f"## Tests: exit {tests['exit_code']}, {tests['passed']} passed, {tests['failed']} failed, "
                      f"{tests['skipped']} skipped, {tests['seconds']:.0f} s", "",
                  "| test | outcome | seconds | note |", "| --- | --- | --- | --- |"]
        lines += [f"| {c['name']} | {c['outcome']} | {c['seconds']:.1f} | {c['message'].replace('|', '/')} |"
                  for c in tests["cases"]]
    return "\n".join(lines)


def stage_table(report: dict) -> list[str]:
    """Each planned stage: its budget, the seconds it took and how it ended (or 'not run yet')."""
    done = {s["name"]: s for s in report["stages"]}
    lines = ["## Stages", "", "| stage | budget s | took s | result | what |", "| --- | --- | --- | --- | --- |"]
    for name, budget, what in report["plan"]:
        stage = done.get(name)
        if stage is None:
            lines.append(f"| {name} | {budget:.0f} | | not run | {what} |")
            continue
        result = {0: "ok", 124: "**killed at its budget**"}.get(stage["exit"], f"exit {stage['exit']}")
        lines.append(f"| {name} | {budget:.0f} | {stage['seconds']:.0f} | {result} | {what} |")
    return lines


def bench_table(bench: dict) -> list[str]:
    shape = bench["shape"]
    steps = f"{shape['steps']} optimizer step{'s' * (shape['steps'] != 1)}"
    lines = [f"## Benchmark: {steps} a run ({shape['warmup_steps']} for the compile "
             f"warm-up), {SEQUENCES_PER_STEP} sequences a step, ours at block {shape['block']} and micro-batch "
             f"{shape['micro_batch']}, the tutorial at 512", "",
             "| run | useful tokens/s | x tutorial | MFU (job) | MFU (bench) | peak MiB | step ms (median) | "
             "p90/median | compile s | wall s | eval loss |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in bench["runs"]:
        if not r["ok"]:
            lines.append(f"| {r['name']} | failed after {r['seconds']:.0f} s: {r.get('error', '')[:120]} |"
                         + " |" * 9)
            continue
        lines.append(
            f"| {r['name']} | {_cell(r['useful_tokens_per_second'], '{:,.0f}')} | "
            f"{_cell(r.get('vs_tutorial'), '{:.1f}x')} | {_cell(r['mfu'], '{:.1%}')} | "
            f"{_cell(r['mfu_bench'], '{:.1%}')} | {_cell(r['peak_memory_mib'], '{:,.0f}')} | "
            f"{_cell(r['step_seconds'] and r['step_seconds'] * 1000, '{:.1f}')} | "
            f"{_cell(r.get('step_spread'), '{:.2f}')} | {_cell(r['compile_seconds'], '{:.0f}')} | "
            f"{_cell(r['wall_seconds'], '{:.0f}')} | {_cell(r['eval_loss'], '{:.3f}')} |")
    return lines
