"""Preemption with real processes and real signals: stop, resume exactly, never publish half a model.

PREEMPT_SEED picks the random interruption steps (default 0) and PREEMPT_COUNT how many (default 1; the fault
table's "SIGTERM at a random step" and the three-interruption test below add four more), so a loop over seeds
explores many of them. A SIGTERM
during the last step, a SIGKILL during a checkpoint save and a disk that fills while saving are cases of the fault
table (bench/fault_cases.py, run by tests/e2e/test_faults.py), with the same checks.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from entrypoint.errors import ExitCode
from entrypoint.train import checkpoints
from tests.support.helpers import finetune
from tests.support.runs import STEPS, assert_preempted_and_unpublished, env_for, final_metrics, interrupt_at

IS_ROOT = os.geteuid() == 0


def assert_same_result(out: Path, reference: dict) -> None:
    metrics = final_metrics(out)
    assert metrics["global_step"] == reference["global_step"] == STEPS
    assert metrics["eval_loss"] == pytest.approx(reference["eval_loss"], abs=1e-4)


@pytest.fixture(scope="module")
def reference_out(tmp_path_factory, tiny_model, corpus_dir) -> Path:
    """The output directory of the uninterrupted run every resumed run must match."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = finetune("train", env=env_for(tiny_model, corpus_dir, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def reference(reference_out) -> dict:
    return final_metrics(reference_out)


def random_steps(count: int) -> list[int]:
    rng = random.Random(int(os.environ.get("PREEMPT_SEED", "0")))
    # Not an evaluation step (every 8th) or the one before: a signal landing in an evaluation ends it without a
    # checkpoint at that step, which bench/fault_cases.py's "SIGTERM during an evaluation" case covers.
    return sorted(rng.sample([s for s in range(2, STEPS - 1) if s % 8 not in (0, 7)], count))


