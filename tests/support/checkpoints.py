"""Checkpoint directories of the shapes Trainer writes, for tests of what reads them (validation, the store)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from entrypoint.train import checkpoints


def sharded_checkpoint(directory: Path, step: int, ranks: int = 2) -> Path:
    """A checkpoint as Trainer leaves it under FSDP2 with SHARDED_STATE_DICT on `ranks` processes: accelerate's
    pytorch_model_fsdp_0/ and optimizer_0/ (each `.metadata` plus one `__<rank>_0.distcp` per rank), scheduler.pt,
    one rng_state_<rank>.pth per rank, trainer_state.json, training_args.bin, then our marker. Rank 0's shard and
    the metadata are written by torch.distributed.checkpoint itself (one process), the other ranks' by name."""
    path = directory / f"checkpoint-{step}"
    for folder, key in ((checkpoints.SHARDED_MODEL, "model"), (checkpoints.SHARDED_OPTIMIZER, "optimizer")):
        with warnings.catch_warnings():  # it says it saves in a single process, which is the point here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save({key: {"weight": torch.ones(4)}}, storage_writer=dcp.FileSystemWriter(path / folder))
        for rank in range(1, ranks):
            (path / folder / f"__{rank}_0.distcp").write_bytes(b"\0" * 64)
    torch.save({"last_epoch": step}, path / "scheduler.pt")
    for rank in range(ranks):
        torch.save({"cpu": torch.zeros(2)}, path / f"rng_state_{rank}.pth")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (path / "training_args.bin").write_bytes(b"args")
    checkpoints.mark_complete(path, 1.0, {"world_size": ranks})
    return path
