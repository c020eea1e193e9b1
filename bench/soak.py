"""The soak: two-process CPU runs of `finetune train` stopped again and again, under a competing CPU load.

Each SIGTERM run is signalled (at the launcher, as the kubelet or tini would) at a random moment: before the first
step, during a step, during an evaluation, during a checkpoint save or while publishing. It must exit 7 (or 0 when it
had already finished) within --bound seconds of the signal, and a rerun must publish the same model as an
uninterrupted two-process run (final step and eval loss, as bench/faults.py's exact cases compare). The one-rank
matrix then fails a single rank: SIGKILL of one worker, an out-of-memory error on one rank, a data error on one rank
only; the launcher must exit with that rank's code within the bound, and the rerun resume exactly. A run that does
not exit within the bound plus a minute has its process tree's stacks dumped (py-spy) and is killed.

    python -m bench.soak [--runs N] [--seed S] [--load K] [--bound SECONDS] [--workdir DIR] [--no-matrix]
                                                                                                  (make soak)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.fault_lab import Lab, read_json
from bench.faults import prepare_lab
from bench.stages import py_spy
from entrypoint.errors import ExitCode
from tests.support.helpers import REPO, Job, clean_env

MOMENTS = ("before the first step", "during a step", "during evaluation", "during a checkpoint save",
           "during publish")
FAULT_STEP = 5  # the optimizer step at which the one-rank faults strike, on rank 1
# Imported by every worker (PYTHONPATH): on the rank SOAK_FAULT_RANK, at step FAULT_STEP, the training step raises
# the error the real one would (torch.OutOfMemoryError from a full GPU, DataError from a bad record).
INJECTOR = f'''
import os
if os.environ.get("SOAK_FAULT") and os.environ.get("RANK") == os.environ.get("SOAK_FAULT_RANK", "1"):
    import torch
    from entrypoint.errors import DataError
    from entrypoint.train.trainer import FinetuneTrainer

    _step = FinetuneTrainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step == {FAULT_STEP}:
            if os.environ["SOAK_FAULT"] == "oom":
                raise torch.OutOfMemoryError("CUDA out of memory (injected by bench/soak.py)")
            raise DataError("a record on this rank is unreadable (injected by bench/soak.py)")
        return _step(self, *args, **kwargs)

    FinetuneTrainer.training_step = training_step
if os.environ.get("SOAK_HOLD_RANK") == os.environ.get("RANK", "-"):
    import signal
    import sys
    import time
    from entrypoint.train import job

    def build_trainer(*args, **kwargs):  # this rank never reaches the process group; a signal ends it at once
        signal.signal(signal.SIGTERM, lambda *_: os._exit(7))
        print("soak: holding rank", os.environ["RANK"], "before the process group", file=sys.stderr, flush=True)
        time.sleep(600)

    job.build_trainer = build_trainer
elif os.environ.get("SOAK_HOLD_RANK"):
    import sys
    from entrypoint.train import job

    _build = job.build_trainer

    def build_trainer(*args, **kwargs):  # the other ranks say when they go to wait for the held one
        print("soak: rank", os.environ["RANK"], "joins the process group", file=sys.stderr, flush=True)
        return _build(*args, **kwargs)

    job.build_trainer = build_trainer
'''


@dataclass
class Result:
    case: str
    code: int | None  # None: still running after the bound plus a minute (hung), then killed
    seconds: float  # from the signal or fault to the launcher's exit
    exact: bool | None  # the rerun published the reference model; None when there was no rerun
    expected: tuple[int, ...]
    note: str = ""

    def ok(self, bound: float) -> bool:
        return self.code in self.expected and self.seconds <= bound and self.exact is not False


class Soak:
    def __init__(self, lab: Lab, bound: float):
        self.lab, self.bound = lab, bound
        inject = lab.root / "inject"
        inject.mkdir(exist_ok=True)
        (inject / "sitecustomize.py").write_text(INJECTOR)
        self.pythonpath = os.pathsep.join([str(inject), str(REPO)])
        self.count = 0

    def env(self, out: Path, **extra: str) -> dict[str, str]:
        return self.lab.env(out, FINETUNE_NPROC_PER_NODE="2", PYTHONPATH=self.pythonpath, **extra)

    def fresh(self, name: str) -> Path:
        self.count += 1
        return self.lab.fresh(f"{self.count:03d}-{name}") / "out"

    def reference(self) -> dict:
        out = self.lab.root / "reference-2"
        if not (metrics := read_json(out / "metrics.json")):
            shutil.rmtree(out, ignore_errors=True)
            done = subprocess.run([sys.executable, "-m", "entrypoint", "train"], env=self.env(out),
                                  capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, done.stderr[-3000:]
            metrics = read_json(out / "metrics.json")
        return metrics

    def sigterm(self, moment: str, rng: random.Random) -> Result:
        out = self.fresh("sigterm")
        job = Job(self.env(out))
        note = moment
        if moment == "during a checkpoint save":
            step = rng.choice((8, 16))
            wait_for_path(job, out / "checkpoints" / f"checkpoint-{step}")
            note += f" (checkpoint-{step})"
        else:
            pattern = {"before the first step": r"model: loading", "during evaluation": r"eval: evaluating at step",
                       "during publish": r"publish: writing the model"}.get(moment)
            if pattern is None:
                step = rng.randrange(1, 16)
                pattern, note = rf"train step {step}/", f"{moment} ({step})"
            job.wait_for(pattern, timeout=600)
        return self.finish(job, out, "SIGTERM " + moment, (7, 0), note, signal_launcher=True)

    def one_rank(self, fault: str) -> Result:
        out = self.fresh(fault)
        extra = {"SOAK_FAULT": fault} if fault in ("oom", "data") else {}
        job = Job(self.env(out, **extra))
        job.wait_for(rf"train step {FAULT_STEP - 1}/", timeout=600)
        if fault == "sigkill":
            os.kill(worker_pids(job.proc.pid)[1], signal.SIGKILL)
        name, expected = {"sigkill": ("SIGKILL of rank 1", ExitCode.OOM), "oom": ("out of memory on rank 1",
                          ExitCode.OOM), "data": ("data error on rank 1", ExitCode.DATA)}[fault]
        return self.finish(job, out, name, (int(expected),), f"at step {FAULT_STEP}")

    def finish(self, job: Job, out: Path, case: str, expected: tuple[int, ...], note: str,
               signal_launcher: bool = False) -> Result:
        start = time.monotonic()
        if signal_launcher:
            job.proc.send_signal(signal.SIGTERM)
        try:
            code, log = job.finish(timeout=self.bound + 60)
        except subprocess.TimeoutExpired:
            dump = stacks(job.proc.pid)
            kill_tree(job.proc.pid)
            (out.parent / "hung.txt").write_text(dump + "\n" + "".join(job.lines))
            print(f"--- {case} hung; stacks and log (the work folder is removed at the end):\n{dump}\n"
                  + "".join(job.lines[-40:]), flush=True)
            return Result(case, None, time.monotonic() - start, None, expected, f"{note}; hung: {out.parent}")
        seconds = time.monotonic() - start
        (out.parent / "log.txt").write_text(log)
        return Result(case, code, seconds, self.resumed_exactly(out), expected, note)

    def resumed_exactly(self, out: Path) -> bool:
        done = subprocess.run([sys.executable, "-m", "entrypoint", "train"], env=self.env(out), capture_output=True,
                              text=True, timeout=900)
        (out.parent / "rerun.txt").write_text(done.stderr)
        metrics, ref = read_json(out / "metrics.json") or {}, self.reference()
        return done.returncode == 0 and metrics.get("global_step") == ref["global_step"] \
            and abs(metrics.get("eval_loss", float("inf")) - ref["eval_loss"]) <= 1e-4


def wait_for_path(job: Job, path: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if job.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.002)


def worker_pids(launcher: int, timeout: float = 60) -> dict[int, int]:
    """The launcher's workers by rank (from their environment)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ranks = {}
        for child in psutil.Process(launcher).children():
            with contextlib.suppress(psutil.Error):
                if (rank := child.environ().get("RANK")) is not None:
                    ranks[int(rank)] = child.pid
        if len(ranks) == 2:
            return ranks
        time.sleep(0.1)
    raise AssertionError("the launcher's two workers were not found")


