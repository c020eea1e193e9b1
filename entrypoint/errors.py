"""Exit codes and the errors that carry them: the one table every other module, the README and the
Kubernetes podFailurePolicy read from.

A user error is raised as a `FinetuneError` subclass whose message is one line naming the problem and
the fix; the CLI prints it without a traceback. Anything else is a bug and exits `INTERNAL`.
"""

from __future__ import annotations

import errno
import os
import re
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1  # a bug: the traceback is printed
    USAGE = 2  # bad option, env var or preset (click's own usage errors also exit 2)
    DATA = 3  # data missing, unreadable, not UTF-8, empty, wrong field
    OUTPUT = 4  # output or checkpoint dir unwritable, disk full, I/O error while saving
    MODEL = 5  # model or tokenizer cannot be loaded (including missing while HF_HUB_OFFLINE=1)
    OOM = 6  # out of memory on the accelerator, or a data-preparation worker killed at the pod's memory limit
    PREEMPTED = 7  # stopped by SIGTERM/SIGINT after saving a checkpoint: rerun the same command to resume
    DIVERGED = 8  # the loss went non-finite, or the final model is worse than the untrained one: not published
    BUSY = 9  # another live run holds the output or checkpoint directory (its lease): nothing was touched
    EXPORT = 10  # the model is published locally but --export-to failed: rerun to export without retraining
    DRIVER = 11  # a GPU was expected but the NVIDIA driver is missing, too old for torch's CUDA, or CUDA is unusable
    STORE = 12  # the --checkpoint-to store stayed unreachable through the retries: rerun to resume when it is back


# What each code tells a user and a Job controller; the README table and k8s podFailurePolicy follow it.
DESCRIPTIONS = {
    ExitCode.OK: "success (or the same model was already published)",
    ExitCode.INTERNAL: "internal error, a bug: the traceback is in the log",
    ExitCode.USAGE: "invalid option, environment variable or preset",
    ExitCode.DATA: "training data missing, unreadable or invalid",
    ExitCode.OUTPUT: "output or checkpoint directory unwritable, disk full or I/O error",
    ExitCode.MODEL: "model or tokenizer could not be loaded",
    ExitCode.OOM: "out of accelerator memory, or a tokenizing process killed at the memory limit",
    ExitCode.PREEMPTED: "stopped by a signal after a checkpoint was saved; rerun to resume",
    ExitCode.DIVERGED: "training diverged; the model was not published",
    ExitCode.BUSY: "another run is using the output or checkpoint directory",
    ExitCode.EXPORT: "model published locally but the upload to --export-to failed; rerun to export",
    ExitCode.DRIVER: "a GPU was expected but the NVIDIA driver is missing or too old, or CUDA is unusable",
    ExitCode.STORE: "the --checkpoint-to store was unreachable through every retry; rerun to resume",
}

# A retry cannot fix these: the Job should fail at once rather than burn its backoffLimit. DIVERGED is
# permanent because training is deterministic: a retry resumes the same run and diverges again. BUSY is not:
# the holder may be a run on its way out (a pod still terminating on a lost node, a SIGKILLed run whose lease
# goes stale within lease.STALE_SECONDS), and the retry after the Job's backoff (10 s, doubling) finds the
# directory free. DRIVER is not permanent either: a retried pod may land on another node (a newer driver, a
# GPU that has not fallen off the bus), and the check fails in preflight, seconds in, so each retry costs little.
PERMANENT = (ExitCode.USAGE, ExitCode.DATA, ExitCode.MODEL, ExitCode.DIVERGED)


class FinetuneError(Exception):
    """A user-facing failure: one line per problem, each naming the fix."""

    code = ExitCode.INTERNAL

    def __init__(self, *problems: str):
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))


class ConfigError(FinetuneError):
    code = ExitCode.USAGE


class DataError(FinetuneError):
    code = ExitCode.DATA


class OutputError(FinetuneError):
    code = ExitCode.OUTPUT


class ModelLoadError(FinetuneError):
    code = ExitCode.MODEL


class OutOfMemory(FinetuneError):
    code = ExitCode.OOM


class Preempted(FinetuneError):
    code = ExitCode.PREEMPTED


class Diverged(FinetuneError):
    code = ExitCode.DIVERGED


class Busy(FinetuneError):
    code = ExitCode.BUSY


class ExportError(FinetuneError):
    code = ExitCode.EXPORT


class DriverError(FinetuneError):
    code = ExitCode.DRIVER


class StoreUnavailable(FinetuneError):
    code = ExitCode.STORE


# Storage faults: what the volume says when a write cannot land, whatever library made the write. A fault of the
# volume, not of the program, so it is the user's to fix (exit OUTPUT) and never a bug.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)
# The same errnos as text: Rust libraries (safetensors, tokenizers) end theirs with "(os error 28)", Python's own
# read "[Errno 28] ...", pyarrow's "errno 28", and some wrappers keep only the system's words.
_ERRNO_IN_TEXT = re.compile(r"\(os error (\d+)\)|\[errno (\d+)\]|\berrno[ =:]+(\d+)", re.IGNORECASE)
_STRERRORS = {os.strerror(code).lower(): code for code in STORAGE_ERRNOS}


def storage_errno(exc: BaseException) -> int | None:
    """The storage errno (ENOSPC, EDQUOT, EROFS, EIO) `exc` carries, or None: read from an OSError's errno, then
    from the text of the exception and of everything in its cause chain (`__cause__`, `__context__`), since
    libraries wrap the OSError (PIL, TensorBoard, fsspec) or report it only as text (safetensors' SafetensorError
    "No space left on device (os error 28)", torch's RuntimeError from its zip writer)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            return exc.errno
        code = _errno_in_text(str(exc))
        if code is not None:
            return code
        # The chain a traceback would print: the cause, else the context unless `raise ... from None` hid it.
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return None


def _errno_in_text(text: str) -> int | None:
    for match in _ERRNO_IN_TEXT.finditer(text):
        code = int(next(g for g in match.groups() if g))
        if code in STORAGE_ERRNOS:
            return code
    lowered = text.lower()
    return next((code for words, code in _STRERRORS.items() if words in lowered), None)
