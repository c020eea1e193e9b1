"""Defaults that a platform or launcher already decided: SageMaker's and Vertex AI's training contracts, Kubeflow
Trainer's initializers (the dataset and model they downloaded into /workspace), and the node count and rank that
torchrun, an Indexed Job, Kubeflow Trainer v2 (TrainJob) or the Training Operator put in the environment.

Each function reads a mapping (the CLI passes os.environ) and returns option values with where they came from.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

from entrypoint.errors import ConfigError


def gcs_to_fuse(uri: str) -> str:
    """Vertex AI mounts buckets with Cloud Storage FUSE: gs://bucket/x is /gcs/bucket/x."""
    return "/gcs/" + uri[len("gs://"):] if uri.startswith("gs://") else uri


# Kubeflow Trainer's dataset and model initializers download into these, on a volume the trainer pods mount.
WORKSPACE = Path("/workspace")
WORKSPACE_DIRS = {"data_dir": "dataset", "model": "model"}
KUBEFLOW_INITIALIZERS = "kubeflow initializer"


def workspace_defaults(workspace: Path | None = None) -> dict[str, Any]:
    """data_dir and model from what Kubeflow Trainer's initializers left in /workspace/dataset and /workspace/model:
    each only when its directory holds something (an initializer the TrainJob did not ask for leaves none)."""
    root = workspace or WORKSPACE
    values = {}
    for name, folder in WORKSPACE_DIRS.items():
        directory = root / folder
        try:
            if directory.is_dir() and any(p for p in directory.iterdir() if not p.name.startswith(".")):
                values[name] = str(directory)
        except OSError:  # unreadable: not ours to use
            continue
    return values


def platform_defaults(environ: typing.Mapping[str, str]) -> tuple[str | None, dict[str, Any]]:
    """Defaults from SageMaker's or Vertex AI's training contract, or Kubeflow Trainer's initializers, and the
    platform's name."""
    if "SM_MODEL_DIR" in environ or "SM_CHANNEL_TRAIN" in environ or "SM_TRAINING_ENV" in environ:
        values: dict[str, Any] = {"checkpoint_dir": "/opt/ml/checkpoints"}
        if "SM_CHANNEL_TRAIN" in environ:
            values["data_dir"] = environ["SM_CHANNEL_TRAIN"]
        if "SM_CHANNEL_VALIDATION" in environ:
            values["valid_file"] = [environ["SM_CHANNEL_VALIDATION"]]
        if "SM_MODEL_DIR" in environ:
            values["output_dir"] = environ["SM_MODEL_DIR"]
        hps = environ.get("SM_HPS")
        if hps:
            try:
                parsed = json.loads(hps)
            except json.JSONDecodeError:
                raise ConfigError("SM_HPS is not valid JSON; check the estimator's hyperparameters.") from None
            values.update({k.replace("-", "_"): v for k, v in parsed.items()})
        return "sagemaker", values
    if any(k.startswith("AIP_") for k in environ):
        values = {}
        if "AIP_MODEL_DIR" in environ:
            values["output_dir"] = gcs_to_fuse(environ["AIP_MODEL_DIR"])
        if "AIP_CHECKPOINT_DIR" in environ:
            values["checkpoint_dir"] = gcs_to_fuse(environ["AIP_CHECKPOINT_DIR"])
        if "AIP_TENSORBOARD_LOG_DIR" in environ:
            values["tensorboard_dir"] = gcs_to_fuse(environ["AIP_TENSORBOARD_LOG_DIR"])
        return "vertex", values
    if values := workspace_defaults():
        return KUBEFLOW_INITIALIZERS, values
    return None, {}


def cluster_defaults(environ: typing.Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    """Where a launcher or Job controller already said how many nodes there are and which one this is.

    Inside a torchrun worker RANK/WORLD_SIZE count processes, so there the node values come from torchrun's
    GROUP_* variables instead. Returns name -> (value, the variable it came from).
    """
    if "LOCAL_RANK" in environ or "TORCHELASTIC_RUN_ID" in environ:
        pairs = {"nnodes": "GROUP_WORLD_SIZE", "node_rank": "GROUP_RANK", "nproc_per_node": "LOCAL_WORLD_SIZE"}
        found = {k: (environ[v], f"env {v}") for k, v in pairs.items() if v in environ}
        # torchrun gives every worker its store's address; with --nnodes > 1 the config check needs an endpoint
        # even when the agent got its own from PET_* variables that the worker does not read.
        if environ.get("MASTER_ADDR") and environ.get("MASTER_PORT"):
            found["rdzv_endpoint"] = (f"{environ['MASTER_ADDR']}:{environ['MASTER_PORT']}",
                                      "env MASTER_ADDR/MASTER_PORT")
        return found
    found: dict[str, tuple[Any, str]] = {}
    for name, candidates in (("nnodes", ("PET_NNODES",)),
                             ("node_rank", ("PET_NODE_RANK", "JOB_COMPLETION_INDEX", "RANK")),
                             ("rdzv_endpoint", ("PET_RDZV_ENDPOINT",)),
                             ("nproc_per_node", ("PET_NPROC_PER_NODE",))):
        var = next((v for v in candidates if environ.get(v)), None)
        if var:
            found[name] = (environ[var], f"env {var}")
    # Kubeflow Trainer v2's torch plugin: PET_MASTER_ADDR is <trainjob>-node-0-0.<trainjob>, pod 0's DNS name.
    if "rdzv_endpoint" not in found and environ.get("PET_MASTER_ADDR") and environ.get("PET_MASTER_PORT"):
        found["rdzv_endpoint"] = (f"{environ['PET_MASTER_ADDR']}:{environ['PET_MASTER_PORT']}",
                                  "env PET_MASTER_ADDR/PET_MASTER_PORT")
    if "rdzv_endpoint" not in found and environ.get("MASTER_ADDR") and environ.get("MASTER_PORT"):
        found["rdzv_endpoint"] = (f"{environ['MASTER_ADDR']}:{environ['MASTER_PORT']}", "env MASTER_ADDR/MASTER_PORT")
    if "nnodes" not in found and environ.get("MASTER_ADDR") and environ.get("WORLD_SIZE"):
        found["nnodes"] = (environ["WORLD_SIZE"], "env WORLD_SIZE")  # a Job controller's per-pod world
    return found


def shard_default(environ: typing.Mapping[str, str]) -> int:
    """The share of a sharded `prepare` this pod takes: an Indexed Job's completion index, else 0."""
    index = environ.get("JOB_COMPLETION_INDEX", "")
    return int(index) if index.isdigit() else 0
