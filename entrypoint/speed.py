"""Speed settings that depend on the hardware and the run: torch.compile, TF32, and timing the compile.

Each choice is measured with bench/compare.py where the hardware allows; docs/performance.md has the figures
and says which choices are GPU-only and unmeasured.
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


def should_compile(cfg, plan, model, train_rows: int) -> bool:
    """Whether to torch.compile the model for --compile on|off|auto; logs the choice and why.

    auto compiles on a CUDA GPU of known peak when the run's estimated duration times COMPILE_SAVES exceeds
    COMPILE_SECONDS; never on CPU, where inductor's C++ build is slow and needs a compiler in the image.
    """
    if cfg.compile != "auto":
        compiled, why = cfg.compile == "on", f"--compile {cfg.compile}"
    elif not (peak := efficiency.peak_flops(plan.device, plan.precision) if plan.device != "cpu" else None):
        compiled, why = False, "auto: not on a CUDA GPU with a known peak"
    else:
        per_step = cfg.batch_size * cfg.grad_accum * plan.block_size
        tokens = cfg.max_steps * per_step if cfg.max_steps else cfg.epochs * train_rows * plan.block_size
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
    """Times optimizer steps; the first one's excess over the typical step is the compile time."""

    def __init__(self):
        self.began = 0.0
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.began)
        if len(self.seconds) == 2:
            event(f"compile: first step took {self.seconds[0]:.1f} s, the next {self.seconds[1]:.2f} s",
                  first_step_seconds=self.seconds[0])



def compile_seconds(trainer) -> float | None:
    """The compile time StepTimer saw, or None when the model was not compiled (or ran a single step)."""
    timer = next((c for c in trainer.callback_handler.callbacks if isinstance(c, StepTimer)), None)
    if timer is None or len(timer.seconds) < 2:
        return None
    return max(0.0, timer.seconds[0] - statistics.median(timer.seconds[1:]))
