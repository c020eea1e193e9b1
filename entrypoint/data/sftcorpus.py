"""An instruction corpus on every machine: prompt/completion pairs from the Python standard library, read at run
time (nothing is copied into the repository).

Each public function with a docstring becomes one record: the prompt is its signature as a `def` line, the
completion the first paragraph of its docstring. Sources are parsed with `ast`, never imported.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from entrypoint import fsutil
from entrypoint.data.corpus import parse_source, stdlib_files

MIN_CHARS = 30  # shorter first paragraphs are mostly "Return x." fragments with nothing to learn


def signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """The function's `def` line as written, decorators and body left out."""
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    return f"{prefix} {node.name}({ast.unparse(node.args)}){returns}:"


def instruction_pairs(path: Path) -> Iterator[dict[str, str]]:
    if (tree := parse_source(path)) is None:
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and not node.name.startswith("_"):
            doc = ast.get_docstring(node) or ""
            first = " ".join(doc.split("\n\n", 1)[0].split())
            if len(first) >= MIN_CHARS and ">>>" not in first:
                # The prompt ends where the answer starts, so the newline belongs to it (see formats.py).
                yield {"prompt": signature(node) + "\n", "completion": first}


def build(output_dir: Path, max_records: int | None = None, valid_every: int = 20) -> dict[str, int]:
    """Write train.jsonl and valid.jsonl; every `valid_every`-th record, chosen by a hash of its prompt so the
    split is stable, goes to validation. Duplicate prompts (the same signature in two modules) are kept once.
    Returns record counts."""
    output_dir.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "valid": 0}
    tmp = {name: fsutil.temp_sibling(output_dir / f"{name}.jsonl") for name in counts}
    try:
        with tmp["train"].open("w") as train, tmp["valid"].open("w") as valid:
            _write(train, valid, counts, max_records, valid_every)
        for name, path in tmp.items():
            fsutil.commit(path, output_dir / f"{name}.jsonl")
    finally:
        for path in tmp.values():
            with contextlib.suppress(OSError):  # already moved into place, or never created
                path.unlink()
    return counts


def _write(train, valid, counts: dict[str, int], max_records: int | None, valid_every: int) -> None:
    seen: set[str] = set()
    for path in stdlib_files():
        for record in instruction_pairs(path):
            if record["prompt"] in seen:
                continue
            seen.add(record["prompt"])
            bucket = int(hashlib.blake2b(record["prompt"].encode(), digest_size=4).hexdigest(), 16)
            name = "valid" if bucket % valid_every == 0 else "train"
            (valid if name == "valid" else train).write(json.dumps(record) + "\n")
            counts[name] += 1
            if max_records and len(seen) >= max_records:
                return
