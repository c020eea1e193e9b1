"""Signals outside the training loop, with real signals: work that has nothing to save stops at once and leaves
nothing half-written. Whole runs signalled while loading, evaluating and publishing are in tests/e2e/test_faults.py."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from entrypoint.errors import Preempted
from entrypoint.publish import outputs
from entrypoint.train.preemption import StopRequest


@pytest.fixture
def stop():
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield StopRequest().install()
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def signal_self_after(seconds: float) -> None:
    threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGTERM)).start()


def test_a_signal_interrupts_a_blocked_read_inside_interruptible(tmp_path, stop):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)  # opening it blocks until a writer comes, as a read from a hung network volume would
    signal_self_after(0.5)
    start = time.monotonic()
    with pytest.raises(Preempted, match="stopped by SIGTERM during model loading"), \
            stop.interruptible("during model loading"):
        fifo.read_bytes()
    assert time.monotonic() - start < 30  # the read would block for ever


def test_outside_interruptible_a_signal_is_only_recorded(stop):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)
    assert stop.requested
    with pytest.raises(Preempted, match="before training started"):
        stop.raise_if_requested("before training started")


def test_a_signal_while_publishing_leaves_no_model_and_no_staging_folder(tmp_path, stop):
    def save(directory):
        (directory / "config.json").write_text("{}")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the rest of a long save, cut short by the signal
        (directory / "model.safetensors").write_bytes(b"never written")

    with pytest.raises(Preempted, match="while publishing"):
        outputs.publish_model(tmp_path, save, "card", {}, interruptible=lambda: stop.interruptible("while publishing"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_published_model_survives_a_signal_after_its_rename(tmp_path, stop):
    final = outputs.publish_model(tmp_path, lambda d: (d / "config.json").write_text("{}"), "card", {},
                                  interruptible=lambda: stop.interruptible("while publishing"))
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)
    assert (final / outputs.COMPLETE).is_file() and stop.requested
