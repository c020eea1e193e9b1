"""What the job leaves in the output directory, and how it gets there without a reader ever seeing half:

    model/         final model, tokenizer, generation config, model card; COMPLETE written last
    metrics.json   one flat object (losses, perplexity, throughput, padding, device, memory)
    loss.png       train and eval loss curves
    history.json   the curves' points: every training-loss and evaluation record of the whole run, by step
    samples.jsonl  with --sample-prompts: {"step", "prompt", "completion"} per prompt at every evaluation
    runs/          TensorBoard events
    config.yaml    the resolved configuration, secrets redacted
    status.json    state (running, succeeded, failed, preempted), exit code, message
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from entrypoint import fsutil
from entrypoint.errors import ExitCode, OutputError

MODEL_DIR = "model"
SAMPLES = "samples.jsonl"
TERMINATION_LOG = Path("/dev/termination-log")


def check_writable(directory: Path, what: str) -> None:
    """Really try: create the directory and a file in it, so permission and read-only mounts show now."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        reason = fsutil.write_problem(directory, nbytes=2)  # any write at all; space is checked when it is used
    except OSError as exc:
        reason = exc.strerror or str(exc)
    if reason:
        raise OutputError(f"{what} {directory} is not writable ({reason}); mount it read-write "
                          f"or choose another --{what.replace(' ', '-')}.") from None


def write_status(output_dir: Path, state: str, exit_code: int | None = None, message: str = "",
                 **extra: Any) -> None:
    if not output_dir.is_dir():
        return
    status = {"state": state, "exit_code": exit_code, "message": message,
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}
    with contextlib.suppress(OSError):  # the failure being reported may be this very directory
        fsutil.write_atomic(output_dir / "status.json", json.dumps(status, indent=2) + "\n")


def termination_message(code: int, message: str) -> str:
    """`PREEMPTED (7): stopped by SIGTERM at step 30 ...`: the exit code's name and number first, so `kubectl
    describe pod` (which shows only the message and the number) says what kind of failure it was."""
    return f"{ExitCode(code).name} ({int(code)}): {message}"


def write_termination_message(code: int, message: str, platform: str | None = None) -> None:
    """Kubernetes shows /dev/termination-log in the pod status; SageMaker reads /opt/ml/output/failure. Kubernetes
    keeps the first 4096 bytes."""
    targets = [TERMINATION_LOG]
    if platform == "sagemaker":
        targets.append(Path("/opt/ml/output/failure"))
    text = termination_message(code, message).encode()[:4096].decode(errors="ignore")
    for target in targets:
        try:
            if target.parent.is_dir() and os.access(target.parent if not target.exists() else target, os.W_OK):
                target.write_text(text + "\n")
        except OSError:
            pass


def publish_model(output_dir: Path, save: callable, card: str, marker: dict,
                  interruptible=contextlib.nullcontext) -> Path:
    """Publish model/ whole with `fsutil.publish_dir`: staged beside its final place, then renamed into it.

    `save(directory)` writes the model files; `marker` goes into COMPLETE as JSON. COMPLETE is written after
    everything is flushed, so a reader that sees model/COMPLETE sees a whole model; a crash leaves only a hidden
    staging folder, cleared on the next publish. Staging runs inside `interruptible()` (a signal may end it: the
    staging folder is removed); the renames that follow are never cut short.
    """
    final = output_dir / MODEL_DIR

    def fill(staging: Path) -> str:
        save(staging)
        (staging / "README.md").write_text(card)
        for path in staging.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)  # safetensors writes 0600
        staging.chmod(0o755)
        return json.dumps({"published": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **marker}) + "\n"

    try:
        fsutil.publish_dir(final, fill, guard=interruptible)
    except Exception as exc:  # safetensors reports a full disk as its own error type, with the errno as text
        resumes = "training resumes from the last checkpoint, nothing was published"
        error = fsutil.storage_error(exc, final, "the model", after=resumes)
        if error is None and not isinstance(exc, OSError):
            raise
        raise error or OutputError(f"cannot publish the model to {final} ({exc.strerror or exc}); free space on "
                                   f"the output volume and rerun: {resumes}.") from None
    return final


