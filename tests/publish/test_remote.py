"""--checkpoint-to's store (entrypoint/publish/remote.py) against a real S3-protocol server on 127.0.0.1 (moto's
standalone server, tests/support/s3server.py), with the proxy that cuts connections after a byte budget. The
training runs that use it are in tests/e2e/test_remote_checkpoints.py."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from types import SimpleNamespace

import pytest

from entrypoint.errors import Busy, ExitCode, Preempted, StoreUnavailable
from entrypoint.publish import remote
from entrypoint.publish.remote import LEASE, RemoteCheckpoints, RemoteLease

MARKER = "finetune-complete.json"


@pytest.fixture
def url(server, proxy, request, monkeypatch) -> str:
    for key, value in server.env(proxy.port).items():
        monkeypatch.setenv(key, value)
    name = "ckpt-" + request.node.name.lower().replace("_", "-")[-40:].strip("-")
    server.client().create_bucket(Bucket=name)
    return f"s3://{name}/run"


def checkpoint(directory, step: int, size: int = 50_000):
    """A local checkpoint as the trainer leaves it: files, then the completion marker."""
    path = directory / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(os.urandom(size))
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (path / MARKER).write_text(json.dumps({"run": "abc"}))
    return path


def files(directory) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def store(url, keep=3, **kwargs) -> RemoteCheckpoints:
    return RemoteCheckpoints(url, MARKER, keep, attempts=2, backoff=0.05, **kwargs)


def test_an_uploaded_checkpoint_comes_back_whole_on_a_new_node(url, tmp_path):
    local = checkpoint(tmp_path / "node-a", 8)
    store(url).upload(local)
    restored = store(url).restore(tmp_path / "node-b", None)
    assert restored == tmp_path / "node-b" / "checkpoint-8"
    assert files(restored) == files(local)
    assert [p.name for p in (tmp_path / "node-b").iterdir()] == ["checkpoint-8"], "a staging folder was left"


def test_a_sharded_checkpoints_subfolders_and_hidden_metadata_come_back(url, tmp_path):
    local = tmp_path / "node-a" / "checkpoint-8"  # --fsdp's layout, cut to its shape: a shard folder whose
    (local / "pytorch_model_fsdp_0").mkdir(parents=True)  # metadata is a hidden file (tests/support/checkpoints.py)
    (local / "pytorch_model_fsdp_0" / ".metadata").write_bytes(b"metadata")
    (local / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(os.urandom(1000))
    (local / MARKER).write_text(json.dumps({"run": "abc"}))
    store(url).upload(local)
    restored = store(url).restore(tmp_path / "node-b", None)
    assert files(restored) == files(local)


def test_nothing_is_downloaded_when_the_local_checkpoint_is_as_new(url, tmp_path, proxy):
    store(url).upload(checkpoint(tmp_path / "a", 8))
    sent = proxy.forwarded
    assert store(url).restore(tmp_path / "b", 8) is None
    assert not (tmp_path / "b").exists()
    assert proxy.forwarded - sent < 20_000


def test_a_remote_checkpoint_without_its_marker_is_ignored(url, tmp_path, server):
    checkpoints = store(url)
    checkpoints.upload(checkpoint(tmp_path, 8))
    checkpoints.upload(checkpoint(tmp_path, 16))
    bucket = url.split("/")[2]
    server.client().delete_object(Bucket=bucket, Key=f"run/checkpoint-16/{MARKER}")
    assert checkpoints.steps() == {8: True, 16: False}
    assert checkpoints.restore(tmp_path / "new", None).name == "checkpoint-8"


def test_a_store_cut_mid_upload_leaves_nothing_complete_and_says_rerun(url, tmp_path, proxy):
    checkpoints = store(url)
    checkpoints.upload(checkpoint(tmp_path, 8))
    proxy.budget = proxy.forwarded + 100_000  # dies inside checkpoint-16's weights
    with pytest.raises(StoreUnavailable) as failure:
        checkpoints.upload(checkpoint(tmp_path, 16, size=400_000))
    assert failure.value.code == ExitCode.STORE
    assert "rerun the same command" in str(failure.value)
    proxy.budget = None
    assert not checkpoints.steps().get(16)
    assert checkpoints.newest() == 8


def test_retention_deletes_an_old_checkpoint_only_after_a_newer_one_is_complete(url, tmp_path, server, proxy):
    checkpoints = store(url, keep=2)
    for step in (8, 16):
        checkpoints.upload(checkpoint(tmp_path, step))
    proxy.budget = proxy.forwarded + 30_000
    with pytest.raises(StoreUnavailable):
        checkpoints.upload(checkpoint(tmp_path, 24, size=200_000))
    proxy.budget = None
    complete = {step for step, done in checkpoints.steps().items() if done}
    assert complete == {8, 16}, "a torn upload cost a complete checkpoint"
    checkpoints.upload(tmp_path / "checkpoint-24")
    checkpoints.upload(checkpoint(tmp_path, 32))
    assert checkpoints.steps() == {24: True, 32: True}


def test_a_fresh_start_moves_the_previous_runs_checkpoints_aside(url, tmp_path, server):
    checkpoints = store(url)
    checkpoints.upload(checkpoint(tmp_path, 8))
    checkpoints.set_aside()
    assert checkpoints.steps() == {}
    keys = set(server.objects(url.split("/")[2], "run/previous-run/"))
    assert f"run/previous-run/checkpoint-8/{MARKER}" in keys


def foreign(holder_host: str = "another-node") -> bytes:
    return json.dumps({"host": holder_host, "pid": 1, "pid_namespace": "pid:[1]", "process_start": "1",
                       "started": "2026-01-01T00:00:00Z", "token": "theirs"}).encode()


def test_a_lease_whose_heartbeat_moves_is_refused_with_busy(url):
    checkpoints = store(url)
    checkpoints.store.write(LEASE, foreign())
    done = threading.Event()

    def beat():  # the other node renews its lease, as RemoteLease does every HEARTBEAT_SECONDS
        n = 0
        while not done.wait(0.3):
            n += 1
            checkpoints.store.write(LEASE, foreign() + b" " * n)

    threading.Thread(target=beat, daemon=True).start()
    try:
        with pytest.raises(Busy, match="in use by the run on host another-node"):
            RemoteLease(checkpoints, stale=30).acquire()
    finally:
        done.set()


def test_a_stale_lease_expires_and_is_taken_over(url, caplog):
    checkpoints = store(url)
    checkpoints.store.write(LEASE, foreign())
    time.sleep(2.2)  # the store's clock has 1 s resolution
    lease = RemoteLease(checkpoints, stale=1, heartbeat=0.2)
    lease.acquire()
    try:
        held = json.loads(checkpoints.store.read(LEASE))
        assert held["token"] == lease.me["token"]
        time.sleep(0.6)  # renewed with If-Match on its own ETag
        assert lease.lost is None
    finally:
        lease.release()
    assert json.loads(checkpoints.store.read(LEASE))["released"] is True


def test_a_released_lease_is_taken_at_once_and_a_takeover_is_noticed_by_the_old_holder(url):
    checkpoints = store(url)
    first = RemoteLease(checkpoints, heartbeat=0.2)
    first.acquire()
    first.release()
    started = time.monotonic()
    second = RemoteLease(checkpoints, heartbeat=0.2)
    second.acquire()
    assert time.monotonic() - started < remote.STALE_SECONDS / 2, "the released lease was waited for"
    checkpoints.store.write(LEASE, foreign())  # another run took it over while this one stalled
    deadline = time.monotonic() + 30
    while second.lost is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert second.lost and "taken over by the run on host another-node" in second.lost
    second.release()
    assert json.loads(checkpoints.store.read(LEASE))["token"] == "theirs", "the loser released the winner's lease"


def test_the_same_host_with_a_dead_holder_takes_the_lease_at_once(url):
    checkpoints = store(url)
    me = json.loads(json.dumps(RemoteLease(checkpoints).me))
    me.update(pid=2**22 + 7, process_start="0", token="dead")  # a PID that is not running here
    checkpoints.store.write(LEASE, json.dumps(me).encode())
    lease = RemoteLease(checkpoints)
    lease.acquire()
    lease.release()
    assert me["host"] == socket.gethostname()


def test_the_uploader_waits_for_the_previous_upload_and_says_so(url, tmp_path, caplog):
    checkpoints = store(url)
    uploads = checkpoints.uploads
    uploads.submit(checkpoint(tmp_path, 8, size=3_000_000))
    assert uploads.wait("saving checkpoint-16") >= 0
    assert uploads.newest == 8
    uploads.submit(checkpoint(tmp_path, 16))
    uploads.finish()
    assert checkpoints.steps() == {8: True, 16: True}


def test_a_signal_while_the_final_upload_runs_before_publishing_says_where_a_new_node_resumes(url, tmp_path, caplog):
    stop = SimpleNamespace(requested=False, signal_name=None)  # the run's StopRequest, as the lease holds it
    checkpoints = store(url, stop=stop)
    uploads = checkpoints.uploads
    uploads.submit(checkpoint(tmp_path, 8))
    uploads.wait("saving checkpoint-16")
    uploads.submit(checkpoint(tmp_path, 16, size=2_000_000))
    stop.requested, stop.signal_name = True, "SIGTERM"  # SIGTERM arrives while checkpoint-16 goes up
    with caplog.at_level("INFO"), pytest.raises(Preempted) as stopped:
        uploads.finish()
    where = f"{url}/checkpoint-16"
    assert stopped.value.code == ExitCode.PREEMPTED
    assert f"a run on a new node resumes from {where}" in str(stopped.value)
    assert any(f"a run on a new node resumes from {where}" in r.getMessage() for r in caplog.records)
    assert checkpoints.steps() == {8: True, 16: True}


def test_store_outage_through_every_retry_is_raised_in_the_training_thread(url, tmp_path, proxy):
    checkpoints = store(url)
    uploads = checkpoints.uploads
    proxy.budget = proxy.forwarded  # the store is gone
    uploads.submit(checkpoint(tmp_path, 8))
    with pytest.raises(StoreUnavailable, match="--checkpoint-to s3://.*failed after"):
        uploads.finish()


def test_urls_are_checked_with_the_option_named():
    from entrypoint.config.destinations import url_problems

    (problem,) = url_problems("hf://acme/model", "--checkpoint-to")
    assert problem.startswith("--checkpoint-to") and "s3://bucket/prefix or gs://bucket/prefix" in problem
    assert remote.OPTION == "--checkpoint-to"


def test_doctor_probe_names_the_option_and_the_store_exit_code(url):
    from entrypoint.publish.export import probe

    assert probe(url, "--checkpoint-to", StoreUnavailable).endswith("is writable")
    with pytest.raises(StoreUnavailable, match=r"^--checkpoint-to s3://no-such-bucket/run is not writable"):
        probe("s3://no-such-bucket/run", "--checkpoint-to", StoreUnavailable)


def test_a_lost_multipart_upload_is_retried_but_a_missing_bucket_is_not():
    from entrypoint.publish.export import FsStore

    assert not FsStore.permanent(FileNotFoundError("The specified upload does not exist. The upload ID may be invalid"))
    assert FsStore.permanent(FileNotFoundError("The specified bucket does not exist"))


def test_doctor_probes_the_checkpoint_store(server, proxy, url, tmp_path, corpus_dir, tiny_model):
    from tests.support.helpers import finetune, train_env

    env = train_env(tiny_model, corpus_dir, tmp_path / "out", **server.env(proxy.port))
    ok = finetune("doctor", env={**env, "FINETUNE_CHECKPOINT_TO": url})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"ok    checkpoint store: {url} is writable" in ok.stdout
    bad = finetune("doctor", env={**env, "FINETUNE_CHECKPOINT_TO": "s3://no-such-bucket/run"})
    assert bad.returncode == ExitCode.STORE
    assert "FAIL  checkpoint store: --checkpoint-to s3://no-such-bucket/run is not writable" in bad.stdout
