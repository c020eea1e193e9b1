"""The chunked causal-LM loss: transformers' ForCausalLMLoss within 1e-5 (value and gradient), never a full fp32
copy of half-precision logits, installed on every architecture, and Trainer's token averaging with gradient
accumulation unchanged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers.loss.loss_utils import ForCausalLMLoss

from bench.stages import py_spy
from entrypoint.config.schema import TrainConfig
from entrypoint.data.collate import PaddingCollator
from entrypoint.train import loss as loss_mod
from entrypoint.train import model as model_mod
from tests.support.archs import ARCHITECTURES, save_tiny_model
from tests.support.helpers import REPO, clean_env

VOCAB = 97


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", VOCAB * 7)  # 7 rows a chunk: many chunks and a ragged last one


def logits_and_labels(dtype, rows=3, length=19, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, length, VOCAB, generator=generator) * 4).to(dtype).requires_grad_()
    labels = torch.randint(0, VOCAB, (rows, length), generator=generator)
    labels[0, :6] = -100  # a prompt without loss
    labels[2, 10:] = -100
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("items", [None, 31])
def test_chunked_loss_and_gradient_equal_transformers_loss(small_chunks, dtype, items):
    logits, labels = logits_and_labels(dtype)
    count = None if items is None else torch.tensor(items)
    expected = ForCausalLMLoss(logits, labels, VOCAB, num_items_in_batch=count)
    [expected_grad] = torch.autograd.grad(expected * 3, logits)
    got = loss_mod.causal_lm_loss(logits, labels, VOCAB, num_items_in_batch=count)
    [grad] = torch.autograd.grad(got * 3, logits)
    assert got.dtype == expected.dtype == torch.float32 and grad.dtype == dtype
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got, expected)
    assert torch.allclose(grad.float(), expected_grad.float(), atol=1e-5, rtol=0)


def test_chunked_loss_takes_shifted_labels_and_gives_nan_without_targets_as_transformers_does(small_chunks):
    logits, labels = logits_and_labels(torch.float32)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    assert torch.allclose(loss_mod.causal_lm_loss(logits, None, VOCAB, shift_labels=shifted),
                          ForCausalLMLoss(logits, labels, VOCAB), atol=1e-5)
    nothing = torch.full_like(labels, -100)
    assert loss_mod.causal_lm_loss(logits, nothing, VOCAB).isnan() and ForCausalLMLoss(logits, nothing, VOCAB).isnan()


class LargestFloat32(TorchDispatchMode):
    """The most elements any fp32 tensor an operation returns has, forward and backward."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("loss_function", [ForCausalLMLoss, loss_mod.causal_lm_loss])
def test_bf16_logits_are_never_copied_whole_to_fp32_by_the_chunked_loss(small_chunks, loss_function):
    logits, labels = logits_and_labels(torch.bfloat16, rows=4, length=64)
    with LargestFloat32() as seen:
        loss_function(logits, labels, VOCAB).backward()
    whole = logits.numel()
    if loss_function is ForCausalLMLoss:
        assert seen.largest == whole  # the default upcasts everything: what the chunked one avoids
    else:
        assert seen.largest <= 7 * VOCAB


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_trains_with_the_chunked_loss(arch, tiny_model, tmp_path):
    directory = save_tiny_model(arch, tiny_model, tmp_path / arch)
    model = model_mod.load_model(TrainConfig(model=str(directory)))
    assert model.loss_function is loss_mod.causal_lm_loss
    ids = torch.randint(1, 500, (2, 16))
    chunked = model(input_ids=ids, labels=ids).loss
    model.loss_function = ForCausalLMLoss
    assert torch.allclose(chunked, model(input_ids=ids, labels=ids).loss, atol=1e-5)


def test_a_lora_model_computes_the_chunked_loss(tiny_model):
    model = model_mod.load_model(TrainConfig(model=str(tiny_model), lora_rank=4))
    assert model_mod.is_lora(model) and model.get_base_model().loss_function is loss_mod.causal_lm_loss


def train_weights(tiny_model, tmp_path, loss_function) -> dict:
    """Weights after two optimizer steps of two unequal micro-batches each (padded rows of different lengths, so
    the micro-batches hold different numbers of target tokens)."""
    from transformers import Trainer, TrainingArguments

    model = model_mod.load_model(TrainConfig(model=str(tiny_model)))
    if loss_function is not None:
        model.loss_function = loss_function
    rows = [{"input_ids": list(range(1 + i, 6 + 7 * i))} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=2, learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", seed=0, data_seed=0, disable_tqdm=True,
                             optim="sgd")  # Adam would magnify last-bit differences in near-zero gradients
    Trainer(model=model, args=args, train_dataset=rows, data_collator=PaddingCollator(0, 64)).train()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_training_with_gradient_accumulation_gives_the_weights_of_transformers_loss(tiny_model, tmp_path,
                                                                                    small_chunks):
    chunked = train_weights(tiny_model, tmp_path / "chunked", None)
    default = train_weights(tiny_model, tmp_path / "default", ForCausalLMLoss)
    start = dict(model_mod.load_model(TrainConfig(model=str(tiny_model))).named_parameters())
    assert max((chunked[name] - default[name]).abs().max() for name in default) < 1e-6
    assert max((chunked[name] - start[name]).abs().max() for name in start) > 1e-3  # the steps did train


def test_the_loss_benchmark_measures_a_lower_peak_for_the_chunked_loss(tmp_path):
    """bench/loss.py on 512 tokens: both sides' peak memory, in their own processes."""
    report = tmp_path / "loss.json"
    command = [sys.executable, "-m", "bench.loss", "--batch-size", "1", "--block-size", "512", "--width", "64",
               "--json", str(report)]  # a narrow embedding: its gradient (the same on both sides) stays small
    process = subprocess.Popen(command, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        if spy := py_spy():  # where the benchmark hung, before it is killed
            subprocess.run([spy, "dump", "--subprocesses", "--pid", str(process.pid)], timeout=60)
        os.killpg(process.pid, signal.SIGKILL)
        raise
    assert process.returncode == 0, err[-3000:]
    result = json.loads(report.read_text())
    assert result["peak_ratio"] < 0.8 and result["loss_difference"] < 1e-5
    assert "chunked vs" in out and result["default"]["peak_bytes"] > result["logits_bytes"]
