"""The training job: check -> plan -> data -> model -> Trainer -> train -> publish. `run` is the entry point and
`_run` reads as the job's table of contents."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from transformers import EarlyStoppingCallback, PrinterCallback, TrainingArguments
from transformers.integrations import KubeflowCallback

from entrypoint import logs
from entrypoint.config.options import as_dict
from entrypoint.config.schema import TrainConfig
from entrypoint.data import formats, pipeline
from entrypoint.data.collate import PackedCollator, PaddingCollator, PairCollator
from entrypoint.data.options import DataOptions
from entrypoint.data.tokendataset import PairDataset
from entrypoint.errors import ConfigError, Diverged, OutOfMemory, Preempted
from entrypoint.fsutil import COMPLETE
from entrypoint.logs import is_tty
from entrypoint.publish import export, outputs
from entrypoint.publish.lease import Lease
from entrypoint.publish.remote import RemoteCheckpoints
from entrypoint.runtime.launch import COLLECTIVE_TIMEOUT_S, SINGLE_PROCESS, Dist
from entrypoint.train import checkpoints, dpo, fsdp, guard, identity, metrics, mfu, samples
from entrypoint.train.kubeflow import Reporter
from entrypoint.train.metrics import summarize
from entrypoint.train.model import attention_for, load_model, load_tokenizer, save_published, varlen_attention
from entrypoint.train.plan import RunPlan, check_pairs_memory, decide, out_of_memory
from entrypoint.train.preemption import StopEvaluation, StopOnSignal, StopRequest
from entrypoint.train.preflight import Checked, check_compile, context_length, preflight, vocabulary
from entrypoint.train.progress import ProgressLog
from entrypoint.train.trainer import FinetuneTrainer, TokenCounter

model_log, data_log = logs.area("model"), logs.area("data")
resume_log, publish_log = logs.area("resume"), logs.area("publish")


@dataclass(frozen=True)
class Context:
    """What the steps after the data share: the configuration, the run plan, this process, the stop request and
    the data's statistics, and the TrainJob status reporter (off on every rank but 0, or outside Kubeflow)."""

    cfg: TrainConfig
    plan: RunPlan
    dist: Dist
    stop: StopRequest
    stats: pipeline.DataStats
    report: Reporter = field(default_factory=Reporter.off)


@dataclass(frozen=True)
class Held:
    """What rank 0 holds for the run: the lease on its directories, with --checkpoint-to the remote store (its
    lease and uploader), and the TrainJob status reporter."""

    lease: Lease
    remote: RemoteCheckpoints | None
    report: Reporter = field(default_factory=Reporter.off)


def run(cfg: TrainConfig, sources: dict[str, str], dist: Dist = SINGLE_PROCESS,
        environ: Mapping[str, str] | None = None, blocked_exit: Callable[[str], None] | None = None) -> dict:
    """Train and publish; returns the metrics. Raises FinetuneError subclasses for user-facing failures.

    In a multi-process run every rank calls this; only rank 0 holds the output's lease and writes status,
    metrics and the model. `environ` is the process's environment, which the CLI passes (the driver check reads
    NVIDIA_VISIBLE_DEVICES from it). `blocked_exit` reports a stop and leaves the process, from another thread, for
    a rank signalled while it waits on its peers before training (StopRequest.begin_peer_wait)."""
    # First: a signal at any point from here on exits PREEMPTED, never half-done.
    stop = StopRequest(blocked_exit if dist.world_size > 1 else None).install()
    checked = preflight(cfg, environ=environ)
    # No destroy_process_group, on any path: with DDP still alive it would leave the process group's last reference
    # to DDP's Reducer, whose deallocation can deadlock in gloo's destructor. A torchrun worker leaves with os._exit
    # after its last write instead (cli.running.leave explains the mechanism); the kernel closes its connections, and
    # no interpreter finalization runs, where gloo's threads could abort the process (SIGABRT).
    if not dist.is_main:
        return _run(cfg, sources, dist, checked, stop, None)
    remote = RemoteCheckpoints(cfg.checkpoint_to, checkpoints.MARKER, cfg.save_total_limit, stop,
                               attempts=cfg.store_retries + 1) \
        if cfg.checkpoint_to else None
    report = Reporter.of(environ, dist.rank)
    try:
        with Lease({"--output-dir": cfg.output_dir, "--checkpoint-dir": cfg.model_checkpoint_dir}, stop) as lease, \
                remote or contextlib.nullcontext():
            results = _run(cfg, sources, dist, checked, stop, Held(lease, remote, report))
        report.succeeded()
        return results
    except BaseException as exc:  # preempted, diverged, failed: never reported as done
        report.ended_early(exc)
        raise
    finally:
        report.close()


