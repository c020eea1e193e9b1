"""Object storage as a data source and a model's home: `--data-dir s3://bucket/prefix` (or gs://) and
`--model s3://bucket/prefix`, through the client, credentials and endpoint rules of --export-to (export.FsStore).

Data. The objects under the prefix are listed once per check (names, sizes, ETags; no object is read) and stand in
for a local directory: `RemoteDir` and `RemoteFile` answer the few questions sources.discover asks of a folder, so
train/valid naming, --train-file globs and the error messages are the same. The listing is the fingerprint
(`fingerprint`): a rerun whose objects are unchanged finds its token cache from the listing alone and sends no
GET. A changed object has a new ETag (S3's is the MD5 of its bytes, or of its parts), so it is a new cache.

On a cache miss each object is read once, as a stream, and parsed as it arrives (`dataset`) into the build's
private scratch folder (an Arrow table of the documents, the one local JSON Lines and CSV go through, deleted
when the build ends): `.txt` and JSON Lines line by line, CSV in chunks (pandas, as the local loader), Parquet
row group by row group through ranged reads (the footer first, then each group's byte range), `.gz` through a
streaming decompressor; a `.json` holding one JSON array is parsed in memory. No raw object is written locally.
Unlike a local `.txt` (read straight into the tokenizers, textfiles.py), remote text goes through that table:
every tokenizing process reads its share from the table instead of each one streaming the whole corpus.

Models. `--model s3://bucket/prefix` (a save_pretrained folder) is downloaded once into
<cache-dir>/models/<key>, the key hashing the objects' names, sizes and ETags, published whole (fsutil.publish_dir,
COMPLETE last); a run whose objects are unchanged loads from there without a GET.

A bad URL is a usage error (options.check_values, exit 2); a missing bucket, an empty prefix or a denied read is a
DataError (exit 3) for data and a ModelLoadError (exit 5) for a model, one line naming the fix, before training.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import io
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from entrypoint import fsutil, logs
from entrypoint.config.destinations import Destination, parse
from entrypoint.errors import DataError, ExportError, FinetuneError, ModelLoadError, OutputError, StoreUnavailable
from entrypoint.fsutil import COMPLETE
from entrypoint.publish.export import FsStore

log = logs.area("data")
model_log = logs.area("model")
STREAM_BLOCK = 8 << 20  # bytes per ranged GET while streaming an object (s3fs's default is 50 MiB)
ROWS_PER_BATCH = 10_000  # documents per Arrow batch written to the scratch table
MODELS_DIR = "models"  # under --cache-dir


def is_url(value) -> bool:
    """Whether an option's value names object storage rather than a local path or a Hub id."""
    return isinstance(value, str) and "://" in value


def _destination(url: str, option: str, error: type[FinetuneError]) -> Destination:
    try:
        return parse(url, option)
    except ExportError as exc:  # options.check_values reports it first; a caller that skipped that still gets one
        raise error(*exc.problems) from None


def _failure(exc: Exception, url: str, option: str, error: type[FinetuneError]) -> FinetuneError:
    """The one-line error for a store failure while listing or reading `url`."""
    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}" if str(exc) else type(exc).__name__
    if isinstance(exc, PermissionError):
        return error(f"{option} {url}: access denied ({reason}); give the job's credentials read access to it "
                     "(s3:ListBucket and s3:GetObject, or roles/storage.objectViewer).")
    if isinstance(exc, FileNotFoundError):
        return error(f"{option} {url}: the bucket or object does not exist ({reason}); fix the URL, or upload "
                     "the files there.")
    # Neither denied nor missing: the store did not answer. Exit 12 (STORE), which a Job retries, not the data's
    # permanent exit 3.
    return StoreUnavailable(f"{option} {url}: the store cannot be read ({reason}); check AWS_ENDPOINT_URL, the "
                            "network path to the store and the credentials.")


