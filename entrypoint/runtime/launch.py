"""Several processes: the CLI re-launches itself under torchrun (torch.distributed elastic) with the same
arguments and environment, and exits with the workers' own exit code.

One node: `--standalone`. Several nodes with a known node rank (Indexed Jobs, explicit flags): static
rendezvous, so node 0 hosts the store whatever DNS name the others reach it by. Elastic ranges (`--nnodes 1:4`,
the Training Operator's PET_* variables): c10d rendezvous at the endpoint, which must be given.

Worker-group restarts are torchrun's own: as many as PET_MAX_RESTARTS says (the Training Operator sets it from
elasticPolicy.maxRestarts), none where nothing sets it. Each restart resumes from the last complete checkpoint.

One stops, all stop. On a node, torchrun's agent notices a worker's exit within its monitor interval (0.1 s) and
sends the others SIGTERM, then SIGKILL after SHUTDOWN_TIMEOUT_S. A worker waiting in a collective for a rank that
has exited gets an error at once (gloo: the peer's sockets close, on any node); a peer that vanished without closing
them (a node lost) is given up on after COLLECTIVE_TIMEOUT_S. The launcher exits with the originating worker's code.
If the launcher itself is killed, its workers die with it (`die_with_launcher`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from dataclasses import dataclass

from entrypoint import logs
from entrypoint.config.schema import TrainConfig
from entrypoint.errors import ExitCode, FinetuneError

log = logs.area("launch")
PORT = 29500  # torchrun's default rendezvous port

# The Job's terminationGracePeriodSeconds (k8s/base/job.yaml): seconds from the kubelet's SIGTERM to its SIGKILL.
GRACE_PERIOD_S = 300
# After a signal or a failed worker, the agent waits this long for the others before it SIGKILLs them: time for a
# step and a checkpoint save, with 30 s left for the launcher to collect their codes and exit with one before the
# kubelet's SIGKILL (a pod killed at the end of its grace period exits 137, which a failure policy cannot read).
SHUTDOWN_TIMEOUT_S = GRACE_PERIOD_S - 30
# The longest a collective waits for a peer (Trainer's ddp_timeout, also process group start-up): the longest wait
# that is not a failure is ranks waiting for rank 0's checkpoint save, which the grace period must cover anyway.
# Nodes that prepare data for longer than this apart should run `finetune prepare` first.
COLLECTIVE_TIMEOUT_S = GRACE_PERIOD_S - 60
LAUNCHER_PID = "FINETUNE_LAUNCHER_PID"  # set by the launcher for its workers


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
    """Run the torchrun agent in this process and return 0, or PREEMPTED when the launcher was signalled; raise the
    originating worker's failure (WorkerFailed, with our code, so a Job's podFailurePolicy sees DATA or OOM, not
    torchrun's generic 1)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import main as torchrun

    restarts = get_args_parser().parse_args(args).max_restarts  # what torchrun will use, PET_MAX_RESTARTS included
    log.info(f"torchrun {' '.join(args)} (worker group restarts allowed: {restarts})")
    os.environ[LAUNCHER_PID] = str(os.getpid())
    # The agent forwards SIGTERM to the workers (or stops them when one fails), then SIGKILLs any left after this
    # many seconds: a step and a checkpoint save, ending inside the Job's grace period.
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))
    try:
        torchrun(args)
    except ChildFailedError as exc:
        raise originating(exc.failures) from None
    except SignalException:
        # The agent forwarded the signal and waited for the workers; they saved and exited PREEMPTED.
        return int(ExitCode.PREEMPTED)
    return int(ExitCode.OK)


class WorkerFailed(FinetuneError):
    """A worker's failure, raised again by the launcher: the run's exit code and its one-line message."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = ExitCode(code)


def originating(failures: dict) -> WorkerFailed:
    """The failure of the worker that failed first (torchrun's ProcessFailure by global rank). torchrun's own choice
    (`get_first_failure`) compares whole-second stamps taken when the agent noticed each exit, so a rank stopped
    because another failed can win a tie; our workers record the moment they failed (`record_failure`) to the
    microsecond. A worker killed by a signal records nothing: it died before the agent noticed (within its 0.1 s
    monitor interval), so it counts from a second before the agent's whole-second stamp."""
    def when(rank: int) -> float:
        data = failures[rank].error_file_data
        return (data.get("finetune") or {}).get("time", failures[rank].timestamp - 1)

    rank = min(failures, key=when)
    failure = failures[rank]
    code, ours = exit_code_of(failure.exitcode), failure.error_file_data.get("finetune")
    if ours:
        return WorkerFailed(code, failure.error_file_data.get("message", ""))
    if failure.exitcode == -signal.SIGKILL:
        return WorkerFailed(code, f"rank {rank} was killed (SIGKILL), most often by the kernel at the memory limit; "
                                  "raise the pod's memory limit or lower --batch-size, then rerun to resume.")
    return WorkerFailed(code, f"rank {rank} ended with {_status(failure.exitcode)}, a crash (a bug): report it with "
                              "the log above; rerun to resume.")


def _status(code: int) -> str:
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def exit_code_of(worker_code: int) -> int:
    """Ours, from a worker's exit status. SIGKILL inside a pod is the kernel's OOM killer at the memory limit, as for
    a tokenizing process (forkpool); any other signal, or a code not in our table, is a crash: a bug."""
    if worker_code == -signal.SIGKILL:
        return int(ExitCode.OOM)
    return worker_code if worker_code in {int(c) for c in ExitCode} else int(ExitCode.INTERNAL)


def record_failure(code: int, message: str, when: float) -> None:
    """In a torchrun worker: leave this failure's code and moment where the agent reads it (the error file torchrun
    names in TORCHELASTIC_ERROR_FILE), so the launcher can tell the originating rank from those it stopped."""
    import json

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w") as f:
            json.dump({"message": message, "timestamp": int(when),
                       "finetune": {"exit_code": code, "time": when}}, f)


def die_with_launcher() -> None:
    """In a torchrun worker, at start: the kernel SIGKILLs this process when the launcher (its parent) dies, even by
    SIGKILL, so no orphan goes on training or holds the output's lease. Linux only (prctl PR_SET_PDEATHSIG); if the
    launcher is already gone when this runs, the worker kills itself."""
    if sys.platform != "linux":
        return
    pr_set_pdeathsig = 1  # <linux/prctl.h>
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning(f"prctl(PR_SET_PDEATHSIG) failed (errno {ctypes.get_errno()}); workers may outlive a killed "
                    "launcher")
        return
    if str(os.getppid()) != os.environ.get(LAUNCHER_PID, str(os.getppid())):
        os.kill(os.getpid(), signal.SIGKILL)  # the launcher died before the request was in place


SINGLE_PROCESS = Dist()
