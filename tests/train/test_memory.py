"""The memory plan: parameter counts from the configuration equal the real model's, each mode's estimate moves the
way the mode does, a run that cannot fit stops before the model loads naming what would fit (exit 2), and the
estimate is within 30% of the measured peak of real runs on CPU."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from entrypoint.config.schema import TrainConfig
from entrypoint.errors import ConfigError, ExitCode
from entrypoint.train import memory, plan
from entrypoint.train import model as model_mod
from tests.support.archs import ARCHITECTURES, tiny_config
from tests.support.helpers import clean_env, finetune

GIB = 2**30
BASE = memory.Mode(precision="bf16", batch=1, block=2048)  # one 2048-token sequence in bf16


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_counts_from_the_configuration_equal_the_built_models(arch):
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, vocab_size=64)
    shape = memory.shape_of(config, 4, model_mod.lora_targets(arch, None))
    model = AutoModelForCausalLM.from_config(config)
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    wrapped = model_mod.add_lora(model, TrainConfig(lora_rank=4))
    assert shape.adapters == sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert (shape.layers, shape.vocab) == (2, 64) and shape.width == 32


def test_each_mode_moves_the_estimate_the_way_it_should():
    shape = memory.shape_of(_llama_7b(), 16, model_mod.lora_targets("llama", None))
    full = memory.estimate(shape, BASE, 0)
    lora = memory.estimate(shape, replace(BASE, lora=True), 0)
    qlora = memory.estimate(shape, replace(BASE, lora=True, quantize="4bit"), 0)
    assert 6.5e9 < shape.parameters < 6.8e9 and full.weights == shape.parameters * 4
    assert full.optimizer == 2 * full.gradients == 8 * shape.parameters  # AdamW: two fp32 moments
    assert lora.gradients < full.gradients / 100 and lora.weights == full.weights
    assert 3.3 * GIB < qlora.weights < 4.2 * GIB  # 4-bit linear layers, fp32 embeddings and head
    checkpointed = memory.estimate(shape, replace(BASE, checkpointing=True), 0)
    assert checkpointed.activations < full.activations / 5
    two = memory.estimate(shape, replace(BASE, world_size=2), 0)
    assert two.buckets == full.gradients  # DDP keeps a second copy of the gradients


def test_what_fits_names_the_cheapest_changes_that_fit():
    shape = memory.shape_of(_llama_7b(), 16, model_mod.lora_targets("llama", None))
    mode = memory.Mode(precision="bf16", batch=4, block=2048)
    fits = memory.what_fits(shape, mode, 0, 24 * GIB)
    assert fits and all("--quantize 4bit" in f for f in fits)
    assert memory.what_fits(shape, mode, 0, 200 * GIB)[0] == "--gradient-checkpointing"
    assert memory.what_fits(shape, mode, 0, 1 * GIB) == []


def test_fsdp_divides_the_model_state_by_the_world_size_and_is_named_where_it_fits():
    shape = memory.shape_of(_llama_7b(), 16, model_mod.lora_targets("llama", None))
    ddp = memory.estimate(shape, replace(BASE, world_size=4), 0)
    sharded = memory.estimate(shape, replace(BASE, world_size=4, fsdp=True), 0)
    layer = shape.parameters / shape.layers * 4  # one layer's fp32 weights, held whole while it computes
    assert sharded.weights == int(ddp.weights / 4 + memory.FSDP_GATHERED_LAYERS * layer)
    assert (sharded.gradients, sharded.optimizer, sharded.buckets) == (ddp.gradients // 4, ddp.optimizer // 4, 0)
    assert sharded.activations == ddp.activations
    mode = replace(BASE, world_size=4, checkpointing=True)  # full fine-tuning of 7B on four 40 GiB GPUs
    assert memory.what_fits(shape, mode, 0, 40 * GIB)[0] == "--fsdp"
    assert "--fsdp" not in " ".join(memory.what_fits(shape, replace(mode, world_size=1), 0, 40 * GIB))
    assert memory.what_fits(shape, replace(mode, fsdp=True), 0, 30 * GIB)[0] == "8 GPUs (--nproc-per-node, --nnodes)"


def test_preference_pairs_count_two_rows_and_the_reference_model():
    shape = memory.shape_of(_llama_7b(), 16, model_mod.lora_targets("llama", None))
    sft, dpo = memory.estimate(shape, BASE, 0), memory.estimate(shape, replace(BASE, preference=True), 0)
    assert sft.reference == 0 and dpo.activations == 2 * sft.activations and dpo.logits == 2 * sft.logits
    reference_logits = 2 * BASE.block * shape.vocab * 4
    assert dpo.reference == shape.parameters * 4 + reference_logits  # a frozen fp32 copy without LoRA
    lora = memory.estimate(shape, replace(BASE, lora=True, preference=True), 0)
    assert lora.reference == reference_logits  # the reference is the trained model with its adapter off
    sizing = memory.Sizing(shape, replace(BASE, preference=True), 0, 80 * GIB)
    with pytest.raises(ConfigError, match=r"^DPO needs about .*reference 25\.\d GiB.* it would fit with --lora-rank"):
        plan.refuse_beyond(sizing, "cuda", "DPO")
    plan.refuse_beyond(replace(sizing, mode=replace(sizing.mode, lora=True, checkpointing=True)), "cuda", "DPO")


def test_a_run_that_cannot_fit_exits_2_before_loading_the_model(tmp_path, tiny_model, corpus_dir):
    """A 7B-shaped Llama whose directory holds no weights at all: the plan refuses it, so nothing tried to load."""
    model = tmp_path / "llama-7b"
    _llama_7b().save_pretrained(model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).write_bytes((tiny_model / name).read_bytes())
    out = tmp_path / "out"
    result = finetune("train", env=clean_env(FINETUNE_MODEL=str(model), FINETUNE_DATA_DIR=str(corpus_dir),
                                             FINETUNE_OUTPUT_DIR=str(out), FINETUNE_LORA_RANK="8"))
    assert result.returncode == ExitCode.USAGE, result.stderr[-2000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "this run needs about" in line and "would fit with --quantize 4bit" in line
    assert "Traceback" not in result.stderr and not (out / "model").exists()


def test_doctor_shows_the_estimate_against_the_machines_memory(tmp_path, tiny_model, corpus_dir):
    result = finetune("doctor", env=clean_env(FINETUNE_MODEL=str(tiny_model), FINETUNE_DATA_DIR=str(corpus_dir),
                                              FINETUNE_OUTPUT_DIR=str(tmp_path / "out")))
    assert result.returncode == 0, result.stdout[-2000:]
    (plan,) = [line for line in result.stdout.splitlines() if line.startswith("ok    plan:")]
    assert re.search(r"memory: about [\d.]+ (MiB|GiB) of [\d.]+ GiB \(weights .*runtime", plan), plan


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "qlora+ckpt"])
def test_the_estimate_is_within_30_percent_of_the_measured_peak(tmp_path_factory, corpus_dir, mode):
    from bench import memory_plan

    workdir = tmp_path_factory.getbasetemp() / "memory-plan"
    workdir.mkdir(exist_ok=True)
    model = memory_plan.model_dir(workdir, "llama", corpus_dir)
    row = memory_plan.measure(model, corpus_dir, workdir / f"out-{mode}", mode)
    assert 0.7 < row["ratio"] < 1.3, json.dumps(row)


def _llama_7b():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


def test_batch_size_auto_starts_its_probe_at_the_largest_batch_the_estimate_fits():
    shape = memory.shape_of(_llama_7b(), 16, model_mod.lora_targets("llama", None))
    sizing = memory.Sizing(shape, replace(BASE, lora=True, checkpointing=True), memory.CUDA_RUNTIME, 80 * GIB)
    start = sizing.largest_batch(64)
    assert 1 < start < 64 and start & (start - 1) == 0  # a power of two, below the limit
    assert sizing.at(start).total <= 80 * GIB < sizing.at(2 * start).total
    assert memory.Sizing(shape, BASE, 0, 1 * GIB).largest_batch(64) == 1  # the fallback, checked by the plan
