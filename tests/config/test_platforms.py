"""entrypoint/config/platforms.py: what launchers and controllers put in the environment becomes option defaults."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from entrypoint.cli import cli
from entrypoint.config import platforms
from entrypoint.config.platforms import KUBEFLOW_INITIALIZERS, cluster_defaults, workspace_defaults
from tests.support.helpers import clean_env

# What Kubeflow Trainer v2's torch plugin sets in a TrainJob's container "node" (pod 1 of 2).
TRAINER = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": "1",
           "PET_MASTER_ADDR": "finetune-node-0-0.finetune", "PET_MASTER_PORT": "29500"}


def values(found: dict) -> dict:
    return {k: v for k, (v, _) in found.items()}


def test_trainer_v2_torch_plugin_variables_place_the_node():
    found = cluster_defaults(TRAINER)
    assert values(found) == {"nnodes": "2", "node_rank": "1", "nproc_per_node": "1",
                             "rdzv_endpoint": "finetune-node-0-0.finetune:29500"}
    assert found["rdzv_endpoint"][1] == "env PET_MASTER_ADDR/PET_MASTER_PORT"


def test_an_explicit_pet_rdzv_endpoint_wins_over_the_master_address():
    found = cluster_defaults({**TRAINER, "PET_RDZV_ENDPOINT": "elastic:29400", "MASTER_ADDR": "m", "MASTER_PORT": "1"})
    assert found["rdzv_endpoint"] == ("elastic:29400", "env PET_RDZV_ENDPOINT")


def test_a_torchrun_worker_takes_nodes_from_group_variables_and_the_endpoint_from_its_store():
    # Inside a worker PET_* describe the agent's launch and RANK/WORLD_SIZE count processes; torchrun sets the rest.
    worker = {**TRAINER, "LOCAL_RANK": "0", "RANK": "1", "WORLD_SIZE": "2", "GROUP_RANK": "1",
              "GROUP_WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "finetune-node-0-0.finetune",
              "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "none"}
    assert values(cluster_defaults(worker)) == {"nnodes": "2", "node_rank": "1", "nproc_per_node": "1",
                                                "rdzv_endpoint": "finetune-node-0-0.finetune:29500"}


def fill(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text("x")
    return directory


def test_the_initializers_workspace_gives_the_data_and_the_model_it_holds(tmp_path):
    assert workspace_defaults(tmp_path) == {}
    (tmp_path / "model").mkdir()  # an initializer the TrainJob did not ask for leaves an empty directory
    fill(tmp_path / "dataset", ".cache")  # hidden files are not data
    assert workspace_defaults(tmp_path) == {}
    fill(tmp_path / "dataset", "train.jsonl")
    assert workspace_defaults(tmp_path) == {"data_dir": str(tmp_path / "dataset")}
    fill(tmp_path / "model", "config.json")
    assert workspace_defaults(tmp_path) == {"data_dir": str(tmp_path / "dataset"), "model": str(tmp_path / "model")}


def test_finetune_config_shows_the_workspace_and_where_it_came_from_and_env_still_wins(tmp_path, monkeypatch):
    fill(tmp_path / "dataset", "train.txt")
    fill(tmp_path / "model", "config.json")
    monkeypatch.setattr(platforms, "WORKSPACE", tmp_path)
    result = CliRunner().invoke(cli, ["config", "--preset", "gpt2"], env=clean_env(), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"# platform contract applied: {KUBEFLOW_INITIALIZERS}" in result.output
    assert f"data_dir: {tmp_path / 'dataset'}  # {KUBEFLOW_INITIALIZERS}" in result.output
    assert f"model: {tmp_path / 'model'}  # {KUBEFLOW_INITIALIZERS}" in result.output  # over the preset's gpt2
    result = CliRunner().invoke(cli, ["config"], env=clean_env(FINETUNE_DATA_DIR="/data"), catch_exceptions=False)
    assert "data_dir: /data  # env FINETUNE_DATA_DIR" in result.output
