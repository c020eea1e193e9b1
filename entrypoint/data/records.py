"""Records that are converted before tokenizing: Alpaca and ShareGPT records and pretokenized rows; and reading the
first records of a file (for detecting each file's format, for `doctor`, and for saying where a bad record is).

Layouts (docs/data.md shows each with an example):
- Alpaca `{instruction, input?, output, system?}` becomes an instruction record. The prompt is the system text,
  the instruction and the input, those present and non-empty, each separated by a blank line, then a newline;
  the completion is the output. So `{"instruction": "Add 2 and 3.", "input": "", "output": "5"}` trains as
  prompt "Add 2 and 3.\\n", completion "5" (then EOS), and at inference the model is prompted the same way.
- ShareGPT `{conversations: [{from, value}, ...]}` becomes a chat record, each turn's `from` mapped by ROLES
  (`{role, content}` turns are taken too). It must end with an assistant turn: the answer is what is learnt.
- Pretokenized `{input_ids, labels?, attention_mask?}` rows are taken as they are: no BOS or EOS is added and no
  text is tokenized. Positions whose attention_mask is 0 (padding) are dropped; labels of -100 carry no loss and
  every other label must equal the id at its position (the model shifts labels itself, as transformers does).

Each converter raises a DataError naming the problem and the fix; the caller prefixes where the record is.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import gzip
import io
import json
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from entrypoint.data import formats, preference
from entrypoint.data.formats import ALPACA, PREFERENCE, PRETOKENIZED, SHAREGPT
from entrypoint.errors import DataError

# Bumped whenever a layout above changes, so the token cache (its key holds this) is built again.
RENDERING = "alpaca-1,sharegpt-1,pretokenized-1,preference-1"
# ShareGPT's `from` values -> chat roles. function_call is the assistant calling a tool (learnt, like any answer);
# observation and tool are what the tool returned (context, no loss).
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
         "function_call": "assistant", "tool": "tool", "observation": "tool"}
PEEK_BYTES = 1 << 20  # read to find a JSON array's first record


def alpaca(record: Mapping) -> dict[str, str]:
    """An Alpaca record as {"prompt", "completion"} (the layout in the module docstring)."""
    parts = []
    for name, required in (("system", False), ("instruction", True), ("input", False)):
        value = record.get(name)
        if value is None and not required:
            continue
        if not isinstance(value, str):
            raise DataError(f"Alpaca field {name!r} is {type(value).__name__}, not a string; write text there.")
        if value.strip():
            parts.append(value)
        elif required:
            raise DataError("Alpaca field 'instruction' is empty; write the instruction or remove the record.")
    output = record.get("output")
    if not isinstance(output, str) or not output.strip():
        what = "empty" if isinstance(output, str) else f"{type(output).__name__}, not a string"
        raise DataError(f"Alpaca field 'output' is {what}; write the answer there or remove the record.")
    return {"prompt": "\n\n".join(parts) + "\n", "completion": output}


def sharegpt(record: Mapping) -> dict[str, list[dict[str, str]]]:
    """A ShareGPT record as {"messages": [{role, content}, ...]}."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError("'conversations' is not a non-empty list of turns; write "
                        '[{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}].')
    messages = []
    for n, turn in enumerate(turns, 1):
        if not isinstance(turn, Mapping):
            raise DataError(f"turn {n} is {type(turn).__name__}, not {{from, value}}; fix the record.")
        speaker, text = (turn.get("from"), turn.get("value")) if "from" in turn else (turn.get("role"),
                                                                                      turn.get("content"))
        if speaker not in ROLES:
            raise DataError(f"turn {n} is from {speaker!r}, not a known role ({', '.join(ROLES)}); rename it, "
                            "e.g. human for the user and gpt for the assistant.")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"turn {n} ({speaker}) has an empty or missing value; write its text or drop the turn.")
        messages.append({"role": ROLES[speaker], "content": text})
    if messages[-1]["role"] != "assistant":
        raise DataError(f"the conversation ends with a {turns[-1].get('from', turns[-1].get('role'))} turn, not the "
                        "assistant's; end it with the answer (a gpt turn) or drop the trailing turn.")
    return {"messages": messages}