def model_card(base_model: str, data_fingerprint: str, config: dict, metrics: dict,
               samples: list[dict] | None = None) -> str:
    """README.md of the published model: how to load it, the hyperparameters, the results, the eval loss before and
    after training, and (with --sample-prompts) each prompt's first and last sample from `samples`."""
    adapters = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules") if config.get("lora_rank") else ()
    hyper = {k: config[k] for k in ("epochs", "max_steps", "block_size", "batch_size", "grad_accum",
                                    "learning_rate", "lr_scheduler", "warmup_steps", "weight_decay", "precision",
                                    "packing", "seed", *adapters, "quantize", "dpo_beta")
             if k in config and (k != "quantize" or config[k])
             and (k != "dpo_beta" or metrics.get("data_format") == "preference")}
    rows = "\n".join(f"| {k} | {v} |" for k, v in hyper.items())
    shown = ("eval_loss", "perplexity", "initial_eval_loss", "train_loss", "global_step", "epoch",
             "train_tokens", "target_tokens", "useful_tokens_per_second", "world_size", "device", "precision",
             "reward_accuracy", "initial_reward_accuracy", "reward_margin", "rewards_chosen", "rewards_rejected",
             "train_reward_accuracy")
    results = "\n".join(f"| {k} | {_fmt(metrics[k])} |" for k in shown if k in metrics)
    return f"""---
library_name: transformers
pipeline_tag: text-generation
base_model: {base_model}
---
# Fine-tuned {base_model}

Fine-tuned with `finetune train` (Hugging Face Trainer) on {metrics.get("data_format", "text")} data with fingerprint
`{data_fingerprint}`{_loss_note(metrics)}.

## Load it

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("path/to/model")
tokenizer = AutoTokenizer.from_pretrained("path/to/model")
```

or sample from it: `finetune generate --model-dir path/to/model --prompt "..."`.
{_lora_note(base_model, config)}
## Hyperparameters

| name | value |
| --- | --- |
{rows}

## Results

| metric | value |
| --- | --- |
{results}
{_before_after(metrics)}{_samples_section(samples or [])}"""


def _before_after(metrics: dict) -> str:
    """The held-out loss and perplexity of the base model (evaluated before the first step) and of this one."""
    if "initial_eval_loss" not in metrics:
        return ""
    before = metrics.get("initial_perplexity")
    return f"""
## Before and after

| held-out data | base model | fine-tuned |
| --- | --- | --- |
| eval loss | {_fmt(metrics["initial_eval_loss"])} | {_fmt(metrics["eval_loss"])} |
| perplexity | {_fmt(before) if before is not None else "-"} | {_fmt(metrics["perplexity"])} |
"""


def first_and_last(samples: list[dict]) -> list[tuple[Any, dict, dict]]:
    """Per prompt, in the order first sampled: (prompt, its first sample, its last sample)."""
    seen: dict[str, list] = {}
    for row in samples:
        key = json.dumps(row["prompt"], sort_keys=True)
        if key in seen:
            seen[key][2] = row
        else:
            seen[key] = [row["prompt"], row, row]
    return [tuple(v) for v in seen.values()]


def read_samples(output_dir: Path) -> list[dict]:
    """samples.jsonl's rows (none when the run sampled nothing)."""
    path = output_dir / SAMPLES
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _samples_section(samples: list[dict]) -> str:
    if not samples:
        return ""
    parts = ["\n## Samples\n\nGreedy completions of the `--sample-prompts`, before training and at the end "
             "(every evaluation's are in the run's `samples.jsonl`, beside `model/`).\n"]
    for prompt, first, last in first_and_last(samples):
        shown = prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
        parts.append(f"\n**Prompt:**\n\n```text\n{shown}\n```\n")
        for label, row in (("step " + str(first["step"]), first), ("step " + str(last["step"]), last)):
            parts.append(f"\n{label}:\n\n```text\n{row['completion']}\n```\n")
            if first is last:
                break
    return "".join(parts)


