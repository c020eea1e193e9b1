"""The measurements metrics.json is made of: step times, the compile time and MFU from the measured step."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from entrypoint.train import metrics, mfu

H100 = "NVIDIA H100 80GB HBM3"


def on(device: str, precision: str = "bf16") -> SimpleNamespace:
    """The run plan's fields MFU reads."""
    return SimpleNamespace(device=device, precision=precision, tf32=False)


@pytest.fixture(scope="module")
def gpt2():
    with torch.device("meta"):
        return GPT2LMHeadModel(GPT2Config())


def test_compile_seconds_is_the_first_steps_excess_over_the_typical_step():
    timer = metrics.StepTimer(compiled=True)
    timer.seconds = [31.0, 1.0, 1.2, 0.9]
    assert timer.compile_seconds() == pytest.approx(30.0)
    uncompiled = metrics.StepTimer()
    uncompiled.seconds = [31.0, 1.0, 1.2, 0.9]
    assert uncompiled.compile_seconds() is None


def test_step_timer_measures_the_period_between_step_ends():
    timer = metrics.StepTimer()
    for _ in range(3):
        timer.on_step_begin(None, None, None)
        time.sleep(0.01)
        timer.on_step_end(None, None, None)
    assert len(timer.seconds) == 3 and len(timer.periods) == 2
    assert timer.step_seconds() >= 0.01


def test_mfu_uses_the_typical_step_time_and_the_dense_peak(gpt2):
    timer = metrics.StepTimer()
    timer.seconds = [40.0, 0.06, 0.06, 0.06]  # a compile-long first step and an eval-long period are outliers
    timer.periods = [0.06, 9.0, 0.06]
    tokens = 4 * 32 * 1024 * 2  # 4 steps of 32 x 1024 tokens on each of 2 ranks
    flops = mfu.flops_per_token(gpt2, 1024)
    got = timer.mfu(flops, on(H100), tokens, steps=4, world_size=2)
    assert got == pytest.approx(flops * 32 * 1024 / 0.06 / 989.4e12)
    assert 0.4 < got < 0.55  # GPT-2 124M at ~550k tokens/s on one H100 is nanoGPT-class, under half its peak
    assert timer.mfu(flops, on("cpu", "fp32"), tokens, steps=4, world_size=1) is None  # CPU: no peak


def test_mfu_after_a_resume_equals_the_uninterrupted_runs(gpt2):
    """A run of 100 steps of 16 x 1024 tokens at 0.05 s a step, uninterrupted or resumed at step 60: the resumed
    process times 40 steps, while the token totals (checkpointed counts included) cover all 100."""
    flops, tokens_per_step, steps = mfu.flops_per_token(gpt2, 1024), 16 * 1024, 100

    def timed(n: int) -> metrics.StepTimer:
        timer = metrics.StepTimer()
        timer.seconds, timer.periods = [0.05] * n, [0.05] * (n - 1)
        return timer

    whole = timed(steps).mfu(flops, on(H100), tokens_per_step * steps, steps=steps, world_size=1)
    resumed = timed(40).mfu(flops, on(H100), tokens_per_step * steps, steps=steps, world_size=1)
    assert resumed == pytest.approx(whole, rel=0.10)
    assert whole == pytest.approx(flops * tokens_per_step / 0.05 / 989.4e12)


def test_summarize_divides_the_whole_runs_tokens_by_the_whole_runs_steps(gpt2):
    timer = metrics.StepTimer()
    timer.seconds, timer.periods = [0.05] * 40, [0.05] * 39  # this session: steps 61 to 100
    flops = mfu.flops_per_token(gpt2, 1024)
    plan = SimpleNamespace(device=H100, precision="bf16", tf32=False, block_size=1024)
    stats = SimpleNamespace(data_format="text", isolated=False, prepare_seconds=1.0, cache_hit=True,
                            train_documents=10, dropped_tokens=0)
    totals = {"train_tokens": 100 * 16 * 1024, "train_positions": 100 * 16 * 1024, "train_seconds": 5.0,
              "target_tokens": 100 * 16 * 1024}
    record = metrics.RunRecord(plan=plan, stats=stats, totals=totals, history=[], final={"eval_loss": 3.0},
                               session_loss=3.0, first_step=60, global_step=100, epoch=1.0, eval_seconds=0.0,
                               timer=timer, flops_per_token=flops, parameters=1, world_size=1,
                               train_on_prompt=False)
    assert metrics.summarize(record)["mfu"] == pytest.approx(flops * 16 * 1024 / 0.05 / 989.4e12)


def test_the_summary_line_puts_the_base_models_loss_and_perplexity_beside_the_final_ones():
    run = {"eval_loss": 2.0, "perplexity": metrics.perplexity(2.0), "useful_tokens_per_second": 100.0,
           "padding_fraction": 0.0, "peak_memory_bytes": 2**30, "global_step": 16, "train_runtime": 10.0,
           "data_prepare_seconds": 1.0}
    assert "eval loss 2.0000, perplexity 7.39 on" in metrics.final_line(run, "out/model")
    line = metrics.final_line({**run, "initial_eval_loss": 6.0}, "out/model")
    assert "eval loss 2.0000 (before training 6.0000), perplexity 7.39 (before 403.43) on text data" in line
