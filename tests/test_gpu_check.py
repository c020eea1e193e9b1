"""`make gpu-check` in dry mode: the whole GPU check (tests and benchmark) on the CPU on tiny shapes, so the script
a GPU window depends on cannot rot."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO, clean_env

SCRIPT = REPO / "scripts" / "gpu-check.sh"


@pytest.mark.slow
def test_gpu_check_dry_mode_runs_every_stage_on_the_cpu_and_says_so(tmp_path):
    out = tmp_path / "report"
    env = clean_env(PYTHON=sys.executable, GPU_CHECK_DIR=str(out), GPU_CHECK_DRY="1")
    done = subprocess.run(["bash", str(SCRIPT), "--workdir", str(tmp_path / "work")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stderr.splitlines()[0].startswith("gpu-check: DRY MODE")
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["mode"] == "dry" and report["ok"] is True
    environment = report["environment"]
    assert {"driver", "cuda", "gpu", "driver_needed"} <= set(environment)  # printed and kept, None on this machine
    assert "NVIDIA driver" in done.stderr.splitlines()[0] and "CUDA" in done.stderr.splitlines()[0]

    tests = report["tests"]
    assert tests["exit_code"] == 0 and tests["failed"] == 0 and tests["passed"] >= 5
    skipped = [c for c in tests["cases"] if c["outcome"] == "skipped"]
    assert skipped and all("only meaningful on a CUDA GPU" in c["message"] for c in skipped)
    assert (out / "gpu-tests.xml").is_file()

    runs = report["bench"]["runs"]
    assert [r["side"] for r in runs] == ["tutorial", "ours"] and all(r["ok"] for r in runs)
    ours = runs[1]
    assert ours["useful_tokens_per_second"] > 0 and ours["vs_tutorial"] > 0 and ours["step_seconds"] > 0
    assert ours["mfu"] is None and ours["mfu_bench"] is None  # a CPU has no peak: no MFU, never a made-up one
    table = (out / "gpu-check.md").read_text()
    assert table.startswith("# GPU check (DRY MODE") and "| ours, micro-batch 8, compile off |" in table


def test_gpu_check_without_datasets_or_wheels_names_the_fix(tmp_path):
    python = shutil.which("python3", path="/usr/bin")
    if not python or subprocess.run([python, "-c", "import datasets"], capture_output=True).returncode == 0:
        pytest.skip("needs a Python without the datasets package at /usr/bin/python3")
    env = clean_env(PYTHON=python, GPU_CHECK_DIR=str(tmp_path / "report"), GPU_WHEELS=str(tmp_path / "none"))
    done = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "make gpu-wheels" in done.stderr and "Traceback" not in done.stderr