def _loss_note(metrics: dict) -> str:
    if metrics.get("data_format", "text") == "text":
        return ""
    if metrics.get("data_format") == "preference":
        return ("; preference tuning (DPO) on chosen and rejected answers, the base model as the reference; "
                "eval_loss is the DPO loss per pair and reward_accuracy the share of held-out pairs ranked right")
    return "; the loss covered the completions or assistant turns only" if not metrics.get("train_on_prompt") \
        else "; the loss covered prompts and answers alike"


def _quantized(config: dict) -> str:
    quantize = config.get("quantize")
    if not quantize:
        return ""
    return (f" on the base model's weights quantized to {quantize} (QLoRA); they were merged into the unquantized "
            "base weights")


def _lora_note(base_model: str, config: dict) -> str:
    if not config.get("lora_rank"):
        return ""
    return f"""
## LoRA

Trained with LoRA (rank {config["lora_rank"]}){_quantized(config)}. The weights here are merged: the adapter is
folded into the base weights, so this is an ordinary model and the lines above load it. The adapter alone is in
`adapter/`, for use on top of `{base_model}` with peft:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base_model}"), "path/to/model/adapter")
```
"""


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_metrics(output_dir: Path, metrics: dict) -> None:
    fsutil.write_atomic(output_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def write_config(output_dir: Path, config: dict, sources: dict) -> None:
    body = yaml.safe_dump(config, sort_keys=False)
    origin = "".join(f"#   {k}: {v}\n" for k, v in sources.items() if v != "default")
    header = "# Resolved configuration (secrets redacted). Non-default values came from:\n"
    fsutil.write_atomic(output_dir / "config.yaml", header + origin + body)


def write_history(output_dir: Path, history: list[dict]) -> None:
    """history.json: the records loss.png is drawn from (step, loss, learning_rate, grad_norm, eval_loss, ...)."""
    points = [h for h in history if "loss" in h or "eval_loss" in h]
    fsutil.write_atomic(output_dir / "history.json", json.dumps(points, indent=1) + "\n")


def plot_losses(output_dir: Path, history: list[dict]) -> None:
    """loss.png: training loss per logging step and eval loss per evaluation; with DPO also the reward accuracy
    (training windows and evaluations) on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    preference = any("rewards/accuracy" in h or "eval_rewards/accuracy" in h for h in history)
    if preference:
        ax.set_ylabel("DPO loss (nats/pair)")
        ax.set_title("Preference tuning (DPO)")
        _plot_accuracy(ax, history)
    else:
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title("Fine-tuning loss")
    ax.legend(loc="upper left")
    fig.tight_layout()
    try:
        # The temporary name does not end in .png, so the format is named.
        fsutil.write_atomic(output_dir / "loss.png", lambda temp: fig.savefig(temp, format="png"))
    except Exception as exc:  # PIL's OSError on a full disk names no file
        error = fsutil.storage_error(exc, output_dir, "loss.png", after="nothing was published")
        if error is None:
            raise
        raise error from None
    finally:
        plt.close(fig)


def _plot_accuracy(ax, history: list[dict]) -> None:
    """Reward accuracy (the share of pairs whose chosen answer out-rewards the rejected one) on a right axis."""
    accuracy = ax.twinx()
    for key, style, label, color in (("rewards/accuracy", "-", "train reward accuracy", "tab:green"),
                                     ("eval_rewards/accuracy", "s-", "eval reward accuracy", "tab:red")):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            accuracy.plot(*zip(*points, strict=True), style, label=label, color=color)
    accuracy.set_ylim(0, 1.05)
    accuracy.set_ylabel("reward accuracy")
    accuracy.legend(loc="upper right")


def read_json(path: Path) -> dict | None:
    """metrics.json, status.json or the model's COMPLETE marker, or None when missing or unreadable."""
    return fsutil.read_marker(path)
