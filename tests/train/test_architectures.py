"""Any causal LM: tiny random Llama, Qwen2, GPT-NeoX and OPT models train, stop, resume and publish, with full
fine-tuning and with LoRA, and every place that reads a model config reads each architecture's names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from entrypoint.train import mfu
from entrypoint.train.preflight import MAX_DEFAULT_BLOCK, context_length
from tests.support.archs import save_tiny_model, tiny_config
from tests.support.helpers import finetune
from tests.support.runs import env_for, stopped_then_resumed

OTHERS = ("llama", "qwen2", "gpt_neox", "opt")
SHORT = {"FINETUNE_MAX_STEPS": "8", "FINETUNE_SAVE_STEPS": "4", "FINETUNE_EVAL_STEPS": "8"}


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, corpus_dir) -> Path:
    """The corpus cut to 600 training and 16 validation lines: evaluations take a moment, not a minute."""
    directory = tmp_path_factory.mktemp("small-data")
    for name, lines in (("train.txt", 600), ("valid.txt", 16)):
        text = (corpus_dir / name).read_text().splitlines()[:lines]
        (directory / name).write_text("\n".join(text) + "\n")
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("architectures")
    return {arch: save_tiny_model(arch, tiny_model, root / arch) for arch in OTHERS}


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("arch", OTHERS)
def test_each_architecture_trains_stops_resumes_and_publishes_an_ordinary_model(tmp_path, models, small_data, arch,
                                                                                lora):
    """Full training is stopped and resumed, then the published model generates through the CLI. With LoRA what
    depends on the architecture is which modules take adapters and the merge into its weights: one uninterrupted
    run, published as an ordinary model (resuming an adapter is the same on every architecture:
    tests/train/test_model.py stops and resumes one exactly)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    env = env_for(models[arch], small_data, out, **SHORT, **({"FINETUNE_LORA_RANK": "4"} if lora else {}))
    if lora:
        run = finetune("train", env=env)
        assert run.returncode == 0, run.stderr[-3000:]
    else:
        stopped_then_resumed(env, 3, out)
    published = out / "model"
    assert (published / "COMPLETE").exists() and (published / "adapter").is_dir() == lora
    model = AutoModelForCausalLM.from_pretrained(published)
    assert model.config.model_type == arch and not any("lora" in n for n in model.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(published)
    assert len(tokenizer) == model.config.vocab_size
    if lora:  # the merged weights differ from the base's where the adapter trained
        base = AutoModelForCausalLM.from_pretrained(models[arch]).state_dict()
        assert any(not torch.equal(base[name], weight) for name, weight in model.state_dict().items())
        return
    sample = finetune("generate", "--model-dir", str(published), "--prompt", "Return", "--max-new-tokens", "5",
                      env=env)
    assert sample.returncode == 0 and sample.stdout.strip().startswith("Return"), sample.stderr[-2000:]


@pytest.mark.parametrize("arch, positions", [("gpt2", 128), ("llama", 128), ("qwen2", 4096), ("gpt_neox", 256),
                                             ("opt", 2048)])
def test_default_block_size_reads_each_architectures_context_length(arch, positions):
    config = tiny_config(arch, vocab_size=64, positions=positions)
    assert context_length(config) == positions
    assert min(context_length(config), MAX_DEFAULT_BLOCK) == min(positions, 1024)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "gpt_neox", "opt"])
def test_flops_per_token_uses_each_architectures_layers_and_width(arch):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size=64))
    lookups = {"gpt2": "transformer.wpe.weight", "opt": "model.decoder.embed_positions.weight"}
    params = dict(model.named_parameters())
    n = sum(p.numel() for p in params.values()) - (params[lookups[arch]].numel() if arch in lookups else 0)
    assert mfu.flops_per_token(model, 64) == 6 * n + 12 * 2 * 32 * 64  # 2 layers, width 32


def test_frozen_weights_cost_four_flops_per_token_not_six():
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=64))
    full = mfu.flops_per_token(model, 64)
    frozen = sum(p.numel() for p in model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    assert mfu.flops_per_token(model, 64) == full - 2 * frozen
