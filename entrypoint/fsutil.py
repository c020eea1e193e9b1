"""How every module writes files so that readers never see half of one: atomic writes, fsync, the write probe and
completion markers, each in one place.

Temporary names carry the host and the process id (`.{name}.tmp-{host}-{pid}`): several nodes may write to one
shared volume at once (the data cache, an output directory on NFS), and a name built from the PID alone can be the
same on two of them.

    write_atomic(path, content)      readers see the old file or the new one; 0644; optionally flushed
    fsync_file / fsync_dir / fsync_tree
    write_problem(directory)         why a small flushed write there fails, or None
    storage_error(exc, path, what)   a full, failing or read-only volume behind `exc` as one OutputError line
    write_marker(path, text)         flush the folder's files, then write the marker; its presence implies the rest
    read_marker(path)                the marker's JSON, or None
    publish_dir(final, fill)         a whole folder: staged privately, flushed, COMPLETE last, renamed into place
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from entrypoint.errors import OutputError, storage_errno

COMPLETE = "COMPLETE"  # the completion marker's name: written last, so a folder that holds it is whole


def writer_tag() -> str:
    """`host-pid`: names a file or folder private to this process among all nodes sharing a volume."""
    return f"{socket.gethostname()}-{os.getpid()}"


def temp_sibling(path: Path) -> Path:
    """Where to write `path` before it is renamed into place: hidden, beside it (a rename within one filesystem is
    atomic), private to this process."""
    return path.with_name(f".{path.name}.tmp-{writer_tag()}")


def is_temporary(path: Path) -> bool:
    """Whether `path` is named as `temp_sibling` names things: a file or staging folder being written, or one a
    killed writer left."""
    return path.name.startswith(".") and ".tmp-" in path.name


def final_name(path: Path) -> str:
    """The name `path` is written for: `metrics.json` for its temporary `.metrics.json.tmp-host-pid`."""
    return path.name[1:].rsplit(".tmp-", 1)[0] if is_temporary(path) else path.name


def commit(temp: Path, path: Path, *, sync: bool = False) -> None:
    """Move a finished temporary file over `path`, readable by every user (0644). With `sync` the file is on disk
    before the rename, and the rename is on disk when this returns."""
    if sync:
        fsync_file(temp)
    temp.chmod(0o644)
    temp.replace(path)
    if sync:
        fsync_dir(path.parent)


def write_atomic(path: Path, content: str | bytes | Callable[[Path], None], *, sync: bool = False) -> None:
    """Replace `path` by `content`: text, bytes, or a function that writes the file it is given (a figure's
    savefig). Readers see the old file or the new one, never part of either; a failure removes the temporary file
    and raises the OSError."""
    temp = temp_sibling(path)
    try:
        if callable(content):
            content(temp)
        elif isinstance(content, bytes):
            temp.write_bytes(content)
        else:
            temp.write_text(content)
        commit(temp, path, sync=sync)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
        raise


def fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def fsync_dir(directory: Path) -> None:
    """Flush a folder's entries (files created, renamed or removed in it)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root`, and `root` itself."""
    for path in root.rglob("*"):
        if path.is_file():
            fsync_file(path)
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(root)


def write_problem(directory: Path, nbytes: int = 1 << 16) -> str | None:
    """Why `directory` cannot take a write of `nbytes` (flushed to disk), in the system's words ("No space left on
    device", "Read-only file system"), or None when it can. The probe file is removed either way.

    Really writing is the only reliable test: permission bits do not show a read-only mount or a full disk, and
    some errors (a full disk behind delayed allocation, EIO) appear only when the data is flushed."""
    probe = directory / f".write-test-{writer_tag()}"
    try:
        with probe.open("wb") as f:
            f.write(b"\0" * nbytes)
            f.flush()
            os.fsync(f.fileno())
        return None
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


# The fix for each storage errno, after "cannot write X to PATH (reason)".
_FIXES = {
    errno.ENOSPC: "free space on that volume (or give it more), then rerun",
    errno.EDQUOT: "free space or raise the quota on that volume, then rerun",
    errno.EROFS: "mount it read-write, then rerun",
    errno.EIO: "the volume failed a write (I/O error): check or replace it, then rerun",
}


def storage_error(exc: BaseException, path: Path | str | None, what: str = "a file",
                  after: str = "") -> OutputError | None:
    """`exc` as one line naming `what` could not be written to `path`, the volume's free space and the fix, when
    it comes from a full, read-only or failing volume (errors.storage_errno: any library's exception that
    carries the errno); None for anything else, which stays a bug. `after` ends the line (what is still intact).
    Without a `path` (a library that did not say where) the line names the volumes a run writes."""
    code = storage_errno(exc)
    if code is None:
        return None
    free = free_space(Path(path)) if path is not None else None
    room = f", {free} free" if free is not None and code in (errno.ENOSPC, errno.EDQUOT) else ""
    where = f"to {path}" if path is not None else "to the output, checkpoint or cache volume"
    return OutputError(f"cannot write {what} {where} ({os.strerror(code)}{room}); {_FIXES[code]}"
                       + (f": {after}" if after else "."))


