"""The GPU check's report: gpu-check.json as measured, and gpu-check.md, the table that goes into the performance
doc (bench/gpu_check.py runs the stages)."""

from __future__ import annotations

import json
import time
from pathlib import Path

SEQUENCES_PER_STEP = 32  # the tutorial's 4 x 8, kept by ours as micro-batch x accumulation


def write(out: Path, report: dict, start: float) -> None:
    report["seconds"] = time.monotonic() - start
    (out / "gpu-check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu-check.md").write_text(markdown(report) + "\n")


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
    tests = report.get("tests")
    if tests:
        lines += ["", f"## Tests: exit {tests['exit_code']}, {tests['passed']} passed, {tests['failed']} failed, "
                      f"{tests['skipped']} skipped, {tests['seconds']:.0f} s", "",
                  "| test | outcome | seconds | note |", "| --- | --- | --- | --- |"]
        lines += [f"| {c['name']} | {c['outcome']} | {c['seconds']:.1f} | {c['message'].replace('|', '/')} |"
                  for c in tests["cases"]]
    bench = report.get("bench")
    if bench:
        plan = bench["plan"]
        lines += ["", f"## Benchmark: {plan['steps']} optimizer steps a run, {SEQUENCES_PER_STEP} sequences a step "
                      f"(ours at block {plan['block']}, the tutorial at 512)", "",
                  "| run | useful tokens/s | x tutorial | MFU (job) | MFU (bench) | peak MiB | step ms (median) | "
                  "p90/median | compile s | wall s | eval loss |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in bench["runs"]:
            if not r["ok"]:
                lines.append(f"| {r['name']} | failed: {r.get('error', '')[:120]} |" + " |" * 9)
                continue
            lines.append(
                f"| {r['name']} | {_cell(r['useful_tokens_per_second'], '{:,.0f}')} | "
                f"{_cell(r.get('vs_tutorial'), '{:.1f}x')} | {_cell(r['mfu'], '{:.1%}')} | "
                f"{_cell(r['mfu_bench'], '{:.1%}')} | {_cell(r['peak_memory_mib'], '{:,.0f}')} | "
                f"{_cell(r['step_seconds'] and r['step_seconds'] * 1000, '{:.1f}')} | "
                f"{_cell(r.get('step_spread'), '{:.2f}')} | {_cell(r['compile_seconds'], '{:.0f}')} | "
                f"{_cell(r['wall_seconds'], '{:.0f}')} | {_cell(r['eval_loss'], '{:.3f}')} |")
        if report["skipped_for_time"]:
            lines.append(f"\nSkipped for time: {', '.join(report['skipped_for_time'])}.")
    return "\n".join(lines)