def stacks(pid: int) -> str:
    """py-spy dumps of a process and its descendants (the stacks of a hang), or why there are none."""
    import psutil

    spy = py_spy() or os.environ.get("PY_SPY")
    if not spy:
        return "(no py-spy on PATH or in PY_SPY: no stacks)"
    with contextlib.suppress(psutil.Error):
        pids = [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
        dumps = [subprocess.run([spy, "dump", "--native", "--pid", str(p)], capture_output=True, text=True, timeout=60)
                 for p in pids]
        return "\n".join(f"--- pid {p}\n{d.stdout}{d.stderr}" for p, d in zip(pids, dumps, strict=True))
    return f"(pid {pid} is gone)"


def kill_tree(pid: int) -> None:
    import psutil

    with contextlib.suppress(psutil.Error):
        for proc in [*psutil.Process(pid).children(recursive=True), psutil.Process(pid)]:
            with contextlib.suppress(psutil.Error):
                proc.kill()


@contextlib.contextmanager
def cpu_load(processes: int):
    """Busy loops competing for the cores while the runs go on."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()


def table(results: list[Result], bound: float) -> str:
    rows = [("case", "exit code", "seconds to exit", "resumed exactly", "verdict", "note")]
    for r in results:
        rows.append((r.case, "hung" if r.code is None else str(r.code), f"{r.seconds:.1f}",
                     {True: "yes", False: "NO", None: "-"}[r.exact], "ok" if r.ok(bound) else "FAIL", r.note))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def summary(results: list[Result], bound: float) -> str:
    sigterms = [r for r in results if r.case.startswith("SIGTERM")]
    good = sum(r.ok(bound) for r in sigterms)
    slowest = max((r.seconds for r in results), default=0.0)
    return (f"{good} of {len(sigterms)} SIGTERM runs exited 7 (or 0) within {bound:.0f} s and resumed exactly; "
            f"one-rank matrix: {sum(r.ok(bound) for r in results if r not in sigterms)} of "
            f"{len(results) - len(sigterms)} ok; slowest exit {slowest:.1f} s")


def report(r: Result) -> None:
    print(f"{r.case}: {r.code} in {r.seconds:.1f} s, exact {r.exact} ({r.note})", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="SIGTERM runs [default: 50]")
    parser.add_argument("--seed", type=int, default=0, help="picks the moments and steps [default: 0]")
    parser.add_argument("--load", type=int, default=1, help="busy processes competing for the CPU [default: 1]")
    parser.add_argument("--bound", type=float, default=60.0, help="seconds from the signal to the launcher's exit")
    parser.add_argument("--workdir", type=Path, default=None, help="kept between runs [default: a temporary one]")
    parser.add_argument("--moments", nargs="*", default=MOMENTS, choices=MOMENTS, metavar="MOMENT",
                        help="when to signal, picked at random among these [default: all]")
    parser.add_argument("--no-matrix", action="store_true", help="only the SIGTERM runs")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    os.environ.update({k: v for k, v in clean_env().items() if k in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")})
    rng = random.Random(args.seed)
    with contextlib.ExitStack() as stack:
        root = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        root.mkdir(parents=True, exist_ok=True)
        soak = Soak(prepare_lab(root), args.bound)
        soak.reference()
        results = []
        with cpu_load(args.load):
            for moment in [rng.choice(args.moments) for _ in range(args.runs)]:
                results.append(soak.sigterm(moment, rng))
                report(results[-1])
            for fault in () if args.no_matrix else ("sigkill", "oom", "data"):
                results.append(soak.one_rank(fault))
                report(results[-1])
        print(table(results, args.bound))
        print(summary(results, args.bound))
        if args.json:
            args.json.write_text(json.dumps([r.__dict__ for r in results], indent=1))
    return 0 if all(r.ok(args.bound) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
