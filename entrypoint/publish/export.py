"""--export-to: copy the published model to object storage or the Hugging Face Hub, after `model/COMPLETE`.

    s3://bucket/prefix    S3 or any S3-protocol store (MinIO, R2, Ceph): s3fs, credentials and endpoint from
                          botocore's environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, IRSA / pod identity)
    gs://bucket/prefix    Google Cloud Storage: gcsfs (pip install gcsfs), credentials from Application Default
                          Credentials (Workload Identity, GOOGLE_APPLICATION_CREDENTIALS)
    hf://namespace/repo   a Hugging Face Hub model repository: huggingface_hub, token from HF_TOKEN

Every file of model/ goes first, the COMPLETE marker last, so a reader that waits for COMPLETE never sees half a
model; a COMPLETE already there is removed before anything is overwritten. A destination whose COMPLETE already
matches the local one is left as it is, so a rerun after a failed export uploads again without retraining, and a
rerun after a successful one does nothing. Transient failures are retried with exponential backoff; what is left
after that is ExportError (exit 10, EXPORT). Credentials are never logged nor accepted inside the URL.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

from entrypoint import logs
from entrypoint.config.destinations import SCHEMES, Destination, parse
from entrypoint.errors import ExportError, FinetuneError
from entrypoint.fsutil import COMPLETE
from entrypoint.publish.outputs import MODEL_DIR

log = logs.area("export")

ATTEMPTS = 5  # per file: the first try and 4 retries
BACKOFF = 1.0  # s before the first retry, doubled each time (1 + 2 + 4 + 8 = 15 s at most per file)


def export_published(output_dir: Path, url: str | None, retries: int = ATTEMPTS - 1) -> None:
    """The training job's hook: after the local publish (or on finding it already done), export it if asked,
    each transfer tried 1 + `retries` times."""
    if url:
        export(output_dir / MODEL_DIR, url, attempts=retries + 1)


def export(model_dir: Path, url: str, *, attempts: int = ATTEMPTS, backoff: float = BACKOFF) -> bool:
    """Upload model_dir (a published model/ with COMPLETE) to url. Returns False when the destination already
    held this very model. Raises ExportError."""
    dest = parse(url)
    marker = (model_dir / COMPLETE).read_bytes()
    files = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")
                   if p.is_file() and p.name != COMPLETE)
    store = HubStore(dest) if dest.scheme == "hf" else FsStore(dest)

    def retried(what: str, action: Callable[[], object]):
        def failed(attempt: int, reason: str, exc: Exception) -> ExportError:
            return ExportError(f"export to {dest} failed at {what} after {attempt} attempt(s) ({reason}); the model "
                               f"is published locally at {model_dir}; {store.fix(exc)} and rerun the same command "
                               "to export it without retraining.")
        return retrying(store, what, action, failed, attempts, backoff)

    if retried("reading COMPLETE", lambda: store.read(COMPLETE)) == marker:
        log.info(f"{dest} already holds this model (its COMPLETE matches); nothing to upload")
        return False
    retried("removing the old COMPLETE", lambda: store.remove(COMPLETE))
    started, total = time.monotonic(), 0
    for relative in files:
        retried(relative, lambda r=relative: store.put(model_dir / r, r))
        total += (model_dir / relative).stat().st_size
    retried(COMPLETE, lambda: store.write(COMPLETE, marker))
    seconds = time.monotonic() - started
    log.info(f"{len(files)} files ({total / 1e6:.1f} MB) and {COMPLETE} to {dest} in {seconds:.1f} s",
             export_to=str(dest), export_files=len(files), export_bytes=total, export_seconds=seconds)
    return True


def retrying(store, what: str, action: Callable[[], object], failed: Callable[[int, str, Exception], Exception],
             attempts: int = ATTEMPTS, backoff: float = BACKOFF):
    """action(), retried with exponential backoff while the store's failure may heal; then the exception
    `failed(attempts made, one-line reason, the last exception)` builds is raised."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as exc:  # each backend raises its own types; permanent() sorts them
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            if store.permanent(exc) or attempt == attempts:
                raise failed(attempt, reason, exc) from None
            delay = backoff * 2 ** (attempt - 1)
            log.info(f"{what} failed ({reason}); retry {attempt} of {attempts - 1} in {delay:.0f} s")
            time.sleep(delay)


