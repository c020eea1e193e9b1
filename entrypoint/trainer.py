"""Trainer plus what the job adds to it: counting real tokens without a synchronisation per step, timing every
checkpoint save and marking it complete, and telling a full or failing disk apart from a bug."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import Trainer

from . import checkpoints
from .errors import OutputError
from .logs import event


class TokenCounter:
    """Real (non-padding) tokens and all positions the training loop consumed, kept on the device so counting
    costs no synchronisation; read only when a log line is printed."""

    def __init__(self):
        self.real = self.positions = None

    def add(self, inputs: dict) -> None:
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        real = mask.sum() if mask is not None else torch.tensor(ids.numel(), device=ids.device)
        self.real = real if self.real is None else self.real + real
        self.positions = ids.numel() + (self.positions or 0)

    def tokens(self) -> int:
        return int(self.real.item()) if self.real is not None else 0


class FinetuneTrainer(Trainer):
    """Trainer plus token counting and a completion marker on every checkpoint."""

    def __init__(self, *args, counter: TokenCounter, **kwargs):
        super().__init__(*args, **kwargs)
        self.counter = counter

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.counter.add(inputs)
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "row_lengths"):
            # The token cache knows every row's length; Trainer would otherwise read every row to learn it.
            from transformers.trainer_pt_utils import LengthGroupedSampler

            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=dataset.row_lengths().tolist())
        return super()._get_train_sampler(train_dataset)

    def _save_checkpoint(self, model, trial):
        start = time.perf_counter()
        path = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
        except Exception as exc:
            reason = storage_failure(path.parent)
            if not (reason or isinstance(exc, OSError)):
                raise
            shutil.rmtree(path, ignore_errors=True)  # it has no marker; removing it frees the space it took
            reason = reason or exc.strerror or str(exc)
            raise OutputError(f"cannot save {path.name} to {path.parent} ({reason}); free space or lower "
                              "--save-total-limit, then rerun: the previous checkpoint is intact.") from None
        self.accelerator.wait_for_everyone()  # every rank's RNG file is on disk before the marker says so
        if self.args.should_save and path.is_dir():
            checkpoints.mark_complete(path, time.perf_counter() - start)
            seconds = time.perf_counter() - start
            event(f"checkpoint: saved {path.name} in {seconds:.1f} s (size the grace period above this)",
                  checkpoint=str(path), save_seconds=seconds)


def storage_failure(directory: Path, probe_bytes: int = 1 << 16) -> str | None:
    """Why the storage under `directory` cannot take a write, or None if it can.

    torch.save reports a full disk as a RuntimeError about zip positions, so after a failed save the storage
    itself is asked: a small flushed write either works or names the real cause (ENOSPC, EROFS, EIO)."""
    probe = directory / f".probe-{os.getpid()}"
    try:
        with probe.open("wb") as f:
            f.write(b"\0" * probe_bytes)
            f.flush()
            os.fsync(f.fileno())
        return None
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
