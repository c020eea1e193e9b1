"""Which checkpoint to resume from.

Trainer writes checkpoints in place, so a checkpoint killed mid-save looks like any other. Ours counts as
complete only when our marker was written after all its files were flushed, and when a cheap integrity check
passes (weights header readable, trainer state parses, optimizer archive intact).

The marker also records the run that wrote the checkpoint (identity.py) and its whole-run totals (tokens,
training seconds), so a resume continues only the same run and metrics cover the run from step 0.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import zipfile
from pathlib import Path

from entrypoint import fsutil, logs
from entrypoint.errors import ConfigError
from entrypoint.train import identity

log = logs.area("checkpoint")
resume_log = logs.area("resume")
MARKER = "finetune-complete.json"
# A --fsdp checkpoint (SHARDED_STATE_DICT), as accelerate's save_fsdp_model and save_fsdp_optimizer write it through
# torch.distributed.checkpoint: a folder each for the weights and the optimizer, each holding one `__<rank>_0.distcp`
# per rank and the `.metadata` the coordinating rank writes once every rank's file is written; no safetensors.
SHARDED_MODEL, SHARDED_OPTIMIZER = "pytorch_model_fsdp_0", "optimizer_0"
SHARD_METADATA = ".metadata"
SET_ASIDE = "previous-run"  # where a fresh start moves the checkpoints of the run it replaces
_NAME = re.compile(r"^checkpoint-(\d+)$")


def mark_complete(checkpoint: Path, seconds: float, record: dict | None = None) -> None:
    """Flush every file, then write the marker (itself flushed): the marker's presence implies the rest.

    `record` (the run's identity, world size and totals) is stored in the marker beside the save time."""
    fsutil.write_marker(checkpoint / MARKER, json.dumps({"save_seconds": round(seconds, 3), **(record or {})}))


def problem(checkpoint: Path) -> str | None:
    """Why this checkpoint cannot be resumed from, or None when it can."""
    if not (checkpoint / MARKER).is_file():
        return "no completion marker (the save was interrupted)"
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
    except (OSError, ValueError, KeyError):
        return "trainer_state.json is missing or unreadable"
    if (checkpoint / SHARDED_MODEL).is_dir():
        return sharded_problem(checkpoint) or _archive_problem(checkpoint, "scheduler.pt")
    weights = sorted(checkpoint.glob("*.safetensors"))
    if not weights:
        return "no model weights"
    for path in weights:
        if not _safetensors_ok(path):
            return f"{path.name} is truncated or corrupt"
    for name in ("optimizer.pt", "scheduler.pt"):
        if reason := _archive_problem(checkpoint, name):
            return reason
    return None


def _archive_problem(checkpoint: Path, name: str) -> str | None:
    """Why the torch.save archive `name` is unusable, or None."""
    path = checkpoint / name
    if not path.is_file():
        return f"{name} is missing"
    try:
        with zipfile.ZipFile(path) as archive:  # torch.save writes a zip; its index sits at the end
            archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return f"{name} is truncated or corrupt"
    return None


def sharded_problem(checkpoint: Path) -> str | None:
    """Why a --fsdp checkpoint's shards are unusable, or None: each folder needs its metadata (written last) and a
    shard from every rank of the run that saved it (the marker's world size)."""
    ranks = int(read_marker(checkpoint).get("world_size") or 1)
    for folder in (SHARDED_MODEL, SHARDED_OPTIMIZER):
        metadata = checkpoint / folder / SHARD_METADATA
        if not metadata.is_file() or metadata.stat().st_size == 0:
            return f"{folder}/{SHARD_METADATA} is missing or empty (the sharded save was interrupted)"
        missing = [rank for rank in range(ranks) if not (checkpoint / folder / f"__{rank}_0.distcp").is_file()]
        if missing:
            return (f"{folder} lacks the shard of rank {missing[0]} of {ranks} (each rank writes its own: with "
                    "several nodes, --checkpoint-dir must be a volume every node shares)")
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
        log.warning(f"skipping {path.name}: {reason}")
    return None


def fetch(cfg, remote) -> Path | None:
    """--checkpoint-to: download the newest complete remote checkpoint (publish.remote.RemoteCheckpoints) into
    --checkpoint-dir when that holds nothing as new; `choose` then judges it like any local one."""
    if not cfg.resume:
        return None
    local = latest_complete(cfg.model_checkpoint_dir)
    return remote.restore(cfg.model_checkpoint_dir, step_of(local) if local else None)


def read_marker(checkpoint: Path) -> dict:
    """The checkpoint's marker, or {} when it has none (or an unreadable one)."""
    return fsutil.read_marker(checkpoint / MARKER) or {}


def step_of(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / "trainer_state.json").read_text())["global_step"])


def choose(cfg, run: dict, world_size: int) -> Path | None:
    """The checkpoint this run continues, or None to start fresh. Read-only, so every rank may call it alike; a
    fresh start over existing checkpoints is carried out by `set_aside` on one rank.

    A checkpoint of another identity is a ConfigError naming what changed, unless --overwrite (start fresh)."""
    if not cfg.resume:
        resume_log.info("disabled by --no-resume; starting fresh")
        return None
    found = latest_complete(cfg.model_checkpoint_dir)
    if found is None:
        return None
    marker = read_marker(found)
    saved = marker.get("identity")
    if saved is None:
        resume_log.warning(f"{found.name} predates run identities; resuming it without comparing options")
    elif marker.get("run") != identity.digest(run):
        changed = "; ".join(identity.changes(saved, run)) or "the identity hash"
        if cfg.overwrite:
            resume_log.info(f"--overwrite: {found.name} belongs to a run with other options ({changed}); starting "
                            "fresh", checkpoint=str(found), changed=changed)
            return None
        raise ConfigError(f"{found} was saved by a run with other options ({changed}); rerun with its options to "
                          f"resume it, or start over with --no-resume (its checkpoints move to {SET_ASIDE}/) or "
                          "another --checkpoint-dir.")
    saved_world = marker.get("world_size")
    if saved_world and saved_world != world_size:
        resume_log.info(f"{found.name} was saved by {saved_world} processes and this run has {world_size}: "
                        "continuing, but the resume is no longer exact (batches per step and data order differ)",
                        saved_world_size=saved_world, world_size=world_size)
    resume_log.info(f"from {found}", checkpoint=str(found))
    return found


def set_aside(directory: Path) -> Path | None:
    """Move every checkpoint of the run being replaced into `directory`/previous-run (replacing the one there), so
    Trainer neither overwrites them in place nor rotates the new run's away. Returns where they went, if any."""
    old = [p for p in directory.iterdir() if p.is_dir() and _NAME.match(p.name)] if directory.is_dir() else []
    if not old:
        return None
    target = directory / SET_ASIDE
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    for path in old:
        path.rename(target / path.name)
    log.info(f"moved {len(old)} checkpoint(s) of the previous run to {target} (delete it to free the space)",
             set_aside=str(target))
    return target