def probe(url: str, option: str = "--export-to", error: type[FinetuneError] = ExportError) -> str:
    """doctor: prove the destination is reachable and writable (write and delete a small object). Returns a
    line describing it; raises `error` naming the fix."""
    dest = parse(url, option)
    store = HubStore(dest) if dest.scheme == "hf" else FsStore(dest)
    try:
        return store.probe()
    except Exception as exc:  # any backend failure is reported as one line
        raise error(f"{option} {dest} is not writable ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); {store.fix(exc)}.") from None


class FsStore:
    """s3:// and gs:// through fsspec. Each call opens a fresh filesystem object: fsspec caches instances, and a
    cached one may hold a connection pool that broke with the failure being retried."""

    def __init__(self, dest: Destination):
        self.dest = dest
        # aiohttp reports connections cut mid-request as "Task exception was never retrieved" tracebacks on the
        # asyncio logger; the failure itself reaches export() as an exception and is logged there, once.
        logs.quiet("asyncio")

    def fs(self):
        import fsspec

        if self.dest.scheme != "s3":
            return fsspec.filesystem(SCHEMES[self.dest.scheme][1], skip_instance_cache=True)
        # One retry layer, the one export() logs: botocore's own (standard mode, 2 attempts) stays for throttling,
        # s3fs's is switched off. Layered, they turned a dead endpoint into minutes of silent retries.
        fs = fsspec.filesystem("s3", skip_instance_cache=True,
                               config_kwargs={"retries": {"mode": "standard", "max_attempts": 2}})
        fs.retries = 1
        return fs

    def read(self, relative: str) -> bytes | None:
        try:
            return self.fs().cat_file(self.dest.key(relative))
        except FileNotFoundError:
            return None

    def remove(self, relative: str) -> None:
        fs = self.fs()
        if fs.exists(self.dest.key(relative)):
            fs.rm_file(self.dest.key(relative))

    def put(self, local: Path, relative: str) -> None:
        self.fs().put_file(str(local), self.dest.key(relative))

    def write(self, relative: str, data: bytes) -> None:
        self.fs().pipe_file(self.dest.key(relative), data)

    def get(self, relative: str, local: Path) -> None:
        self.fs().get_file(self.dest.key(relative), str(local))

    def listing(self) -> dict[str, int]:
        """Every object under the prefix: path relative to it -> size in bytes."""
        root = self.dest.key("")
        try:
            found = self.fs().find(root, detail=True)
        except FileNotFoundError:
            return {}
        return {name[len(root):].lstrip("/"): info.get("size", 0) for name, info in found.items()}

    def remove_tree(self, relative: str) -> None:
        """Every object under prefix/relative/ (nothing when there is none)."""
        fs = self.fs()
        keys = fs.find(self.dest.key(relative) + "/")
        if keys:
            fs.rm(keys)

    def move_tree(self, relative: str, to: str, first: str = "") -> None:
        """prefix/relative/ to prefix/to/ (server-side copies, then deletes), the object named `first` first."""
        fs = self.fs()
        keys = fs.find(self.dest.key(relative) + "/")
        for key in sorted(keys, key=lambda k: k.rsplit("/", 1)[-1] != first):
            fs.mv(key, self.dest.key(to) + key[len(self.dest.key(relative)):])

    def stat(self, relative: str) -> tuple[bytes, str, float] | None:
        """(content, ETag, the store's modification time in s since the epoch), or None when missing."""
        fs, key = self.fs(), self.dest.key(relative)
        try:
            info = fs.info(key)
            data = fs.cat_file(key)
        except FileNotFoundError:
            return None
        modified = info.get("LastModified") or info.get("updated") or info.get("mtime")
        seconds = modified.timestamp() if hasattr(modified, "timestamp") else float(modified or 0)
        return data, str(info.get("ETag") or info.get("generation") or ""), seconds

    def create(self, relative: str, data: bytes) -> str | None:
        """Write only if the object does not exist (S3 If-None-Match: *, GCS ifGenerationMatch=0): its ETag, or
        None when it already exists."""
        try:
            return self._tag(self.fs().pipe_file(self.dest.key(relative), data, mode="create"), relative)
        except FileExistsError:
            return None

    def replace(self, relative: str, data: bytes, etag: str) -> str | None:
        """Write only if the object is still the version `etag` (S3 If-Match): the new ETag, or None when it is
        not (another writer got there first). gcsfs takes no If-Match on a write: on gs:// the write is
        unconditional, and a writer learns it lost by reading the object back (RemoteLease does at every beat)."""
        condition = {"IfMatch": etag} if self.dest.scheme == "s3" else {}
        try:
            return self._tag(self.fs().pipe_file(self.dest.key(relative), data, **condition), relative)
        except OSError as exc:
            if "pre-condition" in str(exc) or isinstance(exc, FileNotFoundError):
                return None
            raise

    def _tag(self, response, relative: str) -> str:
        if isinstance(response, dict) and response.get("ETag"):
            return str(response["ETag"])
        found = self.stat(relative)
        return found[1] if found else ""

    def probe(self) -> str:
        fs, key = self.fs(), self.dest.key(f".finetune-probe-{uuid.uuid4().hex[:12]}")
        fs.pipe_file(key, b"probe\n")
        fs.rm_file(key)
        return f"{self.dest} is writable"

    @staticmethod
    def permanent(exc: Exception) -> bool:
        # fsspec backends map 403 to PermissionError and a missing bucket to FileNotFoundError; neither heals. A
        # multipart upload the store no longer knows (NoSuchUpload: a completion retried after its answer timed out,
        # measured with a 500 MB file on a loaded machine) is also FileNotFoundError, and uploading again heals it.
        if isinstance(exc, FileNotFoundError) and "upload" in str(exc).lower():
            return False
        return isinstance(exc, PermissionError | FileNotFoundError | ValueError)

    def fix(self, exc: Exception) -> str:
        if isinstance(exc, PermissionError):
            return "give the job's credentials write access to the bucket"
        if isinstance(exc, FileNotFoundError) and self.permanent(exc):
            return f"create the bucket {self.dest.bucket} (or fix the name)"
        if self.dest.scheme == "s3":
            return "check AWS_ENDPOINT_URL, the network path to the store and the credentials"
        return "check the network path to Cloud Storage and the credentials"


