"""The divergence guard: a run whose loss blows up is stopped, and a model worse than the one it started from is
not published. Either way the job exits DIVERGED (8), with what happened and what to try.

During training it reads what Trainer logs every --logging-steps: `loss` (the window's mean; Trainer's
nan/inf filter is turned off so a non-finite loss shows) and `grad_norm` (the last step's norm before
clipping). A window is bad when the loss is not finite, or the gradient norm is not finite on a step the
optimizer really took. fp16's loss scaler skips a step whose gradients overflowed and lowers its scale: that
is routine, not divergence (OverflowSteps makes such a step known with the fused optimizer too). BAD_WINDOWS bad
windows in a row stop the run, without saving the state. With DPO a window is also bad when its reward accuracy
(`rewards/accuracy`, the share of pairs whose chosen answer out-rewards the rejected one) has collapsed: fallen by
COLLAPSE or more below the best window so far (e.g. from 0.9 to 0.4): the model then prefers the rejected answers.

At the end, the final evaluation must be finite and within TOLERANCE of the evaluation at step 0.
"""

from __future__ import annotations

import math

from transformers import TrainerCallback

from entrypoint import logs
from entrypoint.errors import Diverged

log = logs.area("guard")
BAD_WINDOWS = 3
COLLAPSE = 0.5  # reward accuracy lost from the run's best window (a share of pairs, 0..1)
# Relative: the final eval loss may exceed the untrained model's by 5% (e.g. 3.00 -> 3.15 nats/token) before the
# model counts as worse. Evaluation is deterministic, so this covers a slightly overfitted model, not noise.
TOLERANCE = 0.05
ADVICE = ("lower --learning-rate (e.g. by 10x), add --warmup-steps, or use --precision bf16 instead of fp16 "
          "where the GPU has it")


class OverflowSteps(TrainerCallback):
    """Tells accelerate, and so Trainer and this guard, which fp16 steps the loss scaler skipped.

    accelerate learns of a skipped step by patching the optimizer's `step` and seeing it not called. A fused
    optimizer (adamw_torch_fused, what GPUs train with) takes the scaler's found-inf flag into its kernel instead:
    its `step` is always called and skips the update itself, so accelerate reports no step as skipped, Trainer
    advances the learning-rate schedule on every overflow and the guard counts the overflow's infinite gradient
    norm as divergence. The scaler halves its scale exactly when it skips a step (and only ever grows it
    otherwise), so a lower scale after the step is a skipped step. Reading the scale waits for the GPU once per
    optimizer step, only when a scaler is on (fp16): the unfused path waits as much for its own check."""

    def __init__(self):
        self.scale: float | None = None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        scaler = _scaler(optimizer)
        if scaler is not None and self.scale is None:
            self.scale = scaler.get_scale()

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        scaler = _scaler(optimizer)
        if scaler is None or self.scale is None:
            return
        scale = scaler.get_scale()
        # accelerate's own flag, which step_was_skipped (and Accelerator.optimizer_step_was_skipped) reads.
        optimizer._is_overflow = scale < self.scale
        self.scale = scale


def _scaler(optimizer):
    scaler = getattr(optimizer, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


class DivergenceGuard(TrainerCallback):
    """Stops training after BAD_WINDOWS logging windows in a row with a non-finite loss or gradient norm;
    `problem` then says what happened."""

    def __init__(self):
        self.bad = 0
        self.problem: str | None = None
        self.best_accuracy = 0.0  # DPO: the best window's reward accuracy

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:  # an evaluation, or the summary Trainer logs at the end
            return control
        loss, norm = logs["loss"], logs.get("grad_norm")
        skipped = bool(getattr(optimizer, "step_was_skipped", False))  # fp16 loss scaler: overflow, step not taken
        if not _finite(loss):
            what = f"loss {loss}"
        elif norm is not None and not _finite(norm) and not skipped:
            what = f"gradient norm {norm}"
        elif self._collapsed(logs.get("rewards/accuracy")):
            what = f"reward accuracy {logs['rewards/accuracy']:.2f} (best {self.best_accuracy:.2f})"
        else:
            self.bad = 0
            return control
        self.bad += 1
        log.warning(f"{what} at step {state.global_step} ({self.bad} of {BAD_WINDOWS} bad logging windows in a row "
                    "stop the run)", step=state.global_step)
        if self.bad >= BAD_WINDOWS:
            self.problem = (f"training diverged: {what} in {self.bad} logging windows in a row, up to step "
                            f"{state.global_step}; the model was not published; {ADVICE}.")
            control.should_training_stop = True
            control.should_save = control.should_evaluate = False  # a checkpoint of non-finite weights is no use
        return control


    def _collapsed(self, accuracy) -> bool:
        if accuracy is None or not _finite(accuracy):
            return False
        self.best_accuracy = max(self.best_accuracy, accuracy)
        return accuracy <= self.best_accuracy - COLLAPSE


def check_final(metrics: dict, publish_worse: bool) -> None:
    """Raise Diverged when the model about to be published is non-finite or worse than the untrained one,
    unless --publish-worse; either way say what was found."""
    final, initial = metrics.get("eval_loss"), metrics.get("initial_eval_loss")
    if final is None:
        return
    if not _finite(final):
        problem = f"the final eval loss is {final}"
    elif initial is not None and _finite(initial) and final > initial * (1 + TOLERANCE):
        problem = (f"the final eval loss {final:.4f} is worse than the untrained model's {initial:.4f} "
                   f"(by more than {TOLERANCE:.0%})")
    else:
        if initial is None:
            log.info("no evaluation at step 0 to compare the final one with; only finiteness was checked")
        return
    if publish_worse:
        log.warning(f"{problem}; publishing anyway because of --publish-worse")
        return
    raise Diverged(f"training diverged: {problem}; the model was not published; {ADVICE}; or pass "
                   "--publish-worse to publish it anyway.")


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
