"""How many CPUs this process may actually use: its affinity mask, capped by the cgroup CPU quota a container
runtime or Kubernetes sets (`resources.limits.cpu`). os.cpu_count() counts the node's cores, so a pod limited
to 4 CPUs on a 96-core node would start 96 tokenizing processes and spend its quota on contention.
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


def available_cpus(cgroup_root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> int:
    """The affinity mask's size, lowered to the cgroup quota (rounded down, at least 1)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root, self_cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, int(quota)))
    return max(1, cpus)


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> float | None:
    """CPUs' worth of time per period this process's cgroup (or any ancestor) allows; None when unlimited.

    cgroup v2: `cpu.max` holds "QUOTA PERIOD" or "max PERIOD". cgroup v1: `cpu.cfs_quota_us` (-1: none) and
    `cpu.cfs_period_us` under the cpu controller's mount. The tightest limit on the path to the root wins."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            limits += [_v2_limit(d) for d in _ancestors(cgroup_root, path)]
        elif "cpu" in controllers.split(","):
            for mount in (cgroup_root / controllers, cgroup_root / "cpu", cgroup_root / "cpu,cpuacct"):
                if mount.is_dir():
                    limits += [_v1_limit(d) for d in _ancestors(mount, path)]
                    break
    found = [q for q in limits if q is not None]
    return min(found) if found else None


def _ancestors(root: Path, path: str) -> list[Path]:
    """root/a/b/c, root/a/b, root/a and root, for the cgroup path /a/b/c."""
    parts = [p for p in path.split("/") if p]
    return [root.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _v2_limit(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _v1_limit(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else quota / period


def tokenizing_workers(requested: int) -> int:
    """Processes to tokenize with: --preprocessing-workers, or for 0 one per CPU this process may use."""
    return requested or available_cpus()
