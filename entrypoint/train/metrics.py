"""metrics.json and the final log line, assembled in one place from one record of the run (RunRecord), and the
measurements that feed it: step times (StepTimer), the compile time, MFU, perplexity.

The record covers the whole run from step 0 whatever the restarts: token totals and the loss history come from the
checkpoint resumed plus this session (trainer.TokenCounter, progress.ProgressLog).
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from entrypoint import logs
from entrypoint.train import mfu as flops

log = logs.area("compile")


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


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
            log.info(f"first step took {self.seconds[0]:.1f} s, the next {self.seconds[1]:.2f} s",
                     first_step_seconds=self.seconds[0])

    def step_seconds(self, quantile: float = 0.5) -> float | None:
        """An optimizer step's wall time at `quantile` (nearest rank) of the periods, or of the steps when there
        is only one; the median by default. The 0.9 quantile over the median is the step-time spread."""
        times = sorted(self.periods or self.seconds)
        if not times:
            return None
        return statistics.median(times) if quantile == 0.5 else times[round(quantile * (len(times) - 1))]

    def compile_seconds(self) -> float | None:
        """The compile time: the first step's excess over the typical step; None when the model was not compiled
        (or ran a single step)."""
        if not self.compiled or len(self.seconds) < 2:
            return None
        return max(0.0, self.seconds[0] - statistics.median(self.seconds[1:]))

    def mfu(self, flops_per_token: float, plan, real_tokens: int, steps: int, world_size: int) -> float | None:
        """MFU of this run from the measured optimizer-step time: the useful tokens of a typical step on one
        device over the step's wall time, against the dense peak of the plan's (plan.RunPlan) device for its
        precision and TF32 setting (mfu.PEAK_TFLOPS). None on a CPU or an unknown GPU.

        `real_tokens` (summed over ranks) and `steps` must cover the same steps: the whole run's tokens, checkpointed
        counts included, over the whole run's optimizer steps. A resumed process times only its own steps, but a
        step holds as many tokens whichever session ran it; dividing the whole run's tokens by this session's
        steps would multiply MFU by the whole run's steps over this session's (2x after a resume halfway)."""
        seconds = self.step_seconds()
        if not seconds or not real_tokens or not steps:
            return None
        per_device_step = real_tokens / steps / world_size
        return flops.mfu_from(flops_per_token, plan.device, plan.precision, per_device_step / seconds,
                              tf32=plan.tf32)


@dataclass
class RunRecord:
    """Everything metrics.json is made of, gathered once at the end of training (job.record)."""

    plan: object  # plan.RunPlan
    stats: object  # data.DataStats
    totals: dict  # TokenCounter.totals: whole-run train_tokens, train_positions, train_seconds, target_tokens
    history: list[dict]  # every log record of the whole run
    final: dict  # the evaluation of the published model
    session_loss: float  # Trainer's mean training loss over this session's steps
    first_step: int  # the step this session started from
    global_step: int
    epoch: float
    eval_seconds: float  # evaluations of the whole run
    timer: StepTimer
    flops_per_token: float
    parameters: int
    world_size: int
    train_on_prompt: bool


def peak_memory() -> int:
    """Peak bytes: the GPU's allocations, or this process's resident set on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def summarize(run: RunRecord) -> dict:
    """metrics.json: the whole run from step 0, whatever the restarts."""
    plan, stats, totals = run.plan, run.stats, run.totals
    real, positions, training = totals["train_tokens"], totals["train_positions"], totals["train_seconds"]
    evals = [h for h in run.history if "eval_loss" in h]
    initial = [h["eval_loss"] for h in evals if h["step"] == 0]
    final_loss = run.final["eval_loss"]
    return {
        "eval_loss": final_loss,
        "perplexity": perplexity(final_loss),
        "best_eval_loss": min([h["eval_loss"] for h in evals] or [final_loss]),
        **({"initial_eval_loss": initial[0], "initial_perplexity": perplexity(initial[0])} if initial else {}),
        "train_loss": whole_run_train_loss(run.history, run.first_step, run.session_loss, run.global_step),
        "global_step": run.global_step,
        "epoch": run.epoch,
        "train_runtime": training + run.eval_seconds,
        "train_tokens": real,
        "target_tokens": totals["target_tokens"],
        "data_format": stats.data_format,
        "isolate_documents": stats.isolated,
        "train_on_prompt": run.train_on_prompt,
        "useful_tokens_per_second": real / training if training > 0 else 0.0,
        "eval_seconds": run.eval_seconds,
        "padding_fraction": 1 - real / positions if positions else 0.0,
        "mfu": run.timer.mfu(run.flops_per_token, plan, real, run.global_step, run.world_size),
        "step_seconds": run.timer.step_seconds(),
        "step_seconds_p90": run.timer.step_seconds(0.9),
        "flops_per_token": run.flops_per_token,
        "compile_seconds": run.timer.compile_seconds(),
        "world_size": run.world_size,
        "device": plan.device,
        "precision": plan.precision,
        "peak_memory_bytes": peak_memory(),
        "block_size": plan.block_size,
        "parameters": run.parameters,
        "data_prepare_seconds": stats.prepare_seconds,
        "data_cache_hit": stats.cache_hit,
        "train_documents": stats.train_documents,
        "dropped_tokens": stats.dropped_tokens,
        **({"train_tokens_by_source": stats.source_tokens} if getattr(stats, "source_tokens", None) else {}),
        **preference_metrics(run.final, run.history),
        **({"cut_pairs": stats.cut_pairs} if stats.data_format == "preference" else {}),
    }


