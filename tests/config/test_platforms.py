"""entrypoint/config/platforms.py: what launchers and controllers put in the environment becomes option defaults."""

from __future__ import annotations

from entrypoint.config.platforms import cluster_defaults

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
