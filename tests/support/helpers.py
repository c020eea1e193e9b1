"""Plain helpers for tests: the real CLI in a subprocess, with a clean environment."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any FINETUNE_* or platform variable leaking in from the caller."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FINETUNE_", "SM_", "AIP_")) and k != "HF_TOKEN"}
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra})
    return env


def finetune(*args: str, env: dict[str, str] | None = None, timeout: float = 600,
             cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a new process, as a user or a container would."""
    return subprocess.run([sys.executable, "-m", "entrypoint", *args], env=env or clean_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


# Short training: 16 steps of 8 x 32-token blocks, evaluated and checkpointed every 8 steps.
FAST_TRAIN = {"FINETUNE_BLOCK_SIZE": "32", "FINETUNE_BATCH_SIZE": "8", "FINETUNE_GRAD_ACCUM": "1",
              "FINETUNE_MAX_STEPS": "16", "FINETUNE_EVAL_STEPS": "8", "FINETUNE_SAVE_STEPS": "8",
              "FINETUNE_LOGGING_STEPS": "4", "FINETUNE_LEARNING_RATE": "3e-3"}


def train_env(model: Path, data: Path, out: Path, base: dict[str, str] = FAST_TRAIN, **extra: str) -> dict[str, str]:
    """A clean environment that configures `finetune train` by FINETUNE_* variables alone."""
    return clean_env(**{**base, "FINETUNE_MODEL": str(model), "FINETUNE_DATA_DIR": str(data),
                        "FINETUNE_OUTPUT_DIR": str(out), **extra})


class Job:
    """`finetune train` in the background, its log lines collected as they come, so a test can act at a line."""

    def __init__(self, env: dict[str, str], *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "entrypoint", "train", *args], env=env, text=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stderr:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 180) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"never saw {pattern!r}; log:\n{''.join(self.lines)[-3000:]}")

    def finish(self, timeout: float = 180) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)
        return code, "".join(self.lines)

    def kill_mid_save(self, checkpoint_dir: Path, marker: str, keep: str, timeout: float = 180) -> Path | None:
        """SIGKILL the run while it writes a checkpoint other than `keep` (one whose `marker` is not there yet):
        that torn checkpoint, or None when no save was caught before the run ended or `timeout` passed."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            for path in checkpoint_dir.glob("checkpoint-*"):
                if path.name != keep and not (path / marker).exists():
                    self.proc.kill()
                    return path
            time.sleep(0.0005)
        return None
