"""One row of the GPU check's benchmark as a process of its own (a stage, see bench/stages.py), so that a row past
its budget is killed with the training process under it: bench.compare.run_side, its metrics written to --json.

    python -m bench.gpu_row --side ours --assets assets.json --steps 50 --out DIR --json F -- [finetune options]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .compare import run_side


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=("tutorial", "ours"), required=True)
    parser.add_argument("--assets", type=Path, required=True, help="The {model, train, valid} paths that "
                        "python -m bench.assets wrote.")
    parser.add_argument("--steps", type=int, required=True, help="Optimizer steps.")
    parser.add_argument("--out", type=Path, required=True, help="The run's output directory.")
    parser.add_argument("--json", type=Path, required=True, help="Where its metrics go.")
    parser.add_argument("ours_args", nargs="*", help="Extra `finetune train` options (after --).")
    args = parser.parse_args(argv)
    paths = {key: Path(value) for key, value in json.loads(args.assets.read_text()).items()}
    metrics = run_side(args.side, paths["model"], paths["train"], paths["valid"], ["--max-steps", str(args.steps)],
                       args.ours_args, args.out)
    args.json.write_text(json.dumps(metrics))


if __name__ == "__main__":
    main()
