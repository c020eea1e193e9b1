"""How the schema's fields (config.py) become options: their names, typed values, checks, presets, and the
resolved config with the source of each value.

Precedence, highest first: flag > FINETUNE_* env var > platform contract (SageMaker, Vertex AI) > preset >
built-in default.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from entrypoint.config.destinations import url_problems
from entrypoint.config.platforms import cluster_defaults, platform_defaults
from entrypoint.config.schema import EvalConfig, GenerateConfig, InitModelConfig, TrainConfig
from entrypoint.errors import ConfigError

ENV_PREFIX = "FINETUNE_"
# The shipped presets; FINETUNE_PRESET_DIR (read by the CLI, passed to resolve) names another folder, as the image
# does (/app/config) for installed, non-editable copies.
PRESET_DIR = Path(__file__).resolve().parents[2] / "config"


def fields(schema: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(schema)}


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def base_type(f: dataclasses.Field) -> type:
    """The field's type without `| None` and with tuples reduced to their element type."""
    hint = typing.get_type_hints(_owner(f))[f.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is tuple:
        hint = typing.get_args(hint)[0]
    return hint


def _owner(f: dataclasses.Field) -> type:
    for schema in (TrainConfig, GenerateConfig, InitModelConfig, EvalConfig):
        if fields(schema).get(f.name) is f:
            return schema
    raise KeyError(f.name)


def coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    """Turn a YAML/JSON/env value into the field's type, or raise a ConfigError saying where it came from."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    if f.metadata.get("auto") and str(value).strip().lower() == "auto":
        return "auto"
    if f.metadata.get("url") and "://" in str(value):
        return str(value).strip()
    kind = base_type(f)
    try:
        if f.metadata.get("multiple"):
            items = value.split() if isinstance(value, str) else list(value)
            return tuple(str(v) for v in items)
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)
        if kind is Path:
            return Path(str(value))
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {f.name} = {value!r} is not a valid {kind.__name__}; "
                          f"fix the value (see finetune --help).") from None


def check_values(cfg: Any) -> list[str]:
    """Range, choice and cross-field checks; every problem, one line each."""
    problems = []
    for name, f in fields(type(cfg)).items():
        value = getattr(cfg, name)
        if value is None or f.metadata.get("auto") and value == "auto":
            continue
        choices, lo, hi = f.metadata.get("choices"), f.metadata.get("min"), f.metadata.get("max")
        if isinstance(value, float) and not math.isfinite(value):  # nan passes every range comparison
            problems.append(f"--{_dash(name)} {value} is not a finite number; give a number.")
            continue
        if choices and value not in choices:
            problems.append(f"--{_dash(name)} {value!r} is not one of {', '.join(choices)}; pick one of them.")
        if lo is not None and value < lo or hi is not None and value > hi:
            bounds = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
            problems.append(f"--{_dash(name)} {value} is out of range; use a value {bounds}.")
    if isinstance(cfg, TrainConfig):
        problems += _check_train(cfg)
    return problems


def _check_train(cfg: TrainConfig) -> list[str]:
    problems = []
    nproc = cfg.nproc_per_node
    if nproc != "auto" and not (nproc.isdigit() and int(nproc) >= 1):
        problems.append(f"--nproc-per-node {nproc!r} is not a positive integer or 'auto'; use e.g. 1, 4 or auto.")
    if not all(part.isdigit() and int(part) >= 1 for part in cfg.nnodes.split(":", 1)):
        problems.append(f"--nnodes {cfg.nnodes!r} is not a positive integer or min:max; use e.g. 2 or 1:4.")
    elif ":" in cfg.nnodes and not cfg.rdzv_endpoint:
        problems.append(f"--nnodes {cfg.nnodes} (elastic) needs --rdzv-endpoint host:port, a c10d rendezvous every "
                        "node reaches (PET_RDZV_ENDPOINT under the Training Operator).")
    elif cfg.nnodes != "1" and not cfg.rdzv_endpoint:
        problems.append("--nnodes > 1 needs --rdzv-endpoint host:port (node 0's address), or MASTER_ADDR and "
                        "MASTER_PORT in the environment.")
    elif cfg.nnodes.isdigit() and cfg.node_rank >= int(cfg.nnodes):
        problems.append(f"--node-rank {cfg.node_rank} must be below --nnodes {cfg.nnodes}; ranks count from 0.")
    if cfg.rdzv_endpoint and not re.fullmatch(r"[\w.\-\[\]:]+:\d+", cfg.rdzv_endpoint):
        problems.append(f"--rdzv-endpoint {cfg.rdzv_endpoint!r} is not host:port; use e.g. finetune-0.nodes:29500.")
    if cfg.early_stopping_patience and cfg.eval_steps and cfg.save_steps % cfg.eval_steps:
        problems.append(f"--save-steps {cfg.save_steps} must be a multiple of --eval-steps {cfg.eval_steps} "
                        "with early stopping, so the best evaluation has a checkpoint; change either.")
    if cfg.dataset and (cfg.train_file or cfg.valid_file):
        problems.append("--dataset replaces --data-dir's files, so --train-file and --valid-file cannot be given with "
                        "it; to mix files with datasets, give each file as a --dataset value (--dataset PATH:WEIGHT).")
    problems += url_problems(cfg.export_to)
    problems += url_problems(cfg.checkpoint_to, "--checkpoint-to")
    for value, option in ((cfg.data_dir, "--data-dir"), (cfg.model, "--model")):
        if isinstance(value, str) and "://" in value:  # object storage; a local path or a Hub id otherwise
            problems += url_problems(value, option)
    problems += quantize_problems(cfg)
    problems += fsdp_problems(cfg)
    report = {r.strip() for r in cfg.report_to.split(",")}
    unknown = report - {"none", "tensorboard", "wandb", "mlflow", "comet_ml", "clearml", "trackio", "all"}
    if unknown:
        problems.append(f"--report-to names unknown integration(s) {', '.join(sorted(unknown))}; "
                        "use tensorboard, wandb, mlflow, comet_ml, clearml, trackio or none.")
    return problems


def quantize_problems(cfg: TrainConfig) -> list[str]:
    """--quantize quantizes the frozen base under LoRA adapters: without adapters nothing could train."""
    if not cfg.quantize:
        return []
    if not cfg.lora_rank:
        return [f"--quantize {cfg.quantize} trains LoRA adapters on a quantized base and needs --lora-rank "
                "(e.g. --lora-rank 16); drop --quantize for full fine-tuning."]
    if cfg.compile == "on":
        return [f"--compile on cannot train a quantized model (--quantize {cfg.quantize}): Trainer refuses a compiled "
                "quantized model; use --compile auto or off."]
    if importlib.util.find_spec("bitsandbytes") is None:
        return [f"--quantize {cfg.quantize} needs the bitsandbytes package, which is not installed; "
                "pip install bitsandbytes (the image has it)."]
    return []


def fsdp_problems(cfg: TrainConfig) -> list[str]:
    """What --fsdp cannot run with, knowable from the options alone; the device and the resolved world size are
    checked where they are known (preflight, plan)."""
    if not cfg.fsdp:
        return []
    problems = []
    if cfg.quantize:
        problems.append(f"--fsdp cannot shard a model quantized by --quantize {cfg.quantize} (bitsandbytes' 4/8-bit "
                        "weights are not sharded here); drop --fsdp for QLoRA on one GPU each, or drop --quantize.")
    elif cfg.lora_rank:
        problems.append("--fsdp shards full fine-tuning and is not supported with --lora-rank (LoRA's gradients and "
                        "optimizer state are already small); drop --fsdp, or add --quantize 4bit to shrink the base.")
    if (cfg.nproc_per_node, cfg.nnodes) == ("1", "1"):
        problems.append("--fsdp shards over several processes and this run has one; give --nproc-per-node auto (one "
                        "per GPU, two or more GPUs) or N >= 2, or drop --fsdp.")
    return problems


def _dash(name: str) -> str:
    return name.replace("_", "-")


def find_preset(name_or_path: str, preset_dir: Path = PRESET_DIR) -> Path:
    path = Path(name_or_path)
    candidate = path if path.suffix in (".yaml", ".yml") or path.exists() else preset_dir / f"{name_or_path}.yaml"
    if not candidate.is_file():
        shipped = ", ".join(sorted(p.stem for p in preset_dir.glob("*.yaml"))) or "none found"
        raise ConfigError(f"preset {name_or_path!r} not found; use a YAML path or one of: {shipped}.")
    return candidate


def load_preset(name_or_path: str, schema: type = TrainConfig, preset_dir: Path = PRESET_DIR) -> dict[str, Any]:
    """A preset's overrides, coerced to the schema's types. Unknown keys are an error, not a silent no-op."""
    path = find_preset(name_or_path, preset_dir)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"preset {path} is not valid YAML ({str(exc).splitlines()[0]}); fix the file.") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"preset {path} is not valid UTF-8 (byte {exc.start}); convert it, e.g. "
                          "iconv -f latin1 -t utf-8.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"preset {path} must be a mapping of option names to values.")
    known = fields(schema)
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"preset {path} has unknown key(s) {', '.join(unknown)}; "
                          f"keys are option names with underscores, e.g. learning_rate.")
    return {k: coerce(known[k], v, f"preset {path.name}") for k, v in raw.items()}


def resolve(schema: type, explicit: dict[str, tuple[Any, str]], preset: str | None,
            environ: typing.Mapping[str, str]) -> tuple[Any, dict[str, str]]:
    """Build the config and say where each value came from.

    `explicit` holds what the command line or a FINETUNE_* env var set: name -> (value, source label).
    """
    known = fields(schema)
    values: dict[str, Any] = {}
    sources = {name: "default" for name in known}
    if preset:
        preset_dir = Path(environ.get("FINETUNE_PRESET_DIR") or PRESET_DIR)
        for name, value in load_preset(preset, schema, preset_dir).items():
            values[name], sources[name] = value, f"preset {preset}"
    if schema is TrainConfig:
        platform, overrides = platform_defaults(environ)
        for name, value in overrides.items():
            if name not in known:
                raise ConfigError(f"{platform} hyperparameter {name!r} is not an option; "
                                  "remove it or use an option name such as learning_rate.")
            values[name], sources[name] = coerce(known[name], value, platform), platform
        for name, (value, source) in cluster_defaults(environ).items():
            values[name], sources[name] = coerce(known[name], value, source), source
    for name, (value, source) in explicit.items():
        values[name], sources[name] = value, source
    return schema(**values), sources


def as_dict(cfg: Any, redact: bool = True) -> dict[str, Any]:
    """Plain YAML-safe values; secrets become '***' so the dict can be logged and published."""
    out = {}
    for name, f in fields(type(cfg)).items():
        value = getattr(cfg, name)
        if f.metadata.get("secret") and value and redact:
            value = "***"
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[name] = value
    return out
