"""`eval`: score any model directory (a published model/, a training checkpoint, a base model) on held-out data the
way training's evaluation scores it, so two runs, or a run and its base model, compare on one set.

The data goes through training's own pipeline (the same formats, packing, validation split and --max-eval-tokens
rows, from the same cache when --cache-dir or --output-dir points at a run's), and the loss is the Trainer's
evaluation loss: the mean over target tokens, which for instruction and chat data are the answers only. With
--tasks, lm-evaluation-harness tasks run on the same model through its Python API (the `eval` extra).

A checkpoint of a LoRA run holds only the adapter: it is scored as its base model (the --model training loaded,
which peft recorded as the adapter's base_model_name_or_path) with the adapter merged in, exactly what publishing
that run makes of it, and with the base model's tokenizer unless --tokenizer names another.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from entrypoint import fsutil, logs
from entrypoint.config.schema import EvalConfig, TrainConfig
from entrypoint.data import pipeline
from entrypoint.data.options import DataOptions
from entrypoint.errors import ConfigError, ModelLoadError, OutputError
from entrypoint.train import job
from entrypoint.train.metrics import perplexity
from entrypoint.train.model import attention_for, load_model, load_tokenizer, merge_adapter
from entrypoint.train.plan import decide
from entrypoint.train.preflight import TOKENIZER_FILES, WEIGHT_FILES, check_model_dir, preflight, unreadable, vocabulary

log = logs.area("eval")

EXTRA = "pip install 'finetune-gpt2[eval]'"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def task_names(ecfg: EvalConfig) -> list[str]:
    """--tasks as a list: each value may hold several names, comma- or space-separated."""
    return [name for value in ecfg.tasks for name in value.replace(",", " ").split()]


def check_inputs(cfg: TrainConfig, ecfg: EvalConfig) -> None:
    """What needs no model: the --tasks machinery and its definitions, where the results go, and the model
    directory's files (a Hub id passes)."""
    names = task_names(ecfg)
    if names and not harness_installed():
        raise ConfigError(f"--tasks needs lm-evaluation-harness, which is not installed; {EXTRA}.")
    if ecfg.include_path is not None and not ecfg.include_path.is_dir():
        raise ConfigError(f"--include-path {ecfg.include_path} is not a directory; point it at a folder of task "
                          "YAML files.")
    if ecfg.output is not None and (ecfg.output.is_dir() or not ecfg.output.parent.is_dir()):
        raise OutputError(f"--output {ecfg.output} cannot be written (a directory, or its folder is missing); "
                          "name a file in an existing directory.")
    model = Path(cfg.model)
    base = lora_base(model)
    if base is not None:
        check_adapter(model, base, tokenizer=ecfg.tokenizer is None and not has_tokenizer(model))
    elif model.exists():
        check_model_dir(model, "--model", tokenizer=False)
        if ecfg.tokenizer is None and not has_tokenizer(model):
            raise ModelLoadError(f"--model {model} has no tokenizer files (tokenizer.json), as training checkpoints "
                                 "have none; add --tokenizer with the base model's directory, or evaluate the "
                                 "published model/.")
    if ecfg.tokenizer is not None:
        check_model_dir(ecfg.tokenizer, "--tokenizer", weights=False)


def has_tokenizer(model: Path) -> bool:
    return any((model / name).is_file() for name in TOKENIZER_FILES)


def lora_base(model: Path) -> str | None:
    """The base model of a LoRA checkpoint (a directory holding an adapter and no full weights): what training
    loaded as --model, which peft records as base_model_name_or_path. None for anything else."""
    config = model / ADAPTER_CONFIG
    if not config.is_file() or any((model / name).is_file() for name in WEIGHT_FILES):
        return None
    try:
        base = json.loads(config.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"cannot read {config} ({str(exc).splitlines()[0][:120]}); the LoRA checkpoint is "
                             "damaged: evaluate another checkpoint or the run's published model/.") from None
    if not isinstance(base, str) or not base:
        raise ModelLoadError(f"{config} names no base model (base_model_name_or_path); set it to the directory of "
                             "the model the run trained from.")
    return base


def check_adapter(model: Path, base: str, tokenizer: bool) -> None:
    """A LoRA checkpoint's own files, and its base model's directory when the base is a local path (a Hub id is
    left to the loaders); `tokenizer`: whether the base must hold the tokenizer."""
    problems = unreadable(model, "--model")
    if not any((model / name).is_file() for name in ADAPTER_WEIGHTS):
        problems.append(f"--model {model} has {ADAPTER_CONFIG} but no adapter weights (adapter_model.safetensors); "
                        "the checkpoint is incomplete: evaluate another checkpoint or the run's published model/.")
    local = Path(base)
    if not local.exists() and (base.startswith(("/", "./", "../", "~")) or base.count("/") > 1):
        problems.append(f"--model {model} is a LoRA checkpoint whose base model {base} (base_model_name_or_path "
                        f"in its {ADAPTER_CONFIG}, the --model it was trained from) does not exist; restore the "
                        "base model at that path, or set base_model_name_or_path to where it is now.")
    elif local.exists():
        try:
            check_model_dir(local, "the LoRA base model", tokenizer=False)
        except ModelLoadError as exc:
            problems += exc.problems
        if tokenizer and not has_tokenizer(local):
            problems.append(f"neither --model {model} (a LoRA checkpoint) nor its base model {base} has tokenizer "
                            "files (tokenizer.json); add --tokenizer with the base model's tokenizer directory.")
    if problems:
        raise ModelLoadError(*problems)


