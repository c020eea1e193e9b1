"""What every benchmark needs, built locally and kept under the work directory: the standard library's docstring
corpus (one paragraph a line) and random GPT-2 models whose byte-level BPE reaches GPT-2's 50,257 tokens.

The docstrings alone (1.3 MB) support only about 13k merges, so the tokenizer also learns from the standard
library's sources, tests included (about 30 MB of text); with them a 50,257-token vocabulary is reached.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from entrypoint.config import InitModelConfig
from entrypoint.corpus import build
from entrypoint.modelinit import init_model

GPT2_VOCAB = 50257
VENDORED = {"site-packages", "dist-packages", "__pycache__"}


def corpus(workdir: Path) -> Path:
    """The stdlib docstring corpus: <workdir>/data/train.txt and valid.txt, built once."""
    directory = workdir / "data"
    if not (directory / "valid.txt").is_file():
        build(directory)
    return directory


def tokenizer_corpus(workdir: Path) -> Path:
    """A folder of .txt for the tokenizer: the docstring corpus plus the standard library's sources."""
    directory = workdir / "tokenizer-corpus"
    sources = directory / "stdlib-sources.txt"
    if not sources.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.rglob("*.py") if not VENDORED & set(p.relative_to(root).parts))
        staging = sources.with_suffix(".tmp")
        with staging.open("w") as out:
            for path in files:
                out.write(path.read_text(errors="replace"))
        staging.replace(sources)
    docstrings = directory / "docstrings.txt"
    if not docstrings.is_file():
        docstrings.write_text((corpus(workdir) / "train.txt").read_text())
    return directory


def model(workdir: Path, size: str, vocab_size: int = GPT2_VOCAB, context: int = 1024) -> Path:
    """A random GPT-2 of `size` (tiny, small, gpt2) with its tokenizer, built once per shape."""
    directory = workdir / "models" / f"{size}-v{vocab_size}-c{context}"
    if not (directory / "config.json").is_file():
        init_model(InitModelConfig(output_dir=directory, corpus=tokenizer_corpus(workdir), size=size,
                                   vocab_size=vocab_size, context=context))
    return directory
