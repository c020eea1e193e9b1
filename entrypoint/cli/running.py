"""Running a command body: a FinetuneError becomes one line per problem and its documented exit code, failures
are reported to status.json and the termination log; logging set-up and this process's place in a run.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import traceback
from pathlib import Path

import click

from .. import options as schema
from ..config import TrainConfig
from ..errors import DESCRIPTIONS, ExitCode, FinetuneError
from ..platforms import platform_defaults
from .params import check_environment

log = logging.getLogger("finetune")
EXIT_CODES_HELP = "\b\nExit codes:\n" + "\n".join(f"  {int(c)}  {d}" for c, d in DESCRIPTIONS.items())


def handled(output_dir_of=None):
    """Run a command body: a FinetuneError becomes one line per problem and its exit code (no traceback);
    anything else is a bug, printed with its traceback, exit 1. Failures are also written to status.json
    and /dev/termination-log."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            from .. import outputs
            from ..lease import held_by_another

            try:
                check_environment(click.get_current_context().find_root().command)
                return fn(*args, **kwargs)
            except FinetuneError as exc:
                code, lines = exc.code, exc.problems
            except KeyboardInterrupt:  # a signal before training installed its own handler: nothing to save
                code, lines = ExitCode.PREEMPTED, ["interrupted before training started; rerun the same command."]
            except Exception:
                code = ExitCode.INTERNAL
                traceback.print_exc()
                lines = [f"internal error (a bug, please report it with the traceback above): "
                         f"{sys.exc_info()[1]!r}"]
            for line in lines:
                click.echo(f"error: {line}", err=True)
            message = " | ".join(lines)
            outputs.write_termination_message(message, _platform())
            ctx = click.get_current_context(silent=True)
            output_dir = (ctx and ctx.meta.get(RESOLVED_OUTPUT_DIR)) or _output_dir(output_dir_of, kwargs)
            # Never into a directory another live run holds (BUSY, or a failure while it runs): it is theirs.
            if output_dir is not None and os.environ.get("RANK", "0") == "0" and not held_by_another(output_dir):
                state = "preempted" if code == ExitCode.PREEMPTED else "failed"
                outputs.write_status(output_dir, state, int(code), message)
            sys.exit(int(code))

        return wrapper

    return decorate


def _platform() -> str | None:
    try:
        return platform_defaults(os.environ)[0]
    except FinetuneError:  # the platform's own variables (SM_HPS) may be what failed
        return None


def _output_dir(output_dir_of, kwargs) -> Path | None:
    try:
        return Path(output_dir_of(kwargs)) if output_dir_of else None
    except Exception:  # the config itself may be what failed; then there is no output dir to report into
        return None


# Where a command body records the output directory its configuration resolved to (a flag, a variable, a preset
# or a platform contract may set it), so every later failure's status.json lands there.
RESOLVED_OUTPUT_DIR = "finetune.output_dir"


def train_output_dir(kwargs) -> Path:
    """Before the configuration resolves (or when it is what failed): the raw flag or the default."""
    return kwargs.get("output_dir") or Path("/output")


def setup_logs(cfg: TrainConfig | None = None, rank: int = 0) -> None:
    from .. import logs

    logs.setup(cfg.log_format if cfg else "text", rank)


def this_process():
    """Rank, local rank and world size from the variables torchrun sets."""
    from ..launch import Dist

    env = os.environ
    return Dist(rank=int(env.get("RANK", 0)), local_rank=int(env.get("LOCAL_RANK", 0)),
                world_size=int(env.get("WORLD_SIZE", 1))) if "LOCAL_RANK" in env else Dist()


def log_config(cfg, sources: dict[str, str]) -> None:
    from ..logs import event

    values = schema.as_dict(cfg)
    event("config: " + ", ".join(f"{k}={v}" for k, v in values.items()), config=values,
          sources={k: v for k, v in sources.items() if v != "default"})
    changed = {k: v for k, v in sources.items() if v != "default"}
    if changed:
        event("config sources: " + ", ".join(f"{k} from {v}" for k, v in changed.items()))
