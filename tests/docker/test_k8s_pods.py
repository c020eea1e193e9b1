"""The Kubernetes overlays' pods, run as a cluster would run them but on one Docker engine: tests/docker/pods.py
translates the rendered manifests field by field (and refuses fields it cannot), so a manifest change that
breaks the container breaks these tests. As close to a cluster as CI gets without one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from tests.docker import jobs, jobsets, pods
from tests.docker.helpers import REPO, skip_or_fail

pytestmark = pytest.mark.docker

OVERLAYS = REPO / "k8s" / "overlays"
WAIT = 300  # s: at most this long for a Job's pods, or its activeDeadlineSeconds if shorter

# multi-node, as a CPU-only CI machine can run it. Why each line: test_multi_node_job_* below.
CPU_NODES = """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - {multi_node}
configMapGenerator:
  - name: finetune-config
    behavior: merge
    literals:
      - FINETUNE_PRESET=smoke
      - FINETUNE_MODEL=/model
      - FINETUNE_NPROC_PER_NODE=1
patches:
  - patch: |-
      apiVersion: batch/v1
      kind: Job
      metadata:
        name: finetune
      spec:
        template:
          spec:
            nodeSelector: null
            tolerations: null
            containers:
              - name: finetune
                resources:
                  requests: {{cpu: "1", memory: 4Gi, nvidia.com/gpu: null}}
                  limits: {{cpu: "1", memory: 4Gi, nvidia.com/gpu: null}}
                volumeMounts:
                  - {{name: model, mountPath: /model, readOnly: true}}
            volumes:
              - name: model
                persistentVolumeClaim: {{claimName: finetune-model, readOnly: true}}
"""


# trainjob and jobset, as a CPU-only CI machine can run them: the same overrides as CPU_NODES, said in each
# kind's own terms. A TrainingRuntime or JobSet is a custom resource, which kustomize patches as JSON (a list is
# replaced whole), so the runtime and the JobSet take JSON patches at fixed paths.
CPU_PATCHES = """\
      - {{op: remove, path: {pod}/nodeSelector}}
      - {{op: remove, path: {pod}/tolerations}}
      - {{op: add, path: {pod}/volumes/-,
          value: {{name: model, persistentVolumeClaim: {{claimName: finetune-model, readOnly: true}}}}}}
      - {{op: add, path: {pod}/containers/0/volumeMounts/-, value: {{name: model, mountPath: /model, readOnly: true}}}}
"""
CPU_TRAINJOB = """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - {overlay}
configMapGenerator:
  - name: finetune-config
    behavior: merge
    literals:
      - FINETUNE_PRESET=smoke
{model}patches:
  - target: {{kind: TrainingRuntime, name: {runtime}}}
    patch: |-
{runtime_patches}
  - target: {{kind: TrainJob, name: finetune}}
    patch: |-
      - op: add
        path: /spec/trainer/resourcesPerNode
        value: {{requests: {{cpu: "1", memory: 4Gi}}, limits: {{cpu: "1", memory: 4Gi}}}}
"""
CPU_JOBSET = """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - {overlay}
configMapGenerator:
  - name: finetune-config
    behavior: merge
    literals:
      - FINETUNE_PRESET=smoke
      - FINETUNE_MODEL=/model
patches:
  - target: {{kind: JobSet, name: finetune}}
    patch: |-
{jobset_patches}
      - op: replace
        path: /spec/replicatedJobs/0/template/spec/template/spec/containers/0/resources
        value: {{requests: {{cpu: "1", memory: 4Gi}}, limits: {{cpu: "1", memory: 4Gi}}}}
