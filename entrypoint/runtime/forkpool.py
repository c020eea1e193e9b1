"""Ordered results from forked worker processes that share no lock and no queue, so stopping them is killing them.

Why not multiprocessing.Pool: its parent feeds every task through one shared pipe from a helper thread, and its
workers answer through another, each behind a lock. `Pool.terminate` waits for that thread, which can be stuck
mid-send of a large task (a 1 MiB piece of text) into a pipe no worker reads any more: a SIGTERM during
preparation then hung until the kubelet's SIGKILL instead of exiting PREEMPTED (CI, and 1 try in 7 here). A worker
killed from outside (the kernel's OOM killer) leaves Pool waiting for its task forever.

Here no task is sent at all. Every worker walks the same deterministic work list on its own and computes items
w, w + n, w + 2n, ...; it sends each result down its own pipe, and the parent reads the pipes in turn. A worker
that dies is an end of file on its pipe, reported at once with how it died; stopping kills the workers.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator

from entrypoint.errors import FinetuneError, OutOfMemory

WAIT_SECONDS = 0.5  # how often `check` runs while the parent waits for a result


class _Remote(Exception):
    """The traceback of an error raised in a worker, shown as the cause of the same error in the parent."""


class WorkerDied(FinetuneError):
    """A worker process ended without its results (killed, or crashed in native code)."""


def ordered(work: Callable[[], Iterable], task: Callable, workers: int, check: Callable[[], None] | None = None,
            what: str = "worker") -> Iterator:
    """task(item) for each item of work(), in order, computed by `workers` forked processes.

    `work` is called in every worker and must yield the same items in each (a generator over a file or an
    inherited table, not a shared iterator). `check` runs twice a second while waiting and may raise to stop.
    Each worker keeps at most two finished results waiting for the parent, so memory stays bounded however far
    the parent falls behind. Closing the generator (a consumer's error, a signal) kills the workers."""
    context = multiprocessing.get_context("fork")
    processes, pipes = [], []
    finished = False
    try:
        for index in range(workers):
            reader, writer = context.Pipe(duplex=False)
            process = context.Process(target=_serve, args=(work, task, index, workers, writer), daemon=True,
                                      name=f"{what}-{index}")
            process.start()
            writer.close()  # the worker holds the only write end, so its death is an end of file here
            processes.append(process)
            pipes.append(reader)
        for position in itertools.count():
            slot = position % workers
            kind, value = _receive(pipes[slot], processes[slot], what, check)
            if kind == "done":  # item `position` does not exist, so neither does any later one
                break
            if kind == "error":
                error, remote = value
                raise error from _Remote(remote)
            yield value
        finished = True
    finally:
        for process in processes:
            if not finished and process.is_alive():
                process.kill()
        for pipe in pipes:
            pipe.close()
        for process in processes:
            process.join()


def _receive(pipe, process, what: str, check) -> tuple[str, object]:
    # `check` runs before each result too, not only while waiting: when the parent is the slow side (its writes
    # slower than the workers' results, as on a loaded machine) every poll succeeds at once, and a SIGTERM waited
    # for the end of the whole job (21-26 s measured at a load average of 9, past the tests' bound).
    if check is not None:
        check()
    while not pipe.poll(WAIT_SECONDS):
        if check is not None:
            check()
    try:
        return pipe.recv()
    except (EOFError, OSError):  # OSError: it died part-way through sending ("got end of file during message")
        process.join(5)
        raise _died(process, what) from None


def _died(process, what: str) -> FinetuneError:
    code = process.exitcode
    if code == -signal.SIGKILL:
        return OutOfMemory(f"a {what} process (pid {process.pid}) was killed by SIGKILL, which is what the kernel "
                           "does at the container's memory limit; give the pod more memory or lower "
                           "--preprocessing-workers (FINETUNE_PREPROCESSING_WORKERS).")
    how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
    return WorkerDied(f"a {what} process (pid {process.pid}) ended with {how} before sending its results; "
                      "see the lines above for its error and rerun the same command.")


def _serve(work, task, index: int, count: int, pipe) -> None:
    """A worker: compute items index, index + count, ... of work(); a thread sends each result while the next
    is computed. The process ends with os._exit, so no handler or buffer inherited from the parent runs."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent alone decides to stop, and kills its workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    outbox = queue.Queue(maxsize=1)
    sender = threading.Thread(target=_send_all, args=(outbox, pipe), daemon=True)
    sender.start()
    try:
        for item in itertools.islice(work(), index, None, count):
            outbox.put(("result", task(item)))
        outbox.put(("done", None))
    except BaseException as exc:  # reported to the parent, which raises it
        outbox.put(("error", (_portable(exc), "".join(traceback.format_exception(exc)))))
    outbox.put(None)
    sender.join()
    os._exit(0)


def _send_all(outbox: queue.Queue, pipe) -> None:
    while (message := outbox.get()) is not None:
        try:
            pipe.send(message)
        except OSError:  # the parent is gone or stopped reading: nothing left to do
            os._exit(1)


def _portable(exc: BaseException) -> BaseException:
    """The exception itself when it survives pickling, else a RuntimeError naming it."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