def _run(cfg: TrainConfig, sources: dict[str, str], dist: Dist, checked: Checked, stop: StopRequest,
         held: Held | None) -> dict:
    """The job's table of contents: plan -> data -> model -> Trainer -> train -> publish."""
    if already_published(cfg):
        if dist.is_main:  # a rerun after a failed export (exit 10) exports without retraining
            export.export_published(cfg.output_dir, cfg.export_to, cfg.store_retries)
        return outputs.read_json(cfg.output_dir / "metrics.json") or {}
    if dist.is_main:
        outputs.write_status(cfg.output_dir, "running")
        outputs.write_config(cfg.output_dir, as_dict(cfg), sources)
    stop.begin_peer_wait()  # the GPU batch probe agrees on a size across ranks
    with stop.interruptible("while planning the run"):
        plan = decide(cfg, checked, dist.world_size)
    stop.end_peer_wait()
    plan.log()
    check_compile(plan, checked)
    with stop.interruptible("while loading the tokenizer"):
        tokenizer = load_tokenizer(cfg)
    sampler = samples.for_run(cfg, tokenizer, context_length(checked.model_config))  # None without --sample-prompts
    data = DataOptions.of(cfg, preprocessing_workers=plan.preprocessing_workers,
                          vocab_size=vocabulary(checked.model_config))
    report = held.report if held else Reporter.off()
    report.phase("preparing data")
    train_ds, eval_ds, stats = pipeline.prepare(data, tokenizer, plan.block_size, builds=dist.builds_cache, stop=stop)
    report.phase("loading model", data_prepare_seconds=f"{stats.prepare_seconds:.1f}")
    stop.begin_peer_wait()  # until training starts: process group start-up and barriers wait on every rank
    log_data(stats, cfg, plan)
    if isinstance(train_ds, PairDataset):
        check_pairs_memory(plan)  # DPO's rows and reference, now that the data says so: before the model loads
    run_identity = identity.values(cfg, plan.block_size, stats.fingerprint)
    if held and held.remote and dist.world_size == 1:  # several processes: each node's launcher fetched it
        checkpoints.fetch(cfg, held.remote)
    resume = checkpoints.choose(cfg, run_identity, dist.world_size)
    with stop.interruptible("during model loading"):
        model_log.info(f"loading {cfg.model}")
        model = load_model(cfg, attention_for(stats.isolated, plan.precision), plan.precision)
    stop.raise_if_requested("before training started")
    context = Context(cfg, plan, dist, stop, stats, report)
    trainer, progress = build_trainer(cfg, plan, model, tokenizer, (train_ds, eval_ds), fresh=resume is None)
    if sampler:
        trainer.add_callback(sampler)
    trainer.run = run_identity
    if held and held.remote:
        trainer.uploader = held.remote.uploads
        if resume is not None:
            trainer.uploader.ensure(resume)  # one a store outage kept local goes up before training on
    results = summarize(train(context, trainer, progress, resume))
    trainer.full_state = fsdp.gathered_state(trainer)  # --fsdp: a collective, so every rank, before rank 0 publishes
    if dist.is_main:
        report.phase("publishing")
        publish(context, trainer, tokenizer, progress, results, held.lease)
    return results


