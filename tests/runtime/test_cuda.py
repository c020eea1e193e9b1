"""The driver check (entrypoint/runtime/cuda.py) with real version strings,
and the preflight decision through the real CLI
on this GPU-less machine."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from entrypoint.errors import ExitCode
from entrypoint.runtime import cuda
from tests.support.helpers import FAST_TRAIN, REPO, clean_env, finetune, train_env

# /proc/driver/nvidia/version as the proprietary and the open kernel modules write it.
PROC_PROPRIETARY = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.230.02  Thu Oct 31 15:53:38 UTC 2024\n"
                    "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
PROC_OPEN = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  "
             "(dvs-builder@U16-I3-B03-4-3)  Sun Jul 27 07:09:29 UTC 2025\nGCC version:  gcc version 13.3.0\n")


@pytest.mark.parametrize(("text", "version"), [(PROC_PROPRIETARY, "535.230.02"), (PROC_OPEN, "580.65.06"),
                                               ("no driver here", None)])
def test_driver_version_is_read_from_both_kernel_modules_proc_text(text, version):
    assert cuda.parse_proc_version(text) == version


def test_driver_versions_compare_by_number_not_text():
    assert cuda.version_tuple("570.172.08") > cuda.version_tuple("570.26")  # as text, "570.172" < "570.26"
    assert cuda.version_tuple("580.65.06") < cuda.version_tuple("580.159.03")
    assert cuda.version_tuple("550.163.01") < cuda.version_tuple("560.28.03")


@pytest.mark.parametrize(("torch_cuda", "needed"), [("13.0", "580.65.06"), ("12.8", "570.26"), ("12.6", "560.28.03"),
                                                    ("12.4", "550.54.14"), ("12.7", "560.28.03"), ("13.2", "580.65.06"),
                                                    ("14.0", None)])
def test_required_driver_follows_nvidia_table_and_bounds_unknown_minors_from_below(torch_cuda, needed):
    assert cuda.required_driver(torch_cuda) == needed


@pytest.mark.parametrize(("driver", "torch_cuda", "ok"), [
    ("580.65.06", "13.0", True),
    ("580.159.03", "13.0", True),
    ("570.172.08", "13.0", False),
    ("570.172.08", "12.8", True),
    ("550.163.01", "12.8", False),
    ("560.35.03", "12.6", True),
    ("535.230.02", "12.6", False),
])
def test_driver_problem_only_when_the_driver_is_older_than_torch_cuda_needs(driver, torch_cuda, ok):
    line = cuda.driver_problem(driver, torch_cuda, "NVIDIA_VISIBLE_DEVICES=all", "torch 2.13.0")
    assert (line is None) == ok, line


def test_too_old_driver_line_names_found_needed_and_both_fixes():
    line = cuda.driver_problem("570.172.08", "13.0", "NVIDIA_VISIBLE_DEVICES=all", "torch 2.13.0+cu130")
    assert "\n" not in line
    assert "570.172.08" in line and "580.65.06" in line and "CUDA 13.0" in line
    assert "upgrade the driver to 580.65.06" in line
    assert "make image CUDA_FLAVOUR=cu128" in line  # the newest flavour a 570 driver runs


def test_driver_too_old_for_every_flavour_still_names_the_oldest_flavour_and_its_need():
    line = cuda.driver_problem("535.230.02", "13.0", "--precision bf16", "torch 2.13.0+cu130")
    assert "no image flavour runs on it" in line and "CUDA_FLAVOUR=cu126" in line and "560.28.03" in line


@pytest.mark.parametrize(("driver", "flavour"), [("580.65.06", "cu130"), ("575.64.05", "cu128"),
                                                 ("570.172.08", "cu128"), ("565.57.01", "cu126"),
                                                 ("550.163.01", None)])
def test_flavour_for_a_driver_is_the_newest_it_can_run(driver, flavour):
    assert cuda.flavour_for(driver) == flavour


@pytest.mark.parametrize(("devices", "precision", "expected"), [
    ("all", "auto", True), ("0,1", "auto", True), ("GPU-6f1c2a6e-9b0e-4d1c-8a55-1d2f3e4a5b6c", "auto", True),
    ("void", "auto", False), ("none", "auto", False), ("", "auto", False), (None, "auto", False),
    (None, "bf16", True), (None, "fp16", True), ("void", "fp32", False),
])
def test_gpu_is_expected_from_visible_devices_or_a_half_precision_request(devices, precision, expected):
    environ = {} if devices is None else {"NVIDIA_VISIBLE_DEVICES": devices}
    assert (cuda.gpu_expected(precision, environ) is not None) == expected


def test_missing_driver_line_says_what_was_looked_for_and_the_cpu_way_out():
    line = cuda.driver_problem(None, "12.8", "NVIDIA_VISIBLE_DEVICES=all", "torch 2.13.0+cu128")
    assert "no NVIDIA driver is loaded" in line and "570.26" in line and "NVIDIA_VISIBLE_DEVICES=void" in line


def test_image_flavours_agree_with_the_table_and_the_dockerfile():
    dockerfile = (REPO / "Dockerfile").read_text()
    for flavour, version in cuda.FLAVOURS.items():
        stage = re.search(rf"FROM nvidia/cuda:(\S+) AS cuda-{flavour}\nENV NVIDIA_REQUIRE_CUDA=\"cuda>=([\d.]+)\"",
                          dockerfile)
        assert stage, f"no cuda-{flavour} stage declaring NVIDIA_REQUIRE_CUDA"
        assert stage.group(1).startswith(version + "."), f"{flavour}: base {stage.group(1)} is not CUDA {version}"
        assert stage.group(2) == version
        assert f"FINETUNE_IMAGE_CUDA={version}" in dockerfile
    assert f"ARG CUDA_FLAVOUR={next(iter(cuda.FLAVOURS))}" in dockerfile  # the default is the newest


def test_container_docs_first_table_lists_each_flavour_with_its_minimum_driver():
    container = (REPO / "docs" / "container.md").read_text()
    first_table = next(block for block in container.split("\n\n") if block.lstrip().startswith("|"))
    for flavour, version in cuda.FLAVOURS.items():
        assert re.search(rf"\| `{flavour}`.*\| {re.escape(cuda.MINIMUM_DRIVER[version])} .*CUDA_FLAVOUR={flavour}",
                         first_table), f"docs/container.md's first table lacks {flavour}"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make (the dev container has none)")
def test_make_image_passes_the_flavour_and_pytorch_index():
    done = subprocess.run(["make", "-n", "image", "CUDA_FLAVOUR=cu126", "DOCKER=docker", "CA_CERT="], cwd=REPO,
                          capture_output=True, text=True)
    assert "--build-arg CUDA_FLAVOUR=cu126" in done.stdout
    assert "--build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu126" in done.stdout
    default = subprocess.run(["make", "-n", "image", "DOCKER=docker", "CA_CERT="], cwd=REPO, capture_output=True,
                             text=True)
    assert "--build-arg CUDA_FLAVOUR=cu130" in default.stdout and "PIP_EXTRA_INDEX_URL" not in default.stdout


def test_train_expecting_a_gpu_without_a_driver_exits_driver_with_one_line(tmp_path, data_dir, tiny_model):
    env = train_env(tiny_model, data_dir, tmp_path / "out", NVIDIA_VISIBLE_DEVICES="all")
    result = finetune("train", env=env)
    assert result.returncode == ExitCode.DRIVER, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "NVIDIA_VISIBLE_DEVICES=all" in errors[0] and "NVIDIA_VISIBLE_DEVICES=void" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "model").exists()


def test_doctor_expecting_a_gpu_without_a_driver_fails_the_device_line(tmp_path, data_dir, tiny_model):
    env = clean_env(FINETUNE_MODEL=str(tiny_model), FINETUNE_DATA_DIR=str(data_dir),
                    FINETUNE_OUTPUT_DIR=str(tmp_path / "out"), NVIDIA_VISIBLE_DEVICES="0")
    result = finetune("doctor", env=env)
    assert result.returncode == ExitCode.DRIVER, result.stdout + result.stderr
    assert any(line.startswith("FAIL  device:") and "NVIDIA_VISIBLE_DEVICES=0" in line
               for line in result.stdout.splitlines()), result.stdout


def test_void_devices_train_on_the_cpu_as_before(tmp_path, data_dir, tiny_model):
    env = train_env(tiny_model, data_dir, tmp_path / "out", {**FAST_TRAIN, "FINETUNE_MAX_STEPS": "2"},
                    NVIDIA_VISIBLE_DEVICES="void")
    result = finetune("train", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert Path(tmp_path / "out" / "model").is_dir()


@pytest.mark.parametrize("flavour", list(cuda.FLAVOURS))
def test_each_flavour_of_the_dockerfile_passes_hadolint(tmp_path, flavour):
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: it comes with the dev extra (make install)"
    text = (REPO / "Dockerfile").read_text()
    assert "ARG CUDA_FLAVOUR=cu130\n" in text
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(text.replace("ARG CUDA_FLAVOUR=cu130\n", f"ARG CUDA_FLAVOUR={flavour}\n"))
    done = subprocess.run([hadolint, "--failure-threshold", "warning", str(dockerfile)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
def loaded_driver(tmp_path, monkeypatch):
    """This machine as if the 570 driver were loaded: /proc/driver/nvidia/version's text in a file."""
    proc = tmp_path / "version"
    proc.write_text(PROC_PROPRIETARY.replace("535.230.02", "570.172.08"))
    monkeypatch.setattr(cuda, "PROC_VERSION", proc)
    return proc


def test_driver_version_is_read_from_proc_first(loaded_driver):
    assert cuda.driver_version() == "570.172.08"


def test_a_cpu_torch_beside_a_driver_trains_on_the_cpu_unless_a_gpu_is_asked_for(loaded_driver):
    import torch

    if torch.version.cuda is not None:
        pytest.skip("needs the CPU build of torch")
    cuda.check("auto", {})  # nothing asked for a GPU: quiet
    with pytest.raises(cuda.DriverError, match="CPU-only build"):
        cuda.check("bf16", {})
    with pytest.raises(cuda.DriverError, match="NVIDIA_VISIBLE_DEVICES=all"):
        cuda.check("auto", {"NVIDIA_VISIBLE_DEVICES": "all"})


def test_prepare_from_the_cuda_image_on_a_cpu_node_needs_no_driver(tmp_path, data_dir, tiny_model):
    """Tokenizing needs no GPU: the prepare overlay runs the CUDA image (NVIDIA_VISIBLE_DEVICES=all) on CPU nodes."""
    env = train_env(tiny_model, data_dir, tmp_path / "out", NVIDIA_VISIBLE_DEVICES="all")
    result = finetune("prepare", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "prepared:" in result.stdout
