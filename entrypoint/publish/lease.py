"""One writer per output directory: a lease file with a heartbeat, for filesystems where flock is not
honoured (NFS, many CSI drivers, Cloud Storage FUSE).

The lease is `.finetune-lease.json` in each directory a run writes (output and checkpoints). It names the
holder (host, pid, start time) and is created atomically (a hard link, or O_EXCL where links are not
supported). While the run lives, a thread touches it every HEARTBEAT_SECONDS; its modification time is the
heartbeat. Ages are measured against a file this run has just touched on the same filesystem, so the clock
that matters is the file server's, not two hosts' that may disagree.

A lease is taken over only when its holder is known dead (same host and PID namespace, and that process is
gone) or when its heartbeat is older than STALE_SECONDS. A run that finds a lease whose heartbeat moves is
refused at once (exit BUSY); one whose heartbeat has stopped is waited for until it goes stale, then taken.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from entrypoint import logs
from entrypoint.errors import Busy, OutputError

log = logs.area("lease")
LEASE = ".finetune-lease.json"
# A live holder touches its lease every 5 s. 30 s without a touch (six missed beats: an NFS server failover or
# a long stall of the whole process) means it is gone. This bounds how long a SIGKILLed run (OOM kill, or the
# grace period running out) keeps its own retry waiting: the heartbeat continues through the grace period
# while the run saves, and stops only with the process, so a retry waits at most 30 s after the kill.
HEARTBEAT_SECONDS = 5.0
STALE_SECONDS = 30.0
_POLL_SECONDS = 0.25


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, which tells a live PID from a reused one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name before ")" may contain spaces


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")  # two containers on one host share a hostname only by choice
    except OSError:
        return None


def this_process() -> dict:
    """Who holds a lease: host, PID (with its namespace and start time, which tell a live PID from a reused one),
    start time and a random token."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": _pid_namespace(),
            "process_start": _process_start(os.getpid()),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "token": uuid.uuid4().hex}


def _same_machine(me: dict, holder: dict | None) -> bool:
    return bool(holder and holder.get("host") == me["host"] and me["pid_namespace"]
                and holder.get("pid_namespace") == me["pid_namespace"])


def holder_dead(me: dict, holder: dict | None) -> str | None:
    """Why the holder is certainly gone, or None: only a process on this host can be checked."""
    if not _same_machine(me, holder):
        return None
    pid, start = holder.get("pid"), holder.get("process_start")
    if (pid, start) == (me["pid"], me["process_start"]):
        return "an earlier run in this same process left it"
    if not isinstance(pid, int) or _process_start(pid) != start:
        return f"process {pid} on this host is gone"
    return None


def holder_alive_here(me: dict, holder: dict | None) -> bool:
    """The holder is a live process on this host (so its lease is certainly not stale)."""
    return _same_machine(me, holder) and holder_dead(me, holder) is None


def holder_text(holder: dict | None) -> str:
    if not holder:
        return "a run whose lease file is unreadable"
    return f"the run on host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('started')}"


def _read(path: Path) -> tuple[dict | None, bytes, int] | None:
    """(parsed holder, raw bytes, mtime in ns), or None when there is no lease."""
    try:
        raw = path.read_bytes()
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(raw)
    except ValueError:
        holder = None  # being written by an O_EXCL creator, or damaged
    return (holder if isinstance(holder, dict) else None), raw, mtime


