"""entrypoint/data/objectstore.py: --data-dir and --model in object storage, against a real S3-protocol server on
127.0.0.1 (moto's, one per module) whose request log (tests/support/s3requests.py) proves what was and was not read.

The documents read from objects are compared with the same files read locally by the local loaders."""

from __future__ import annotations

import contextlib
import gzip
import http.server
import json
import re
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from entrypoint.config.options import check_values
from entrypoint.config.schema import TrainConfig
from entrypoint.data import objectstore, pipeline
from entrypoint.data.options import DataOptions
from entrypoint.data.sources import discover, fingerprint, read_documents
from entrypoint.errors import DataError, ModelLoadError
from entrypoint.train.preflight import check_cheaply, load_model_config, model_path
from tests.support.s3requests import recording_server

DOCS = [f"Document {i} says {w}, with a comma, \"quotes\" and\ttabs." for i, w in enumerate("abcdefghijklmnop")]
DOCS += ["Café ☕ naïve — “curly quotes” 日本語 text.", "", "A short one."]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with recording_server(tmp_path_factory.mktemp("s3log")) as (server, recorder):
        yield server, recorder


@pytest.fixture
def s3(store, monkeypatch):
    """The server's client and recorder, with this process's environment pointing s3fs at it."""
    server, recorder = store
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    return server.client(), recorder


@pytest.fixture
def bucket(s3, request) -> str:
    name = "data-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[-40:].strip("-")
    s3[0].create_bucket(Bucket=name)
    return name


def upload(client, bucket: str, local: Path, prefix: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(local).as_posix()}", Body=path.read_bytes())


def options(tmp_path: Path, data_dir, **extra) -> DataOptions:
    return DataOptions.of(TrainConfig(data_dir=data_dir, output_dir=tmp_path / "out", preprocessing_workers=1,
                                      **extra))


