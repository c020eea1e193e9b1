"""`make gpu-check`: its plan fits the window, a stage past its budget is killed with every process it started
while the other stages still report, and the dry mode runs the whole check (tests and benchmark) on the CPU on
tiny shapes, so the script a GPU window depends on cannot rot."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from bench import gpu_check, stages
from bench.stages import Stage
from tests.support.helpers import REPO, clean_env

SCRIPT = REPO / "scripts" / "gpu-check.sh"
# A stage that hangs the way a stuck finetune/torchrun does: a child in its process group and another in a session
# of its own (torchrun starts its workers so), all sleeping; it writes the three pids to argv[1] first.
HANG = textwrap.dedent("""
    import os, subprocess, sys, time
    sleep = [sys.executable, "-c", "import time; time.sleep(300)"]
    same = subprocess.Popen(sleep)
    own = subprocess.Popen(sleep, start_new_session=True)
    with open(sys.argv[1], "w") as out:
        out.write(f"{os.getpid()} {same.pid} {own.pid}")
    time.sleep(300)
""")
# A benchmark row that finishes: writes the metrics a gpu_row would, to argv[1].
ROW = textwrap.dedent("""
    import json, sys
    json.dump({"useful_tokens_per_second": float(sys.argv[2]), "step_seconds": 0.1, "step_seconds_p90": 0.11,
               "wall_seconds": 1.0, "peak_memory_mib": 10.0}, open(sys.argv[1], "w"))
