"""A run's identity: the options that decide what is trained, so a checkpoint continues only the run that wrote it.

Every TrainConfig option is in exactly one of IDENTITY and MAY_CHANGE (tests/train/test_identity.py fails on an
option in neither, so each new option gets a decision and a reason). Identity is what was asked for, not what the
hardware resolved: `--precision auto` may resume on another GPU type, and `--batch-size auto` counts as its
effective batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

from entrypoint.config.schema import AUTO_BASE_BATCH, TrainConfig

# Options whose value changes the model a run produces: a resume under another value would silently continue
# the old optimizer, schedule and data order with the new setting half applied.
IDENTITY = ("model", "block_size", "packing", "txt_split", "text_field", "validation_split", "learning_rate",
            "lr_scheduler", "warmup_steps", "weight_decay", "batch_size", "grad_accum", "seed", "precision",
            "lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "quantize", "prompt_field",
            "completion_field", "messages_field", "train_on_prompt", "isolate_documents", "dpo_beta", "fsdp",
            "chosen_field", "rejected_field")
# Of IDENTITY, options added after checkpoints were written: left out at their defaults, so those still resume.
LATER = ("dpo_beta", "chosen_field", "rejected_field")

# Options a resume may change, each with the reason.
MAY_CHANGE = {
    "data_dir": "where the data is mounted; what it holds is the data fingerprint, which is part of the identity",
    "train_file": "which files are read; what they hold is the data fingerprint, which is part of the identity",
    "valid_file": "which files are read; what they hold is the data fingerprint, which is part of the identity",
    "dataset": "which datasets are read; their revisions, contents and weights are the data fingerprint, which is "
               "part of the identity",
    "dataset_config": "which config is read; what it holds is the data fingerprint, which is part of the identity",
    "dataset_split": "which split is read; what it holds is the data fingerprint, which is part of the identity",
    "dataset_revision": "which revision is read; the commit it resolves to is in the data fingerprint, which is part "
                        "of the identity",
    "cache_dir": "where tokenized data is cached; the cache key is the data fingerprint",
    "preprocessing_workers": "how many processes tokenize; the tokens are the same",
    "output_dir": "where the model is published",
    "checkpoint_dir": "where checkpoints are looked for; another one starts another run",
    "epochs": "to extend or shorten training; the learning-rate schedule stretches to the new length from there",
    "max_steps": "to extend or shorten training; the learning-rate schedule stretches to the new length from there",
    "eval_steps": "evaluation cadence: evaluating does not change the weights",
    "max_eval_tokens": "how much held-out data an evaluation scores: evaluating does not change the weights",
    "save_steps": "checkpoint cadence: saving does not change the weights",
    "save_total_limit": "how many checkpoints are kept on disk",
    "early_stopping_patience": "when to stop, like --max-steps",
    "logging_steps": "logging cadence",
    "gradient_checkpointing": "recomputes activations instead of storing them: the same math, less memory",
    "compile": "the same math, compiled (last-bit rounding may differ)",
    "tanh_gelu": "the same activation function in one kernel (within about 1e-6 in fp32)",
    "report_to": "where metrics are reported",
    "log_format": "how log lines look",
    "tensorboard_dir": "where TensorBoard events go",
    "sample_prompts": "what is sampled to show progress: sampling saves and restores the random state and the "
                      "model's mode, so the weights are the same",
    "sample_max_new_tokens": "how long the samples are: sampling does not change the weights",
    "nproc_per_node": "the world size may change on resume: the run continues, but no longer exactly",
    "nnodes": "the world size may change on resume: the run continues, but no longer exactly",
    "node_rank": "which node this is",
    "rdzv_endpoint": "where the nodes meet",
    "resume": "whether to resume at all",
    "overwrite": "whether to replace a published model",
    "hub_token": "a credential",
    "export_to": "where the published model is uploaded afterwards; the model is the same",
    "checkpoint_to": "where checkpoints are mirrored; the checkpoints and the model are the same",
    "store_retries": "how long an object-store outage is waited out; what is stored is the same",
    "publish_worse": "whether a final model worse than the untrained one may be published: decides publishing, "
                     "not training",
}

# Of MAY_CHANGE, those that change no output at all: a rerun after success that differs only in these finds the
# published model done (its COMPLETE marker's config_hash leaves them out). The rest change the published result
# (a longer run, another world size) or where it goes, so a finished model needs --overwrite to be replaced.
REPORTING = frozenset({"log_format", "report_to", "preprocessing_workers", "hub_token", "tensorboard_dir",
                       "cache_dir", "logging_steps", "resume", "overwrite", "node_rank", "rdzv_endpoint", "compile",
                       "publish_worse", "export_to", "checkpoint_to", "store_retries"})

DEFAULTS = {field.name: field.default for field in dataclasses.fields(TrainConfig)}

# How a changed identity value is named in the error, when it is not an option of the same name.
LABELS = {"data": "data fingerprint (the files' contents, the tokenizer, --txt-split, --text-field, the split)",
          "sequences_per_step": "--batch-size x --grad-accum"}


def values(cfg: TrainConfig, block_size: int, data_fingerprint: str) -> dict:
    """The identity of a run: option values (as requested) plus the data fingerprint and resolved block size."""
    batch = AUTO_BASE_BATCH if cfg.batch_size == "auto" else cfg.batch_size
    found = {name: getattr(cfg, name) for name in IDENTITY if name not in ("batch_size", "grad_accum")}
    found.update(data=data_fingerprint, block_size=block_size, sequences_per_step=batch * cfg.grad_accum)
    if not cfg.fsdp:  # a sharded checkpoint loads only into a sharded model, and an ordinary one only into an
        del found["fsdp"]  # ordinary one; off, it is left out, so checkpoints from before the option still resume
    for name in LATER:
        if found[name] == DEFAULTS[name]:
            del found[name]
    return found


def digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changes(old: dict, new: dict) -> list[str]:
    """'name old -> new' for every identity value that differs."""
    return [f"{LABELS.get(k, '--' + k.replace('_', '-'))} {old.get(k)} -> {new.get(k)}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
