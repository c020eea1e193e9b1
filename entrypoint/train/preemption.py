"""SIGTERM/SIGINT: finish the optimizer step, save a complete checkpoint, exit PREEMPTED (never publish, never 0).

Kubernetes sends SIGTERM, waits terminationGracePeriodSeconds, then SIGKILLs. The grace period must cover one
optimizer step, an evaluation when one falls due at that step, and a checkpoint save (logged at every save).
A second signal while stopping changes nothing: the save in progress finishes, and if SIGKILL cuts it short the
checkpoint has no completion marker and the next run resumes from the one before.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable

import torch
from transformers import TrainerCallback

from entrypoint import logs
from entrypoint.errors import Preempted

log = logs.area("preemption")
eval_log = logs.area("eval")


class Interrupted(BaseException):
    """Raised by the signal handler inside `StopRequest.interruptible`. A BaseException, so no library's
    `except Exception` swallows it on its way out; `interruptible` turns it into Preempted."""


class StopRequest:
    """Records the first SIGTERM/SIGINT instead of dying, so training can stop at a step boundary. Where there is
    nothing to save (loading, publishing), `interruptible` makes a signal stop the work at once."""

    def __init__(self, blocked_exit: Callable[[str], None] | None = None):
        self.signal_name: str | None = None
        self._interruptible = False
        self.blocked_exit = blocked_exit
        self._peer_wait = False

    def install(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        if self.blocked_exit is not None:
            self._watch_for_blocked_stops()
        return self

    def begin_peer_wait(self) -> None:
        """From here until training starts (StopOnSignal.on_train_begin), this rank may wait on the other ranks
        inside torch.distributed (process group start-up, barriers) with nothing to save."""
        self._peer_wait = True

    def end_peer_wait(self) -> None:
        self._peer_wait = False

    def _watch_for_blocked_stops(self) -> None:
        """A rank waiting in torch.distributed's C++ for a peer that has already stopped (the process group's
        start-up waits up to the collective timeout, 240 s) never returns to the interpreter, so Python's signal
        handler cannot run there. The kernel's signal still reaches a wake-up socket, written by the C-level
        handler: this thread reads it, and if the rank is still waiting on its peers BLOCKED_STOP_S later, it
        reports the stop and leaves (`blocked_exit`, exit PREEMPTED). Nothing needs saving before training starts.
        Measured: 1 SIGTERM before the first step in 50 (bench/soak.py) waited out the soak's 120 s without it."""
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        self._wakeup = (reader, writer)  # kept open for the life of the process
        threading.Thread(target=self._watch, args=(reader,), name="stop-watch", daemon=True).start()

    def _watch(self, reader: socket.socket) -> None:
        while received := reader.recv(16):
            if not any(n in (signal.SIGTERM, signal.SIGINT) for n in received) or not self._peer_wait:
                continue
            time.sleep(BLOCKED_STOP_S)
            if self._peer_wait:
                name = self.signal_name or signal.Signals(received[-1]).name
                log.warning(f"{name} received {BLOCKED_STOP_S} s ago while waiting for the other processes to "
                            "start training; leaving now (nothing needs saving)")
                self.blocked_exit(f"stopped by {name} before training started; nothing needed saving; rerun the "
                                  "same command.")

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name:
            log.warning(f"{name} received while already stopping; the checkpoint save continues")
            return
        self.signal_name = name
        if self._interruptible:
            log.warning(f"{name} received; stopping now (nothing needs saving)")
            raise Interrupted
        log.warning(f"{name} received; finishing the current optimizer step, then saving a checkpoint")

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def raise_if_requested(self, where: str) -> None:
        if self.requested:
            raise Preempted(f"stopped by {self.signal_name} {where}; nothing needed saving; rerun the same command.")

    @contextlib.contextmanager
    def interruptible(self, where: str):
        """Work that leaves nothing to save when cut short (reading a model, writing a staging folder that the
        caller removes): a signal inside raises Preempted there and then, instead of waiting for it to end."""
        self.raise_if_requested(where)
        try:
            self._interruptible = True
            yield
        except Interrupted:
            raise Preempted(f"stopped by {self.signal_name} {where}; nothing needed saving; "
                            "rerun the same command.") from None
        finally:
            self._interruptible = False


# Seconds a rank signalled before training starts may stay waiting on its peers before it leaves on its own: long
# enough for a rank that is not blocked to reach its next stop check, short against the 60 s stop bound.
BLOCKED_STOP_S = 10


class StopEvaluation(TrainerCallback):
    """A signal that arrives during an evaluation ends it at the next batch, raising Preempted: the run resumes
    from its last complete checkpoint and repeats the evaluation there, so nothing is lost but time. An
    evaluation that was already due when StopOnSignal decided to stop runs to the end, as before, and the
    checkpoint after it is saved. Add it after StopOnSignal, so it sees that decision."""

    def __init__(self, stop: StopRequest):
        self.stop = stop
        self.finishing = False
        self.started: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        self.finishing = self.stop.requested  # StopOnSignal, called just before, has agreed across ranks

    def on_prediction_step(self, args, state, control, **kwargs):
        if self.started != state.global_step:
            self.started = state.global_step
            eval_log.info(f"evaluating at step {state.global_step}", step=state.global_step)
        if self.stop.requested and not self.finishing:
            raise Preempted(f"stopped by {self.stop.signal_name} during the evaluation at step {state.global_step}; "
                            "the last complete checkpoint is kept; rerun the same command to resume.")

    def on_evaluate(self, args, state, control, **kwargs):
        self.started = None


# In a multi-process run the ranks agree on a stop every STOP_CHECK_EVERY optimizer steps (and at the last one):
# the agreement is an all-reduce plus a read back to the host, which would otherwise stall the GPU's queue at every
# step. A signal is then acted on within STOP_CHECK_EVERY steps, the same step on every rank; size the grace
# period for that many steps plus a save. One process needs no agreement and checks at every step.
STOP_CHECK_EVERY = 10


class StopOnSignal(TrainerCallback):
    """At a step end, stop and save if any rank was signalled. In a multi-process run the flag is all-reduced
    (max) on the device, every STOP_CHECK_EVERY steps, so every rank stops at the same step and none waits
    forever in a collective."""

    def __init__(self, stop: StopRequest):
        self.stop = stop
        self.stopped_at: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.stop.end_peer_wait()  # from here a stop is agreed at a step's end (_agreed)

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed(args, state):
            control.should_save = True
            control.should_log = True  # the loss since the last log goes into the checkpoint's history, not lost
            control.should_training_stop = True
            self.stopped_at = state.global_step
            log.warning(f"stopping at step {state.global_step} and saving a checkpoint", step=state.global_step)
        return control

    def _agreed(self, args, state) -> bool:
        if args.world_size <= 1 or not torch.distributed.is_initialized():
            return self.stop.requested
        if state.global_step % STOP_CHECK_EVERY and state.global_step < state.max_steps:
            return False
        flag = torch.tensor(1.0 if self.stop.requested else 0.0, device=args.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        stop = bool(flag.item())
        if stop and not self.stop.requested:
            self.stop.signal_name = "a signal on another rank"
        return stop
