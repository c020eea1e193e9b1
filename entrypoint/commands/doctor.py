"""`doctor`: a preflight report a person can read, one line per check, and a non-zero exit on a blocking one."""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import shutil
from collections.abc import Mapping
from pathlib import Path

from entrypoint.config.options import check_values
from entrypoint.config.schema import TrainConfig
from entrypoint.data import objectstore
from entrypoint.data.mixture import discover
from entrypoint.data.options import DataOptions
from entrypoint.data.sources import fingerprint
from entrypoint.data.survey import survey
from entrypoint.errors import ConfigError, DataError, FinetuneError, ModelLoadError, StoreUnavailable
from entrypoint.publish.export import probe
from entrypoint.publish.outputs import check_writable
from entrypoint.runtime import cuda
from entrypoint.runtime.toolchain import find
from entrypoint.train.model import load_tokenizer
from entrypoint.train.plan import decide
from entrypoint.train.preflight import (
    check_model_dir,
    device_and_precision,
    hub_offline,
    load_model_config,
    model_and_block_size,
    model_path,
    resolved,
    vocabulary,
)

SHM_MIN = 1 << 30  # bytes; DataLoader workers pass batches through /dev/shm and Docker's default is 64 MiB


def diagnose(cfg: TrainConfig, echo=print, environ: Mapping[str, str] | None = None, world_size: int = 1) -> None:
    """Check everything `train` needs, printing one line per check through `echo`, then the run plan; raise on
    blocking problems. `environ` is the process's environment (the CLI passes it; the driver check reads it)."""
    environ = environ or {}
    failures: list[FinetuneError] = []

    def report(name: str, check):
        try:
            detail, warning = check()
            echo(f"{'warn' if warning else 'ok':5} {name}: {detail}")
        except FinetuneError as exc:
            failures.append(exc)
            for line in exc.problems:
                echo(f"FAIL  {name}: {line}")

    report("versions", _versions)
    report("config", lambda: _config(cfg))
    report("device", lambda: (_device(cfg, environ), False))
    report("data", lambda: _data(cfg))
    for name, check in _data_files(cfg):
        report(name, check)
    for directory, what in ((cfg.output_dir, "output dir"), (cfg.model_checkpoint_dir, "checkpoint dir")):
        report(what, lambda d=directory, w=what: _writable(d, w))
    report("model", lambda: _model(cfg))
    if cfg.export_to:
        report("export", lambda: (probe(cfg.export_to), False))
    if cfg.checkpoint_to:
        report("checkpoint store", lambda: (probe(cfg.checkpoint_to, "--checkpoint-to", StoreUnavailable), False))
    report("shared memory", _shm)
    if not failures:  # the plan needs the device, the data and the model that the checks above proved usable
        plans = []

        def plan():
            plans.append(decide(cfg, resolved(cfg, environ), world_size, probe=False))
            return plans[0].line(), False

        report("plan", plan)
        if plans:  # the compiler a compiled run needs, after the plan that says whether it compiles
            report("compile", lambda: _compile(cfg, plans[0], environ))
    if failures:
        echo(f"doctor: {sum(len(f.problems) for f in failures)} blocking problem(s)")
        raise type(failures[0])(*[p for f in failures for p in f.problems]) from None
    echo("doctor: ready to train")


def _versions():
    names = ("torch", "transformers", "datasets", "accelerate", "tokenizers", "click")
    versions = ", ".join(f"{n} {importlib.metadata.version(n)}" for n in names)
    return f"python {platform.python_version()}, {versions}", False


def _config(cfg):
    problems = check_values(cfg)
    if problems:
        raise ConfigError(*problems)
    return "values in range", False


def _device(cfg, environ):
    import torch

    device, precision = device_and_precision(cfg.precision, environ)
    gpus = torch.cuda.device_count()
    bf16 = gpus and torch.cuda.is_bf16_supported()
    support = f"{gpus} GPU(s), bf16 {'yes' if bf16 else 'no'}" if gpus else "no GPU visible (CPU training)"
    driver = cuda.driver_version()
    if driver and torch.version.cuda:
        support += (f", NVIDIA driver {driver} (torch's CUDA {torch.version.cuda} needs "
                    f"{cuda.required_driver(torch.version.cuda) or 'a driver of its release'})")
    return f"{device}: {support}; training precision {precision}"


