"""What `doctor` and `prepare` say about the data before anything is tokenized: each training and validation file's
detected format, the fields it reads, and every problem `train` would stop on in its first SAMPLE records.

The records are read here without `datasets` (records.peek) and put through the same detection, conversion and
encoding as training (formats.detect, records.converter, formats.encode with the run's tokenizer), so a file that
passes will not stop `train` on its format, as far as the records checked go. Problems are one line each; one that
repeats (a systematic mistake) is shown once with how many records have it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from entrypoint.data import formats, hubdata, preference, records
from entrypoint.data import split as splitting
from entrypoint.data.mixture import discover
from entrypoint.data.options import DataOptions
from entrypoint.data.pipeline import FORMAT_NAMES, laid_out, summarize
from entrypoint.data.sources import Source, file_format, file_formats
from entrypoint.errors import DataError

SAMPLE = 2000  # records read per file: seconds on any corpus, and enough to show a systematic mistake
MAX_PROBLEMS = 10  # distinct problems listed per file


@dataclass
class FileReport:
    """One input file: its split, detected format (None: none fits), the fields read, the records checked, and
    the problems found, one line each."""

    path: Path
    split: str
    fmt: str | None = None
    fields: tuple[str, ...] = ()
    checked: int = 0
    whole: bool = True  # every record was checked (the file has fewer than the limit)
    problems: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # each record's tokens (0: skipped), when encoded

    @property
    def label(self) -> str:
        """The file's name; for a saved dataset's folder, with the split."""
        return self.path.name if self.path.is_file() else f"{self.path.name} ({self.split})"

    def line(self) -> str:
        """What doctor prints for a file without problems."""
        what = "all of them" if self.whole else "the first of the file"
        return (f"{self.fmt} data from {', '.join(self.fields)}; {self.checked} records checked ({what})")


@dataclass(frozen=True)
class Check:
    """What a record is checked with: the fields' names, the tokenizer (None: conversions only), its BOS/EOS
    convention, --train-on-prompt, the model's vocabulary, and --block-size (preference pairs must fit it)."""

    fields: formats.Fields
    tokenizer: object
    train_on_prompt: bool
    vocab_size: int | None
    block_size: int | None = None

    @property
    def convention(self) -> formats.Convention | None:
        return formats.convention(self.tokenizer) if self.tokenizer is not None else None


def survey(opts: DataOptions, tokenizer=None, limit: int = SAMPLE,
           block_size: int | None = None) -> tuple[list[FileReport], list[str]]:
    """Every input file's report, and the problems of the inputs as a whole (a split mixing formats, training
    and validation data in different formats; with `block_size`, when every record was read, too few documents to
    hold some out or too few tokens for a block). Raises DataError when the inputs cannot be found (discover)."""
    vocab = opts.vocab_size or (len(tokenizer) if tokenizer is not None else None)
    check = Check(formats.Fields.from_config(opts), tokenizer, opts.train_on_prompt, vocab, block_size)
    reports: list[FileReport] = []
    problems: list[str] = []
    split_formats = {}
    for split, source in zip(("train", "valid"), discover(opts), strict=True):
        try:
            file_formats(source.files, check.fields)
        except DataError as exc:
            problems += exc.problems
        if source.parts:  # --dataset: each dataset's first records, streamed
            found = [_dataset(part.named, split, opts, check, limit) for part in source.parts]
        elif source.saved_dataset:
            found = [_saved(source, split, check, limit)]
        else:
            found = [_file(path, split, check, limit) for path in source.files]
        reports += found
        split_formats[split] = {_family(r.fmt) for r in found if r.fmt}
    train, valid = split_formats.get("train", set()), split_formats.get("valid", set())
    if len(train) == 1 and len(valid) == 1 and train != valid:
        problems.append(f"the training data is {FORMAT_NAMES[train.pop()]} but the validation data is "
                        f"{FORMAT_NAMES[valid.pop()]}; give both in one format.")
    if block_size and not problems:
        problems += _size_problems(opts, reports, block_size)
    return reports, problems


