"""The run plan: every hardware and speed decision of a run, made once after the configuration is checked and
before any data is read, logged as one `plan:` line, shown by `doctor` and `config`, and passed to the data and
training code, which read it and never decide again.

Device, precision and block size come from preflight. The rest is decided here: the micro-batch and gradient
accumulation (--batch-size auto probes the GPU with a model built from the configuration, so the weights and the
data need not be read first), torch.compile, TF32, the tokenizing and loading worker counts, and the world size.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from entrypoint import logs
from entrypoint.config.schema import AUTO_BASE_BATCH, TrainConfig
from entrypoint.data.mixture import discover
from entrypoint.data.options import DataOptions
from entrypoint.errors import ConfigError
from entrypoint.runtime.cpus import tokenizing_workers
from entrypoint.train import fsdp, memory, mfu
from entrypoint.train.memory import Estimate
from entrypoint.train.model import add_lora, fast_gelu, lora_targets, use_chunked_loss
from entrypoint.train.preflight import Checked

log = logs.area("plan")

# `--compile auto` compiles when the run is long enough to repay it. Assumed, not measured here (no GPU):
# compiling GPT-2 124M takes about a minute, and compiled steps are at least 15% faster on a GPU. A compile time
# measured by an earlier run of the same model on the same GPU (its metrics.json) replaces the minute.
COMPILE_SECONDS = 60.0
COMPILE_SAVES = 0.15
ASSUMED_MFU = 0.3  # to estimate, before training, how long the run will take on a GPU from its peak
# Text bytes per token, to estimate an epoch's length from the input files' sizes before reading them: GPT-2's
# BPE gives 4.6 on the standard-library corpus (bench/prepare_scale.py); 4 errs towards compiling.
BYTES_PER_TOKEN = 4.0
MEMORY_HEADROOM = 0.9  # a probe may use this share of the GPU; the rest absorbs fragmentation and eval batches
GPU_LOADER_WORKERS = 2  # DataLoader processes per GPU: reading memory-mapped rows is cheap, collating is not free


@dataclass(frozen=True)
class RunPlan:
    """What this run does on its hardware. `batch_size` and `grad_accum` are per process; `why` holds the reason
    for each decision that had one."""

    device: str
    precision: str
    block_size: int
    batch_size: int
    grad_accum: int
    compile: bool
    tf32: bool
    preprocessing_workers: int
    dataloader_workers: int
    world_size: int
    why: dict = field(default_factory=dict, compare=False)
    model_config: object = field(default=None, compare=False, repr=False)
    memory: Estimate | None = field(default=None, compare=False)
    available_memory: int | None = field(default=None, compare=False)
    sizing: memory.Sizing | None = field(default=None, compare=False)

    @property
    def cuda(self) -> bool:
        return self.device != "cpu"

    def line(self) -> str:
        """The plan in one line, for `kubectl logs`, `doctor` and `config`."""
        sequences = self.batch_size * self.grad_accum * self.world_size
        batch = f"batch: {self.batch_size} x {self.grad_accum} accumulation x {self.world_size} processes"
        batch += f" ({sequences} sequences a step{'; ' + self.why['batch'] if 'batch' in self.why else ''})"
        return (f"device {self.device}, precision {self.precision}, block size {self.block_size}, {batch}, "
                f"compile: {'on' if self.compile else 'off'} ({self.why.get('compile', '')}), "
                f"TF32: {'on' if self.tf32 else 'off'}, workers: {self.preprocessing_workers} tokenizing, "
                f"{self.dataloader_workers} loading"
                + (f", memory: {self.memory.line(self.available_memory)}" if self.memory else ""))

    def fields(self) -> dict:
        """The plan as JSON-able fields for structured logs."""
        fields = {k: v for k, v in asdict(self).items() if k not in ("model_config", "memory", "sizing")}
        return {**fields, **({"memory_estimate_bytes": self.memory.total} if self.memory else {})}

    def log(self) -> None:
        log.info(self.line(), **self.fields())


def decide(cfg: TrainConfig, checked: Checked, world_size: int, probe: bool = True) -> RunPlan:
    """The plan for `cfg` on this machine. `probe=False` (doctor, config) leaves --batch-size auto on a GPU
    unprobed and says so, since probing takes the GPU for seconds."""
    cuda = checked.device != "cpu"
    if cfg.fsdp and (problem := fsdp.problem(checked.device, world_size)):
        raise ConfigError(problem)
    sizing = memory_check(cfg, checked, world_size)  # before anything is loaded or probed: refuse what cannot fit
    ceiling = sizing.largest_batch(AUTO_BASE_BATCH * cfg.grad_accum) if sizing and cfg.batch_size == "auto" else None
    batch, accumulation, batch_why = batch_and_accumulation(cfg, checked, probe, ceiling)
    # Only --compile auto on a GPU, for a run sized in epochs, needs the epoch's length (a glob and a stat per file).
    epoch_rows = estimated_rows(cfg, checked.block_size) if cfg.compile == "auto" and cuda and not cfg.max_steps \
        else 0
    compiled, compile_why = should_compile(cfg, checked, epoch_rows, batch * accumulation * world_size)
    why = {"compile": compile_why, **({"batch": batch_why} if batch_why else {})}
    return RunPlan(device=checked.device, precision=checked.precision, block_size=checked.block_size,
                   batch_size=batch, grad_accum=accumulation, compile=compiled, tf32=tf32_supported(),
                   preprocessing_workers=tokenizing_workers(cfg.preprocessing_workers),
                   dataloader_workers=GPU_LOADER_WORKERS if cuda else 0, world_size=world_size, why=why,
                   model_config=checked.model_config, memory=sizing.at(batch) if sizing else None,
                   available_memory=sizing.available if sizing else None, sizing=sizing)


def memory_check(cfg: TrainConfig, checked: Checked, world_size: int) -> memory.Sizing | None:
    """The run's memory sizing, after refusing (ConfigError, naming what would fit) a run whose estimated peak per
    process exceeds the device, before any weight is loaded or data read. A --batch-size auto on a GPU is checked
    at its fallback of 1. None when the configuration lacks the usual size fields."""
    targets = lora_targets(checked.model_config.model_type, cfg.lora_target_modules)
    try:
        shape = memory.shape_of(checked.model_config, cfg.lora_rank or memory.SUGGESTED_RANK, targets)
    except (AttributeError, TypeError, ValueError) as exc:  # a configuration without the usual size fields
        log.warning(f"no memory estimate for {checked.model_config.model_type} ({type(exc).__name__}: {exc})")
        return None
    cpu = checked.device == "cpu"
    mode = memory.Mode(lora=bool(cfg.lora_rank), lora_dropout=cfg.lora_dropout > 0, quantize=cfg.quantize,
                       precision=checked.precision, batch=1 if cfg.batch_size == "auto" and not cpu else
                       AUTO_BASE_BATCH if cfg.batch_size == "auto" else cfg.batch_size,
                       block=checked.block_size, checkpointing=cfg.gradient_checkpointing, world_size=world_size,
                       fsdp=cfg.fsdp, cpu=cpu)
    sizing = memory.Sizing(shape, mode, memory.runtime_bytes(checked.device), memory.available_bytes(checked.device))
    refuse_beyond(sizing, checked.device, "this run")
    return sizing


def refuse_beyond(sizing: memory.Sizing, device: str, what: str) -> None:
    """ConfigError naming what would fit, when `sizing`'s estimate at its batch exceeds the device."""
    estimate = sizing.at(sizing.mode.batch)
    if estimate.total > sizing.available:
        fits = memory.what_fits(sizing.shape, sizing.mode, sizing.runtime, sizing.available)
        raise ConfigError(f"{what} needs {estimate.line(sizing.available)} on {device}; "
                          + (f"it would fit with {' or '.join(fits)}." if fits else
                             "nothing tried fits (LoRA, --quantize 4bit, checkpointing, batch 1, --fsdp over more "
                             "GPUs): use a device with more memory or a smaller model."))


