"""The GPU check's stages: a plan of named commands, each with a time budget, run one after another so that a
stage past its budget is stopped with everything it started and the next stage still gets its own time.

A stage runs in its own session (so its own process group). Past its budget: the stacks of its Python processes
are dumped with `py-spy dump` (where py-spy is on PATH), then the whole tree is frozen with SIGSTOP (a frozen process
cannot start another), walked again for children started meanwhile, and killed with SIGKILL, together with
anything left in the stage's process group. The tree is walked with psutil because torchrun starts its workers in
sessions of their own, which a process-group kill alone would miss. A stage that ends by itself also has its
process group killed, so no stray grandchild outlives it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

WINDOW_SECONDS = 420  # the plan's total may not pass 7 minutes: a 10-minute device call keeps 3 for start and copy
DUMP_SECONDS = 8  # one py-spy dump may take this long; at most DUMPED processes are dumped
DUMPED = 4


@dataclass
class Stage:
    """One step of the plan: `budget` seconds for `command` (None: work done in this process, timed only)."""

    name: str
    budget: float
    what: str
    command: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    name: str
    budget: float
    seconds: float
    exit_code: int | None  # None: killed at its budget
    log_tail: str
    stacks: str = ""

    @property
    def timed_out(self) -> bool:
        return self.exit_code is None


def plan_table(stages: list[Stage]) -> str:
    """The plan printed before anything runs: each stage's budget and what it does, and the total."""
    lines = [f"gpu-check: plan: {sum(s.budget for s in stages):.0f} s at most (window {WINDOW_SECONDS} s)"]
    lines += [f"gpu-check:   {i}. {s.name:<15} {s.budget:>4.0f} s  {s.what}" for i, s in enumerate(stages, 1)]
    return "\n".join(lines)


def run(stage: Stage, log: Path, cwd: Path, limit: float | None = None) -> Outcome:
    """Runs the stage's command for at most `limit` seconds (its budget by default), its output appended to `log`."""
    limit = stage.budget if limit is None else limit
    env = {**os.environ, **stage.env}
    began = time.monotonic()
    with log.open("a") as sink:
        sink.write(f"\n=== {stage.name}: {' '.join(stage.command)}\n")
        sink.flush()
        start = log.stat().st_size
        process = subprocess.Popen(stage.command, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        stacks = ""
        try:
            code: int | None = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            code = None
            stacks = stop_tree(process.pid)
            process.wait()
        finally:
            kill_group(process.pid)
    seconds = time.monotonic() - began
    with log.open("a") as sink:
        verdict = f"killed after its {limit:.0f} s budget" if code is None else f"exit {code}"
        sink.write(f"=== {stage.name}: {verdict} in {seconds:.1f} s\n{stacks}")
    with log.open("rb") as source:
        source.seek(start)
        tail = source.read().decode(errors="replace")[-20000:]
    return Outcome(stage.name, stage.budget, seconds, code, tail, stacks)


def stop_tree(pid: int) -> str:
    """Dumps the Python stacks of the tree under `pid`, freezes the tree and kills it; returns the dumps."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return ""
    stacks = dump_stacks(tree)
    frozen: dict[int, psutil.Process] = {}
    while True:  # freeze until no new child appears: a frozen parent starts nothing more
        fresh = [p for p in tree if p.pid not in frozen]
        if not fresh:
            break
        for process in fresh:
            _signal(process, signal.SIGSTOP)
            frozen[process.pid] = process
        tree = [child for p in frozen.values() for child in _children(p)]
    for process in frozen.values():
        _signal(process, signal.SIGKILL)
    psutil.wait_procs(list(frozen.values()), timeout=5)
    return stacks


def kill_group(pid: int) -> None:
    """SIGKILL to the process group the stage's session started (its leader's pid), if anything is left in it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def py_spy() -> str | None:
    """The py-spy command: on PATH, or beside this interpreter (a virtualenv's bin/ that is not on PATH)."""
    beside = Path(sys.executable).with_name("py-spy")
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def dump_stacks(tree: list[psutil.Process]) -> str:
    """`py-spy dump` of the tree's Python processes, deepest first (the worker that hangs is usually a leaf)."""
    spy = py_spy()
    pythons = [p for p in reversed(tree) if _is_python(p)][:DUMPED]
    if not spy:
        return f"(py-spy is not on PATH: no stack dump of {len(pythons)} Python process(es))\n"
    dumps = []
    for process in pythons:
        try:
            done = subprocess.run([spy, "dump", "--pid", str(process.pid)], capture_output=True, text=True,
                                  timeout=DUMP_SECONDS)
            dumps.append(done.stdout or done.stderr)
        except subprocess.TimeoutExpired:
            dumps.append(f"(py-spy dump of {process.pid} passed {DUMP_SECONDS} s)\n")
    return "".join(dumps)


def _is_python(process: psutil.Process) -> bool:
    try:
        return "python" in Path(process.exe()).name or "python" in (process.cmdline() or [""])[0]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children()
    except psutil.NoSuchProcess:
        return []


def _signal(process: psutil.Process, number: int) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        process.send_signal(number)
