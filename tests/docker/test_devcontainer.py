"""The dev container, opened with the Dev Containers CLI as an editor would: built from the Dockerfile's `dev`
stage, the repository mounted at /workspace, the package importable from there, tools run as the non-root user."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest

from tests.docker.helpers import REPO, TEST_BASE_IMAGE, build_args, docker, output_of, skip_or_fail

pytestmark = pytest.mark.docker

# Installed on first use under an ignored folder of the repository, never globally.
CLI_PACKAGE = "@devcontainers/cli@0.89.0"
CLI_DIR = REPO / ".devcontainer-cli"


@pytest.fixture(scope="module")
def devcontainer_cli(engine) -> str:
    binary = CLI_DIR / "node_modules" / ".bin" / "devcontainer"
    if not binary.exists():
        if shutil.which("npm") is None:
            skip_or_fail("npm is not installed; the Dev Containers CLI is an npm package")
        result = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(CLI_DIR), CLI_PACKAGE],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, output_of(result)
    return str(binary)


@pytest.fixture(scope="module")
def dev_container(engine, cpu_image, devcontainer_cli):
    """`devcontainer up` on the repository; yields a function that runs a command with `devcontainer exec`."""
    # Dev container builds cannot pass BuildKit secrets, which pip needs behind this machine's TLS proxy: build
    # the same target with the same arguments first, so the build inside `devcontainer up` is all cache hits.
    prebuild = docker("build", "--target", "dev", *build_args(), str(REPO),
                      env={**os.environ, "DOCKER_BUILDKIT": "1"}, timeout=1500)
    assert prebuild.returncode == 0, output_of(prebuild)

    label = f"finetune-test={uuid.uuid4().hex[:8]}"
    common = ["--workspace-folder", str(REPO), "--docker-path", engine, "--id-label", label]
    base = TEST_BASE_IMAGE if docker("image", "inspect", TEST_BASE_IMAGE).returncode == 0 else ""
    env = {**os.environ, "DOCKER_BUILDKIT": "1", "DEVCONTAINER_BASE_IMAGE": base,
           "DEVCONTAINER_PIP_FIND_LINKS": "/wheels"}
    # The CLI maps the container user to the host user's UID; for a host user root that would be UID 0, so keep
    # the image's 1000, as for a developer whose UID is 1000.
    up = subprocess.run([devcontainer_cli, "up", *common, "--update-remote-user-uid-default", "never"],
                        capture_output=True, text=True, timeout=1500, env=env)
    try:
        assert up.returncode == 0, output_of(up)

        def run(*command: str, timeout: float = 900) -> subprocess.CompletedProcess:
            return subprocess.run([devcontainer_cli, "exec", *common, *command], capture_output=True, text=True,
                                  timeout=timeout, env=env, stdin=subprocess.DEVNULL)

        yield run
    finally:
        ids = docker("ps", "-aq", "--filter", f"label={label}").stdout.split()
        if ids:
            docker("rm", "-f", *ids, timeout=60)


def test_dev_container_user_is_not_root(dev_container):
    result = dev_container("id", "-u")
    assert result.returncode == 0, output_of(result)
    assert result.stdout.strip() == "1000"


def test_finetune_runs_from_the_mounted_workspace(dev_container):
    result = dev_container("finetune", "--help")
    assert result.returncode == 0, output_of(result)
    assert "Usage: finetune" in result.stdout
    where = dev_container("python", "-c", "import entrypoint; print(entrypoint.__file__)")
    assert where.stdout.strip() == "/workspace/entrypoint/__init__.py", output_of(where)


# The host runs the whole suite; inside, a subset that touches every kind of dependency the dev container must
# provide (the Trainer and torch.compile, tokenizers, file permissions as uid 1000, worker processes, the lease's
# heartbeat, the package layout). The whole quick suite took 11 of make test's 45 minutes here.
IN_CONTAINER_TESTS = (
    "tests/test_fsutil.py", "tests/test_logs.py", "tests/config/test_platforms.py", "tests/train/test_guard.py",
    "tests/train/test_attention.py", "tests/train/test_steps.py", "tests/data/test_formats.py",
    "tests/data/test_split.py", "tests/data/test_textfiles.py", "tests/runtime/test_forkpool.py",
    "tests/publish/test_lease.py", "tests/project/test_layout.py",
)


@pytest.mark.timeout(1200)
def test_unit_tests_pass_in_the_dev_container(dev_container):
    # The workspace belongs to the host user, so nothing may write there: no pytest cache.
    result = dev_container("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not docker and not slow",
                           *IN_CONTAINER_TESTS, timeout=1100)
    assert result.returncode == 0, output_of(result)[-6000:]
    assert " passed" in result.stdout
