"""The memory plan against measured peak memory, on CPU: for each model and mode, `finetune train` runs two steps and
the table puts the plan's estimate (memory_estimate_bytes, logged before the model loads) beside the run's peak
resident memory (peak_memory_bytes in metrics.json), as a ratio.

    python -m bench.memory_plan [--workdir .bench/memory] [--models llama,gpt2] [--modes full,lora,qlora]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from entrypoint.commands.init_model import init_model
from entrypoint.config.schema import InitModelConfig
from entrypoint.data.corpus import build

MODES = {
    "full": {},
    "full+ckpt": {"FINETUNE_GRADIENT_CHECKPOINTING": "true"},
    "lora-nodrop": {"FINETUNE_LORA_RANK": "16", "FINETUNE_LORA_DROPOUT": "0"},
    "lora": {"FINETUNE_LORA_RANK": "16"},
    "lora+ckpt": {"FINETUNE_LORA_RANK": "16", "FINETUNE_GRADIENT_CHECKPOINTING": "true"},
    "qlora": {"FINETUNE_LORA_RANK": "16", "FINETUNE_QUANTIZE": "4bit"},
    "qlora+ckpt": {"FINETUNE_LORA_RANK": "16", "FINETUNE_QUANTIZE": "4bit", "FINETUNE_GRADIENT_CHECKPOINTING": "true"},
}
# Width 512, 8 layers: about 25M parameters (Llama) and 25M (GPT-2) besides the embeddings, enough that the
# model's terms, not the Python runtime, make most of the peak.
SHAPES = {
    "llama": {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8,
              "num_attention_heads": 8, "num_key_value_heads": 4},
    "gpt2": {"model_type": "gpt2", "n_embd": 512, "n_layer": 8, "n_head": 8, "n_positions": 512},
}
RUN = {"FINETUNE_MAX_STEPS": "2", "FINETUNE_BLOCK_SIZE": "256", "FINETUNE_BATCH_SIZE": "8", "FINETUNE_GRAD_ACCUM": "1",
       "FINETUNE_EVAL_STEPS": "2", "FINETUNE_SAVE_STEPS": "2", "FINETUNE_MAX_EVAL_TOKENS": "4096",
       "FINETUNE_REPORT_TO": "none", "FINETUNE_LOG_FORMAT": "json", "FINETUNE_PREPROCESSING_WORKERS": "1"}


def model_dir(workdir: Path, name: str, data: Path) -> Path:
    """A random model of SHAPES[name] with a 512-token BPE trained on the corpus, built once."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = workdir / name
    if (target / "config.json").is_file():
        return target
    tokenizer_dir = workdir / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        init_model(InitModelConfig(output_dir=tokenizer_dir, corpus=data / "train.txt", vocab_size=512, context=512))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = dict(SHAPES[name])
    ids = {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = AutoConfig.for_model(shape.pop("model_type"), vocab_size=len(tokenizer), **ids, **shape)
    AutoModelForCausalLM.from_config(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def measure(model: Path, data: Path, out: Path, mode: str) -> dict:
    """One run: the plan's estimate and the measured peak."""
    env = {**os.environ, **RUN, **MODES[mode], "FINETUNE_MODEL": str(model), "FINETUNE_DATA_DIR": str(data),
           "FINETUNE_OUTPUT_DIR": str(out), "FINETUNE_OVERWRITE": "true", "FINETUNE_RESUME": "false"}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "entrypoint", "train"], env=env, capture_output=True, text=True,
                            timeout=1800)
    if result.returncode:
        raise SystemExit(f"{model.name} {mode}: exit {result.returncode}\n{result.stderr[-3000:]}")
    plan = next(json.loads(line) for line in result.stderr.splitlines()
                if line.startswith("{") and '"memory_estimate_bytes"' in line)
    peak = json.loads((out / "metrics.json").read_text())["peak_memory_bytes"]
    return {"model": model.name, "mode": mode, "estimate": plan["memory_estimate_bytes"], "peak": peak,
            "ratio": plan["memory_estimate_bytes"] / peak, "seconds": time.monotonic() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(".bench/memory"))
    parser.add_argument("--models", default=",".join(SHAPES))
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    data = args.workdir / "data"
    if not (data / "valid.txt").is_file():
        build(data, max_documents=3000)
    rows = []
    print(f"{'model':6} {'mode':11} {'estimate GiB':>12} {'peak GiB':>9} {'ratio':>6}")
    for name in args.models.split(","):
        model = model_dir(args.workdir, name, data)
        for mode in args.modes.split(","):
            row = measure(model, data, args.workdir / "out", mode)
            rows.append(row)
            print(f"{name:6} {mode:11} {row['estimate'] / 2**30:12.2f} {row['peak'] / 2**30:9.2f} {row['ratio']:6.2f}",
                  flush=True)
    (args.workdir / "memory_plan.json").write_text(json.dumps(rows, indent=1) + "\n")
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"largest deviation: {worst:.0%} (the issue's bound: 30%)")


if __name__ == "__main__":
    main()
