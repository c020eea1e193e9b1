"""Storage faults moved through a run: a small tmpfs for one volume (the data cache, the checkpoints or the output)
that fills up (ENOSPC) or turns read-only (EROFS, a read-only bind mount over it) at the moment a given file
appears there, during data preparation, at the first or a later checkpoint, while publishing, or while writing the
metrics and the plot. The run must end with exit 4 and one `error:` line, no traceback, the previous complete
checkpoint intact and nothing half-written taken for complete; once the fault is cleared, a rerun resumes and
publishes.

A watcher thread polls for the file, stops the run's process group (SIGSTOP) so the fault lands before the write
that follows the file, stages the fault, and lets the run go on (SIGCONT). EIO has no mechanism here (dm-error and
fault-injecting filesystems need block devices this machine does not give): its row skips with that reason.

    python -m bench.faults --only storage      (make faults; the table `matrix` prints goes into docs/reliability.md)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench.fault_lab import CASES, Case, Lab, Outcome, Skip, expect, fault

STEPS = 4  # a checkpoint at steps 2 and 4; the evaluation capped so a run lasts seconds, not minutes
RUN = {"FINETUNE_MAX_STEPS": str(STEPS), "FINETUNE_SAVE_STEPS": "2", "FINETUNE_EVAL_STEPS": "2",
       "FINETUNE_MAX_EVAL_TOKENS": "1024"}
VOLUME_BYTES = 8 << 20  # three tiny-model checkpoints (1.7 MiB each), the model and the outputs fit
# Left free by a fill: more than the trainer's 64 KiB write probe (the case: the probe passed once the
# half-written file was gone), less than any weights file; 0 where the next write is a small file.
SLACK = 100 << 10


@dataclass(frozen=True)
class Phase:
    site: str  # the row of the matrix
    volume: str  # which folder the tmpfs holds: cache, checkpoints or output
    trigger: str  # glob under the volume: the fault lands when it first matches
    slack: int  # bytes left free by a fill
    left: str  # what must be intact after the fault
    resumes_from: str | None  # the checkpoint the rerun resumes from


PHASES = [
    Phase("data preparation (cache shards)", "cache", "blocks-*", 0, "no cache entry", None),
    Phase("first checkpoint", "checkpoints", "checkpoint-2", SLACK, "no complete checkpoint", None),
    Phase("later checkpoint", "checkpoints", "checkpoint-4", SLACK, "checkpoint-2 complete", "checkpoint-2"),
    Phase("publishing the model", "output", ".model.tmp-*", SLACK, "checkpoint-4 complete, no model",
          "checkpoint-4"),
    Phase("metrics and loss plot", "output", "metrics.json", 0, "checkpoint-4 complete, no model", "checkpoint-4"),
    # TensorBoard's writer thread meets the fault (a warning line); the next value logged, the evaluation before the
    # first step, raises it in the run (the error line, naming the events file).
    Phase("TensorBoard events", "output", "runs/events.out.tfevents.*", 0, "no complete checkpoint", None),
]
FAULTS = {"ENOSPC": "disk full", "EROFS": "read-only"}


class Volume:
    """A small tmpfs at `path` and the fault staged on it; `clear()` undoes the fault."""

    def __init__(self, lab: Lab, path: Path):
        self.lab, self.path = lab, lab.mount_tmpfs(path, VOLUME_BYTES)
        self.ballast = path / ".ballast"
        self.bound = 0  # read-only bind mounts stacked on the tmpfs

    def fill(self, slack: int) -> None:
        stats = os.statvfs(self.path)
        size = max(stats.f_bavail * stats.f_frsize - slack, 0)
        fd = os.open(self.ballast, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)

    def read_only(self, group: int) -> None:
        """A read-only bind mount of the volume over itself, made with the run stopped: every later open for
        writing, mkdir, rename or unlink there fails with EROFS. A remount of the tmpfs itself would wait for
        every file open for writing to close (EBUSY), and a run can finish all its writes between two tries (a
        fresh-clone CI run did); a new mount has no writers, so it turns read-only at once. Files the run
        already holds open keep writing, as they would between two files of a whole-volume remount."""
        os.killpg(group, signal.SIGSTOP)
        try:
            for args in (("--bind", str(self.path), str(self.path)), ("-o", "remount,bind,ro", str(self.path))):
                if _mount(*args) != 0:
                    raise AssertionError(f"could not mount {self.path} read-only ({' '.join(args)})")
                if args[0] == "--bind":
                    self.bound += 1
                    self.lab.mounts.append(self.path)  # unmounted at the end if the case fails before clear()
        finally:
            os.killpg(group, signal.SIGCONT)

    def clear(self) -> None:
        while self.bound:
            subprocess.run(["umount", str(self.path)], capture_output=True, check=True)
            self.bound -= 1
        self.ballast.unlink(missing_ok=True)


def _mount(*args: str) -> int:
    return subprocess.run(["mount", *args], capture_output=True).returncode


def run_with_fault(lab: Lab, out: Path, volume: Volume, phase: Phase, kind: str, **extra: str) -> tuple[int, str]:
    """`finetune train` in its own process group, the fault staged when `phase.trigger` appears on `volume`."""
    proc = subprocess.Popen([sys.executable, "-m", "entrypoint", "train"], env=lab.env(out, **RUN, **extra),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    fired = threading.Event()

    def watch() -> None:
        while proc.poll() is None:
            if next(volume.path.glob(phase.trigger), None) is not None:
                if kind == "ENOSPC":
                    os.killpg(proc.pid, signal.SIGSTOP)
                    try:
                        volume.fill(phase.slack)
                    finally:
                        os.killpg(proc.pid, signal.SIGCONT)
                else:
                    volume.read_only(proc.pid)
                fired.set()
                return
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        _, log = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    watcher.join(timeout=10)
    expect(fired.is_set(), f"{phase.trigger} never appeared on the {phase.volume} volume", log)
    return proc.returncode, log


def storage_case(phase: Phase, kind: str):
    def run(lab: Lab, rerun: bool = True) -> Outcome:
        """The fault's run and its checks, then (with `rerun`) the fault cleared and the command run again."""
        root = lab.fresh(f"storage-{PHASES.index(phase)}-{kind.lower()}")  # no "checkpoint-N" in the path
        folders = {"cache": root / "cache", "checkpoints": root / "ckpt", "output": root / "out"}
        volume = Volume(lab, folders[phase.volume])
        # TensorBoard's event file lives elsewhere (its writer thread would meet the fault, not the step under
        # test), except where it is the step under test: then in <output-dir>/runs, its default.
        extra = {"FINETUNE_CHECKPOINT_DIR": str(folders["checkpoints"])}
        if not phase.trigger.startswith("runs/"):
            extra["FINETUNE_TENSORBOARD_DIR"] = str(root / "tb")
        if phase.volume == "cache":
            extra["FINETUNE_CACHE_DIR"] = str(folders["cache"])
        out, checkpoints_dir = folders["output"], folders["checkpoints"]
        code, log = run_with_fault(lab, out, volume, phase, kind, **extra)
        left = check_fault_run(log, phase, checkpoints_dir, out)
        volume.clear()
        if not rerun:
            return lab.outcome(out, [code], log, note=f"left: {left} | {_error_line(log)}")
        again, log2 = lab.train(out, **RUN, **extra)
        expect(again == 0, "the rerun after clearing the fault failed", log2)
        resumed = re.findall(r"resume: from .*?(checkpoint-\d+)", log2)
        expect((resumed[-1] if resumed else None) == phase.resumes_from,
               f"the rerun resumed from {resumed or 'nothing'}, expected {phase.resumes_from}", log2)
        return lab.outcome(out, [code, again], log2, note=f"left: {left} | {_error_line(log)}")

    return run