def log_data(stats, cfg: TrainConfig, plan: RunPlan) -> None:
    """One line on what the data is and how the loss treats it; refuse isolation the architecture cannot do."""
    answers_only = stats.data_format != "text" and not cfg.train_on_prompt
    loss = ', loss on completions and assistant turns only' if answers_only else ''
    if stats.data_format == "preference":
        loss = f", DPO (beta {cfg.dpo_beta:g}) on the chosen and rejected answers"
    data_log.info(f"{stats.data_format} data, documents {'' if stats.isolated else 'not '}isolated{loss}",
                  data_format=stats.data_format, isolate_documents=stats.isolated)
    if stats.isolated and (problem := formats.isolation_problem(plan.model_config.model_type)):
        raise ConfigError(problem)


def train(context: Context, trainer, progress: ProgressLog, resume: Path | None) -> metrics.RunRecord:
    """Train (or finish from a checkpoint at the last step) and evaluate the model to publish; a signal, a
    divergence or a full GPU ends it with the matching error."""
    cfg, plan, dist, stop = context.cfg, context.plan, context.dist, context.stop
    trainer.add_callback(StopOnSignal(stop))
    trainer.add_callback(StopEvaluation(stop))  # after StopOnSignal: it reads that callback's decision
    divergence = guard.DivergenceGuard()
    trainer.add_callback(divergence)
    if context.report.active:
        timer = next(c for c in trainer.callback_handler.callbacks if isinstance(c, metrics.StepTimer))
        flops = mfu.flops_per_token(trainer.model, plan.block_size)
        trainer.add_callback(context.report.watch(progress, timer, divergence, plan, flops))
    try:
        result = train_or_finish(cfg, trainer, progress, resume, dist)
        if divergence.problem:
            raise Diverged(divergence.problem)
        if stop.requested:
            saved = cfg.model_checkpoint_dir / f"checkpoint-{trainer.state.global_step}"
            remote = f"; {trainer.uploader.finish_on_stop(saved)}" if trainer.uploader else ""
            raise Preempted(f"stopped by {stop.signal_name} at step {trainer.state.global_step} of "
                            f"{trainer.state.max_steps}; {saved} is complete{remote}; rerun the same command to "
                            "resume.")
        final = final_evaluation(trainer, progress)
    except RuntimeError as exc:  # torch.OutOfMemoryError, or a cuBLAS/cuDNN workspace that could not be allocated
        if not out_of_memory(exc):
            raise
        raise OutOfMemory(f"out of GPU memory at --batch-size {cfg.batch_size}, --block-size {plan.block_size}; "
                          "lower --batch-size (raise --grad-accum to keep the effective batch) or add "
                          "--gradient-checkpointing.") from None
    return record(context, trainer, result, final, progress)


def publish(context: Context, trainer, tokenizer, progress: ProgressLog, results: dict, lease: Lease) -> None:
    """Rank 0: refuse a diverged result, then publish the model, metrics, plot, history and status, and export."""
    cfg, stats, stop = context.cfg, context.stats, context.stop
    try:
        guard.check_final(results, cfg.publish_worse)
    except Diverged:
        outputs.plot_losses(cfg.output_dir, progress.history)  # the curve shows where it went wrong
        raise
    card = outputs.model_card(cfg.model, stats.fingerprint, as_dict(cfg), results, outputs.read_samples(cfg.output_dir))
    if trainer.uploader is not None:
        trainer.uploader.finish()  # the last checkpoint is in the store before the model is published

    def save(directory: Path) -> None:
        publish_log.info(f"writing the model to {directory}")
        save_published(trainer.model, tokenizer, directory, trainer.full_state)

    lease.check()
    # The outputs before the model: a full disk while writing them leaves nothing published, so the rerun (which
    # takes a published model as done) writes them again.
    outputs.write_metrics(cfg.output_dir, results)
    outputs.plot_losses(cfg.output_dir, progress.history)
    outputs.write_history(cfg.output_dir, progress.history)
    outputs.publish_model(cfg.output_dir, save, card, marker={"config_hash": config_hash(cfg)},
                          interruptible=lambda: stop.interruptible("while publishing the model (nothing published)"))
    outputs.write_status(cfg.output_dir, "succeeded", 0, f"model published at {cfg.output_dir / outputs.MODEL_DIR}")
    export.export_published(cfg.output_dir, cfg.export_to, cfg.store_retries)


