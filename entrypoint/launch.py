"""Several processes: the CLI re-launches itself under torchrun (torch.distributed elastic) with the same
arguments and environment, and exits with the workers' own exit code.

One node: `--standalone`. Several nodes with a known node rank (Indexed Jobs, explicit flags): static
rendezvous, so node 0 hosts the store whatever DNS name the others reach it by. Elastic ranges (`--nnodes 1:4`,
the Training Operator's PET_* variables): c10d rendezvous at the endpoint, which must be given.

Worker-group restarts are torchrun's own: as many as PET_MAX_RESTARTS says (the Training Operator sets it from
elasticPolicy.maxRestarts), none where nothing sets it. Each restart resumes from the last complete checkpoint.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .config import TrainConfig
from .errors import ExitCode

log = logging.getLogger(__name__)
PORT = 29500  # torchrun's default rendezvous port


@dataclass(frozen=True)
class Dist:
    """This process's place in a run, from the variables torchrun sets (rank 0 of 1 when not launched)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def builds_cache(self) -> bool:
        """One process per node tokenizes (a node may not share the cache volume); the others wait for it."""
        return self.local_rank == 0


def processes_per_node(requested: str) -> int:
    if requested != "auto":
        return int(requested)
    import torch

    return max(1, torch.cuda.device_count())


def torchrun_arguments(cfg: TrainConfig, argv: list[str]) -> list[str] | None:
    """torchrun's command line for this run, or None when one process suffices."""
    nproc = processes_per_node(cfg.nproc_per_node)
    if nproc == 1 and cfg.nnodes == "1":
        return None
    # No --max-restarts: torchrun reads PET_MAX_RESTARTS itself (the Training Operator sets it from
    # elasticPolicy.maxRestarts), and defaults to 0 where nothing sets it.
    args = [f"--nproc-per-node={nproc}", f"--nnodes={cfg.nnodes}"]
    if cfg.nnodes == "1":
        args.append("--standalone")
    elif ":" in cfg.nnodes:
        args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={cfg.rdzv_endpoint}"]
    else:
        host, _, port = cfg.rdzv_endpoint.rpartition(":")
        args += [f"--node-rank={cfg.node_rank}", f"--master-addr={host}", f"--master-port={port or PORT}"]
    return [*args, "-m", "entrypoint", *argv]


def run_torchrun(args: list[str]) -> int:
    """Run the torchrun agent in this process; return the first failed worker's exit code (ours, so a Job's
    podFailurePolicy sees DATA or PREEMPTED, not torchrun's generic 1)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import main as torchrun

    restarts = get_args_parser().parse_args(args).max_restarts  # what torchrun will use, PET_MAX_RESTARTS included
    log.info("launch: torchrun %s (worker group restarts allowed: %d)", " ".join(args), restarts)
    try:
        torchrun(args)
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        code = failure.exitcode
        return code if code in {int(c) for c in ExitCode} else int(ExitCode.INTERNAL)
    except SignalException:
        # The agent forwarded the signal and waited for the workers; they saved and exited PREEMPTED.
        return int(ExitCode.PREEMPTED)
    return int(ExitCode.OK)


SINGLE_PROCESS = Dist()