def check_fault_run(log: str, phase: Phase, checkpoints_dir: Path, out: Path) -> str:
    """One `error:` line and no traceback; the previous complete checkpoint intact, nothing half-written marked
    complete, and no model published. Returns what was left, in words."""
    from entrypoint.train import checkpoints

    errors = [line for line in log.splitlines() if line.startswith("error:")]
    expect(len(errors) == 1 and "Traceback" not in log, f"not one clean error line: {errors}", log)
    if phase.volume == "checkpoints":  # the line says what the rerun resumes from, as this case expects it to
        says = f"{phase.resumes_from} is intact" if phase.resumes_from else "no checkpoint was complete yet"
        expect(says in errors[0], f"the error line does not say {says!r}: {errors[0]}", log)
    if phase.trigger.startswith("runs/"):  # TensorBoard's write failed with no file name on it: found in its frame
        expect("events.out.tfevents" in errors[0], f"the error line does not name the events file: {errors[0]}", log)
    complete = [p.name for p in sorted(checkpoints_dir.glob("checkpoint-*"))
                if checkpoints.problem(p) is None]
    expected = {None: [], "checkpoint-2": ["checkpoint-2"], "checkpoint-4": ["checkpoint-2", "checkpoint-4"]}
    expect(complete == expected[phase.resumes_from], f"complete checkpoints {complete}", log)
    expect(not (out / "model").exists(), "a model was published", log)
    partial = [p.name for p in sorted(checkpoints_dir.glob("checkpoint-*")) if p.name not in complete]
    return (f"complete: {', '.join(complete) or 'none'}" + (f"; no marker: {', '.join(partial)}" if partial else "")
            + "; no model")


