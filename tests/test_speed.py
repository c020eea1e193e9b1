"""Speed choices that need no GPU to check: --batch-size auto's CPU fallback and parsing, --compile auto's
decision, and how the compile time is read from step times."""

from __future__ import annotations

import time
import types

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from entrypoint import efficiency, speed
from entrypoint.checks import Plan
from entrypoint.config import TrainConfig
from entrypoint.errors import ConfigError
from entrypoint.options import check_values, coerce, fields

H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture(scope="module")
def gpt2():
    with torch.device("meta"):
        return GPT2LMHeadModel(GPT2Config())


def plan(device: str = "cpu", precision: str = "fp32") -> Plan:
    return Plan(device=device, precision=precision, block_size=1024, model_config=None)


def test_batch_size_takes_an_integer_or_auto_from_any_source():
    field = fields(TrainConfig)["batch_size"]
    assert coerce(field, "AUTO", "env") == "auto" and coerce(field, 16, "preset") == 16
    with pytest.raises(ConfigError, match="not a valid int"):
        coerce(field, "lots", "preset")
    assert check_values(TrainConfig(batch_size="auto")) == []


def test_batch_size_auto_on_cpu_is_the_default_micro_batch_and_keeps_grad_accum(gpt2):
    assert speed.batch_and_accumulation(TrainConfig(batch_size="auto", grad_accum=4), plan(), gpt2) == (8, 4)
    assert speed.batch_and_accumulation(TrainConfig(batch_size=2, grad_accum=3), plan(), gpt2) == (2, 3)


def test_compile_auto_is_off_on_cpu_and_short_gpu_runs_and_on_for_long_ones(gpt2):
    cfg = TrainConfig(compile="auto", epochs=3)
    assert not speed.should_compile(cfg, plan(), gpt2, train_rows=1_000_000, sequences_per_step=32)
    assert not speed.should_compile(cfg, plan(H100, "bf16"), gpt2, train_rows=100, sequences_per_step=32)
    assert speed.should_compile(cfg, plan(H100, "bf16"), gpt2, train_rows=1_000_000, sequences_per_step=32)
    assert speed.should_compile(TrainConfig(compile="on"), plan(), gpt2, train_rows=1, sequences_per_step=1)


def fake_trainer(timer, model=None, world_size: int = 1):
    """What speed reads from a Trainer: its callbacks, its model and its world size."""
    return types.SimpleNamespace(callback_handler=types.SimpleNamespace(callbacks=[timer]), model=model,
                                 args=types.SimpleNamespace(world_size=world_size))


def test_compile_seconds_is_the_first_steps_excess_over_the_typical_step():
    timer = speed.StepTimer(compiled=True)
    timer.seconds = [31.0, 1.0, 1.2, 0.9]
    assert speed.compile_seconds(fake_trainer(timer)) == pytest.approx(30.0)
    uncompiled = speed.StepTimer()
    uncompiled.seconds = [31.0, 1.0, 1.2, 0.9]
    assert speed.compile_seconds(fake_trainer(uncompiled)) is None


def test_step_timer_measures_the_period_between_step_ends():
    timer = speed.StepTimer()
    for _ in range(3):
        timer.on_step_begin(None, None, None)
        time.sleep(0.01)
        timer.on_step_end(None, None, None)
    assert len(timer.seconds) == 3 and len(timer.periods) == 2
    assert timer.step_seconds() >= 0.01


def test_mfu_uses_the_typical_step_time_and_the_dense_peak(gpt2):
    timer = speed.StepTimer()
    timer.seconds = [40.0, 0.06, 0.06, 0.06]  # a compile-long first step and an eval-long period are outliers
    timer.periods = [0.06, 9.0, 0.06]
    tokens = 4 * 32 * 1024 * 2  # 4 steps of 32 x 1024 tokens on each of 2 ranks
    got = speed.mfu(fake_trainer(timer, gpt2, world_size=2), plan(H100, "bf16"), tokens)
    flops = efficiency.flops_per_token(gpt2, 1024)
    assert got == pytest.approx(flops * 32 * 1024 / 0.06 / 989.4e12)
    assert 0.4 < got < 0.55  # GPT-2 124M at ~550k tokens/s on one H100 is nanoGPT-class, under half its peak
    assert speed.mfu(fake_trainer(timer, gpt2), plan(), tokens) is None  # CPU: no peak
