"""Datasets by name (--dataset): a Hugging Face Hub dataset id, a local dataset repository, or one local data file,
read through `datasets` in streaming mode.

A local dataset repository is what a Hub dataset repository holds, in a folder: data files (JSON Lines, JSON, CSV,
Parquet, text) named by split (train.jsonl, data/validation-00000-of-00001.parquet, ...) and optionally a README.md
dataset card whose `configs:` YAML names configs and their splits' files. `datasets` resolves both the same way
(its LocalDatasetModuleFactory and HubDatasetModuleFactory read the card and infer the loader from the files), so
the Hub path is this code too; only the revision differs:
- a Hub dataset's revision is the commit --dataset-revision (default main) resolves to, so the cache key names
  exact bytes and a rerun against an unchanged Hub repository is a cache hit;
- a local repository has none: its revision is shown as `local-` and a digest of its data files' names, sizes and
  modification times, and the cache key hashes the files' bytes, as it does for --train-file.

Resolution (`resolve`) reads the card and lists the files only, before any model loads: a missing repository, an
unknown config or split is a one-line DataError then. Reading (`read`) streams the split's records into a
memory-mapped Arrow table in the build's scratch folder (`load_dataset(..., streaming=True)`: nothing is downloaded
to the Hugging Face cache first), then reduces them to their format's columns exactly as a file's records are
(sources.canonical, formats.detect).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

from entrypoint.data.options import DataOptions
from entrypoint.data.sources import canonical, file_format
from entrypoint.errors import ConfigError, DataError

VALID_SPLITS = ("validation", "valid", "val", "dev")  # a dataset's own validation split, first found
# A name that can only be a path: absolute, explicitly relative, home-relative, deeper than org/name, or a file name.
PATH_LIKE = re.compile(r"^(/|\.{1,2}(/|$)|~)|/.*/|\.(jsonl?|csv|parquet|txt|text)(\.gz)?$", re.IGNORECASE)


@dataclass(frozen=True)
class Named:
    """One --dataset value, resolved: what `datasets` loads and which of its splits are read."""

    name: str  # as given (without a weight)
    path: str  # what datasets loads: a local folder (absolute), a packaged loader for one file, or the Hub id
    local: bool
    loader: str  # datasets' builder for the files: json, csv, parquet, text
    config: str | None  # the config read (None: the dataset's only or default one)
    split: str  # trained on
    valid_split: str | None  # its own validation split; None: documents of `split` are held out
    revision: str  # a Hub commit, or local-<digest of the files' names, sizes and times>
    files: tuple[Path, ...] = ()  # the local data files of the splits read (none for the Hub)
    data_files: str | None = None  # the file, when `name` is one file (`path` is then its loader)

    def describe(self, more: str = "") -> str:
        config = f", config {self.config}" if self.config else ""
        return f"dataset {self.name} (revision {self.revision}{config}, split {self.split}{more})"


def looks_local(name: str) -> bool:
    """Whether `name` can only be a local path (so a missing one is an error, not a Hub id to try)."""
    return bool(PATH_LIKE.search(name))


def resolve(name: str, opts: DataOptions) -> Named:
    """The dataset `name` with its config, splits and revision, or the DataError (ConfigError) naming the fix."""
    path = Path(name).expanduser()
    if path.exists():
        if opts.dataset_revision:
            raise ConfigError(f"--dataset-revision {opts.dataset_revision} applies to Hub datasets, but {name} is "
                              "local; drop --dataset-revision (a local folder has one version: its files).")
        return _local_file(name, path.resolve(), opts) if path.is_file() else _repository(name, path.resolve(), opts)
    if looks_local(name):
        raise DataError(f"--dataset {name}: no such local dataset repository or file (looked in {Path.cwd()}); "
                        "check the path, mount it, or give a Hub dataset id such as org/name.")
    return _repository(name, None, opts)


def _local_file(name: str, path: Path, opts: DataOptions) -> Named:
    loader = file_format(path)
    if loader is None:
        raise DataError(f"--dataset {name} has an unsupported type; use .jsonl, .json, .csv, .parquet or .txt "
                        "(optionally .gz), or a folder of them.")
    if opts.dataset_config not in (None, "default"):
        raise DataError(f"--dataset-config {opts.dataset_config!r}: {name} is one file and has no configs; drop "
                        "--dataset-config or name a dataset repository.")
    if opts.dataset_split != "train":
        raise DataError(f"--dataset-split {opts.dataset_split!r}: {name} is one file, which datasets reads as split "
                        "'train' only; drop --dataset-split or name a folder with a file per split.")
    return Named(name, loader, True, loader, None, "train", None, _local_revision([path]), (path,), str(path))


def _repository(name: str, path: Path | None, opts: DataOptions) -> Named:
    """A local folder (`path`) or a Hub dataset (`path` None) through datasets' own resolution."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(str(path) if path else name, name=opts.dataset_config,
                                                revision=opts.dataset_revision, token=opts.hub_token)
    except Exception as exc:  # datasets raises ValueError, FileNotFoundError, ConnectionError and its own types
        raise _failure(name, exc) from None
    split_files = {str(split): list(files) for split, files in (builder.config.data_files or {}).items()}
    splits = list(split_files) or [str(s) for s in (builder.info.splits or {})]
    split = opts.dataset_split
    if split not in splits:
        raise DataError(f"--dataset-split {split!r}: {name} has no such split (splits: {', '.join(splits) or 'none'}); "
                        "pick one of them.")
    valid = next((s for s in VALID_SPLITS if s in splits and s != split), None)
    config = builder.config.name if opts.dataset_config or builder.config.name != "default" else None
    if path is None:
        return Named(name, name, False, builder.name, config, split, valid, builder.hash)
    files = [Path(f) for s in (split, valid) if s for f in split_files.get(s, [])]
    return Named(name, str(path), True, builder.name, config, split, valid, _local_revision(files), tuple(files))


