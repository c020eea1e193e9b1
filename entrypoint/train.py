"""The training job: resolve -> check -> data -> model -> Trainer -> publish."""

from __future__ import annotations

import hashlib
import json
import logging
import resource
from pathlib import Path

import torch
from transformers import EarlyStoppingCallback, PrinterCallback, TrainingArguments

from . import checkpoints, data, efficiency, export, formats, guard, identity, outputs, speed
from .checks import Plan, preflight
from .collate import PackedCollator, PaddingCollator
from .config import TrainConfig
from .errors import ConfigError, Diverged, OutOfMemory, Preempted
from .launch import SINGLE_PROCESS, Dist
from .lease import Lease
from .logs import ProgressLog, event, is_tty, perplexity
from .model import attention_for, load_model, load_tokenizer, save_published
from .options import as_dict
from .preemption import StopEvaluation, StopOnSignal, StopRequest
from .trainer import FinetuneTrainer, TokenCounter

log = logging.getLogger(__name__)


def run(cfg: TrainConfig, sources: dict[str, str], dist: Dist = SINGLE_PROCESS) -> dict:
    """Train and publish; returns the metrics. Raises FinetuneError subclasses for user-facing failures.

    In a multi-process run every rank calls this; only rank 0 holds the output's lease and writes status,
    metrics and the model."""
    stop = StopRequest().install()  # first: a signal at any point from here on exits PREEMPTED, never half-done
    plan = preflight(cfg)
    if not dist.is_main:
        return _run(cfg, sources, dist, plan, stop, None)
    with Lease({"--output-dir": cfg.output_dir, "--checkpoint-dir": cfg.model_checkpoint_dir}, stop) as lease:
        return _run(cfg, sources, dist, plan, stop, lease)


def _run(cfg: TrainConfig, sources: dict[str, str], dist: Dist, plan: Plan, stop: StopRequest,
         lease: Lease | None) -> dict:
    if already_published(cfg):
        if dist.is_main:  # a rerun after a failed export (exit 10) exports without retraining
            export.export_published(cfg.output_dir, cfg.export_to)
        return outputs.read_json(cfg.output_dir / "metrics.json") or {}
    if dist.is_main:
        outputs.write_status(cfg.output_dir, "running")
        outputs.write_config(cfg.output_dir, as_dict(cfg), sources)
    event(f"plan: device {plan.device}, precision {plan.precision}, block size {plan.block_size}, "
          f"world size {dist.world_size}", device=plan.device, precision=plan.precision,
          block_size=plan.block_size, world_size=dist.world_size)

    with stop.interruptible("while loading the tokenizer"):
        tokenizer = load_tokenizer(cfg)
    train_ds, eval_ds, stats = data.prepare(cfg, tokenizer, plan.block_size, builds=dist.builds_cache, stop=stop)
    answers_only = stats.data_format != "text" and not cfg.train_on_prompt
    event(f"data: {stats.data_format} data, documents {'' if stats.isolated else 'not '}isolated"
          f"{', loss on completions and assistant turns only' if answers_only else ''}",
          data_format=stats.data_format, isolate_documents=stats.isolated)
    if stats.isolated and (problem := formats.isolation_problem(plan.model_config.model_type)):
        raise ConfigError(problem)
    run_identity = identity.values(cfg, plan.block_size, stats.fingerprint)
    resume = checkpoints.choose(cfg, run_identity, dist.world_size)
    with stop.interruptible("during model loading"):
        event(f"model: loading {cfg.model}")
        model = load_model(cfg, attention_for(stats.isolated, plan.precision))
    stop.raise_if_requested("before training started")
    trainer, progress = build_trainer(cfg, plan, model, tokenizer, train_ds, eval_ds, fresh=resume is None)
    trainer.run = run_identity
    trainer.add_callback(StopOnSignal(stop))
    trainer.add_callback(StopEvaluation(stop))  # after StopOnSignal: it reads that callback's decision
    divergence = guard.DivergenceGuard()
    trainer.add_callback(divergence)
    try:
        result = train_or_finish(cfg, trainer, progress, resume, dist)
        if divergence.problem:
            raise Diverged(divergence.problem)
        if stop.requested:
            saved = cfg.model_checkpoint_dir / f"checkpoint-{trainer.state.global_step}"
            raise Preempted(f"stopped by {stop.signal_name} at step {trainer.state.global_step} of "
                            f"{trainer.state.max_steps}; {saved} is complete; rerun the same command to resume.")
        final = final_evaluation(trainer, progress)
    except torch.OutOfMemoryError:
        raise OutOfMemory(f"out of GPU memory at --batch-size {cfg.batch_size}, --block-size {plan.block_size}; "
                          "lower --batch-size (raise --grad-accum to keep the effective batch) or add "
                          "--gradient-checkpointing.") from None

    metrics = summarize(cfg, plan, trainer, result, final, progress, stats)
    if not dist.is_main:
        return metrics
    try:
        guard.check_final(metrics, cfg.publish_worse)
    except Diverged:
        outputs.plot_losses(cfg.output_dir, progress.history)  # the curve shows where it went wrong
        raise
    card = outputs.model_card(cfg.model, stats.fingerprint, as_dict(cfg), metrics)

    def save(directory: Path) -> None:
        event(f"publish: writing the model to {directory}")
        save_published(trainer.model, tokenizer, directory)

    lease.check()
    outputs.publish_model(cfg.output_dir, save, card, marker={"config_hash": config_hash(cfg)},
                          interruptible=lambda: stop.interruptible("while publishing the model (nothing published)"))
    outputs.write_metrics(cfg.output_dir, metrics)
    outputs.plot_losses(cfg.output_dir, progress.history)
    outputs.write_history(cfg.output_dir, progress.history)
    outputs.write_status(cfg.output_dir, "succeeded", 0, f"model published at {cfg.output_dir / outputs.MODEL_DIR}")
    export.export_published(cfg.output_dir, cfg.export_to)
    return metrics


