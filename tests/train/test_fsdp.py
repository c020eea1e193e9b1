"""--fsdp (entrypoint/train/fsdp.py). FSDP cannot run on these machines (Trainer refuses it in one process, and
accelerate runs plain DDP for several CPU processes), so what is proven here is what runs before it would engage:
the refusals where it cannot, the decoder layers it would shard by, and the arguments Trainer gets."""

from __future__ import annotations

import pytest
import torch

from entrypoint.config import options
from entrypoint.config.schema import TrainConfig
from entrypoint.errors import ConfigError, ExitCode
from entrypoint.train import fsdp
from entrypoint.train.job import training_arguments
from entrypoint.train.plan import RunPlan, batch_and_accumulation, decide
from entrypoint.train.preflight import Checked
from tests.support.archs import tiny_config
from tests.support.helpers import clean_env, finetune

SHARDED = {"version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
           "state_dict_type": "SHARDED_STATE_DICT", "cpu_ram_efficient_loading": False, "cpu_offload": False}


def test_the_fsdp_fields_name_the_layers_full_shard_and_sharded_checkpoints():
    assert fsdp.training_arguments(["LlamaDecoderLayer"], checkpointing=False) == {
        "fsdp": True, "fsdp_config": {**SHARDED, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
                                      "activation_checkpointing": False}}
    with_checkpointing = fsdp.training_arguments(["GPT2Block"], checkpointing=True)["fsdp_config"]
    assert with_checkpointing["activation_checkpointing"] is True
    assert with_checkpointing["transformer_layer_cls_to_wrap"] == ["GPT2Block"]


def test_trainer_arguments_turn_fsdp2_on_and_leave_checkpointing_to_it(tmp_path, monkeypatch):
    monkeypatch.delenv("FSDP_CPU_RAM_EFFICIENT_LOADING", raising=False)  # TrainingArguments sets it; undone after
    cfg = TrainConfig(fsdp=True, nproc_per_node="2", gradient_checkpointing=True, output_dir=tmp_path,
                      report_to="none", max_steps=4)
    plan = RunPlan(device="cpu", precision="fp32", block_size=32, batch_size=2, grad_accum=1, compile=False,
                   tf32=False, preprocessing_workers=1, dataloader_workers=0, world_size=2)
    args = training_arguments(cfg, plan, True, True, fsdp.training_arguments(["LlamaDecoderLayer"], True))
    assert args.fsdp is True and args.activation_checkpointing is False  # Trainer refuses both checkpointings
    assert args.fsdp_plugin_args == {
        "fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "reshard_after_forward": True,
        "transformer_cls_names_to_wrap": "LlamaDecoderLayer", "cpu_ram_efficient_loading": False,
        "state_dict_type": "SHARDED_STATE_DICT", "activation_checkpointing": True}
    plain = training_arguments(TrainConfig(gradient_checkpointing=True, output_dir=tmp_path, report_to="none"),
                               plan, True, True)
    assert plain.fsdp_plugin_args is None and plain.activation_checkpointing is True


@pytest.mark.parametrize(("arch", "layer"), [("gpt2", "GPT2Block"), ("llama", "LlamaDecoderLayer")])
def test_the_layers_sharded_are_the_models_decoder_blocks(arch, layer):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size=64))
    assert fsdp.layer_classes(model) == [layer]
    with pytest.raises(ConfigError, match="names no decoder layer class"):
        fsdp.layer_classes(torch.nn.Linear(2, 2))


def test_fsdp_where_it_cannot_engage_or_with_what_it_cannot_shard_is_refused():
    assert "has none" in fsdp.problem("cpu", 4)
    assert "this run has 1;" in fsdp.problem("NVIDIA H100 80GB HBM3", 1)
    assert fsdp.problem("NVIDIA H100 80GB HBM3", 2) is None
    assert fsdp.problem("NVIDIA H100 80GB HBM3", None) is None  # preflight: the world size is the plan's to check
    assert options.fsdp_problems(TrainConfig(fsdp=True, nproc_per_node="auto")) == []
    (single,) = options.fsdp_problems(TrainConfig(fsdp=True))
    assert "this run has one" in single and "--nproc-per-node auto" in single
    (lora,) = options.fsdp_problems(TrainConfig(fsdp=True, lora_rank=8, nproc_per_node="2"))
    assert "not supported with --lora-rank" in lora
    (quantized,) = options.fsdp_problems(TrainConfig(fsdp=True, lora_rank=8, quantize="4bit", nnodes="2",
                                                     rdzv_endpoint="node-0:29500"))
    assert "--quantize 4bit" in quantized


def test_fsdp_on_cpu_exits_2_in_the_launcher_never_a_silent_ddp_run(tmp_path, tiny_model, corpus_dir):
    out = tmp_path / "out"
    result = finetune("train", env=clean_env(FINETUNE_MODEL=str(tiny_model), FINETUNE_DATA_DIR=str(corpus_dir),
                                             FINETUNE_OUTPUT_DIR=str(out), FINETUNE_FSDP="1",
                                             FINETUNE_NPROC_PER_NODE="2", FINETUNE_MAX_STEPS="2"))
    assert result.returncode == ExitCode.USAGE, result.stderr[-2000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "--fsdp shards over CUDA GPUs and this run has none" in line and "drop --fsdp" in line
    assert "torchrun" not in result.stderr and not list(out.glob("checkpoints/checkpoint-*"))


def test_batch_size_auto_with_fsdp_takes_the_memory_plans_batch_instead_of_probing_one_gpu():
    gpu = Checked(device="NVIDIA H100 80GB HBM3", precision="bf16", block_size=2048, model_config=None)
    cfg = TrainConfig(fsdp=True, nproc_per_node="auto", batch_size="auto", grad_accum=4)
    assert batch_and_accumulation(cfg, gpu, probe=True, ceiling=4)[:2] == (4, 8)  # 32 sequences a step kept
    assert batch_and_accumulation(cfg, gpu, probe=True, ceiling=None)[:2] == (1, 32)


def test_the_plan_refuses_fsdp_on_one_process_or_on_cpu_before_sizing_anything():
    cfg = TrainConfig(fsdp=True, nproc_per_node="auto")  # auto: one process on a node with one GPU
    gpu = Checked(device="NVIDIA H100 80GB HBM3", precision="bf16", block_size=2048, model_config=None)
    with pytest.raises(ConfigError, match="this run has 1; give --nproc-per-node auto"):
        decide(cfg, gpu, 1)
    with pytest.raises(ConfigError, match="accelerate would run plain DDP"):
        decide(cfg, Checked(device="cpu", precision="fp32", block_size=32, model_config=None), 2)
