"""Finding the training files, checking them, fingerprinting them and reading them into documents.

Everything here runs before a model is loaded, so a bad file costs seconds, not a GPU allocation.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import glob
import gzip
import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

from entrypoint.data import formats, objectstore, records
from entrypoint.data.options import DataOptions
from entrypoint.errors import DataError, FinetuneError, OutputError

FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
TEXT_FORMATS = {"text", "json", "csv"}  # checked for UTF-8 before loading
SAVED_DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
TRAIN_STEMS = ("train",)
VALID_STEMS = ("valid", "validation", "val", "dev")
CHUNK = 1 << 20  # bytes read at a time while hashing and checking UTF-8


@dataclass(frozen=True)
class Source:
    """One split's input: either files (grouped by loader) or a `save_to_disk` directory."""

    files: tuple[Path, ...] = ()
    saved_dataset: Path | None = None
    split: str = "train"  # which split of a saved DatasetDict
    parts: tuple = ()  # datasets named by --dataset (mixture.Part); `files` then holds their local files

    def __bool__(self) -> bool:
        return bool(self.files or self.saved_dataset or self.parts)

    def describe(self) -> str:
        if self.parts:
            return "; ".join(part.describe(self.split) for part in self.parts)
        if self.saved_dataset:
            return f"saved dataset {self.saved_dataset}"
        return ", ".join(str(p) for p in self.files[:3]) + (f" and {len(self.files) - 3} more"
                                                            if len(self.files) > 3 else "")


def file_format(path: Path) -> str | None:
    suffixes = path.suffixes[-2:] if path.suffix == ".gz" else path.suffixes[-1:]
    return FORMATS.get(suffixes[0].lower()) if suffixes else None


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in SAVED_DATASET_MARKERS)


def _expand(opts: DataOptions, patterns: tuple[str, ...], option: str) -> Source:
    files: list[Path] = []
    for pattern in patterns:
        full = pattern if Path(pattern).is_absolute() else str(opts.data_dir / pattern)
        matches = opts.data_dir.glob(pattern) if isinstance(opts.data_dir, objectstore.RemoteDir) \
            else sorted(Path(m) for m in glob.glob(full, recursive=True))
        if not matches:
            raise DataError(f"{option} {pattern!r} matches nothing under {opts.data_dir}; "
                            "check the name, or give a path relative to --data-dir.")
        for match in matches:
            if is_saved_dataset(match):
                if len(patterns) > 1 or len(matches) > 1:
                    raise DataError(f"{option}: a saved dataset ({match}) cannot be mixed with other inputs; "
                                    "pass it alone.")
                return Source(saved_dataset=match)
            files += _supported_in(match) if match.is_dir() else [match]
    unsupported = [p for p in files if file_format(p) is None]
    if unsupported:
        raise DataError(f"{unsupported[0]} has an unsupported type; use .txt, .jsonl, .json, .csv or .parquet "
                        "(optionally .gz), or a datasets.save_to_disk directory.")
    return Source(files=tuple(dict.fromkeys(files)))


def _supported_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and file_format(p))