def train_or_finish(cfg: TrainConfig, trainer, progress: ProgressLog, resume: Path | None, dist: Dist):
    """Train from `resume` (or from the base model), or take a checkpoint already at the last step as finished.

    A fresh start first moves any checkpoints already in --checkpoint-dir aside: one rank, after every rank has
    chosen, so none reads a directory in mid-move."""
    if resume is None:
        trainer.accelerator.wait_for_everyone()
        if dist.is_main:
            checkpoints.set_aside(cfg.model_checkpoint_dir)
        trainer.accelerator.wait_for_everyone()
        return trainer.train()
    trainer.resume_totals(resume)
    step, last = checkpoints.step_of(resume), trainer.last_step()
    if step < last:
        return trainer.train(resume_from_checkpoint=str(resume))
    event(f"resume: {resume.name} is at step {step}, the last is {last}: publishing it without training",
          step=step, max_steps=last)
    result = trainer.finish_from(resume)
    progress.restore(trainer.state)
    return result


def final_evaluation(trainer, progress: ProgressLog) -> dict:
    """The last evaluation when it scored the model being published; otherwise evaluate now."""
    last = next((h for h in reversed(progress.history) if "eval_loss" in h), None)
    best_loaded = trainer.args.load_best_model_at_end
    if last and last["step"] == trainer.state.global_step and not best_loaded:
        return last
    return trainer.evaluate()


def config_hash(cfg: TrainConfig) -> str:
    relevant = {k: v for k, v in as_dict(cfg, redact=True).items() if k not in identity.REPORTING}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def already_published(cfg: TrainConfig) -> bool:
    """A retried Job after success does nothing; a different configuration over a model needs --overwrite."""
    marker = outputs.read_json(cfg.output_dir / outputs.MODEL_DIR / outputs.COMPLETE)
    if not (cfg.output_dir / outputs.MODEL_DIR).exists():
        return False
    if marker and marker.get("config_hash") == config_hash(cfg) and not cfg.overwrite:
        event(f"done already: {cfg.output_dir / outputs.MODEL_DIR} was published by this configuration; "
              "nothing to do (use --overwrite to train again)")
        return True
    if not cfg.overwrite:
        raise ConfigError(f"{cfg.output_dir / outputs.MODEL_DIR} holds a model from a different configuration; "
                          "use another --output-dir, or --overwrite to replace it.")
    return False


