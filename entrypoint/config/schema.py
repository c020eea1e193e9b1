"""The configuration schema: one frozen dataclass per command, each field an option with its default and help.

Every field is one option in three spellings: `--learning-rate`, `FINETUNE_LEARNING_RATE` and the YAML key
`learning_rate`. The `help` under each field becomes `--help`. Precedence, highest first:
flag > FINETUNE_* env var > platform contract (SageMaker, Vertex AI) > preset > built-in default.
options.py turns these fields into option names, typed and checked values, presets and a resolved config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit, and transformers' set_seed seeds numpy too
AUTO_BASE_BATCH = 8  # --batch-size auto keeps AUTO_BASE_BATCH x --grad-accum sequences per optimizer step


def opt(default: Any, help: str, **meta: Any) -> Any:
    """A config field: its default, its help line, and optional choices/min/max/secret/multiple/auto (an int
    field that also takes the word auto)/url (a Path field that also takes an s3:// or gs:// URL, kept a str)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class TrainConfig:
    """What `train`, `prepare`, `doctor` and `config` run with."""

    # Model
    model: str = opt("gpt2", "Base model: a Hugging Face Hub id, a local model directory, or s3://bucket/prefix or "
                             "gs://bucket/prefix (downloaded once into --cache-dir).")
    # Data
    data_dir: Path | str = opt(Path("/data"), "Directory with the training text (train.txt, *.jsonl, ...), or "
                               "s3://bucket/prefix or gs://bucket/prefix (read as streams).", url=True)
    train_file: tuple[str, ...] = opt(
        (), "Training files or globs, relative to --data-dir (repeat, or space-separated in the env var).",
        multiple=True)
    valid_file: tuple[str, ...] = opt(
        (), "Validation files or globs; without one, --validation-split percent is held out.", multiple=True)
    dataset: tuple[str, ...] = opt(
        (), "A dataset by name instead of --data-dir's files: a Hugging Face Hub id (org/name), a local dataset "
        "repository (a folder of data files, optionally with a README.md card) or one data file; NAME:WEIGHT mixes "
        "several by share of training tokens (repeat, or space-separated in the env var).", multiple=True)
    dataset_config: str | None = opt(None, "Config (subset) of every --dataset, as its card's configs name them "
                                     "[default: the dataset's default].")
    dataset_split: str = opt("train", "Split of every --dataset to train on; its validation split (validation, valid, "
                             "val or dev) evaluates when present, else --validation-split percent is held out.")
    dataset_revision: str | None = opt(None, "Hub branch, tag or commit of every --dataset from the Hub "
                                       "[default: main, resolved to its commit for the cache key].")
    text_field: str = opt("text", "Field holding the text in .jsonl/.json/.csv/.parquet/saved datasets.")
    txt_split: str = opt("line", "How .txt files divide into documents.", choices=("line", "paragraph", "file"))
    validation_split: float = opt(5.0, "Percent of documents held out for evaluation when no --valid-file.",
                                  min=0.1, max=50.0)
    max_eval_tokens: int = opt(2_000_000, "Evaluate on at most this many held-out tokens, the same evenly spaced "
                               "rows every time (0: no cap).", min=0)
    block_size: int | None = opt(None, "Tokens per training sequence [default: the model's context, at most 1024].",
                                 min=8)
    packing: bool = opt(True, "Pack documents into full blocks (EOS between them) instead of padding each one.")
    prompt_field: str = opt("prompt", "Field holding the prompt of prompt/completion records (instruction data) and "
                            "of preference records.")
    completion_field: str = opt("completion", "Field holding the completion of prompt/completion records.")
    messages_field: str = opt("messages", "Field holding the list of {role, content} messages of chat records.")
    chosen_field: str = opt("chosen", "Field holding the preferred answer of preference (DPO) records: text, or a "
                            "list of assistant messages.")
    rejected_field: str = opt("rejected", "Field holding the answer not preferred of preference (DPO) records: text, "
                              "or a list of assistant messages.")
    train_on_prompt: bool = opt(False, "Put loss on prompt and user tokens too, not only on completions and "
                                "assistant turns.")
    dpo_beta: float = opt(0.1, "DPO's beta for preference records (prompt, chosen, rejected): how far the model may "
                          "move from the reference (the base model); larger keeps it closer.", min=0.001)
    isolate_documents: bool | None = opt(
        None, "Restart position ids at every document in a packed block so no token attends across a document "
        "boundary [default: on for instruction and chat data, off for plain text].")
    cache_dir: Path | None = opt(None, "Where the tokenized dataset is cached [default: <output-dir>/cache].")
    preprocessing_workers: int = opt(0, "Processes for tokenization [default 0: one per CPU this process may use, "
                                     "from its affinity and cgroup CPU quota].", min=0)
    # Training
    output_dir: Path = opt(Path("/output"), "Where the model, metrics, plot and status are published.")
    checkpoint_dir: Path | None = opt(None, "Where checkpoints go [default: <output-dir>/checkpoints].")
    epochs: float = opt(3.0, "Training epochs (ignored when --max-steps is set).", min=0.01)
    max_steps: int | None = opt(None, "Stop after this many optimizer steps (overrides --epochs).", min=1)
    batch_size: int | str = opt(8, "Sequences per device per micro-batch; auto: the largest that fits the GPU, with "
                                f"--grad-accum rescaled to keep {AUTO_BASE_BATCH} x --grad-accum sequences per step "
                                f"({AUTO_BASE_BATCH} on CPU).",
                                min=1, auto=True)
    grad_accum: int = opt(4, "Micro-batches accumulated per optimizer step.", min=1)
    learning_rate: float = opt(5e-5, "Peak learning rate.", min=0.0, max=1.0)
    weight_decay: float = opt(0.0, "AdamW weight decay.", min=0.0, max=1.0)
    warmup_steps: int = opt(0, "Linear warm-up steps.", min=0)
    lr_scheduler: str = opt("linear", "Learning-rate schedule.",
                            choices=("linear", "cosine", "constant", "constant_with_warmup"))
    precision: str = opt("auto", "auto: bf16 where the GPU has it, else fp16 on CUDA, fp32 on CPU.",
                         choices=("auto", "fp16", "bf16", "fp32"))
    eval_steps: int | None = opt(None, "Evaluate every N steps [default: once per epoch].", min=1)
    save_steps: int = opt(200, "Save a checkpoint every N optimizer steps.", min=1)
    save_total_limit: int = opt(3, "Checkpoints kept (the newest; the best one too with early stopping).", min=2)
    early_stopping_patience: int | None = opt(
        None, "Stop after N evaluations without improvement and publish the best model.", min=1)
    logging_steps: int = opt(10, "Log loss, learning rate and throughput every N steps.", min=1)
    seed: int = opt(42, "Random seed for initialisation, data order and the validation split.", min=0, max=SEED_MAX)
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass to save memory.")
    tanh_gelu: bool = opt(True, "Run gelu_new (GPT-2, GPT-Neo, GPT-J) as PyTorch's tanh GELU: the same function "
                          "within about 1e-6, one kernel instead of a chain of pointwise ones.")
    lora_rank: int = opt(0, "LoRA rank; 0 trains every weight (full fine-tuning). The published model is merged; "
                         "the adapter is kept in model/adapter/.", min=0)
    lora_alpha: float | None = opt(None, "LoRA scaling numerator (the update is scaled by alpha / rank) "
                                   "[default: 2 x --lora-rank].", min=0.0)
    lora_dropout: float = opt(0.05, "Dropout on the LoRA input.", min=0.0, max=0.9)
    lora_target_modules: str | None = opt(
        None, "Comma-separated module names LoRA adapts, or all-linear [default: the architecture's attention and "
        "MLP projections, all-linear for unknown architectures].")
    quantize: str | None = opt(None, "Load the frozen base model quantized and train LoRA adapters on it (QLoRA): "
                               "4bit (NF4, double quantization) or 8bit; needs --lora-rank [default: none, the "
                               "weights as they are].", choices=("none", "4bit", "8bit"))
    fsdp: bool = opt(False, "Shard full fine-tuning across the GPUs with FSDP2 (weights, gradients and optimizer "
                     "state split over the processes, each decoder layer gathered in turn); needs two or more CUDA "
                     "GPUs, and not with --lora-rank or --quantize. Not yet run on GPUs (docs/lora-and-formats.md).")
    compile: str = opt("auto", "torch.compile the model; auto: only on a GPU, for runs long enough to repay the "
                       "compile time (reported as compile_seconds).", choices=("auto", "on", "off"))
    report_to: str = opt("tensorboard", "Trainer integrations, comma-separated (tensorboard, wandb, mlflow, none).")
    log_format: str = opt("text", "Log lines as plain text, each 'area: message', or one JSON object per line (time, "
                                  "level, area, message and the line's fields).", choices=("text", "json"))
    nproc_per_node: str = opt("1", "Processes per node (an integer, or auto: one per visible GPU).")
    nnodes: str = opt("1", "Nodes in a multi-node run (an integer, or min:max for elastic PyTorchJobs) "
                           "[from PET_NNODES or the Indexed Job's completions when unset].")
    node_rank: int = opt(0, "This node's rank [from PET_NODE_RANK, JOB_COMPLETION_INDEX or RANK when unset].", min=0)
    rdzv_endpoint: str | None = opt(None, "host:port of node 0 for multi-node rendezvous "
                                          "[from PET_RDZV_ENDPOINT, PET_MASTER_ADDR:PET_MASTER_PORT or "
                                          "MASTER_ADDR:MASTER_PORT when unset].")
    tensorboard_dir: Path | None = opt(None, "TensorBoard event directory [default: <output-dir>/runs].")
    sample_prompts: Path | None = opt(
        None, "File of prompts to sample from the model before the first step and at every evaluation (greedy, "
        "seeded; written to <output-dir>/samples.jsonl, TensorBoard and the card): one prompt per line, or .jsonl of "
        "strings, {\"prompt\": ...} or chat {\"messages\": [...]} records [default: no samples].")
    sample_max_new_tokens: int = opt(48, "Tokens generated per --sample-prompts prompt.", min=1, max=4096)
    resume: bool = opt(True, "Resume from the newest complete checkpoint in --checkpoint-dir, if any; "
                             "--no-resume starts fresh, moving the checkpoints there to previous-run/.")
    overwrite: bool = opt(False, "Replace a model already published in --output-dir by another configuration "
                                 "(checkpoints of other options move to previous-run/ and training starts fresh).")
    publish_worse: bool = opt(False, "Publish even when the final evaluation is non-finite or worse than the "
                              "untrained model's (otherwise exit 8, DIVERGED).")
    hub_token: str | None = opt(None, "Hugging Face token for gated or private models and datasets.", secret=True)
    export_to: str | None = opt(None, "After publishing, upload model/ to s3://bucket/prefix, gs://bucket/prefix or "
                                      "hf://namespace/repo, COMPLETE last (credentials from the environment).")
    checkpoint_to: str | None = opt(None, "Mirror every complete checkpoint to s3://bucket/prefix or "
                                          "gs://bucket/prefix while training, and resume from there on a node whose "
                                          "--checkpoint-dir has nothing newer (one run per prefix; credentials from "
                                          "the environment).")
    store_retries: int = opt(4, "Retries of each object-store transfer (--checkpoint-to, --export-to) before the run "
                                "gives up on it, waiting 1, 2, 4 ... s between tries (4: about 15 s of outage).",
                             min=0, max=16)

    @property
    def model_checkpoint_dir(self) -> Path:
        return self.checkpoint_dir or self.output_dir / "checkpoints"

    @property
    def data_cache_dir(self) -> Path:
        return self.cache_dir or self.output_dir / "cache"

    @property
    def runs_dir(self) -> Path:
        return self.tensorboard_dir or self.output_dir / "runs"


@dataclass(frozen=True)
class GenerateConfig:
    """What `generate` runs with."""

    model_dir: Path = opt(Path("/output/model"), "Model directory to sample from (a published model/).")
    prompt: str = opt("The", "Text the samples continue.")
    max_new_tokens: int = opt(60, "Tokens generated per sample.", min=1)
    temperature: float = opt(0.8, "Sampling temperature; 0 picks the likeliest token (greedy).", min=0.0)
    top_p: float = opt(0.95, "Nucleus sampling: keep the smallest token set with this much probability.",
                       min=0.0, max=1.0)
    num_samples: int = opt(1, "Samples to print.", min=1)
    seed: int = opt(0, "Random seed, so a sample can be reproduced.", min=0, max=SEED_MAX)
    chat: bool = opt(False, "Send --prompt as a user message through the model's chat template (finetune's default "
                     "when it has none), as chat training renders it; print the answer only.")


@dataclass(frozen=True)
class EvalConfig:
    """What `eval` adds to train's options (of which the model, data, block-size, packing, batch and precision ones
    apply)."""

    output: Path | None = opt(None, "Also write the results to this JSON file [default: print them only].")
    tokenizer: Path | None = opt(None, "Tokenizer directory, for a --model that has none (a training checkpoint) "
                                 "[default: --model's; a LoRA checkpoint's base model's].")
    tasks: tuple[str, ...] = opt((), "lm-evaluation-harness tasks to run as well (repeat, comma- or space-separated); "
                                 "needs the eval extra: pip install 'finetune-gpt2[eval]'.", multiple=True)
    include_path: Path | None = opt(None, "Directory of extra lm-evaluation-harness task definitions (YAML) for "
                                    "--tasks.")
    limit: int | None = opt(None, "Score at most this many examples of each --tasks task [default: all].", min=1)


@dataclass(frozen=True)
class InitModelConfig:
    """What `init-model` runs with."""

    output_dir: Path = opt(Path("/output/init-model"), "Directory to write the new model and tokenizer to.")
    corpus: Path | None = opt(None, "Text file or directory (.txt) to train the byte-level BPE tokenizer on.")
    size: str = opt("tiny", "Architecture preset.", choices=("tiny", "small", "gpt2"))
    vocab_size: int = opt(2048, "Tokenizer vocabulary size, including the 256 byte symbols.", min=260,
                          max=1_000_000)
    context: int = opt(256, "Context length (n_positions).", min=8, max=65536)
    seed: int = opt(0, "Random seed for the weights.", min=0, max=SEED_MAX)


# Architecture presets for `init-model`: (layers, heads, width). gpt2 is GPT-2 124M's shape.
MODEL_SIZES = {"tiny": (2, 2, 64), "small": (4, 4, 256), "gpt2": (12, 12, 768)}
