"""The Kubernetes manifests (k8s/): every overlay renders offline, validates against the official schemas,
runs under Pod Security "restricted", and agrees with the config schema, the exit-code table and the docs.

Needs only kubectl (for `kubectl kustomize`, which works without a cluster); no Docker, no API server.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import click
import kubernetes_validate
import pytest
import yaml
from kubeflow_trainer_api import models as trainer_models

from entrypoint import cli as finetune_cli
from entrypoint.config import options
from entrypoint.config import schema as config
from entrypoint.errors import DESCRIPTIONS, PERMANENT, ExitCode, FinetuneError

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUBECTL = shutil.which("kubectl")

OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
# Overlays whose workload is a batch/v1 Job (the others run under a CRD's controller).
JOB_OVERLAYS = [o for o in OVERLAYS if o not in ("pytorchjob", "jobset", "trainjob", "trainjob-initializers")]
# Overlays whose pods run as child Jobs of a JobSet: directly, or built by Kubeflow Trainer from the runtime.
JOBSET_OVERLAYS = ["jobset", "trainjob", "trainjob-initializers"]
# Kubeflow Trainer's initializer steps (replicated Jobs of these names run Trainer's images, not ours): the checks
# of our pods leave them out; the schema, Pod Security and initializer checks take them in.
INITIALIZERS = ("dataset-initializer", "model-initializer")
# The oldest Kubernetes these manifests support (podReplacementPolicy is beta and on by default from 1.29)
# and the newest kubernetes-validate bundles.
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
# Kinds validated through the pod templates they hold, because kubernetes-validate has no CRD schemas.
CRD_KINDS = {("kubeflow.org/v1", "PyTorchJob"), ("jobset.x-k8s.io/v1alpha2", "JobSet"),
             ("trainer.kubeflow.org/v1alpha1", "TrainJob"), ("trainer.kubeflow.org/v1alpha1", "TrainingRuntime")}
# The models of the kubeflow-trainer-api package, generated from Trainer's and JobSet's Go types.
CRD_MODELS = {"JobSet": trainer_models.JobsetV1alpha2JobSet, "TrainJob": trainer_models.TrainerV1alpha1TrainJob,
              "TrainingRuntime": trainer_models.TrainerV1alpha1TrainingRuntime}
KNOWN_KINDS = {"ConfigMap", "Service", "PersistentVolumeClaim", "Job", "PyTorchJob", "JobSet", "TrainJob",
               "TrainingRuntime"}
WORKLOAD_KINDS = {"Job", "PyTorchJob", "JobSet", "TrainJob"}
# The PyTorchJob operator needs its container named pytorch, Kubeflow Trainer's torch plugin node.
TRAINING_CONTAINERS = {"finetune", "pytorch", "node"}


needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl not on PATH: install it to render k8s/")


@cache
def _render(path: str) -> str:
    result = subprocess.run([KUBECTL, "kustomize", path], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return result.stdout


def render(overlay: str) -> list[dict]:
    """The objects `kubectl kustomize` builds; a fresh copy each call, so a test may mutate it."""
    path = K8S / ("storage" if overlay == "storage" else f"overlays/{overlay}")
    return [d for d in yaml.safe_load_all(_render(str(path))) if d]


def job_templates(objects: list[dict], initializers: bool = False) -> list[tuple[str, dict]]:
    """(where, Job template) for every child Job of a JobSet or a TrainingRuntime's JobSet template (with
    `initializers`, Kubeflow Trainer's initializer steps too)."""
    found = []
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        jobset = {"JobSet": lambda o: o["spec"], "TrainingRuntime": lambda o: o["spec"]["template"]["spec"]}
        if obj["kind"] in jobset:
            for replicated in jobset[obj["kind"]](obj)["replicatedJobs"]:
                if initializers or replicated["name"] not in INITIALIZERS:
                    found.append((f"{name} {replicated['name']}", replicated["template"]))
    return found


def pod_templates(objects: list[dict], initializers: bool = False) -> list[tuple[str, dict]]:
    """(where, pod template) for every workload object (with `initializers`, Kubeflow Trainer's too)."""
    found = []
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "Job":
            found.append((name, obj["spec"]["template"]))
        elif obj["kind"] == "PyTorchJob":
            for replica, spec in obj["spec"]["pytorchReplicaSpecs"].items():
                found.append((f"{name} {replica}", spec["template"]))
    found += [(where, job["spec"]["template"]) for where, job in job_templates(objects, initializers)]
    return found


def containers(pod_spec: dict) -> list[dict]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"],
            *pod_spec.get("ephemeralContainers", [])]


def training_container(pod_spec: dict) -> dict:
    (container,) = [c for c in pod_spec["containers"] if c["name"] in TRAINING_CONTAINERS]
    return container


def one(objects: list[dict], kind: str) -> dict:
    (obj,) = [o for o in objects if o["kind"] == kind]
    return obj


def config_map(objects: list[dict]) -> dict[str, str]:
    (cm,) = [o for o in objects if o["kind"] == "ConfigMap"]
    return cm["data"]