@pytest.mark.slow
@pytest.mark.parametrize("step", random_steps(int(os.environ.get("PREEMPT_COUNT", "1"))))
def test_sigterm_then_rerun_resumes_exactly(tmp_path, tiny_model, corpus_dir, reference, step):
    out = tmp_path / "out"
    env = env_for(tiny_model, corpus_dir, out)
    code, log = interrupt_at(env, step)
    assert_preempted_and_unpublished(code, log, out)
    assert "SIGTERM received" in log and re.search(r"checkpoint: saved checkpoint-\d+ in [\d.]+ s", log)
    stopped = int(re.search(r"stopping at step (\d+)", log).group(1))
    assert checkpoints.problem(out / "checkpoints" / f"checkpoint-{stopped}") is None

    result = finetune("train", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resume: from {out / 'checkpoints' / f'checkpoint-{stopped}'}" in result.stderr
    assert_same_result(out, reference)


def history(out: Path) -> dict[tuple[str, int], float]:
    """history.json's curve points: (kind, step) -> loss."""
    points = json.loads((out / "history.json").read_text())
    return {(kind, h["step"]): h[kind] for h in points for kind in ("loss", "eval_loss") if kind in h}


@pytest.mark.slow
def test_three_interruptions_leave_the_metrics_and_curve_of_an_uninterrupted_run(tmp_path, tiny_model, corpus_dir,
                                                                                  reference_out, reference):
    out = tmp_path / "out"
    env = env_for(tiny_model, corpus_dir, out)
    for step in (4, 11, 18):
        code, log = interrupt_at(env, step)
        assert_preempted_and_unpublished(code, log, out)
    result = finetune("train", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = final_metrics(out)
    assert metrics["global_step"] == STEPS
    for key in ("train_tokens", "padding_fraction", "initial_eval_loss"):
        assert metrics[key] == reference[key], key
    for key in ("best_eval_loss", "eval_loss", "train_loss"):
        assert metrics[key] == pytest.approx(reference[key], abs=1e-4), key
    resumed, expected = history(out), history(reference_out)
    assert resumed.keys() == expected.keys()
    assert {("eval_loss", 0), ("loss", 1), ("loss", STEPS)} <= expected.keys()
    for point, loss in expected.items():
        assert resumed[point] == pytest.approx(loss, abs=1e-4), point
    assert f"{STEPS} steps in" in result.stderr.splitlines()[-1]


@pytest.mark.slow
def test_sigkill_right_after_sigterm_falls_back_to_the_last_complete_checkpoint(tmp_path, tiny_model, corpus_dir,
                                                                               reference):
    out = tmp_path / "out"
    env = env_for(tiny_model, corpus_dir, out)
    code, _ = interrupt_at(env, 13, then_kill_after=0.005)
    assert code == -signal.SIGKILL
    assert not (out / "model").exists()
    result = finetune("train", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = re.search(r"resume: from .*checkpoint-(\d+)", result.stderr)
    assert resumed and int(resumed.group(1)) in (8, 13, 14), result.stderr[-2000:]
    assert_same_result(out, reference)


@pytest.fixture(scope="module")
def preempted_run(tmp_path_factory, tiny_model, corpus_dir) -> Path:
    """A run stopped after step 13: complete checkpoints 8 and the one saved at the stop."""
    root = tmp_path_factory.mktemp("preempted")
    code, log = interrupt_at(env_for(tiny_model, corpus_dir, root / "out"), 13)
    assert code == ExitCode.PREEMPTED, log[-2000:]
    return root


def truncate_weights(checkpoint: Path) -> str:
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return "model.safetensors is truncated or corrupt"


def remove_trainer_state(checkpoint: Path) -> str:
    (checkpoint / "trainer_state.json").unlink()
    return "trainer_state.json is missing or unreadable"


def garbage_optimizer(checkpoint: Path) -> str:
    (checkpoint / "optimizer.pt").write_bytes(os.urandom(4096))
    return "optimizer.pt is truncated or corrupt"


@pytest.mark.slow
@pytest.mark.parametrize("damage", [truncate_weights, remove_trainer_state, garbage_optimizer])
def test_a_damaged_newest_checkpoint_is_skipped_and_named(tmp_path, preempted_run, tiny_model, corpus_dir,
                                                          reference, damage):
    shutil.copytree(preempted_run, tmp_path, dirs_exist_ok=True)
    out = tmp_path / "out"
    newest = max((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert newest.name != "checkpoint-8"
    reason = damage(newest)
    result = finetune("train", env=env_for(tiny_model, corpus_dir, out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipping {newest.name}: {reason}" in result.stderr
    assert f"resume: from {out / 'checkpoints' / 'checkpoint-8'}" in result.stderr
    assert_same_result(out, reference)


@pytest.mark.slow
def test_no_resume_starts_fresh_despite_checkpoints(tmp_path, preempted_run, tiny_model, corpus_dir, reference):
    shutil.copytree(preempted_run, tmp_path, dirs_exist_ok=True)
    out = tmp_path / "out"
    result = finetune("train", "--no-resume", env=env_for(tiny_model, corpus_dir, out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resume: disabled by --no-resume; starting fresh" in result.stderr
    assert "eval  step 0:" in result.stderr
    assert_same_result(out, reference)


@pytest.fixture
def small_tmpfs(tmp_path):
    """Mount a tmpfs of a given size (root only); unmounted afterwards."""
    mounted: list[Path] = []

    def mount(path: Path, size_bytes: int, read_only: bool = False) -> Path:
        if not IS_ROOT or shutil.which("mount") is None:
            pytest.skip("mounting a small tmpfs needs root")
        path.mkdir(parents=True, exist_ok=True)
        options = f"size={size_bytes}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.slow
def test_read_only_output_fails_before_training(tmp_path, tiny_model, corpus_dir, small_tmpfs):
    out = tmp_path / "out"
    if IS_ROOT:
        small_tmpfs(out, 1 << 20, read_only=True)
    else:
        out.mkdir()
        out.chmod(0o555)
    result = finetune("train", env=env_for(tiny_model, corpus_dir, out))
    assert result.returncode == ExitCode.OUTPUT, result.stderr[-3000:]
    assert "not writable" in result.stderr
    assert "train step" not in result.stderr
