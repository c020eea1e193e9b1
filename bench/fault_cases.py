"""The fault cases, in the order the table lists them. Each stages one fault against `finetune train` on the lab's
tiny model and returns what the runs left (fault_lab.Outcome); @fault registers it in CASES with the outcome it must
have. bench/faults.py runs and prints them; tests/e2e/test_faults.py asserts them.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

from bench.fault_lab import STEPS, Lab, Outcome, expect, fault, read_json, status_of

# The existing faults: preemption, damaged checkpoints, storage.

@fault("SIGTERM at a random step", codes=(7, 0), published=True, exact=True)
def sigterm_at_a_random_step(lab: Lab) -> Outcome:
    out = lab.fresh("sigterm-step") / "out"
    # Neither an evaluation step nor the one before: a signal landing in an evaluation has its own case below.
    steps = [s for s in range(2, STEPS) if s % 8 not in (0, 7)]
    step = random.Random(int(os.environ.get("PREEMPT_SEED", "0"))).choice(steps)
    job = lab.sigterm_at(out, rf"train step {step}/")
    first, log = job.finish()
    expect(status_of(out) == ("preempted", 7) and not (out / "model").exists(), "not recorded as preempted", log)
    second, log = lab.train(out)
    return lab.outcome(out, [first, second], log, note=f"signalled at step {step}")


@fault("SIGKILL during a checkpoint save", codes=(-9, 0), published=True)
def sigkill_mid_save(lab: Lab) -> Outcome:
    from entrypoint.train import checkpoints

    out = lab.fresh("sigkill-save") / "out"
    extra = {"FINETUNE_MODEL": str(lab.small_model), "FINETUNE_MAX_STEPS": "12", "FINETUNE_SAVE_STEPS": "2",
             "FINETUNE_EVAL_STEPS": "6", "FINETUNE_LOGGING_STEPS": "2"}
    job = lab.start(out, **extra)
    killed = job.kill_mid_save(out / "checkpoints", checkpoints.MARKER, keep="checkpoint-2")
    first, _ = job.finish()
    expect(killed is not None, "no checkpoint save was caught in progress")
    second, log = lab.train(out, **extra)
    expect(f"skipping {killed.name}: no completion marker" in log, "the torn checkpoint was not skipped", log)
    return lab.outcome(out, [first, second], log, note=f"killed while writing {killed.name} (a 3M model)")


@fault("torn newest checkpoint", codes=(7, 0), published=True, exact=True)
def torn_checkpoint(lab: Lab) -> Outcome:
    out = lab.fresh("torn") / "out"
    job = lab.sigterm_at(out, r"train step 12/")
    first, _ = job.finish()
    newest = max((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    second, log = lab.train(out)
    expect(f"skipping {newest.name}: model.safetensors is truncated" in log, "the torn checkpoint was used", log)
    return lab.outcome(out, [first, second], log, note=f"{newest.name} weights cut in half")


@fault("disk full while saving", codes=(4,), published=False)
def disk_full(lab: Lab) -> Outcome:
    root = lab.fresh("disk-full")
    ckpt = lab.mount_tmpfs(root / "ckpt", 2_600_000)  # one tiny-model checkpoint (1.75 MB) fits, two do not
    code, log = lab.train(root / "out", FINETUNE_CHECKPOINT_DIR=str(ckpt))
    expect("cannot write checkpoint-16" in log and "checkpoint-8 is intact" in log and "Traceback" not in log,
           "no clean disk-full error naming the checkpoint a rerun resumes from", log)
    expect((ckpt / "checkpoint-8" / "finetune-complete.json").is_file(), "the previous checkpoint is gone", log)
    expect(status_of(root / "out") == ("failed", 4), "status.json does not record exit 4", log)
    return lab.outcome(root / "out", [code], log, note="checkpoint-8 kept intact")


@fault("read-only output", codes=(4,), published=False)
def read_only_output(lab: Lab) -> Outcome:
    out = lab.mount_tmpfs(lab.fresh("read-only") / "out", 1 << 20, read_only=True)
    code, log = lab.train(out)
    expect("not writable" in log and "train step" not in log, "did not fail before training", log)
    return lab.outcome(out, [code], log)


@fault("rerun after success", codes=(0, 0), published=True, exact=True)
def rerun_after_success(lab: Lab) -> Outcome:
    out = lab.fresh("rerun") / "out"
    first, _ = lab.train(out)
    weights = (out / "model" / "model.safetensors").read_bytes()
    second, log = lab.train(out)
    expect("done already" in log and (out / "model" / "model.safetensors").read_bytes() == weights,
           "the rerun did not leave the model alone", log)
    return lab.outcome(out, [first, second], log, note="second run: done already")


# One writer.

@fault("second run on the same output", codes=(9,), published=False)
def two_writers(lab: Lab) -> Outcome:
    out = lab.fresh("two-writers") / "out"
    first = lab.start(out, FINETUNE_MAX_STEPS="100000", FINETUNE_LOGGING_STEPS="50", FINETUNE_SAVE_STEPS="1000",
                      FINETUNE_EVAL_STEPS="1000")
    first.wait_for(r"train step \d+/")
    # The files the first run does not rewrite while training (TensorBoard events and checkpoints it does).
    before = {p: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    start = time.monotonic()
    code, log = lab.train(out, FINETUNE_MAX_STEPS="16")
    seconds = time.monotonic() - start
    touched = [p.name for p, mtime in before.items() if p.exists() and p.stat().st_mtime_ns != mtime
               and p.name != ".finetune-lease.json"]  # the first run's own heartbeat touches its lease
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    expect(len(errors) == 1 and f"pid {first.proc.pid}" in errors[0] and "is in use by" in errors[0],
           "the refusal does not name the holder in one line", log)
    expect(not touched and status_of(out) == ("running", None), f"the second run touched {touched}", log)
    first.proc.send_signal(signal.SIGTERM)
    holder, _ = first.finish()
    expect(holder == 7 and status_of(out) == ("preempted", 7), "the first run was disturbed")
    return lab.outcome(out, [code], log, note=f"refused after {seconds:.0f} s (process start included); "
                                              "the first run then stopped cleanly on SIGTERM")


@fault("stale lease of a SIGKILLed run", codes=(-9, 0), published=True, exact=True)
def stale_lease_after_sigkill(lab: Lab) -> Outcome:
    out = lab.fresh("stale-sigkill") / "out"
    job = lab.start(out)
    job.wait_for(r"train step 10/")
    job.proc.kill()
    first, _ = job.finish()
    expect((out / ".finetune-lease.json").is_file(), "the killed run left no lease to take over")
    second, log = lab.train(out)
    expect(f"process {job.proc.pid} on this host is gone" in log, "the dead holder was not recognised", log)
    return lab.outcome(out, [first, second], log, note="same host, dead pid: taken over at once")


@fault("stale lease from another host", codes=(0,), published=True, exact=True)
def stale_lease_from_another_host(lab: Lab) -> Outcome:
    from entrypoint.publish.lease import LEASE, STALE_SECONDS

    out = lab.fresh("stale-remote") / "out"
    out.mkdir()
    lease = out / LEASE
    lease.write_text(json.dumps({"host": "node-that-died", "pid": 7, "started": "2026-01-01T00:00:00Z",
                                 "token": "remote"}) + "\n")
    stopped = time.time() - (STALE_SECONDS - 4)  # its heartbeat stopped 4 s short of stale: wait, then take over
    os.utime(lease, (stopped, stopped))
    code, log = lab.train(out)
    expect("heartbeat stopped" in log and "took over" in log, "the stale lease was not waited for and taken", log)
    return lab.outcome(out, [code], log, note="waited for the heartbeat to go stale, then took over")


# Divergence.

@fault("divergence (--learning-rate 1.0)", codes=(8,), published=False)
def diverges(lab: Lab) -> Outcome:
    out = lab.fresh("diverge") / "out"
    code, log = lab.train(out, FINETUNE_LEARNING_RATE="1.0")
    expect("worse than the untrained model's" in log and "--learning-rate" in log, "no advice given", log)
    return lab.outcome(out, [code], log, note="final eval loss far above step 0's")


@fault("divergence with --publish-worse", codes=(0,), published=True)
def diverges_but_published(lab: Lab) -> Outcome:
    out = lab.fresh("publish-worse") / "out"
    code, log = lab.train(out, "--publish-worse", FINETUNE_LEARNING_RATE="1.0")
    expect("publishing anyway because of --publish-worse" in log, "no warning on publishing a worse model", log)
    return lab.outcome(out, [code], log)


@fault("non-finite loss (NaN weights)", codes=(8,), published=False)
def nan_loss(lab: Lab) -> Outcome:
    import torch
    from safetensors.torch import load_file, save_file

    root = lab.fresh("nan")
    model = root / "nan-model"
    shutil.copytree(lab.model, model)
    weights = load_file(model / "model.safetensors")
    name = next(k for k in weights if k.endswith("ln_f.weight"))
    weights[name] = torch.full_like(weights[name], math.nan)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    code, log = lab.train(root / "out", FINETUNE_MODEL=str(model))
    expect("in 3 logging windows in a row" in log, "the run was not stopped by the guard", log)
    expect("train step 16/" not in log, "the run trained to the end", log)
    return lab.outcome(root / "out", [code], log, note="stopped after 3 non-finite logging windows")


# Signals outside the training loop.

@fault("SIGTERM during model loading", codes=(7,), published=False)
def sigterm_while_loading(lab: Lab) -> Outcome:
    out = lab.fresh("loading") / "out"
    job = lab.sigterm_at(out, r"model: loading ")
    start = time.monotonic()
    code, log = job.finish(timeout=60)
    seconds = time.monotonic() - start
    where = re.search(r"stopped by SIGTERM (during model loading|before training started)", log)
    expect(where is not None and not list(out.glob("checkpoints/checkpoint-*")), "not stopped before training", log)
    return lab.outcome(out, [code], log, note=f"stopped {where.group(1)}, {seconds:.1f} s after the signal")


@fault("SIGTERM during an evaluation", codes=(7, 0), published=True)
def sigterm_during_evaluation(lab: Lab) -> Outcome:
    out = lab.fresh("eval") / "out"
    big_eval = {"FINETUNE_VALID_FILE": "train.txt", "FINETUNE_SAVE_STEPS": "4"}  # evaluating ~5,800 blocks
    job = lab.sigterm_at(out, r"eval: evaluating at step 8", **big_eval)
    start = time.monotonic()
    first, log = job.finish()
    seconds = time.monotonic() - start
    expect("during the evaluation at step 8" in log, "the evaluation was not cut short", log)
    expect(status_of(out) == ("preempted", 7) and not (out / "model").exists(), "not recorded as preempted", log)
    second, log = lab.train(out, **big_eval)
    return lab.outcome(out, [first, second], log, note=f"exited {seconds:.1f} s after the signal; "
                                                       "other validation set, so not compared")


@fault("SIGTERM while publishing", codes=(7,), published=False)
def sigterm_while_publishing(lab: Lab) -> Outcome:
    out = lab.fresh("publish") / "out"
    job = lab.sigterm_at(out, r"publish: writing the model")
    code, log = job.finish()
    expect("while publishing the model" in log, "not stopped while publishing", log)
    expect(not list(out.glob(".model.*")), "a staging folder was left behind", log)
    return lab.outcome(out, [code], log, note="no model/, no staging folder left")


# Configuration.

@fault("misspelt variable FINETUNE_LEARNIN_RATE", codes=(2,), published=False)
def misspelt_variable(lab: Lab) -> Outcome:
    out = lab.fresh("typo") / "out"
    code, log = lab.train(out, FINETUNE_LEARNIN_RATE="0.1")
    expect("did you mean FINETUNE_LEARNING_RATE?" in log, "no did-you-mean line", log)
    return lab.outcome(out, [code], log)


# Run identity and whole-run results.

@fault("options changed between SIGTERM and rerun", codes=(7, 2), published=False)
def changed_options_on_resume(lab: Lab) -> Outcome:
    out = lab.fresh("changed") / "out"
    job = lab.sigterm_at(out, r"train step 10/")
    first, _ = job.finish()
    second, log = lab.train(out, FINETUNE_LEARNING_RATE="0.01")
    expect(re.search(r"--learning-rate \S+ -> 0\.01", log) is not None and "--no-resume" in log
           and "--checkpoint-dir" in log, "the refusal does not name the change and both fixes", log)
    return lab.outcome(out, [first, second], log,
                       note="names --learning-rate old -> new, --no-resume, --checkpoint-dir")


@fault("--overwrite with a new learning rate over a finished run", codes=(0, 0), published=True)
def overwrite_retrains(lab: Lab) -> Outcome:
    out = lab.fresh("overwrite") / "out"
    first, _ = lab.train(out)
    old = (out / "model" / "model.safetensors").read_bytes()
    second, log = lab.train(out, "--overwrite", FINETUNE_LEARNING_RATE="0.001")
    expect("resume: from" not in log and (out / "model" / "model.safetensors").read_bytes() != old,
           "the old run was resumed or its weights republished", log)
    expect((out / "checkpoints" / "previous-run").is_dir(), "the old checkpoints were not set aside", log)
    return lab.outcome(out, [first, second], log, note="trained from the base model; old checkpoints in previous-run/")


@fault("SIGTERM during the last step", codes=(7, 0), published=True, exact=True)
def sigterm_during_the_last_step(lab: Lab) -> Outcome:
    out = lab.fresh("last-step") / "out"
    job = lab.sigterm_at(out, rf"train step {STEPS - 1}/")
    first, _ = job.finish()
    second, log = lab.train(out)
    expect(f"checkpoint-{STEPS} is at step {STEPS}, the last is {STEPS}: publishing it without training" in log
           and "train step" not in log and "eval  step" not in log, "the finished checkpoint was trained further "
           "or evaluated again (its final evaluation was saved with it)", log)
    expect(not (out / "checkpoints" / f"checkpoint-{STEPS + 1}").exists(), "a checkpoint past the last step", log)
    metrics, reference = read_json(out / "metrics.json") or {}, lab.reference
    for key in ("train_tokens", "target_tokens"):  # whole-run counters survive the restart
        expect(metrics.get(key) == reference[key] > 0, f"{key} lost the first process's share", log)
    for key in ("initial_eval_loss", "best_eval_loss", "train_loss"):
        expect(abs(metrics.get(key, math.inf) - reference[key]) <= 1e-4, f"{key} differs from the reference", log)
    return lab.outcome(out, [first, second], log, note=f"checkpoint-{STEPS} published as it was; whole-run tokens")


@fault("failure with the output dir from a preset", codes=(3,), published=False)
def status_in_the_resolved_output(lab: Lab) -> Outcome:
    root = lab.fresh("preset-output")
    out = root / "from-preset"
    (root / "preset.yaml").write_text(f"output_dir: {out}\n")
    env = lab.env(root / "unused", FINETUNE_DATA_DIR=str(root / "missing"))
    del env["FINETUNE_OUTPUT_DIR"]
    done = subprocess.run([sys.executable, "-m", "entrypoint", "train", "--preset", str(root / "preset.yaml")],
                          env=env, capture_output=True, text=True, timeout=600)
    expect(status_of(out) == ("failed", 3), "status.json is not in the preset's output dir", done.stderr)
    return lab.outcome(out, [done.returncode], done.stderr, note="status.json in the preset's output_dir")
