"""Several processes on CPU (gloo), for real: the CLI re-launches itself under torchrun."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from bench.soak import kill_tree, stacks
from entrypoint.config.schema import TrainConfig
from entrypoint.errors import ExitCode
from entrypoint.runtime.launch import COLLECTIVE_TIMEOUT_S, GRACE_PERIOD_S, SHUTDOWN_TIMEOUT_S, torchrun_arguments
from entrypoint.train.preemption import STOP_CHECK_EVERY
from tests.support.helpers import FAST_TRAIN, REPO, Job, clean_env, finetune, train_env
from tests.support.runs import free_port

STEPWISE = {**FAST_TRAIN, "FINETUNE_LOGGING_STEPS": "1"}  # a log line per step, to signal at a known one


def test_stop_timeouts_fit_the_jobs_grace_period():
    job = yaml.safe_load((REPO / "k8s" / "base" / "job.yaml").read_text())
    assert job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == GRACE_PERIOD_S
    # The launcher must have stopped its workers, and exited with their code, before the kubelet's SIGKILL.
    assert COLLECTIVE_TIMEOUT_S < SHUTDOWN_TIMEOUT_S < GRACE_PERIOD_S


def test_one_process_needs_no_launcher():
    assert torchrun_arguments(TrainConfig(), ["train"]) is None


def test_launcher_arguments_per_topology():
    single = torchrun_arguments(TrainConfig(nproc_per_node="4"), ["train", "--x"])
    assert "--standalone" in single and single[-4:] == ["-m", "entrypoint", "train", "--x"]
    static = torchrun_arguments(TrainConfig(nnodes="2", node_rank=1, rdzv_endpoint="job-0.nodes:29400"), ["train"])
    assert {"--nnodes=2", "--node-rank=1", "--master-addr=job-0.nodes", "--master-port=29400"} <= set(static)
    elastic = torchrun_arguments(TrainConfig(nnodes="1:4", rdzv_endpoint="svc:29400"), ["train"])
    assert {"--rdzv-backend=c10d", "--rdzv-endpoint=svc:29400", "--nnodes=1:4"} <= set(elastic)


@pytest.mark.slow
def test_two_processes_train_one_model(tmp_path, tiny_model, corpus_dir):
    out = tmp_path / "out"
    result = finetune("train", "--nproc-per-node", "2", env=train_env(tiny_model, corpus_dir, out, base=STEPWISE))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["train_tokens"] == 2 * 16 * 8 * 32  # both ranks' batches, all real tokens
    assert (out / "model" / "COMPLETE").is_file()
    assert sorted(p.name for p in (out / "checkpoints" / "checkpoint-16").glob("rng_state_*")) == \
        ["rng_state_0.pth", "rng_state_1.pth"]
    assert result.stderr.count("done: eval loss") == 1, "only rank 0 reports"


@pytest.mark.slow
def test_two_processes_stop_together_on_sigterm_and_resume(tmp_path, tiny_model, corpus_dir):
    out = tmp_path / "out"
    env = train_env(tiny_model, corpus_dir, out, base=STEPWISE, FINETUNE_NPROC_PER_NODE="2")
    job = Job(env)
    job.wait_for(r"train step 5/")
    job.proc.send_signal(signal.SIGTERM)  # to the launcher only, as tini or the kubelet would
    start = time.monotonic()
    try:
        code, log = job.finish(timeout=120)
    except subprocess.TimeoutExpired:  # the teardown hang of issue 29: show where each process waits
        dump = stacks(job.proc.pid)
        kill_tree(job.proc.pid)
        pytest.fail(f"still running 120 s after SIGTERM:\n{dump}")
    assert code == ExitCode.PREEMPTED, log[-3000:]
    assert time.monotonic() - start < 60, "every process leaves within seconds of its last write"
    assert not (out / "model").exists()
    stopped = int(re.search(r"stopping at step (\d+)", log).group(1))
    assert stopped % STOP_CHECK_EVERY == 0 or stopped == 16, "ranks agree only every STOP_CHECK_EVERY steps"
    assert (out / "checkpoints" / f"checkpoint-{stopped}" / "finetune-complete.json").is_file()

    result = finetune("train", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"checkpoint-{stopped}" in re.search(r"resume: from .*", result.stderr).group(0)
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 16


@pytest.mark.slow
def test_two_processes_resumed_at_the_last_step_publish_with_whole_run_totals(tmp_path, tiny_model, corpus_dir):
    out = tmp_path / "out"
    env = train_env(tiny_model, corpus_dir, out, base=STEPWISE, FINETUNE_NPROC_PER_NODE="2")
    first = finetune("train", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    before = json.loads((out / "metrics.json").read_text())
    shutil.rmtree(out / "model")  # as if the publish had failed (exit 4) and the Job retried

    result = finetune("train", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint-16 is at step 16, the last is 16: publishing it without training" in result.stderr
    assert "train step" not in result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["global_step"], metrics["world_size"]) == (16, 2)
    assert metrics["train_tokens"] == before["train_tokens"] == 2 * 16 * 8 * 32  # summed over both ranks
    for key in ("eval_loss", "initial_eval_loss", "best_eval_loss"):
        assert metrics[key] == before[key], key
    assert (out / "model" / "COMPLETE").is_file()


@pytest.mark.slow
def test_two_nodes_rendezvous_over_loopback(tmp_path, tiny_model, corpus_dir):
    out = tmp_path / "out"
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "entrypoint", "train"], text=True, stderr=subprocess.PIPE,
                              env=train_env(tiny_model, corpus_dir, out, base=STEPWISE, FINETUNE_NNODES="2",
                                          FINETUNE_NODE_RANK=str(rank), FINETUNE_RDZV_ENDPOINT=endpoint))
             for rank in (0, 1)]
    logs = [node.communicate(timeout=300)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["global_step"]) == (2, 16)
    assert "done: eval loss" in logs[0] and "done: eval loss" not in logs[1]


def test_torchrun_takes_the_restart_count_the_platform_sets(monkeypatch):
    from torch.distributed.run import get_args_parser

    args = torchrun_arguments(TrainConfig(nnodes="1:4", rdzv_endpoint="svc:29400"), ["train"])
    assert not [a for a in args if a.startswith("--max-restarts")], "the launcher must not override the platform"
    monkeypatch.setenv("PET_MAX_RESTARTS", "3")  # what the Training Operator sets from elasticPolicy.maxRestarts
    assert get_args_parser().parse_args(args).max_restarts == 3
    monkeypatch.delenv("PET_MAX_RESTARTS")
    assert get_args_parser().parse_args(args).max_restarts == 0


def test_elastic_nodes_without_an_endpoint_is_a_usage_error(tmp_path):
    result = finetune("train", env=clean_env(FINETUNE_NNODES="1:4", FINETUNE_DATA_DIR=str(tmp_path)))
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert "--nnodes 1:4 (elastic) needs --rdzv-endpoint" in result.stderr
    assert "rdzv-endpoint=None" not in result.stderr and "launch: torchrun" not in result.stderr


def test_indexed_job_environment_sets_the_node_rank_and_endpoint():
    result = finetune("config", env=clean_env(JOB_COMPLETION_INDEX="1", MASTER_ADDR="finetune-0.finetune-nodes",
                                              MASTER_PORT="29500", FINETUNE_NNODES="2"))
    assert "node_rank: 1  # env JOB_COMPLETION_INDEX" in result.stdout
    assert "rdzv_endpoint: finetune-0.finetune-nodes:29500  # env MASTER_ADDR/MASTER_PORT" in result.stdout


def test_multi_node_without_an_endpoint_is_a_usage_error(tmp_path):
    result = finetune("train", env=clean_env(FINETUNE_NNODES="2", FINETUNE_DATA_DIR=str(tmp_path)))
    assert result.returncode == ExitCode.USAGE
    assert "--rdzv-endpoint" in result.stderr