def _local_revision(files: list[Path]) -> str:
    """local-<digest of each file's path, size and modification time>: what doctor shows; the cache key hashes the
    bytes themselves (sources.fingerprint)."""
    digest = hashlib.blake2b(digest_size=8)
    for path in files:
        st = path.stat()
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return f"local-{digest.hexdigest()}"


def _failure(name: str, exc: Exception) -> Exception:
    """datasets' exception as one line naming the fix."""
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    if "BuilderConfig" in text or "Config name is missing" in text:
        found = re.search(r"\[(.*)\]", text)
        configs = found.group(1).replace("'", "") if found else "see the dataset card"
        return DataError(f"--dataset {name}: {text.split('.')[0]}; set --dataset-config to one of: {configs}.")
    if isinstance(exc, ConnectionError):
        return DataError(f"--dataset {name}: cannot reach the Hugging Face Hub ({text}); check the network and "
                         "HF_HUB_OFFLINE, or give the path of a local copy of the dataset.")
    if type(exc).__name__ in ("DatasetNotFoundError", "RevisionNotFoundError", "RepositoryNotFoundError"):
        return DataError(f"--dataset {name}: {text}; check the id and --dataset-revision, or set --hub-token for a "
                         "private or gated dataset.")
    return DataError(f"--dataset {name} cannot be read ({text}); check its files and dataset card.")


def read(named: Named, split: str, opts: DataOptions, scratch: Path):
    """Split `split` of the dataset as a memory-mapped `datasets.Dataset` in `scratch`, its records reduced to
    their format's columns (sources.canonical)."""
    import datasets

    where = f"--dataset {named.name} split {split}"
    try:
        ds = datasets.Dataset.from_generator(_records, gen_kwargs={"kwargs": _load_kwargs(named, split, opts)},
                                             cache_dir=str(scratch))
    except Exception as exc:  # the loaders raise many types; all mean "these records cannot be read"
        cause = exc.__cause__ or exc
        text = str(cause).strip().splitlines()[0][:200] if str(cause).strip() else type(cause).__name__
        raise DataError(f"{where} cannot be read ({text}); fix or remove the file it names.") from None
    if len(ds) == 0:
        raise DataError(f"{where} has no records; pick another --dataset-split or add records.")
    return canonical(ds, opts, where, scratch)


def peek(named: Named, split: str, opts: DataOptions, limit: int) -> list[dict]:
    """The first `limit` records of split `split`, streamed (doctor's and prepare's check of the data: seconds,
    whatever the dataset's size). Raises DataError when they cannot be read."""
    try:
        return list(itertools.islice(_records(_load_kwargs(named, split, opts)), limit))
    except Exception as exc:  # the loaders raise many types; all mean "these records cannot be read"
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DataError(f"--dataset {named.name} split {split} cannot be read ({text}); fix or remove the file it "
                        "names.") from None


def _load_kwargs(named: Named, split: str, opts: DataOptions) -> dict:
    """What datasets.load_dataset needs to stream split `split` of the dataset."""
    kwargs = {"path": named.path, "name": named.config, "split": split, "token": opts.hub_token,
              "data_files": named.data_files, "revision": None if named.local else named.revision}
    if named.loader == "text":
        kwargs["sample_by"] = {"file": "document"}.get(opts.txt_split, opts.txt_split)
    return kwargs


def _records(kwargs: dict):
    """Every record of one split, streamed (a generator for Dataset.from_generator, which writes them to Arrow)."""
    import datasets

    yield from datasets.load_dataset(**{k: v for k, v in kwargs.items() if v is not None}, streaming=True)
