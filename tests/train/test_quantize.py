"""QLoRA: --quantize 4bit loads a tiny Llama's frozen weights as NF4 through bitsandbytes (CPU), trains LoRA adapters
on it, resumes exactly after SIGTERM, and publishes an ordinary merged model plain transformers loads and generates
with; --quantize without LoRA, or with --compile on, is a usage error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from entrypoint.config.options import check_values
from entrypoint.config.schema import TrainConfig
from entrypoint.errors import ExitCode
from entrypoint.train import model as model_mod
from tests.support.archs import tiny_config
from tests.support.helpers import clean_env, finetune
from tests.support.runs import env_for, final_metrics, stopped_then_resumed

pytest.importorskip("bitsandbytes")

QLORA = {"FINETUNE_LORA_RANK": "8", "FINETUNE_QUANTIZE": "4bit", "FINETUNE_MAX_STEPS": "8",
         "FINETUNE_SAVE_STEPS": "4", "FINETUNE_EVAL_STEPS": "4"}


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tiny_model) -> Path:
    """A random two-layer Llama of width 64 (key/value width 32): bitsandbytes quantizes in blocks of 64 values,
    and its CPU inference kernel packs output rows in blocks of 32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = tmp_path_factory.mktemp("qlora") / "llama"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    config = tiny_config("llama", len(tokenizer), tokenizer.eos_token_id)
    config.hidden_size, config.intermediate_size, config.head_dim = 64, 128, 16
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def reference(tmp_path_factory, llama, corpus_dir) -> Path:
    """An uninterrupted QLoRA run: its output directory."""
    out = tmp_path_factory.mktemp("qlora-reference") / "out"
    result = finetune("train", env=env_for(llama, corpus_dir, out, **QLORA))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "base weights quantized to 4bit" in result.stderr
    assert re.search(r"compile: off \(auto: not with --quantize 4bit", result.stderr)
    return out


def test_quantize_none_from_the_flag_or_the_environment_is_the_default(tmp_path):
    """`--quantize 4bit|8bit|none`: none is the weights as they are, whichever way it is given."""
    common = ["config", "--model", str(tmp_path), "--data-dir", str(tmp_path)]
    for args, env in ((["--quantize", "none"], clean_env()), ([], clean_env(FINETUNE_QUANTIZE="none"))):
        result = finetune(*common, *args, env=env, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert re.search(r"^quantize: null", result.stdout, re.M), result.stdout


def test_quantize_without_lora_or_with_compile_on_is_a_usage_error_naming_the_fix():
    (problem,) = check_values(TrainConfig(quantize="4bit"))
    assert "--lora-rank" in problem and "drop --quantize" in problem
    (problem,) = check_values(TrainConfig(quantize="8bit", lora_rank=4, compile="on"))
    assert "--compile auto or off" in problem
    assert check_values(TrainConfig(quantize="4bit", lora_rank=4)) == []


def test_quantize_without_lora_exits_2_before_anything_loads(tmp_path, corpus_dir):
    result = finetune("train", "--quantize", "4bit", "--data-dir", str(corpus_dir), "--output-dir",
                      str(tmp_path / "out"))
    assert result.returncode == ExitCode.USAGE, result.stderr[-2000:]
    assert "--quantize 4bit trains LoRA adapters on a quantized base and needs --lora-rank" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out" / "model").exists()


def test_a_qlora_checkpoint_holds_only_the_adapter(reference):
    checkpoint = reference / "checkpoints" / "checkpoint-4"
    assert not (checkpoint / "model.safetensors").exists()
    adapter = load_file(checkpoint / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)


def test_qlora_publishes_the_adapter_merged_into_the_unquantized_base(reference, llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    published = reference / "model"
    merged = AutoModelForCausalLM.from_pretrained(published).eval()
    assert not getattr(merged.config, "quantization_config", None)  # an ordinary model, not a 4-bit one
    assert {p.dtype for p in merged.parameters()} == {torch.float32}  # the plan's precision on CPU
    assert not any("lora" in name for name in merged.state_dict())
    unquantized = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama), published / "adapter").eval()
    base = AutoModelForCausalLM.from_pretrained(llama).eval()
    ids = torch.arange(24).unsqueeze(0) % merged.config.vocab_size
    with torch.no_grad():
        merged_logits, adapter_logits, base_logits = (m(ids).logits for m in (merged, unquantized, base))
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-4)  # the original weights plus the trained update
    assert (merged_logits - base_logits).abs().max() > 1e-3  # and the adapter learned something
    # What the adapter does on top of the 4-bit base it trained on, it does on top of the unquantized base.
    quantized = AutoModelForCausalLM.from_pretrained(llama, quantization_config=model_mod.quantization("4bit", "fp32"))
    model_mod.prepare_quantized(quantized, TrainConfig(model=str(llama), quantize="4bit"), "fp32")
    with torch.no_grad():
        quantized_logits = quantized.eval()(ids).logits
        trained_logits = PeftModel.from_pretrained(quantized, published / "adapter").eval()(ids).logits
    effects = torch.stack([(merged_logits - base_logits).flatten(), (trained_logits - quantized_logits).flatten()])
    assert torch.corrcoef(effects)[0, 1] > 0.95
    card = (published / "README.md").read_text()
    assert "quantized to 4bit (QLoRA)" in card and "| quantize | 4bit |" in card
    sample = finetune("generate", "--model-dir", str(published), "--prompt", "Return", "--max-new-tokens", "5")
    assert sample.returncode == 0, sample.stderr[-2000:]
    assert sample.stdout.startswith("Return")


def test_qlora_sigterm_then_rerun_equals_an_uninterrupted_run(tmp_path, llama, corpus_dir, reference):
    out = tmp_path / "out"
    env = env_for(llama, corpus_dir, out, **QLORA)
    stopped_then_resumed(env, 5, out)
    assert final_metrics(out)["eval_loss"] == pytest.approx(final_metrics(reference)["eval_loss"], abs=1e-5)
    resumed = load_file(out / "model" / "adapter" / "adapter_model.safetensors")
    uninterrupted = load_file(reference / "model" / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name


def test_8bit_loads_int8_layers_and_only_the_adapters_learn(llama):
    from bitsandbytes.nn import Linear8bitLt

    from entrypoint.train.model import load_model

    model = load_model(TrainConfig(model=str(llama), lora_rank=4, quantize="8bit", lora_dropout=0.0))
    assert any(isinstance(m, Linear8bitLt) for m in model.modules())
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.arange(32).unsqueeze(0) % model.config.vocab_size
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert any(not torch.equal(p, trainable[n]) for n, p in model.named_parameters() if p.requires_grad)