def build_trainer(cfg: TrainConfig, plan: Plan, model, tokenizer, train_ds, eval_ds, fresh: bool):
    """`fresh` runs also evaluate before the first step, so metrics show what training gained."""
    cuda = plan.device != "cpu"
    eval_steps = cfg.eval_steps
    if cfg.early_stopping_patience and not eval_steps:
        eval_steps = cfg.save_steps  # the best model must have a checkpoint to come back to
    report = [r.strip() for r in cfg.report_to.split(",") if r.strip() not in ("none", "tensorboard", "")]
    quiet = not is_tty() or cfg.log_format == "json"
    batch, accumulation = speed.batch_and_accumulation(cfg, plan, model)
    compiled = speed.should_compile(cfg, plan, model, len(train_ds), batch * accumulation)
    args = TrainingArguments(
        output_dir=str(cfg.model_checkpoint_dir),
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        use_cpu=not cuda,  # also what makes accelerate use gloo for several CPU processes
        eval_strategy="steps" if eval_steps else "epoch",
        eval_steps=eval_steps,
        eval_on_start=fresh,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=bool(cfg.early_stopping_patience),
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        logging_steps=cfg.logging_steps,
        # The divergence guard must see a non-finite loss; the filter would also cost a host sync per micro-batch.
        logging_nan_inf_filter=False,
        seed=cfg.seed,
        activation_checkpointing=cfg.gradient_checkpointing,
        report_to=report or "none",
        disable_tqdm=quiet,
        dataloader_num_workers=2 if cuda else 0,
        dataloader_pin_memory=cuda,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # GPT-2 uses every parameter; the search costs a pass per step
        train_sampling_strategy="random" if cfg.packing else "group_by_length",  # less padding per batch
        torch_compile=compiled,
        tf32=True if speed.tf32_supported() else None,
    )
    counter = TokenCounter()
    progress = ProgressLog(counter, show_steps=quiet)
    callbacks = [progress, speed.StepTimer(compiled)]
    if "tensorboard" in cfg.report_to:
        from transformers.integrations import TensorBoardCallback

        tensorboard = TensorBoardCallback()
        tensorboard.logging_dir = str(cfg.runs_dir)  # it re-opens its writer after training, for the last eval
        callbacks.append(tensorboard)
    if cfg.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    collator = PackedCollator() if cfg.packing else PaddingCollator(tokenizer.pad_token_id, plan.block_size)
    # processing_class stays None: Trainer would otherwise treat pad (== EOS) ids as padding in its own counts.
    trainer = FinetuneTrainer(model=model, args=args, data_collator=collator, train_dataset=train_ds,
                              eval_dataset=eval_ds, callbacks=callbacks, counter=counter)
    trainer.remove_callback(PrinterCallback)  # it prints raw dicts; ProgressLog writes the readable lines
    return trainer, progress


def summarize(cfg, plan: Plan, trainer, result, final: dict, progress: ProgressLog, stats) -> dict:
    """metrics.json: the whole run from step 0, whatever the restarts (totals and history come from the checkpoint
    resumed, plus this session)."""
    counter: TokenCounter = trainer.counter
    session = result.metrics.get("train_runtime", 0.0) - progress.eval_seconds  # it includes in-loop evaluations
    totals = counter.totals(trainer.accelerator, max(session, 0.0))
    real, positions, training = totals["train_tokens"], totals["train_positions"], totals["train_seconds"]
    eval_seconds = progress.eval_seconds_before + progress.eval_seconds
    evals = [h for h in progress.history if "eval_loss" in h]
    initial = [h["eval_loss"] for h in evals if h["step"] == 0]
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {
        "eval_loss": final["eval_loss"],
        "perplexity": perplexity(final["eval_loss"]),
        "best_eval_loss": min([h["eval_loss"] for h in evals] or [final["eval_loss"]]),
        **({"initial_eval_loss": initial[0]} if initial else {}),
        "train_loss": whole_run_train_loss(progress.history, progress.first_step, result.training_loss,
                                           trainer.state.global_step),
        "global_step": trainer.state.global_step,
        "epoch": trainer.state.epoch,
        "train_runtime": training + eval_seconds,
        "train_tokens": real,
        "target_tokens": totals["target_tokens"],
        "data_format": stats.data_format,
        "isolate_documents": stats.isolated,
        "train_on_prompt": cfg.train_on_prompt,
        "useful_tokens_per_second": real / training if training > 0 else 0.0,
        "eval_seconds": eval_seconds,
        "padding_fraction": 1 - real / positions if positions else 0.0,
        "mfu": speed.mfu(trainer, plan, real),
        "step_seconds": speed.step_seconds(trainer),
        "step_seconds_p90": speed.step_seconds(trainer, 0.9),
        "flops_per_token": efficiency.flops_per_token(trainer.model, plan.block_size),
        "compile_seconds": speed.compile_seconds(trainer),
        "world_size": trainer.args.world_size,
        "device": plan.device,
        "precision": plan.precision,
        "peak_memory_bytes": peak,
        "block_size": plan.block_size,
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "data_prepare_seconds": stats.prepare_seconds,
        "data_cache_hit": stats.cache_hit,
        "train_documents": stats.train_documents,
        "dropped_tokens": stats.dropped_tokens,
    }


def whole_run_train_loss(history: list[dict], first_step: int, session_loss: float, global_step: int) -> float:
    """Mean training loss per step over the whole run: the logged windows before the resumed step, weighted by
    their length, and this session's own mean over its steps."""
    if first_step == 0:
        return session_loss
    total = steps = last = 0
    for h in history:
        if "loss" in h and last < h["step"] <= first_step:
            total, steps, last = total + h["loss"] * (h["step"] - last), steps + h["step"] - last, h["step"]
    session = global_step - first_step
    total, steps = total + session_loss * session, steps + session
    return total / steps if steps else session_loss