def listing(url: str, option: str, error: type[FinetuneError]) -> dict[str, RemoteFile]:
    """Every object under the URL's prefix, by its key relative to the prefix (one LIST, no GET); raises `error`
    for a missing bucket, a denied listing or an unreachable store."""
    dest = _destination(url, option, error)
    root = dest.key("")
    try:
        fs = FsStore(dest).fs()
        found = fs.find(root, detail=True)
        if not found and not fs.exists(dest.bucket):
            raise FileNotFoundError(f"no bucket {dest.bucket}")
    except FinetuneError:
        raise
    except Exception as exc:  # each backend raises its own types; _failure sorts them
        raise _failure(exc, str(dest), option, error) from None
    objects = {}
    for key, info in found.items():
        relative = key[len(root):].lstrip("/") if dest.prefix else key.split("/", 1)[1] if "/" in key else ""
        if info.get("type", "file") != "file" or not relative or relative.endswith("/"):
            continue  # folder placeholders some tools create
        etag = str(info.get("ETag") or info.get("etag") or info.get("md5Hash") or "").strip('"')
        objects[relative] = RemoteFile(f"{dest.scheme}://{key}", int(info.get("size") or 0), etag)
    return objects


@dataclass(frozen=True, order=True)
class RemoteFile:
    """One object, answering what sources.py and textfiles.py ask of a file: its name, suffixes, size, and a
    binary stream of its bytes (decompressed for `.gz`)."""

    url: str  # scheme://bucket/key
    size: int
    etag: str

    @property
    def _path(self) -> PurePosixPath:
        return PurePosixPath(self.url.split("://", 1)[1])

    @property
    def name(self) -> str:
        return self._path.name

    @property
    def suffix(self) -> str:
        return self._path.suffix

    @property
    def suffixes(self) -> list[str]:
        return self._path.suffixes

    def is_file(self) -> bool:
        return True

    def is_dir(self) -> bool:
        return False

    def stat(self) -> _Size:
        return _Size(self.size)

    def __str__(self) -> str:
        return self.url

    def open(self, mode: str = "rb"):
        """A streaming reader of the object (ranged GETs of STREAM_BLOCK bytes, seekable for Parquet)."""
        if mode != "rb":
            raise ValueError("objects are read only")
        dest = parse(self.url, "--data-dir")
        stream = FsStore(dest).fs().open(dest.key(""), "rb", block_size=STREAM_BLOCK)
        return gzip.GzipFile(fileobj=stream) if self.suffix.lower() == ".gz" else stream


@dataclass(frozen=True)
class _Size:
    st_size: int  # what plan.py and doctor.py read of a file's stat


@dataclass
class RemoteDir:
    """A prefix in object storage, read like the local folder it stands for (sources.discover walks both): its
    files and sub-prefixes, `/`, and glob patterns (`*` within a name, `**` across prefixes). The listing is
    taken on first use and raises a DataError when the bucket is missing, the prefix empty or listing denied."""

    url: str
    objects: dict[str, RemoteFile] | None = field(default=None, repr=False)

    def __post_init__(self):
        self.url = self.url.rstrip("/")

    def _objects(self) -> dict[str, RemoteFile]:
        if self.objects is None:
            self.objects = listing(self.url, "--data-dir", DataError)
            if not self.objects:
                raise DataError(f"--data-dir {self.url} holds no objects; upload the training files there "
                                "(train.jsonl, train.txt, ...) or fix the prefix.")
        return self.objects

    @property
    def name(self) -> str:
        return PurePosixPath(self.url.split("://", 1)[1]).name

    def __str__(self) -> str:
        return self.url

    def __lt__(self, other) -> bool:
        return str(self) < str(other)

    def is_dir(self) -> bool:
        return bool(self._objects())

    exists = is_dir

    def is_file(self) -> bool:
        return False

    def _sub(self, name: str) -> RemoteDir:
        inner = {k[len(name) + 1:]: f for k, f in self._objects().items() if k.startswith(name + "/")}
        return RemoteDir(f"{self.url}/{name}", inner)

    def __truediv__(self, name: str):
        name = str(name).strip("/")
        return self._objects().get(name) or self._sub(name)

    def iterdir(self):
        names = sorted({k.split("/", 1)[0] for k in self._objects()})
        return [self / n for n in names]

    def glob(self, pattern: str) -> list:
        """The files and sub-prefixes whose path relative to this one matches `pattern`, as glob.glob would."""
        wanted = [p for p in pattern.strip("/").split("/") if p]
        folders = {"/".join(k.split("/")[:i]) for k in self._objects() for i in range(1, k.count("/") + 1)}
        found = [self / p for p in sorted(set(self._objects()) | folders) if _matches(p.split("/"), wanted)]
        return sorted(found, key=str)


