"""Checks that run before a model is loaded: `train` stops on any problem, `doctor` reports them all.

Each check returns problems as `FinetuneError`s (one line each, naming the fix) instead of raising, so a user
sees every problem in one run. What the checks resolve (device, precision, block size, the model's config) is the
start of the run plan (plan.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from entrypoint.config.options import check_values
from entrypoint.config.schema import TrainConfig
from entrypoint.data import objectstore, prompts
from entrypoint.data.mixture import discover
from entrypoint.data.options import DataOptions
from entrypoint.errors import ConfigError, DataError, FinetuneError, ModelLoadError, OutputError
from entrypoint.publish.outputs import check_writable
from entrypoint.runtime import cuda
from entrypoint.runtime.toolchain import Toolchain, find
from entrypoint.train import fsdp

MAX_DEFAULT_BLOCK = 1024  # tokens; longer contexts cost quadratic attention for little fine-tuning gain


@dataclass(frozen=True)
class Checked:
    """What preflight resolved: the device, the precision and the block size to train with, the model's config
    (plan.py decides the rest), and what torch.compile would build with (when the run may compile)."""

    device: str
    precision: str
    block_size: int
    model_config: object
    toolchain: Toolchain | None = None


def device_and_precision(requested: str, environ: Mapping[str, str]) -> tuple[str, str]:
    """auto: bf16 where the GPU supports it, else fp16 on CUDA, fp32 on CPU. An explicit request that the
    hardware cannot honour is an error, never a silent change. Where a GPU is expected (or a driver is loaded),
    a missing or too old driver, or CUDA that will not start, is a DriverError (cuda.check, which reads
    NVIDIA_VISIBLE_DEVICES from `environ`: the CLI passes the process's environment)."""
    import torch

    cuda.check(requested, environ)
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
        bf16 = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return device, "bf16" if bf16 else "fp16"
        if requested == "bf16" and not bf16:
            raise ConfigError(f"--precision bf16 is not supported by {device}; use --precision fp16 or auto.")
        return device, requested
    if requested in ("fp16", "bf16"):
        raise ConfigError(f"--precision {requested} needs a CUDA GPU and none is visible; use --precision auto "
                          "(fp32 on CPU) or run with --gpus all.")
    return "cpu", "fp32"


def hub_offline() -> bool:
    """Whether the Hugging Face Hub is off (HF_HUB_OFFLINE), as huggingface_hub itself resolved it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def needs_remote_code(exc: Exception) -> bool:
    """Whether a transformers loading error means the model ships its own Python code."""
    return "trust_remote_code" in str(exc)


def remote_code_error(model: str) -> ModelLoadError:
    return ModelLoadError(f"{model!r} needs its own Python code (transformers' trust_remote_code); finetune never "
                          "runs code shipped with a model and has no --trust-remote-code flag: use a model whose "
                          "architecture transformers supports natively.")


def model_path(cfg: TrainConfig) -> str:
    """What transformers loads --model from: the option itself, or for s3:// and gs:// the folder under
    --cache-dir it was downloaded to (once per content; objectstore.local_model)."""
    return objectstore.local_model(cfg.model, cfg.data_cache_dir)


def load_model_config(model: str, token: str | None):
    from transformers import AutoConfig

    local = Path(model)
    if (local.exists() or model.startswith(("/", "./", "../"))) and not (local / "config.json").is_file():
        raise ModelLoadError(f"--model {model} is not a model directory (no config.json); point it at a "
                             "save_pretrained folder or a Hub id.")
    try:
        return AutoConfig.from_pretrained(model, token=token, trust_remote_code=False)  # never asks on stdin
    except (OSError, ValueError) as exc:
        if isinstance(exc, ValueError) and needs_remote_code(exc):
            raise remote_code_error(model) from None
        first = str(exc).splitlines()[0][:160]
        if (local / "config.json").is_file():  # a local directory: the network and the Hub cache are not the cause
            raise ModelLoadError(f"cannot read {local / 'config.json'} ({first}); it is not valid JSON or names an "
                                 "architecture this transformers does not know: fix or replace the model.") from None
        offline = hub_offline()
        hint = ("HF_HUB_OFFLINE=1 is set and it is not in the cache (HF_HOME); download it first or bake it "
                "into the image") if offline else "check the name, network access, and HF_TOKEN for gated models"
        raise ModelLoadError(f"cannot load model config for {model!r} ({str(exc).splitlines()[0][:120]}); "
                             f"{hint}.") from None


# What a local model directory must hold to be loaded: any one name of each group.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt", "spiece.model")


def check_model_dir(path: Path, option: str, weights: bool = True, tokenizer: bool = True) -> None:
    """Raise a ModelLoadError naming every missing part of a local model directory (config, weights,
    tokenizer), before anything loads. A Hub id (not an existing path) passes unchecked."""
    if not path.exists():
        raise ModelLoadError(f"{option} {path} does not exist; train first (finetune train publishes "
                             f"<output-dir>/model) or point {option} at a model directory.")
    if not path.is_dir():
        raise ModelLoadError(f"{option} {path} is a file, not a model directory; point {option} at the folder "
                             "that holds config.json.")
    if not (path / "config.json").is_file():
        hint = (f"use {option} {path / 'model'} (the published model)" if (path / "model" / "config.json").is_file()
                else f"point {option} at a save_pretrained folder such as <output-dir>/model")
        raise ModelLoadError(f"{option} {path} is not a model directory (no config.json); {hint}.")
    problems = unreadable(path, option)
    if weights and not any((path / name).is_file() for name in WEIGHT_FILES):
        problems.append(f"{option} {path} has no weights (model.safetensors); the model is incomplete: publish it "
                        "again with finetune train, or copy the weights in.")
    if tokenizer and not any((path / name).is_file() for name in TOKENIZER_FILES):
        problems.append(f"{option} {path} has no tokenizer files (tokenizer.json); training checkpoints have none: "
                        "use the published model/, or save the base model's tokenizer into it.")
    if problems:
        raise ModelLoadError(*problems)


def unreadable(path: Path, option: str) -> list[str]:
    """A problem for each file of the model directory `path` this process cannot open (permissions, a volume that
    fails reads): the loaders would call it missing."""
    try:
        files = [p for p in sorted(path.iterdir()) if p.is_file()]
    except OSError as exc:
        files, problems = [], [f"cannot list {option} {path} ({exc.strerror or exc})"]
    else:
        problems = []
    for file in files:
        try:
            with file.open("rb") as f:
                f.read(1)
        except OSError as exc:
            problems.append(f"cannot read {file} ({exc.strerror or exc})")
    return [f"{p}; make the model files readable by this user (chmod -R a+rX {path}) or fix the volume."
            for p in problems]


def cheap_problems(cfg: TrainConfig) -> list[FinetuneError]:
    """The checks that need neither torch nor transformers: the option values, the data's location, the
    --sample-prompts file, and whether the output, checkpoint and cache directories are writable (created if
    missing)."""
    problems: list[FinetuneError] = [ConfigError(p) for p in check_values(cfg)]
    try:
        discover(DataOptions.of(cfg))
    except FinetuneError as exc:
        problems.append(exc)
    if cfg.sample_prompts is not None:
        try:
            prompts.read(cfg.sample_prompts)
        except FinetuneError as exc:
            problems.append(exc)
    for directory, what in ((cfg.output_dir, "output dir"), (cfg.model_checkpoint_dir, "checkpoint dir"),
                            (cfg.data_cache_dir, "cache dir")):
        try:
            check_writable(directory, what)
        except FinetuneError as exc:
            problems.append(exc)
            break  # the others usually live inside the first
    return problems


def check_cheaply(cfg: TrainConfig) -> None:
    """Raise every problem `cheap_problems` finds. `train` calls it before anything imports torch or transformers
    (seconds on a busy machine), so a missing data directory or a mistyped option is reported at once; `preflight`
    checks the same again with the rest."""
    _raise(cheap_problems(cfg))


def preflight(cfg: TrainConfig, trains: bool = True, environ: Mapping[str, str] | None = None) -> Checked:
    """Everything checkable before weights load; raises one error carrying every problem. `trains=False` (prepare)
    leaves the device alone: tokenizing needs no GPU, and often runs on CPU nodes from the CUDA image."""
    problems = cheap_problems(cfg)
    device, precision = "cpu", "fp32"
    try:
        if trains:
            device, precision = device_and_precision(cfg.precision, environ or {})
    except FinetuneError as exc:
        problems.append(exc)
    if trains and cfg.fsdp and (sharding := fsdp.problem(device, None)):  # the world size: plan.decide checks it
        problems.append(ConfigError(sharding))
    model_config, block_size = None, cfg.block_size or 0
    try:
        model_config, block_size = model_and_block_size(cfg)
    except FinetuneError as exc:
        problems.append(exc)
    # auto never compiles on CPU (plan.should_compile), so only `on`, or auto on a GPU, looks for a compiler.
    compiles = cfg.compile == "on" or (cfg.compile == "auto" and device != "cpu")
    toolchain = find(environ or {}) if trains and compiles else None
    if toolchain and cfg.compile == "on":
        problems += [ConfigError(p) for p in toolchain.problems(device != "cpu", "--compile on")]
    _raise(problems)
    return Checked(device=device, precision=precision, block_size=block_size, model_config=model_config,
                   toolchain=toolchain)


def check_compile(plan, checked: Checked) -> None:
    """Raise a ConfigError when `--compile auto` chose to compile (`plan`, from plan.decide) and this machine
    cannot build the kernels; preflight has already checked `--compile on` the same way."""
    if plan.compile and checked.toolchain:
        problems = checked.toolchain.problems(plan.cuda, "--compile auto, which compiles this run,")
        if problems:
            raise ConfigError(*problems)


def resolved(cfg: TrainConfig, environ: Mapping[str, str]) -> Checked:
    """What preflight resolves, without its other checks and without creating any directory (`config` shows the
    plan this way); raises the first problem."""
    device, precision = device_and_precision(cfg.precision, environ)
    model_config, block_size = model_and_block_size(cfg)
    return Checked(device=device, precision=precision, block_size=block_size, model_config=model_config)


def model_and_block_size(cfg: TrainConfig) -> tuple[object, int]:
    """The model's config and the block size to train with: --block-size, or the model's context up to
    MAX_DEFAULT_BLOCK."""
    model_config = load_model_config(model_path(cfg), cfg.hub_token)
    positions = context_length(model_config)
    if cfg.block_size and cfg.block_size > positions:
        raise ConfigError(f"--block-size {cfg.block_size} exceeds the model's {positions} positions; "
                          f"use --block-size {positions} or less.")
    return model_config, cfg.block_size or min(positions, MAX_DEFAULT_BLOCK)


def vocabulary(model_config) -> int | None:
    """The model's vocabulary: its embedding rows, which every token id must stay below (pretokenized data)."""
    return getattr(model_config.get_text_config(), "vocab_size", None)


def context_length(model_config) -> int:
    """The model's maximum sequence length. transformers' attribute maps give every architecture the standard
    name (GPT-2's n_positions reads as max_position_embeddings); a model without one gets MAX_DEFAULT_BLOCK."""
    text_config = model_config.get_text_config()
    return getattr(text_config, "max_position_embeddings", None) or MAX_DEFAULT_BLOCK


# The first problem decides the exit code: the most fundamental kind first.
_ORDER = [ConfigError, DataError, ModelLoadError, OutputError]


def _raise(problems: list[FinetuneError]) -> None:
    """One error carrying every problem's lines, of the most fundamental kind among them; nothing when none."""
    if problems:
        problems.sort(key=lambda e: _ORDER.index(type(e)) if type(e) in _ORDER else len(_ORDER))
        raise type(problems[0])(*[p for e in problems for p in e.problems])