def discover(opts: DataOptions) -> tuple[Source, Source]:
    """The training and validation inputs; an empty validation Source means "split from training"."""
    if not opts.data_dir.is_dir() and not any(Path(p).is_absolute() for p in opts.train_file):
        if opts.data_dir.exists():
            raise DataError(f"data directory {opts.data_dir} is a file, not a directory; set --data-dir to the folder "
                            f"that holds it, or --train-file {opts.data_dir}.")
        raise DataError(f"data directory {opts.data_dir} does not exist; mount your data there "
                        "(docker run -v ./data:/data:ro) or set --data-dir.")
    if opts.train_file:
        train = _expand(opts, opts.train_file, "--train-file")
    elif is_saved_dataset(opts.data_dir):
        train = Source(saved_dataset=opts.data_dir)
    else:
        candidates = _supported_in(opts.data_dir)
        named = [p for p in candidates if _stem(p) in TRAIN_STEMS]
        held_out = {p for p in candidates if _stem(p) in VALID_STEMS + ("test",)}
        train = Source(files=tuple(named or [p for p in candidates if p not in held_out]))
    if not train:
        present = ", ".join(sorted(p.name for p in opts.data_dir.iterdir())[:8]) or "nothing"
        raise DataError(f"no training data in {opts.data_dir} (found: {present}); add train.txt (or .jsonl, "
                        ".csv, .parquet) or set --train-file.")
    if train.saved_dataset and isinstance(opts.data_dir, objectstore.RemoteDir):
        raise DataError(f"{train.saved_dataset} is a datasets.save_to_disk folder, which is not read from object "
                        "storage; save it as Parquet (Dataset.to_parquet) there, or copy it to a local --data-dir.")
    if opts.valid_file:
        valid = _expand(opts, opts.valid_file, "--valid-file")
    elif train.saved_dataset:
        valid = _saved_validation(train.saved_dataset)
    elif opts.train_file:
        valid = Source()
    else:
        valid = Source(files=tuple(p for p in _supported_in(opts.data_dir) if _stem(p) in VALID_STEMS))
    return train, valid


def _stem(path: Path) -> str:
    return path.name.split(".")[0].lower()


def fingerprint(source: Source) -> str:
    """A hash of the inputs' bytes (not their names or times), checking text files are UTF-8 on the way."""
    if objectstore.remote(source.files):  # objects: their names, sizes and ETags, without a GET
        return objectstore.fingerprint(source.files)
    digest = hashlib.blake2b(digest_size=16)
    paths = sorted(p for p in source.saved_dataset.rglob("*") if p.is_file()) if source.saved_dataset \
        else list(source.files)
    for path in paths:
        check_utf8 = source.saved_dataset is None and file_format(path) in TEXT_FORMATS
        digest.update(_hash_file(path, check_utf8).encode())
    for part in source.parts:  # a dataset's name, revision, config, splits and weight
        digest.update(part.identity.encode())
    return digest.hexdigest()


def check_text_file(path: Path) -> None:
    """Raise a DataError unless `path` is a readable, non-empty UTF-8 file (named by byte when it is not)."""
    _hash_file(path, check_utf8=True)


def _hash_file(path: Path, check_utf8: bool) -> str:
    digest = hashlib.blake2b(digest_size=16)
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        opener = gzip.open if path.suffix == ".gz" else contextlib.nullcontext
        with path.open("rb") as raw, opener(raw) as stream:
            while chunk := stream.read(CHUNK):
                digest.update(chunk)
                if check_utf8:
                    # Where the decoder's input starts: it still holds any character split across chunks.
                    base = offset - len(decoder.getstate()[0])
                    try:
                        decoder.decode(chunk)
                    except UnicodeDecodeError as exc:
                        raise DataError(f"{path} is not valid UTF-8 (byte {base + exc.start}); convert it, "
                                        "e.g. iconv -f latin1 -t utf-8, or remove it.") from None
                offset += len(chunk)
            if check_utf8:
                base = offset - len(decoder.getstate()[0])
                decoder.decode(b"", final=True)
    except (OSError, EOFError, zlib.error) as exc:
        if isinstance(exc, gzip.BadGzipFile | EOFError | zlib.error):
            raise DataError(f"{path} is not a valid gzip file ({exc}); re-compress it or remove it.") from None
        raise DataError(f"cannot read {path} ({exc.strerror or exc}); check it exists and is readable "
                        "by this user.") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} ends inside a UTF-8 character (byte {base + exc.start}); "
                        "fix the file's encoding.") from None
    if offset == 0:
        raise DataError(f"{path} is empty; remove it or add text.")
    return digest.hexdigest()


def load_documents(source: Source, opts: DataOptions, cache_dir: Path):
    """A `datasets.Dataset` with one column, `text`, one non-empty document per row."""
    ds = read_documents(source, opts, cache_dir)
    ds = ds.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)
    if len(ds) == 0:
        raise DataError(f"{source.describe()} contains no text; check --text-field and the files' contents.")
    return ds


