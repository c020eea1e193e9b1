"""Training runs as a user starts them, for the tests of preemption, architectures and the GPU: the environment of a
24-step run, a run signalled at a step, what it published."""

from __future__ import annotations

import json
import re
import signal
import socket
import time
from pathlib import Path

from entrypoint.errors import ExitCode
from tests.support.helpers import FAST_TRAIN, Job, finetune, train_env

STEPS = 24
RUN = {**FAST_TRAIN, "FINETUNE_MAX_STEPS": str(STEPS), "FINETUNE_SAVE_STEPS": "8", "FINETUNE_EVAL_STEPS": "8",
       "FINETUNE_LOGGING_STEPS": "1"}


def env_for(model: Path, data: Path, out: Path, **extra: str) -> dict[str, str]:
    return train_env(model, data, out, base=RUN, FINETUNE_CACHE_DIR=str(out.parent / "cache"), **extra)


def interrupt_at(env, step: int, sig=signal.SIGTERM, then_kill_after: float | None = None) -> tuple[int, str]:
    job = Job(env)
    job.wait_for(rf"train step {step}/")
    job.proc.send_signal(sig)
    if then_kill_after is not None:
        time.sleep(then_kill_after)
        job.proc.kill()
    return job.finish()


def final_metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def assert_preempted_and_unpublished(code: int, log: str, out: Path) -> None:
    assert code == ExitCode.PREEMPTED, log[-3000:]
    assert not (out / "model").exists()
    status = json.loads((out / "status.json").read_text())
    assert (status["state"], status["exit_code"]) == ("preempted", ExitCode.PREEMPTED)


def stopped_then_resumed(env, step: int, out: Path) -> str:
    """SIGTERM once step `step` is logged: exit 7 with nothing published; then the rerun resumes from the checkpoint
    the stop saved and succeeds. Returns the rerun's log."""
    code, log = interrupt_at(env, step)
    assert_preempted_and_unpublished(code, log, out)
    stopped = re.search(r"stopping at step (\d+)", log).group(1)
    result = finetune("train", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resume: from {out / 'checkpoints' / f'checkpoint-{stopped}'}" in result.stderr
    return result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