def _matches(parts: list[str], pattern: list[str]) -> bool:
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_matches(parts[i:], rest) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], head) and _matches(parts[1:], rest)


def remote(files) -> bool:
    """Whether a Source's files are objects (the source is then remote as a whole: one --data-dir)."""
    return any(isinstance(f, RemoteFile) for f in files)


def describe(files) -> list:
    """What identifies the objects without reading them: (URL, size, ETag) each, for the cache keys."""
    return [[f.url, f.size, f.etag] for f in files]


def fingerprint(files) -> str:
    """The objects' identity from the listing: names, sizes and ETags (no GET)."""
    return hashlib.blake2b(json.dumps(describe(files)).encode(), digest_size=16).hexdigest()


def check_readable(files) -> None:
    """doctor: prove each object can be read (a ranged GET of its first byte), where a listing alone would not
    show that GetObject is denied. Raises a DataError naming the first that cannot."""
    for remote_file in files:
        dest = parse(remote_file.url, "--data-dir")
        try:
            FsStore(dest).fs().read_block(dest.key(""), 0, 1)
        except Exception as exc:  # the backends' own types; _failure sorts them
            raise _failure(exc, remote_file.url, "--data-dir", DataError) from None


def dataset(loader: str, files: list[RemoteFile], txt_split: str, scratch: Path):
    """The objects of one loader (sources.FORMATS' names) as a memory-mapped `datasets.Dataset` in `scratch`, each
    read once as a stream; raises a DataError naming the object that cannot be read or parsed."""
    import datasets
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    scratch.mkdir(parents=True, exist_ok=True)
    path = scratch / f"remote-{loader}-{uuid.uuid4().hex[:8]}.arrow"
    written = 0
    with ArrowWriter(path=str(path)) as writer:
        for remote_file in files:
            for table in _tables(loader, remote_file, txt_split):
                if isinstance(table, pa.RecordBatch):
                    table = pa.Table.from_batches([table])
                writer.write_table(table if isinstance(table, pa.Table) else pa.Table.from_pylist(table))
                written += 1
        if not written:
            raise DataError(f"{files[0]} holds no records; add text or remove it.")
        writer.finalize()
    return datasets.Dataset.from_file(str(path))


def _tables(loader: str, remote_file: RemoteFile, txt_split: str):
    """Batches of rows (lists of dicts, or Arrow tables) of one object, read as a stream."""
    try:
        with remote_file.open() as stream:
            if loader == "text":
                yield from _batches({"text": d} for d in _text_documents(stream, txt_split))
            elif loader == "json":
                yield from _batches(_json_records(stream))
            elif loader == "csv":
                import pandas as pd
                import pyarrow as pa

                for chunk in pd.read_csv(stream, chunksize=ROWS_PER_BATCH):
                    yield pa.Table.from_pandas(chunk, preserve_index=False)
            else:
                import pyarrow.parquet as pq

                yield from pq.ParquetFile(stream).iter_batches(batch_size=ROWS_PER_BATCH)
    except FinetuneError:
        raise
    except (OSError, EOFError) as exc:
        if isinstance(exc, PermissionError | FileNotFoundError) or not isinstance(exc, gzip.BadGzipFile | EOFError):
            raise _failure(exc, str(remote_file), "--data-dir", DataError) from None
        raise DataError(f"{remote_file} is not a valid gzip file ({exc}); re-compress it or remove it.") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{remote_file} is not valid UTF-8 ({exc.reason}); convert it, e.g. iconv -f latin1 -t "
                        "utf-8, or remove it.") from None
    except Exception as exc:  # pandas, pyarrow and json raise many types; all mean "this object cannot be parsed"
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot parse {loader} object {remote_file}: {first}; fix or remove it.") from None


