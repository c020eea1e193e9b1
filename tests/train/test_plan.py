"""The run plan's choices that need no GPU to check: --batch-size auto's CPU fallback and parsing, --compile auto's
decision, and the plan decided before data through the real CLI (`config`, `doctor`, `train`'s plan line)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from entrypoint.config.options import check_values, coerce, fields
from entrypoint.config.schema import TrainConfig
from entrypoint.errors import ConfigError
from entrypoint.train import plan as planning
from entrypoint.train.preflight import Checked
from tests.support.helpers import clean_env, finetune, train_env

H100 = "NVIDIA H100 80GB HBM3"


def plan(device: str = "cpu", precision: str = "fp32") -> Checked:
    return Checked(device=device, precision=precision, block_size=1024, model_config=GPT2Config())


def test_batch_size_takes_an_integer_or_auto_from_any_source():
    field = fields(TrainConfig)["batch_size"]
    assert coerce(field, "AUTO", "env") == "auto" and coerce(field, 16, "preset") == 16
    with pytest.raises(ConfigError, match="not a valid int"):
        coerce(field, "lots", "preset")
    assert check_values(TrainConfig(batch_size="auto")) == []


def test_batch_size_auto_on_cpu_is_the_default_micro_batch_and_keeps_grad_accum():
    assert planning.batch_and_accumulation(TrainConfig(batch_size="auto", grad_accum=4), plan())[:2] == (8, 4)
    assert planning.batch_and_accumulation(TrainConfig(batch_size=2, grad_accum=3), plan())[:2] == (2, 3)


def test_compile_auto_is_off_on_cpu_and_short_gpu_runs_and_on_for_long_ones():
    cfg = TrainConfig(compile="auto", epochs=3)
    assert not planning.should_compile(cfg, plan(), train_rows=1_000_000, sequences_per_step=32)[0]
    assert not planning.should_compile(cfg, plan(H100, "bf16"), train_rows=100, sequences_per_step=32)[0]
    assert planning.should_compile(cfg, plan(H100, "bf16"), train_rows=1_000_000, sequences_per_step=32)[0]
    assert planning.should_compile(TrainConfig(compile="on"), plan(), train_rows=1, sequences_per_step=1)[0]




def test_config_and_doctor_show_the_plan_train_logs_before_reading_data(tmp_path, tiny_model, corpus_dir):
    """One plan, three views: `config` and `doctor` print the line `train` logs, and train logs it before the data
    is read (the cache-miss line comes after)."""
    env = train_env(tiny_model, corpus_dir, tmp_path / "out", FINETUNE_MAX_STEPS="2", FINETUNE_BATCH_SIZE="auto",
                    FINETUNE_GRAD_ACCUM="2")
    shown = finetune("config", env=env)
    assert shown.returncode == 0, shown.stderr
    line = next(x for x in shown.stdout.splitlines() if x.startswith("# run plan: ")).removeprefix("# run plan: ")
    # The memory estimate ends the line; its runtime term is each process's own resident memory, so it differs.
    line, estimate = line.split(", memory: about ")
    assert "runtime" in estimate and "+10% margin" in estimate
    assert "device cpu, precision fp32, block size 32, batch: 8 x 2 accumulation x 1 processes" in line
    assert "compile: off (auto: not on a CUDA GPU with a known peak)" in line
    assert not (tmp_path / "out").exists(), "config must not create the output directory"
    doctor = finetune("doctor", env=env)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert f"plan: {line}" in doctor.stdout
    train = finetune("train", env=env)
    assert train.returncode == 0, train.stderr[-3000:]
    assert f"plan: {line}" in train.stderr
    assert train.stderr.index("plan: ") < train.stderr.index("data: cache miss")


def test_config_shows_why_there_is_no_plan_when_the_model_is_unreachable(tmp_path, corpus_dir):
    env = clean_env(FINETUNE_MODEL=str(tmp_path / "missing"), FINETUNE_DATA_DIR=str(corpus_dir),
                    FINETUNE_OUTPUT_DIR=str(tmp_path / "out"))
    shown = finetune("config", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "# run plan: not available here (--model " in shown.stdout


def test_the_compile_estimate_reads_file_sizes_only(tmp_path):
    (tmp_path / "train.txt").write_bytes(b"x" * 4 * 1024 * 100)  # about 102,400 tokens at 4 bytes a token
    assert planning.estimated_rows(TrainConfig(data_dir=tmp_path), 1024) == 100


@pytest.mark.parametrize(("error", "oom"), [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), True),
    (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), True),
    (RuntimeError("CUDA error: out of memory"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x768 and 512x768)"), False),
])
def test_the_batch_probe_takes_library_allocation_failures_for_a_full_gpu_and_nothing_else(error, oom):
    assert planning.out_of_memory(error) is oom


def test_the_batch_probe_holds_room_for_adamw_and_for_ddps_gradient_buckets():
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())
    params = sum(p.numel() for p in model.parameters())  # GPT-2 124M: 124,439,808 with the tied embedding
    assert params == 124_439_808
    adamw = 2 * 4 * params  # two fp32 moments
    assert planning.held_bytes(model, world_size=1) == adamw
    # Several processes: the buckets (25 MiB each by default) together copy every fp32 gradient: 498 MB more.
    assert planning.held_bytes(model, world_size=2) == adamw + 4 * params
    for p in model.transformer.h.parameters():
        p.requires_grad_(False)  # frozen weights have no moments and no gradients to reduce
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert planning.held_bytes(model, world_size=4) == 12 * trainable


def test_compile_auto_weighs_the_compile_time_an_earlier_run_here_measured(tmp_path):
    """About 17 minutes of GPT-2 training on an H100 saves about 2.5 minutes compiled: that repays the assumed
    minute of compiling, not the ten minutes the last run into this output directory measured on the same GPU."""
    import json

    cfg = TrainConfig(compile="auto", epochs=1, output_dir=tmp_path)
    checked = plan(H100, "bf16")
    compiled, why = planning.should_compile(cfg, checked, train_rows=337_000, sequences_per_step=32)
    assert compiled and "about 60 s of compiling (assumed)" in why
    per_token = planning.flops_per_token(checked.model_config, 1024)
    earlier = {"device": H100, "compile_seconds": 600.0, "flops_per_token": per_token}
    (tmp_path / "metrics.json").write_text(json.dumps(earlier))
    compiled, why = planning.should_compile(cfg, checked, train_rows=337_000, sequences_per_step=32)
    assert not compiled and "about 600 s of compiling (measured by the last run here)" in why
    (tmp_path / "metrics.json").write_text(json.dumps({**earlier, "device": "NVIDIA A100-SXM4-80GB"}))
    assert planning.should_compile(cfg, checked, train_rows=337_000, sequences_per_step=32)[0]  # another GPU


def test_the_batch_probe_measures_the_gelu_and_loss_training_runs():
    from entrypoint.train.loss import causal_lm_loss

    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    probed = planning.model_from_config(TrainConfig(), config)
    assert probed.config.activation_function == "gelu_pytorch_tanh" and probed.loss_function is causal_lm_loss
    assert config.activation_function == "gelu_new"  # the checked configuration itself is left as it was
    kept = planning.model_from_config(TrainConfig(tanh_gelu=False), config)
    assert kept.config.activation_function == "gelu_new"
