"""--checkpoint-to: checkpoints that outlive the node, mirrored to s3://bucket/prefix or gs://bucket/prefix.

    prefix/checkpoint-<step>/...          every file of the local checkpoint, its completion marker uploaded last
    prefix/.finetune-lease.json           the writer's lease (one run per prefix)
    prefix/previous-run/checkpoint-<step> a replaced run's checkpoints (--no-resume, --overwrite)

A remote checkpoint counts only with its marker, so an upload cut anywhere (SIGKILL, a store outage) is never taken
for complete; a re-upload removes the old marker first. An older remote checkpoint is deleted only after a newer
one is complete, keeping --save-total-limit of them. Uploads run in a background thread (`Uploader`): training
waits only when the previous upload still runs at the next save, and says so. On start, when --checkpoint-dir has
nothing as new as the newest complete remote checkpoint, that one is downloaded (into a staging folder renamed
into place) and the run resumes from it as from a local one.

The lease is an object created only if absent (S3 `If-None-Match: *`) and renewed every HEARTBEAT_SECONDS only if
it is still the version this run wrote (S3 `If-Match` on its ETag): both are decided by the store, so they hold
across nodes. Its age is the store's clock (its LastModified against an object this run has just written).
A lease whose holder is known dead (same host and PID namespace, process gone), released, or not renewed for
STALE_SECONDS is taken over with the same `If-Match`; a live one is refused with exit BUSY. gcsfs takes no
If-Match on writes: on gs:// creation is conditional, renewal is not, and a run that finds another's token in
the lease at its next beat stops (Busy) before its next upload.

Store failures are retried with backoff (export.retrying); a transient one that outlasts the retries is
StoreUnavailable (exit 12, STORE: rerun to resume), a permanent one (denied, no bucket) is OutputError (exit 4).
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from entrypoint import logs
from entrypoint.config.destinations import parse
from entrypoint.errors import Busy, FinetuneError, OutputError, Preempted, StoreUnavailable
from entrypoint.publish.export import ATTEMPTS, BACKOFF, FsStore, retrying
from entrypoint.publish.lease import holder_alive_here, holder_dead, holder_text, this_process

log = logs.area("remote")
OPTION = "--checkpoint-to"
LEASE = ".finetune-lease.json"
SET_ASIDE = "previous-run"
NAME = re.compile(r"^checkpoint-(\d+)$")
# Renewed every 10 s; 60 s without a renewal means the holder is gone (a node that vanished with its pod). Longer
# than the local lease's 30 s: each renewal is a request to a store that may be slow or throttling for a while.
HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 60.0
_POLL_SECONDS = 1.0


class RemoteCheckpoints:
    """The checkpoint store at `url`: `marker` is the file whose presence makes a checkpoint complete, `keep` how
    many complete ones stay (--save-total-limit). As a context manager it holds the prefix's lease."""

    def __init__(self, url: str, marker: str, keep: int, stop=None, *, attempts: int = ATTEMPTS,
                 backoff: float = BACKOFF):
        self.dest = parse(url, OPTION)
        self.store = FsStore(self.dest)
        self.marker, self.keep = marker, keep
        self.attempts, self.backoff = attempts, backoff
        self.lease = RemoteLease(self, stop)
        self.uploads = Uploader(self)

    def __enter__(self) -> RemoteCheckpoints:
        self.lease.acquire()
        return self

    def __exit__(self, *exc) -> None:
        if self.uploads.busy():
            return  # an upload still writes: the lease stays until it goes stale (or this process is seen dead)
        self.lease.release()

    def call(self, what: str, action: Callable[[], object]):
        """action() against the store, retried; StoreUnavailable (transient) or OutputError (permanent) after."""
        def failed(attempt: int, reason: str, exc: Exception) -> FinetuneError:
            error = OutputError if self.store.permanent(exc) else StoreUnavailable
            return error(f"{OPTION} {self.dest}: {what} failed after {attempt} attempt(s) ({reason}); "
                         f"{self.store.fix(exc)}, then rerun the same command: it resumes from the newest "
                         "complete checkpoint.")
        return retrying(self.store, what, action, failed, self.attempts, self.backoff)

    # What the store holds.

    def steps(self) -> dict[int, bool]:
        """Every remote checkpoint's step -> whether it is complete (has its marker)."""
        found: dict[int, bool] = {}
        for relative in self.call("listing the checkpoints", self.store.listing):
            top, _, rest = relative.partition("/")
            if match := NAME.match(top):
                step = int(match[1])
                found[step] = found.get(step, False) or rest == self.marker
        return found

    def newest(self) -> int | None:
        complete = [step for step, done in self.steps().items() if done]
        return max(complete, default=None)

    # Download.

    def restore(self, directory: Path, local_step: int | None) -> Path | None:
        """Download the newest complete remote checkpoint into `directory` unless `local_step` (the newest complete
        local one) is as new. Returns the downloaded checkpoint, or None."""
        newest = self.uploads.newest = self.newest()
        if newest is None:
            log.info(f"{self.dest} holds no complete checkpoint yet")
            return None
        if local_step is not None and local_step >= newest:
            log.info(f"{directory}/checkpoint-{local_step} is as new as {self.dest}/checkpoint-{newest}: resuming "
                     "from the local one")
            return None
        started = time.monotonic()
        path, size = self.download(newest, directory)
        seconds = time.monotonic() - started
        log.info(f"downloaded checkpoint-{newest} ({size / 1e6:.1f} MB) from {self.dest} in {seconds:.1f} s",
                 checkpoint=str(path), download_bytes=size, download_seconds=seconds)
        return path

    def download(self, step: int, directory: Path) -> tuple[Path, int]:
        """checkpoint-<step> into `directory`, through a staging folder renamed into place, marker last."""
        name = f"checkpoint-{step}"
        files = {r.split("/", 1)[1]: size for r, size in self.call("listing " + name, self.store.listing).items()
                 if r.startswith(name + "/")}
        directory.mkdir(parents=True, exist_ok=True)
        staging = directory / f".download-{name}-{uuid.uuid4().hex[:8]}"
        target = directory / name
        try:
            for relative in sorted(files, key=lambda r: (r == self.marker, r)):
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                self.call(f"downloading {name}/{relative}",
                          lambda r=relative: self.store.get(f"{name}/{r}", staging / r))
            if (target / self.marker).is_file():  # another node sharing this volume got there first
                return target, sum(files.values())
            shutil.rmtree(target, ignore_errors=True)  # a torn local copy without its marker
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target, sum(files.values())

    # Upload, retention, set aside.

    def upload(self, checkpoint: Path) -> tuple[float, int]:
        """Every file of a complete local checkpoint, its marker last, then retention. (seconds, bytes)."""
        started, name = time.monotonic(), checkpoint.name
        files = sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*")
                       if p.is_file() and p.name != self.marker)
        self.call(f"removing {name}/{self.marker}", lambda: self.store.remove(f"{name}/{self.marker}"))
        for relative in files:
            self.call(f"uploading {name}/{relative}", lambda r=relative: self.store.put(checkpoint / r, f"{name}/{r}"))
        self.call(f"uploading {name}/{self.marker}",
                  lambda: self.store.put(checkpoint / self.marker, f"{name}/{self.marker}"))
        self.retain()
        return time.monotonic() - started, sum((checkpoint / r).stat().st_size for r in files)

    def retain(self) -> None:
        """Keep the newest `keep` complete checkpoints; delete older ones and torn uploads older than the newest."""
        steps = self.steps()
        complete = sorted(step for step, done in steps.items() if done)
        if not complete:
            return
        kept = set(complete[-self.keep:])
        for step, done in sorted(steps.items()):
            if step in kept or (not done and step > complete[-1]):
                continue
            name = f"checkpoint-{step}"
            self.call(f"removing {name}/{self.marker}", lambda n=name: self.store.remove(f"{n}/{self.marker}"))
            self.call(f"removing {name}", lambda n=name: self.store.remove_tree(n))
            log.info(f"removed {self.dest}/{name} (--save-total-limit {self.keep})", removed=name)

    def set_aside(self) -> None:
        """A fresh start: move the replaced run's checkpoints to prefix/previous-run/ (replacing what is there),
        so neither a resume nor retention takes them for this run's."""
        steps = self.steps()
        if not steps:
            return
        self.call(f"clearing {SET_ASIDE}/", lambda: self.store.remove_tree(SET_ASIDE))
        for step in sorted(steps):
            name = f"checkpoint-{step}"
            # the marker first: a checkpoint half moved is not complete where it was
            self.call(f"moving {name}", lambda n=name: self.store.move_tree(n, f"{SET_ASIDE}/{n}", self.marker))
        log.info(f"moved {len(steps)} checkpoint(s) of the previous run to {self.dest}/{SET_ASIDE}/",
                 set_aside=f"{self.dest}/{SET_ASIDE}")


