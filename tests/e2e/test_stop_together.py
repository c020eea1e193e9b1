"""A multi-process run stops as one, for real (two CPU processes under torchrun): a rank's failure ends the others
with that rank's code, the launcher's death takes its workers with it, and a few of bench/soak.py's stops resume
exactly. `make soak` runs many more, under load."""

from __future__ import annotations

import signal
import subprocess
import time
from types import SimpleNamespace

import psutil
import pytest

from bench.fault_lab import Lab
from bench.soak import Soak, kill_tree, stacks, worker_pids
from entrypoint.errors import ExitCode
from entrypoint.runtime.launch import originating
from tests.support.helpers import Job

BOUND = 60.0  # seconds from a signal or a rank's failure to the launcher's exit (docs/reliability.md)


@pytest.fixture(scope="module")
def soak(tmp_path_factory, tiny_model, corpus_dir) -> Soak:
    return Soak(Lab(tmp_path_factory.mktemp("soak"), tiny_model, corpus_dir), BOUND)


def failure(code: int, stamp: int, when: float | None = None):
    data = {"message": f"failed with {code}", "finetune": {"exit_code": code, "time": when}} if when else {}
    return SimpleNamespace(exitcode=code, timestamp=stamp, error_file_data=data)


def first(*failures) -> tuple[int, str]:
    error = originating(dict(enumerate(failures)))
    return error.code, error.problems[0]


def test_the_launcher_reports_the_rank_that_failed_first():
    # Same whole second for torchrun; the rank stopped by the failure (7, or 1 from a broken collective) is later.
    assert first(failure(7, 100, 100.9), failure(3, 100, 100.2)) == (ExitCode.DATA, "failed with 3")
    assert first(failure(1, 100, 100.4), failure(6, 100, 100.3)) == (ExitCode.OOM, "failed with 6")
    # A worker SIGKILLed (the OOM killer) writes nothing and died before the agent noticed it.
    code, message = first(failure(1, 101, 100.5), failure(-9, 101))
    assert code == ExitCode.OOM and message.startswith("rank 1 was killed (SIGKILL)")
    code, message = first(failure(-11, 101), failure(7, 101, 101.5))
    assert code == ExitCode.INTERNAL and "SIGSEGV" in message


@pytest.mark.slow
def test_killing_the_launcher_kills_its_workers(soak):
    out = soak.fresh("launcher-killed")
    endless = {"FINETUNE_MAX_STEPS": "100000", "FINETUNE_SAVE_STEPS": "1000", "FINETUNE_EVAL_STEPS": "1000"}
    job = Job(soak.env(out, **endless))
    try:
        job.wait_for(r"train step 2/")
        workers = list(worker_pids(job.proc.pid).values())
        job.proc.kill()  # SIGKILL: nothing of the launcher runs
        job.proc.wait()
        deadline = time.monotonic() + 5
        while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in workers):
            if time.monotonic() > deadline:
                pytest.fail(f"workers outlived the launcher:\n{stacks(workers[0])}")
            time.sleep(0.1)
    finally:
        for pid in workers if "workers" in locals() else []:
            kill_tree(pid)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["data", "sigkill"])
def test_one_rank_failing_stops_the_run_with_its_code_and_it_resumes_exactly(soak, fault):
    result = soak.one_rank(fault)
    assert result.ok(BOUND), result


@pytest.mark.slow
def test_sigterm_during_a_save_stops_both_processes_promptly_and_resumes_exactly(soak):
    import random

    result = soak.sigterm("during a checkpoint save", random.Random(0))
    assert result.ok(BOUND), result


@pytest.mark.slow
def test_a_rank_waiting_for_a_peer_that_already_stopped_leaves_within_seconds(soak):
    """Rank 0 never joins the process group and leaves at once on SIGTERM; rank 1 is then blocked in the group's
    start-up in C++, where Python's signal handler cannot run, for up to the collective timeout (240 s). Its
    stop watch reads the signal from the wake-up socket and leaves 10 s later, exit PREEMPTED."""
    out = soak.fresh("peer-gone")
    job = Job(soak.env(out, SOAK_HOLD_RANK="0"))
    try:
        seen = {job.wait_for(r"soak: (holding rank 0|rank 1 joins)")[1] for _ in range(2)}  # in either order
        assert seen == {"holding rank 0", "rank 1 joins"}, seen
        time.sleep(2)  # from Python into the group's start-up, where it blocks, takes milliseconds
        start = time.monotonic()
        job.proc.send_signal(signal.SIGTERM)
        code, log = job.finish(timeout=BOUND)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {BOUND:.0f} s after SIGTERM:\n{stacks(job.proc.pid)}")
    finally:
        kill_tree(job.proc.pid)
    assert code == ExitCode.PREEMPTED, log[-3000:]
    assert time.monotonic() - start < 30, log[-3000:]
    assert "while waiting for the other processes to start training" in log
