"""A Kubernetes pod as `docker run` arguments, field by field, as a kubelet would start its containers
(tests/docker/jobs.py renders the manifests, makes the pods and runs them).

Every field is allow-listed: one this module does not translate raises NotTranslated, so a manifest change
cannot pass here by being ignored. What a pod has that these containers do not: scheduling (nodeSelector,
tolerations and GPU resources are refused, not dropped), the service-account token, the KUBERNETES_* service
variables, a cluster DNS search path, and kubelet-enforced sizes (ephemeral-storage, disk emptyDir sizeLimit).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from tests.docker.helpers import docker

LABEL = "io.finetune.test-pods"  # on every container and network, so jobs.sandbox finds them all
CLUSTER_DOMAIN = "cluster.local"

# Fields translated below, and (with the reason) those with no effect on one container on one host.
POD_FIELDS = {"containers", "initContainers", "volumes", "securityContext", "restartPolicy",
              "terminationGracePeriodSeconds", "hostname", "subdomain"}
POD_SECURITY = {"runAsUser", "runAsGroup", "runAsNonRoot", "fsGroup", "fsGroupChangePolicy",
                "supplementalGroups", "seccompProfile"}
CONTAINER_FIELDS = {"name", "image", "command", "args", "workingDir", "env", "envFrom", "resources",
                    "securityContext", "volumeMounts", "ports", "terminationMessagePath",
                    "terminationMessagePolicy",
                    "imagePullPolicy"}  # the image is local; Always would pull, so it is refused below
CONTAINER_SECURITY = {"runAsUser", "runAsGroup", "runAsNonRoot", "allowPrivilegeEscalation",
                      "readOnlyRootFilesystem", "capabilities", "privileged", "seccompProfile"}
# ephemeral-storage is enforced by kubelet eviction, which Docker has no equivalent of; requests only schedule.
RESOURCES = {"cpu", "memory", "ephemeral-storage"}
MOUNT_FIELDS = {"name", "mountPath", "readOnly"}
SUFFIXES = {"": 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


class NotTranslated(AssertionError):
    """A field of the rendered manifests that has no translation here: add one, or override the field."""


def allow(obj: dict, allowed: set[str], where: str) -> dict:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise NotTranslated(f"{where}: {', '.join(unknown)} not translated to docker run (allowed: "
                            f"{', '.join(sorted(allowed))})")
    return obj


def quantity(value) -> Decimal:
    """A Kubernetes resource quantity ("4Gi", "500m", "2") as a number of bytes or cores."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]*)?)([A-Za-z]*)", str(value))
    if not match or match[2] not in SUFFIXES:
        raise NotTranslated(f"quantity {value!r}")
    return Decimal(match[1]) * SUFFIXES[match[2]]


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: a defined variable is substituted, an undefined one left as written,
    and $$ is a literal $."""
    return re.sub(r"\$\$|\$\(([^)]*)\)",
                  lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), text)


@dataclass
class Pod:
    name: str
    namespace: str
    labels: dict[str, str]
    annotations: dict[str, str]
    spec: dict
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def hostname(self) -> str:
        return self.spec.get("hostname", self.name)


class Cluster:
    """A namespace's worth of rendered objects, and what stands in for the cluster: `images` maps manifest
    image names to local images, `claims` maps PVC names to host directories, emptyDirs are folders under
    `workdir`, and Docker objects are named and labelled by `prefix`. With `network`, pods get a user-defined
    Docker network (jobs.sandbox creates it) and the DNS names a headless Service gives them;
    without, every container runs with --network none."""

    def __init__(self, objects: list[dict], *, images: dict[str, str], claims: dict[str, Path], workdir: Path,
                 prefix: str, network: bool = False):
        self.objects, self.images, self.claims, self.workdir, self.prefix = objects, images, claims, workdir, prefix
        self.network = f"{prefix}-net" if network else None
        self.termination_logs: dict[str, Path] = {}  # container name -> the host file behind its termination log

    def commands(self, pod: Pod) -> tuple[list[list[str]], list[list[str]]]:
        """`docker run` arguments for the pod's init containers (run in order, each to completion) and its
        containers (detached); every field checked before anything starts."""
        allow(pod.spec, POD_FIELDS, f"pod {pod.name} spec")
        if pod.spec.get("restartPolicy") != "Never":
            raise NotTranslated(f"restartPolicy {pod.spec.get('restartPolicy')}: only Never is translated")
        if len(pod.spec["containers"]) != 1:
            raise NotTranslated("sidecars: a pod's containers share one network namespace; not translated")
        return ([self.docker_run(pod, c, detach=False) for c in pod.spec.get("initContainers", [])],
                [self.docker_run(pod, c, detach=True) for c in pod.spec["containers"]])

    def find(self, kind: str, name: str) -> dict | None:
        return next((o for o in self.objects if o["kind"] == kind and o["metadata"]["name"] == name), None)

    def env(self, pod: Pod, container: dict) -> dict[str, str]:
        """The container's environment as the kubelet builds it: envFrom, then env in order, each value
        expanded against what came before; optional references to missing objects are dropped."""
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            allow(source, {"configMapRef", "secretRef", "prefix"}, "envFrom")
            kind, ref = ("ConfigMap", source["configMapRef"]) if "configMapRef" in source else \
                ("Secret", source["secretRef"])
            obj = self.referenced(kind, ref)
            env.update({source.get("prefix", "") + k: v for k, v in (obj or {}).get("data", {}).items()})
        for var in container.get("env", []):
            allow(var, {"name", "value", "valueFrom"}, f"env {var['name']}")
            if "valueFrom" not in var:
                env[var["name"]] = expand(var.get("value", ""), env)
                continue
            source = allow(var["valueFrom"], {"configMapKeyRef", "secretKeyRef", "fieldRef"}, f"env {var['name']}")
            if "fieldRef" in source:
                env[var["name"]] = self.downward(pod, source["fieldRef"]["fieldPath"])
                continue
            kind, ref = ("ConfigMap", source["configMapKeyRef"]) if "configMapKeyRef" in source else \
                ("Secret", source["secretKeyRef"])
            obj = self.referenced(kind, ref)
            if obj is not None and ref["key"] in obj.get("data", {}):
                env[var["name"]] = obj["data"][ref["key"]]
            elif not ref.get("optional"):
                raise AssertionError(f"env {var['name']}: key {ref['key']} missing from {kind} {ref['name']}; "
                                     "the kubelet would refuse to start the container")
        return env

    def referenced(self, kind: str, ref: dict) -> dict | None:
        obj = self.find(kind, ref["name"])
        if kind == "Secret" and obj is not None:
            raise NotTranslated(f"Secret {ref['name']} (rendered Secrets are not translated)")
        if obj is None and not ref.get("optional"):
            raise AssertionError(f"{kind} {ref['name']} is not among the rendered objects and not optional; "
                                 "the kubelet would refuse to start the container")
        return obj

    @staticmethod
    def downward(pod: Pod, path: str) -> str:
        simple = {"metadata.name": pod.name, "metadata.namespace": pod.namespace, "metadata.uid": pod.uid}
        if path in simple:
            return simple[path]
        match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
        if not match:
            raise NotTranslated(f"downward API fieldPath {path}")
        return getattr(pod, match[1]).get(match[2], "")

    def dns_names(self, pod: Pod, container_ports: dict) -> list[str]:
        """The names a headless Service named after the pod's subdomain gives it, if it selects the pod."""
        subdomain = pod.spec.get("subdomain")
        service = self.find("Service", subdomain) if subdomain else None
        if service is None:
            return []
        spec = allow(service["spec"], {"clusterIP", "selector", "ports", "publishNotReadyAddresses"},
                     f"Service {subdomain}")
        if spec.get("clusterIP") != "None":
            raise NotTranslated(f"Service {subdomain}: only headless Services (clusterIP: None) are translated")
        if not spec.get("selector", {}).items() <= pod.labels.items():
            return []
        for port in spec.get("ports", []):
            allow(port, {"name", "port", "targetPort", "protocol"}, f"Service {subdomain} port")
            target = port.get("targetPort", port["port"])
            number = container_ports.get(target, target)
            if number != port["port"]:
                raise NotTranslated(f"Service {subdomain} port {port['port']} targets {target}, not the same "
                                    "container port: a user-defined Docker network cannot remap ports")
        fqdn = f"{pod.hostname}.{subdomain}.{pod.namespace}.svc.{CLUSTER_DOMAIN}"
        return [f"{pod.hostname}.{subdomain}", fqdn, subdomain]

    def host_dir(self, pod: Pod, volume: dict) -> Path:
        """The host directory behind a PVC or a disk emptyDir, with fsGroup applied as the kubelet does."""
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            if claim not in self.claims:
                raise NotTranslated(f"PVC {claim}: no host directory given for it (claims=)")
            return self.claims[claim]
        path = self.workdir / pod.name / volume["name"]
        if not path.exists():
            path.mkdir(parents=True)
            path.chmod(0o777)  # the kubelet's mode for an emptyDir
        return path

    def docker_run(self, pod: Pod, container: dict, *, detach: bool) -> list[str]:
        """`docker run` arguments for one container of `pod`."""
        where = f"container {container['name']}"
        allow(container, CONTAINER_FIELDS, where)
        spec = pod.spec
        if container.get("imagePullPolicy", "IfNotPresent") == "Always":
            raise NotTranslated(f"{where}: imagePullPolicy Always (the image is local)")
        if container["image"] not in self.images:
            raise NotTranslated(f"{where}: image {container['image']} has no local image (images=)")
        image = self.images[container["image"]]
        name = f"{self.prefix}-{pod.name}-{container['name']}"
        args = ["run", "--name", name, "--label", f"{LABEL}={self.prefix}", "--hostname", pod.hostname]
        if detach:
            args.append("--detach")

        # Peers on a user-defined network reach every port, as in a pod network; hostPort would need -p.
        for port in container.get("ports", []):
            allow(port, {"name", "containerPort", "protocol"}, f"{where} port")
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
        if self.network:
            args += ["--network", self.network]
            for alias in self.dns_names(pod, ports):
                args += ["--network-alias", alias]
        else:
            args += ["--network", "none"]

        args += self.security(pod, container, image)
        limits = allow(container.get("resources", {}).get("limits", {}), RESOURCES, f"{where} limits")
        allow(container.get("resources", {}), {"limits", "requests"}, f"{where} resources")
        allow(container.get("resources", {}).get("requests", {}), RESOURCES, f"{where} requests")
        if "cpu" in limits:
            args += ["--cpus", str(quantity(limits["cpu"]))]
        if "memory" in limits:
            args += ["--memory", str(int(quantity(limits["memory"])))]
        args += self.mounts(pod, container, name)
        if "terminationGracePeriodSeconds" in spec:
            args += ["--stop-timeout", str(spec["terminationGracePeriodSeconds"])]
        if "workingDir" in container:
            args += ["--workdir", container["workingDir"]]

        env = self.env(pod, container)
        for key, value in env.items():
            args += ["--env", f"{key}={value}"]
        # command replaces ENTRYPOINT (and so CMD); args replace CMD. docker run --entrypoint also drops CMD.
        command = [expand(a, env) for a in container.get("command") or []]
        rest = [expand(a, env) for a in container.get("args") or []]
        if command:
            args += ["--entrypoint", command[0]]
            rest = [*command[1:], *rest]
        return [*args, image, *rest]

    def security(self, pod: Pod, container: dict, image: str) -> list[str]:
        pod_ctx = allow(pod.spec.get("securityContext", {}), POD_SECURITY, "pod securityContext")
        ctx = allow(container.get("securityContext", {}), CONTAINER_SECURITY,
                    f"container {container['name']} securityContext")
        merged = {**pod_ctx, **ctx}
        args = []
        uid, gid = merged.get("runAsUser"), merged.get("runAsGroup")
        if gid is not None and uid is None:
            raise NotTranslated("runAsGroup without runAsUser")
        if uid is not None:
            args += ["--user", f"{uid}:{gid}" if gid is not None else str(uid)]
        if merged.get("runAsNonRoot"):
            user = str(uid) if uid is not None else image_user(image).split(":")[0]
            if not user.isdigit() or int(user) == 0:
                raise AssertionError(f"runAsNonRoot with user {user!r}: the kubelet would refuse the container")
        for group in [*pod_ctx.get("supplementalGroups", []), *([pod_ctx["fsGroup"]] if "fsGroup" in pod_ctx
                                                              else [])]:
            args += ["--group-add", str(group)]
        seccomp = merged.get("seccompProfile", {"type": "RuntimeDefault"})
        if seccomp["type"] == "Unconfined":
            args += ["--security-opt", "seccomp=unconfined"]
        elif seccomp["type"] != "RuntimeDefault":  # Docker's default profile is the runtime default
            raise NotTranslated(f"seccompProfile {seccomp}")
        if ctx.get("privileged"):
            args.append("--privileged")
        if ctx.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        if ctx.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        caps = allow(ctx.get("capabilities", {}), {"drop", "add"}, "capabilities")
        for cap in caps.get("drop", []):
            args += ["--cap-drop", cap]
        for cap in caps.get("add", []):
            args += ["--cap-add", cap]
        return args

    def mounts(self, pod: Pod, container: dict, name: str) -> list[str]:
        volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
        fs_group = pod.spec.get("securityContext", {}).get("fsGroup")
        policy = pod.spec.get("securityContext", {}).get("fsGroupChangePolicy", "Always")
        args = []
        for mount in container.get("volumeMounts", []):
            allow(mount, MOUNT_FIELDS, f"container {container['name']} volumeMount")
            volume = allow(volumes[mount["name"]], {"name", "persistentVolumeClaim", "emptyDir"},
                           f"volume {mount['name']}")
            claim = allow(volume.get("persistentVolumeClaim", {}), {"claimName", "readOnly"}, f"PVC {mount['name']}")
            empty_dir = allow(volume.get("emptyDir", {}), {"medium", "sizeLimit"}, f"emptyDir {mount['name']}")
            read_only = bool(mount.get("readOnly") or claim.get("readOnly"))
            if empty_dir.get("medium") == "Memory":
                args += self.memory_volume(pod, mount, empty_dir, read_only)
                continue
            if empty_dir.get("medium", "") != "":
                raise NotTranslated(f"emptyDir medium {empty_dir['medium']}")
            host = self.host_dir(pod, volume)
            if fs_group is not None:  # the volume's own read-only flag, not this mount's
                set_volume_ownership(host, fs_group, bool(claim.get("readOnly")), policy)
            args += ["--volume", f"{host}:{mount['mountPath']}" + (":ro" if read_only else "")]
        # The kubelet bind-mounts a writable file here; the job writes its one-line error to it.
        log = self.workdir / pod.name / f"{name}.termination-log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.touch()
        log.chmod(0o666)
        self.termination_logs[name] = log
        return [*args, "--volume", f"{log}:{container.get('terminationMessagePath', '/dev/termination-log')}"]

    def memory_volume(self, pod: Pod, mount: dict, source: dict, read_only: bool) -> list[str]:
        users = [c["name"] for c in [*pod.spec.get("initContainers", []), *pod.spec["containers"]]
                 if any(m["name"] == mount["name"] for m in c.get("volumeMounts", []))]
        if len(users) > 1 or read_only or "sizeLimit" not in source:
            raise NotTranslated(f"Memory emptyDir {mount['name']}: only one container's, writable, with a "
                                f"sizeLimit, becomes a tmpfs (mounted by {users})")
        size = int(quantity(source["sizeLimit"]))
        if mount["mountPath"] == "/dev/shm":
            return ["--shm-size", str(size)]
        return ["--tmpfs", f"{mount['mountPath']}:rw,exec,mode=777,size={size}"]

    def host_path(self, pod: Pod, container: dict, path: str) -> Path:
        """Where a path inside a container lies on the host: on the PVC or emptyDir mounted over it."""
        volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
        mounts = sorted(container.get("volumeMounts", []), key=lambda m: len(m["mountPath"]), reverse=True)
        for mount in mounts:
            relative = os.path.relpath(path, mount["mountPath"])
            if not relative.startswith(".."):
                return self.host_dir(pod, volumes[mount["name"]]) / relative
        raise AssertionError(f"{path} is on no volume of container {container['name']}: it dies with the pod")


def set_volume_ownership(path: Path, gid: int, read_only: bool, policy: str) -> None:
    """What the kubelet does to a volume for fsGroup: group gid, group read (and write) for everything,
    setgid on directories; with OnRootMismatch only when the volume's root does not already match."""
    mask = 0o440 if read_only else 0o660
    root = path.stat()
    if policy == "OnRootMismatch" and root.st_gid == gid and root.st_mode & (mask | 0o110 | 0o2000) == (
            mask | 0o110 | 0o2000):
        return
    for item in [path, *path.rglob("*")]:
        os.lchown(item, -1, gid)
        if not item.is_symlink():
            mode = item.stat().st_mode
            item.chmod(mode | mask | (0o110 | 0o2000 if item.is_dir() else 0))


def image_user(image: str) -> str:
    return json.loads(docker("image", "inspect", image, check=True).stdout)[0]["Config"]["User"] or "0"
