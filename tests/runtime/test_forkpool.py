"""forkpool.ordered: results in order from forked workers, errors and deaths reported at once, stopping that never
hangs. Real processes, real pipes, real signals."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from entrypoint.errors import OutOfMemory
from entrypoint.runtime import forkpool


def _children() -> set[int]:
    pid = os.getpid()
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


@pytest.fixture(autouse=True)
def no_worker_left():
    """Every test ends with its workers gone (other fixtures' servers may be running beside them)."""
    before = _children()
    yield
    assert _children() <= before


def _square(item: int) -> int:
    return item * item


@pytest.mark.parametrize("workers", [1, 2, 3, 5])
@pytest.mark.parametrize("count", [0, 1, 4, 23])
def test_results_come_in_the_order_of_the_work_from_any_number_of_workers(workers, count):
    assert list(forkpool.ordered(lambda: range(count), _square, workers)) == [i * i for i in range(count)]


def test_each_item_is_computed_once_by_one_worker(tmp_path):
    log = tmp_path / "computed"

    def record(item):
        with log.open("a") as f:
            f.write(f"{item} {os.getpid()}\n")
        return item

    assert list(forkpool.ordered(lambda: range(40), record, 3)) == list(range(40))
    rows = [line.split() for line in log.read_text().splitlines()]
    assert sorted(int(item) for item, _ in rows) == list(range(40))
    assert len({pid for _, pid in rows}) == 3 and str(os.getpid()) not in {pid for _, pid in rows}


def _fail_at_seven(item: int) -> int:
    if item == 7:
        raise ValueError(f"item {item} is bad")
    return item


def test_a_task_error_is_raised_in_the_parent_after_the_results_before_it():
    seen = []
    with pytest.raises(ValueError, match="item 7 is bad") as caught:
        for result in forkpool.ordered(lambda: range(20), _fail_at_seven, 3):
            seen.append(result)
    assert seen == list(range(7))
    assert "_fail_at_seven" in str(caught.value.__cause__)  # the worker's traceback


def _killed_at_five(item: int) -> int:
    if item == 5:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer does
    return item


def test_a_worker_killed_from_outside_is_reported_as_out_of_memory_at_once_instead_of_waiting_forever():
    started = time.monotonic()
    with pytest.raises(OutOfMemory, match=r"killed by SIGKILL.*--preprocessing-workers"):
        list(forkpool.ordered(lambda: range(50), _killed_at_five, 2, what="tokenizing"))
    assert time.monotonic() - started < 10


def _exits_at_three(item: int) -> int:
    if item == 3:
        os._exit(3)  # as a crash in native code leaves a process
    return item


def test_a_worker_that_exits_early_is_reported_with_its_exit_code():
    with pytest.raises(forkpool.WorkerDied, match="exit code 3"):
        list(forkpool.ordered(lambda: range(10), _exits_at_three, 2))


def _big(item: int) -> bytes:
    return bytes(8 << 20)  # far more than a pipe holds: the worker is mid-send when it is stopped


def test_closing_early_kills_workers_blocked_mid_send_without_hanging():
    before = _children()
    results = forkpool.ordered(lambda: range(1000), _big, 2)
    assert len(next(results)) == 8 << 20
    time.sleep(0.5)  # every worker is now blocked sending a result the parent does not read
    assert len(_children() - before) == 2
    started = time.monotonic()
    results.close()
    assert time.monotonic() - started < 20  # a worker blocked in a send would block close() for ever


def test_a_worker_killed_part_way_through_sending_a_result_is_reported_as_out_of_memory():
    before = _children()
    results = forkpool.ordered(lambda: range(1000), _big, 2)
    next(results)  # from worker 0; worker 1 is now blocked part-way through sending item 1
    time.sleep(0.5)
    for pid in _children() - before:
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(OutOfMemory, match="killed by SIGKILL"):
        next(results)


def _slow(item: int) -> int:
    time.sleep(60)
    return item


def test_a_check_that_raises_stops_busy_workers_within_a_second():
    stop_at = time.monotonic() + 1.0

    def check():
        if time.monotonic() > stop_at:
            raise KeyboardInterrupt

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        list(forkpool.ordered(lambda: range(4), _slow, 2, check))
    assert time.monotonic() - started < 20  # the workers sleep 60 s: only a stop ends them sooner


def test_workers_run_at_most_a_few_results_ahead_of_a_slow_consumer(tmp_path):
    log = tmp_path / "computed"

    def record(item):
        with log.open("a") as f:
            f.write(f"{item}\n")
        return bytes(1 << 20)

    results = forkpool.ordered(lambda: range(1000), record, 2)
    next(results)
    time.sleep(2)  # enough to compute hundreds of items, were nothing holding the workers back
    ahead = len(log.read_text().splitlines())
    results.close()
    # per worker: one result being sent, one waiting to be sent, one computed and waiting for room
    assert ahead <= 2 * 3 + 1, ahead
