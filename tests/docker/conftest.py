"""Fixtures for the container tests: a Docker engine, the CPU image built by `make image-cpu`, compose through
pytest-docker, and a tiny model and corpus that any container user can read.

Every test here is marked `docker` (pytestmark in each module). Without a reachable engine they skip with the
fix in the reason; under CI (CI set) they fail instead, so a CI run can never pass by skipping them. Start an
engine with `scripts/docker-engine.sh` (as root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.docker.helpers import CPU_IMAGE, DOCKER, REPO, docker, readable_copy, skip_or_fail


@pytest.fixture(scope="session")
def engine() -> str:
    """The docker client path, once an engine answers."""
    if shutil.which(DOCKER) is None:
        skip_or_fail(f"no docker client ({DOCKER}); run scripts/docker-engine.sh as root to install one")
    if docker("info", timeout=30).returncode != 0:
        skip_or_fail("no Docker engine reachable; run scripts/docker-engine.sh as root to start one")
    return DOCKER


@pytest.fixture(scope="session")
def cpu_image(engine) -> str:
    """The CPU image, built exactly as a developer builds it: `make image-cpu` (warm: a few seconds)."""
    result = subprocess.run(["make", "-C", str(REPO), "image-cpu", f"CPU_IMAGE={CPU_IMAGE}", f"DOCKER={engine}"],
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, "make image-cpu failed:\n" + result.stdout[-4000:] + result.stderr[-4000:]
    return CPU_IMAGE


@pytest.fixture(scope="session")
def container_assets(tmp_path_factory, corpus_dir, tiny_model) -> dict[str, Path]:
    """The shared corpus and tiny model (tests/conftest.py), readable by every container user."""
    root = tmp_path_factory.mktemp("container-assets")
    root.chmod(0o755)
    return {"data": readable_copy(corpus_dir, root / "data"), "model": readable_copy(tiny_model, root / "model")}


@pytest.fixture
def output_dir(tmp_path) -> Path:
    """An empty output directory owned by the host user and group-writable only: container users with GID 0
    (1000:0, 12345:0) write through the group, as on arbitrary-UID platforms."""
    directory = tmp_path / "output"
    directory.mkdir()
    if os.geteuid() == 0:
        os.chown(directory, -1, 0)
        directory.chmod(0o775)
    else:  # a non-root host user cannot hand the directory to group 0
        directory.chmod(0o777)
    tmp_path.chmod(0o755)
    return directory


@pytest.fixture
def container_name(engine):
    """A unique container name, removed after the test whatever happened."""
    name = f"finetune-test-{uuid.uuid4().hex[:8]}"
    yield name
    docker("rm", "-f", name, timeout=60)


# Pytest-docker: compose.yaml, with compose v1 or v2, and no `up` (the services are batch jobs)

@pytest.fixture(scope="session")
def docker_compose_command(engine) -> str:
    if docker("compose", "version", timeout=30).returncode == 0:
        return f"{engine} compose"
    if shutil.which("docker-compose"):
        # Compose v1: pytest-docker's default `docker compose up --build --wait` does nothing useful here.
        return "docker-compose"
    skip_or_fail("neither `docker compose` nor docker-compose is installed; run scripts/docker-engine.sh")


@pytest.fixture(scope="session")
def docker_compose_file() -> str:
    return str(REPO / "compose.yaml")


@pytest.fixture(scope="session")
def docker_setup() -> list[str]:
    # Validate compose.yaml; the tests start their own `run` containers.
    return ["--profile cpu config --quiet"]


@pytest.fixture(scope="session")
def docker_cleanup() -> list[str]:
    return ["--profile cpu down --volumes --remove-orphans"]


@pytest.fixture
def compose(docker_services, docker_compose_command, docker_compose_file, docker_compose_project_name):
    """Run `docker compose <args>` for this session's project, with extra environment for substitution."""

    def run(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
        command = [*docker_compose_command.split(), "-f", docker_compose_file, "-p", docker_compose_project_name,
                   *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **env}, stdin=subprocess.DEVNULL)

    return run
