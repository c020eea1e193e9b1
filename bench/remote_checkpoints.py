"""What --checkpoint-to costs, on CPU, for a GPT-2 124M-shaped model against an S3-protocol server on 127.0.0.1
(moto's, tests/support/s3server.py): upload seconds and training stall per checkpoint, and seconds from a fresh
node's start to its first resumed step when the checkpoint comes from the store, each against the local-only
baseline measured in the same run.

    python -m bench.remote_checkpoints [--steps 4] [--save-steps 2] [--json .bench/remote.json]

Runs, one after the other: (1) local only: --max-steps N, a checkpoint every --save-steps; (2) the same with
--checkpoint-to; (3) a fresh node (empty output, checkpoint and cache directories) resuming from the store with
one more step, stopped at its first step; (4) the same resume from the local checkpoint of run (2), without the
store. Times come from the log's JSON fields (save_seconds, upload_seconds, upload_wait_seconds,
download_seconds) and from when each line arrives.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import assets
from tests.support.s3server import S3Server

REPO = Path(__file__).resolve().parent.parent
BUCKET = "bench-checkpoints"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("tiny", "small", "gpt2"), default="gpt2")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-steps", type=int, default=2)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args(argv)

    workdir = args.workdir.resolve()
    model, data = assets.model(workdir, args.size), assets.corpus(workdir)
    valid = workdir / "split" / "valid-8-lines.txt"  # evaluation is not what this measures
    valid.parent.mkdir(parents=True, exist_ok=True)
    valid.write_text("".join((data / "valid.txt").read_text().splitlines(keepends=True)[:8]))
    root = workdir / "remote-checkpoints"
    shutil.rmtree(root, ignore_errors=True)
    common = ["--model", str(model), "--data-dir", str(data), "--train-file", "train.txt", "--valid-file", str(valid),
              "--batch-size", "1", "--grad-accum", "1", "--block-size", str(args.block_size), "--logging-steps", "1",
              "--save-steps", str(args.save_steps), "--eval-steps", "1000", "--log-format", "json",
              "--report-to", "none"]
    steps = ["--max-steps", str(args.steps)]
    with S3Server() as server:
        server.client().create_bucket(Bucket=BUCKET)
        store = ["--checkpoint-to", f"s3://{BUCKET}/run"]
        env = server.env()
        local = run(common + steps + dirs(root / "local"), env)
        remote = run(common + steps + dirs(root / "remote") + store, env)
        more = ["--max-steps", str(args.steps + 1), "--overwrite"]
        fresh = run(common + more + dirs(root / "fresh-node") + store, env, until="train step")
        local_resume = run(common + more + dirs(root / "remote"), env, until="train step")
    report = figures(args, local, remote, fresh, local_resume)
    for key, value in report.items():
        print(f"{key:<44} {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    return report


def dirs(out: Path) -> list[str]:
    return ["--output-dir", str(out), "--cache-dir", str(out / "cache")]


def figures(args, local: dict, remote: dict, fresh: dict, local_resume: dict) -> dict:
    def mean(values: list[float]) -> float:
        return round(sum(values) / len(values), 2) if values else 0.0

    uploads = remote["fields"].get("upload_seconds", [])
    megabytes = [b / 1e6 for b in remote["fields"].get("upload_bytes", [])]
    stalls = remote["fields"].get("upload_wait_seconds", [])
    checkpoints = len(remote["fields"].get("save_seconds", []))
    stall_per_checkpoint = sum(stalls) / checkpoints if checkpoints else 0.0
    return {
        "model": f"{args.size}, batch 1 x {args.block_size} tokens, {args.steps} steps, a checkpoint every "
                 f"{args.save_steps}",
        "checkpoint_megabytes": round(mean(megabytes)),
        "save_seconds_local": mean(local["fields"].get("save_seconds", [])),
        "upload_seconds_per_checkpoint": mean(uploads),
        "upload_megabytes_per_second": round(sum(megabytes) / sum(uploads), 1) if uploads else 0.0,
        "training_stall_seconds_per_checkpoint": round(stall_per_checkpoint, 2),
        "wait_for_the_last_upload_before_publishing_seconds": mean(remote["fields"].get("final_upload_wait_seconds",
                                                                                        [])),
        "train_seconds_local": round(local["train"], 1),
        "train_seconds_with_store": round(remote["train"], 1),
        "train_ratio_with_store_over_local": round(remote["train"] / local["train"], 2),
        "run_seconds_local": round(local["exit"], 1),
        "run_seconds_with_store": round(remote["exit"], 1),
        "run_ratio_with_store_over_local": round(remote["exit"] / local["exit"], 2),
        "fresh_node_download_seconds": mean(fresh["fields"].get("download_seconds", [])),
        "fresh_node_first_step_seconds": round(fresh["until"], 1),
        "local_resume_first_step_seconds": round(local_resume["until"], 1),
        "fresh_node_over_local_resume": round(fresh["until"] / local_resume["until"], 2),
    }


def run(arguments: list[str], env: dict[str, str], until: str | None = None) -> dict:
    """`finetune train` with its log's numeric fields collected; seconds from start to the first training line
    ("train: starting") and to the last step (`train`), to `until`'s first line (then it is stopped), and to exit."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("FINETUNE_", "SM_", "AIP_"))}
    environ.update(env, HF_HUB_OFFLINE="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "entrypoint", "train", *arguments], env=environ, cwd=REPO,
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    result: dict = {"fields": {}}
    tail: list[str] = []
    for line in process.stderr:
        tail = (tail + [line])[-20:]
        try:
            record = json.loads(line)
        except ValueError:
            continue
        message, now = record.get("message", ""), time.perf_counter() - start
        for key in ("save_seconds", "upload_seconds", "upload_bytes", "upload_wait_seconds", "download_seconds"):
            if key in record:
                saving = key != "upload_wait_seconds" or record.get("upload_wait_before", "").startswith("saving")
                result["fields"].setdefault(key if saving else "final_upload_wait_seconds", []).append(record[key])
        if message.startswith("train: starting"):
            result.setdefault("started", now)
        if message.startswith("train step"):
            result["last_step"] = now
        if until and message.startswith(until):
            result["until"] = now
            process.kill()  # the bench's own child; what it would do next is not measured
            break
    process.wait()
    result["exit"] = time.perf_counter() - start
    if (until and "until" not in result) or (not until and process.returncode != 0):
        sys.stderr.write("".join(tail))
        raise SystemExit(f"remote checkpoint bench: finetune train exited {process.returncode}.")
    result["train"] = result.get("last_step", 0.0) - result.get("started", 0.0)
    return result


if __name__ == "__main__":
    main()
