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

from entrypoint.data import formats, records
from entrypoint.data.options import DataOptions
from entrypoint.data.pipeline import FORMAT_NAMES
from entrypoint.data.sources import Source, discover, file_format, file_formats
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
    convention, --train-on-prompt, and the model's vocabulary."""

    fields: formats.Fields
    tokenizer: object
    train_on_prompt: bool
    vocab_size: int | None

    @property
    def convention(self) -> formats.Convention | None:
        return formats.convention(self.tokenizer) if self.tokenizer is not None else None


def survey(opts: DataOptions, tokenizer=None, limit: int = SAMPLE) -> tuple[list[FileReport], list[str]]:
    """Every input file's report, and the problems of the inputs as a whole (a split mixing formats, training
    and validation data in different formats). Raises DataError when the inputs cannot be found (sources.discover)."""
    vocab = opts.vocab_size or (len(tokenizer) if tokenizer is not None else None)
    check = Check(formats.Fields.from_config(opts), tokenizer, opts.train_on_prompt, vocab)
    reports: list[FileReport] = []
    problems: list[str] = []
    split_formats = {}
    for split, source in zip(("train", "valid"), discover(opts), strict=True):
        try:
            file_formats(source.files, check.fields)
        except DataError as exc:
            problems += exc.problems
        found = [_saved(source, split, check, limit)] if source.saved_dataset else \
            [_file(path, split, check, limit) for path in source.files]
        reports += found
        split_formats[split] = {_family(r.fmt) for r in found if r.fmt}
    train, valid = split_formats.get("train", set()), split_formats.get("valid", set())
    if len(train) == 1 and len(valid) == 1 and train != valid:
        problems.append(f"the training data is {FORMAT_NAMES[train.pop()]} but the validation data is "
                        f"{FORMAT_NAMES[valid.pop()]}; give both in one format.")
    return reports, problems


def check(opts: DataOptions, tokenizer, limit: int = SAMPLE) -> list[FileReport]:
    """The reports of `survey`, or one DataError carrying every problem found (prepare's check before it starts)."""
    reports, problems = survey(opts, tokenizer, limit)
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
              formats.SHAREGPT: (formats.SHAREGPT_FIELD,), formats.PRETOKENIZED: formats.PRETOKENIZED_READS}[fmt]
    return tuple(name for name in wanted if name in keys)


def _records(report: FileReport, rows, check: Check, where: Callable[[str], str], limit: int) -> None:
    """Put each record through what training does with it, collecting distinct problems with where each first
    occurs and how many records have it."""
    convert = records.converter(report.fmt, check.vocab_size) if report.fmt in (
        formats.ALPACA, formats.SHAREGPT, formats.PRETOKENIZED) else None
    fmt, conv = _family(report.fmt), check.convention
    seen: dict[str, list] = {}
    for location, record in rows:
        if report.checked == limit:  # one record past the limit: the file has more
            report.whole = False
            break
        report.checked += 1
        try:
            record = convert(record) if convert else record
            if fmt == formats.TEXT and not record.get(check.fields.text):
                continue  # empty documents are skipped, as training does
            if conv is not None and fmt != formats.PRETOKENIZED:
                fields = check.fields if convert is None else formats.Fields()
                formats.encode(record, fmt, check.tokenizer, conv, fields, check.train_on_prompt)
        except DataError as exc:
            seen.setdefault(exc.problems[0], [location, 0])[1] += 1
    for problem, (location, count) in list(seen.items())[:MAX_PROBLEMS]:
        more = f" ({count - 1} more records like it)" if count > 1 else ""
        report.problems.append(f"{where(location)}: {problem}{more}")
    if len(seen) > MAX_PROBLEMS:
        report.problems.append(f"{report.path}: {len(seen) - MAX_PROBLEMS} more kinds of problem in the records "
                               "checked; fix those above and run doctor again.")
