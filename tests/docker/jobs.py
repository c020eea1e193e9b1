"""A Job's pods on one Docker engine: rendered by `kubectl kustomize`, made as the Job controller makes them,
translated by tests/docker/pods.py, then started, awaited and cleaned up as a kubelet would.

    objects = jobs.render(REPO / "k8s/overlays/cpu-smoke")
    job = jobs.the_one(objects, "Job")
    cluster = pods.Cluster(objects, images={"finetune:cpu": cpu_image}, claims={"finetune-output": output_dir},
                           workdir=tmp_path / "pods", prefix=container_name)
    with jobs.sandbox(cluster):  # removes every container and network made for it, whatever happens
        results = jobs.run(cluster, jobs.job_pods(job), timeout=300)
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.docker.helpers import docker
from tests.docker.pods import LABEL, Cluster, NotTranslated, Pod, allow

KUBECTL = os.environ.get("KUBECTL", "kubectl")
INDEX_KEY = "batch.kubernetes.io/job-completion-index"
JOB_FIELDS = {"template", "completions", "parallelism", "completionMode",
              # Retries, deadlines and clean-up are the Job controller's; one attempt runs here (the
              # tests bound their wait by activeDeadlineSeconds).
              "backoffLimit", "podFailurePolicy", "podReplacementPolicy", "activeDeadlineSeconds",
              "ttlSecondsAfterFinished"}

STOP_GRACE = 30  # s: SIGTERM to SIGKILL for containers stopped early; shorter than the pods' own grace period


def render(path: Path) -> list[dict]:
    """The objects `kubectl kustomize` builds from a kustomization directory, offline."""
    result = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj]


def the_one(objects: list[dict], kind: str) -> dict:
    (obj,) = [o for o in objects if o["kind"] == kind]
    return obj


def job_pods(job: dict) -> list[Pod]:
    """The pods the Job controller creates for `job`: names, labels, the completion index annotation and
    JOB_COMPLETION_INDEX variable, and the <job>-<index> hostname of an Indexed Job."""
    spec = allow(job["spec"], JOB_FIELDS, "Job.spec")
    completions, parallelism = spec.get("completions", 1), spec.get("parallelism", 1)
    if completions != parallelism:
        raise NotTranslated(f"parallelism {parallelism} != completions {completions}: pods would run in waves")
    allow(spec["template"], {"metadata", "spec"}, "Job.spec.template")
    meta = allow(spec["template"].get("metadata", {}), {"labels", "annotations"}, "pod template metadata")
    name, uid = job["metadata"]["name"], str(uuid.uuid4())
    indexed = spec.get("completionMode", "NonIndexed") == "Indexed"
    pods = []
    for index in range(completions):
        labels = {**meta.get("labels", {}), "batch.kubernetes.io/controller-uid": uid, "controller-uid": uid,
                  "batch.kubernetes.io/job-name": name, "job-name": name}
        annotations = dict(meta.get("annotations", {}))
        pod_spec = copy.deepcopy(spec["template"]["spec"])
        suffix = "".join(secrets.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))
        pod_name = f"{name}-{suffix}"
        if indexed:
            labels[INDEX_KEY] = annotations[INDEX_KEY] = str(index)
            pod_spec.setdefault("hostname", f"{name}-{index}")
            pod_name = f"{name}-{index}-{suffix}"
            for container in [*pod_spec.get("initContainers", []), *pod_spec["containers"]]:
                if not any(var["name"] == "JOB_COMPLETION_INDEX" for var in container.get("env", [])):
                    container.setdefault("env", []).append({"name": "JOB_COMPLETION_INDEX", "valueFrom": {
                        "fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_KEY}']"}}})
        pods.append(Pod(pod_name, job["metadata"].get("namespace", "default"), labels, annotations, pod_spec))
    return pods


@dataclass
class Result:
    """One container's run: exit code, logs, and the termination message `kubectl describe pod` shows."""

    container: str
    exit_code: int
    logs: str
    message: str

    def __str__(self) -> str:
        return (f"{self.container}: exit {self.exit_code}\n{self.logs[-6000:]}\n"
                f"--- termination message\n{self.message}")


@contextlib.contextmanager
def sandbox(cluster: Cluster):
    """The cluster's network, if it has one; on the way out, whatever happened, every container and network
    labelled with its prefix is removed."""
    selector = f"label={LABEL}={cluster.prefix}"
    try:
        if cluster.network:
            # Internal: the pods reach each other, and nothing outside (the model and data are local).
            docker("network", "create", "--internal", "--label", f"{LABEL}={cluster.prefix}", cluster.network,
                   check=True, timeout=60)
        yield cluster
    finally:
        containers = docker("ps", "-aq", "--filter", selector, timeout=60).stdout.split()
        if containers:
            docker("rm", "-f", *containers, timeout=120)
        for network in docker("network", "ls", "-q", "--filter", selector, timeout=60).stdout.split():
            docker("network", "rm", network, timeout=60)


def run(cluster: Cluster, pods: list[Pod], timeout: float) -> dict[str, Result]:
    """Run each pod's init containers in order, then its container, all pods at once, and wait at most
    `timeout` seconds. A failed init container fails its pod; a failed container stops the others (pods that
    wait on each other would otherwise hang until the deadline). Results by container name, in start order."""
    commands = [cluster.commands(pod) for pod in pods]  # every pod translated before anything starts
    deadline = time.monotonic() + timeout
    results: dict[str, Result] = {}
    running = []
    for inits, containers in commands:
        for command in inits:
            name = name_in(command)
            docker(*command, timeout=max(1.0, deadline - time.monotonic()))
            results[name] = result(cluster, name)
            if results[name].exit_code != 0:
                return results
        for command in containers:
            docker(*command, check=True, timeout=120)
            running.append(name_in(command))
    while running and time.monotonic() < deadline and all(r.exit_code == 0 for r in results.values()):
        time.sleep(1)
        for name in list(running):
            if not state(name)["Running"]:
                running.remove(name)
                results[name] = result(cluster, name)
    for name in running:  # past the deadline, or another pod failed
        docker("stop", "--time", str(STOP_GRACE), name, timeout=STOP_GRACE + 60)
        results[name] = result(cluster, name)
    started = [name_in(command) for inits, containers in commands for command in [*inits, *containers]]
    return {name: results[name] for name in started if name in results}


def name_in(command: list[str]) -> str:
    return command[command.index("--name") + 1]


def state(name: str) -> dict:
    return json.loads(docker("inspect", "-f", "{{json .State}}", name, check=True).stdout)


def result(cluster: Cluster, name: str) -> Result:
    logs = docker("logs", name, timeout=60)
    return Result(name, state(name)["ExitCode"], logs.stdout + logs.stderr,
                  cluster.termination_logs[name].read_text())