def harness_installed() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def evaluate(cfg: TrainConfig, ecfg: EvalConfig, environ) -> dict:
    """The held-out loss, perplexity and target tokens of --model (and the --tasks scores); written to --output."""
    check_inputs(cfg, ecfg)
    scored, base = cfg.model, lora_base(Path(cfg.model))
    # The model as it is (a LoRA checkpoint: its base, the adapter merged in after loading): no adapters to add,
    # nothing to compile, report or sample.
    cfg = replace(cfg, model=base or cfg.model, lora_rank=0, quantize=None, compile="off", report_to="none",
                  early_stopping_patience=None, sample_prompts=None)
    checked = preflight(cfg, environ=environ)
    tasks = find_tasks(task_names(ecfg), ecfg.include_path) if ecfg.tasks else None
    plan = decide(cfg, checked, 1)
    tokenizer = load_tokenizer(replace(cfg, model=tokenizer_source(scored, base, ecfg)))
    data = DataOptions.of(cfg, preprocessing_workers=plan.preprocessing_workers,
                          vocab_size=vocabulary(checked.model_config))
    train_ds, eval_ds, stats = pipeline.prepare(data, tokenizer, plan.block_size)
    log.info(f"loading {cfg.model}" + (f" with the LoRA adapter of {scored} merged in" if base else ""))
    model = load_model(cfg, attention_for(stats.isolated, plan.precision), plan.precision)
    if base:
        model = with_adapter(model, scored, base)
    trainer, _ = job.build_trainer(cfg, plan, model, tokenizer, (train_ds, eval_ds), fresh=False)
    loss = trainer.evaluate()["eval_loss"]
    result = {"model": scored, **({"base_model": base} if base else {}), "eval_loss": loss,
              "perplexity": perplexity(loss),
              "eval_tokens": trainer.eval_targets, "eval_rows": len(eval_ds), "data_format": stats.data_format,
              "answers_only": stats.data_format != "text" and not cfg.train_on_prompt,
              "data_fingerprint": stats.fingerprint, "block_size": plan.block_size}
    if tasks:
        result["tasks"] = run_tasks(model, tokenizer, tasks, ecfg.limit, plan.batch_size)
    if ecfg.output is not None:
        fsutil.write_atomic(ecfg.output, json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


def tokenizer_source(model: str, base: str | None, ecfg: EvalConfig) -> str:
    """--tokenizer; else --model's own; for a LoRA checkpoint without tokenizer files, its base model's."""
    if ecfg.tokenizer is not None:
        return str(ecfg.tokenizer)
    return base if base and not has_tokenizer(Path(model)) else model


def with_adapter(model, adapter: str, base: str):
    """The base model loaded for a LoRA checkpoint, with the checkpoint's adapter merged into its weights."""
    try:
        return merge_adapter(model, Path(adapter))
    except Exception as exc:  # peft raises ValueError, RuntimeError (shape mismatches), SafetensorError...
        raise ModelLoadError(f"cannot apply the LoRA adapter of {adapter} to its base model {base} "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); the adapter file is damaged "
                             "or the base is not the model the run trained from: evaluate another checkpoint, or set "
                             f"base_model_name_or_path in {Path(adapter) / ADAPTER_CONFIG} to that model.") from None


def find_tasks(names: list[str], include_path: Path | None):
    """lm-evaluation-harness's task manager, with every name checked to be a task it knows (a ConfigError naming
    the unknown ones otherwise), before any model loads."""
    from lm_eval.tasks import TaskManager

    manager = None
    if include_path is not None:  # indexing only these definitions takes a moment; the built-in ones, many seconds
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
    if manager is None or any(name not in manager.all_tasks for name in names):
        manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        where = f" or in --include-path {include_path}" if include_path else " (add --include-path for your own)"
        raise ConfigError(f"--tasks {', '.join(unknown)}: no such lm-evaluation-harness task{where}; "
                          "lm-eval ls tasks lists the built-in ones.")
    return manager, names


def run_tasks(model, tokenizer, tasks, limit: int | None, batch_size: int) -> dict:
    """Each task's metrics, as lm-evaluation-harness reports them, from the model already loaded."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager, names = tasks
    log.info(f"running lm-evaluation-harness tasks {', '.join(names)}")
    harness = HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=batch_size)
    out = simple_evaluate(model=harness, tasks=names, task_manager=manager, limit=limit, log_samples=False)
    return {task: {k: v for k, v in scores.items() if k != "alias" and isinstance(v, int | float | str)}
            for task, scores in out["results"].items()}
