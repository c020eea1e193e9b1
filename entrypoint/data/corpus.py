"""A real-prose corpus on every machine: the Python standard library's own docstrings, read at run time.

Sources are parsed with `ast`, never imported, so modules with import-time side effects are harmless.
Each docstring paragraph becomes one line (one document), the layout of the tutorial's line-by-line data.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import re
import sysconfig
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from entrypoint import fsutil
from entrypoint.errors import DataError, OutputError

# Test suites and bundled tools are excluded: they are code fixtures more than prose.
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__"}
MIN_CHARS = 40  # shorter paragraphs are mostly "Return x." fragments


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts))


def parse_source(path: Path) -> ast.Module | None:
    """A standard-library source file's syntax tree, or None when this Python cannot parse it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old sources
            return ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return None


def docstring_paragraphs(path: Path) -> Iterator[str]:
    if (tree := parse_source(path)) is None:
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
    """Write train.txt and valid.txt, one docstring paragraph a line (see write_split). Returns document counts."""
    paragraphs = ((text, text) for path in stdlib_files() for text in docstring_paragraphs(path))
    return write_split(output_dir, paragraphs, ".txt", max_documents, valid_every)


def write_split(output_dir: Path, documents: Iterable[tuple[str, str]], suffix: str, limit: int | None,
                valid_every: int) -> dict[str, int]:
    """Write `documents`, (key, line) pairs, to train{suffix} and valid{suffix}, one line each, up to `limit` of
    them. A key seen before is skipped; every `valid_every`-th document, chosen by a hash of its key so the split
    is stable, goes to validation. Returns the counts of both.

    Both files are written under temporary names and renamed into place once complete, train last (its presence
    means the corpus is complete); no valid file is left when no document went there. A failure (a read-only or
    full volume) removes the temporary files, and the folder when this made it, and raises OutputError."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputError(f"--output-dir {output_dir} is a file; choose a directory path.")
    counts = {"train": 0, "valid": 0}
    final = {name: output_dir / f"{name}{suffix}" for name in counts}
    tmp = {name: fsutil.temp_sibling(path) for name, path in final.items()}
    created = not output_dir.exists()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tmp["train"].open("w") as train, tmp["valid"].open("w") as valid:
            _write({"train": train, "valid": valid}, counts, documents, limit, valid_every)
        if not counts["train"]:
            raise DataError(f"no docstrings found under {sysconfig.get_paths()['stdlib']}; this Python has no "
                            f"standard library sources, so write your own train{suffix} instead.")
        if not counts["valid"]:  # an empty valid file would fail train; without one, train holds a split out
            final["valid"].unlink(missing_ok=True)
        else:
            fsutil.commit(tmp["valid"], final["valid"])
        fsutil.commit(tmp["train"], final["train"])
    except OSError as exc:
        raise OutputError(f"cannot write the corpus to {output_dir} ({exc.strerror or exc}); mount it read-write, "
                          "free space or choose another --output-dir.") from None
    finally:
        for path in tmp.values():
            with contextlib.suppress(OSError):  # never created, or in a directory that could not be made
                path.unlink()
        if created and not final["train"].exists():
            with contextlib.suppress(OSError):  # a failed run leaves no empty folder it made
                output_dir.rmdir()
    return counts


def _write(files: dict[str, IO[str]], counts: dict[str, int], documents: Iterable[tuple[str, str]],
           limit: int | None, valid_every: int) -> None:
    seen: set[str] = set()
    for key, line in documents:
        if key in seen:
            continue
        seen.add(key)
        bucket = int(hashlib.blake2b(key.encode(), digest_size=4).hexdigest(), 16) % valid_every
        name = "valid" if bucket == 0 else "train"
        files[name].write(line + "\n")
        counts[name] += 1
        if limit and len(seen) >= limit:
            return
