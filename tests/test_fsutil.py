"""Atomic writes, fsync, the write probe and completion markers, on real files (and real tmpfs mounts where the
tests may mount: read-only and full volumes)."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import threading

import pytest

from entrypoint import fsutil


@pytest.fixture
def mount(tmp_path):
    """mount(options) -> a fresh tmpfs mounted with those options; skips where mounting is not allowed."""
    mounted = []

    def make(options: str):
        target = tmp_path / f"tmpfs-{len(mounted)}"
        target.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()}); run as root")
        mounted.append(target)
        return target

    yield make
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_the_temporary_name_is_hidden_beside_the_file_and_private_to_this_host_and_process(tmp_path):
    temp = fsutil.temp_sibling(tmp_path / "metrics.json")
    assert temp == tmp_path / f".metrics.json.tmp-{socket.gethostname()}-{os.getpid()}"


@pytest.mark.parametrize("content", ["text\n", b"\x00bytes\xff"])
def test_an_atomic_write_replaces_the_file_and_leaves_no_temporary_file(tmp_path, content):
    path = tmp_path / "status.json"
    path.write_text("old")
    fsutil.write_atomic(path, content)
    assert (path.read_bytes() if isinstance(content, bytes) else path.read_text()) == content
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


def test_an_atomic_write_is_readable_by_every_user_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        fsutil.write_atomic(tmp_path / "metrics.json", "{}", sync=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o644


def test_a_writer_function_gets_the_temporary_path_and_a_failing_one_leaves_the_old_file(tmp_path):
    path = tmp_path / "loss.png"
    fsutil.write_atomic(path, lambda temp: temp.write_bytes(b"png"))
    assert path.read_bytes() == b"png"

    def fails(temp):
        temp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        fsutil.write_atomic(path, fails)
    assert path.read_bytes() == b"png"
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]


def test_a_reader_sees_the_old_file_or_the_new_one_never_a_mixture(tmp_path):
    path = tmp_path / "big.txt"
    versions = ["a" * (1 << 20), "b" * (1 << 20)]
    path.write_text(versions[0])
    seen, done = set(), threading.Event()

    def read():
        while not done.is_set():
            seen.add(path.read_text())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(100):
            fsutil.write_atomic(path, versions[i % 2])
    finally:
        done.set()
        reader.join()
    assert seen <= set(versions) and seen


def test_fsync_tree_flushes_every_file_and_folder_of_a_tree(tmp_path, monkeypatch):
    root = tmp_path / "model"
    (root / "adapter" / "empty").mkdir(parents=True)
    (root / "config.json").write_text("{}")
    (root / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 4096)
    flushed, real = set(), os.fsync

    def fsync(fd):
        flushed.add(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    fsutil.fsync_tree(root)
    assert flushed == {p.stat().st_ino for p in [root, *root.rglob("*")]}


def test_the_write_probe_passes_a_writable_folder_and_leaves_nothing(tmp_path):
    assert fsutil.write_problem(tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_the_write_probe_names_a_missing_folder(tmp_path):
    assert fsutil.write_problem(tmp_path / "none") == "No such file or directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_the_write_probe_reports_a_folder_without_write_permission(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert fsutil.write_problem(locked) == "Permission denied"
    finally:
        locked.chmod(0o755)


def test_the_write_probe_reports_a_read_only_volume(mount):
    assert fsutil.write_problem(mount("ro,size=64k")) == "Read-only file system"


def test_the_write_probe_reports_a_full_volume_and_cleans_up(mount):
    volume = mount("size=64k")
    with pytest.raises(OSError), (volume / "filler").open("wb") as f:
        f.write(b"\0" * (1 << 20))
    assert fsutil.write_problem(volume, nbytes=4096) == "No space left on device"
    assert [p.name for p in volume.iterdir()] == ["filler"]


def test_a_marker_round_trips_and_appears_only_whole(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 4096)
    record = {"save_seconds": 1.5, "run": "abc", "totals": {"train_tokens": 12}}
    fsutil.write_marker(tmp_path / "finetune-complete.json", json.dumps(record))
    assert fsutil.read_marker(tmp_path / "finetune-complete.json") == record
    assert (tmp_path / "finetune-complete.json").read_text() == json.dumps(record)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finetune-complete.json", "weights.bin"]


def test_an_empty_missing_or_damaged_marker_reads_as_none(tmp_path):
    fsutil.write_marker(tmp_path / "COMPLETE", sync=False)
    assert (tmp_path / "COMPLETE").read_text() == ""
    assert fsutil.read_marker(tmp_path / "COMPLETE") is None
    assert fsutil.read_marker(tmp_path / "absent") is None
    (tmp_path / "half.json").write_text('{"save_sec')
    assert fsutil.read_marker(tmp_path / "half.json") is None
