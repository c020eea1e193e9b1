"""--export-to (entrypoint/publish/export.py) against a real S3-protocol server on 127.0.0.1 (moto's standalone server,
tests/support/s3server.py), with a proxy in front that drops every connection after a byte budget: a store that fails in
the middle of an upload."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from entrypoint.config import destinations
from entrypoint.errors import ExitCode, ExportError
from entrypoint.publish import export
from tests.support.helpers import finetune, train_env
from tests.support.s3server import SECRET


@pytest.fixture
def bucket(server, request) -> str:
    name = "models-" + request.node.name.lower().replace("_", "-")[-40:].strip("-")
    server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_env(server, proxy, monkeypatch) -> dict[str, str]:
    env = server.env(proxy.port)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def model_dir(tmp_path):
    """A published model/ as outputs.publish_model leaves it: files, then a COMPLETE marker."""
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text('{"model_type": "gpt2"}\n')
    (directory / "model.safetensors").write_bytes(os.urandom(400_000))
    (directory / "tokenizer.json").write_text("{}\n")
    (directory / "COMPLETE").write_text('{"config_hash": "a"}\n')
    return directory


def local_files(directory) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def remote(server, bucket, prefix) -> dict[str, bytes]:
    return {k.removeprefix(prefix + "/"): v for k, v in server.objects(bucket, prefix + "/").items()}


@pytest.mark.parametrize("url, expected", [
    ("s3://bucket/runs/gpt2/", ("s3", "bucket", "runs/gpt2")),
    ("s3://my.bucket-1", ("s3", "my.bucket-1", "")),
    ("gs://bucket/x", ("gs", "bucket", "x")),
    ("hf://acme/gpt2-support", ("hf", "acme/gpt2-support", "")),
])
def test_urls_parse_into_scheme_bucket_and_prefix(url, expected):
    dest = export.parse(url)
    assert (dest.scheme, dest.bucket, dest.prefix) == expected


@pytest.mark.parametrize("url, says", [
    ("/output/elsewhere", "is not s3://"),
    ("ftp://host/x", "is not s3://"),
    ("s3://AKIA:secret@bucket/x", "must not carry credentials"),
    ("s3://Bad_Bucket/x", "is not a bucket name"),
    ("hf://acme", "hf://namespace/repo"),
    ("hf://acme/a/b", "hf://namespace/repo"),
])
def test_bad_urls_are_refused_with_the_fix(url, says):
    (problem,) = destinations.url_problems(url)
    assert says in problem
    assert "secret" not in problem or "credentials" in problem


def test_gs_without_gcsfs_is_a_usage_error_before_training(tmp_path, corpus_dir, tiny_model):
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here; the missing-package error cannot happen")
    result = finetune("train", env=train_env(tiny_model, corpus_dir, tmp_path / "out",
                                             FINETUNE_EXPORT_TO="gs://bucket/run"))
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert "pip install gcsfs" in result.stderr
    assert not (tmp_path / "out" / "model").exists()


def test_export_uploads_every_file_and_complete_and_a_rerun_uploads_nothing(server, s3_env, bucket, model_dir,
                                                                           proxy):
    assert export.export(model_dir, f"s3://{bucket}/run") is True
    assert remote(server, bucket, "run") == local_files(model_dir)
    sent = proxy.forwarded
    assert export.export(model_dir, f"s3://{bucket}/run") is False  # COMPLETE matches: nothing to do
    assert proxy.forwarded - sent < 10_000, "a rerun re-uploaded the model"


def test_a_store_failing_mid_upload_leaves_no_complete_and_the_rerun_finishes(server, s3_env, bucket, model_dir,
                                                                             proxy):
    # A previous model is there, COMPLETE and all: a reader must never see its COMPLETE beside new files.
    (model_dir / "COMPLETE").write_text('{"config_hash": "old"}\n')
    export.export(model_dir, f"s3://{bucket}/run")
    (model_dir / "COMPLETE").write_text('{"config_hash": "new"}\n')
    (model_dir / "model.safetensors").write_bytes(os.urandom(400_000))
    proxy.budget = proxy.forwarded + 150_000  # dies inside model.safetensors

    with pytest.raises(ExportError) as failure:
        export.export(model_dir, f"s3://{bucket}/run", attempts=3, backoff=0.1)
    assert "model.safetensors after 3 attempt(s)" in str(failure.value)
    assert "rerun the same command" in str(failure.value)
    assert failure.value.code == ExitCode.EXPORT
    left = remote(server, bucket, "run")
    assert "COMPLETE" not in left, "the old COMPLETE survived the start of a new upload"
    assert left["config.json"] == (model_dir / "config.json").read_bytes()  # files before it went up

    proxy.budget = None  # the store is back
    assert export.export(model_dir, f"s3://{bucket}/run") is True
    assert remote(server, bucket, "run") == local_files(model_dir)


def test_a_missing_bucket_fails_at_once_naming_it(s3_env, model_dir):
    with pytest.raises(ExportError, match="after 1 attempt.*create the bucket no-such-bucket"):
        export.export(model_dir, "s3://no-such-bucket/run")


def test_doctor_reports_whether_the_destination_is_writable(server, s3_env, bucket, tmp_path, corpus_dir,
                                                            tiny_model):
    base = train_env(tiny_model, corpus_dir, tmp_path / "out", **s3_env)
    ok = finetune("doctor", env={**base, "FINETUNE_EXPORT_TO": f"s3://{bucket}/run"})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"ok    export: s3://{bucket}/run is writable" in ok.stdout
    assert server.objects(bucket) == {}, "the probe object was left behind"
    bad = finetune("doctor", env={**base, "FINETUNE_EXPORT_TO": "s3://no-such-bucket/run"})
    assert bad.returncode == ExitCode.EXPORT
    assert "FAIL  export: --export-to s3://no-such-bucket/run is not writable" in bad.stdout


@pytest.mark.slow
def test_train_exports_after_publishing_and_a_failed_export_is_exit_10_rerun_without_retraining(
        server, proxy, bucket, tmp_path, corpus_dir, tiny_model):
    out = tmp_path / "out"
    env = train_env(tiny_model, corpus_dir, out, **server.env(proxy.port), FINETUNE_EXPORT_TO=f"s3://{bucket}/gpt2",
                    FINETUNE_STORE_RETRIES="1")
    proxy.budget = 20_000  # the store dies during the first upload

    first = finetune("train", env=env)
    assert first.returncode == ExitCode.EXPORT, first.stdout + first.stderr
    assert "after 2 attempt(s)" in first.stderr, first.stderr[-2000:]  # --store-retries 1: one retry
    assert (out / "model" / "COMPLETE").is_file(), "the local publish must stand"
    status = json.loads((out / "status.json").read_text())
    assert (status["state"], status["exit_code"]) == ("failed", 10)
    assert "COMPLETE" not in remote(server, bucket, "gpt2")
    for text in (first.stdout, first.stderr, (out / "status.json").read_text()):
        assert SECRET not in text, "a credential reached the log"

    proxy.budget = None
    second = finetune("train", env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    logs = second.stdout + second.stderr
    assert "done already" in logs and "plan:" not in logs, "the rerun trained again"
    assert remote(server, bucket, "gpt2") == local_files(out / "model")
    assert SECRET not in second.stdout + second.stderr


def test_proxy_budget_cuts_a_transfer(server, proxy):
    # The fault injector itself: past the budget, connections fail; with it lifted, they work again.
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{proxy.port}", aws_access_key_id="t",
                          aws_secret_access_key="t", region_name="us-east-1",
                          config=Config(retries={"max_attempts": 1}))
    client.create_bucket(Bucket="proxy-check")
    proxy.budget = proxy.forwarded + 1000
    from botocore.exceptions import BotoCoreError

    with pytest.raises(BotoCoreError):  # ConnectionClosedError or EndpointConnectionError
        client.put_object(Bucket="proxy-check", Key="big", Body=b"x" * 100_000)
    proxy.budget = None
    client.put_object(Bucket="proxy-check", Key="small", Body=b"x")
    assert set(server.objects("proxy-check")) == {"small"}
