"""Peak memory of the causal-LM loss: transformers' ForCausalLMLoss against the chunked loss (entrypoint/train/loss.py),
on GPT-2-shaped logits, forward and backward, on CPU.

Each side runs in its own fresh process (the peak resident set only grows): the hidden states and the output
embedding are made first, then the process records its resident set, computes logits = hidden @ embedding^T, the
loss and its backward, and reports the peak resident set above that baseline, which is what the logits, the loss
and the gradients took. `--autocast` computes the logits in bf16 as a GPU's mixed precision does; the default is
fp32, as training on CPU runs.

    python -m bench.loss --batch-size 2 --block-size 1024
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

GPT2_VOCAB, GPT2_WIDTH = 50_257, 768


def main(argv: list[str] | None = None) -> dict:
    args = arguments(argv)
    if args.side:
        print(json.dumps(one_side(args)))
        return {}
    sides = {side: run_side(side, args) for side in ("default", "chunked")}
    result = {"batch_size": args.batch_size, "block_size": args.block_size, "vocab": args.vocab,
              "logits": "bf16 (autocast)" if args.autocast else "fp32",
              "logits_bytes": args.batch_size * args.block_size * args.vocab * (2 if args.autocast else 4), **sides,
              "peak_ratio": sides["chunked"]["peak_bytes"] / sides["default"]["peak_bytes"],
              "loss_difference": abs(sides["chunked"]["loss"] - sides["default"]["loss"])}
    gib = 2 ** 30
    print(f"loss: peak {sides['chunked']['peak_bytes'] / gib:.2f} GiB chunked vs "
          f"{sides['default']['peak_bytes'] / gib:.2f} GiB transformers' ForCausalLMLoss "
          f"(x{result['peak_ratio']:.2f}); {args.batch_size} x {args.block_size} tokens, vocabulary {args.vocab}, "
          f"{result['logits']} logits of {result['logits_bytes'] / gib:.2f} GiB; "
          f"{sides['chunked']['seconds']:.2f} s vs {sides['default']['seconds']:.2f} s forward+backward; "
          f"losses differ by {result['loss_difference']:.1e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=GPT2_VOCAB)
    parser.add_argument("--width", type=int, default=GPT2_WIDTH)
    parser.add_argument("--autocast", action="store_true", help="bf16 logits under CPU autocast.")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    parser.add_argument("--side", choices=("default", "chunked"), help=argparse.SUPPRESS)  # the child process
    return parser.parse_args(argv)


def run_side(side: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "bench.loss", "--side", side, "--batch-size", str(args.batch_size),
               "--block-size", str(args.block_size), "--vocab", str(args.vocab), "--width", str(args.width)]
    done = subprocess.run(command + (["--autocast"] if args.autocast else []), capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parent.parent)
    return json.loads(done.stdout.strip().splitlines()[-1])


def one_side(args: argparse.Namespace) -> dict:
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    from entrypoint.train.loss import causal_lm_loss

    torch.manual_seed(0)
    hidden = torch.randn(args.batch_size, args.block_size, args.width, requires_grad=True)
    embedding = (torch.randn(args.vocab, args.width) * 0.02).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.batch_size, args.block_size))
    loss_function = causal_lm_loss if args.side == "chunked" else ForCausalLMLoss
    before = rss_bytes()
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast):
        logits = hidden @ embedding.T
    loss = loss_function(logits, labels, args.vocab, num_items_in_batch=labels[:, 1:].numel())
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"peak_bytes": peak - before, "seconds": seconds, "loss": loss.item()}


def rss_bytes() -> int:
    """The resident set now (the peak, ru_maxrss, is only ever the highest so far)."""
    import os

    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


if __name__ == "__main__":
    main()
