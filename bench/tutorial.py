"""The tutorial recipe this project grew from, as published plus only what it needs to run today.

Recipe: load_dataset("text") -> GPT-2 tokenizer with pad = EOS, every line padded to 512 tokens -> Trainer with
batch 4 x accumulation 8, learning rate 2e-5, 3 epochs, fp16 -> evaluate -> save_pretrained.
Added so it runs under transformers 5: a causal-LM collator (the recipe passed no labels), fp16 only on CUDA,
an output directory, and the epochs/max-steps overrides the benchmark uses to keep CPU runs short.
Added to measure it, without changing what it computes: a collator wrapper that counts real and padded
positions, timers around data preparation and training, and a metrics file in the job's key names.

    python -m bench.tutorial --model DIR --train-file train.txt --valid-file valid.txt --output-dir OUT
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


class CountingCollator:
    """Wraps the recipe's collator; sums attention-mask ones (real tokens) and all positions it hands out."""

    def __init__(self, collator):
        self.collator = collator
        self.real = self.positions = 0
        self.counting = True

    def __call__(self, rows):
        batch = self.collator(rows)
        if self.counting:
            self.real += int(batch["attention_mask"].sum())
            self.positions += batch["input_ids"].numel()
        return batch


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Model directory with a GPT-2 tokenizer.")
    parser.add_argument("--train-file", required=True)
    parser.add_argument("--valid-file", required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--metrics", type=Path, help="Write the measured metrics here as JSON.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """The recipe, top to bottom as published, with the timers and the counting collator around it."""
    args = arguments(argv)
    import torch
    from datasets import load_dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    start = time.perf_counter()
    dataset = load_dataset("text", data_files={"train": args.train_file, "validation": args.valid_file})
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token = tokenizer.eos_token

    def tokenize(examples):
        return tokenizer(examples["text"], padding="max_length", truncation=True, max_length=512)

    tokenized = dataset.map(tokenize, batched=True, remove_columns=["text"])
    prepare_seconds = time.perf_counter() - start

    model = AutoModelForCausalLM.from_pretrained(args.model)
    training_args = TrainingArguments(
        output_dir=str(args.output_dir / "checkpoints"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=8,
        learning_rate=2e-5,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        fp16=torch.cuda.is_available(),
    )
    collator = CountingCollator(DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer = Trainer(model=model, args=training_args, train_dataset=tokenized["train"],
                      eval_dataset=tokenized["validation"], data_collator=collator)
    result = trainer.train()
    collator.counting = False  # evaluation batches are not training throughput
    final = trainer.evaluate()
    model.save_pretrained(args.output_dir / "model")
    tokenizer.save_pretrained(args.output_dir / "model")

    metrics = measured(trainer, result, final, collator, prepare_seconds)
    if args.metrics:
        args.metrics.write_text(json.dumps(metrics, indent=1))
    return metrics


def measured(trainer, result, final: dict, collator: CountingCollator, prepare_seconds: float) -> dict:
    """The recipe's run in the job's metric names, so bench/compare.py reads both sides alike."""
    import torch

    from entrypoint.train import mfu

    runtime = result.metrics["train_runtime"]
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    precision = "fp16" if cuda else "fp32"
    tokens_per_second = collator.real / runtime if runtime else 0.0
    return {
        "eval_loss": final["eval_loss"],
        "global_step": trainer.state.global_step,
        "epoch": trainer.state.epoch,
        "train_runtime": runtime,
        "train_tokens": collator.real,
        "useful_tokens_per_second": tokens_per_second,
        "padding_fraction": 1 - collator.real / collator.positions if collator.positions else 0.0,
        "device": device,
        "precision": precision,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
        "block_size": 512,
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "data_prepare_seconds": prepare_seconds,
        "mfu": mfu.mfu(trainer.model, device, precision, 512, tokens_per_second),
    }


if __name__ == "__main__":
    main()