class Uploader:
    """Uploads one checkpoint at a time in a background thread. `wait` before a save, `submit` after it."""

    def __init__(self, remote: RemoteCheckpoints):
        self.remote = remote
        self.thread: threading.Thread | None = None
        self.current: str | None = None
        self.failure: BaseException | None = None
        self.newest: int | None = None  # the newest complete remote checkpoint's step, as far as this run knows
        self.stalls: list[float] = []  # seconds training waited at each save, for the figures

    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def wait(self, before: str) -> float:
        """Block until the upload in flight ends (logging that training waits). Returns the seconds waited."""
        if not self.busy():
            return 0.0
        log.info(f"waiting for the upload of {self.current} to {self.remote.dest} before {before}")
        started = time.monotonic()
        self.thread.join()
        waited = time.monotonic() - started
        self.stalls.append(waited)
        log.info(f"waited {waited:.1f} s for the upload of {self.current}", upload_wait_seconds=waited,
                 upload_wait_before=before)
        return waited

    def check(self) -> None:
        """Raise what ended the last upload (StoreUnavailable, OutputError), or Busy when the lease was lost."""
        if self.remote.lease.lost:
            raise Busy(self.remote.lease.lost)
        if self.failure is not None:
            raise self.failure

    def submit(self, checkpoint: Path) -> None:
        """Start uploading a complete local checkpoint (after any upload in flight)."""
        self.wait(f"uploading {checkpoint.name}")
        self.check()
        self.current = checkpoint.name
        self.thread = threading.Thread(target=self._upload, args=(checkpoint,), name="checkpoint-upload", daemon=True)
        self.thread.start()

    def ensure(self, checkpoint: Path) -> None:
        """Upload a local checkpoint the store lacks (the run resumes from one a store outage kept local)."""
        steps = self.remote.steps()
        self.newest = max((step for step, done in steps.items() if done), default=None)
        if not steps.get(_step(checkpoint)):
            self.submit(checkpoint)

    def finish(self) -> None:
        """Before publishing: the last upload done, or its failure raised. A signal that arrived meanwhile (the run's
        stop request, which the lease holds) ends the run here with Preempted, naming where a new node resumes: the
        newest checkpoint whose upload completed, the final one when its upload finished in time."""
        self.wait("publishing")
        stop = self.remote.lease.stop
        if stop is not None and stop.requested:
            where = self.resume_point()
            log.info(f"stopped before publishing; a run on a new node resumes from {where}", resume_from=where)
            raise Preempted(f"stopped by {stop.signal_name} after the last step, before publishing; a run on a new "
                            f"node resumes from {where}; rerun the same command to resume and publish.")
        self.check()

    def resume_point(self) -> str:
        """Where a run on a new node resumes: the newest checkpoint this run knows complete in the store."""
        if self.newest is None:
            return "the start (no complete remote checkpoint yet)"
        return f"{self.remote.dest}/checkpoint-{self.newest}"

    def finish_on_stop(self, checkpoint: Path) -> str:
        """After the final save on a signal: upload it (if the grace period allows) and say where a later run
        resumes. Returns that sentence."""
        before = self.newest if self.newest != _step(checkpoint) else None
        previous = f"{self.remote.dest}/checkpoint-{before}" if before is not None else "the start (no complete " \
                   "remote checkpoint yet)"
        log.info(f"uploading {checkpoint.name}; until its marker is written a run on a new node resumes from "
                 f"{previous}")
        self.wait("exiting")
        if self.failure is None and not self.remote.lease.lost and self.current == checkpoint.name:
            return f"it is also at {self.remote.dest}/{checkpoint.name}, where a run on a new node resumes"
        return f"its upload failed, so a run on a new node resumes from {previous}"

    def _upload(self, checkpoint: Path) -> None:
        try:
            seconds, size = self.remote.upload(checkpoint)
            self.newest = max(self.newest or 0, _step(checkpoint))
            log.info(f"uploaded {checkpoint.name} ({size / 1e6:.1f} MB) to {self.remote.dest} in {seconds:.1f} s",
                     checkpoint=checkpoint.name, upload_seconds=seconds, upload_bytes=size)
        except FinetuneError as exc:
            self.failure = exc
            log.error(str(exc))
        except Exception as exc:  # a bug: carried to the main thread, raised there with its traceback
            self.failure = exc


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


