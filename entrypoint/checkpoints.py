"""Which checkpoint to resume from.

Trainer writes checkpoints in place, so a checkpoint killed mid-save looks like any other. Ours counts as
complete only when our marker was written after all its files were flushed, and when a cheap integrity check
passes (weights header readable, trainer state parses, optimizer archive intact).
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)
MARKER = "finetune-complete.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def mark_complete(checkpoint: Path, seconds: float) -> None:
    """Flush every file, then write the marker (itself flushed): the marker's presence implies the rest."""
    for path in checkpoint.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    marker = checkpoint / MARKER
    with marker.open("w") as f:
        json.dump({"save_seconds": round(seconds, 3)}, f)
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(checkpoint, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def problem(checkpoint: Path) -> str | None:
    """Why this checkpoint cannot be resumed from, or None when it can."""
    if not (checkpoint / MARKER).is_file():
        return "no completion marker (the save was interrupted)"
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    except (OSError, ValueError, KeyError):
        return "trainer_state.json is missing or unreadable"
    weights = sorted(checkpoint.glob("*.safetensors"))
    if not weights:
        return "no model weights"
    for path in weights:
        if not _safetensors_ok(path):
            return f"{path.name} is truncated or corrupt"
    for name in ("optimizer.pt", "scheduler.pt"):
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        try:
            with zipfile.ZipFile(path) as archive:  # torch.save writes a zip; its index sits at the end
                archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return f"{name} is truncated or corrupt"
    return None


def _safetensors_ok(path: Path) -> bool:
    """Header parses and the file is as long as the header says."""
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size >= 8 + length + end
    except (OSError, ValueError, struct.error, KeyError, TypeError):
        return False


def latest_complete(directory: Path) -> Path | None:
    """The newest resumable checkpoint; every newer one that is not resumable is named in the log."""
    if not directory.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in directory.iterdir()
                    if p.is_dir() and (m := _NAME.match(p.name))), reverse=True)
    for _, path in found:
        reason = problem(path)
        if reason is None:
            return path
        log.warning("checkpoint: skipping %s: %s", path.name, reason)
    return None