def read_documents(source: Source, opts: DataOptions, cache_dir: Path):
    """A memory-mapped `datasets.Dataset`, one row per document as the loader reads it, empty ones included
    (data preparation skips those as it streams, without a filtered copy). Its columns say the format
    (`record_format`): `text` for plain text, `prompt` and `completion` for instruction records, `messages`
    for chat records, whatever the fields are called in the files."""
    import datasets

    if source.saved_dataset:
        ds = _load_saved(source, opts, cache_dir)
    else:
        file_formats(source.files, formats.Fields.from_config(opts))  # one format, or which file is which
        parts = []
        by_loader: dict[str, list[str]] = {}
        for path in source.files:
            by_loader.setdefault(file_format(path), []).append(path if objectstore.remote([path]) else str(path))
        for loader, files in sorted(by_loader.items()):
            kwargs = {"sample_by": {"file": "document"}.get(opts.txt_split, opts.txt_split)} if loader == "text" \
                else {}
            try:
                # cache_dir is a fresh scratch folder per build (data.prepare): datasets keys its own cache on
                # path and mtime, so a shared one could serve stale rows for bytes changed under an unchanged mtime.
                part = objectstore.dataset(loader, files, opts.txt_split, cache_dir) \
                    if objectstore.remote(files) else \
                    datasets.load_dataset(loader, data_files=files, split="train", cache_dir=str(cache_dir), **kwargs)
            except FinetuneError:
                raise
            except Exception as exc:  # the loaders raise many types; all mean "this file cannot be parsed"
                cause = exc.__cause__ or exc
                if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                    raise OutputError(f"cannot write the dataset cache in {cache_dir} ({cause.strerror}); free space "
                                      "there or set --cache-dir to a larger volume.") from None
                first = str(cause).strip().splitlines()[0][:200] if str(cause).strip() else type(cause).__name__
                raise DataError(f"cannot parse {loader} file(s) {files[0]}: {first}; fix or remove the file.") \
                    from None
            parts.append(_text_column(part, {"text": ("text", "--txt-split")}, files[0]) if loader == "text"
                         else _columns(part, opts, files[0], cache_dir,
                                       records.locator([Path(f) if isinstance(f, str) else f for f in files],
                                                       loader)))
        found = {record_format(p) for p in parts}
        if len(found) > 1:
            raise DataError(f"{source.describe()} mixes data formats ({', '.join(sorted(found))}); train on one "
                            "format at a time.")
        ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    # Preparation reads the Arrow table itself, so rows must be in the table's order (no indices mapping).
    return ds.flatten_indices() if ds._indices is not None else ds


def file_formats(files: tuple[Path, ...], fields: formats.Fields) -> dict[Path, str]:
    """Each file's data format, from its first record (formats.detect; None where none fits, which loading then
    reports). Raises a DataError listing which file is which when they are not all of one format."""
    found: dict[Path, str | None] = {}
    for path in files:
        loader = file_format(path)
        try:
            found[path] = formats.TEXT if loader == "text" else formats.detect(records.first_keys(path, loader),
                                                                               fields)
        except DataError:
            found[path] = None
    kinds = {fmt for fmt in found.values() if fmt}
    if len(kinds) > 1:
        listing = "; ".join(f"{path.name}: {fmt}" for path, fmt in found.items() if fmt)
        raise DataError(f"one split mixes data formats ({listing}); train on one format at a time: move the others "
                        "out of the folder, or choose files with --train-file and --valid-file.")
    return found


def record_format(ds) -> str:
    """text, prompt-completion, chat, pretokenized or preference (formats.py's names) for a dataset from
    read_documents."""
    if "chosen_turns" in ds.column_names:
        return formats.PREFERENCE
    if "messages" in ds.column_names:
        return formats.CHAT
    if "input_ids" in ds.column_names:
        return formats.PRETOKENIZED
    return formats.INSTRUCTION if "prompt" in ds.column_names else formats.TEXT