def check_pairs_memory(plan: RunPlan) -> None:
    """Preference pairs (DPO), known once the data is read: two rows a pair and a reference model's log-probabilities
    (and, without LoRA, a frozen copy of the model). Logged, and refused like any run that cannot fit, before the
    model loads."""
    if plan.sizing is None:
        return
    mode = replace(plan.sizing.mode, preference=True, batch=plan.batch_size)
    sizing = replace(plan.sizing, mode=mode)
    log.info(f"memory with preference pairs: {sizing.at(plan.batch_size).line(sizing.available)}")
    refuse_beyond(sizing, plan.device, f"DPO on {plan.batch_size} pairs a micro-batch")


def batch_and_accumulation(cfg: TrainConfig, checked: Checked, probe: bool = True,
                           ceiling: int | None = None) -> tuple[int, int, str]:
    """(micro-batch, accumulation steps, why). For --batch-size auto on a GPU: the largest power of two up to the
    effective batch (and up to `ceiling`, the largest the memory plan expects to fit: the probe starts there)
    whose forward and backward fit beside AdamW's state, probed with a model built from the
    configuration (same shapes as the weights to be loaded); with --fsdp, `ceiling` itself; on CPU, the default 8."""
    if cfg.batch_size != "auto":
        return cfg.batch_size, cfg.grad_accum, ""
    effective = AUTO_BASE_BATCH * cfg.grad_accum
    if checked.device == "cpu":
        batch, why = AUTO_BASE_BATCH, "auto: the default on CPU"
    elif cfg.fsdp:  # the probe would build the whole model on one GPU, which sharding exists to avoid
        batch, why = min(effective, ceiling or 1), "auto: the memory plan's largest (--fsdp: no GPU holds the model)"
    elif not probe:
        start = min(effective, ceiling or effective)
        return AUTO_BASE_BATCH, cfg.grad_accum, f"auto: probed on the GPU when training starts, from {start}"
    else:
        started = time.perf_counter()
        model = model_from_config(cfg, checked.model_config)
        try:
            batch = agree_on_smallest(largest_fitting_batch(model, checked.precision, checked.block_size,
                                                            min(effective, ceiling or effective),
                                                            cfg.gradient_checkpointing))
        finally:
            del model
            torch.cuda.empty_cache()
        why = f"auto: probed in {time.perf_counter() - started:.0f} s"
    return batch, -(-effective // batch), why


def model_from_config(cfg: TrainConfig, model_config):
    """A randomly initialised model of the configured architecture on this process's GPU, with LoRA adapters when
    the run has them: what the probe measures, without reading the weights."""
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM

    # The GELU and the loss training runs; attention stays plain SDPA, whose mask (isolated documents) costs the
    # most, so the batch found fits whichever attention the data gets.
    if cfg.tanh_gelu and (faster := fast_gelu(model_config)):
        model_config = copy.deepcopy(model_config)
        model_config.update(faster)
    with torch.device(PartialState().device):
        model = AutoModelForCausalLM.from_config(model_config, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    use_chunked_loss(model)
    return add_lora(model, cfg) if cfg.lora_rank else model


def largest_fitting_batch(model, precision: str, block_size: int, limit: int, checkpointing: bool) -> int:
    """Try powers of two from the largest up to `limit` down to 1 on this process's GPU.

    The probe runs the model as training will: in train mode (a loaded model is in eval mode, where dropout is
    off and GPT-2 skips gradient checkpointing), with checkpointing on exactly when the run asks for it. The
    model's mode is restored afterwards."""
    from accelerate import PartialState

    device = PartialState().device
    model.to(device)
    if checkpointing:
        model.gradient_checkpointing_enable()
    was_training = model.training
    model.train()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    held = torch.empty(held_bytes(model, world_size), dtype=torch.uint8, device=device)
    total = torch.cuda.get_device_properties(device).total_memory
    batch = 1 << (limit.bit_length() - 1)
    try:
        while batch > 1 and not _fits(model, device, dtype, batch, block_size, total):
            batch //= 2
    finally:
        model.train(was_training)
        del held
        torch.cuda.empty_cache()
    return batch


def held_bytes(model, world_size: int) -> int:
    """Memory training will hold that a forward and backward of the bare model do not: AdamW's two fp32 moments
    (trainable weights only: LoRA freezes the rest), allocated at the first optimizer step, and with several
    processes DDP's gradient buckets. DDP's bucket_cap_mb (25 MiB by default) sizes each bucket, not their sum:
    the buckets together hold a copy of every trainable gradient, in the gradient's dtype, because Trainer leaves
    gradient_as_bucket_view at its default (False)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    moments = 2 * 4 * sum(p.numel() for p in trainable)
    buckets = sum(p.numel() * p.element_size() for p in trainable) if world_size > 1 else 0
    return moments + buckets


def agree_on_smallest(batch: int) -> int:
    """Every rank must train with the same micro-batch (or the gradient average weights ranks unevenly and the
    data split differs); each probed its own GPU, so all take the smallest. The all-reduce runs on the rank's own
    device: NCCL accepts only CUDA tensors."""
    from accelerate import PartialState

    state = PartialState()
    if not torch.distributed.is_initialized():  # under torchrun even one process agrees, as the GPU check proves
        return batch
    agreed = torch.tensor(batch, device=state.device)
    torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
    return int(agreed.item())


def _fits(model, device, dtype, batch: int, block_size: int, total: int) -> bool:
    """Whether a training step of `batch` rows fits, measured as the caching allocator's peak reserved memory (what
    the GPU really gives up, fragmentation included) against MEMORY_HEADROOM of the GPU."""
    torch.cuda.reset_peak_memory_stats(device)
    try:
        ids = torch.zeros((batch, block_size), dtype=torch.long, device=device)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return torch.cuda.max_memory_reserved(device) <= MEMORY_HEADROOM * total
    except RuntimeError as exc:
        if not out_of_memory(exc):
            raise
        return False
    finally:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


# What CUDA libraries say when they cannot allocate: the caching allocator raises torch.OutOfMemoryError, but
# cuBLAS and cuDNN report a failed workspace allocation as a plain RuntimeError.
OUT_OF_MEMORY = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is a GPU allocation failure (so a smaller batch may fit) rather than a bug."""
    return isinstance(exc, torch.OutOfMemoryError) or any(s.lower() in str(exc).lower() for s in OUT_OF_MEMORY)


def estimated_rows(cfg: TrainConfig, block_size: int) -> int:
    """Training rows an epoch will have, from the input files' sizes (a `stat` each, nothing read)."""
    train, _ = discover(DataOptions.of(cfg))
    paths = [p for p in train.saved_dataset.rglob("*") if p.is_file()] if train.saved_dataset else train.files
    text_bytes = sum(p.stat().st_size for p in paths)
    return max(1, int(text_bytes / BYTES_PER_TOKEN) // block_size)


def should_compile(cfg: TrainConfig, checked: Checked, train_rows: int, sequences_per_step: int) -> tuple[bool, str]:
    """Whether to torch.compile the model for --compile on|off|auto, and why.

    auto compiles on a CUDA GPU of known peak when the run's estimated duration times COMPILE_SAVES exceeds the
    compile time: measured, when an earlier compiled run into --output-dir had the same GPU and FLOPs per token
    (architecture, adapters, block size), else COMPILE_SECONDS; never on CPU, where inductor's C++ build is slow
    and needs a compiler in the image.
    """
    if cfg.compile != "auto":
        return cfg.compile == "on", f"--compile {cfg.compile}"
    if cfg.quantize:
        return False, f"auto: not with --quantize {cfg.quantize} (Trainer refuses to train a compiled quantized model)"
    peak = mfu.peak_flops(checked.device, checked.precision) if checked.device != "cpu" else None
    if not peak:
        return False, "auto: not on a CUDA GPU with a known peak"
    per_token = flops_per_token(checked.model_config, checked.block_size)
    rows = cfg.max_steps * sequences_per_step if cfg.max_steps else cfg.epochs * train_rows
    seconds = rows * checked.block_size * per_token / (peak * ASSUMED_MFU)
    measured = measured_compile_seconds(cfg, checked.device, per_token)
    compiling = COMPILE_SECONDS if measured is None else measured
    compiled = seconds * COMPILE_SAVES > compiling
    return compiled, (f"auto: about {seconds / 60:.0f} min of training {'repays' if compiled else 'would not repay'} "
                      f"about {compiling:.0f} s of compiling"
                      f"{' (assumed)' if measured is None else ' (measured by the last run here)'}")


def measured_compile_seconds(cfg: TrainConfig, device: str, per_token: float) -> float | None:
    """The compile time the last compiled run into --output-dir measured (metrics.json), if it ran on the same GPU
    model with the same FLOPs per token; None otherwise."""
    try:
        earlier = json.loads((cfg.output_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(earlier, dict) or earlier.get("device") != device or earlier.get("compile_seconds") is None:
        return None
    same_model = math.isclose(earlier.get("flops_per_token") or 0.0, per_token, rel_tol=1e-9)
    return float(earlier["compile_seconds"]) if same_model else None


def flops_per_token(model_config, block_size: int) -> float:
    """mfu.flops_per_token of the architecture, from a model built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    return mfu.flops_per_token(model, block_size)


def tf32_supported() -> bool:
    """TF32 matmuls exist from Ampere (compute capability 8.0) on."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability(0)[0] >= 8
