"""MFU's two inputs: FLOPs per token of a GPT-2 and the GPU peak table."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from entrypoint.train import mfu


def test_gpt2_124m_costs_6n_plus_attention_flops_per_token():
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())
    n = 124_439_808 - 1024 * 768  # all parameters but the position embeddings
    assert mfu.flops_per_token(model, 1024) == 6 * n + 12 * 12 * 768 * 1024


@pytest.mark.parametrize("name, precision, tf32, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", False, 989.4),
    ("NVIDIA H100 PCIe", "bf16", False, 756.0),
    ("NVIDIA A100-SXM4-80GB", "fp16", False, 312.0),
    ("NVIDIA A100-SXM4-80GB", "fp32", True, 156.0),
    ("NVIDIA A100-SXM4-80GB", "fp32", False, 19.5),
    ("NVIDIA L4", "bf16", False, 121.0),
    ("NVIDIA L40S", "bf16", False, 362.0),
    ("NVIDIA A10G", "fp16", False, 70.0),
    ("NVIDIA A10", "fp16", False, 125.0),
    ("Tesla T4", "fp32", True, 8.1),  # no tf32: plain fp32
])
def test_peak_is_looked_up_by_the_most_specific_gpu_name(name, precision, tf32, tflops):
    assert mfu.peak_flops(name, precision, tf32) == pytest.approx(tflops * 1e12)


def test_no_mfu_on_cpu_or_an_unknown_gpu():
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=1))
    assert mfu.mfu(model, "cpu", "fp32", 512, 1000.0) is None
    assert mfu.mfu(model, "Some Future GPU", "bf16", 512, 1000.0) is None
    assert mfu.mfu(model, "NVIDIA H100 80GB HBM3", "bf16", 512, 1000.0) > 0