class Lease:
    """Exclusive use of some directories for this process's lifetime: `acquire()`, then `release()`."""

    def __init__(self, directories: dict[str, Path], stop=None):
        """`directories` maps a label for messages (e.g. "--output-dir") to a directory; `stop` is the
        StopRequest, so a signal while waiting for a stale lease ends the wait."""
        unique: dict[Path, str] = {}
        for label, directory in directories.items():
            unique.setdefault(Path(directory).resolve(), label)
        self.directories = unique
        self.stop = stop
        self.me = this_process()
        self.held: list[Path] = []
        self.lost: str | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> Lease:
        try:
            for directory, label in self.directories.items():
                self._take(directory, label)
        except BaseException:
            self.release()
            raise
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._done.set()
        for path in self.held:
            found = _read(path)
            if found and found[0] and found[0].get("token") == self.me["token"]:
                with contextlib.suppress(OSError):
                    path.unlink()
        self.held = []

    def check(self) -> None:
        """Raise BUSY if another run took a lease over from this one (this run stalled past STALE_SECONDS)."""
        if self.lost:
            raise Busy(self.lost)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # Taking a lease.

    def _take(self, directory: Path, label: str) -> None:
        path = directory / LEASE
        mine = directory / f"{LEASE}.{self.me['token']}"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            mine.write_text(json.dumps(self.me) + "\n")
        except OSError as exc:
            raise OutputError(f"{label} {directory} is not writable ({exc.strerror or exc}); mount it read-write "
                              f"or choose another {label}.") from None
        try:
            self._take_path(path, mine, label)
        finally:
            with contextlib.suppress(OSError):
                mine.unlink()

    def _take_path(self, path: Path, mine: Path, label: str) -> None:
        watched: tuple[bytes, int] | None = None
        announced = False
        while True:
            if self.stop is not None:
                self.stop.raise_if_requested(f"while waiting for the lease on {path.parent}")
            if self._create(path, mine):
                self.held.append(path)
                return
            found = _read(path)
            if found is None:
                continue  # released between our attempt and our look: try again
            holder, raw, mtime = found
            age = self._now(mine) - mtime / 1e9
            dead = holder_dead(self.me, holder)
            if dead or age > STALE_SECONDS:
                reason = dead or f"its heartbeat stopped {age:.0f} s ago"
                if self._bury(path, raw):
                    log.warning(f"took over {path.parent} from {holder_text(holder)}: {reason}")
                continue
            busy = f"{label} {path.parent} is in use by {holder_text(holder)}"
            if holder_alive_here(self.me, holder) or (watched is not None and watched != (raw, mtime)):
                raise Busy(f"{busy} (heartbeat {max(age, 0):.0f} s ago); wait for it to end or stop it, or use "
                           f"another {label}.")
            watched = watched or (raw, mtime)
            if not announced and age > 1.5 * HEARTBEAT_SECONDS:
                log.warning(f"{busy}; its heartbeat stopped {age:.0f} s ago, so it is taken over in "
                            f"{STALE_SECONDS - age:.0f} s unless it resumes")
                announced = True
            time.sleep(_POLL_SECONDS)

    @staticmethod
    def _create(path: Path, mine: Path) -> bool:
        """Atomically create `path` with our content: a hard link (atomic on NFS too), else O_EXCL."""
        try:
            os.link(mine, path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
                raise OutputError(f"cannot create the lease {path} ({exc.strerror or exc}); check the volume.") \
                    from None
        try:  # filesystems without hard links (some FUSE and object-store CSI drivers)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(mine.read_bytes())
        return True

    @staticmethod
    def _now(probe: Path) -> float:
        """The filesystem's idea of now: touch a file of ours and read its modification time back."""
        os.utime(probe)
        return probe.stat().st_mtime

    def _bury(self, path: Path, judged: bytes) -> bool:
        """Move a dead holder's lease aside; if what moved is not the lease judged dead (another run took it
        over in the meantime), put it back. True when the judged lease is gone."""
        grave = path.with_name(f"{LEASE}.stale-{self.me['token']}")
        try:
            os.rename(path, grave)
        except FileNotFoundError:
            return False
        try:
            if grave.read_bytes() != judged:
                with contextlib.suppress(FileExistsError):
                    os.link(grave, path)
                return False
            return True
        finally:
            with contextlib.suppress(OSError):
                grave.unlink()

    # Keeping it.

    def _beat(self) -> None:
        while not self._done.wait(HEARTBEAT_SECONDS):
            for path in list(self.held):
                found = _read(path)
                holder = found[0] if found else None
                if not holder or holder.get("token") != self.me["token"]:
                    self.lost = (f"{path.parent} was taken over by {holder_text(holder)} after this run's "
                                 f"heartbeat stalled over {STALE_SECONDS:.0f} s; the other run now owns it, so "
                                 "this one stops without publishing.")
                    log.error(self.lost)
                    self.held.remove(path)
                    continue
                try:
                    os.utime(path)
                except OSError as exc:
                    log.warning(f"cannot refresh {path} ({exc}); retrying in {HEARTBEAT_SECONDS:.0f} s")


def held_by_another(directory: Path) -> bool:
    """True when a lease file in `directory` names a process other than this one (the CLI then leaves the
    directory's status.json to its owner)."""
    try:
        found = _read(Path(directory) / LEASE)
    except OSError:  # the directory is what failed (not a directory, unreadable): nobody can hold it
        return False
    if found is None:
        return False
    holder = found[0] or {}
    return (holder.get("host"), holder.get("pid")) != (socket.gethostname(), os.getpid())
