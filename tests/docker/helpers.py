"""Helpers for the container tests: the docker client, and what make image-cpu passes to docker build."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Debian's docker client has BuildKit built in; another `docker` earlier on PATH may not.
DOCKER = os.environ.get("DOCKER") or ("/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker")
CPU_IMAGE = os.environ.get("CPU_IMAGE", "finetune:cpu")
# Built by scripts/docker-engine.sh where no registry is reachable; the Makefile picks it up by the same tag.
TEST_BASE_IMAGE = "finetune-test-base:bookworm"
CA_CERT = Path("/etc/ssl/certs/ca-certificates.crt")


def docker(*args: str, timeout: float = 900, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """Run the docker client; output captured as text."""
    result = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def output_of(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def skip_or_fail(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the container tests, so this fails rather than skips)")
    pytest.skip(reason)


def build_args() -> list[str]:
    """What make image-cpu passes to docker build, for the tests that build other targets of the Dockerfile."""
    base = TEST_BASE_IMAGE if docker("image", "inspect", TEST_BASE_IMAGE).returncode == 0 else ""
    args = ["--build-arg", f"BASE_IMAGE={base}", "--build-arg", "PIP_FIND_LINKS=/wheels"]
    if CA_CERT.exists():
        args += ["--secret", f"id=ca,src={CA_CERT}"]
    return args


def readable_copy(source: Path, target: Path) -> Path:
    """Copy a tree so that any container UID can read it (init-model writes its weights 0600)."""
    shutil.copytree(source, target)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target
