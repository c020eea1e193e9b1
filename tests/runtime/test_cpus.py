"""entrypoint/runtime/cpus.py: the worker count from the affinity mask and the cgroup CPU quota, read from real cgroup
v1 and v2 file layouts written under tmp_path (the function takes the roots as parameters)."""

from __future__ import annotations

import os
from pathlib import Path

from entrypoint.runtime.cpus import available_cpus, cgroup_cpu_quota

AFFINITY = len(os.sched_getaffinity(0))


def layout(tmp_path: Path, self_cgroup: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "sys-fs-cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    root.mkdir(exist_ok=True)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(self_cgroup)
    return root, proc


def test_cgroup_v2_quota_caps_workers_below_the_cores(tmp_path):
    root, proc = layout(tmp_path, "0::/kubepods/pod1/ctr\n", {"kubepods/pod1/ctr/cpu.max": "150000 100000\n",
                                                            "cpu.max": "max 100000\n"})
    assert cgroup_cpu_quota(root, proc) == 1.5
    assert available_cpus(root, proc) == 1  # 1.5 CPUs of time: one busy worker, not two throttled ones


def test_cgroup_v2_tightest_ancestor_wins(tmp_path):
    root, proc = layout(tmp_path, "0::/kubepods/pod1/ctr\n", {"kubepods/pod1/cpu.max": "200000 100000\n",
                                                            "kubepods/pod1/ctr/cpu.max": "max 100000\n"})
    assert cgroup_cpu_quota(root, proc) == 2.0


def test_cgroup_v1_cfs_quota_is_read_from_the_cpu_controller(tmp_path):
    root, proc = layout(tmp_path, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n",
                        {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n",
                         "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_quota(root, proc) == 0.5
    assert available_cpus(root, proc) == 1  # never zero


def test_no_quota_leaves_the_affinity_mask(tmp_path):
    root, proc = layout(tmp_path, "0::/\n", {"cpu.max": "max 100000\n"})
    assert cgroup_cpu_quota(root, proc) is None and available_cpus(root, proc) == AFFINITY
    v1, proc1 = layout(tmp_path / "v1", "4:cpu,cpuacct:/\n", {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
                                                              "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert available_cpus(v1, proc1) == AFFINITY
    assert available_cpus(tmp_path / "missing", tmp_path / "missing-proc") == AFFINITY


def test_a_quota_above_the_affinity_mask_changes_nothing(tmp_path):
    root, proc = layout(tmp_path, "0::/\n", {"cpu.max": f"{(AFFINITY + 8) * 100000} 100000\n"})
    assert available_cpus(root, proc) == AFFINITY
