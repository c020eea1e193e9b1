"""The Dockerfile and compose.yaml, checked without an engine (these tests are not marked `docker`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.docker.helpers import REPO

HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


def test_dockerfile_has_no_hadolint_warnings():
    # make lint runs the same check; here CI runs it too. Every ignore in the Dockerfile carries its reason.
    assert HADOLINT, "hadolint is missing: it comes with the dev extra (make install)"
    result = subprocess.run([HADOLINT, "--failure-threshold", "warning", str(REPO / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_train_service_reserves_gpus_and_mounts_data_read_only():
    services = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]
    devices = services["train"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    for service in services.values():
        assert "${DATA_DIR:-./data}:/data:ro" in service["volumes"]
        assert service["read_only"] is True
        assert service["tmpfs"] == ["/tmp:exec"]  # torch.compile loads its kernels from /tmp


def test_cuda_flavours_default_to_expandable_segments_and_the_cpu_image_does_not():
    # Set in the `cuda` stage, which only the CUDA flavours build on (the CPU image starts from Debian).
    stages = (REPO / "Dockerfile").read_text().split("\nFROM ")
    cuda = next(stage for stage in stages if stage.startswith("cuda-${CUDA_FLAVOUR} AS cuda\n"))
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in cuda
    assert sum("PYTORCH_CUDA_ALLOC_CONF" in stage for stage in stages) == 1
