"""Shared fixtures: a real corpus, a real tiny model and tokenizer, and the real `finetune` command."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from entrypoint.commands.init_model import init_model
from entrypoint.config.schema import InitModelConfig
from entrypoint.data.corpus import build
from tests.support.helpers import FAST_TRAIN, clean_env, finetune  # noqa: F401  (re-exported for test modules)


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
