"""Atomic writes, fsync, the write probe and completion markers, on real files (and real tmpfs mounts where the
tests may mount: read-only and full volumes)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
import threading

import pytest

from entrypoint import fsutil
from tests.support.helpers import REPO


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


# publish_dir: a whole folder, staged privately, marked, renamed into place.

def _model(text: str):
    """A fill that writes two files and returns the marker's text."""
    def fill(staging):
        (staging / "config.json").write_text(text)
        (staging / "weights.bin").write_bytes(text.encode() * 1024)
        return json.dumps({"version": text})
    return fill


def test_a_published_folder_appears_with_its_files_and_the_marker_written_last(tmp_path):
    final = tmp_path / "model"
    assert fsutil.publish_dir(final, _model("a"))
    assert sorted(p.name for p in final.iterdir()) == [fsutil.COMPLETE, "config.json", "weights.bin"]
    assert fsutil.read_marker(final / fsutil.COMPLETE) == {"version": "a"}
    marked = (final / fsutil.COMPLETE).stat().st_mtime_ns
    assert all(p.stat().st_mtime_ns <= marked for p in final.iterdir())
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging or retired folder beside it


def test_a_reader_never_sees_a_published_folder_without_its_marker_or_half_of_it(tmp_path):
    seen, done = [], threading.Event()

    def read():
        while not done.is_set():
            for folder in tmp_path.glob("model-*"):  # hidden staging folders are not matched
                seen.append(sorted(os.listdir(folder)))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(40):
            fsutil.publish_dir(tmp_path / f"model-{i}", _model(str(i)), sync=False)
    finally:
        done.set()
        reader.join()
    assert seen and all(names == [fsutil.COMPLETE, "config.json", "weights.bin"] for names in seen)


@pytest.mark.parametrize("existing", [False, True])
def test_a_failing_fill_leaves_nothing_half_published_and_the_old_folder_as_it_was(tmp_path, existing):
    final = tmp_path / "model"
    if existing:
        fsutil.publish_dir(final, _model("old"))
    before = {p.name: p.read_bytes() for p in final.iterdir()} if existing else None

    def fails(staging):
        _model("new")(staging)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        fsutil.publish_dir(final, fails)
    assert [p.name for p in tmp_path.iterdir()] == (["model"] if existing else [])
    if existing:
        assert {p.name: p.read_bytes() for p in final.iterdir()} == before


def test_the_renames_run_after_the_guard_so_a_signal_cannot_cut_them_short(tmp_path):
    final, events = tmp_path / "model", []

    @contextlib.contextmanager
    def guard():
        events.append("enter")
        yield
        events.append(("leave", final.exists(), sorted(p.name for p in tmp_path.iterdir())))

    fsutil.publish_dir(final, _model("a"), guard=guard)
    staging = fsutil.temp_sibling(final).name
    assert events == ["enter", ("leave", False, [staging])]  # marked, not yet renamed, when the guard ends
    assert final.is_dir()


