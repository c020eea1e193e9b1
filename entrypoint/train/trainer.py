"""Trainer plus what the job adds to it: counting real tokens without a synchronisation per step, timing every
checkpoint save and marking it complete (with the run's identity and whole-run totals), handing it to the
--checkpoint-to uploader, finishing from a checkpoint at the last step, and telling a full or failing disk apart
from a bug."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerState
from transformers.trainer_utils import TrainOutput

from entrypoint import errors, fsutil, logs
from entrypoint.errors import OutputError
from entrypoint.train import checkpoints, dpo, identity
from entrypoint.train.guard import OverflowSteps
from entrypoint.train.progress import ProgressLog

log = logs.area("checkpoint")


class TokenCounter:
    """Real (non-padding) tokens, tokens that carried loss (targets) and all positions the training loop consumed,
    counted without a synchronisation per micro-batch; read only when a log line is printed. Sums that need the
    batch's values (padding, targets) stay on the device; counts a shape gives (positions, and real tokens of
    packed rows, which have no padding) stay Python integers, so no micro-batch creates a device tensor from a
    Python number (a host-to-device copy each). `before` holds the whole run's totals (every process) at the
    checkpoint this process resumed from."""

    def __init__(self):
        self.real = self.targets = None  # device tensors, summed as batches come
        self.unpadded = self.positions = 0  # Python integers from shapes
        self.before = {"train_tokens": 0, "train_positions": 0, "train_seconds": 0.0, "target_tokens": 0}

    def add(self, inputs: dict) -> None:
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        if mask is None:
            self.unpadded += ids.numel()
        else:
            real = mask.sum()
            self.real = real if self.real is None else self.real + real
        targets = targets_in(inputs["labels"])
        self.targets = targets if self.targets is None else self.targets + targets
        self.positions += ids.numel()

    def tokens(self) -> int:
        return self.unpadded + (int(self.real.item()) if self.real is not None else 0)

    def totals(self, accelerator, session_seconds: float) -> dict:
        """Whole-run totals: `before` plus this session's counts summed over every process. A collective, so every
        process calls it; the tensor reduced lives on this process's device (NCCL refuses CPU tensors)."""
        device = accelerator.device
        zero = torch.zeros((), dtype=torch.long, device=device)
        real = self.real.to(device) if self.real is not None else zero
        targets = self.targets.to(device) if self.targets is not None else zero
        shapes = torch.tensor([self.unpadded, self.positions, 0], dtype=torch.long, device=device)
        counts = torch.stack([real.long(), zero, targets.long()]) + shapes
        real, positions, targets = (int(v) for v in accelerator.reduce(counts, reduction="sum").tolist())
        return {"train_tokens": self.before["train_tokens"] + real,
                "train_positions": self.before["train_positions"] + positions,
                "train_seconds": round(self.before["train_seconds"] + session_seconds, 3),
                "target_tokens": self.before.get("target_tokens", 0) + targets}


def targets_in(labels: torch.Tensor) -> torch.Tensor:
    """Positions a causal LM's loss counts: labels other than -100, after the shift (a row's first label is never
    predicted), as Trainer counts num_items_in_batch."""
    return labels[..., 1:].ne(-100).sum()


