"""Logs that read well in `kubectl logs`: plain timestamped lines (or one JSON object a line), long work as periodic
progress lines (`WorkProgress`; the training steps' lines are train/progress.py's), a progress bar only on a terminal.

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
    # bitsandbytes, imported by peft and transformers whenever it is installed, warns that it cannot fetch a packed
    # CPU kernel from the Hub; train/model.py turns that kernel off (prepare_quantized), so the line only misleads.
    quiet("bitsandbytes.backends.cpu.ops")
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