# Pod Security Standards, "restricted" (kubernetes.io/docs/concepts/security/pod-security-standards)
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                           "persistentVolumeClaim", "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
                "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range",
                "net.ipv4.ip_local_reserved_ports", "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
                "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def restricted_violations(pod_spec: dict) -> list[str]:
    """Every way the pod spec breaks Pod Security "restricted", plus this project's rules: a numeric
    runAsUser and a read-only root filesystem for every container. Empty when it complies."""
    problems = []
    pod_sc = pod_spec.get("securityContext", {})
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(host):
            problems.append(f"{host} is true")
    for volume in pod_spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            problems.append(f"volume {volume['name']} has type {sorted(kinds - RESTRICTED_VOLUME_TYPES)}")
    for sysctl in pod_sc.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            problems.append(f"unsafe sysctl {sysctl['name']}")
    contexts = [("pod", pod_sc)] + [(c["name"], c.get("securityContext", {})) for c in containers(pod_spec)]
    for where, sc in contexts:
        if sc.get("runAsUser") == 0:
            problems.append(f"{where}: runAsUser is 0 (root)")
        if sc.get("runAsNonRoot") is False:
            problems.append(f"{where}: runAsNonRoot is false")
        if sc.get("seccompProfile", {}).get("type") == "Unconfined":
            problems.append(f"{where}: seccompProfile is Unconfined")
        if sc.get("appArmorProfile", {}).get("type") == "Unconfined":
            problems.append(f"{where}: appArmorProfile is Unconfined")
        if sc.get("windowsOptions", {}).get("hostProcess"):
            problems.append(f"{where}: windowsOptions.hostProcess is true")
        selinux = sc.get("seLinuxOptions", {})
        if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
            problems.append(f"{where}: seLinuxOptions {selinux}")
    for c in containers(pod_spec):
        sc, name = c.get("securityContext", {}), c["name"]
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            problems.append(f"{name}: capabilities.drop lacks ALL")
        if set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: capabilities.add beyond NET_BIND_SERVICE")
        if sc.get("procMount", "Default") != "Default":
            problems.append(f"{name}: procMount {sc['procMount']}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            problems.append(f"{name}: hostPort")
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            problems.append(f"{name}: runAsNonRoot is not true (pod or container)")
        if not isinstance(sc.get("runAsUser", pod_sc.get("runAsUser")), int):
            problems.append(f"{name}: no numeric runAsUser (pod or container)")
        if sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type") not in ("RuntimeDefault",
                                                                                           "Localhost"):
            problems.append(f"{name}: seccompProfile is not RuntimeDefault or Localhost (pod or container)")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: readOnlyRootFilesystem is not true")
    return problems


# PodFailurePolicy, evaluated as the Job controller does: the first matching rule decides.
def policy_action(rules: list[dict], exit_code: int, conditions: tuple[str, ...] = ()) -> str:
    """What a Job does with a pod that failed with `exit_code` and has these True pod conditions:
    Ignore, FailJob, FailIndex or Count (no rule matched, or a Count rule)."""
    for rule in rules:
        if "onExitCodes" in rule:
            codes = rule["onExitCodes"]
            hit = exit_code in codes["values"]
            if (hit if codes["operator"] == "In" else not hit and exit_code != 0):
                return rule["action"]
        for cond in rule.get("onPodConditions", []):
            if cond["type"] in conditions and cond.get("status", "True") == "True":
                return rule["action"]
    return "Count"


# What docs/reliability.md says a batch Job does with each action.
JOB_EFFECT = {"FailJob": "fails the Job at once", "Count": "retried (counts against backoffLimit)"}


def test_overlays_are_the_shipped_set():
    # Guards the parametrized tests below against silently running over nothing.
    assert OVERLAYS == ["cpu-smoke", "jobset", "multi-gpu", "multi-node", "prepare", "pytorchjob", "single-gpu",
                        "trainjob", "trainjob-initializers"]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS + ["storage"])
def test_overlay_renders_offline_into_known_kinds(overlay):
    objects = render(overlay)
    kinds = sorted(o["kind"] for o in objects)
    assert set(kinds) <= KNOWN_KINDS, f"{overlay}: a kind the checks here do not cover: {kinds}"
    if overlay != "storage":
        workloads = [k for k in kinds if k in WORKLOAD_KINDS]
        assert len(workloads) == 1, f"{overlay}: expected one workload, got {workloads}"
    for obj in objects:
        assert obj["metadata"].get("labels", {}).get("app.kubernetes.io/name") == "finetune", \
            f"{overlay}: {obj['kind']}/{obj['metadata']['name']} lacks the app.kubernetes.io/name label"


@needs_kubectl
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS + ["storage"])
def test_objects_validate_strictly_against_kubernetes_schemas(overlay, version):
    objects = render(overlay)
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue  # its Job and pod templates are validated below, as Jobs and Pods
        kubernetes_validate.validate(obj, version, strict=True)
    for where, template in job_templates(objects, initializers=True):
        job = {"apiVersion": "batch/v1", "kind": "Job", "spec": template["spec"],
               "metadata": {"name": "check", **template.get("metadata", {})}}
        try:
            kubernetes_validate.validate(job, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay}: Job template of {where} is not a valid Job for {version}: {exc.message}")
    for where, template in pod_templates(objects, initializers=True):
        pod = {"apiVersion": "v1", "kind": "Pod", "spec": template["spec"],
               "metadata": {"name": "check", **template.get("metadata", {})}}
        try:
            kubernetes_validate.validate(pod, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay}: pod template of {where} is not a valid Pod for {version}: {exc.message}")


