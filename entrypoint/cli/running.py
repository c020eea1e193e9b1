"""Running a command body: a FinetuneError becomes one line per problem and its documented exit code, failures
are reported to status.json and the termination log; logging set-up and this process's place in a run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path

import click

from entrypoint import fsutil
from entrypoint.cli.params import check_environment
from entrypoint.config import options as schema
from entrypoint.config.platforms import platform_defaults
from entrypoint.config.schema import TrainConfig
from entrypoint.errors import DESCRIPTIONS, ExitCode, FinetuneError, storage_errno

EXIT_CODES_HELP = "\b\nExit codes:\n" + "\n".join(f"  {int(c)}  {d}" for c, d in DESCRIPTIONS.items())


def handled(output_dir_of=None):
    """Run a command body: a FinetuneError becomes one line per problem and its exit code (no traceback);
    anything else is a bug, printed with its traceback, exit 1. Failures are also written to status.json
    and /dev/termination-log. A torchrun worker then leaves at once (`leave`)."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            # Each failure is reported inside its except clause: the traceback, and through it DDP, stays alive
            # until `leave` (see there why nothing of it may be freed before).
            threading.excepthook = quiet_storage_faults_in_threads
            try:
                check_environment(click.get_current_context().find_root().command)
                result = fn(*args, **kwargs)
            except FinetuneError as exc:
                fail(exc.code, exc.problems, output_dir_of, kwargs)
            except KeyboardInterrupt:  # a signal before training installed its own handler: nothing to save
                fail(ExitCode.PREEMPTED, ["interrupted before training started; rerun the same command."],
                     output_dir_of, kwargs)
            except Exception as exc:
                storage = _storage_fault(exc, output_dir_of, kwargs)
                if storage is not None:  # a write any library made to a full, failing or read-only volume
                    fail(storage.code, storage.problems, output_dir_of, kwargs)
                traceback.print_exc()
                fail(ExitCode.INTERNAL, [f"internal error (a bug, please report it with the traceback above): "
                                         f"{sys.exc_info()[1]!r}"], output_dir_of, kwargs)
            if _leaves_at_once():
                leave(ExitCode.OK)
            return result

        return wrapper

    return decorate


def quiet_storage_faults_in_threads(args) -> None:
    """A library's writer thread (TensorBoard's event writer) that meets a full, failing or read-only volume: one
    warning line instead of a traceback; the command meets the same fault at its next write there and stops with
    its one error line (exit 4). Anything else keeps Python's report, traceback included."""
    if args.exc_value is not None and storage_errno(args.exc_value) is not None:
        name = args.thread.name if args.thread is not None else "a thread"
        click.echo(f"warning: a background writer ({name}) stopped: {args.exc_value}", err=True)
        return
    threading.__excepthook__(args)


def fail(code: ExitCode, lines: list[str], output_dir_of, kwargs, ctx: click.Context | None = None) -> None:
    """Report a failure (stderr, termination log, status.json) and exit with its code; never returns. `ctx` is the
    command's click context, for a caller on another thread (click keeps the current one per thread)."""
    from entrypoint.publish import outputs
    from entrypoint.publish.lease import held_by_another

    failed_at = time.time()
    try:
        for line in lines:
            click.echo(f"error: {line}", err=True)
        message = " | ".join(lines)
        outputs.write_termination_message(code, message, _platform())
        ctx = ctx or click.get_current_context(silent=True)
        output_dir = (ctx and ctx.meta.get(RESOLVED_OUTPUT_DIR)) or _output_dir(output_dir_of, kwargs)
        # Never into a directory another live run holds (BUSY, or a failure while it runs): it is theirs.
        if output_dir is not None and os.environ.get("RANK", "0") == "0" and not held_by_another(output_dir):
            state = "preempted" if code == ExitCode.PREEMPTED else "failed"
            outputs.write_status(output_dir, state, int(code), message)
        if "LOCAL_RANK" in os.environ:
            from entrypoint.runtime.launch import record_failure

            record_failure(int(code), message, failed_at)
    finally:  # even when reporting fails (a full disk): a worker must still leave at once
        leave(code)