# DPO's statistics (train/dpo.py) as metrics.json names them: the final evaluation's, and the last training window's.
REWARDS = {"rewards/accuracy": "reward_accuracy", "rewards/margin": "reward_margin",
           "rewards/chosen": "rewards_chosen", "rewards/rejected": "rewards_rejected"}


def preference_metrics(final: dict, history: list[dict]) -> dict:
    """With DPO: the final evaluation's rewards and accuracy, the untrained model's accuracy (step 0) and the last
    training window's; {} for other runs."""
    if "eval_rewards/accuracy" not in final:
        return {}
    found = {name: final[f"eval_{key}"] for key, name in REWARDS.items()}
    initial = next((h["eval_rewards/accuracy"] for h in history if h.get("step") == 0
                    and "eval_rewards/accuracy" in h), None)
    if initial is not None:
        found["initial_reward_accuracy"] = initial
    window = next((h for h in reversed(history) if "rewards/accuracy" in h), None)
    if window is not None:
        found |= {f"train_{name}": window[key] for key, name in REWARDS.items()}
    return found


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


def final_line(metrics: dict, model_dir) -> str:
    """The run's last log line (in the `done` area): what a person reads first in `kubectl logs`."""
    mfu = f", MFU {metrics['mfu']:.1%}" if metrics.get("mfu") is not None else ""
    before = metrics.get("initial_eval_loss")
    loss_before = f" (before training {before:.4f})" if before is not None else ""
    if "reward_accuracy" in metrics:
        initial = metrics.get("initial_reward_accuracy")
        quality = f"reward accuracy {metrics['reward_accuracy']:.2f}" + \
            (f" (before {initial:.2f})" if initial is not None else "")
    else:
        quality = f"perplexity {metrics['perplexity']:.2f}" + \
            (f" (before {perplexity(before):.2f})" if before is not None else "")
    return (f"eval loss {metrics['eval_loss']:.4f}{loss_before}, {quality} on "
            f"{metrics.get('data_format', 'text')} data, "
            f"{metrics['useful_tokens_per_second']:,.0f} useful tokens/s, padding "
            f"{metrics['padding_fraction']:.1%}{mfu}, peak memory {metrics['peak_memory_bytes'] / 2**30:.2f} GiB, "
            f"{metrics['global_step']} steps in {metrics['train_runtime']:.0f} s after "
            f"{metrics['data_prepare_seconds']:.1f} s of data preparation, model at {model_dir}")
