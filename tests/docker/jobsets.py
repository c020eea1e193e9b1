"""What the Kubeflow Trainer and JobSet controllers make of the rendered objects, down to batch Jobs that
tests/docker/jobs.py turns into pods:

    jobset = jobsets.from_trainjob(trainjob, runtime)   # Trainer v2: TrainJob + TrainingRuntime -> JobSet
    children, service = jobsets.children(jobset)        # JobSet: child Jobs and the headless Service

Each step is what the controller's source does (kubeflow/trainer pkg/runtime/framework/plugins/{torch,jobset},
kubernetes-sigs/jobset pkg/controllers), for the fields these manifests use; a field it does not know raises
NotTranslated, as in pods.py.
"""

from __future__ import annotations

import copy

from tests.docker.pods import NotTranslated, allow

ANCESTOR = "trainer.kubeflow.org/trainjob-ancestor-step"
TRAINER_PORT = 29500  # constants.ContainerTrainerPort
INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
JOBSET_NAME = "jobset.sigs.k8s.io/jobset-name"


def from_trainjob(trainjob: dict, runtime: dict) -> dict:
    """The JobSet the Trainer creates for `trainjob` on `runtime`: the runtime's JobSet template under the
    TrainJob's name, the trainer's values in container "node" of the ancestor-"trainer" Job, and the torch
    plugin's PET_* variables and port."""
    spec = allow(trainjob["spec"], {"runtimeRef", "trainer", "activeDeadlineSeconds", "suspend", "initializer"},
                 "TrainJob.spec")
    ref = spec["runtimeRef"]
    if (ref.get("kind"), ref["name"]) != (runtime["kind"], runtime["metadata"]["name"]):
        raise AssertionError(f"TrainJob refers to {ref}, not the rendered {runtime['kind']}")
    if "torch" not in runtime["spec"]["mlPolicy"]:
        raise NotTranslated("only the torch ML policy is translated")
    trainer = allow(spec.get("trainer", {}), {"numNodes", "numProcPerNode", "image", "command", "args", "env",
                                               "resourcesPerNode"}, "TrainJob.spec.trainer")
    name = trainjob["metadata"]["name"]
    jobset_spec = copy.deepcopy(runtime["spec"]["template"]["spec"])
    nodes = trainer.get("numNodes", runtime["spec"]["mlPolicy"].get("numNodes", 1))
    for replicated in jobset_spec["replicatedJobs"]:
        if replicated["template"].get("metadata", {}).get("labels", {}).get(ANCESTOR) != "trainer":
            continue
        replicated["replicas"] = 1
        job = replicated["template"]["spec"]
        job["parallelism"] = job["completions"] = nodes
        (node,) = [c for c in job["template"]["spec"]["containers"] if c["name"] == "node"]
        for key in ("image", "command", "args"):
            if key in trainer:
                node[key] = trainer[key]
        if "resourcesPerNode" in trainer:
            node["resources"] = trainer["resourcesPerNode"]
        env = [e for e in node.get("env", []) if e["name"] not in {v["name"] for v in trainer.get("env", [])}]
        env += trainer.get("env", [])
        env = [e for e in env if not e["name"].startswith("PET_")]
        # The torch plugin's values: numProcPerNode "auto" when unset (then the CPU count on a GPU-less node).
        env += [{"name": "PET_NNODES", "value": str(nodes)},
                {"name": "PET_NPROC_PER_NODE", "value": str(trainer.get("numProcPerNode", "auto"))},
                {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": INDEX_FIELD}}},
                {"name": "PET_MASTER_ADDR", "value": f"{name}-node-0-0.{name}"},
                {"name": "PET_MASTER_PORT", "value": str(TRAINER_PORT)}]
        node["env"] = env
        ports = node.setdefault("ports", [])
        if not any(p["containerPort"] == TRAINER_PORT for p in ports):
            ports.append({"containerPort": TRAINER_PORT})
    initialize(jobset_spec, spec.get("initializer", {}))
    jobset_spec.setdefault("network", {}).setdefault("subdomain", name)
    if spec.get("suspend"):
        jobset_spec["suspend"] = True
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
            "metadata": {"name": name, "namespace": trainjob["metadata"].get("namespace", "default"),
                         "labels": dict(trainjob["metadata"].get("labels", {}))},
            "spec": jobset_spec}


def initialize(jobset_spec: dict, initializer: dict) -> None:
    """The initializer plugin: each of the TrainJob's spec.initializer.{dataset,model} gives STORAGE_URI to the
    container <step>-initializer of the Job whose ancestor step has that name."""
    for step, values in initializer.items():
        values = allow(values, {"storageUri"}, f"TrainJob.spec.initializer.{step}")
        name = f"{step}-initializer"
        (replicated,) = [r for r in jobset_spec["replicatedJobs"]
                         if r["template"].get("metadata", {}).get("labels", {}).get(ANCESTOR) == name]
        (container,) = [c for c in replicated["template"]["spec"]["template"]["spec"]["containers"]
                        if c["name"] == name]
        container["env"] = [e for e in container.get("env", []) if e["name"] != "STORAGE_URI"] + \
            [{"name": "STORAGE_URI", "value": values["storageUri"]}]


def children(jobset: dict) -> tuple[list[dict], dict]:
    """The child Jobs (<jobset>-<replicatedJob>-<index>) with JobSet's labels and the pods' subdomain, and the
    headless Service named after the subdomain that gives pod i of a Job the name <job>-<i>.<subdomain>."""
    spec = allow(jobset["spec"], {"replicatedJobs", "network", "failurePolicy", "successPolicy", "suspend",
                                  "ttlSecondsAfterFinished"}, "JobSet.spec")
    if spec.get("suspend"):
        raise NotTranslated("a suspended JobSet starts no pods until Kueue (or a person) resumes it")
    network = allow(spec.get("network", {}), {"enableDNSHostnames", "publishNotReadyAddresses", "subdomain"},
                    "JobSet.spec.network")
    name = jobset["metadata"]["name"]
    subdomain = network.get("subdomain", name)
    dns = network.get("enableDNSHostnames", True)
    jobs = []
    for replicated in spec["replicatedJobs"]:
        allow(replicated, {"name", "replicas", "template", "dependsOn"}, "replicatedJob")
        for index in range(replicated.get("replicas", 1)):
            job = copy.deepcopy(replicated["template"])
            job_name = f"{name}-{replicated['name']}-{index}"
            labels = {JOBSET_NAME: name, "jobset.sigs.k8s.io/replicatedjob-name": replicated["name"],
                      "jobset.sigs.k8s.io/job-index": str(index)}
            pod = job["spec"]["template"]
            pod.setdefault("metadata", {}).setdefault("labels", {}).update(labels)
            if dns:
                pod["spec"]["subdomain"] = subdomain
            job["spec"].setdefault("completionMode", "Indexed")
            jobs.append({"apiVersion": "batch/v1", "kind": "Job",
                         "metadata": {"name": job_name, "namespace": jobset["metadata"].get("namespace", "default"),
                                      "labels": {**job.get("metadata", {}).get("labels", {}), **labels}},
                         "spec": job["spec"]})
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": subdomain},
               "spec": {"clusterIP": "None", "selector": {JOBSET_NAME: name},
                        "publishNotReadyAddresses": network.get("publishNotReadyAddresses", True)}}
    return jobs, service