def _batches(rows):
    batch = []
    for row in rows:
        batch.append(row)
        if len(batch) == ROWS_PER_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _text_documents(stream, txt_split: str):
    """The documents of a text object as datasets' text loader (and textfiles.py) makes them: universal newlines;
    by line every line without its break, empty ones included; by paragraph str.split("\\n\\n") over the whole
    text, empty pieces dropped (split again as text arrives: a split point, once found, stays one); by file, all."""
    text = io.TextIOWrapper(stream, encoding="utf-8", newline=None)
    if txt_split == "line":
        for line in text:
            yield line[:-1] if line.endswith("\n") else line
        return
    if txt_split == "file":
        yield text.read()
        return
    pending = ""
    while block := text.read(1 << 20):
        *complete, pending = (pending + block).split("\n\n")
        yield from (p for p in complete if p)
    if pending:
        yield pending


def _json_records(stream):
    """JSON Lines line by line; a file that is one JSON array (`.json`) parsed whole."""
    first = stream.read(1)
    while first and first.isspace():
        first = stream.read(1)
    if first == b"[":
        yield from json.loads(b"[" + stream.read())
        return
    for line_number, raw in enumerate(_lines(first, stream), 1):
        if raw.strip():
            try:
                record = json.loads(raw)
            except ValueError as exc:
                raise ValueError(f"line {line_number}: {exc}") from None
            if not isinstance(record, dict):
                raise ValueError(f"line {line_number} is not a JSON object")
            yield record


def _lines(first: bytes, stream):
    pending = first
    while block := stream.read(1 << 20):
        pending += block
        *complete, pending = pending.split(b"\n")
        yield from complete
    if pending:
        yield pending


def local_model(model: str, cache_dir: Path) -> str:
    """`model` unchanged unless it names object storage; then the local folder it is downloaded to, once per
    content (names, sizes and ETags), under <cache-dir>/models. Raises ModelLoadError naming the fix."""
    if not is_url(model):
        return model
    objects = listing(model, "--model", ModelLoadError)
    if "config.json" not in objects:
        raise ModelLoadError(f"--model {model} is not a model folder (no config.json among its "
                             f"{len(objects)} objects); upload a save_pretrained folder there or fix the URL.")
    key = fingerprint([objects[k] for k in sorted(objects)])[:24]
    target = cache_dir / MODELS_DIR / key
    if (target / COMPLETE).is_file():
        model_log.info(f"{model} unchanged since its download; loading {target}")
        return str(target)

    def download(staging: Path) -> str:
        fs = FsStore(parse(model, "--model")).fs()
        for relative, remote_file in sorted(objects.items()):
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote_file.url.split("://", 1)[1], str(staging / relative))
        return json.dumps({"model": model, "objects": len(objects)})

    total = sum(f.size for f in objects.values())
    model_log.info(f"downloading {model} ({len(objects)} objects, {total / 1e6:.1f} MB) into {target}")
    try:
        fsutil.publish_dir(target, download, if_exists="keep")
    except Exception as exc:  # the backends' own types; a local OSError names a file under the cache
        if isinstance(exc, OSError) and str(exc.filename or "").startswith(str(cache_dir)):
            raise OutputError(f"cannot write the model download to {target.parent} ({exc.strerror or exc}); free "
                              "space or set --cache-dir to a writable place.") from None
        raise _failure(exc, model, "--model", ModelLoadError) from None
    return str(target)