def leave(code: int) -> None:
    """Exit with `code`. A torchrun worker leaves with os._exit once its logs are flushed, running no destructor.

    Why: ProcessGroupGloo's destructor waits for its worker threads to end, and a worker thread that has just run a
    collective still holds that work, whose tensors were handed over by Python; dropping them takes the GIL. Python
    frees the process group's last reference with the GIL held whenever that reference is C++'s: DDP's Reducer holds
    one, and a stop unwinds with the Trainer (and so DDP) kept alive by the exception's traceback until the except
    clause ends, after `destroy_process_group` has dropped Python's own reference. The Reducer's deallocation then
    joins a thread that waits for the GIL its caller holds: a hang until the agent's SIGKILL (1 stop in 15 under CPU
    load in bench/soak.py, and once in CI in test_two_processes_stop_together_on_sigterm_and_resume). So a worker
    never destroys its process group (job.run leaves it alone) and never frees DDP: after its last write (status,
    error file, logs) there is nothing left to do, and the kernel closes its sockets, which ends any peer's
    collective at once.
    The launcher leaves the same way once torchrun has returned: its interpreter's final garbage collection (torch
    and transformers imported) took 7-10 s under load, between its workers' exit and its own. Any other process
    exits normally."""
    if not _leaves_at_once():
        sys.exit(int(code))
    logging.shutdown()  # flushes every handler
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(int(code))


def _leaves_at_once() -> bool:
    """A torchrun worker, or the launcher that started torchrun in this process."""
    from entrypoint.runtime.launch import LAUNCHER_PID

    return "LOCAL_RANK" in os.environ or os.environ.get(LAUNCHER_PID) == str(os.getpid())


def _platform() -> str | None:
    try:
        return platform_defaults(os.environ)[0]
    except FinetuneError:  # the platform's own variables (SM_HPS) may be what failed
        return None


def _storage_fault(exc: Exception, output_dir_of, kwargs) -> FinetuneError | None:
    """`exc` as exit OUTPUT when a volume refused a write (fsutil.storage_error), naming the file when the
    exception or the code that raised it does (its final name, not the temporary one it was written under); None
    for anything else (a bug)."""
    path = _file_of(exc)
    if path is None:
        return fsutil.storage_error(exc, None)
    return fsutil.storage_error(exc, path.parent, fsutil.final_name(path))


def _file_of(exc: BaseException) -> Path | None:
    """The file a failed write was for: the exception's own filename (bytes from some libraries: TensorBoard's),
    else the innermost frame's `filename` or `path` that is an absolute path (a write() that failed on a full
    disk carries no name, but the function writing it holds one)."""
    names = [getattr(exc, "filename", None)]
    frame = exc.__traceback__
    frames = []
    while frame is not None:
        frames.append(frame.tb_frame)
        frame = frame.tb_next
    names += [f.f_locals.get(key) for f in reversed(frames) for key in ("filename", "path")]
    for name in names:
        if isinstance(name, str | bytes | os.PathLike):
            path = Path(os.fsdecode(name))
            if path.is_absolute():
                return path
    return None


def _output_dir(output_dir_of, kwargs) -> Path | None:
    try:
        return Path(output_dir_of(kwargs)) if output_dir_of else None
    except Exception:  # the config itself may be what failed; then there is no output dir to report into
        return None


# Where a command body records the output directory its configuration resolved to (a flag, a variable, a preset
# or a platform contract may set it), so every later failure's status.json lands there.
RESOLVED_OUTPUT_DIR = "finetune.output_dir"


def resolved_output_dir(path: Path) -> click.Context:
    """Record the resolved --output-dir for the failure report and return the command's context: a thread that
    reports a failure later (the stop watch) needs it, as click's current context belongs to one thread."""
    ctx = click.get_current_context()
    ctx.meta[RESOLVED_OUTPUT_DIR] = path
    return ctx


def train_output_dir(kwargs) -> Path:
    """Before the configuration resolves (or when it is what failed): the raw flag or the default."""
    return kwargs.get("output_dir") or Path("/output")


def setup_logs(cfg: TrainConfig | None = None, rank: int = 0) -> None:
    from entrypoint import logs

    logs.setup(cfg.log_format if cfg else "text", rank)


def this_process():
    """Rank, local rank and world size from the variables torchrun sets. A torchrun worker is first tied to its
    launcher, which it must not outlive (launch.die_with_launcher)."""
    from entrypoint.runtime.launch import Dist, die_with_launcher

    env = os.environ
    if "LOCAL_RANK" not in env:
        return Dist()
    die_with_launcher()
    return Dist(rank=int(env.get("RANK", 0)), local_rank=int(env.get("LOCAL_RANK", 0)),
                world_size=int(env.get("WORLD_SIZE", 1)))


def log_config(cfg, sources: dict[str, str]) -> None:
    from entrypoint import logs

    log = logs.area("config")
    values = schema.as_dict(cfg)
    changed = {k: v for k, v in sources.items() if v != "default"}
    log.info(", ".join(f"{k}={v}" for k, v in values.items()), config=values, sources=changed)
    if changed:  # a second line: which of those values a flag, a variable or a preset set
        log.info(", ".join(f"{k} from {v}" for k, v in changed.items()))