"""


def cpu_overlay(tmp_path: Path, overlay: str) -> list[dict]:
    directory = tmp_path / f"cpu-{overlay}"
    directory.mkdir()
    relative = os.path.relpath(OVERLAYS / overlay, directory)
    if overlay == "trainjob":
        text = CPU_TRAINJOB.format(overlay=relative, runtime="finetune", model="      - FINETUNE_MODEL=/model\n",
                                   runtime_patches=CPU_PATCHES.format(
                                       pod="/spec/template/spec/replicatedJobs/0/template/spec/template/spec"))
    elif overlay == "trainjob-initializers":  # the model is the one the model initializer left in /workspace
        patches = CPU_PATCHES.format(pod="/spec/template/spec/replicatedJobs/2/template/spec/template/spec")
        text = CPU_TRAINJOB.format(overlay=relative, runtime="finetune-initializers", model="",
                                   runtime_patches="\n".join(patches.splitlines()[:2]) + "\n")
    else:
        text = CPU_JOBSET.format(overlay=relative, jobset_patches=CPU_PATCHES.format(
            pod="/spec/replicatedJobs/0/template/spec/template/spec"))
    (directory / "kustomization.yaml").write_text(text)
    return jobs.render(directory)


@pytest.fixture(scope="module")
def kubectl() -> str:
    if shutil.which(jobs.KUBECTL) is None:
        skip_or_fail(f"{jobs.KUBECTL} not on PATH: install kubectl to render k8s/ (no cluster needed)")
    return jobs.KUBECTL


def wait_for(job: dict) -> float:
    return min(WAIT, job["spec"].get("activeDeadlineSeconds", WAIT))


def assert_succeeded(results: dict[str, jobs.Result]) -> None:
    failed = [str(r) for r in results.values() if r.exit_code != 0]
    assert not failed, "\n\n".join(failed)


def assert_published(cluster: pods.Cluster, pod: pods.Pod, output_pvc: Path) -> dict:
    """The model is published where the pod's rendered FINETUNE_OUTPUT_DIR points, on the output PVC, after
    the preset's number of steps; returns metrics.json."""
    (container,) = pod.spec["containers"]
    env = cluster.env(pod, container)
    published = cluster.host_path(pod, container, env["FINETUNE_OUTPUT_DIR"])
    assert published.is_relative_to(output_pvc), f"FINETUNE_OUTPUT_DIR {published} is not on the output PVC"
    assert (published / "model" / "COMPLETE").is_file(), sorted(str(p) for p in output_pvc.rglob("*"))
    assert json.loads((published / "status.json").read_text())["state"] == "succeeded"
    metrics = json.loads((published / "metrics.json").read_text())
    preset = yaml.safe_load((REPO / "config" / f"{env['FINETUNE_PRESET']}.yaml").read_text())
    assert metrics["global_step"] == preset["max_steps"]
    return metrics


def test_cpu_smoke_job_builds_its_inputs_trains_and_publishes_with_no_network(
        kubectl, cpu_image, output_dir, container_name, tmp_path):
    """The cpu-smoke Job's one pod exactly as rendered: init containers corpus and init-model, then train,
    under the manifests' users, fsGroup, read-only root, dropped capabilities, limits and volumes, with no
    network at all (the overlay promises a run without the Hub). The output PVC is a host directory; the
    image the overlay names, finetune:cpu, is the one `make image-cpu` builds (the cpu_image fixture)."""
    objects = jobs.render(OVERLAYS / "cpu-smoke")
    job = jobs.the_one(objects, "Job")
    (pod,) = jobs.job_pods(job)
    cluster = pods.Cluster(objects, images={"finetune:cpu": cpu_image}, claims={"finetune-output": output_dir},
                           workdir=tmp_path / "pods", prefix=container_name)
    with jobs.sandbox(cluster):
        results = jobs.run(cluster, [pod], timeout=wait_for(job))

    assert_succeeded(results)
    assert [name.removeprefix(f"{container_name}-{pod.name}-") for name in results] == \
        ["corpus", "init-model", "finetune"]
    assert_published(cluster, pod, output_dir)
    owners = {p.stat().st_uid for p in output_dir.rglob("*")}
    assert owners == {pod.spec["securityContext"]["runAsUser"]}