def test_two_processes_publishing_one_folder_stage_apart_and_one_wins(tmp_path):
    # Both writers hold their staging folder at once (each waits for the other's "ready" file), then race to
    # rename: one publishes, the other keeps that folder and drops its own.
    script = textwrap.dedent("""
        import os, sys, time
        from pathlib import Path
        from entrypoint import fsutil

        root = Path(sys.argv[1])
        def fill(staging):
            (staging / "who").write_text(str(os.getpid()))
            (root / "ready" / staging.name).write_text("")
            while len(os.listdir(root / "ready")) < 2:
                time.sleep(0.01)
        print(fsutil.publish_dir(root / "shard", fill, if_exists="keep", sync=False))
    """)
    (tmp_path / "ready").mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO) for _ in range(2)]
    outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outcomes == ["False", "True"]
    stagings = sorted(p.name for p in (tmp_path / "ready").iterdir())
    assert len(stagings) == 2 and all(fsutil.is_temporary(tmp_path / name) for name in stagings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ready", "shard"]
    assert (tmp_path / "shard" / "who").read_text() in {str(p.pid) for p in procs}


def test_writers_on_two_hosts_with_the_same_pid_stage_apart(tmp_path, monkeypatch):
    # Two nodes sharing a volume can run their writers under the same PID (containers often do): node b
    # publishes the shard while node a is still writing its copy, and must not take or remove a's folder.
    final, host = tmp_path / "shard-00000-of-00001", {"name": "node-a"}
    monkeypatch.setattr(socket, "gethostname", lambda: host["name"])

    def fill_b(staging):
        (staging / "tokens.bin").write_bytes(b"b")

    def fill_a(staging):
        (staging / "tokens.bin").write_bytes(b"a")
        host["name"] = "node-b"
        assert fsutil.publish_dir(final, fill_b, if_exists="keep", sync=False)
        assert (staging / "tokens.bin").read_bytes() == b"a" and "node-a" in staging.name

    assert fsutil.publish_dir(final, fill_a, if_exists="keep", sync=False) is False
    assert (final / "tokens.bin").read_bytes() == b"b"
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def test_leftovers_of_killed_writers_are_cleared_only_where_there_is_one_writer(tmp_path):
    dead = tmp_path / ".model.tmp-other-host-7"
    (dead / "half").mkdir(parents=True)
    fsutil.publish_dir(tmp_path / "model", _model("a"), if_exists="keep", sync=False)
    assert dead.is_dir()  # in a shared cache it may be a live writer's
    fsutil.publish_dir(tmp_path / "model", _model("b"))
    assert not dead.exists() and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_folder_of_its_own_name_is_replaced_as_a_dead_process_s(tmp_path):
    # A container restarted in place keeps its host name and PID, so a killed run's staging folder has this name.
    own = fsutil.temp_sibling(tmp_path / "shard")
    own.mkdir()
    (own / "stale.bin").write_bytes(b"old")
    fsutil.publish_dir(tmp_path / "shard", _model("a"), if_exists="keep", sync=False)
    assert sorted(p.name for p in (tmp_path / "shard").iterdir()) == [fsutil.COMPLETE, "config.json", "weights.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["shard"]


def test_an_update_keeps_the_folder_itself_and_moves_the_last_entry_last(tmp_path):
    final = tmp_path / "tiny"  # stands for a mount point: the folder must stay, only its entries change
    final.mkdir()
    (final / "config.json").write_text("old")
    (final / "kept.txt").write_text("not ours")
    inode = final.stat().st_ino

    def fill(staging):
        (staging / "config.json").write_text("new")
        (staging / "model.safetensors").write_bytes(b"\0" * 4096)

    assert fsutil.publish_dir(final, fill, if_exists="update", last="config.json")
    assert final.stat().st_ino == inode
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "kept.txt", "model.safetensors"]
    assert (final / "config.json").read_text() == "new"
    assert (final / "config.json").stat().st_ctime_ns >= (final / "model.safetensors").stat().st_ctime_ns

    def fails(staging):
        (staging / "config.json").write_text("newer")
        raise OSError(30, "Read-only file system")

    with pytest.raises(OSError):
        fsutil.publish_dir(final, fails, if_exists="update", last="config.json")
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "kept.txt", "model.safetensors"]
    assert (final / "config.json").read_text() == "new"


def _failure(write) -> Exception:
    try:
        write()
    except Exception as exc:
        return exc
    raise AssertionError("the write succeeded")


def test_a_safetensors_save_into_a_full_volume_is_one_line_with_the_free_space(mount):
    import torch
    from safetensors.torch import save_file

    volume = mount("size=256k")
    exc = _failure(lambda: save_file({"w": torch.zeros(1 << 18)}, str(volume / "model.safetensors")))
    assert not isinstance(exc, OSError)  # SafetensorError: recognised by the "(os error 28)" it carries
    error = fsutil.storage_error(exc, volume, "checkpoint-2", after="the previous checkpoint is intact")
    assert error is not None and error.code == 4
    assert error.problems == [f"cannot write checkpoint-2 to {volume} (No space left on device, "
                              f"{fsutil.free_space(volume)} free); free space on that volume (or give it more), "
                              "then rerun: the previous checkpoint is intact"]


def test_a_plot_saved_to_a_read_only_volume_says_to_mount_it_read_write(mount):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    volume = mount("ro,size=64k")
    figure = pyplot.figure()
    exc = _failure(lambda: figure.savefig(volume / "loss.png"))
    pyplot.close(figure)
    error = fsutil.storage_error(exc, volume, "the loss plot")
    assert error is not None and "(Read-only file system); mount it read-write" in str(error)
    assert "free" not in str(error)  # free space does not help a read-only volume


def test_a_failure_that_is_not_the_volume_s_is_left_to_the_caller(tmp_path):
    assert fsutil.storage_error(FileNotFoundError(2, "No such file or directory"), tmp_path) is None
    assert fsutil.storage_error(RuntimeError("bug"), tmp_path) is None


def test_free_space_is_read_from_the_nearest_existing_folder(mount):
    volume = mount("size=64k")
    assert fsutil.free_space(volume / "not" / "yet") == "64.0 KiB"


def test_the_final_name_of_a_temporary_file_is_the_name_it_is_written_for(tmp_path):
    assert fsutil.final_name(fsutil.temp_sibling(tmp_path / "metrics.json")) == "metrics.json"
    assert fsutil.final_name(tmp_path / "loss.png") == "loss.png"


def test_a_fault_with_no_path_names_the_volumes_a_run_writes():
    error = fsutil.storage_error(OSError(28, "No space left on device"), None)
    assert str(error) == ("cannot write a file to the output, checkpoint or cache volume (No space left on device); "
                          "free space on that volume (or give it more), then rerun.")
