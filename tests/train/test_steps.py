"""What a training step costs beyond its math, proven on CPU with the real Trainer: no device tensor made from a
Python number per micro-batch, persistent loader workers and non-blocking copies, no recompiles at an epoch's end
or an evaluation when compiled, and fp16 steps the loss scaler skipped neither diverging nor moving the schedule."""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import sys
from pathlib import Path

import pytest
import torch

from entrypoint.config.schema import TrainConfig
from entrypoint.data import pipeline
from entrypoint.data.options import DataOptions
from entrypoint.train.job import build_trainer, training_arguments
from entrypoint.train.model import load_model, load_tokenizer
from entrypoint.train.plan import decide
from entrypoint.train.preflight import preflight

OURS = str(Path(__file__).resolve().parents[2] / "entrypoint")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, corpus_dir) -> Path:
    """About 3 kB of the corpus: 53 packed or 60 padded rows of 32 tokens, so an epoch of batches of 8 ends on a
    smaller batch, and 16 evaluation rows."""
    directory = tmp_path_factory.mktemp("small")
    text = (corpus_dir / "train.txt").read_bytes()[:3100]
    (directory / "train.txt").write_bytes(text[: text.rindex(b"\n") + 1])
    valid = (corpus_dir / "valid.txt").read_bytes()[:1200]
    (directory / "valid.txt").write_bytes(valid[: valid.rindex(b"\n") + 1])
    return directory


def trainer_for(tmp_path, tiny_model, data_dir, **options):
    options = {"block_size": 32, "batch_size": 8, "grad_accum": 1, "report_to": "none", "save_steps": 1000,
               "logging_steps": 1, **options}
    cfg = TrainConfig(model=str(tiny_model), data_dir=data_dir, output_dir=tmp_path / "out", **options)
    plan = decide(cfg, preflight(cfg), world_size=1)
    tokenizer = load_tokenizer(cfg)
    train_ds, eval_ds, _ = pipeline.prepare(DataOptions.of(cfg), tokenizer, plan.block_size, builds=True)
    trainer, _ = build_trainer(cfg, plan, load_model(cfg), tokenizer, (train_ds, eval_ds), fresh=False)
    return trainer


def test_no_micro_batch_makes_a_device_tensor_from_a_python_number(tmp_path, tiny_model, corpus_dir, monkeypatch):
    """On a GPU, torch.tensor(n, device=cuda) is a host-to-device copy the host waits for; packed rows (no
    attention mask) used to make one per micro-batch to count their tokens."""
    made = []

    def counting(factory):
        def wrapper(value, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(OURS) and isinstance(value, numbers.Number):
                made.append((factory.__name__, caller))
            return factory(value, *args, **kwargs)
        return wrapper

    trainer = trainer_for(tmp_path, tiny_model, corpus_dir, max_steps=6, grad_accum=2)
    monkeypatch.setattr(torch, "tensor", counting(torch.tensor))
    monkeypatch.setattr(torch, "as_tensor", counting(torch.as_tensor))
    trainer.train()
    monkeypatch.undo()
    assert made == []
    assert trainer.counter.tokens() == 6 * 2 * 8 * 32  # 12 micro-batches of 8 packed rows of 32 tokens
    assert trainer.counter.totals(trainer.accelerator, 1.0)["train_positions"] == 6 * 2 * 8 * 32


def test_loader_workers_persist_and_gpu_copies_do_not_block(tmp_path, tiny_model, corpus_dir):
    cfg = TrainConfig(model=str(tiny_model), data_dir=corpus_dir, output_dir=tmp_path / "out", report_to="none")
    plan = decide(cfg, preflight(cfg), world_size=1)
    on_cpu = training_arguments(cfg, plan, fresh=True, quiet=True)
    assert not on_cpu.dataloader_persistent_workers and not on_cpu.accelerator_config.non_blocking
    on_gpu = training_arguments(cfg, dataclasses.replace(plan, device="NVIDIA H100 80GB HBM3", dataloader_workers=2),
                                fresh=True, quiet=True)
    assert on_gpu.dataloader_persistent_workers and on_gpu.dataloader_pin_memory
    assert on_gpu.accelerator_config.non_blocking


@pytest.fixture
def recompiles():
    """Dynamo's recompile messages (what TORCH_LOGS=recompiles prints), collected."""
    torch._dynamo.reset()
    torch._logging.set_logs(recompiles=True)
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("torch._dynamo.guards.__recompiles")
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)
    torch._logging.set_logs()
    torch._dynamo.reset()


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_compiled_training_does_not_recompile_at_an_epochs_end_or_an_evaluation(tmp_path, tiny_model, small_data,
                                                                                   recompiles, packing):
    """Two epochs, each ending on a smaller batch, with evaluations of other shapes in between. Dynamo's eager
    backend keeps the test fast: recompiles are dynamo's guards failing, whatever backend compiles the graph."""
    from accelerate.utils import DynamoBackend

    trainer = trainer_for(tmp_path, tiny_model, small_data, epochs=2, eval_steps=4, compile="on", packing=packing)
    trainer.accelerator.state.dynamo_plugin.backend = DynamoBackend.EAGER
    trainer.train()
    rows = len(trainer.train_dataset)
    assert rows % 8 > 1  # the epoch ends on a smaller batch (a batch of 1 would recompile: dynamo specializes 1)
    assert trainer.state.epoch == 2 and trainer.state.global_step == 2 * -(-rows // 8)
    assert len([h for h in trainer.state.log_history if "eval_loss" in h]) >= 3
    assert [m for m in recompiles if "Recompiling function" in m] == []


def test_fp16_steps_the_scaler_skipped_are_not_divergence_and_do_not_move_the_schedule(tmp_path, tiny_model,
                                                                                       corpus_dir):
    """The fused AdamW takes the scaler's found-inf flag into its own step, so accelerate never sees a skip. On CPU
    accelerate makes no scaler for fp16, so the test gives the Trainer a real CPU GradScaler and unscales the
    gradients before clipping as accelerate does for fp16 on a GPU; steps 2 to 4 overflow (an infinite gradient,
    as an fp16 overflow leaves), and the scaler finds it, skips the step and halves its scale."""
    trainer = trainer_for(tmp_path, tiny_model, corpus_dir, max_steps=8, warmup_steps=0, lr_scheduler="linear")
    trainer.args.optim = "adamw_torch_fused"
    accelerator = trainer.accelerator
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    overflowing, steps = {2, 3, 4}, iter(range(1, 100))

    def unscale_gradients(optimizer=None):  # accelerate's fp16 branch, which it takes only with native AMP
        overflow = next(steps) in overflowing
        for wrapped in accelerator._optimizers:
            if overflow:
                wrapped.optimizer.param_groups[0]["params"][0].grad.view(-1)[0] = math.inf
            accelerator.scaler.unscale_(wrapped.optimizer)

    accelerator.unscale_gradients = unscale_gradients
    from entrypoint.train.guard import DivergenceGuard

    guard = DivergenceGuard()
    trainer.add_callback(guard)
    trainer.train()
    assert trainer.optimizer.optimizer.defaults["fused"]
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert [not math.isfinite(n) for n in norms] == [i in overflowing for i in range(1, 9)], norms
    assert guard.problem is None and trainer.state.global_step == 8  # three bad windows in a row were exit 8
    assert trainer.lr_scheduler.last_epoch == 8 - 3
    assert accelerator.scaler.get_scale() == 2.0**10 / 2**3
