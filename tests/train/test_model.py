"""Model loading and LoRA: adapters on each architecture's projections, adapter-only checkpoints that resume
exactly, a merged published model that plain transformers loads, and no remote code."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from entrypoint.config.schema import TrainConfig
from entrypoint.errors import ExitCode, ModelLoadError
from entrypoint.train import model as model_mod
from tests.support.archs import ARCHITECTURES, tiny_config
from tests.support.helpers import clean_env, finetune
from tests.support.runs import env_for, final_metrics, stopped_then_resumed

LORA = {"FINETUNE_LORA_RANK": "4", "FINETUNE_LORA_DROPOUT": "0.1"}


@pytest.fixture(scope="module")
def lora_reference(tmp_path_factory, tiny_model, corpus_dir) -> Path:
    """An uninterrupted LoRA run (24 steps, checkpoints every 8): the output directory."""
    out = tmp_path_factory.mktemp("lora-reference") / "out"
    result = finetune("train", env=env_for(tiny_model, corpus_dir, out, **LORA))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_lora_checkpoints_hold_the_adapter_and_its_optimizer_state_only(lora_reference):
    checkpoint = lora_reference / "checkpoints" / "checkpoint-8"
    assert not (checkpoint / "model.safetensors").exists()
    adapter = load_file(checkpoint / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    moments = [s["exp_avg"] for s in optimizer["state"].values()]
    assert sorted(m.numel() for m in moments) == sorted(t.numel() for t in adapter.values())


@pytest.mark.slow
def test_lora_sigterm_then_rerun_equals_an_uninterrupted_lora_run(tmp_path, tiny_model, corpus_dir, lora_reference):
    out = tmp_path / "out"
    env = env_for(tiny_model, corpus_dir, out, **LORA)
    stopped_then_resumed(env, 13, out)
    reference = final_metrics(lora_reference)
    assert final_metrics(out)["eval_loss"] == pytest.approx(reference["eval_loss"], abs=1e-4)
    resumed = load_file(out / "model" / "adapter" / "adapter_model.safetensors")
    uninterrupted = load_file(lora_reference / "model" / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.allclose(resumed[name], tensor, atol=1e-5), name


def test_lora_publishes_a_merged_model_plain_transformers_loads_with_the_adapter_beside_it(lora_reference,
                                                                                          tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    published = lora_reference / "model"
    merged = AutoModelForCausalLM.from_pretrained(published).eval()
    assert not any("lora" in name for name in merged.state_dict())
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                             published / "adapter").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = torch.arange(40).unsqueeze(0) % merged.config.vocab_size
    with torch.no_grad():
        merged_logits, adapter_logits, base_logits = (m(ids).logits for m in (merged, with_adapter, base))
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-4)
    assert (merged_logits - base_logits).abs().max() > 1e-3  # the adapter learned something
    assert merged.config.use_cache  # turned off for training only
    card = (published / "README.md").read_text()
    assert "## LoRA" in card and "merged" in card and "adapter/" in card and "| lora_rank | 4 |" in card
    assert (published / "COMPLETE").exists() and not (published / "adapter" / "README.md").exists()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_default_lora_targets_are_each_architectures_attention_and_mlp_projections(arch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size=64))
    wrapped = model_mod.add_lora(model, TrainConfig(lora_rank=2))
    adapted = {name.split(".")[-1] for name, module in wrapped.named_modules() if hasattr(module, "lora_A")}
    assert adapted == set(model_mod.LORA_TARGETS[arch])
    trainable = [name for name, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


def test_an_architecture_without_defaults_gets_all_linear_and_names_can_be_given():
    assert model_mod.lora_targets("falcon", None) == "all-linear"
    assert model_mod.lora_targets("llama", "q_proj, v_proj") == ["q_proj", "v_proj"]
    assert model_mod.lora_targets("llama", "all-linear") == "all-linear"


def test_lora_target_modules_the_model_lacks_are_refused_in_one_line():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=64))
    with pytest.raises(ModelLoadError) as err:
        model_mod.add_lora(model, TrainConfig(lora_rank=2, lora_target_modules="c_attn"))
    assert "--lora-target-modules c_attn" in str(err.value) and "\n" not in str(err.value)


def test_a_model_that_needs_remote_code_is_refused_naming_the_flag(tmp_path, data_dir):
    remote = tmp_path / "remote-model"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({
        "model_type": "my_custom_lm", "architectures": ["MyLM"],
        "auto_map": {"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyLM"}}))
    result = finetune("train", "--model", str(remote), "--data-dir", str(data_dir), "--output-dir",
                      str(tmp_path / "out"), env=clean_env())
    assert result.returncode == ExitCode.MODEL, result.stderr[-2000:]
    assert "trust_remote_code" in result.stderr and "--trust-remote-code" in result.stderr
    assert "Traceback" not in result.stderr


def test_attention_is_causal_sdpa_for_text_and_sdpa_or_flash_for_isolated_documents():
    from entrypoint.train.model import CAUSAL, attention_for

    assert attention_for(isolated=False, precision="bf16") == CAUSAL
    assert attention_for(isolated=True, precision="fp32") == "sdpa"
    if not torch.cuda.is_available():
        assert attention_for(isolated=True, precision="bf16") == "sdpa"


def test_an_attention_the_installation_cannot_provide_falls_back_to_sdpa_with_a_warning(tiny_model, caplog):
    from entrypoint.train.model import load_model

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed here, so flash_attention_2 may load")
    with caplog.at_level("WARNING", logger="finetune"):
        model = load_model(TrainConfig(model=str(tiny_model)), attention="flash_attention_2")
    assert model.config._attn_implementation == "sdpa"
    assert "flash_attention_2 unavailable" in caplog.text