def _size_problems(opts: DataOptions, reports: list[FileReport], block_size: int) -> list[str]:
    """What pipeline.summarize would refuse in data read whole: counted from the records' encoded lengths, split
    as training splits them. Nothing when a file was not read whole, had problems, or is `.txt` (whose documents
    --txt-split decides)."""
    if not reports or any(not r.whole or r.problems or file_format(r.path) == "text" or
                          len(r.lengths) != r.checked for r in reports):
        return []
    lengths = {split: np.array([n for r in reports if r.split == split for n in r.lengths], dtype=np.int64)
               for split in ("train", "valid")}
    holds_out = not any(r.split == "valid" for r in reports)
    if holds_out:
        held = splitting.held_out(np.arange(len(lengths["train"])), opts.validation_split, opts.seed)
        lengths = {"train": lengths["train"][~held], "valid": lengths["train"][held]}
    counts = {}
    for split, found in lengths.items():
        found = found[found > 0]
        counts |= {f"{split}_documents": len(found), f"{split}_tokens": int(found.sum()),
                   f"{split}_rows": int((-(-found // block_size)).sum())}
    try:
        summarize(laid_out(opts, reports[0].fmt), counts, block_size, holds_out)
    except DataError as exc:
        return list(exc.problems)
    return []


def check(opts: DataOptions, tokenizer, block_size: int | None = None, limit: int = SAMPLE) -> list[FileReport]:
    """The reports of `survey`, or one DataError carrying every problem found (prepare's check before it starts)."""
    reports, problems = survey(opts, tokenizer, limit, block_size)
    problems = [p for r in reports for p in r.problems] + problems
    if problems:
        raise DataError(*problems)
    return reports


def _family(fmt: str) -> str:
    """What a format trains as (Alpaca records are instruction data, ShareGPT records chat)."""
    return {formats.ALPACA: formats.INSTRUCTION, formats.SHAREGPT: formats.CHAT}.get(fmt, fmt)


def _file(path: Path, split: str, check: Check, limit: int) -> FileReport:
    report = FileReport(path, split)
    loader = file_format(path)
    try:
        if loader == "text":
            report.fmt, report.fields = formats.TEXT, ("each line",)
            report.checked = sum(1 for _ in zip(range(limit + 1), _lines(path), strict=False))
            report.checked, report.whole = min(report.checked, limit), report.checked <= limit
            return report
        keys = records.first_keys(path, loader)
        report.fmt = formats.detect(keys, check.fields)
        report.fields = _fields_read(report.fmt, keys, check.fields)
        _records(report, records.peek(path, loader, limit + 1), check, lambda where: f"{path} {where}", limit)
    except DataError as exc:
        report.problems.append(exc.problems[0] if str(path) in exc.problems[0] else f"{path}: {exc.problems[0]}")
    return report


def _dataset(named: hubdata.Named, split: str, opts: DataOptions, check: Check, limit: int) -> FileReport:
    """A dataset by name: its first records of the split read, streamed, through the same checks as a file's."""
    which = named.split if split == "train" else named.valid_split
    report = FileReport(Path(named.name), split, whole=False)
    where = f"--dataset {named.name} split {which}"
    try:
        rows = hubdata.peek(named, which, opts, limit + 1)
        if not rows:
            raise DataError(f"{where} has no records; pick another --dataset-split or add records.")
        report.fmt = formats.detect(rows[0].keys(), check.fields)
        report.fields = _fields_read(report.fmt, rows[0].keys(), check.fields)
        report.whole = len(rows) <= limit
        _records(report, ((f"record {n + 1}", row) for n, row in enumerate(rows)), check,
                 lambda at: f"{where} {at}", limit)
    except DataError as exc:
        report.problems.append(exc.problems[0] if where in exc.problems[0] else f"{where}: {exc.problems[0]}")
    return report


def _saved(source: Source, split: str, check: Check, limit: int) -> FileReport:
    import datasets

    report = FileReport(source.saved_dataset, split)
    loaded = datasets.load_from_disk(str(source.saved_dataset))
    if isinstance(loaded, datasets.DatasetDict):
        if source.split not in loaded:
            report.problems.append(f"saved dataset {source.saved_dataset} has no {source.split!r} split; save one, "
                                   "or pass --train-file/--valid-file.")
            return report
        loaded = loaded[source.split]
    try:
        report.fmt = formats.detect(loaded.column_names, check.fields)
    except DataError as exc:
        report.problems.append(f"{source.describe()}: {exc.problems[0]}")
        return report
    report.fields = _fields_read(report.fmt, loaded.column_names, check.fields)
    rows = ((f"row {n + 1}", row) for n, row in enumerate(loaded.select(range(min(limit, len(loaded))))))
    report.whole = len(loaded) <= limit
    _records(report, rows, check, lambda where: f"{source.describe()} split {source.split!r} {where}", limit)
    return report


def _lines(path: Path) -> Iterator[str]:
    with records.open_text(path) as stream:
        yield from stream


def _fields_read(fmt: str, keys, fields: formats.Fields) -> tuple[str, ...]:
    wanted = {formats.TEXT: (fields.text,), formats.INSTRUCTION: (fields.prompt, fields.completion),
              formats.CHAT: (fields.messages,), formats.ALPACA: formats.ALPACA_READS,
              formats.SHAREGPT: (formats.SHAREGPT_FIELD,), formats.PRETOKENIZED: formats.PRETOKENIZED_READS,
              formats.PREFERENCE: (fields.prompt, fields.chosen, fields.rejected)}[fmt]
    return tuple(name for name in wanted if name in keys)


def _records(report: FileReport, rows, check: Check, where: Callable[[str], str], limit: int) -> None:
    """Put each record through what training does with it, collecting distinct problems with where each first
    occurs and how many records have it."""
    convert = records.converter(report.fmt, check.vocab_size, check.fields) if report.fmt in (
        formats.ALPACA, formats.SHAREGPT, formats.PRETOKENIZED, formats.PREFERENCE) else None
    fmt, conv = _family(report.fmt), check.convention
    seen: dict[str, list] = {}
    for location, record in rows:
        if report.checked == limit:  # one record past the limit: the file has more
            report.whole = False
            break
        report.checked += 1
        try:
            record = convert(record) if convert else record
            text = record.get(check.fields.text) if fmt == formats.TEXT else None
            if fmt == formats.TEXT and not (text and (not isinstance(text, str) or text.strip())):
                report.lengths.append(0)  # empty documents are skipped, as training does
            elif fmt == formats.PRETOKENIZED:
                report.lengths.append(len(record["input_ids"]))
            elif fmt == formats.PREFERENCE and conv is not None:  # a pair is held out or trained as one
                pair = preference.encode(record, check.tokenizer, conv, check.block_size or 1 << 62)
                report.lengths.append(max(len(pair[0].ids), len(pair[1].ids)))
            elif conv is not None:
                fields = check.fields if convert is None else formats.Fields()
                encoded = formats.encode(record, fmt, check.tokenizer, conv, fields, check.train_on_prompt)
                report.lengths.append(len(encoded.ids))
        except DataError as exc:
            seen.setdefault(exc.problems[0], [location, 0])[1] += 1
    for problem, (location, count) in list(seen.items())[:MAX_PROBLEMS]:
        more = f" ({count - 1} more records like it)" if count > 1 else ""
        report.problems.append(f"{where(location)}: {problem}{more}")
    if len(seen) > MAX_PROBLEMS:
        report.problems.append(f"{report.path}: {len(seen) - MAX_PROBLEMS} more kinds of problem in the records "
                               "checked; fix those above and run doctor again.")
