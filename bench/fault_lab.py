"""The fault lab: what bench/fault_cases.py's cases are made of. A Lab holds a tiny model, a corpus, a shared data
cache and one uninterrupted reference run; Job runs `finetune train` in the background with its log collected as
it comes; @fault registers a case in CASES with its expected outcome."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from tests.support.helpers import FAST_TRAIN, Job, train_env

STEPS = 16
# A log line per step, to signal at a known one; a checkpoint and an evaluation every 8 steps.
RUN = {**FAST_TRAIN, "FINETUNE_MAX_STEPS": str(STEPS), "FINETUNE_LOGGING_STEPS": "1"}


@dataclass
class Outcome:
    codes: list[int]  # the fault's run, then any rerun
    published: bool
    resumed_from: str | None = None
    final_step: int | None = None
    eval_loss: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[Lab], Outcome]
    codes: tuple[int, ...]
    published: bool
    exact: bool  # the final model must match the uninterrupted reference (step and eval loss)


CASES: dict[str, Case] = {}


def fault(name: str, codes: tuple[int, ...], published: bool, exact: bool = False):
    def register(fn: Callable[[Lab], Outcome]) -> Callable[[Lab], Outcome]:
        CASES[name] = Case(name, fn, codes, published, exact)
        return fn

    return register


class Skip(Exception):
    """This machine cannot stage the fault (e.g. mounting a tmpfs needs root)."""


class Lab:
    """Where cases run: a tiny model, a corpus, a shared data cache, and one uninterrupted reference run."""

    def __init__(self, root: Path, model: Path, data: Path):
        self.root, self.model, self.data = root, model, data
        self.mounts: list[Path] = []
        self._servers = contextlib.ExitStack()

    @cached_property
    def store(self):
        """One S3-protocol server on 127.0.0.1 for every --checkpoint-to case, behind a proxy that can cut it off
        (tests/support/s3server.py); stopped by close()."""
        from tests.support.s3server import Proxy, S3Server

        server = self._servers.enter_context(S3Server())
        return server, self._servers.enter_context(Proxy(server.port))

    def bucket(self, name: str) -> dict[str, str]:
        """A new bucket and the environment a run needs to use it as --checkpoint-to (through the proxy)."""
        server, proxy = self.store
        server.client().create_bucket(Bucket=name)
        return {**server.env(proxy.port), "FINETUNE_CHECKPOINT_TO": f"s3://{name}/run"}

    def close(self) -> None:
        self.unmount_all()
        self._servers.close()

    def fresh(self, name: str) -> Path:
        directory = self.root / "cases" / name
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        return directory

    def env(self, out: Path, **extra: str) -> dict[str, str]:
        return train_env(self.model if "FINETUNE_MODEL" not in extra else Path(extra.pop("FINETUNE_MODEL")),
                         self.data, out, base=RUN, **{"FINETUNE_CACHE_DIR": str(self.root / "cache"), **extra})

    def train(self, out: Path, *args: str, **extra: str) -> tuple[int, str]:
        done = subprocess.run([sys.executable, "-m", "entrypoint", "train", *args], env=self.env(out, **extra),
                              capture_output=True, text=True, timeout=600)
        return done.returncode, done.stderr

    def start(self, out: Path, *args: str, **extra: str) -> Job:
        return Job(self.env(out, **extra), *args)

    def sigterm_at(self, out: Path, pattern: str, **extra: str) -> Job:
        """A training run sent SIGTERM as soon as its log matches `pattern`; the caller collects its end."""
        job = self.start(out, **extra)
        job.wait_for(pattern)
        job.proc.send_signal(signal.SIGTERM)
        return job

    @cached_property
    def reference(self) -> dict:
        out = self.root / "reference"
        shutil.rmtree(out, ignore_errors=True)
        code, log = self.train(out)
        assert code == 0, log[-3000:]
        return json.loads((out / "metrics.json").read_text())

    @cached_property
    def small_model(self) -> Path:
        """About 3M parameters: a checkpoint save lasts long enough to be killed in the middle."""
        from entrypoint.commands.init_model import init_model
        from entrypoint.config.schema import InitModelConfig

        directory = self.root / "small-gpt2"
        if not (directory / "config.json").is_file():
            init_model(InitModelConfig(output_dir=directory, corpus=self.data / "train.txt", size="small",
                                       vocab_size=512, context=64))
        return directory

    def mount_tmpfs(self, path: Path, size_bytes: int, read_only: bool = False) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            raise Skip("mounting a small tmpfs needs root")
        path.mkdir(parents=True, exist_ok=True)
        options = f"size={size_bytes}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
        if done.returncode != 0:
            raise Skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        self.mounts.append(path)
        return path

    def unmount_all(self) -> None:
        while self.mounts:
            subprocess.run(["umount", "-l", str(self.mounts.pop())], check=False)

    def outcome(self, out: Path, codes: list[int], log: str = "", note: str = "") -> Outcome:
        """What `out` holds after the runs: published or not, and from the last log where it resumed."""
        metrics = read_json(out / "metrics.json") if (out / "model" / "COMPLETE").is_file() else None
        resumed = re.findall(r"resume: from .*?(checkpoint-\d+)", log)
        return Outcome(codes=codes, published=(out / "model" / "COMPLETE").is_file(),
                       resumed_from=resumed[-1] if resumed else None,
                       final_step=metrics.get("global_step") if metrics else None,
                       eval_loss=metrics.get("eval_loss") if metrics else None, note=note)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def expect(condition: bool, what: str, log: str = "") -> None:
    """A case's own check: raise with the log's tail when it fails."""
    if not condition:
        raise AssertionError(f"{what}\n{log[-3000:]}")


def status_of(out: Path) -> tuple[str | None, int | None]:
    status = read_json(out / "status.json") or {}
    return status.get("state"), status.get("exit_code")


