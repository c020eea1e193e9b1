"""What every benchmark needs, built locally and kept under the work directory: the standard library's docstring
corpus (one paragraph a line) and random GPT-2 models whose byte-level BPE reaches GPT-2's 50,257 tokens.

The docstrings alone (1.3 MB) support only about 13k merges, so the tokenizer also learns from the standard
library's sources, tests included (about 30 MB of text); with them a 50,257-token vocabulary is reached.
Training that tokenizer is the slow part (17 s here, 30-60 s expected on a GPU machine's CPU), so the GPU check
takes it carried: `make gpu-assets` writes the corpus and the model directory without its weights (5 MB, not
500), and the check only draws the random weights there (`python -m bench.assets`, a few seconds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import sysconfig
from pathlib import Path

from entrypoint.commands.init_model import init_model
from entrypoint.config.schema import InitModelConfig
from entrypoint.data.corpus import build

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
    """A random GPT-2 of `size` (tiny, small, gpt2) with its tokenizer, built once per shape; a carried directory
    without weights (see carry) gets random weights drawn for its config."""
    directory = workdir / "models" / f"{size}-v{vocab_size}-c{context}"
    if not (directory / "config.json").is_file():
        init_model(InitModelConfig(output_dir=directory, corpus=tokenizer_corpus(workdir), size=size,
                                   vocab_size=vocab_size, context=context))
    elif not any(directory.glob("*.safetensors")):
        draw_weights(directory)
    return directory


def draw_weights(directory: Path, seed: int = 0) -> None:
    """Random weights for the GPT-2 config in `directory` (the tokenizer files there stay as they are)."""
    import torch
    from transformers import AutoConfig, GenerationConfig, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(AutoConfig.from_pretrained(directory))
    model.generation_config = GenerationConfig.from_pretrained(directory)
    model.save_pretrained(directory)


def carry(destination: Path, workdir: Path) -> Path:
    """What the GPU check takes along: the corpus and the GPT-2 124M directory less its weights, in `destination`
    (built in `workdir` first)."""
    built = model(workdir, "gpt2")
    staging = destination.with_name(destination.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(corpus(workdir), staging / "data")
    shutil.copytree(built, staging / "models" / built.name, ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.rmtree(destination, ignore_errors=True)
    staging.rename(destination)
    return destination


def dry(workdir: Path) -> tuple[Path, Path, Path]:
    """The dry mode's (model, train file, validation file): a tiny GPT-2 with a 512-token BPE on 1,500 documents
    (its context still 512, the tutorial's padding length), and 32 validation lines."""
    data = workdir / "dry-data"
    if not (data / "valid.txt").is_file():
        build(data, max_documents=1500)
    valid = data / "valid-32-lines.txt"
    valid.write_text("".join((data / "valid.txt").read_text().splitlines(keepends=True)[:32]))
    directory = workdir / "dry-model"
    if not (directory / "config.json").is_file():
        init_model(InitModelConfig(output_dir=directory, corpus=data / "train.txt", size="tiny", vocab_size=512,
                                   context=512))
    return directory, data / "train.txt", valid


def gpu(workdir: Path, carried: Path | None) -> tuple[Path, Path, Path]:
    """The GPU check's (model, train file, validation file): GPT-2 124M's shape, from `carried` when it holds
    what carry wrote, else built here."""
    if carried and (carried / "data" / "valid.txt").is_file():
        for part in ("data", "models"):
            if not (workdir / part).exists():
                shutil.copytree(carried / part, workdir / part)
    data = corpus(workdir)
    return model(workdir, "gpt2"), data / "train.txt", data / "valid.txt"


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.assets --workdir W [--carried DIR | --dry] --json F`: the GPU check's assets stage;
    `--carry DIR`: write what a GPU machine takes along (make gpu-assets)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--carried", type=Path, help="A folder --carry wrote; built from scratch without it.")
    parser.add_argument("--carry", type=Path, help="Write the carried assets here and stop.")
    parser.add_argument("--dry", action="store_true", help="The dry mode's tiny model and corpus.")
    parser.add_argument("--json", type=Path, help="Write {model, train, valid} here.")
    args = parser.parse_args(argv)
    if args.carry:
        carry(args.carry.resolve(), args.workdir.resolve())
        size = sum(p.stat().st_size for p in args.carry.rglob("*") if p.is_file())
        print(f"assets: {args.carry} ({size / 2**20:.1f} MiB)")
        return
    paths = dry(args.workdir) if args.dry else gpu(args.workdir, args.carried)
    found = dict(zip(("model", "train", "valid"), map(str, paths), strict=True))
    print(f"assets: {found}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(found))


if __name__ == "__main__":
    main()