def test_multi_node_job_trains_one_model_across_two_pods_found_through_the_headless_service(
        kubectl, cpu_image, container_assets, output_dir, container_name, tmp_path):
    """The multi-node Job's two pods, each a container on one internal Docker network under the hostname the
    Indexed Job gives it (<job>-<index>) and the DNS names its headless Service gives it
    (<job>-<index>.<service>, and the cluster FQDN), with JOB_COMPLETION_INDEX and the downward-API
    FINETUNE_NODE_RANK, sharing one output directory as a ReadWriteMany PVC would. Rank 0 publishes.

    Overridden, by the kustomize overlay CPU_NODES on top of multi-node, because CI has one 2-core machine
    and no GPU:
      - nvidia.com/gpu requests and limits, nodeSelector and tolerations: removed (no GPU to ask for);
      - cpu and memory: 1 core and 4Gi per pod instead of 32 and 192Gi, so both pods fit on this machine
        (docker refuses --cpus above the host's cores, as a scheduler would find no node);
      - FINETUNE_NPROC_PER_NODE=1 instead of 4: one process per CPU-only pod;
      - FINETUNE_PRESET=smoke instead of gpt2 (30 steps, not GPT-2 124M for hours);
      - FINETUNE_MODEL=/model: the tiny model from the container_assets fixture, on a new read-only volume
        (PVC finetune-model), since nothing may be downloaded;
      - the image: the CPU image (cpu_image) in place of the CUDA image finetune:latest.
    Not overridden: FINETUNE_DATA_DIR stays /data, with the finetune-data PVC bound to the corpus directory;
    FINETUNE_NNODES, FINETUNE_RDZV_ENDPOINT, the Service, the security context and the other volumes are the
    overlay's own."""
    overlay = tmp_path / "cpu-nodes"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        CPU_NODES.format(multi_node=os.path.relpath(OVERLAYS / "multi-node", overlay)))
    objects = jobs.render(overlay)
    job = jobs.the_one(objects, "Job")
    nodes = jobs.job_pods(job)
    assert len(nodes) == 2
    claims = {"finetune-data": container_assets["data"], "finetune-model": container_assets["model"],
              "finetune-output": output_dir}
    cluster = pods.Cluster(objects, images={"finetune:latest": cpu_image}, claims=claims,
                           workdir=tmp_path / "pods", prefix=container_name, network=True)
    envs = [cluster.env(pod, pod.spec["containers"][0]) for pod in nodes]
    assert [(e["JOB_COMPLETION_INDEX"], e["FINETUNE_NODE_RANK"]) for e in envs] == [("0", "0"), ("1", "1")]
    with jobs.sandbox(cluster):
        results = jobs.run(cluster, nodes, timeout=wait_for(job))

    assert_succeeded(results)
    assert assert_published(cluster, nodes[0], output_dir)["world_size"] == 2
    # Both trained; only rank 0 (pod 0) published and said so.
    assert ["done: " in r.logs for r in results.values()] == [True, False]