def write_formats(directory: Path) -> None:
    """train.<fmt> files of DOCS, one per format; `id` beside `text` so the reader must pick the field."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"text": d, "id": i} for i, d in enumerate(DOCS)]
    text = "".join(d + ("\r\n" if i % 3 == 0 else "\n") for i, d in enumerate(DOCS)) + "\n\n\nlast\rpara\n"
    (directory / "train.txt").write_bytes(text.encode())
    (directory / "train.txt.gz").write_bytes(gzip.compress(text.encode()))
    (directory / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (directory / "train.json").write_text(json.dumps(rows, ensure_ascii=False))
    (directory / "train.csv").write_text("text,id\n" + "".join(
        '"' + r["text"].replace('"', '""') + f'",{r["id"]}\n' for r in rows if r["text"]))
    # Several row groups, so the ranged reader must fetch more than one.
    pq.write_table(pa.Table.from_pylist(rows), directory / "train.parquet", row_group_size=5)


@pytest.mark.parametrize("name,split", [("train.txt", "line"), ("train.txt", "paragraph"), ("train.txt", "file"),
                                        ("train.txt.gz", "line"), ("train.jsonl", "line"), ("train.json", "line"),
                                        ("train.csv", "line"), ("train.parquet", "line")])
def test_objects_read_as_streams_give_the_documents_of_the_same_files_read_locally(s3, bucket, tmp_path, name, split):
    write_formats(tmp_path / "local")
    upload(s3[0], bucket, tmp_path / "local", "corpus")
    local, _ = discover(options(tmp_path, tmp_path / "local", train_file=(name,)))
    remote, _ = discover(options(tmp_path, f"s3://{bucket}/corpus", train_file=(name,)))
    assert [str(f) for f in remote.files] == [f"s3://{bucket}/corpus/{name}"]
    want = read_documents(local, options(tmp_path, tmp_path / "local", txt_split=split), tmp_path / "a")
    got = read_documents(remote, options(tmp_path, f"s3://{bucket}/corpus", txt_split=split), tmp_path / "b")
    assert got.column_names == want.column_names and got["text"] == want["text"]


def test_parquet_is_read_by_ranged_gets_of_its_row_groups(s3, bucket, tmp_path):
    client, recorder = s3
    write_formats(tmp_path / "local")
    upload(client, bucket, tmp_path / "local", "corpus")
    remote, _ = discover(options(tmp_path, f"s3://{bucket}/corpus", train_file=("train.parquet",)))
    recorder.reset()
    read_documents(remote, options(tmp_path, f"s3://{bucket}/corpus"), tmp_path / "scratch")
    entries = [json.loads(line) for line in recorder.log.read_text().splitlines()]
    gets = [e for e in entries if e["method"] == "GET" and "train.parquet" in e["url"]]
    assert gets and all("bytes=" in (e["headers"].get("Range") or e["headers"].get("range") or "") for e in gets)


def test_discover_names_train_and_validation_objects_as_in_a_local_folder(s3, bucket, tmp_path):
    client, recorder = s3
    for key in ("ds/train.jsonl", "ds/valid.jsonl", "ds/notes.md", "ds/shards/part-0.txt", "ds/shards/part-1.txt"):
        client.put_object(Bucket=bucket, Key=key, Body=b'{"text": "x"}\n')
    recorder.reset()
    train, valid = discover(options(tmp_path, f"s3://{bucket}/ds/"))
    assert [f.name for f in train.files] == ["train.jsonl"] and [f.name for f in valid.files] == ["valid.jsonl"]
    train, valid = discover(options(tmp_path, f"s3://{bucket}/ds", train_file=("shards/*.txt",)))
    assert [f.name for f in train.files] == ["part-0.txt", "part-1.txt"] and not valid
    train, _ = discover(options(tmp_path, f"s3://{bucket}/ds", train_file=("shards",)))
    assert len(train.files) == 2
    train, _ = discover(options(tmp_path, f"s3://{bucket}/ds", train_file=("**/*.txt",)))
    assert len(train.files) == 2
    assert recorder.object_reads() == [], "finding the files lists them and reads none"


def test_a_second_prepare_of_unchanged_objects_is_a_cache_hit_that_reads_no_object(s3, bucket, tmp_path, tokenizer,
                                                                                   corpus_dir):
    client, recorder = s3
    upload(client, bucket, corpus_dir, "corpus")
    opts = options(tmp_path, f"s3://{bucket}/corpus")
    recorder.reset()
    train, valid, first = pipeline.prepare(opts, tokenizer, 32)
    assert not first.cache_hit and len(train) > 0 and len(valid) > 0
    assert sorted(set(recorder.object_reads())) == [f"/{bucket}/corpus/train.txt", f"/{bucket}/corpus/valid.txt"]
    recorder.reset()
    _, _, second = pipeline.prepare(options(tmp_path, f"s3://{bucket}/corpus"), tokenizer, 32)
    assert second.cache_hit and second.fingerprint == first.fingerprint
    assert recorder.object_reads() == [], "a cache hit must download nothing"
    # The same tokens as the same files read from a local folder.
    _, _, local = pipeline.prepare(options(tmp_path / "l", corpus_dir), tokenizer, 32)
    assert (local.train_tokens, local.valid_rows) == (first.train_tokens, first.valid_rows)
    # A changed object (a new ETag) is a new build.
    client.put_object(Bucket=bucket, Key="corpus/valid.txt", Body=(corpus_dir / "valid.txt").read_bytes() + b"more\n")
    _, _, third = pipeline.prepare(options(tmp_path, f"s3://{bucket}/corpus"), tokenizer, 32)
    assert not third.cache_hit and third.fingerprint != first.fingerprint


def test_the_fingerprint_is_the_listing_of_names_sizes_and_etags(s3, bucket, tmp_path):
    client, recorder = s3
    client.put_object(Bucket=bucket, Key="p/train.txt", Body=b"one\ntwo\n")
    source, _ = discover(options(tmp_path, f"s3://{bucket}/p"))
    recorder.reset()
    before = fingerprint(source)
    assert recorder.object_reads() == []
    client.put_object(Bucket=bucket, Key="p/train.txt", Body=b"one\nTWO\n")  # same size, new bytes
    assert fingerprint(discover(options(tmp_path, f"s3://{bucket}/p"))[0]) != before


@pytest.mark.parametrize("url,says", [("s3://no-such-bucket-here/data", "does not exist"),
                                      ("s3://{bucket}/empty", "holds no objects")])
def test_a_missing_bucket_or_an_empty_prefix_is_one_data_error_before_anything_runs(s3, bucket, tmp_path, url, says):
    cfg = TrainConfig(data_dir=url.format(bucket=bucket), output_dir=tmp_path / "out")
    with pytest.raises(DataError) as caught:
        check_cheaply(cfg)
    assert len(caught.value.problems) == 1 and says in str(caught.value) and "--data-dir" in str(caught.value)


def test_a_bad_url_is_a_usage_problem_naming_the_option(tmp_path):
    for value, option in (("s3://Bad_Bucket/x", "--data-dir"), ("ftp://host/x", "--data-dir")):
        problems = check_values(TrainConfig(data_dir=value, output_dir=tmp_path))
        assert len(problems) == 1 and problems[0].startswith(option), problems
    problems = check_values(TrainConfig(model="hf://acme/model", output_dir=tmp_path))
    assert len(problems) == 1 and problems[0].startswith("--model"), problems


def test_invalid_text_in_an_object_is_a_data_error_naming_it(s3, bucket, tmp_path):
    s3[0].put_object(Bucket=bucket, Key="p/train.txt", Body=b"fine\n\xff\xfe broken\n")
    source, _ = discover(options(tmp_path, f"s3://{bucket}/p"))
    with pytest.raises(DataError, match=f"s3://{bucket}/p/train.txt is not valid UTF-8"):
        read_documents(source, options(tmp_path, f"s3://{bucket}/p"), tmp_path / "scratch")


def test_a_broken_json_line_is_a_data_error_naming_the_object_and_the_line(s3, bucket, tmp_path):
    s3[0].put_object(Bucket=bucket, Key="p/train.jsonl", Body=b'{"text": "a"}\n{"text": "b"\n{"text": "c"}\n')
    source, _ = discover(options(tmp_path, f"s3://{bucket}/p"))
    with pytest.raises(DataError, match=f"cannot parse json object s3://{bucket}/p/train.jsonl: line 2"):
        read_documents(source, options(tmp_path, f"s3://{bucket}/p"), tmp_path / "scratch")


def test_a_saved_dataset_in_object_storage_is_refused_with_the_fix(s3, bucket, tmp_path):
    for key in ("saved/dataset_info.json", "saved/state.json", "saved/data-00000-of-00001.arrow"):
        s3[0].put_object(Bucket=bucket, Key=key, Body=b"{}")
    with pytest.raises(DataError, match="Parquet"):
        discover(options(tmp_path, f"s3://{bucket}/saved"))


class Denied(http.server.BaseHTTPRequestHandler):
    """A store that refuses every request, as S3 does for credentials without s3:ListBucket."""

    def _deny(self):
        body = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = _deny

    def log_message(self, *args):
        pass


class ListsButDeniesReads(Denied):
    """A store whose credentials may list the bucket (one object) but not read it: s3:ListBucket without
    s3:GetObject, which only a read shows."""

    def do_GET(self):
        if "list-type=2" not in self.path:
            return self._deny()
        body = (b"<ListBucketResult><Name>private-data</Name><Prefix>corpus/</Prefix><KeyCount>1</KeyCount>"
                b"<MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated><Contents><Key>corpus/train.txt</Key>"
                b"<Size>6</Size><ETag>\"0f\"</ETag><LastModified>2026-01-01T00:00:00.000Z</LastModified>"
                b"<StorageClass>STANDARD</StorageClass></Contents></ListBucketResult>")
        self.send_response(200)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_a_read_denied_after_a_listing_is_a_data_error_from_doctor_and_the_build(tmp_path, monkeypatch):
    with _store_answering(ListsButDeniesReads, monkeypatch):
        opts = options(tmp_path, "s3://private-data/corpus")
        train, _ = discover(opts)  # the listing is allowed
        assert [f.name for f in train.files] == ["train.txt"]
        with pytest.raises(DataError, match="s3://private-data/corpus/train.txt: access denied"):
            objectstore.check_readable(train.files)
        with pytest.raises(DataError, match="access denied"):
            read_documents(train, opts, tmp_path / "scratch")


def test_a_denied_listing_is_a_data_error_naming_the_permission(tmp_path, monkeypatch):
    with _store_answering(Denied, monkeypatch):
        with pytest.raises(DataError, match="access denied.*read access"):
            discover(options(tmp_path, "s3://private-data/corpus"))
        with pytest.raises(ModelLoadError, match="access denied"):
            objectstore.local_model("s3://private-data/model", tmp_path / "cache")


def test_a_model_folder_is_downloaded_once_and_loaded_from_the_cache(s3, bucket, tmp_path, tiny_model):
    client, recorder = s3
    upload(client, bucket, tiny_model, "models/tiny")
    cfg = TrainConfig(model=f"s3://{bucket}/models/tiny", output_dir=tmp_path / "out")
    recorder.reset()
    local = Path(model_path(cfg))
    assert local.parent == cfg.data_cache_dir / objectstore.MODELS_DIR and (local / "COMPLETE").is_file()
    assert {p.name for p in tiny_model.iterdir()} <= {p.name for p in local.iterdir()}
    assert len(set(recorder.object_reads())) == len(list(tiny_model.iterdir()))
    assert load_model_config(str(local), None).model_type == "gpt2"
    recorder.reset()
    assert model_path(cfg) == str(local) and recorder.object_reads() == [], "a second load downloads nothing"


def test_a_model_prefix_without_config_json_is_a_model_load_error(s3, bucket, tmp_path):
    s3[0].put_object(Bucket=bucket, Key="m/model.safetensors", Body=b"x")
    with pytest.raises(ModelLoadError, match="no config.json"):
        objectstore.local_model(f"s3://{bucket}/m", tmp_path / "cache")
    with pytest.raises(ModelLoadError, match="does not exist"):
        objectstore.local_model("s3://no-such-model-bucket/m", tmp_path / "cache")


@contextlib.contextmanager
def _store_answering(handler, monkeypatch):
    """An HTTP server on 127.0.0.1 answering S3 requests with `handler`, set as the endpoint for the test."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        yield
    finally:
        server.shutdown()
