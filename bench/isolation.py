"""What --isolate-documents costs: training tokens/s on packed instruction data with position ids restarting at
every document (a block-diagonal attention mask) against plain packing (the causal kernel without a mask), on the
same blocks, through the real cache, collator and model.

The data is the standard library's instruction corpus (`finetune corpus --instructions`); the model a random GPT-2
of `init-model --size` with its tokenizer trained on the docstring corpus. Each step is a forward and backward pass
(no optimizer: it costs the same either way); the two modes alternate step by step so a busy machine slows both.

    python -m bench.isolation --size small --block-size 512 --batch-size 4 --steps 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> dict:
    args = arguments(argv)
    model, train, stats = setup(args)
    seconds = timed_steps(model, train, args.steps, args.batch_size)
    tokens = args.batch_size * args.block_size
    result = {mode: tokens / statistics.median(times) for mode, times in seconds.items()}
    result.update(cost=1 - result["isolated"] / result["plain"], size=args.size, block_size=args.block_size,
                  batch_size=args.batch_size, steps=args.steps, threads=torch.get_num_threads(),
                  parameters=sum(p.numel() for p in model.parameters()),
                  documents_per_block=stats.train_documents * args.block_size / max(1, stats.train_tokens))
    print(f"isolation: {result['isolated']:,.0f} tokens/s isolated vs {result['plain']:,.0f} plain packing "
          f"(isolation changes throughput by {-result['cost']:+.1%}); {args.size} GPT-2 "
          f"({result['parameters'] / 1e6:.1f}M parameters), "
          f"{args.batch_size} x {args.block_size} tokens, about {result['documents_per_block']:.0f} documents a block, "
          f"median of {args.steps} forward+backward steps, {result['threads']} threads")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", choices=("tiny", "small", "gpt2"), help="init-model --size.")
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="Timed steps per mode, after one warm-up each.")
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench" / "isolation")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    return parser.parse_args(argv)


def setup(args: argparse.Namespace):
    """The model in train mode, the cache's training rows and their statistics (corpus and model made once)."""
    from entrypoint.commands.init_model import init_model
    from entrypoint.config.schema import InitModelConfig, TrainConfig
    from entrypoint.data import corpus, pipeline, sftcorpus
    from entrypoint.data.options import DataOptions
    from entrypoint.train.model import load_model, load_tokenizer

    work = args.workdir
    if not (work / "sft" / "train.jsonl").is_file():
        corpus.build(work / "text", max_documents=3000)
        sftcorpus.build(work / "sft")
    model_dir = work / f"model-{args.size}"
    if not (model_dir / "config.json").is_file():
        init_model(InitModelConfig(output_dir=model_dir, corpus=work / "text" / "train.txt", size=args.size,
                                   context=args.block_size))
    cfg = TrainConfig(model=str(model_dir), data_dir=work / "sft", output_dir=work / "out", cache_dir=work / "cache")
    tokenizer = load_tokenizer(cfg)
    train, _, stats = pipeline.prepare(DataOptions.of(cfg), tokenizer, args.block_size)
    return load_model(cfg).train(), train, stats


def timed_steps(model, train, steps: int, batch_size: int) -> dict[str, list[float]]:
    """Seconds of each timed forward and backward pass per mode, the modes alternating which goes first."""
    from entrypoint.data.collate import PackedCollator

    collate = PackedCollator()
    rows = [train[i % len(train)] for i in range((steps + 1) * batch_size)]
    seconds: dict[str, list[float]] = {"isolated": [], "plain": []}
    torch.manual_seed(0)
    for step in range(steps + 1):
        batch = collate(rows[step * batch_size:(step + 1) * batch_size])
        for mode in ("isolated", "plain") if step % 2 else ("plain", "isolated"):
            inputs = dict(batch) if mode == "isolated" else {k: v for k, v in batch.items() if k != "position_ids"}
            start = time.perf_counter()
            model(**inputs).loss.backward()
            elapsed = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            if step:  # the first step of each mode warms up
                seconds[mode].append(elapsed)
    return seconds


if __name__ == "__main__":
    main()
