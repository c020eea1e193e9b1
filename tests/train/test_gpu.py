"""The GPU path, on a real GPU: `pytest -m gpu`, run by `make gpu-check` (scripts/gpu-check.sh).

Without CUDA these tests skip, except in the GPU check's dry mode (GPU_CHECK_DRY=1), which runs them on the CPU on
tiny shapes so their code cannot rot: the precision becomes fp32, torchrun uses gloo instead of NCCL, and the
tests that only mean something on a GPU (fp16's loss scaler, --compile on, the memory probe) skip with a reason.

The tests come in three classes of about equal length, so that on a GPU machine the check runs them in three
pytest-xdist workers (`-n 3 --dist loadscope`: one class a worker; the reference run is made once, by the class that
uses it) and the three together fit the tests stage's budget.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from entrypoint.errors import ExitCode
from tests.support.helpers import FAST_TRAIN, finetune, train_env
from tests.support.runs import free_port, interrupt_at

CUDA = torch.cuda.is_available()
DRY = os.environ.get("GPU_CHECK_DRY") == "1"
PRECISION = "bf16" if CUDA else "fp32"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (CUDA or DRY), reason="needs a CUDA GPU: make gpu-check runs these (GPU_CHECK_DRY=1 "
                                                 "runs them on the CPU on tiny shapes)"),
]
needs_cuda = pytest.mark.skipif(not CUDA, reason="only meaningful on a CUDA GPU (dry mode runs on the CPU)")

STEPS = 24 if CUDA else 8  # dry mode keeps CPU time down: each run is mostly the process's start
# Evaluations every third of the run (every half in dry mode), so the SIGTERM test's step (a quarter in) is neither an
# evaluation step nor the one before: a signal inside an evaluation ends it without a checkpoint (its own test).
EVAL_EVERY = STEPS // 3 if CUDA else STEPS // 2
RUN = {**FAST_TRAIN, "FINETUNE_MAX_STEPS": str(STEPS), "FINETUNE_SAVE_STEPS": str(EVAL_EVERY),
       "FINETUNE_EVAL_STEPS": str(EVAL_EVERY), "FINETUNE_LOGGING_STEPS": "1", "FINETUNE_PRECISION": PRECISION}
# bf16 matmuls and atomically accumulated embedding gradients are not bit-exact between runs on a GPU.
LOSS_TOLERANCE = {"rel": 2e-2} if CUDA else {"abs": 1e-4}


def env_for(model: Path, data: Path, out: Path, **extra: str) -> dict[str, str]:
    return train_env(model, data, out, base=RUN, FINETUNE_CACHE_DIR=str(out.parent / "cache"), **extra)


def metrics_of(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, corpus_dir) -> tuple[Path, dict, str]:
    """One uninterrupted run at the GPU's precision: (output dir, metrics, log)."""
    out = tmp_path_factory.mktemp("gpu-reference") / "out"
    result = finetune("train", env=env_for(tiny_model, corpus_dir, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, metrics_of(out), result.stderr


class TestOneRun:
    """The reference run and what is done with it: a bf16 run, SIGTERM and resume to its loss, generate."""

    def test_bf16_run_trains_on_the_gpu_and_reports_mfu(self, reference):
        _, metrics, log = reference
        assert metrics["precision"] == PRECISION and metrics["global_step"] == STEPS
        assert metrics["eval_loss"] < metrics["initial_eval_loss"]
        assert metrics["step_seconds"] > 0
        if CUDA:
            assert metrics["device"] == torch.cuda.get_device_name(0)
            assert metrics["mfu"] is not None and 0 < metrics["mfu"] < 1, metrics["mfu"]
            assert metrics["peak_memory_bytes"] > 0
        # --compile auto (the default) leaves a run this short uncompiled, and says why.
        assert re.search(r"compile: off \(auto: ", log), log[-3000:]

    def test_sigterm_saves_exits_7_and_resumes_to_the_same_loss(self, tmp_path, tiny_model, corpus_dir, reference):
        out = tmp_path / "out"
        env = env_for(tiny_model, corpus_dir, out)
        code, log = interrupt_at(env, STEPS // 4)
        assert code == ExitCode.PREEMPTED, log[-3000:]
        stopped = int(re.search(r"stopping at step (\d+)", log).group(1))
        assert (out / "checkpoints" / f"checkpoint-{stopped}" / "finetune-complete.json").is_file()
        result = finetune("train", env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"checkpoint-{stopped}" in result.stderr
        resumed, uninterrupted = metrics_of(out), reference[1]
        assert resumed["global_step"] == uninterrupted["global_step"] == STEPS
        assert resumed["eval_loss"] == pytest.approx(uninterrupted["eval_loss"], **LOSS_TOLERANCE)

    def test_generate_samples_from_the_trained_model(self, reference):
        out = reference[0]
        result = finetune("generate", "--model-dir", str(out / "model"), "--prompt", "Return the",
                          "--max-new-tokens", "8")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Return" in result.stdout


class TestPrecisionAndCompile:
    """fp16's loss scaler, fused AdamW and --compile on."""

    @needs_cuda
    def test_fp16_run_keeps_a_loss_scaler(self, tmp_path, tiny_model, corpus_dir):
        out = tmp_path / "out"
        result = finetune("train", env=env_for(tiny_model, corpus_dir, out, FINETUNE_PRECISION="fp16",
                                               FINETUNE_MAX_STEPS="8"))
        assert result.returncode == 0, result.stderr[-3000:]
        metrics = metrics_of(out)
        assert metrics["precision"] == "fp16" and math.isfinite(metrics["eval_loss"])
        scaler = torch.load(out / "checkpoints" / "checkpoint-8" / "scaler.pt", weights_only=True)
        assert math.isfinite(scaler["scale"]) and scaler["scale"] > 0

    def test_fused_adamw_on_cuda(self, tmp_path, tiny_model, corpus_dir):
        from entrypoint.config.schema import TrainConfig
        from entrypoint.data import pipeline
        from entrypoint.data.options import DataOptions
        from entrypoint.train.job import build_trainer
        from entrypoint.train.model import load_model, load_tokenizer
        from entrypoint.train.plan import decide
        from entrypoint.train.preflight import preflight

        cfg = TrainConfig(model=str(tiny_model), data_dir=corpus_dir, output_dir=tmp_path / "out", block_size=32,
                          batch_size=8, grad_accum=1, max_steps=2, precision=PRECISION, report_to="none")
        plan = decide(cfg, preflight(cfg), world_size=1)
        tokenizer = load_tokenizer(cfg)
        train_ds, eval_ds, _ = pipeline.prepare(DataOptions.of(cfg), tokenizer, plan.block_size, builds=True)
        trainer, _ = build_trainer(cfg, plan, load_model(cfg), tokenizer, (train_ds, eval_ds), fresh=True)
        optimizer = trainer.create_optimizer()
        assert bool(optimizer.defaults.get("fused")) == CUDA

    @needs_cuda
    def test_compile_on_compiles_and_reports_the_compile_time(self, tmp_path, tiny_model, corpus_dir):
        out = tmp_path / "out"
        result = finetune("train", env=env_for(tiny_model, corpus_dir, out, FINETUNE_COMPILE="on",
                                               FINETUNE_MAX_STEPS="8"))
        assert result.returncode == 0, result.stderr[-3000:]
        assert "compile: on (--compile on)" in result.stderr
        assert metrics_of(out)["compile_seconds"] is not None


class TestLaunchAndMemory:
    """torchrun with NCCL and the batch-size probe."""

    def test_torchrun_world_size_one_trains_then_resumes_from_the_end(self, tmp_path, tiny_model, corpus_dir):
        """The CLI's launcher (an elastic 1:1 range, so it re-launches itself under torchrun with c10d rendezvous on
        loopback) at world size 1: NCCL on a GPU (gloo in dry mode), --batch-size auto's agreement and the
        end-of-run collectives, then a longer rerun that resumes from the last checkpoint."""
        out = tmp_path / "out"
        env = env_for(tiny_model, corpus_dir, out, FINETUNE_MAX_STEPS="12", FINETUNE_SAVE_STEPS="4",
                      FINETUNE_EVAL_STEPS="4", FINETUNE_BATCH_SIZE="auto", FINETUNE_GRAD_ACCUM="1",
                      FINETUNE_NNODES="1:1", FINETUNE_RDZV_ENDPOINT=f"127.0.0.1:{free_port()}")
        first = finetune("train", env=env)
        assert first.returncode == 0, first.stderr[-3000:]
        assert "launch: torchrun" in first.stderr
        assert metrics_of(out)["global_step"] == 12 and metrics_of(out)["world_size"] == 1
        if not CUDA:
            return  # dry mode: resuming on the CPU is test_preemption's and test_launch's; spare two cores a process
        longer = {**env, "FINETUNE_MAX_STEPS": "16", "FINETUNE_OVERWRITE": "true",
                  "FINETUNE_RDZV_ENDPOINT": f"127.0.0.1:{free_port()}"}
        second = finetune("train", env=longer)
        assert second.returncode == 0, second.stderr[-3000:]
        assert f"resume: from {out / 'checkpoints' / 'checkpoint-12'}" in second.stderr
        assert metrics_of(out)["global_step"] == 16

    @needs_cuda
    def test_batch_size_auto_probes_in_train_mode_and_never_picks_more_than_fits(self):
        from transformers import GPT2Config, GPT2LMHeadModel

        from entrypoint.train import plan

        model = GPT2LMHeadModel(GPT2Config()).eval()  # as from_pretrained leaves it
        modes: list[bool] = []
        model.transformer.h[0].register_forward_pre_hook(lambda module, args: modes.append(module.training))
        total = torch.cuda.get_device_properties(0).total_memory
        chosen = {}
        for checkpointing in (False, True):
            modes.clear()
            chosen[checkpointing] = plan.largest_fitting_batch(model, "bf16", 1024, 128, checkpointing)
            assert modes and all(modes), "the probe must run the model in train mode"
            assert not model.training, "the probe restores the model's mode"
            # The chosen batch trains: forward, backward and a fused AdamW step, within the probe's headroom.
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), fused=True)
            torch.cuda.reset_peak_memory_stats()
            ids = torch.randint(0, model.config.vocab_size, (chosen[checkpointing], 1024), device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            assert torch.cuda.max_memory_allocated() <= total
            del optimizer, ids, loss
            model.zero_grad(set_to_none=True)
            model.eval()
            torch.cuda.empty_cache()
            model.gradient_checkpointing_disable()
        assert chosen[True] >= chosen[False]
