"""The lease, with real files and real processes: who may take it, how fast, and what it leaves behind.
Whole `finetune train` runs against a lease are in tests/e2e/test_faults.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from entrypoint.errors import Busy, Preempted
from entrypoint.publish.lease import HEARTBEAT_SECONDS, LEASE, STALE_SECONDS, Lease, held_by_another
from entrypoint.train.preemption import StopRequest


# "At once" against a wait that lasts until the lease is stale (STALE_SECONDS, 30 s): margin for a busy machine.
AT_ONCE_S = 10


def holder_process(directory, seconds: float = 60) -> subprocess.Popen:
    """Another process that holds the lease on `directory` until killed; returns once it holds it."""
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from entrypoint.publish.lease import Lease
        Lease({{"--output-dir": Path({str(directory)!r})}}).acquire()
        print("held", flush=True)
        time.sleep({seconds})
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_on_this_host_is_refused_at_once_and_named(tmp_path):
    holder = holder_process(tmp_path)
    try:
        start = time.monotonic()
        with pytest.raises(Busy) as refused:
            Lease({"--output-dir": tmp_path}).acquire()
        assert time.monotonic() - start < AT_ONCE_S
        message = str(refused.value)
        assert f"--output-dir {tmp_path.resolve()} is in use by the run on host" in message
        assert f"pid {holder.pid}, since 20" in message and "\n" not in message
        assert held_by_another(tmp_path)
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_on_this_host_is_taken_over_at_once(tmp_path):
    holder = holder_process(tmp_path)
    holder.kill()
    holder.wait()
    start = time.monotonic()
    with Lease({"--output-dir": tmp_path}):
        assert json.loads((tmp_path / LEASE).read_text())["pid"] == os.getpid()
        assert not held_by_another(tmp_path)
    assert time.monotonic() - start < AT_ONCE_S
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "release removes the lease and every temporary file"


def foreign_lease(directory, heartbeat_age: float) -> None:
    lease = directory / LEASE
    lease.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "2026-01-01T00:00:00Z",
                                 "token": "theirs"}) + "\n")
    stamp = time.time() - heartbeat_age
    os.utime(lease, (stamp, stamp))


def test_another_hosts_lease_past_the_staleness_bound_is_taken_over_at_once(tmp_path):
    foreign_lease(tmp_path, STALE_SECONDS + 5)
    start = time.monotonic()
    with Lease({"--output-dir": tmp_path}):
        assert json.loads((tmp_path / LEASE).read_text())["token"] != "theirs"
    assert time.monotonic() - start < AT_ONCE_S


def test_another_hosts_stopped_heartbeat_is_waited_for_until_stale(tmp_path):
    foreign_lease(tmp_path, STALE_SECONDS - 3)
    start = time.monotonic()
    with Lease({"--output-dir": tmp_path}):
        waited = time.monotonic() - start
    assert 2 < waited < 3 + AT_ONCE_S


def test_another_hosts_moving_heartbeat_is_refused_within_one_beat(tmp_path):
    foreign_lease(tmp_path, 1)
    lease = tmp_path / LEASE

    def beat():
        time.sleep(1)
        os.utime(lease)

    threading.Thread(target=beat, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(Busy, match="host elsewhere, pid 1"):
        Lease({"--output-dir": tmp_path}).acquire()
    assert time.monotonic() - start < HEARTBEAT_SECONDS


def test_the_holder_keeps_its_heartbeat_and_notices_a_takeover(tmp_path):
    lease = Lease({"--output-dir": tmp_path}).acquire()
    try:
        first = (tmp_path / LEASE).stat().st_mtime_ns
        time.sleep(HEARTBEAT_SECONDS + 1)
        assert (tmp_path / LEASE).stat().st_mtime_ns > first, "no heartbeat"
        foreign_lease(tmp_path, 0)  # as if another run had judged this one stale and taken over
        time.sleep(HEARTBEAT_SECONDS + 1)
        with pytest.raises(Busy, match="was taken over by the run on host elsewhere"):
            lease.check()
    finally:
        lease.release()
    assert json.loads((tmp_path / LEASE).read_text())["token"] == "theirs", "release must not remove theirs"


def test_a_signal_while_waiting_for_a_stale_lease_ends_the_wait(tmp_path):
    foreign_lease(tmp_path, STALE_SECONDS - 20)
    stop = StopRequest()
    stop.signal_name = "SIGTERM"
    with pytest.raises(Preempted, match="while waiting for the lease"):
        Lease({"--output-dir": tmp_path}, stop).acquire()


def test_one_lease_per_directory_even_when_two_labels_name_it(tmp_path):
    with Lease({"--output-dir": tmp_path, "--checkpoint-dir": tmp_path / "."}) as lease:
        assert len(lease.held) == 1
