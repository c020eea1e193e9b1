"""The --checkpoint-to fault cases (after bench/fault_cases.py's in the table): checkpoints in an S3-protocol store
(the lab's moto server on 127.0.0.1, behind a proxy that can cut it off), a node lost with its disks, uploads cut
by SIGKILL, SIGTERM or the store going away, retention and the lease on a prefix."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from bench.fault_lab import CASES, Lab, Outcome, expect, fault, status_of

MARKER = "finetune-complete.json"  # train/checkpoints.py's; bench imports nothing of the job at import time
PREFIX = "run/"


def remote_steps(lab: Lab, bucket: str) -> dict[int, bool]:
    """The store's checkpoints as a new node sees them: step -> complete (has its marker)."""
    server, _ = lab.store
    found: dict[int, bool] = {}
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=PREFIX)
    for key in (o["Key"] for page in pages for o in page.get("Contents", [])):
        top, _, rest = key.removeprefix(PREFIX).partition("/")
        if top.startswith("checkpoint-"):
            step = int(top.split("-")[1])
            found[step] = found.get(step, False) or rest == MARKER
    return found


def kill_mid_upload(lab: Lab, bucket: str, job, sig=signal.SIGKILL, timeout: float = 300,
                    before: int | None = None) -> int | None:
    """Send `sig` to the run while a checkpoint (of a step below `before`, when given) is half in the store (files
    there, marker not yet): its step."""
    deadline = time.monotonic() + timeout
    while job.proc.poll() is None and time.monotonic() < deadline:
        torn = [step for step, done in remote_steps(lab, bucket).items()
                if not done and (before is None or step < before)]
        if torn:
            job.proc.send_signal(sig)
            return torn[0]
        time.sleep(0.02)
    return None


def weights_differ(lab: Lab, a: Path) -> float:
    """The largest absolute difference between a published model's weights and the reference run's."""
    from safetensors.torch import load_file

    assert lab.reference  # trained on first use
    b = lab.root / "reference"

    left, right = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    expect(left.keys() == right.keys(), "the models hold different tensors")
    return max(float((left[k].float() - right[k].float()).abs().max()) for k in left)


def new_node(lab: Lab, root: Path, env: dict[str, str], **extra: str) -> tuple[int, str, Path]:
    """A rerun on a node that lost its disks: empty output, checkpoint and cache directories."""
    out = root / "node-b" / "out"
    code, log = lab.train(out, **env, FINETUNE_CACHE_DIR=str(out.parent / "cache"), **extra)
    return code, log, out


@fault("node lost after its second remote checkpoint, rerun on a new node", codes=(-9, 0), published=True,
       exact=True)
def new_node_resumes_from_the_store(lab: Lab) -> Outcome:
    root = lab.fresh("remote-new-node")
    env = lab.bucket("remote-new-node")
    job = lab.start(root / "node-a" / "out", FINETUNE_SAVE_STEPS="4", **env)
    job.wait_for(r"remote: uploaded checkpoint-8 ")
    job.proc.kill()
    first, _ = job.finish()
    second, log, out = new_node(lab, root, env, FINETUNE_SAVE_STEPS="4")
    expect("remote: downloaded checkpoint-" in log, "the new node did not download the remote checkpoint", log)
    worst = weights_differ(lab, out) if second == 0 else float("nan")
    expect(worst <= 1e-5, f"weights differ from the uninterrupted run's by {worst}", log)
    return lab.outcome(out, [first, second], log, note=f"empty local dirs; weights within {worst:.1e} of the "
                                                       "uninterrupted run's")


@fault("SIGKILL mid-upload leaves no remote checkpoint taken for complete", codes=(-9, 0), published=True)
def sigkill_mid_upload(lab: Lab) -> Outcome:
    root = lab.fresh("remote-mid-upload")
    env = lab.bucket("remote-mid-upload")
    extra = {"FINETUNE_MODEL": str(lab.small_model), "FINETUNE_MAX_STEPS": "4", "FINETUNE_SAVE_STEPS": "2",
             "FINETUNE_EVAL_STEPS": "4", "FINETUNE_LOGGING_STEPS": "2"}
    job = lab.start(root / "node-a" / "out", **env, **extra)
    torn = kill_mid_upload(lab, "remote-mid-upload", job)
    first, _ = job.finish()
    expect(torn is not None, "no upload was caught in progress")
    second, log, out = new_node(lab, root, env, **extra)
    expect(f"downloaded checkpoint-{torn} " not in log and f"from {out}/checkpoints/checkpoint-{torn}" not in log,
           f"the torn checkpoint-{torn} was taken for complete", log)
    return lab.outcome(out, [first, second], log, note=f"killed while checkpoint-{torn} was half uploaded "
                                                       "(a 3M model)")