def train_or_finish(cfg: TrainConfig, trainer, progress: ProgressLog, resume: Path | None, dist: Dist):
    """Train from `resume` (or from the base model), or take a checkpoint already at the last step as finished.

    A fresh start first moves any checkpoints already in --checkpoint-dir aside: one rank, after every rank has
    chosen, so none reads a directory in mid-move."""
    if resume is None:
        trainer.accelerator.wait_for_everyone()
        if dist.is_main:
            checkpoints.set_aside(cfg.model_checkpoint_dir)
            if trainer.uploader is not None:
                trainer.uploader.remote.set_aside()
        trainer.accelerator.wait_for_everyone()
        return trainer.train()
    trainer.resume_totals(resume)
    step, last = checkpoints.step_of(resume), trainer.last_step()
    if step < last:
        return trainer.train(resume_from_checkpoint=str(resume))
    resume_log.info(f"{resume.name} is at step {step}, the last is {last}: publishing it without training",
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
    marker = outputs.read_json(cfg.output_dir / outputs.MODEL_DIR / COMPLETE)
    if not (cfg.output_dir / outputs.MODEL_DIR).exists():
        return False
    if marker and marker.get("config_hash") == config_hash(cfg) and not cfg.overwrite:
        publish_log.info(f"done already, {cfg.output_dir / outputs.MODEL_DIR} was published by this configuration; "
                         "nothing to do (use --overwrite to train again)")
        return True
    if not cfg.overwrite:
        raise ConfigError(f"{cfg.output_dir / outputs.MODEL_DIR} holds a model from a different configuration; "
                          "use another --output-dir, or --overwrite to replace it.")
    return False


def build_trainer(cfg: TrainConfig, plan: RunPlan, model, tokenizer, datasets: tuple, fresh: bool):
    """The Trainer the plan describes, with the job's callbacks, on `datasets` (training, evaluation). `fresh` runs
    also evaluate before the first step, so metrics show what training gained."""
    train_ds, eval_ds = datasets
    quiet = not is_tty() or cfg.log_format == "json"
    counter = TokenCounter()
    progress = ProgressLog(counter, show_steps=quiet)
    callbacks = [progress, metrics.StepTimer(plan.compile)]
    if "tensorboard" in cfg.report_to:
        from transformers.integrations import TensorBoardCallback

        tensorboard = TensorBoardCallback()
        tensorboard.logging_dir = str(cfg.runs_dir)  # it re-opens its writer after training, for the last eval
        callbacks.append(tensorboard)
    if cfg.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    pairs = isinstance(train_ds, PairDataset)  # preference records: DPO
    collator = PackedCollator(varlen=varlen_attention(model)) if cfg.packing and not pairs \
        else PaddingCollator(tokenizer.pad_token_id, plan.block_size)
    collator = PairCollator(collator) if pairs else collator
    preference = dpo.Preference.for_model(model, cfg.dpo_beta) if pairs else None
    sharding = fsdp.training_arguments(fsdp.layer_classes(model), cfg.gradient_checkpointing) if cfg.fsdp else {}
    # processing_class stays None: Trainer would otherwise treat pad (== EOS) ids as padding in its own counts.
    trainer = FinetuneTrainer(model=model, args=training_arguments(cfg, plan, fresh, quiet, sharding),
                              data_collator=collator, train_dataset=train_ds, eval_dataset=eval_ds,
                              callbacks=callbacks, counter=counter, preference=preference)
    trainer.remove_callback(PrinterCallback)  # it prints raw dicts; ProgressLog writes the readable lines
    # transformers adds it whenever KUBEFLOW_TRAINER_SERVER_URL is set; train.kubeflow.Reporter reports instead
    # (it posted 100% for a preempted run, and 0% first after a resume).
    trainer.remove_callback(KubeflowCallback)
    return trainer, progress


def training_arguments(cfg: TrainConfig, plan: RunPlan, fresh: bool, quiet: bool,
                       sharding: dict | None = None) -> TrainingArguments:
    """TrainingArguments from the configuration (the recipe) and the plan (how this hardware runs it); `sharding`
    holds the FSDP fields with --fsdp (fsdp.training_arguments)."""
    eval_steps = cfg.eval_steps
    if cfg.early_stopping_patience and not eval_steps:
        eval_steps = cfg.save_steps  # the best model must have a checkpoint to come back to
    report = [r.strip() for r in cfg.report_to.split(",") if r.strip() not in ("none", "tensorboard", "")]
    return TrainingArguments(
        output_dir=str(cfg.model_checkpoint_dir),
        per_device_train_batch_size=plan.batch_size,
        per_device_eval_batch_size=plan.batch_size,
        gradient_accumulation_steps=plan.grad_accum,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        bf16=plan.precision == "bf16",
        fp16=plan.precision == "fp16",
        optim="adamw_torch_fused" if plan.cuda else "adamw_torch",
        use_cpu=not plan.cuda,  # also what makes accelerate use gloo for several CPU processes
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
        activation_checkpointing=cfg.gradient_checkpointing and not sharding,  # FSDP checkpoints its own layers
        report_to=report or "none",
        disable_tqdm=quiet,
        dataloader_num_workers=plan.dataloader_workers,
        dataloader_pin_memory=plan.cuda,
        # Loader processes live for the whole run: without this they are forked again every epoch and evaluation.
        dataloader_persistent_workers=plan.dataloader_workers > 0,
        # Pinned batches go to the GPU without the host waiting for each copy.
        accelerator_config={"non_blocking": plan.cuda},
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # GPT-2 uses every parameter; the search costs a pass per step
        ddp_timeout=COLLECTIVE_TIMEOUT_S,  # a lost peer is given up on inside the pod's grace period, not 30 min
        train_sampling_strategy="random" if cfg.packing else "group_by_length",  # less padding per batch
        torch_compile=plan.compile,
        tf32=True if plan.tf32 else None,
        **(sharding or {}),
    )


def record(context: Context, trainer, result, final: dict, progress: ProgressLog) -> metrics.RunRecord:
    """The run as metrics.summarize reads it. A collective (token totals): every process calls it."""
    cfg, plan, stats = context.cfg, context.plan, context.stats
    session = result.metrics.get("train_runtime", 0.0) - progress.eval_seconds  # it includes in-loop evaluations
    timer = next(c for c in trainer.callback_handler.callbacks if isinstance(c, metrics.StepTimer))
    return metrics.RunRecord(
        plan=plan, stats=stats, totals=trainer.counter.totals(trainer.accelerator, max(session, 0.0)),
        history=progress.history, final=final, session_loss=result.training_loss, first_step=progress.first_step,
        global_step=trainer.state.global_step, epoch=trainer.state.epoch,
        eval_seconds=progress.eval_seconds_before + progress.eval_seconds, timer=timer,
        flops_per_token=mfu.flops_per_token(trainer.model, plan.block_size),
        parameters=sum(p.numel() for p in trainer.model.parameters()), world_size=trainer.args.world_size,
        train_on_prompt=cfg.train_on_prompt)
