"""Speed settings that depend on the hardware and the run: the micro-batch for --batch-size auto, torch.compile,
TF32, and timing the compile.

Each choice is measured with bench/compare.py where the hardware allows; the README's Performance section has the
figures and says which choices are GPU-only and unmeasured.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import TrainerCallback

from . import efficiency
from .logs import event

# `--compile auto` compiles when the run is long enough to repay it. Assumed, not measured here (no GPU):
# compiling GPT-2 124M takes about a minute, and compiled steps are at least 15% faster on a GPU.
COMPILE_SECONDS = 60.0
COMPILE_SAVES = 0.15
ASSUMED_MFU = 0.3  # to estimate, before training, how long the run will take on a GPU from its peak
AUTO_BASE_BATCH = 8  # --batch-size auto keeps AUTO_BASE_BATCH x --grad-accum sequences per optimizer step
MEMORY_HEADROOM = 0.9  # a probe may use this share of the GPU; the rest absorbs fragmentation and eval batches


def batch_and_accumulation(cfg, plan, model) -> tuple[int, int]:
    """(micro-batch, accumulation steps) to train with. For --batch-size auto on a GPU: the largest power of two
    up to the effective batch whose forward and backward fit beside AdamW's state; on CPU, the default 8."""
    if cfg.batch_size != "auto":
        return cfg.batch_size, cfg.grad_accum
    effective = AUTO_BASE_BATCH * cfg.grad_accum
    if plan.device == "cpu":
        batch = AUTO_BASE_BATCH
    else:
        batch = agree_on_smallest(largest_fitting_batch(model, plan.precision, plan.block_size, effective,
                                                        cfg.gradient_checkpointing))
    accumulation = -(-effective // batch)
    event(f"batch size: auto chose {batch} x {accumulation} accumulation ({batch * accumulation} sequences a step)",
          batch_size=batch, grad_accum=accumulation)
    return batch, accumulation


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
    # AdamW's two fp32 moments (trainable weights only: LoRA freezes the rest) are allocated at the first
    # optimizer step; hold their room during the probe.
    optimizer_state = torch.empty(2 * sum(p.numel() for p in model.parameters() if p.requires_grad), device=device)
    total = torch.cuda.get_device_properties(device).total_memory
    batch = 1 << (limit.bit_length() - 1)
    try:
        while batch > 1 and not _fits(model, device, dtype, batch, block_size, total):
            batch //= 2
    finally:
        model.train(was_training)
        del optimizer_state
        torch.cuda.empty_cache()
    return batch


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
    torch.cuda.reset_peak_memory_stats(device)
    try:
        ids = torch.zeros((batch, block_size), dtype=torch.long, device=device)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return torch.cuda.max_memory_allocated(device) <= MEMORY_HEADROOM * total
    except torch.OutOfMemoryError:
        return False
    finally:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def should_compile(cfg, plan, model, train_rows: int, sequences_per_step: int) -> bool:
    """Whether to torch.compile the model for --compile on|off|auto; logs the choice and why.

    auto compiles on a CUDA GPU of known peak when the run's estimated duration times COMPILE_SAVES exceeds
    COMPILE_SECONDS; never on CPU, where inductor's C++ build is slow and needs a compiler in the image.
    """
    if cfg.compile != "auto":
        compiled, why = cfg.compile == "on", f"--compile {cfg.compile}"
    elif not (peak := efficiency.peak_flops(plan.device, plan.precision) if plan.device != "cpu" else None):
        compiled, why = False, "auto: not on a CUDA GPU with a known peak"
    else:
        rows = cfg.max_steps * sequences_per_step if cfg.max_steps else cfg.epochs * train_rows
        tokens = rows * plan.block_size
        seconds = tokens * efficiency.flops_per_token(model, plan.block_size) / (peak * ASSUMED_MFU)
        compiled = seconds * COMPILE_SAVES > COMPILE_SECONDS
        why = (f"auto: about {seconds / 60:.0f} min of training {'repays' if compiled else 'would not repay'} "
               f"about {COMPILE_SECONDS:.0f} s of compiling")
    event(f"compile: {'on' if compiled else 'off'} ({why})", compile=compiled)
    return compiled


def tf32_supported() -> bool:
    """TF32 matmuls exist from Ampere (compute capability 8.0) on."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability(0)[0] >= 8


class StepTimer(TrainerCallback):
    """Times optimizer steps: each step from its start to its end (the first one's excess over the typical step is
    the compile time) and the period from one step's end to the next (what MFU divides by: data loading counts,
    while the evaluations and saves that fall between two steps are outliers the median leaves out)."""

    def __init__(self, compiled: bool = False):
        self.compiled = compiled
        self.began = 0.0
        self.ended: float | None = None
        self.seconds: list[float] = []
        self.periods: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.seconds.append(now - self.began)
        if self.ended is not None:
            self.periods.append(now - self.ended)
        self.ended = now
        if self.compiled and len(self.seconds) == 2:
            event(f"compile: first step took {self.seconds[0]:.1f} s, the next {self.seconds[1]:.2f} s",
                  first_step_seconds=self.seconds[0])

    def step_seconds(self, quantile: float = 0.5) -> float | None:
        """An optimizer step's wall time at `quantile` (nearest rank) of the periods, or of the steps when there
        is only one; the median by default. The 0.9 quantile over the median is the step-time spread."""
        times = sorted(self.periods or self.seconds)
        if not times:
            return None
        return statistics.median(times) if quantile == 0.5 else times[round(quantile * (len(times) - 1))]


def _timer(trainer) -> StepTimer | None:
    return next((c for c in trainer.callback_handler.callbacks if isinstance(c, StepTimer)), None)


def compile_seconds(trainer) -> float | None:
    """The compile time StepTimer saw, or None when the model was not compiled (or ran a single step)."""
    timer = _timer(trainer)
    if timer is None or not timer.compiled or len(timer.seconds) < 2:
        return None
    return max(0.0, timer.seconds[0] - statistics.median(timer.seconds[1:]))


def step_seconds(trainer, quantile: float = 0.5) -> float | None:
    timer = _timer(trainer)
    return timer.step_seconds(quantile) if timer else None


def mfu(trainer, plan, real_tokens: int) -> float | None:
    """MFU of this run from the measured optimizer-step time: the useful tokens of a typical step on one device
    (this process's steps; `real_tokens` summed over ranks) over the step's wall time, against the GPU's dense
    peak for the precision (efficiency.PEAK_TFLOPS). None on a CPU or an unknown GPU."""
    timer = _timer(trainer)
    seconds = timer.step_seconds() if timer else None
    if not seconds or not real_tokens:
        return None
    per_device_step = real_tokens / len(timer.seconds) / trainer.args.world_size
    return efficiency.mfu_from(efficiency.flops_per_token(trainer.model, plan.block_size), plan.device,
                               plan.precision, per_device_step / seconds, tf32=tf32_supported())