@fault("remote retention (--save-total-limit 2)", codes=(0,), published=True, exact=True)
def remote_retention(lab: Lab) -> Outcome:
    root = lab.fresh("remote-retention")
    env = lab.bucket("remote-retention")
    code, log = lab.train(root / "out", FINETUNE_SAVE_STEPS="4", FINETUNE_SAVE_TOTAL_LIMIT="2", **env)
    left = remote_steps(lab, "remote-retention")
    expect(left == {12: True, 16: True}, f"the store holds {left}, not checkpoints 12 and 16", log)
    worst = weights_differ(lab, root / "out") if code == 0 else float("nan")
    expect(worst == 0.0, f"the published weights differ from a run without --checkpoint-to by {worst}", log)
    return lab.outcome(root / "out", [code], log, note="store keeps checkpoints 12 and 16; the model is bit-equal "
                                                       "to a run without --checkpoint-to")


@fault("second run on the same --checkpoint-to", codes=(9,), published=False)
def two_writers_on_one_prefix(lab: Lab) -> Outcome:
    root = lab.fresh("remote-two-writers")
    env = lab.bucket("remote-two-writers")
    first = lab.start(root / "a" / "out", FINETUNE_MAX_STEPS="100000", FINETUNE_LOGGING_STEPS="50",
                      FINETUNE_SAVE_STEPS="1000", FINETUNE_EVAL_STEPS="1000", **env)
    first.wait_for(r"train step \d+/")
    code, log = lab.train(root / "b" / "out", **env)
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    expect(len(errors) == 1 and "--checkpoint-to s3://remote-two-writers/run is in use by" in errors[0]
           and f"pid {first.proc.pid}" in errors[0], "the refusal does not name the prefix and its holder", log)
    first.proc.send_signal(signal.SIGTERM)
    holder, _ = first.finish()
    expect(holder == 7, "the first run was disturbed")
    return lab.outcome(root / "b" / "out", [code], log, note="refused at once, naming the holder; the first run "
                                                             "then stopped cleanly on SIGTERM")


@fault("SIGTERM during an upload", codes=(7, 0), published=True)
def sigterm_during_an_upload(lab: Lab) -> Outcome:
    root = lab.fresh("remote-sigterm-upload")
    env = lab.bucket("remote-sigterm-upload")
    extra = {"FINETUNE_MODEL": str(lab.small_model), "FINETUNE_MAX_STEPS": "8", "FINETUNE_SAVE_STEPS": "2",
             "FINETUNE_EVAL_STEPS": "8", "FINETUNE_LOGGING_STEPS": "2"}
    job = lab.start(root / "node-a" / "out", **env, **extra)
    # Not the last checkpoint's upload: training is over by then, and the signal would race the publish.
    during = kill_mid_upload(lab, "remote-sigterm-upload", job, sig=signal.SIGTERM, before=8)
    first, log = job.finish()
    expect(during is not None, "no upload was caught in progress")
    expect(status_of(root / "node-a" / "out") == ("preempted", 7), "not recorded as preempted", log)
    expect("where a run on a new node resumes" in log, "the log does not say where a later run resumes", log)
    final = max(step for step, done in remote_steps(lab, "remote-sigterm-upload").items() if done)
    second, log, out = new_node(lab, root, env, **extra)
    expect(f"downloaded checkpoint-{final} " in log, f"the new node did not resume from checkpoint-{final}", log)
    return lab.outcome(out, [first, second], log, note=f"signalled while checkpoint-{during} was uploading; the "
                                                       f"final checkpoint-{final} was uploaded before exit 7")


@fault("store goes away mid-run", codes=(12, 0), published=True, exact=True)
def store_goes_away(lab: Lab) -> Outcome:
    root = lab.fresh("remote-outage")
    env = lab.bucket("remote-outage")
    _, proxy = lab.store
    job = lab.start(root / "out", **env, FINETUNE_STORE_RETRIES="1")  # one retry, a second later
    job.wait_for(r"remote: uploaded checkpoint-8 ")
    proxy.budget = proxy.forwarded  # every connection from here on is refused
    first, log = job.finish()
    proxy.budget = None
    expect("failed after 2 attempt(s)" in log and "rerun the same command" in log, "no clear retryable error", log)
    expect(not (root / "out" / "model").exists(), "published without its last checkpoint in the store", log)
    second, log = lab.train(root / "out", **env)
    left = remote_steps(lab, "remote-outage")
    expect(left.get(16) is True, f"the checkpoint the outage kept local never reached the store: {left}", log)
    return lab.outcome(root / "out", [first, second], log, note="exit 12 after the retries; the rerun uploaded "
                                                                "checkpoint-16 and published")


# The cases above, in table order: tests/e2e/test_remote_checkpoints.py runs them with one S3 server for the module.
NAMES = [name for name, case in CASES.items() if case.run.__module__ == __name__]
