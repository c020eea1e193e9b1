"""SIGTERM/SIGINT: finish the optimizer step, save a complete checkpoint, exit PREEMPTED (never publish, never 0).

Kubernetes sends SIGTERM, waits terminationGracePeriodSeconds, then SIGKILLs. The grace period must cover one
optimizer step, an evaluation when one falls due at that step, and a checkpoint save (logged at every save).
A second signal while stopping changes nothing: the save in progress finishes, and if SIGKILL cuts it short the
checkpoint has no completion marker and the next run resumes from the one before.
"""

from __future__ import annotations

import logging
import signal

import torch
from transformers import TrainerCallback

from .errors import Preempted

log = logging.getLogger(__name__)


class StopRequest:
    """Records the first SIGTERM/SIGINT instead of dying, so training can stop at a step boundary."""

    def __init__(self):
        self.signal_name: str | None = None

    def install(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name:
            log.warning("preemption: %s received while already stopping; the checkpoint save continues", name)
            return
        self.signal_name = name
        log.warning("preemption: %s received; finishing the current optimizer step, then saving a checkpoint", name)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def raise_if_requested(self, where: str) -> None:
        if self.requested:
            raise Preempted(f"stopped by {self.signal_name} {where}; nothing needed saving; rerun the same command.")


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

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed(args, state):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
            log.warning("preemption: stopping at step %d and saving a checkpoint", state.global_step)
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
