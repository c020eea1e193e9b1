"""The divergence guard's rules, fed what Trainer logs; whole runs that diverge are in tests/e2e/test_faults.py."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from transformers import TrainerControl, TrainerState

from entrypoint.errors import Diverged
from entrypoint.train.guard import BAD_WINDOWS, DivergenceGuard, check_final


def log_windows(guard: DivergenceGuard, windows: list[dict], skipped: bool = False) -> TrainerControl:
    state, control = TrainerState(), TrainerControl()
    optimizer = SimpleNamespace(step_was_skipped=skipped)  # what accelerate's AcceleratedOptimizer reports
    for step, logs in enumerate(windows, start=1):
        state.global_step = step
        control = guard.on_log(None, state, control, logs=logs, optimizer=optimizer)
    return control


def test_consecutive_non_finite_losses_stop_training_without_saving():
    guard = DivergenceGuard()
    control = log_windows(guard, [{"loss": math.nan, "grad_norm": 1.0}] * BAD_WINDOWS)
    assert control.should_training_stop and not control.should_save
    assert "loss nan in 3 logging windows in a row" in guard.problem and "--learning-rate" in guard.problem


def test_a_finite_window_resets_the_count():
    guard = DivergenceGuard()
    bad = {"loss": math.inf}
    control = log_windows(guard, [bad, bad, {"loss": 2.0, "grad_norm": 1.0}, bad, bad])
    assert not control.should_training_stop and guard.problem is None


def test_an_overflowing_gradient_on_a_step_fp16_skipped_is_not_divergence():
    guard = DivergenceGuard()
    control = log_windows(guard, [{"loss": 3.0, "grad_norm": math.inf}] * (BAD_WINDOWS + 2), skipped=True)
    assert not control.should_training_stop and guard.problem is None


def test_a_non_finite_gradient_on_a_step_taken_is_divergence():
    guard = DivergenceGuard()
    control = log_windows(guard, [{"loss": 3.0, "grad_norm": math.nan}] * BAD_WINDOWS)
    assert control.should_training_stop and "gradient norm nan" in guard.problem


def test_evaluation_logs_are_not_training_windows():
    guard = DivergenceGuard()
    control = log_windows(guard, [{"eval_loss": math.nan}] * (BAD_WINDOWS + 1))
    assert not control.should_training_stop


@pytest.mark.parametrize(("final", "initial", "refused"), [
    (3.10, 3.0, False),  # within the 5% tolerance
    (3.20, 3.0, True),
    (math.nan, 3.0, True),
    (math.inf, None, True),
    (9.0, None, False),  # nothing to compare with: only finiteness is checked
])
def test_the_final_evaluation_must_be_finite_and_not_worse_than_step_0(final, initial, refused):
    metrics = {"eval_loss": final, **({"initial_eval_loss": initial} if initial is not None else {})}
    if refused:
        with pytest.raises(Diverged, match="--publish-worse"):
            check_final(metrics, publish_worse=False)
    else:
        check_final(metrics, publish_worse=False)
    check_final(metrics, publish_worse=True)  # never raises


def test_dpo_reward_accuracy_collapsing_from_its_best_stops_training():
    guard = DivergenceGuard()
    rising = [{"loss": 0.6, "rewards/accuracy": a} for a in (0.5, 0.7, 0.9)]
    collapsed = [{"loss": 0.9, "rewards/accuracy": 0.3}] * BAD_WINDOWS
    control = log_windows(guard, rising + collapsed)
    assert control.should_training_stop and "reward accuracy 0.30 (best 0.90)" in guard.problem


def test_dpo_reward_accuracy_wobbling_is_not_divergence():
    guard = DivergenceGuard()
    windows = [{"loss": 0.6, "rewards/accuracy": a} for a in (0.5, 0.75, 0.5, 0.25, 0.62, 0.5, 0.3, 0.9)]
    control = log_windows(guard, windows)
    assert not control.should_training_stop and guard.problem is None
