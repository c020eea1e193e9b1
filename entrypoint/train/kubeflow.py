"""The run's progress in a Kubeflow TrainJob's status (`kubectl get trainjob NAME -o
jsonpath='{.status.trainerStatus}'`), told truthfully: progress over the whole run, not this process's share of it;
data preparation as its own phase; a run that ends early never at 100%, with where and why in a metric.

transformers adds its own KubeflowCallback whenever the controller's variable is set; the job removes it
(job.build_trainer), so this is the one reporter. Rank 0 reports; every other process gets one that posts
nothing (`Reporter.off`).

Metrics (names at most 64 characters, values strings): `phase` (preparing data, loading model, training,
publishing, succeeded, preempted, diverged, failed), `step` (N/TOTAL), `epoch`, `train_loss`, `learning_rate`,
`eval_loss`, `perplexity`, `useful_tokens_per_second` (this process's session, times the world size),
`target_tokens` (the whole run's tokens that carried loss; several processes: rank 0's count times the world size),
`mfu` (on a known GPU), `divergence_guard` (ok, or how many bad logging windows in a row), `data_prepare_seconds`,
and, for a run that ended early, `stopped` (the exit code's name and number, the step, the reason).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

from transformers import TrainerCallback

from entrypoint.errors import ExitCode, FinetuneError
from entrypoint.publish.outputs import termination_message
from entrypoint.runtime.kubeflow import MIN_INTERVAL_S, Endpoint, Poster
from entrypoint.train.guard import BAD_WINDOWS
from entrypoint.train.metrics import perplexity

MAX_STOPPED = 512  # characters of the `stopped` metric: the termination message's start, enough to say why
ENDED = {ExitCode.PREEMPTED: "preempted", ExitCode.DIVERGED: "diverged"}


class Reporter(TrainerCallback):
    """The job's progress, posted through `poster` (None: report nothing). The job calls `phase` around its steps
    and `succeeded` or `ended_early` last; as a Trainer callback (added by `watch`) it follows the steps."""

    def __init__(self, poster: Poster | None):
        self.poster = poster
        self.metrics: dict[str, object] = {}
        self.percent: int | None = None  # unknown until training starts: a resumed run's checkpoint says where
        self.remaining: float | None = None
        self.sources: tuple | None = None  # (ProgressLog, StepTimer, DivergenceGuard, plan, FLOPs per token)
        self.first_step = 0
        self.started = 0.0
        self.saved: int | None = None  # the step of the last complete checkpoint: where a rerun resumes
        self.max_steps = 0
        self.counted_at = -MIN_INTERVAL_S  # when our numbers were last read (each read waits for the device)

    @classmethod
    def of(cls, environ: Mapping[str, str] | None, rank: int) -> Reporter:
        endpoint = Endpoint.of(environ or {}) if rank == 0 else None
        return cls(Poster(endpoint) if endpoint else None)

    @classmethod
    def off(cls) -> Reporter:
        """A reporter that posts nothing (every rank but 0, or no endpoint)."""
        return cls(None)

    @property
    def active(self) -> bool:
        return self.poster is not None

    def phase(self, name: str, **metrics: object) -> None:
        self.metrics.update(phase=name, **metrics)
        self._post()

    def watch(self, progress, timer, guard, plan, flops_per_token: float) -> Reporter:
        """Read the run's numbers from the job's own callbacks: ProgressLog (tokens, training time), StepTimer
        (MFU), DivergenceGuard (its state). Returns self, to be added to the Trainer."""
        self.sources = (progress, timer, guard, plan, flops_per_token)
        return self

    def on_train_begin(self, args, state, control, **kwargs):
        # Trainer has restored a checkpoint's state by now: a resumed run starts where its checkpoint stands.
        self.first_step, self.started = state.global_step, time.monotonic()
        self.saved, self.max_steps = state.global_step, max(1, state.max_steps)
        self._step(state)
        self.phase("training")

    def on_save(self, args, state, control, **kwargs):
        self.saved = state.global_step  # Trainer calls this once the checkpoint (and its COMPLETE marker) is written

    def on_step_end(self, args, state, control, **kwargs):
        self._step(state)
        self._post()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.metrics.update(train_loss=_num(logs["loss"]), learning_rate=_num(logs.get("learning_rate")))
        if "eval_loss" in logs:
            self.metrics.update(eval_loss=_num(logs["eval_loss"]), perplexity=_num(perplexity(logs["eval_loss"])))
        if time.monotonic() - self.counted_at >= MIN_INTERVAL_S:  # no fresher than a post can carry them
            self.counted_at = time.monotonic()
            self._numbers(state, args.world_size)
        self._post()

    def succeeded(self) -> None:
        self.percent, self.remaining = 100, 0
        self.phase("succeeded")

    def ended_early(self, exc: BaseException) -> None:
        """A run that stops before publishing: the percentage falls back to what is kept, the last complete
        checkpoint's share of the run (where a rerun resumes; never 100), and `stopped` names the exit code, the
        step, that checkpoint and the reason."""
        # Only our errors carry an exit code (an HTTPError's `code` is an HTTP status); a KeyboardInterrupt is a stop.
        code = exc.code if isinstance(exc, FinetuneError) else \
            ExitCode.INTERNAL if isinstance(exc, Exception) else ExitCode.PREEMPTED
        where = f"while {self.metrics.get('phase')}"
        if "step" in self.metrics:
            where = f"at step {self.metrics['step']}, last checkpoint at step {self.saved}"
            self.percent = min(99, math.floor(100 * (self.saved or 0) / self.max_steps))
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        self.remaining = None
        stopped = termination_message(code, f"{where}: {reason}")[:MAX_STOPPED]
        self.phase(ENDED.get(code, "failed"), stopped=stopped)

    def close(self) -> None:
        if self.poster:
            self.poster.close()

    def _step(self, state) -> None:
        total = max(1, state.max_steps)
        # 100 only once the model is published: the last step still has its evaluation and the publish to go.
        self.percent = min(99, math.floor(100 * state.global_step / total))
        done = state.global_step - self.first_step
        if done > 0:  # this process's own rate: time spent on the steps it took
            self.remaining = (time.monotonic() - self.started) / done * (total - state.global_step)
        self.metrics.update(step=f"{state.global_step}/{state.max_steps}",
                            epoch=f"{state.epoch:.2f}" if state.epoch is not None else "0")

    def _numbers(self, state, world_size: int) -> None:
        """Our own numbers, read at logging steps only (each read of a device counter waits for the device)."""
        if self.sources is None:
            return
        progress, timer, guard, plan, flops_per_token = self.sources
        counter, seconds = progress.counter, progress.training_seconds()
        session_tokens = counter.tokens() * world_size
        if seconds > 0:
            self.metrics["useful_tokens_per_second"] = f"{session_tokens / seconds:.1f}"
        targets = int(counter.targets.item()) if counter.targets is not None else 0
        self.metrics["target_tokens"] = str(counter.before.get("target_tokens", 0) + targets * world_size)
        mfu = timer.mfu(flops_per_token, plan, counter.before["train_tokens"] + session_tokens, state.global_step,
                        world_size)
        if mfu is not None:
            self.metrics["mfu"] = f"{mfu:.4f}"
        self.metrics["divergence_guard"] = guard.problem or \
            ("ok" if not guard.bad else f"{guard.bad} of {BAD_WINDOWS} bad logging windows in a row")

    def _post(self) -> None:
        if self.poster:
            self.poster.update(self.percent, self.remaining, self.metrics)


def _num(value) -> str:
    return "" if value is None else f"{value:.6g}"