def pretokenized(record: Mapping, vocab_size: int | None) -> dict[str, list[int]]:
    """A pretokenized row as {"input_ids", "labels"}: padding (attention_mask 0) dropped, every id below
    `vocab_size` (the model's embedding rows; None: unchecked), labels -100 or the id at their position."""
    ids = _ints(record.get("input_ids"), "input_ids")
    labels = ids if record.get("labels") is None else _ints(record["labels"], "labels")
    mask = [1] * len(ids) if record.get("attention_mask") is None else _ints(record["attention_mask"],
                                                                               "attention_mask")
    if not len(ids) == len(labels) == len(mask):
        raise DataError(f"input_ids, labels and attention_mask differ in length ({len(ids)}, {len(labels)}, "
                        f"{len(mask)}); write one value per token in each.")
    keep = [i for i, m in enumerate(mask) if m]
    if not keep:
        raise DataError("the row has no tokens (input_ids empty, or attention_mask all 0); remove it.")
    ids, labels = [ids[i] for i in keep], [labels[i] for i in keep]
    bad = next((i for i in ids if i < 0 or (vocab_size is not None and i >= vocab_size)), None)
    if bad is not None:
        raise DataError(f"token id {bad} is outside the model's vocabulary of {vocab_size} ids; tokenize the data "
                        "with this model's tokenizer, or train the model it was tokenized for.")
    wrong = next((n for n, (i, label) in enumerate(zip(ids, labels, strict=True))
                  if label not in (i, formats.IGNORE)), None)
    if wrong is not None:
        raise DataError(f"labels[{wrong}] is {labels[wrong]}, neither -100 nor input_ids[{wrong}] ({ids[wrong]}); "
                        "labels are the input ids (the model shifts them) with -100 where no loss.")
    return {"input_ids": ids, "labels": [label if label == i else formats.IGNORE
                                         for i, label in zip(ids, labels, strict=True)]}


def _ints(value, name: str) -> list[int]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                      for v in value):
        raise DataError(f"{name} is not a list of integers ({str(value)[:60]}); write token ids there.")
    return list(value)


def converter(fmt: str, vocab_size: int | None, fields: formats.Fields) -> Callable[[Mapping], dict]:
    """The function that converts one record of `fmt` (ALPACA, SHAREGPT, PRETOKENIZED or PREFERENCE, whose fields
    `fields` names)."""
    if fmt == PRETOKENIZED:
        return lambda record: pretokenized(record, vocab_size)
    if fmt == PREFERENCE:
        return lambda record: preference.pair(record, fields)
    return {ALPACA: alpaca, SHAREGPT: sharegpt}[fmt]


def convert(ds, fmt: str, vocab_size: int | None, where: Callable[[int], str], cache_file: Path,
            fields: formats.Fields):
    """A loaded `datasets.Dataset` of `fmt` records converted (a memory-mapped copy at `cache_file`): columns
    prompt/completion, messages, input_ids/labels, or preference.pair's (the canonical names whatever `fields`
    called them). A bad record raises its DataError prefixed by `where(row)`."""
    import datasets

    convert_one = converter(fmt, vocab_size, fields)

    def one(record: dict, row: int) -> dict:
        try:
            return convert_one(record)
        except DataError as exc:
            raise DataError(f"{where(row)}: {exc.problems[0]}") from None

    ids, text = datasets.List(datasets.Value("int64")), datasets.Value("string")
    turns = datasets.List({"role": text, "content": text})
    features = {ALPACA: {"prompt": text, "completion": text}, SHAREGPT: {"messages": turns},
                PRETOKENIZED: {"input_ids": ids, "labels": ids},
                PREFERENCE: {"prompt": text, "chosen": text, "rejected": text, "prefix": turns, "chosen_turns": turns,
                             "rejected_turns": turns}}[fmt]
    return ds.map(one, with_indices=True, remove_columns=ds.column_names, features=datasets.Features(features),
                  cache_file_name=str(cache_file), desc=f"reading {fmt} records")


