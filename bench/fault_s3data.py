"""The fault matrix's object-storage data case: a run with `--data-dir s3://...` (and `--model s3://...`), then a
second run of the same inputs on a fresh output directory, against a moto S3 server on 127.0.0.1 whose request log
shows the second run read no object: the token cache and the model are found from the objects' listing alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.fault_lab import Lab, Outcome, expect, fault
from tests.support.s3requests import recording_server

BUCKET = "faults-data"


def _upload(client, local: Path, prefix: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{path.relative_to(local).as_posix()}", Body=path.read_bytes())


def _train(lab: Lab, out: Path, extra: dict[str, str]) -> tuple[int, str]:
    """Lab.train with the model in the store too (Lab.env takes a local model path) and a cache of the case's own,
    so that the first run always starts from nothing."""
    env = {**lab.env(out, **extra), "FINETUNE_MODEL": f"s3://{BUCKET}/model",
           "FINETUNE_CACHE_DIR": str(out.parent / "cache")}
    done = subprocess.run([sys.executable, "-m", "entrypoint", "train"], env=env, capture_output=True, text=True,
                          timeout=600)
    return done.returncode, done.stderr


@fault("--data-dir s3:// rerun on unchanged objects", codes=(0, 0), published=True)
def s3_data_cache_hit(lab: Lab) -> Outcome:
    directory = lab.fresh("s3-data")
    with recording_server(directory) as (server, recorder):
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        _upload(client, lab.data, "corpus")
        _upload(client, lab.model, "model")
        extra = {"FINETUNE_DATA_DIR": f"s3://{BUCKET}/corpus", **server.env()}
        recorder.reset()
        first, log = _train(lab, directory / "first", extra)
        expect(first == 0, "the run from object storage failed", log)
        read_first = len(set(recorder.object_reads()))
        recorder.reset()
        second, log = _train(lab, directory / "second", extra)
        reads = recorder.object_reads()
        listings = sum(1 for method, path in recorder.requests() if method == "GET" and "list-type=2" in path)
    expect("cache hit" in log and "unchanged since its download" in log, "the rerun did not use the caches", log)
    expect(reads == [], f"the rerun read {len(reads)} object(s): {reads[:3]}", log)
    return lab.outcome(directory / "second", [first, second], log,
                       note=f"first run read {read_first} objects; the rerun none ({listings} LIST requests)")
