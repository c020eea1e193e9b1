"""Shared fixtures: a real corpus, a real tiny model and tokenizer, and the real `finetune` command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from entrypoint.config import InitModelConfig
from entrypoint.corpus import build
from entrypoint.modelinit import init_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """train.txt and valid.txt from the standard library's docstrings (a few thousand lines)."""
    directory = tmp_path_factory.mktemp("corpus")
    build(directory, max_documents=3000)
    return directory


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, corpus_dir) -> Path:
    """A random 2-layer GPT-2 with a 512-token BPE vocabulary trained on the corpus."""
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    init_model(InitModelConfig(output_dir=directory, corpus=corpus_dir / "train.txt", vocab_size=512, context=128))
    return directory


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture
def data_dir(tmp_path, corpus_dir) -> Path:
    """A private copy of the corpus, so a test may change or break it."""
    target = tmp_path / "data"
    shutil.copytree(corpus_dir, target)
    return target


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