def _data(cfg):
    train, valid = discover(DataOptions.of(cfg))
    fingerprint(train)  # reads every byte: proves the files are readable and UTF-8 (objects: their listing)
    if objectstore.remote(train.files + valid.files):
        objectstore.check_readable(train.files + valid.files)
    size = sum(p.stat().st_size for p in train.files)
    detail = f"{train.describe()}{f' ({size / 1e6:.1f} MB)' if train.files else ''}, validation: " + (
        valid.describe() if valid else f"{cfg.validation_split}% held out")
    return detail, False


def _data_files(cfg) -> list:
    """One check per input file, reading its first records as train would (data/survey.py), and one for the
    inputs as a whole; none when the inputs cannot be found (the data check says why). Records are encoded with
    the model's tokenizer and pretokenized ids checked against its vocabulary, when the model loads."""
    tokenizer = vocab = block_size = None
    with contextlib.suppress(FinetuneError):  # the model and config checks report why these cannot be had
        tokenizer = load_tokenizer(cfg)
        model_config, block_size = model_and_block_size(cfg)
        vocab = vocabulary(model_config)
    try:
        reports, problems = survey(DataOptions.of(cfg, vocab_size=vocab), tokenizer, block_size=block_size)
    except FinetuneError:
        return []
    checks = [(f"data {r.label}", lambda r=r: _file_check(r.line(), r.problems)) for r in reports]
    if problems:
        checks.append(("data formats", lambda: _file_check("", problems)))
    return checks


def _file_check(line: str, problems: list[str]):
    if problems:
        raise DataError(*problems)
    return line, False


def _writable(directory: Path, what: str):
    check_writable(directory, what)
    return f"{directory} is writable", False


def _model(cfg):
    local = model_path(cfg)  # an s3:// or gs:// model is downloaded here, as train would
    model_config = load_model_config(local, cfg.hub_token)
    if Path(local).is_dir():
        _check_local_model(Path(local))
    need = 2 * checkpoint_bytes(model_config)  # a new checkpoint is written before the oldest is rotated out
    free = free_disk(cfg.model_checkpoint_dir)
    params = checkpoint_bytes(model_config) // 12
    detail = (f"{cfg.model} loads ({params / 1e6:.1f}M parameters; about {12 * params / 1e9:.2f} GB per "
              f"checkpoint, {free / 1e9:.1f} GB free)")
    offline = hub_offline()
    if offline:
        detail += "; available offline"
    return detail, free < need


def _check_local_model(path: Path) -> None:
    """The files train will load: a tokenizer, and weights whose safetensors header parses (the header only is
    read, so this costs milliseconds however large the model)."""
    check_model_dir(path, "--model")
    weights = path / "model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(weights), framework="pt"):
                pass
        except Exception as exc:  # SafetensorError, OSError: a truncated or foreign file
            raise ModelLoadError(f"--model {path}: model.safetensors is unreadable ({str(exc)[:120]}); copy the "
                                 "model again or publish it again with finetune train.") from None


def _compile(cfg, plan, environ):
    """What a compiled run builds its kernels with, or the one line per missing piece (as train's preflight)."""
    if not plan.compile:
        return f"off ({plan.why['compile']}), nothing to build", False
    toolchain = find(environ)
    asked = "--compile on" if cfg.compile == "on" else "--compile auto, which compiles this run,"
    problems = toolchain.problems(plan.cuda, asked)
    if problems:
        raise ConfigError(*problems)
    return toolchain.describe(plan.cuda), False


def _shm():
    shm = Path("/dev/shm")
    if not shm.exists():
        return "no /dev/shm (DataLoader workers may fail)", True
    size = shutil.disk_usage(shm).total
    return f"/dev/shm is {size / 2**20:.0f} MiB" + ("" if size >= SHM_MIN else
                                                     "; use --shm-size=1g (docker) or a memory emptyDir"), \
        size < SHM_MIN


def free_disk(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def checkpoint_bytes(model_config) -> int:
    """Weights (fp32) plus AdamW's two moments: about 12 bytes per parameter."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    return 12 * sum(p.numel() for p in model.parameters())
