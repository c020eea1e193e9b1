"""Logs that read well in `kubectl logs`: plain timestamped lines (or one JSON object a line), progress as
periodic lines with step, loss, learning rate, tokens/s and ETA, and a progress bar only on a terminal.

Every line belongs to an area of the job (data, model, resume, checkpoint, ...). A module takes its area's logger
once, at its top, and passes the values worth querying as keyword fields:

    log = logs.area("data")
    log.info(f"cache hit {name}", rows=rows)   # text: `... data: cache hit blocks-1a2b`
                                               # JSON: {"area": "data", "message": "data: cache hit ...", "rows": 12}

The area writes the "data: " prefix, so a message never starts with one. This module is the only one that calls
`logging.getLogger`: every area's logger hangs from one root, `finetune`, which `setup` gives the handler.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from transformers import TrainerCallback

from entrypoint.train.metrics import perplexity

ROOT = "finetune"


class Area:
    """The logger of one area: `info`, `warning` and `error` write "area: message", `progress` a progress line.
    Keyword fields become keys of the line in JSON format (and `record.fields` for a handler or a test)."""

    def __init__(self, name: str):
        self.name = name
        self.logger = logging.getLogger(f"{ROOT}.{name}")

    def info(self, message: str, **fields) -> None:
        self._log(logging.INFO, f"{self.name}: {message}", fields)

    def warning(self, message: str, **fields) -> None:
        self._log(logging.WARNING, f"{self.name}: {message}", fields)

    def error(self, message: str, **fields) -> None:
        self._log(logging.ERROR, f"{self.name}: {message}", fields)

    def progress(self, message: str, **fields) -> None:
        """A line of periodic progress: the area in a column five wide instead of "area: ", so that a run's step
        lines align (`train step 8/16 ...`, `eval  step 8: ...`)."""
        self._log(logging.INFO, f"{self.name:<5} {message}", fields)

    def _log(self, level: int, text: str, fields: dict) -> None:
        # The message is complete text (no %-arguments); stacklevel names the caller's line in the record.
        self.logger.log(level, text, extra={"area": self.name, "fields": fields}, stacklevel=3)


def area(name: str) -> Area:
    """The logger of `name`, one of the job's areas; call it once at a module's top: `log = logs.area("data")`."""
    return Area(name)


def quiet(library: str) -> None:
    """Only a library's critical records reach the output (for libraries that log what we report ourselves)."""
    logging.getLogger(library).setLevel(logging.CRITICAL)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, area, the message as the text format shows it, and the call's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname.lower(),
                 "area": getattr(record, "area", record.name.removeprefix(f"{ROOT}.")),
                 "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        return json.dumps(entry)


def setup(log_format: str = "text", rank: int = 0) -> None:
    """Configure our loggers once; quiet the libraries' own chatter and progress bars off a terminal."""
    import datasets
    import transformers

    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        prefix = f"[rank {rank}] " if rank else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger(ROOT)
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False
    transformers.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    if not is_tty():
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def is_tty() -> bool:
    return sys.stderr.isatty()


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


train_log, eval_log = area("train"), area("eval")


class ProgressLog(TrainerCallback):
    """One line per logging step (unless a progress bar shows it), one per evaluation and per save.

    `counter` is the trainer's token counter: real tokens this session, read only when a line is printed.
    After a resume, `history` starts with the records of the steps before it (see `restore`).
    """

    def __init__(self, counter, show_steps: bool):
        self.counter = counter
        self.show_steps = show_steps
        self.start = time.perf_counter()
        self.first_step = 0
        self.history: list[dict] = []  # every log record of the whole run, for the loss plot and metrics
        self.training = False
        self.eval_seconds = 0.0  # evaluations inside this session's training loop: not training time
        self.eval_seconds_before = 0.0  # the same, for the sessions before a resume

    def restore(self, state) -> None:
        """Start the history with the restored Trainer state's log (every record up to its checkpoint), so plots
        and metrics describe the whole run however many restarts it took."""
        self.history = [dict(h) for h in state.log_history if "step" in h]
        self.eval_seconds_before = sum(h.get("eval_runtime", 0.0) for h in self.history)
        self.first_step = state.global_step

    def training_seconds(self) -> float:
        """Seconds this session has spent training, evaluations excluded."""
        return time.perf_counter() - self.start - self.eval_seconds if self.training else 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.restore(state)  # Trainer restores a checkpoint's state before this call
        self.start, self.training = time.perf_counter(), True
        # Trainer calls this after restoring a checkpoint: the line marks when resuming is done.
        train_log.info(f"starting at step {state.global_step} of {state.max_steps}", step=state.global_step,
                       max_steps=state.max_steps)

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        self.history.append({"step": state.global_step, **logs})
        if self.training:
            self.eval_seconds += logs.get("eval_runtime", 0.0)
        if "eval_loss" in logs:
            loss = logs["eval_loss"]
            eval_log.progress(f"step {state.global_step}: eval loss {loss:.4f}, perplexity {perplexity(loss):.2f}",
                              step=state.global_step, eval_loss=loss, perplexity=perplexity(loss))
        elif "loss" in logs and self.show_steps:
            elapsed = time.perf_counter() - self.start
            done = state.global_step - self.first_step
            left = state.max_steps - state.global_step
            eta = duration(elapsed / done * left) if done else "?"
            # Every rank consumes the same number of (packed) positions, so rank 0's count x world is the total.
            tokens = self.counter.tokens() * args.world_size / elapsed if elapsed > 0 else 0.0
            percent = 100 * state.global_step / max(1, state.max_steps)
            train_log.progress(f"step {state.global_step}/{state.max_steps} ({percent:.0f}%) "
                               f"epoch {state.epoch:.2f} loss {logs['loss']:.4f} "
                               f"lr {logs.get('learning_rate', 0):.2e} tokens/s {tokens:,.0f} eta {eta}",
                               step=state.global_step, epoch=state.epoch, loss=logs["loss"],
                               learning_rate=logs.get("learning_rate"), tokens_per_second=tokens)


def size(nbytes: float) -> str:
    """1.5 GiB, 12.0 MiB, 300 KiB: bytes for a person."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes / 1024:,.0f} KiB"


class WorkProgress:
    """Progress of a long piece of work measured in bytes (data preparation): a line every `interval` seconds
    with bytes and tokens done, tokens/s and an ETA, for `kubectl logs`; a bar instead on a terminal. `what` is
    the area the lines belong to."""

    def __init__(self, what: str, total_bytes: int, interval: float = 10.0):
        self.log, self.total, self.interval = area(what), max(1, total_bytes), interval
        self.bytes = self.tokens = 0
        self.start = self.last = time.perf_counter()
        self.bar = None
        if is_tty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=what, leave=False)

    def update(self, nbytes: int, tokens: int) -> None:
        self.bytes += nbytes
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(nbytes)
            self.bar.set_postfix_str(f"{self.tokens / 1e6:,.1f} M tokens", refresh=False)
            return
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            elapsed = now - self.start
            rate = self.tokens / elapsed if elapsed > 0 else 0.0
            left = elapsed / self.bytes * (self.total - self.bytes) if self.bytes else 0.0
            self.log.info(f"{size(self.bytes)} of {size(self.total)} ({100 * self.bytes / self.total:.0f}%), "
                          f"{self.tokens:,} tokens, {rate:,.0f} tokens/s, "
                          f"eta {duration(left)}", bytes_done=self.bytes, bytes_total=self.total, tokens=self.tokens,
                          tokens_per_second=rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
