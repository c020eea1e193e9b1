"""`finetune train --data-dir s3://... --model s3://...` as a pod on a node without shared volumes runs it, against a
real S3-protocol server on 127.0.0.1 whose request log proves that a second run on unchanged objects downloads
nothing: the token cache and the model come from --cache-dir, found by the objects' listing alone."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from entrypoint.errors import ExitCode
from tests.support.helpers import FAST_TRAIN, finetune, train_env
from tests.support.s3requests import recording_server


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with recording_server(tmp_path_factory.mktemp("s3log")) as (server, recorder):
        yield server, recorder


def upload(client, bucket: str, local: Path, prefix: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(local).as_posix()}", Body=path.read_bytes())


def test_training_from_object_storage_then_a_rerun_that_downloads_nothing(store, tmp_path, corpus_dir, tiny_model):
    server, recorder = store
    client = server.client()
    client.create_bucket(Bucket="corpora")
    upload(client, "corpora", corpus_dir, "docstrings")
    upload(client, "corpora", tiny_model, "models/tiny")
    cache = tmp_path / "cache"  # on a node: an emptyDir, or a volume that outlives the pod

    def run(out: str):
        env = train_env("s3://corpora/models/tiny", "s3://corpora/docstrings", tmp_path / out,
                        {**FAST_TRAIN, "FINETUNE_MAX_STEPS": "4", "FINETUNE_EVAL_STEPS": "4",
                         "FINETUNE_SAVE_STEPS": "4"}, FINETUNE_CACHE_DIR=str(cache), **server.env())
        recorder.reset()
        result = finetune("train", env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result, recorder.object_reads()

    first, reads = run("first")
    assert "cache miss" in first.stderr and "downloading s3://corpora/models/tiny" in first.stderr
    assert {"/corpora/docstrings/train.txt", "/corpora/docstrings/valid.txt"} <= set(reads)
    assert any(r.startswith("/corpora/models/tiny/") for r in reads)
    assert (tmp_path / "first" / "model" / "COMPLETE").is_file()

    second, reads = run("second")
    assert "cache hit" in second.stderr and "unchanged since its download" in second.stderr
    assert reads == [], f"the rerun read objects: {reads}"
    cards = [(tmp_path / out / "model" / "README.md").read_text() for out in ("first", "second")]
    fingerprints = [re.search(r"fingerprint\s+`(\w+)`", card)[1] for card in cards]
    assert fingerprints[0] == fingerprints[1], "both trained on the same token cache"


def test_doctor_reports_object_storage_problems_with_the_data_exit_code(store, tmp_path, tiny_model):
    server, _ = store
    server.client().create_bucket(Bucket="doctor-empty")
    env = train_env(tiny_model, "s3://doctor-empty/nothing", tmp_path / "out", **server.env())
    result = finetune("doctor", env=env, timeout=300)
    assert result.returncode == ExitCode.DATA, result.stderr[-2000:]
    assert "FAIL  data: --data-dir s3://doctor-empty/nothing holds no objects" in result.stdout + result.stderr