def open_text(path: Path):
    """A text file (gzip-compressed when it ends in .gz) opened for reading as UTF-8."""
    raw = path.open("rb")
    return io.TextIOWrapper(gzip.open(raw) if path.suffix == ".gz" else raw, encoding="utf-8")


def peek(path: Path, loader: str, limit: int) -> Iterator[tuple[str, dict]]:
    """(where, record) for the first `limit` records of a record file (loader json, csv or parquet; where is
    "line N", "row N" or "record N"), as the loaders read them; a file that does not parse raises DataError."""
    try:
        if loader == "parquet":
            yield from _peek_parquet(path, limit)
        elif loader == "csv":
            with open_text(path) as stream:
                for n, record in enumerate(csv.DictReader(stream), 2):  # line 1 is the header
                    if n - 2 >= limit:
                        return
                    yield f"line {n}", record
        else:
            yield from _peek_json(path, limit)
    except (OSError, EOFError, UnicodeDecodeError, ValueError, zlib.error) as exc:
        raise DataError(f"cannot read {path} ({str(exc).splitlines()[0][:120]}); fix or remove the file.") from None


def _peek_parquet(path: Path, limit: int) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    seen = 0
    # An object in a store (objectstore.RemoteFile) is read through its seekable file: the footer and the row
    # groups asked for, by ranged reads.
    source = path if isinstance(path, Path) else path.open("rb")
    for batch in pq.ParquetFile(source).iter_batches(batch_size=min(limit, 1000)):
        for record in batch.to_pylist():
            if seen >= limit:
                return
            seen += 1
            yield f"row {seen}", record


def _peek_json(path: Path, limit: int) -> Iterator[tuple[str, dict]]:
    with open_text(path) as stream:
        head = stream.read(PEEK_BYTES)
        if head.lstrip().startswith("["):  # one JSON array: parsed whole (such files are small)
            records = json.loads(head + stream.read())
            for n, record in enumerate(records[:limit] if isinstance(records, list) else [], 1):
                yield f"record {n}", record if isinstance(record, dict) else {}
            return
        lines = _lines(head, stream)
        seen = 0
        for n, line in enumerate(lines, 1):
            if seen >= limit:
                return
            if line.strip():
                seen += 1
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise DataError(f"{path} line {n} is not JSON ({exc}); fix or remove the line.") from None
                yield f"line {n}", record if isinstance(record, dict) else {}


def _lines(head: str, stream) -> Iterator[str]:
    """The lines of `head` followed by the rest of `stream`, the line cut by the head's end joined again."""
    pieces = head.split("\n")
    yield from pieces[:-1]
    yield pieces[-1] + stream.readline()
    yield from stream


def first_keys(path: Path, loader: str) -> list[str]:
    """The fields of a record file's first record ([] for an empty one)."""
    if loader == "parquet":
        import pyarrow.parquet as pq

        with contextlib.suppress(Exception):
            return list(pq.read_schema(path).names)
    return next((list(record) for _, record in peek(path, loader, 1)), [])


def locator(files: list[Path], loader: str) -> Callable[[int], str]:
    """For rows of `files` loaded in order as one dataset: where row i is ("<file> line N"). Counting the
    records of each file happens only when a row is looked up, which is on the error path."""
    def where(row: int) -> str:
        ends, total = [], 0
        for path in files:
            total += sum(1 for _ in peek(path, loader, 1 << 62)) if len(files) > 1 else 1 << 62
            ends.append(total)
        index = bisect.bisect_right(ends, row)
        start = ends[index - 1] if index else 0
        *_, (within, _) = peek(files[index], loader, row - start + 1)
        return f"{files[index]} {within}"

    return where