class FinetuneTrainer(Trainer):
    """Trainer plus token counting and a completion marker on every checkpoint. `run` is the run's identity
    (identity.values), recorded in each marker."""

    def __init__(self, *args, counter: TokenCounter, run: dict | None = None, preference=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.counter = counter
        self.run = run or {}
        self.preference = preference  # dpo.Preference for preference data: the DPO loss replaces the LM loss
        self.preference_sums = None  # dpo.STATS and the pair count, summed since the last log (device tensor)
        if preference is not None:
            self.loss_is_scaled_for_ga = False  # a mean per micro-batch: Trainer divides by the accumulation
        self.uploader = None  # rank 0 with --checkpoint-to: publish.remote.Uploader, fed every complete checkpoint
        self.full_state = None  # --fsdp, rank 0: the model's full state dict, gathered by every rank to publish
        self.eval_sums = None  # (loss summed over target tokens, target tokens) while evaluating
        self.eval_targets = 0  # the target tokens the last evaluation scored, every process's together
        self.add_callback(OverflowSteps())  # fp16: a step the loss scaler skipped neither diverges nor schedules

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.counter.add(inputs)
        if self.preference is not None:
            loss, stats = self.preference.loss(model, self.accelerator.unwrap_model(model), inputs)
            self.preference_sums = stats if self.preference_sums is None else self.preference_sums + stats
            return (loss, {}) if return_outputs else loss
        if not model.training and self.eval_sums is not None:
            # The batch's own mean over its target tokens, weighted by their count in evaluation_loop.
            targets = targets_in(inputs["labels"])
            result = super().compute_loss(model, inputs, return_outputs=return_outputs)
            loss = result[0] if return_outputs else result
            weighted = torch.where(targets > 0, loss.detach().double() * targets, 0.0)  # no targets: loss is nan
            self.eval_sums += torch.stack([weighted, targets.double()]).to(self.eval_sums)
            return result
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def _prepare_inputs(self, inputs):
        """Trainer's, plus, when compiled, the batch dimension marked dynamic (and the length too for padded rows,
        whose width varies by batch): the last batch of an epoch, smaller than the rest, then reuses the compiled
        graph instead of compiling every frame again (docs/performance.md counts the recompiles)."""
        inputs = super()._prepare_inputs(inputs)
        if self.args.torch_compile:
            dims = (0, 1) if "attention_mask" in inputs else (0,)
            for value in inputs.values():
                for dim in dims:
                    if isinstance(value, torch.Tensor) and value.dim() > dim:
                        torch._dynamo.maybe_mark_dynamic(value, dim)
        return inputs

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """Trainer's loop, but the loss is the mean over every target token (labels -100 excluded), not the mean
        of per-batch means: batches holding more answer tokens weigh more, as in training. With DPO: the loss and
        rewards per pair (dpo.STATS)."""
        if self.preference is not None:
            return self._preference_evaluation(dataloader, description, prediction_loss_only, ignore_keys,
                                               metric_key_prefix)
        self.eval_sums = torch.zeros(2, dtype=torch.float64, device=self.args.device)
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
            total, targets = self.accelerator.reduce(self.eval_sums, reduction="sum").tolist()
        finally:
            self.eval_sums = None
        self.eval_targets = int(targets)
        if targets:
            output.metrics[f"{metric_key_prefix}_loss"] = total / targets
        return output

    def _preference_evaluation(self, dataloader, description, prediction_loss_only, ignore_keys, prefix):
        training_sums, self.preference_sums = self.preference_sums, None  # an evaluation inside a logging window
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, prefix)
            output.metrics.update(dpo.averages(self._reduced_preference_sums(), f"{prefix}_"))
        finally:
            self.preference_sums = training_sums
        return output

    def _reduced_preference_sums(self) -> list[float]:
        """The DPO sums since they were last read, over every process (a collective); then zero."""
        sums = self.preference_sums
        if sums is None:
            sums = torch.zeros(len(dpo.STATS) + 1, device=self.args.device)
        self.preference_sums = None
        return self.accelerator.reduce(sums.to(self.args.device).double(), reduction="sum").tolist()

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """Trainer's, plus with DPO the logging window's rewards per pair (rewards/chosen, rewards/rejected,
        rewards/margin, rewards/accuracy) beside its loss."""
        if self.preference is not None and "loss" in logs:
            found = dpo.averages(self._reduced_preference_sums())
            logs = {**logs, **{k: v for k, v in found.items() if k != "loss"}}
        super().log(logs, start_time)

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "row_lengths"):
            # The token cache knows every row's length; Trainer would otherwise read every row to learn it.
            from transformers.trainer_pt_utils import LengthGroupedSampler

            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=dataset.row_lengths().tolist())
        return super()._get_train_sampler(train_dataset)

    def _save_checkpoint(self, model, trial):
        path = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        if self.uploader is not None:  # rotation below may delete the checkpoint an upload still reads
            self.uploader.wait(f"saving {path.name}")
        start = time.perf_counter()
        try:
            super()._save_checkpoint(model, trial)
        except Exception as exc:
            # torch.save's zip writer words a full disk without an errno: then the volume itself is asked.
            reason = None if errors.storage_errno(exc) else storage_failure(path.parent)
            if not (reason or errors.storage_errno(exc)):
                raise
            shutil.rmtree(path, ignore_errors=True)  # it has no marker; removing it frees the space it took
            previous = checkpoints.latest_complete(path.parent)
            intact = f"{previous.name} is intact (--save-total-limit keeps fewer)" if previous else \
                "no checkpoint was complete yet, so the rerun starts from the beginning"
            raise (fsutil.storage_error(exc, path.parent, path.name, after=intact) or OutputError(
                f"cannot write {path.name} to {path.parent} ({reason}); free space or lower --save-total-limit, "
                f"then rerun: {intact}.")) from None
        self.accelerator.wait_for_everyone()  # every rank's RNG file is on disk before the marker says so
        progress = next((c for c in self.callback_handler.callbacks if isinstance(c, ProgressLog)), None)
        totals = self.counter.totals(self.accelerator, progress.training_seconds() if progress else 0.0)
        if self.args.should_save and path.is_dir():
            record = {"run": identity.digest(self.run), "identity": self.run,
                      "world_size": self.args.world_size, "totals": totals}
            checkpoints.mark_complete(path, time.perf_counter() - start, record)
            seconds = time.perf_counter() - start
            log.info(f"saved {path.name} in {seconds:.1f} s (size the grace period above this)",
                     checkpoint=str(path), save_seconds=seconds)
            if self.uploader is not None:
                self.uploader.submit(path)

    def resume_totals(self, checkpoint: Path) -> None:
        """Start the whole-run totals where `checkpoint` left them (a checkpoint from before totals: from zero)."""
        self.counter.before.update(checkpoints.read_marker(checkpoint).get("totals", {}))

    def last_step(self) -> int:
        """The step this run ends at, as Trainer computes it (--max-steps, or epochs over this world's batches)."""
        return self.set_initial_training_values(self.args, self.get_train_dataloader())[-1]

    def finish_from(self, checkpoint: Path) -> TrainOutput:
        """Take a checkpoint at or past the last step as the finished run: its weights (or the best checkpoint's,
        with early stopping) and its state, without the extra step Trainer.train takes when resumed there."""
        self.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
        if self.is_fsdp_enabled:
            # Sharded weights load only into the sharded model, and FSDP2 shards a model together with its
            # optimizer (accelerate refuses one without the other), as Trainer's own _prepare_for_training does.
            self.create_optimizer()
            self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
            self.model_wrapped = self.model
        self._load_from_checkpoint(str(checkpoint))
        best = self.state.best_model_checkpoint
        if self.args.load_best_model_at_end and best and Path(best).is_dir():
            self._load_best_model()
        return TrainOutput(self.state.global_step, 0.0, {"train_runtime": 0.0})


def storage_failure(directory: Path, probe_bytes: int = 1 << 16) -> str | None:
    """Why the storage under `directory` cannot take a write, or None if it can.

    torch.save reports a full disk as a RuntimeError about zip positions, so after a failed save the storage
    itself is asked: a small flushed write either works or names the real cause (ENOSPC, EROFS, EIO)."""
    return fsutil.write_problem(directory, probe_bytes)