def _error_line(log: str) -> str:
    return next((line for line in log.splitlines() if line.startswith("error:")), "")


def _eio(lab: Lab, rerun: bool = True) -> Outcome:
    raise Skip("no EIO mechanism here: dm-error or a fault-injecting filesystem needs a block device")


def name(phase: Phase, kind: str) -> str:
    return f"storage: {FAULTS[kind]} at {phase.site}"


for _phase in PHASES:
    for _kind in FAULTS:
        fault(name(_phase, _kind), codes=(4, 0), published=True)(storage_case(_phase, _kind))
fault("storage: I/O error (EIO) at any write", codes=(4, 0), published=True)(_eio)


def observed(results: list) -> str:
    """What `make faults` ran, as the matrix: (case, outcome or None, verdict) for each storage case."""
    rows = ["| site | fault | exit codes | left after the fault | rerun resumed from | published | verdict |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for case, out, verdict in results:
        if not case.name.startswith("storage: "):
            continue
        fault_name, _, site = case.name.removeprefix("storage: ").partition(" at ")
        if out is None:
            rows.append(f"| {site} | {fault_name} | | | | | {verdict} |")
            continue
        left = out.note.split(" | ")[0].removeprefix("left: ")
        codes = " then ".join(str(c) for c in out.codes)
        rows.append(f"| {site} | {fault_name} | {codes} | {left} | {out.resumed_from or 'the start'} | "
                    f"{'yes' if out.published else 'no'} | {verdict} |")
    return "\n".join(rows)


def matrix() -> str:
    """The matrix as docs/reliability.md shows it: each site and fault, the exit code, what is left, where the
    rerun resumes (what the cases above assert)."""
    rows = ["| site | fault | exit code, then rerun | left after the fault | rerun resumes from, publishes |",
            "| --- | --- | --- | --- | --- |"]
    for phase in PHASES:
        for kind in FAULTS:
            case: Case = CASES[name(phase, kind)]
            codes = " then ".join(str(c) for c in case.codes)
            rows.append(f"| {phase.site} | {kind} ({FAULTS[kind]}) | {codes} | {phase.left} | "
                        f"{phase.resumes_from or 'the start'}, yes |")
    rows.append("| any | EIO (I/O error) | 4 (mapped, not staged: no block device to fail here) | - | - |")
    return "\n".join(rows)