class RemoteLease:
    """One writer per prefix (the module's docstring says how). `lost` is set when another run took it over."""

    def __init__(self, remote: RemoteCheckpoints, stop=None, *, heartbeat: float = HEARTBEAT_SECONDS,
                 stale: float = STALE_SECONDS):
        self.remote, self.stop = remote, stop
        self.heartbeat, self.stale = heartbeat, stale
        self.me = this_process()
        self.etag: str | None = None
        self.lost: str | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        body, where = json.dumps(self.me).encode(), f"{OPTION} {self.remote.dest}"
        store, call = self.remote.store, self.remote.call
        watched, announced = None, False
        while self.etag is None:
            if self.stop is not None:
                self.stop.raise_if_requested(f"while waiting for the lease on {self.remote.dest}")
            self.etag = call("creating the lease", lambda: store.create(LEASE, body))
            if self.etag is not None or (found := call("reading the lease", lambda: store.stat(LEASE))) is None:
                continue
            raw, tag, modified = found
            holder = _holder(raw)
            age = self._now() - modified
            gone = "it was released" if holder and holder.get("released") else holder_dead(self.me, holder)
            if gone or age > self.stale:
                self.etag = call("taking the lease over", lambda t=tag: store.replace(LEASE, body, t))
                if self.etag and not (holder and holder.get("released")):
                    log.warning(f"took over {self.remote.dest} from {holder_text(holder)}: "
                                f"{gone or f'its heartbeat stopped {age:.0f} s ago'}")
                continue
            busy = f"{where} is in use by {holder_text(holder)}"
            if holder_alive_here(self.me, holder) or (watched is not None and watched != tag):
                raise Busy(f"{busy} (heartbeat {max(age, 0):.0f} s ago); wait for it to end or stop it, or use "
                           f"another {OPTION}.")
            watched = watched or tag
            if not announced:
                log.warning(f"{busy}; unless its heartbeat moves it is taken over in {self.stale - age:.0f} s")
                announced = True
            time.sleep(_POLL_SECONDS)
        self._thread = threading.Thread(target=self._beat, name="remote-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        if self.etag and not self.lost:
            try:
                self.remote.store.replace(LEASE, json.dumps({**self.me, "released": True}).encode(), self.etag)
            except Exception as exc:  # the lease then goes stale instead; nothing else depends on it
                log.warning(f"could not release the lease on {self.remote.dest} ({type(exc).__name__}); it expires "
                            f"in {self.stale:.0f} s")
        self.etag = None

    def _now(self) -> float:
        """The store's idea of now: write an object and read its modification time back."""
        probe, store = f".finetune-clock-{self.me['token']}", self.remote.store
        self.remote.call("reading the store's clock", lambda: store.write(probe, b"clock\n"))
        found = self.remote.call("reading the store's clock", lambda: store.stat(probe))
        self.remote.call("reading the store's clock", lambda: store.remove(probe))
        return found[2] if found else time.time()

    def _beat(self) -> None:
        body, store = json.dumps(self.me).encode(), self.remote.store
        while not self._done.wait(self.heartbeat):
            try:
                tag = store.replace(LEASE, body, self.etag)
                if tag is None or self.remote.dest.scheme != "s3":
                    found = store.stat(LEASE)
                    holder = _holder(found[0]) if found else None
                    if not holder or holder.get("token") != self.me["token"]:
                        self.lost = (f"{OPTION} {self.remote.dest} was taken over by {holder_text(holder)} after "
                                     f"this run's lease went {self.stale:.0f} s without renewal; the other run now "
                                     "writes there, so this one stops uploading.")
                        log.error(self.lost)
                        return
                    tag = found[1]  # our own renewal, whose answer was lost on the way back
                self.etag = tag
            except Exception as exc:  # a store outage: the uploads report it; the lease just tries again
                log.warning(f"cannot renew the lease on {self.remote.dest} ({type(exc).__name__}); retrying in "
                            f"{self.heartbeat:.0f} s")


def _holder(raw: bytes) -> dict | None:
    try:
        holder = json.loads(raw)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None