class HubStore:
    """hf:// through huggingface_hub: each upload is one commit, and COMPLETE's is the last. The repository is
    created private when missing."""

    def __init__(self, dest: Destination):
        self.dest = dest
        self.repo = dest.bucket

    def api(self):
        from huggingface_hub import HfApi

        return HfApi()  # the token comes from HF_TOKEN or the mounted token file, never from a log-able argument

    def read(self, relative: str) -> bytes | None:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

        try:
            return Path(hf_hub_download(self.repo, relative, force_download=True)).read_bytes()
        except (EntryNotFoundError, RepositoryNotFoundError):
            return None

    def remove(self, relative: str) -> None:
        api = self.api()
        api.create_repo(self.repo, private=True, exist_ok=True)
        if api.file_exists(self.repo, relative):
            api.delete_file(relative, self.repo, commit_message=f"finetune: remove {relative} before an upload")

    def put(self, local: Path, relative: str) -> None:
        self.api().upload_file(path_or_fileobj=str(local), path_in_repo=relative, repo_id=self.repo,
                               commit_message=f"finetune: {relative}")

    def write(self, relative: str, data: bytes) -> None:
        self.api().upload_file(path_or_fileobj=data, path_in_repo=relative, repo_id=self.repo,
                               commit_message="finetune: model complete")

    def probe(self) -> str:
        api = self.api()
        user = api.whoami()["name"]
        api.create_repo(self.repo, private=True, exist_ok=True)
        return f"hf://{self.repo} is writable by {user}"

    @staticmethod
    def permanent(exc: Exception) -> bool:
        from huggingface_hub.errors import HfHubHTTPError

        status = getattr(getattr(exc, "response", None), "status_code", None)
        return isinstance(exc, HfHubHTTPError) and status in (401, 403, 404)

    @staticmethod
    def fix(exc: Exception) -> str:
        return "set HF_TOKEN to a token with write access to the repository"
