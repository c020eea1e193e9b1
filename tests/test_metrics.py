"""The measurements metrics.json is made of: step times, the compile time and MFU from the measured step."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from entrypoint import metrics, mfu

H100 = "NVIDIA H100 80GB HBM3"


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
    got = timer.mfu(flops, H100, "bf16", False, tokens, world_size=2)
    assert got == pytest.approx(flops * 32 * 1024 / 0.06 / 989.4e12)
    assert 0.4 < got < 0.55  # GPT-2 124M at ~550k tokens/s on one H100 is nanoGPT-class, under half its peak
    assert timer.mfu(flops, "cpu", "fp32", False, tokens, world_size=1) is None  # CPU: no peak
