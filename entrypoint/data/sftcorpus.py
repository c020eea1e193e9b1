"""An instruction corpus on every machine: prompt/completion pairs from the Python standard library, read at run
time (nothing is copied into the repository).

Each public function with a docstring becomes one record: the prompt is its signature as a `def` line, the
completion the first paragraph of its docstring. Sources are parsed with `ast`, never imported. With `alpaca` the
same pairs are written as Alpaca records (instruction: the signature, input: empty, output: the paragraph), which
training renders to the same prompts (records.py's layout: the instruction, then a newline). With `preferences` they
become preference pairs for DPO: the same prompt, chosen = its own docstring, rejected = the docstring of the function
read before it (another function's, usually from the same module, so the two read alike).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from pathlib import Path

from entrypoint.data.corpus import parse_source, stdlib_files, write_split

MIN_CHARS = 30  # shorter first paragraphs are mostly "Return x." fragments with nothing to learn
# Preference pairs keep signatures up to this long (about 40 tokens of the demo's tokenizer), so a short block holds
# prompt and answer: a pair whose prompt fills the block is an error, not a truncation (preference.py).
MAX_PREFERENCE_PROMPT_CHARS = 120


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


def as_alpaca(record: dict[str, str]) -> dict[str, str]:
    """A prompt/completion pair as the Alpaca record that renders to it."""
    return {"instruction": record["prompt"].removesuffix("\n"), "input": "", "output": record["completion"]}


def preference_pairs(records: Iterator[dict[str, str]]) -> Iterator[dict[str, str]]:
    """{prompt, chosen, rejected}: each record's prompt and completion, and the previous record's completion."""
    previous = None
    for record in records:
        if len(record["prompt"]) > MAX_PREFERENCE_PROMPT_CHARS:
            continue
        if previous is not None and previous != record["completion"]:
            yield {"prompt": record["prompt"], "chosen": record["completion"], "rejected": previous}
        previous = record["completion"]


def build(output_dir: Path, max_records: int | None = None, valid_every: int = 20,
          alpaca: bool = False, preferences: bool = False) -> dict[str, int]:
    """Write train.jsonl and valid.jsonl (see corpus.write_split), as prompt/completion, Alpaca or preference
    records; the split and duplicates go by prompt (the same signature in two modules is kept once). Returns record
    counts."""
    pairs = (record for path in stdlib_files() for record in instruction_pairs(path))
    if preferences:
        pairs = preference_pairs(pairs)
    records = ((record["prompt"], json.dumps(as_alpaca(record) if alpaca else record)) for record in pairs)
    return write_split(output_dir, records, ".jsonl", max_records, valid_every)
