"""Speed choices that need no GPU to check: --batch-size auto's CPU fallback and parsing, --compile auto's
decision, and how the compile time is read from step times."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from entrypoint import speed
from entrypoint.checks import Plan
from entrypoint.config import TrainConfig, check_values, coerce, fields
from entrypoint.errors import ConfigError

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


def test_compile_seconds_is_the_first_steps_excess_over_the_typical_step():
    timer = speed.StepTimer()
    timer.seconds = [31.0, 1.0, 1.2, 0.9]

    class Trainer:
        class callback_handler:  # noqa: N801  (Trainer's attribute name)
            callbacks = [timer]

    assert speed.compile_seconds(Trainer) == pytest.approx(30.0)