def simulated_initializers(initializers: list[dict], assets: dict[str, Path], tmp_path: Path) -> Path:
    """The workspace volume as the two initializer Jobs leave it, /workspace/{dataset,model}: the test's corpus and
    tiny model stand in for the downloads of their STORAGE_URI."""
    uris = {}
    for job in initializers:
        (container,) = job["spec"]["template"]["spec"]["containers"]
        uris[container["name"]] = {e["name"]: e.get("value") for e in container["env"]}["STORAGE_URI"]
    assert sorted(uris) == ["dataset-initializer", "model-initializer"] and all("://" in u for u in uris.values())
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    for folder, asset in (("dataset", "data"), ("model", "model")):
        shutil.copytree(assets[asset], workspace / folder)
    for path in [workspace, *workspace.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return workspace


def test_jobset_overlay_gives_its_pods_the_names_ranks_and_rendezvous_the_controller_does(kubectl, tmp_path):
    """The jobset overlay's JobSet made into its child Job and headless Service as the JobSet controller makes
    them: pod i is finetune-node-0-i, named finetune-node-0-i.finetune by the Service, with FINETUNE_NODE_RANK i,
    FINETUNE_NNODES the pod count and the rendezvous at pod 0's DNS name on the port its container exposes. That
    pods placed by these FINETUNE_ variables train one model across two nodes is run below, by the multi-node
    Job (the same variables from an Indexed Job); a two-node run costs 1 to 3 minutes of the suite's budget."""
    objects = cpu_overlay(tmp_path, "jobset")
    jobset = jobs.the_one(objects, "JobSet")
    (child,), service = jobsets.children(jobset)
    nodes = jobs.job_pods(child)
    assert [pod.hostname for pod in nodes] == ["finetune-node-0-0", "finetune-node-0-1"]
    assert service["metadata"]["name"] == "finetune" and service["spec"]["clusterIP"] == "None"
    assert all(pod.spec["subdomain"] == "finetune" for pod in nodes)
    cluster = pods.Cluster([*objects, service], images={}, claims={}, workdir=tmp_path / "pods", prefix="static")
    envs = [cluster.env(pod, pod.spec["containers"][0]) for pod in nodes]
    assert [e["FINETUNE_NODE_RANK"] for e in envs] == ["0", "1"]
    assert {e["FINETUNE_NNODES"] for e in envs} == {str(len(nodes))}
    port = next(p["containerPort"] for p in nodes[0].spec["containers"][0]["ports"])
    assert {e["FINETUNE_RDZV_ENDPOINT"] for e in envs} == {f"finetune-node-0-0.finetune:{port}"}


# trainjob-initializers stands for trainjob too: its trainer pods are trainjob's plus the workspace volume
# (tests/project/test_k8s.py compares them), and one two-node run costs 1 to 3 minutes of the suite's budget.
def test_trainjob_pods_train_one_model_across_two_nodes_with_the_controllers_environment(
        kubectl, cpu_image, container_assets, output_dir, container_name, tmp_path):
    """The trainjob-initializers overlay's TrainJob, made into a JobSet as Kubeflow Trainer makes it (the runtime's
    JobSet template, numNodes as the node Job's parallelism, resourcesPerNode, and the torch plugin's PET_NNODES,
    PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR <trainjob>-node-0-0.<trainjob>, PET_MASTER_PORT); then, as
    the JobSet controller does, the child Job finetune-node-0 and the headless Service finetune; then its two pods
    (tests/docker/jobsets.py, jobs.py, pods.py) as two containers on one network under the names that Service
    gives them. Rank 0 publishes to the shared output directory. Overridden for a 2-core CPU machine, as in the
    multi-node test: GPU resources, nodeSelector and tolerations, 1 core and 4Gi per pod (the TrainJob's
    resourcesPerNode) and the smoke preset. The initializer Jobs' downloads are the corpus and the tiny model put
    in the workspace volume as they would leave them (their images need the network); the trainer pods train
    from /workspace."""
    objects = cpu_overlay(tmp_path, "trainjob-initializers")
    jobset = jobsets.from_trainjob(jobs.the_one(objects, "TrainJob"), jobs.the_one(objects, "TrainingRuntime"))
    (*initializers, child), service = jobsets.children(jobset)
    nodes = jobs.job_pods(child)
    assert [pod.hostname for pod in nodes] == ["finetune-node-0-0", "finetune-node-0-1"]
    claims = {"finetune-data": container_assets["data"], "finetune-model": container_assets["model"],
              "finetune-output": output_dir,
              "finetune-workspace": simulated_initializers(initializers, container_assets, tmp_path)}
    cluster = pods.Cluster([*objects, service], images={"finetune:latest": cpu_image}, claims=claims,
                           workdir=tmp_path / "pods", prefix=container_name, network=True)
    envs = [cluster.env(pod, pod.spec["containers"][0]) for pod in nodes]
    assert [(e["PET_NODE_RANK"], e["PET_MASTER_ADDR"], e["PET_NNODES"]) for e in envs] == \
        [("0", "finetune-node-0-0.finetune", "2"), ("1", "finetune-node-0-0.finetune", "2")]
    with jobs.sandbox(cluster):
        results = jobs.run(cluster, nodes, timeout=wait_for(child))

    assert_succeeded(results)
    assert assert_published(cluster, nodes[0], output_dir)["world_size"] == 2
    assert ["done: " in r.logs for r in results.values()] == [True, False]
    for r in results.values():
        assert "data_dir from kubeflow initializer" in r.logs and "model from kubeflow initializer" in r.logs, r
        # The Trainer's variables, not a FINETUNE_ value, placed the nodes.
        assert "rdzv_endpoint from env PET_MASTER_ADDR/PET_MASTER_PORT" in r.logs, r
        assert "nnodes from env PET_NNODES" in r.logs and "node_rank from env PET_NODE_RANK" in r.logs, r


def test_a_pod_spec_field_without_a_translation_fails_rather_than_being_ignored(kubectl, tmp_path):
    objects = jobs.render(OVERLAYS / "cpu-smoke")
    job = jobs.the_one(objects, "Job")
    job["spec"]["template"]["spec"]["containers"][0]["livenessProbe"] = {"exec": {"command": ["true"]}}
    (pod,) = jobs.job_pods(job)
    cluster = pods.Cluster(objects, images={"finetune:cpu": "unused"}, claims={}, workdir=tmp_path, prefix="x")
    with pytest.raises(pods.NotTranslated, match="livenessProbe"):
        cluster.commands(pod)