@needs_kubectl
def test_strict_validation_rejects_an_unknown_field():
    job = one(render("single-gpu"), "Job")
    job["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSIONS[-1], strict=True)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_template_meets_pod_security_restricted(overlay):
    templates = pod_templates(render(overlay), initializers=True)
    assert templates
    for where, template in templates:
        assert restricted_violations(template["spec"]) == [], f"{overlay}: {where}"


def _init_sc(spec: dict, i: int = 0) -> dict:
    return spec["initContainers"][i]["securityContext"]


def _train_sc(spec: dict) -> dict:
    return spec["containers"][0]["securityContext"]


MUTATIONS = {
    "root user": lambda s: _init_sc(s).update(runAsUser=0),
    "runAsNonRoot dropped": lambda s: s["securityContext"].pop("runAsNonRoot"),
    "privilege escalation": lambda s: _init_sc(s, 1).pop("allowPrivilegeEscalation"),
    "capability kept": lambda s: _train_sc(s)["capabilities"].update(drop=["NET_RAW"]),
    "capability added": lambda s: _train_sc(s)["capabilities"].update(add=["SYS_ADMIN"]),
    "seccomp unconfined": lambda s: _init_sc(s).update(seccompProfile={"type": "Unconfined"}),
    "seccomp unset": lambda s: s["securityContext"].pop("seccompProfile"),
    "writable root": lambda s: _train_sc(s).pop("readOnlyRootFilesystem"),
    "privileged": lambda s: _train_sc(s).update(privileged=True),
    "hostPath": lambda s: s["volumes"].append({"name": "host", "hostPath": {"path": "/"}}),
    "hostNetwork": lambda s: s.update(hostNetwork=True),
}


@needs_kubectl
@pytest.mark.parametrize("mutation", MUTATIONS)
def test_restricted_check_catches(mutation):
    # cpu-smoke has init containers, so a lapse there is caught too.
    spec = copy.deepcopy(pod_templates(render("cpu-smoke"))[0][1]["spec"])
    assert restricted_violations(spec) == []
    MUTATIONS[mutation](spec)
    assert restricted_violations(spec), f"{mutation} went unnoticed"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_read_only_root_has_writable_tmp_and_cache_from_emptydirs(overlay):
    for where, template in pod_templates(render(overlay)):
        spec = template["spec"]
        empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for c in containers(spec):
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert mounts.get("/tmp") in empty_dirs, f"{overlay}: {where} {c['name']} has no /tmp emptyDir"
        mounts = {m["mountPath"]: m["name"] for m in training_container(spec)["volumeMounts"]}
        assert mounts.get("/cache") in empty_dirs, f"{overlay}: {where}: the HF cache /cache is no emptyDir"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mounts_name_pod_volumes_and_claims_are_the_storage_pvcs(overlay):
    claims = {o["metadata"]["name"] for o in render("storage") if o["kind"] == "PersistentVolumeClaim"}
    for where, template in pod_templates(render(overlay)):
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        for c in containers(template["spec"]):
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{overlay}: {where} {c['name']}: no volume {m['name']}"
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, f"{overlay}: {v}"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_data_is_read_only_and_shm_is_bounded_memory(overlay):
    for where, template in pod_templates(render(overlay)):
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        train = training_container(spec)
        mounts = {m["mountPath"]: m for m in train["volumeMounts"]}
        assert mounts["/data"].get("readOnly") is True, f"{overlay}: {where} mounts /data writable"
        data = volumes[mounts["/data"]["name"]]
        if "persistentVolumeClaim" in data:
            assert data["persistentVolumeClaim"].get("readOnly") is True, f"{overlay}: data PVC not read-only"
        shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
        assert shm.get("medium") == "Memory" and shm.get("sizeLimit"), f"{overlay}: /dev/shm {shm}"
        # /dev/shm is counted against the memory limit, so it must fit inside it.
        assert _gib(shm["sizeLimit"]) < _gib(train["resources"]["limits"]["memory"]), overlay


def _gib(quantity: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)(Mi|Gi|Ti)", quantity).groups()
    return float(number) * {"Mi": 1 / 1024, "Gi": 1, "Ti": 1024}[unit]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_processes_per_node_match_gpus(overlay):
    objects = render(overlay)
    if overlay.startswith("trainjob"):  # the TrainJob says it; the torch plugin passes it on as PET_NPROC_PER_NODE
        assert "FINETUNE_NPROC_PER_NODE" not in config_map(objects), "it would override the TrainJob's value"
        nproc = str(one(objects, "TrainJob")["spec"]["trainer"]["numProcPerNode"])
    else:
        nproc = config_map(objects)["FINETUNE_NPROC_PER_NODE"]
    for _, template in pod_templates(objects):
        spec = template["spec"]
        resources = training_container(spec)["resources"]
        gpus = resources["limits"].get("nvidia.com/gpu")
        assert resources["requests"].get("nvidia.com/gpu") == gpus, f"{overlay}: GPU request != limit"
        for c in spec.get("initContainers", []):
            assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}), f"{overlay}: {c['name']}"
        if gpus is None:  # a CPU overlay: nothing left that would keep it off CPU nodes
            assert nproc == "1", overlay
            assert "nodeSelector" not in spec and "tolerations" not in spec, f"{overlay}: GPU scheduling left"
        else:
            assert nproc in ("auto", str(gpus)), f"{overlay}: {nproc} processes for {gpus} GPUs"
            assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, overlay
            gpu_taint = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            assert gpu_taint in spec["tolerations"], overlay
    if overlay == "pytorchjob":
        assert one(objects, "PyTorchJob")["spec"]["nprocPerNode"] == nproc


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_image_is_set_by_kustomize_on_every_container(overlay):
    expected = "finetune:cpu" if overlay == "cpu-smoke" else "finetune:latest"
    for where, template in pod_templates(render(overlay)):
        for c in containers(template["spec"]):
            assert c["image"] == expected, f"{overlay}: {where} {c['name']} runs {c['image']}"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_training_env_comes_from_the_config_map_and_an_optional_token(overlay):
    objects = render(overlay)
    (cm_name,) = [o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"]
    for where, template in pod_templates(objects):
        train = training_container(template["spec"])
        assert train["envFrom"] == [{"configMapRef": {"name": cm_name}}], f"{overlay}: {where}"
        assert re.fullmatch(r"finetune-config(-prepare)?-[a-z0-9]{10}", cm_name), "hash suffix missing"
        token = {e["name"]: e for e in train["env"]}["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert token["optional"] is True, f"{overlay}: a missing hf-token Secret would block the pod"


TRAIN_COMMAND = finetune_cli.cli.commands["train"]
# Every env var `finetune train` reads: the TrainConfig fields plus FINETUNE_PRESET (--preset).
TRAIN_ENV = {p.envvar for p in TRAIN_COMMAND.params if p.envvar}
TRAIN_FIELD_ENV = {options.env_name(n) for n in options.fields(config.TrainConfig)}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_finetune_env_names_are_train_config_fields(overlay):
    objects = render(overlay)
    names = set(config_map(objects))
    assert all(k.startswith(options.ENV_PREFIX) for k in names), f"{overlay}: non-FINETUNE_ key in ConfigMap"
    for _, template in pod_templates(objects):
        for c in containers(template["spec"]):
            names |= {e["name"] for e in c.get("env", []) if e["name"].startswith(options.ENV_PREFIX)}
    assert "FINETUNE_PRESET" in TRAIN_ENV  # --preset: the one option that is not a TrainConfig field
    unknown = sorted(names - TRAIN_FIELD_ENV - {"FINETUNE_PRESET"})
    assert not unknown, f"{overlay}: not finetune options: {unknown}"


def parse_command(container: dict, env: dict[str, str], monkeypatch) -> tuple[str, object]:
    """What the container's `finetune ARGS` resolves to, through the real CLI with the pod's environment,
    without running it: the config object (TrainConfig, InitModelConfig) or the parsed parameters."""
    for name in list(os.environ):
        if name.startswith((options.ENV_PREFIX, "SM_", "AIP_")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = container["args"]
    parent = click.Context(finetune_cli.cli, info_name="finetune")
    command = finetune_cli.cli.get_command(parent, args[0])
    assert command is not None, f"{container['name']}: finetune has no command {args[0]!r}"
    try:
        ctx = command.make_context(args[0], list(args[1:]), parent=parent)
        with ctx:
            schema = {"train": config.TrainConfig, "prepare": config.TrainConfig,
                      "init-model": config.InitModelConfig}.get(args[0])
            if schema is None:
                return args[0], ctx.params
            cfg, _ = finetune_cli.resolve(schema, ctx.params, ctx.params.get("preset"))
    except (click.ClickException, FinetuneError) as exc:
        pytest.fail(f"{container['name']}: finetune {' '.join(args)}: {exc}")
    assert options.check_values(cfg) == [], container["name"]
    return args[0], cfg


def pod_env(container: dict, objects: list[dict]) -> dict[str, str]:
    """The FINETUNE_* environment the container starts with (a downward-API index reads as 0)."""
    env = dict(config_map(objects)) if container.get("envFrom") else {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = "0"
    return {k: v for k, v in env.items() if k.startswith(options.ENV_PREFIX)}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_command_parses_with_the_cli(overlay, monkeypatch):
    objects = render(overlay)
    expected = {"prepare": "prepare"}.get(overlay, "train")
    for _, template in pod_templates(objects):
        for c in containers(template["spec"]):
            command, cfg = parse_command(c, pod_env(c, objects), monkeypatch)
            if c["name"] in TRAINING_CONTAINERS:
                assert command == expected, overlay
                # It reads and writes where the volumes are, not on the read-only root filesystem.
                mounts = {m["name"]: Path(m["mountPath"]) for m in c["volumeMounts"]}
                assert cfg.data_dir == mounts["data"], overlay
                assert cfg.output_dir.is_relative_to(mounts["output"]), overlay
                assert cfg.data_cache_dir.is_relative_to(mounts["output"]), "the dataset cache must survive a retry"


@needs_kubectl
@pytest.mark.parametrize("overlay", JOB_OVERLAYS)
def test_pod_failure_policy_follows_the_exit_code_table(overlay):
    spec = one(render(overlay), "Job")["spec"]
    rules = spec["podFailurePolicy"]["rules"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy requires it
    assert spec["podReplacementPolicy"] == "Failed"
    assert spec["backoffLimit"] >= 1
    assert spec["activeDeadlineSeconds"] > 0 and spec["ttlSecondsAfterFinished"] > 0
    for code in ExitCode:
        if code == ExitCode.OK:
            continue
        expected = "FailJob" if code in PERMANENT else "Count"
        assert policy_action(rules, code) == expected, f"{overlay}: exit {code.value} ({code.name})"
        # A disruption is never the job's fault, whatever the exit code it caused.
        assert policy_action(rules, code, ("DisruptionTarget",)) == "Ignore", f"{overlay}: {code.name}"
    assert policy_action(rules, 137) == "Count"  # SIGKILL: host OOM or the grace period ran out
    grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > 30, f"{overlay}: grace {grace} s is Kubernetes' default, not sized for a checkpoint save"


def test_policy_evaluation_matches_the_controller_on_rule_order():
    rules = [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
             {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2]}},
             {"action": "FailJob", "onExitCodes": {"operator": "NotIn", "values": [2, 7]}}]
    assert policy_action(rules, 2, ("DisruptionTarget",)) == "Ignore"
    assert policy_action(rules, 2) == "FailJob"
    assert policy_action(rules, 7) == "Count"
    assert policy_action(rules, 1) == "FailJob"


@needs_kubectl
def test_docs_exit_code_table_matches_errors_and_the_policy():
    rules = one(render("single-gpu"), "Job")["spec"]["podFailurePolicy"]["rules"]
    effect = {c: "succeeds" if c == ExitCode.OK else JOB_EFFECT[policy_action(rules, c)] for c in ExitCode}
    expected = [f"| {c.value} | `{c.name}` | {DESCRIPTIONS[c]} | {effect[c]} |" for c in ExitCode]
    text = (ROOT / "docs" / "reliability.md").read_text()
    rows = [line.strip() for line in text.splitlines() if re.match(r"\| \d+ \| `", line.strip())]
    assert rows == expected, "docs/reliability.md's exit-code table is stale; run make docs:\n" + "\n".join(expected)


@needs_kubectl
def test_multi_node_pod_zero_is_the_rendezvous_endpoint():
    objects = render("multi-node")
    job, service, values = one(objects, "Job"), one(objects, "Service"), config_map(objects)
    spec, pod = job["spec"], job["spec"]["template"]
    nodes = int(values["FINETUNE_NNODES"])
    assert nodes >= 2 and spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == nodes
    assert pod["spec"]["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    # The Job controller adds the job-name label to its pods; the Service must select them by it.
    pod_labels = {**pod["metadata"]["labels"], "batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert service["spec"]["selector"].items() <= pod_labels.items()
    host, port = values["FINETUNE_RDZV_ENDPOINT"].rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    (svc_port,) = service["spec"]["ports"]
    assert int(port) == svc_port["port"]
    train = training_container(pod["spec"])
    assert svc_port["targetPort"] in {p["name"] for p in train["ports"] if p["containerPort"] == int(port)}
    rank = {e["name"]: e for e in train["env"]}["FINETUNE_NODE_RANK"]["valueFrom"]["fieldRef"]
    assert rank["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"


@needs_kubectl
def test_pytorchjob_runs_the_base_pod_template():
    base = one(render("single-gpu"), "Job")
    pytorchjob = one(render("pytorchjob"), "PyTorchJob")
    assert not [o for o in render("pytorchjob") if o["kind"] == "Job"], "the base Job must be dropped"
    worker = pytorchjob["spec"]["pytorchReplicaSpecs"]["Worker"]
    expected = copy.deepcopy(base["spec"]["template"])
    # What the operator needs differently, and nothing else.
    expected["spec"]["containers"][0]["name"] = "pytorch"
    expected["spec"]["restartPolicy"] = worker["restartPolicy"]
    assert worker["template"] == expected
    run_policy = pytorchjob["spec"]["runPolicy"]
    for key in ("backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        assert run_policy[key] == base["spec"][key], key
    elastic = pytorchjob["spec"]["elasticPolicy"]
    assert elastic["minReplicas"] <= worker["replicas"] <= elastic["maxReplicas"]


@needs_kubectl
def test_cpu_smoke_trains_what_its_init_containers_wrote_without_gpu_or_hub(monkeypatch):
    objects = render("cpu-smoke")
    spec = one(objects, "Job")["spec"]["template"]["spec"]
    init = {c["name"]: c for c in spec["initContainers"]}
    train = training_container(spec)
    _, corpus = parse_command(init["corpus"], pod_env(init["corpus"], objects), monkeypatch)
    _, model = parse_command(init["init-model"], pod_env(init["init-model"], objects), monkeypatch)
    _, cfg = parse_command(train, pod_env(train, objects), monkeypatch)
    assert model.corpus == corpus["output_dir"] / "train.txt"
    assert cfg.data_dir == corpus["output_dir"], "training must read the corpus the init container wrote"
    assert Path(cfg.model) == model.output_dir, "training must start from the model init-model wrote"
    assert cfg.max_steps is not None and cfg.max_steps <= 100, "the smoke preset should train a few steps"
    assert cfg.output_dir != Path("/output"), "the smoke model must not overwrite a real one"
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in train["env"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes["data"] and "persistentVolumeClaim" not in volumes["data"]


@needs_kubectl
def test_prepare_is_an_indexed_job_with_one_shard_per_pod():
    spec = one(render("prepare"), "Job")["spec"]
    args = training_container(spec["template"]["spec"])["args"]
    command = finetune_cli.cli.commands["prepare"]
    params = command.make_context("prepare", list(args[1:])).params
    assert args[0] == "prepare" and spec["completionMode"] == "Indexed"  # JOB_COMPLETION_INDEX is each pod's shard
    assert spec["completions"] == spec["parallelism"] == params["num_shards"] > 1
    assert params["shard"] is None, "the shard must come from each pod's own completion index"


# Kubeflow Trainer v2 (trainjob), JobSet (jobset) and the Kueue component.

def dropped_fields(rendered, parsed, path: str = "") -> list[str]:
    """Paths of `rendered` that the model's round trip `parsed` lost or changed: unknown fields, wrong types.
    Fields the model adds (defaults) are not errors."""
    if isinstance(rendered, dict) and isinstance(parsed, dict):
        return [p for k, v in rendered.items()
                for p in ([f"{path}.{k}"] if k not in parsed else dropped_fields(v, parsed[k], f"{path}.{k}"))]
    if isinstance(rendered, list) and isinstance(parsed, list) and len(rendered) == len(parsed):
        return [p for i, (a, b) in enumerate(zip(rendered, parsed, strict=True))
                for p in dropped_fields(a, b, f"{path}[{i}]")]
    return [] if rendered == parsed else [f"{path}: {rendered!r} became {parsed!r}"]


def model_problems(obj: dict) -> list[str]:
    try:
        parsed = CRD_MODELS[obj["kind"]].from_dict(obj).to_dict()
    except ValueError as exc:  # pydantic's ValidationError: a wrong type or a missing required field
        return [str(exc)]
    return dropped_fields(obj, parsed)


@needs_kubectl
@pytest.mark.parametrize("overlay", JOBSET_OVERLAYS)
def test_custom_resources_validate_against_the_trainer_and_jobset_api_models(overlay):
    objects = [o for o in render(overlay) if o["kind"] in CRD_MODELS]
    assert objects
    for obj in objects:
        assert (obj["apiVersion"], obj["kind"]) in CRD_KINDS
        assert model_problems(obj) == [], f"{overlay}: {obj['kind']}"


@needs_kubectl
@pytest.mark.parametrize("mutation", ["typo", "type"])
def test_model_validation_catches_an_unknown_field_and_a_wrong_type(mutation):
    trainjob = one(render("trainjob"), "TrainJob")
    if mutation == "typo":
        trainjob["spec"]["trainer"]["numNode"] = 2
    else:
        trainjob["spec"]["trainer"]["numNodes"] = "two"
    assert model_problems(trainjob)


# The Job controller's failure reasons and messages (pkg/controller/job/pod_failure_policy.go, job_controller.go):
# a podFailurePolicy FailJob rule fails the Job with reason PodFailurePolicy and one of these messages.
EXIT_MESSAGE = "Container {c} for pod default/p-0 failed with exit code {code} matching FailJob rule at index {i}"
CONDITION_MESSAGE = "Pod default/p-0 has condition {cond} matching FailJob rule at index {i}"


def child_job_failure(job_spec: dict, container: str, exit_code: int, conditions: tuple[str, ...] = ()):
    """(reason, message) of a child Job whose pod failed so, or None if the Job keeps going (a retried pod)."""
    rules = job_spec.get("podFailurePolicy", {}).get("rules", [])
    action = policy_action(rules, exit_code, conditions)
    if action == "FailJob":
        index = next(i for i, r in enumerate(rules) if policy_action([r], exit_code, conditions) == "FailJob")
        cond = next((c for c in conditions if any(p["type"] == c for p in rules[index].get("onPodConditions", []))),
                    None)
        message = (CONDITION_MESSAGE.format(cond=cond, i=index) if cond else
                   EXIT_MESSAGE.format(c=container, code=exit_code, i=index))
        return "PodFailurePolicy", message
    if action == "Count" and job_spec.get("backoffLimit", 6) == 0:
        return "BackoffLimitExceeded", "Job has reached the specified backoff limit"
    return None


JOBSET_ACTIONS = {"FailJobSet", "RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts", "RestartJob",
                  "RestartJobAndIgnoreMaxRestarts"}
# The reasons a batch Job fails with (batch/v1 JobReason*).
JOB_FAILURE_REASONS = {"BackoffLimitExceeded", "DeadlineExceeded", "PodFailurePolicy", "MaxFailedIndexesExceeded",
                       "FailedIndexes"}


def jobset_action(failure_policy: dict, reason: str, message: str) -> str:
    """JobSet's failure policy: the first rule whose reasons and message patterns match (an empty list matches
    anything) decides; none matching restarts the JobSet."""
    for rule in failure_policy.get("rules", []):
        reasons, patterns = rule.get("onJobFailureReasons", []), rule.get("onJobFailureMessagePatterns", [])
        if (not reasons or reason in reasons) and (not patterns or any(re.search(p, message) for p in patterns)):
            return rule["action"]
    return "RestartJobSet"


def jobset_spec(objects: list[dict]) -> dict:
    if any(o["kind"] == "TrainingRuntime" for o in objects):
        return one(objects, "TrainingRuntime")["spec"]["template"]["spec"]
    return one(objects, "JobSet")["spec"]


@needs_kubectl
@pytest.mark.parametrize("overlay", JOBSET_OVERLAYS)
def test_jobset_failure_policy_follows_the_exit_code_table(overlay):
    objects = render(overlay)
    spec = jobset_spec(objects)
    policy = spec["failurePolicy"]
    assert policy["maxRestarts"] == one(render("single-gpu"), "Job")["spec"]["backoffLimit"]
    assert policy["restartStrategy"] == "BlockingRecreate"
    for replicated in spec["replicatedJobs"]:
        if replicated["name"] in INITIALIZERS:  # done before the trainer starts; test_initializers_* below
            continue
        job = replicated["template"]["spec"]
        pod = job["template"]["spec"]
        container = training_container(pod)["name"]
        assert pod["restartPolicy"] == "Never" and job["backoffLimit"] == 0
        assert job["podReplacementPolicy"] == "Failed" and job["completionMode"] == "Indexed"
        assert pod["terminationGracePeriodSeconds"] > 30
        for code in ExitCode:
            if code == ExitCode.OK:
                continue
            reason, message = child_job_failure(job, container, code)
            expected = "FailJobSet" if code in PERMANENT else "RestartJobSet"
            assert jobset_action(policy, reason, message) == expected, f"{overlay}: exit {code.value} ({code.name})"
            disrupted = child_job_failure(job, container, code, ("DisruptionTarget",))
            assert jobset_action(policy, *disrupted) == "RestartJobSetAndIgnoreMaxRestarts", f"{overlay}: {code.name}"
        assert jobset_action(policy, *child_job_failure(job, container, 137)) == "RestartJobSet"
        assert jobset_action(policy, "DeadlineExceeded", "Job was active longer than specified deadline") == \
            "FailJobSet"
        assert job["activeDeadlineSeconds"] > 0
    # The API's enums and patterns, which the generated models do not check (jobset api/jobset/v1alpha2).
    assert policy["restartStrategy"] in {"Recreate", "BlockingRecreate", "InPlaceRestart"}
    for rule in policy["rules"]:
        assert re.fullmatch(r"[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?", rule["name"]), rule["name"]
        assert rule["action"] in JOBSET_ACTIONS, rule
        assert set(rule.get("onJobFailureReasons", [])) <= JOB_FAILURE_REASONS, rule
        for pattern in rule.get("onJobFailureMessagePatterns", []):
            re.compile(pattern)


def test_jobset_policy_evaluation_matches_the_controller_on_rule_order_and_patterns():
    policy = {"rules": [{"name": "a", "action": "RestartJobSetAndIgnoreMaxRestarts",
                         "onJobFailureReasons": ["PodFailurePolicy"], "onJobFailureMessagePatterns": ["condition"]},
                        {"name": "b", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]}]}
    assert jobset_action(policy, "PodFailurePolicy", "Pod x has condition DisruptionTarget") == \
        "RestartJobSetAndIgnoreMaxRestarts"
    assert jobset_action(policy, "PodFailurePolicy", "Container c failed with exit code 3") == "FailJobSet"
    assert jobset_action(policy, "BackoffLimitExceeded", "") == "RestartJobSet"


@needs_kubectl
def test_trainjob_pods_resolve_what_the_torch_plugin_injects(monkeypatch):
    """The env Kubeflow Trainer's torch plugin puts into container "node" of ancestor "trainer" (its
    pkg/runtime/framework/plugins/torch): PET_NNODES from numNodes, PET_NPROC_PER_NODE from numProcPerNode,
    PET_NODE_RANK from the completion index, PET_MASTER_ADDR <trainjob>-node-0-0.<trainjob>, PET_MASTER_PORT
    29500. The CLI must turn it into a static torchrun rendezvous at node 0."""
    from entrypoint.runtime.launch import torchrun_arguments

    objects = render("trainjob")
    trainjob, runtime = one(objects, "TrainJob"), one(objects, "TrainingRuntime")
    assert trainjob["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                              "name": runtime["metadata"]["name"]}
    assert "torch" in runtime["spec"]["mlPolicy"]
    (node,) = [r for r in runtime["spec"]["template"]["spec"]["replicatedJobs"]
               if r["template"]["metadata"]["labels"].get("trainer.kubeflow.org/trainjob-ancestor-step") == "trainer"]
    assert node["name"] == "node"
    container = training_container(node["template"]["spec"]["template"]["spec"])
    assert container["name"] == "node", "the torch plugin injects PET_* only into the container named node"
    assert not any(e["name"].startswith("PET_") for e in container.get("env", [])), "PET_* are the Trainer's"
    name, nodes = trainjob["metadata"]["name"], trainjob["spec"]["trainer"]["numNodes"]
    assert nodes >= 2
    base = one(render("single-gpu"), "Job")
    assert trainjob["spec"]["activeDeadlineSeconds"] == base["spec"]["activeDeadlineSeconds"]
    for rank in range(nodes):
        env = {**pod_env(container, objects), "PET_NNODES": str(nodes),
               "PET_NPROC_PER_NODE": str(trainjob["spec"]["trainer"]["numProcPerNode"]), "PET_NODE_RANK": str(rank),
               "PET_MASTER_ADDR": f"{name}-node-0-0.{name}", "PET_MASTER_PORT": "29500"}
        _, cfg = parse_command(container, env, monkeypatch)
        assert (cfg.nnodes, cfg.node_rank, cfg.rdzv_endpoint) == (str(nodes), rank, f"{name}-node-0-0.{name}:29500")
        assert cfg.nproc_per_node == "1"
        args = torchrun_arguments(cfg, ["train"])
        assert f"--master-addr={name}-node-0-0.{name}" in args and f"--node-rank={rank}" in args


@needs_kubectl
def test_jobset_pod_zero_is_the_rendezvous_endpoint():
    objects = render("jobset")
    jobset, values = one(objects, "JobSet"), config_map(objects)
    network = jobset["spec"]["network"]
    assert network["enableDNSHostnames"] is True and network["publishNotReadyAddresses"] is True
    (replicated,) = jobset["spec"]["replicatedJobs"]
    job = replicated["template"]["spec"]
    nodes = int(values["FINETUNE_NNODES"])
    assert nodes >= 2 and replicated["replicas"] == 1 and job["completions"] == job["parallelism"] == nodes
    # JobSet names pod i of job j of a replicated Job <jobset>-<replicatedJob>-<j>-<i>, under a headless
    # Service named after network.subdomain or else the JobSet.
    subdomain = network.get("subdomain", jobset["metadata"]["name"])
    host, port = values["FINETUNE_RDZV_ENDPOINT"].rsplit(":", 1)
    assert host == f"{jobset['metadata']['name']}-{replicated['name']}-0-0.{subdomain}"
    train = training_container(job["template"]["spec"])
    assert int(port) in {p["containerPort"] for p in train["ports"]}
    rank = {e["name"]: e for e in train["env"]}["FINETUNE_NODE_RANK"]["valueFrom"]["fieldRef"]
    assert rank["fieldPath"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"


@needs_kubectl
@pytest.mark.parametrize("overlay", JOBSET_OVERLAYS)
def test_jobset_and_runtime_run_the_base_pod_template(overlay):
    base = one(render("single-gpu"), "Job")
    objects = render(overlay)
    assert not [o for o in objects if o["kind"] == "Job"], "the base Job must be dropped"
    (template,) = [t for _, t in job_templates(objects)]
    expected = copy.deepcopy(base["spec"]["template"])
    container = expected["spec"]["containers"][0]
    if overlay.startswith("trainjob"):
        container["name"] = "node"
        if overlay == "trainjob-initializers":  # plus the workspace: test_initializers_* checks it
            template["spec"]["template"]["spec"] = _without_workspace(template["spec"]["template"]["spec"])
    else:  # what an Indexed Job of several nodes adds, as in multi-node
        container["env"].insert(0, {"name": "FINETUNE_NODE_RANK", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}})
        container["ports"] = [{"name": "rendezvous", "containerPort": 29500}]
    container["envFrom"] = template["spec"]["template"]["spec"]["containers"][0]["envFrom"]  # its own ConfigMap
    assert template["spec"]["template"] == expected
    assert jobset_spec(objects)["ttlSecondsAfterFinished"] == base["spec"]["ttlSecondsAfterFinished"]
    assert template["spec"]["activeDeadlineSeconds"] == base["spec"]["activeDeadlineSeconds"]


def render_with_kueue(overlay: str, tmp_path: Path) -> list[dict]:
    (tmp_path / "kustomization.yaml").write_text(
        "resources:\n  - {}\ncomponents:\n  - {}\n".format(os.path.relpath(K8S / "overlays" / overlay, tmp_path),
                                                           os.path.relpath(K8S / "components" / "kueue", tmp_path)))
    return [d for d in yaml.safe_load_all(_render(str(tmp_path))) if d]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kueue_component_queues_every_workload_suspended(overlay, tmp_path):
    objects = render_with_kueue(overlay, tmp_path)
    assert len(objects) == len(render(overlay))
    for obj in objects:
        labels = obj["metadata"].get("labels", {})
        if obj["kind"] not in WORKLOAD_KINDS:
            assert "kueue.x-k8s.io/queue-name" not in labels, f"{overlay}: {obj['kind']} is no workload"
            continue
        assert labels["kueue.x-k8s.io/queue-name"] == "finetune", f"{overlay}: {obj['kind']}"
        spec = obj["spec"]["runPolicy"] if obj["kind"] == "PyTorchJob" else obj["spec"]
        assert spec["suspend"] is True, f"{overlay}: {obj['kind']} must be created suspended for Kueue"
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS and obj["kind"] in CRD_MODELS:
            assert model_problems(obj) == [], overlay
        elif obj["kind"] == "Job":
            kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)


# The overlays k8s/components/object-storage runs: all but cpu-smoke (its init containers write the data to /data)
# and prepare (a cache on an emptyDir would vanish with its pod).
# trainjob-initializers reads what its initializers downloaded onto a shared volume: object storage replaces that.
OBJECT_STORAGE_OVERLAYS = [o for o in OVERLAYS if o not in ("cpu-smoke", "prepare", "trainjob-initializers")]
STORE_ENV = ("FINETUNE_DATA_DIR", "FINETUNE_CHECKPOINT_TO", "FINETUNE_EXPORT_TO")


def render_with_component(overlay: str, component: str, tmp_path: Path) -> list[dict]:
    (tmp_path / "kustomization.yaml").write_text(
        "resources:\n  - {}\ncomponents:\n  - {}\n".format(os.path.relpath(K8S / "overlays" / overlay, tmp_path),
                                                           os.path.relpath(K8S / "components" / component, tmp_path)))
    return [d for d in yaml.safe_load_all(_render(str(tmp_path))) if d]


@needs_kubectl
@pytest.mark.parametrize("overlay", OBJECT_STORAGE_OVERLAYS)
def test_object_storage_component_keeps_nothing_on_shared_volumes(overlay, tmp_path, monkeypatch):
    objects = render_with_component(overlay, "object-storage", tmp_path)
    assert sorted(o["kind"] for o in objects) == sorted([o["kind"] for o in render(overlay)] + ["ServiceAccount"])
    env = config_map(objects)
    assert all(env[name].startswith("s3://") for name in STORE_ENV), env
    assert len({env[name] for name in STORE_ENV}) == 3, "data, checkpoints and the model need their own prefixes"
    unknown = sorted(set(env) - TRAIN_FIELD_ENV - {"FINETUNE_PRESET"})
    assert not unknown, f"not finetune options: {unknown}"
    templates = pod_templates(objects)
    assert templates
    for where, template in templates:
        spec = template["spec"]
        assert all("emptyDir" in v for v in spec["volumes"]), f"{overlay}: {where}: {spec['volumes']}"
        assert spec["serviceAccountName"] == "finetune", "workload identity annotates this account"
        assert restricted_violations(spec) == [], f"{overlay}: {where}"
        train = training_container(spec)
        assert {"secretRef": {"name": "finetune-object-storage", "optional": True}} in train["envFrom"]
        # The emptyDirs on the node's disk fit the pod's ephemeral storage, so the kubelet does not evict it.
        on_disk = sum(_gib(v["emptyDir"]["sizeLimit"]) for v in spec["volumes"]
                      if v["emptyDir"].get("medium") != "Memory")
        for kind in ("requests", "limits"):
            assert on_disk <= _gib(train["resources"][kind]["ephemeral-storage"]), f"{overlay}: {where}"
        command, cfg = parse_command(train, pod_env(train, objects), monkeypatch)
        assert command == "train" and str(cfg.data_dir) == env["FINETUNE_DATA_DIR"] == "s3://finetune/data"
        assert cfg.export_to == env["FINETUNE_EXPORT_TO"]
        assert cfg.checkpoint_to == env["FINETUNE_CHECKPOINT_TO"]
        mounts = {m["mountPath"]: m["name"] for m in train["volumeMounts"]}
        assert cfg.output_dir.is_relative_to("/output") and mounts["/output"] == "output"
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS and obj["kind"] in CRD_MODELS:
            assert model_problems(obj) == [], overlay
        elif (obj["apiVersion"], obj["kind"]) not in CRD_KINDS:
            kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)


@needs_kubectl
def test_object_storage_component_refuses_an_overlay_whose_volumes_moved(tmp_path):
    """The custom resources' volumes are patched by position after a JSON-patch test of the name there: an overlay
    that reorders them fails the build instead of turning the wrong volume into an emptyDir."""
    moved, overlay = tmp_path / "moved", tmp_path / "on-top"
    moved.mkdir()
    (moved / "kustomization.yaml").write_text(
        "resources:\n  - {}\npatches:\n  - target: {{kind: JobSet}}\n    patch: |-\n"
        "      - op: move\n        from: /spec/replicatedJobs/0/template/spec/template/spec/volumes/0\n"
        "        path: /spec/replicatedJobs/0/template/spec/template/spec/volumes/-\n"
        .format(os.path.relpath(K8S / "overlays" / "jobset", moved)))
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text("resources:\n  - ../moved\ncomponents:\n  - {}\n".format(
        os.path.relpath(K8S / "components" / "object-storage", overlay)))
    result = subprocess.run([KUBECTL, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "test" in result.stderr.lower(), result.stderr


def _without_workspace(pod_spec: dict) -> dict:
    spec = json.loads(json.dumps(pod_spec))
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "workspace"]
    for c in spec["containers"]:
        c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != "workspace"]
    return spec


@needs_kubectl
def test_initializers_download_into_the_workspace_before_the_trainer_which_trains_from_it(tmp_path, monkeypatch):
    """As Kubeflow Trainer 2.3's own runtimes: replicated Jobs dataset-initializer and model-initializer (ancestor
    labels and container names the initializer plugin looks for) on a shared volume at /workspace, the trainer
    `dependsOn` both; the trainer pod is the plain runtime's plus the workspace, read-only. Its configuration takes
    the data and the model from /workspace (the platform contract), as nothing in the ConfigMap overrides them."""
    from entrypoint.config import platforms

    objects = render("trainjob-initializers")
    trainjob, runtime = one(objects, "TrainJob"), one(objects, "TrainingRuntime")
    assert trainjob["spec"]["runtimeRef"]["name"] == runtime["metadata"]["name"] == "finetune-initializers"
    assert {k: v["storageUri"].split("://")[0] for k, v in trainjob["spec"]["initializer"].items()} == \
        {"dataset": "hf", "model": "hf"}
    jobs = {r["name"]: r for r in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
    assert list(jobs) == [*INITIALIZERS, "node"]
    for name in INITIALIZERS:
        template = jobs[name]["template"]
        assert template["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == name
        pod = template["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == name and container["image"].startswith(f"ghcr.io/kubeflow/trainer/{name}:")
        assert {"name": "workspace", "mountPath": "/workspace"} in container["volumeMounts"]
        assert {"name": "workspace", "persistentVolumeClaim": {"claimName": "finetune-workspace"}} in pod["volumes"]
    node = jobs["node"]
    assert node["dependsOn"] == [{"name": n, "status": "Complete"} for n in INITIALIZERS]
    pod = node["template"]["spec"]["template"]["spec"]
    assert {"name": "workspace", "mountPath": "/workspace", "readOnly": True} in training_container(pod)["volumeMounts"]
    plain = {r["name"]: r for r in one(render("trainjob"), "TrainingRuntime")["spec"]["template"]["spec"]
             ["replicatedJobs"]}["node"]["template"]["spec"]["template"]["spec"]
    assert _without_workspace(pod) == plain | {"containers": _without_workspace(pod)["containers"]}
    assert [{**c, "envFrom": None} for c in _without_workspace(pod)["containers"]] == \
        [{**c, "envFrom": None} for c in plain["containers"]]  # the ConfigMap differs only by its hash suffix
    assert "FINETUNE_DATA_DIR" not in config_map(objects) and "FINETUNE_MODEL" not in config_map(objects)
    for folder, name in (("dataset", "train.jsonl"), ("model", "config.json")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_text("{}")
    monkeypatch.setattr(platforms, "WORKSPACE", tmp_path)
    _, cfg = parse_command(training_container(pod), pod_env(training_container(pod), objects), monkeypatch)
    assert (Path(cfg.data_dir), cfg.model) == (tmp_path / "dataset", str(tmp_path / "model"))
