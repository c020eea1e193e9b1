"""Samples during training (--sample-prompts): at every evaluation, the one before the first step included, rank 0
completes each prompt greedily and logs the completions, writes them to TensorBoard as text and appends them to
<output-dir>/samples.jsonl (one {"step", "prompt", "completion"} object per line), which a resume keeps up to its
step.

Sampling must not change the run: the random states (Python, NumPy, torch CPU and CUDA) and the model's train/eval
mode are saved before and restored after, so a run with samples trains the same weights as one without, and a
resumed run the same as an uninterrupted one. A round stops after SAMPLE_SECONDS and says how many prompts it
skipped: the other ranks wait in the next step's collective meanwhile.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from entrypoint import fsutil, logs
from entrypoint.config.schema import TrainConfig
from entrypoint.data import prompts
from entrypoint.publish.outputs import SAMPLES

log = logs.area("samples")

SAMPLE_SECONDS = 60.0  # wall time one round of samples may take; a tiny model on a CPU needs well under 1 s a prompt


def for_run(cfg: TrainConfig, tokenizer, context: int) -> Samples | None:
    """The callback for this run's --sample-prompts (None without the option), every prompt tokenized and
    checked to fit the model's `context` with the tokens to generate (a DataError otherwise)."""
    if cfg.sample_prompts is None:
        return None
    read = prompts.read(cfg.sample_prompts)
    ids = [prompts.token_ids(tokenizer, p) for p in read]
    prompts.check_fit([len(i) for i in ids], cfg.sample_max_new_tokens, context, cfg.sample_prompts)
    return Samples(read, ids, tokenizer, cfg)


class Samples(TrainerCallback):
    """Generates, logs and records one completion per prompt at every evaluation, on rank 0."""

    def __init__(self, read: list[prompts.Prompt], ids: list[list[int]], tokenizer, cfg: TrainConfig):
        self.prompts, self.ids, self.tokenizer = read, ids, tokenizer
        self.max_new_tokens, self.seed = cfg.sample_max_new_tokens, cfg.seed
        self.path = cfg.output_dir / SAMPLES
        self.runs_dir = cfg.runs_dir if "tensorboard" in cfg.report_to else None
        self.writer = None
        # Steps already sampled (the final evaluation may repeat the last one); None until training begins, or for
        # a run finished from a checkpoint at its last step, which never begins.
        self.sampled: set[int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.sampled = keep_until(self.path, state.global_step)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or model is None:
            return
        if self.sampled is None:
            self.sampled = keep_until(self.path, state.global_step)
        if state.global_step not in self.sampled:
            self.sampled.add(state.global_step)
            self.round(model, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def round(self, model, step: int) -> list[dict]:
        """Sample every prompt (until SAMPLE_SECONDS), leaving random states and the model's mode as they were."""
        start, rows = time.perf_counter(), []
        was_training, saved = model.training, random_states()
        model.eval()
        try:
            for prompt, ids in zip(self.prompts, self.ids, strict=True):
                left = SAMPLE_SECONDS - (time.perf_counter() - start)
                if left <= 0:
                    break
                torch.manual_seed(self.seed)  # greedy draws nothing, but a model that samples internally repeats
                rows.append({"step": step, "prompt": prompt.shown(), "completion": self.complete(model, ids, left)})
                log.info(f"step {step}: {prompt.label()!r} -> {rows[-1]['completion']!r}", **rows[-1])
        finally:
            model.train(was_training)
            restore(saved)
        seconds = time.perf_counter() - start
        if len(rows) < len(self.prompts):
            log.warning(f"step {step}: sampled {len(rows)} of {len(self.prompts)} prompts in {seconds:.0f} s, the "
                        f"limit a round may take ({SAMPLE_SECONDS:.0f} s); the rest are skipped this time",
                        step=step, sampled=len(rows), prompts=len(self.prompts))
        self.record(rows, step)
        return rows

    def complete(self, model, ids: list[int], seconds: float) -> str:
        device = next(model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad,
                                 max_time=seconds)
        return self.tokenizer.decode(out[0][len(ids):], skip_special_tokens=True)

    def record(self, rows: list[dict], step: int) -> None:
        """Append the round to samples.jsonl and, with TensorBoard on, one text entry per prompt."""
        with self.path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        if self.runs_dir is None or not rows:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.runs_dir))
        for n, (prompt, row) in enumerate(zip(self.prompts, rows, strict=False), 1):
            self.writer.add_text(f"samples/prompt_{n}", f"**{prompt.label()}**\n\n{row['completion']}", step)
        self.writer.flush()


def keep_until(path: Path, step: int) -> set[int]:
    """Drop the samples a resumed run will make again (those after `step`; every one when it starts fresh at step
    0) and return the steps that stay."""
    if not path.is_file():
        return set()
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [row for row in rows if step > 0 and row.get("step", 0) <= step]
    if len(kept) != len(rows):
        fsutil.write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept))
    return {row["step"] for row in kept}


def random_states() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def restore(states: tuple) -> None:
    python, numpy, cpu, cuda = states
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