def _columns(ds, opts: DataOptions, where: str, cache_dir: Path, locate):
    """A loaded file's records reduced to the columns of their format (formats.detect), under canonical names;
    Alpaca, ShareGPT and pretokenized records converted (records.convert, `locate(row)` saying where a bad one is)."""
    fields = formats.Fields.from_config(opts)
    names = set(ds.column_names)
    try:
        fmt = formats.detect(names, fields)
    except DataError:
        fmt = None
    if fmt in (formats.ALPACA, formats.SHAREGPT, formats.PRETOKENIZED, formats.PREFERENCE):
        cache_dir.mkdir(parents=True, exist_ok=True)
        return records.convert(ds, fmt, opts.vocab_size, locate,
                               cache_dir / f"converted-{len(list(cache_dir.glob('converted-*')))}.arrow", fields)
    if fmt == formats.CHAT:
        ds = ds.select_columns([fields.messages])
        return ds.rename_column(fields.messages, "messages") if fields.messages != "messages" else ds
    if fmt == formats.INSTRUCTION:
        return _text_column(ds, {fields.prompt: ("prompt", "--prompt-field"),
                                 fields.completion: ("completion", "--completion-field")}, where)
    if fmt is None and (formats.hint(names, fields) or names & {fields.prompt, fields.completion}):
        try:
            formats.detect(names, fields)
        except DataError as exc:  # its message names the format the fields look like, or every option
            raise DataError(f"{where}: {exc.problems[0]}") from None
    return _text_column(ds, {opts.text_field: ("text", "--text-field")}, where)


def canonical(ds, opts: DataOptions, where: str, scratch: Path):
    """Records of a loaded `datasets.Dataset` (a dataset by name, hubdata.py) reduced to their format's columns under
    canonical names, exactly as records of a file are (`where` names them in errors; converted records are written
    under `scratch`)."""
    return _columns(ds, opts, where, scratch, lambda row: f"{where} record {row + 1}")


def _load_saved(source: Source, opts: DataOptions, cache_dir: Path):
    import datasets

    loaded = datasets.load_from_disk(str(source.saved_dataset))
    if isinstance(loaded, datasets.DatasetDict):
        if source.split not in loaded:
            raise DataError(f"saved dataset {source.saved_dataset} has splits {', '.join(loaded)} but no "
                            f"{source.split!r}; save one, or pass --train-file/--valid-file.")
        loaded = loaded[source.split]
    return _columns(loaded, opts, source.describe(), cache_dir,
                    lambda row: f"{source.describe()} split {source.split!r} row {row + 1}")


def _text_column(ds, wanted: dict[str, tuple[str, str]], where: str):
    """`ds` reduced to the string fields in `wanted` ({field: (new name, its option)}), renamed."""
    import datasets

    for field, (_, option) in wanted.items():
        if field not in ds.column_names:
            raise DataError(f"{where} has no field {field!r} (fields: {', '.join(ds.column_names)}); "
                            f"set {option} to the one holding the text.")
        feature = ds.features[field]  # a Value, or a List/dict/Json without a dtype for nested fields
        dtype = getattr(feature, "dtype", type(feature).__name__)
        if dtype not in ("string", "large_string"):
            raise DataError(f"field {field!r} in {where} holds {dtype}, not text; set {option} to a text field.")
    ds = ds.select_columns(list(wanted))
    for field in wanted:
        if ds.features[field].dtype == "large_string":
            # pandas 3 (the csv loader) and polars write large_string; one type lets the parts concatenate.
            ds = ds.cast_column(field, datasets.Value("string"))
    return ds.rename_columns({f: n for f, (n, _) in wanted.items() if f != n})


def _saved_validation(path: Path) -> Source:
    """The validation split saved beside `train` in a DatasetDict, read from its index, not loaded."""
    index = path / "dataset_dict.json"
    splits = json.loads(index.read_text()).get("splits", []) if index.is_file() else []
    name = next((s for s in ("validation", "valid", "test") if s in splits), None)
    return Source(saved_dataset=path, split=name) if name else Source()