def free_space(path: Path) -> str | None:
    """What the volume holding `path` (or its nearest existing parent) has free, as "12.0 KiB", or None."""
    for candidate in (path, *path.parents):
        try:
            free = shutil.disk_usage(candidate).free
        except OSError:
            continue
        for unit in ("bytes", "KiB", "MiB", "GiB"):
            if free < 1024 or unit == "GiB":
                return f"{free} {unit}" if unit == "bytes" else f"{free:.1f} {unit}"
            free /= 1024
    return None


def write_marker(path: Path, text: str = "", *, sync: bool = True) -> None:
    """Write the completion marker `path` after everything else in its folder: with `sync`, every file and folder
    there is flushed first and the marker itself after, so after a crash the marker's presence still implies
    the rest. The marker appears atomically, whole or not at all."""
    if sync:
        fsync_tree(path.parent)
    write_atomic(path, text, sync=sync)


def read_marker(path: Path) -> Any:
    """The marker's JSON content, or None when it is missing, unreadable or not JSON (an empty marker too:
    test its presence with `is_file`)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def publish_dir(final: Path, fill: Callable[[Path], str | None], *,
                if_exists: Literal["replace", "keep", "update"] = "replace",
                last: str = COMPLETE, sync: bool = True,
                guard: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> bool:
    """Make the folder `final` appear whole or not at all. `fill(staging)` writes the files into an empty folder
    private to this process among all nodes (named like `temp_sibling`, on the same filesystem) and returns the
    text of the folder's COMPLETE marker, or None for a folder without one. With `sync` every file is flushed
    before the marker is written and the rename is flushed when this returns.

    When `final` exists already, `if_exists` decides:
        replace  the old folder is renamed aside, the new one into its place, then the old one removed
        keep     the folder there stays and this one is dropped: a racing writer published the same content;
                 returns False
        update   `final` itself stays (it may be a mount point, which cannot be renamed): the folder is staged
                 inside it and its entries moved over the old ones, `last` last (a reader may see old and new
                 entries side by side until then)
    `replace` and `update` expect one writer per folder, so they first remove the staging folders a killed writer
    left; `keep` expects several, and leaves them (another writer's may be live).

    A failure removes the staging folder, leaves `final` as it was (for `update`, until the moves begin) and
    raises. Creating, filling, flushing and marking run inside `guard()` (a context where a signal may raise); the
    renames run outside it, never cut short."""
    inside = if_exists == "update" and final.is_dir()
    staging = temp_sibling(final / final.name if inside else final)
    # A folder of this very name is a dead process's: a container restarted in place keeps its host name and PID.
    shutil.rmtree(staging, ignore_errors=True)
    if if_exists != "keep" and staging.parent.is_dir():  # one writer per folder: other staging folders are dead
        for leftover in staging.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    try:
        with guard():
            staging.mkdir(parents=True)
            marker = fill(staging)
            if marker is not None:
                write_marker(staging / COMPLETE, marker, sync=sync)
            elif sync:
                fsync_tree(staging)
        placed = _move_entries(staging, final, last) if inside else _rename(staging, final, if_exists)
        if sync:
            fsync_dir(final if inside else final.parent)
        return placed
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _rename(staging: Path, final: Path, if_exists: str) -> bool:
    """Rename the finished `staging` to `final`, doing with a folder already there what `if_exists` says."""
    if if_exists == "keep":
        try:
            staging.rename(final)  # atomic, and refused (ENOTEMPTY) when another writer's folder is there
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(staging, ignore_errors=True)
            return False
        return True
    if not final.exists():
        staging.rename(final)
        return True
    retired = final.with_name(f".{final.name}.old-{writer_tag()}")
    shutil.rmtree(retired, ignore_errors=True)  # a dead process's, as for the staging folder
    final.rename(retired)
    try:
        staging.rename(final)
    except BaseException:
        retired.rename(final)  # the old folder goes back: a failed publish changes nothing
        raise
    shutil.rmtree(retired, ignore_errors=True)
    return True


def _move_entries(staging: Path, final: Path, last: str) -> bool:
    for path in sorted(staging.iterdir(), key=lambda p: p.name == last):
        path.replace(final / path.name)
    staging.rmdir()
    return True
