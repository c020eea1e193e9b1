"""Plain helpers for tests: the real CLI in a subprocess, with a clean environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


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
