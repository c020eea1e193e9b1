"""A real-prose corpus on every machine: the Python standard library's own docstrings, read at run time.

Sources are parsed with `ast`, never imported, so modules with import-time side effects are harmless.
Each docstring paragraph becomes one line (one document), the layout of the tutorial's line-by-line data.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

# Test suites and bundled tools are excluded: they are code fixtures more than prose.
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__"}
MIN_CHARS = 40  # shorter paragraphs are mostly "Return x." fragments


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts))


def docstring_paragraphs(path: Path) -> Iterator[str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old sources
            tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            for para in re.split(r"\n\s*\n", doc or ""):
                text = " ".join(para.split())
                # Doctest examples and tables are code, not prose.
                if len(text) >= MIN_CHARS and ">>>" not in text and "---" not in text:
                    yield text


def build(output_dir: Path, max_documents: int | None = None, valid_every: int = 20) -> dict[str, int]:
    """Write train.txt and valid.txt (one paragraph a line); every `valid_every`-th document, chosen by
    a hash of its text so the split is stable, goes to validation. Returns document counts."""
    output_dir.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    counts = {"train": 0, "valid": 0}
    tmp = {name: output_dir / f".{name}.txt.tmp" for name in counts}
    with tmp["train"].open("w") as train, tmp["valid"].open("w") as valid:
        for path in stdlib_files():
            for text in docstring_paragraphs(path):
                if text in seen:
                    continue
                seen.add(text)
                bucket = int(hashlib.blake2b(text.encode(), digest_size=4).hexdigest(), 16) % valid_every
                name = "valid" if bucket == 0 else "train"
                (valid if name == "valid" else train).write(text + "\n")
                counts[name] += 1
                if max_documents and len(seen) >= max_documents:
                    break
            if max_documents and len(seen) >= max_documents:
                break
    for name, path in tmp.items():
        path.replace(output_dir / f"{name}.txt")
    return counts
