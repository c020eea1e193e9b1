"""`train`: the job in this process, or this same command again under torchrun when the run wants several
processes (runtime/launch.py drives torchrun), and the run's one-line summary last."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from entrypoint import logs
from entrypoint.config.schema import TrainConfig
from entrypoint.publish.remote import RemoteCheckpoints
from entrypoint.runtime.launch import Dist, run_torchrun, torchrun_arguments
from entrypoint.train import checkpoints, job
from entrypoint.train.metrics import final_line
from entrypoint.train.preflight import preflight


def relaunch(cfg: TrainConfig, argv: list[str], environ: Mapping[str, str]) -> int | None:
    """Run `finetune <argv>` under torchrun when the configuration asks for several processes and this process is
    not already one of them: returns the run's exit code (a worker's failure is raised as the run's,
    launch.WorkerFailed), or None to train in this process."""
    if "LOCAL_RANK" in environ or (cfg.nproc_per_node, cfg.nnodes) == ("1", "1"):
        return None
    preflight(cfg, environ=environ)  # one clean error here rather than one per worker
    if cfg.checkpoint_to:  # every node needs the files: its launcher fetches them before the workers choose
        remote = RemoteCheckpoints(cfg.checkpoint_to, checkpoints.MARKER, cfg.save_total_limit,
                                   attempts=cfg.store_retries + 1)
        checkpoints.fetch(cfg, remote)
    args = torchrun_arguments(cfg, argv)
    return run_torchrun(args) if args else None


def train(cfg: TrainConfig, sources: dict[str, str], dist: Dist, environ: Mapping[str, str],
          blocked_exit: Callable[[str], None]) -> None:
    """Train and publish (train/job.py), then log the summary line on rank 0."""
    metrics = job.run(cfg, sources, dist, environ, blocked_exit=blocked_exit)
    if metrics and dist.is_main:
        logs.area("done").info(final_line(metrics, cfg.output_dir / "model"), **metrics)