""")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def started_pids(path: Path, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and len(path.read_text().split()) == 3:
            return [int(p) for p in path.read_text().split()]
        time.sleep(0.1)
    raise AssertionError(f"the hanging stage never wrote {path}")


@pytest.mark.parametrize("carried", [True, False])
def test_the_plan_sums_to_at_most_seven_minutes_and_is_printed_whole(carried):
    plan = gpu_check.plan(carried)
    assert sum(s.budget for s in plan) <= stages.WINDOW_SECONDS == 420
    assert [s.name for s in plan] == ["environment", "assets", "tutorial", "ours", "compile-warmup", "compiled",
                                      "tests"]
    printed = stages.plan_table(plan)
    total = int(printed.splitlines()[0].split("plan: ")[1].split(" s")[0])
    assert total == sum(s.budget for s in plan) <= 420
    assert all(f"{s.name}" in printed and f"{s.budget:.0f} s" in printed for s in plan)


def test_a_stage_past_its_budget_is_killed_with_its_whole_process_tree(tmp_path):
    pids = tmp_path / "pids"
    stage = Stage("hang", 3, "hangs", [sys.executable, "-c", HANG, str(pids)])
    began = time.monotonic()
    outcome = stages.run(stage, tmp_path / "stages.log", tmp_path)
    assert outcome.timed_out and outcome.exit_code is None
    assert time.monotonic() - began < 3 + 4 * stages.DUMP_SECONDS + 10
    started = started_pids(pids)
    assert all(gone(pid) for pid in started), [psutil.Process(p).cmdline() for p in started if not gone(p)]
    # The stacks were dumped before the kill (or the log says why not), and the log says what happened.
    assert "Thread " in outcome.stacks or "py-spy is not on PATH" in outcome.stacks
    assert "killed after its 3 s budget" in (tmp_path / "stages.log").read_text()


def test_a_stage_that_ends_leaves_no_process_of_its_group_behind(tmp_path):
    pids = tmp_path / "pids"
    leaves = textwrap.dedent("""
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        open(sys.argv[1], "w").write(f"0 0 {child.pid}")
    """)
    outcome = stages.run(Stage("leaves", 30, "exits at once", [sys.executable, "-c", leaves, str(pids)]),
                         tmp_path / "stages.log", tmp_path)
    assert outcome.exit_code == 0
    child = started_pids(pids)[2]
    deadline = time.monotonic() + 10
    while not gone(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(child)


def test_a_killed_stage_leaves_the_other_rows_in_the_table(tmp_path, monkeypatch):
    """The check goes on after a stage it killed: the rows before and after it are in gpu-check.md."""
    runs = tmp_path / "work" / "runs"
    pids = tmp_path / "pids"

    def fake_commands(steps, args, dry, workdir):
        runs.mkdir(parents=True, exist_ok=True)
        return [Stage("tutorial", 30, "row", [sys.executable, "-c", ROW, str(runs / "tutorial.json"), "100"]),
                Stage("ours", 30, "row", [sys.executable, "-c", ROW, str(runs / "ours.json"), "2400"]),
                Stage("compile-warmup", 2, "hangs", [sys.executable, "-c", HANG, str(pids)]),
                Stage("compiled", 30, "row", [sys.executable, "-c", ROW, str(runs / "compiled.json"), "3600"])]

    monkeypatch.setattr(gpu_check, "commands", fake_commands)
    monkeypatch.setattr(gpu_check, "DRY_FACTOR", 1)
    out = tmp_path / "report"
    code = gpu_check.main(["--dry", "--out", str(out), "--workdir", str(tmp_path / "work"),
                           "--assets", str(tmp_path / "none")])
    assert code == 1  # a stage was killed: not passed
    assert all(gone(pid) for pid in started_pids(pids))
    report = json.loads((out / "gpu-check.json").read_text())
    by_name = {s["name"]: s for s in report["stages"]}
    assert by_name["compile-warmup"]["exit"] == 124 and by_name["compiled"]["exit"] == 0
    rows = {r["name"]: r for r in report["bench"]["runs"]}
    assert rows["compiled"]["ok"] and rows["compiled"]["vs_tutorial"] == pytest.approx(36)
    assert not rows["compile-warmup"]["ok"] and rows["compile-warmup"]["error"] == "killed at its budget"
    table = (out / "gpu-check.md").read_text()
    assert "| compile-warmup | 120 | " in table and "**killed at its budget**" in table
    assert "| compiled | 3,600 | 36.0x |" in table and "| ours | 2,400 | 24.0x |" in table
    assert "| tests | 125 | | not run |" in table or "| tests | 85 | | not run |" in table


@pytest.mark.slow
def test_gpu_check_dry_mode_runs_every_stage_on_the_cpu_and_says_so(tmp_path):
    out = tmp_path / "report"
    env = clean_env(PYTHON=sys.executable, GPU_CHECK_DIR=str(out), GPU_CHECK_DRY="1",
                    GPU_ASSETS=str(tmp_path / "no-assets"))
    stage = Stage("dry gpu-check", 900, "the whole check", ["bash", str(SCRIPT), "--workdir", str(tmp_path / "work")],
                  env)
    done = stages.run(stage, tmp_path / "log", REPO)  # killed with its tree after a py-spy dump, if it hangs
    log = (tmp_path / "log").read_text()
    assert done.exit_code == 0, log[-4000:] + done.stacks
    lines = log.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("gpu-check: DRY MODE"))
    assert "NVIDIA driver" in lines[first] and "CUDA" in lines[first]
    assert lines[first + 1].startswith("gpu-check: plan: 420 s at most")  # the GPU's plan, before any stage
    assert lines[first + 9].startswith("gpu-check: dry mode runs these stages on the CPU")
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["mode"] == "dry" and report["ok"] is True
    assert [s["name"] for s in report["stages"]] == [s.name for s in gpu_check.plan(carried=False)]
    environment = report["environment"]
    assert {"driver", "cuda", "gpu", "driver_needed"} <= set(environment)  # printed and kept, None on this machine

    tests = report["tests"]
    assert tests["exit_code"] == 0 and tests["failed"] == 0 and tests["passed"] >= 5
    skipped = [c for c in tests["cases"] if c["outcome"] == "skipped"]
    assert skipped and all("only meaningful on a CUDA GPU" in c["message"] for c in skipped)
    assert (out / "gpu-tests.xml").is_file()

    runs = report["bench"]["runs"]
    assert [r["name"] for r in runs] == ["tutorial", "ours", "compile-warmup", "compiled"]
    assert all(r["ok"] for r in runs)
    ours = runs[1]
    assert ours["useful_tokens_per_second"] > 0 and ours["vs_tutorial"] > 0 and ours["step_seconds"] > 0
    assert ours["mfu"] is None and ours["mfu_bench"] is None  # a CPU has no peak: no MFU, never a made-up one
    table = (out / "gpu-check.md").read_text()
    assert table.startswith("# GPU check (DRY MODE") and "| ours | " in table and "| compiled | " in table


def test_gpu_check_without_datasets_or_wheels_names_the_fix(tmp_path):
    python = shutil.which("python3", path="/usr/bin")
    if not python or subprocess.run([python, "-c", "import datasets"], capture_output=True).returncode == 0:
        pytest.skip("needs a Python without the datasets package at /usr/bin/python3")
    env = clean_env(PYTHON=python, GPU_CHECK_DIR=str(tmp_path / "report"), GPU_WHEELS=str(tmp_path / "none"))
    done = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "make gpu-wheels" in done.stderr and "Traceback" not in done.stderr
