"""The image as a cluster runs it: the CPU build of the Dockerfile, trained for real on a tiny model."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.docker.helpers import REPO, build_args, docker, output_of

pytestmark = pytest.mark.docker

# A locked-down run: no writable root filesystem but /tmp, no network, all capabilities dropped.
LOCKED_DOWN = ("--read-only", "--tmpfs", "/tmp", "--network", "none", "--cap-drop", "ALL",
               "--security-opt", "no-new-privileges")
# The same for torch.compile, which loads the kernels it builds from /tmp: Docker mounts a tmpfs noexec by default.
LOCKED_DOWN_COMPILING = tuple("/tmp:exec" if arg == "/tmp" else arg for arg in LOCKED_DOWN)


def mounts(assets: dict[str, Path], output: Path) -> list[str]:
    return ["-v", f"{assets['data']}:/data:ro", "-v", f"{assets['model']}:/model:ro", "-v", f"{output}:/output"]


def logs(container: str) -> str:
    """What the container wrote, stdout and stderr together (the log lines go to stderr)."""
    result = docker("logs", container)
    return result.stdout + result.stderr


def assert_published(output: Path) -> None:
    assert (output / "model" / "COMPLETE").is_file(), sorted(p.name for p in output.rglob("*"))
    for name in ("metrics.json", "status.json", "loss.png"):
        assert (output / name).is_file(), name
    assert json.loads((output / "status.json").read_text())["state"] == "succeeded"


def test_image_runs_finetune_train_as_non_root_under_tini(cpu_image):
    config = json.loads(docker("image", "inspect", cpu_image, check=True).stdout)[0]["Config"]
    assert config["User"] == "1000:0"
    assert config["Entrypoint"] == ["tini", "--", "finetune"]
    assert config["Cmd"] == ["train"]
    env = dict(line.split("=", 1) for line in config["Env"])
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["FINETUNE_PRESET_DIR"] == "/app/config"
    for cache in ("HF_HOME", "HF_DATASETS_CACHE", "XDG_CACHE_HOME", "MPLCONFIGDIR", "TRITON_CACHE_DIR",
                  "TORCHINDUCTOR_CACHE_DIR"):
        assert env[cache].startswith("/tmp/"), cache


def test_build_secret_leaves_no_trace_in_the_image(cpu_image):
    # The CA bundle is mounted as a BuildKit secret and combined in /tmp only for the length of one RUN.
    result = docker("run", "--rm", "--entrypoint", "sh", cpu_image, "-c",
                    "ls -A /tmp; ls /run/secrets 2>/dev/null; true", check=True)
    assert result.stdout.strip() == ""
    history = docker("history", "--no-trunc", cpu_image, check=True).stdout
    assert "BEGIN CERTIFICATE" not in history


def test_trains_with_compose_as_the_image_user(compose, cpu_image, container_assets, output_dir):
    result = compose("run", "--rm", "-T", "-v", f"{container_assets['model']}:/model:ro",
                     "train-cpu", "train", "--preset", "smoke", "--model", "/model",
                     env={"CPU_IMAGE": cpu_image, "DATA_DIR": str(container_assets["data"]),
                          "OUTPUT_DIR": str(output_dir)})
    assert result.returncode == 0, output_of(result)
    assert_published(output_dir)
    assert (output_dir / "model" / "COMPLETE").stat().st_uid == 1000


def test_doctor_passes_inside_the_container(cpu_image, container_assets, output_dir):
    result = docker("run", "--rm", *LOCKED_DOWN, "--shm-size", "1g", *mounts(container_assets, output_dir),
                    cpu_image, "doctor", "--model", "/model")
    assert result.returncode == 0, output_of(result)
    assert "doctor: ready to train" in result.stdout


def test_read_only_output_mount_exits_4(cpu_image, container_assets, output_dir):
    result = docker("run", "--rm", *LOCKED_DOWN, "-v", f"{container_assets['data']}:/data:ro",
                    "-v", f"{container_assets['model']}:/model:ro", "-v", f"{output_dir}:/output:ro",
                    cpu_image, "train", "--preset", "smoke", "--model", "/model")
    assert result.returncode == 4, output_of(result)
    assert "Traceback" not in result.stderr
    assert "/output" in result.stderr


def test_docker_stop_checkpoints_exits_7_and_a_rerun_resumes(cpu_image, container_assets, output_dir,
                                                             container_name):
    """Read-only, offline, no capabilities, a noexec /tmp and an arbitrary UID (as OpenShift assigns): stopped
    with `docker stop` mid-run, then rerun to a published model owned by that UID."""
    job = [*LOCKED_DOWN, "--user", "12345:0", *mounts(container_assets, output_dir), cpu_image,
           "train", "--preset", "smoke", "--model", "/model", "--max-steps", "60", "--save-steps", "10",
           "--eval-steps", "30", "--logging-steps", "5"]
    docker("run", "-d", "--name", container_name, *job, check=True)
    deadline = time.monotonic() + 300
    while "train step 20/" not in logs(container_name):
        assert time.monotonic() < deadline, logs(container_name)
        running = docker("inspect", "-f", "{{.State.Running}}", container_name).stdout.strip()
        assert running == "true", "finished before it could be stopped:\n" + logs(container_name)
        time.sleep(0.5)
    docker("stop", "--time", "60", container_name, timeout=120, check=True)
    code = int(docker("inspect", "-f", "{{.State.ExitCode}}", container_name, check=True).stdout)
    assert code == 7, f"exit {code}\n" + logs(container_name)
    assert json.loads((output_dir / "status.json").read_text())["state"] == "preempted"

    rerun = docker("run", "--rm", *job)
    assert rerun.returncode == 0, output_of(rerun)
    resumed = re.search(r"resume: from \S*checkpoint-(\d+)", rerun.stdout + rerun.stderr)
    assert resumed and int(resumed.group(1)) >= 20, output_of(rerun)
    assert_published(output_dir)
    assert (output_dir / "model" / "COMPLETE").stat().st_uid == 12345


def test_baked_model_trains_with_no_model_flag_and_no_network(engine, cpu_image, container_assets, output_dir):
    # BAKE_MODEL names a folder under models/ in the build context (the only place .dockerignore lets through).
    folder = REPO / "models" / f"test-tiny-{output_dir.parent.name}"
    shutil.copytree(container_assets["model"], folder)
    try:
        build = docker("build", "--target", "runtime", *build_args(), "--build-arg",
                       f"BAKE_MODEL={folder.relative_to(REPO)}", "-t", f"{cpu_image}-baked", str(REPO),
                       env={**os.environ, "DOCKER_BUILDKIT": "1"}, timeout=1500)
    finally:
        shutil.rmtree(folder)
    assert build.returncode == 0, output_of(build)
    result = docker("run", "--rm", *LOCKED_DOWN, "-v", f"{container_assets['data']}:/data:ro",
                    "-v", f"{output_dir}:/output", f"{cpu_image}-baked", "train", "--preset", "smoke")
    assert result.returncode == 0, output_of(result)
    assert "model=/models/baked" in result.stdout + result.stderr
    assert_published(output_dir)


def test_image_compiles_and_loads_a_python_extension_as_an_arbitrary_uid(cpu_image):
    # What torch.compile needs, shown without torch: g++ and gcc run, and a C file that includes Python.h builds
    # into a module that imports from the exec tmpfs.
    script = """
set -e
g++ --version >/dev/null
include=$(python3 -c 'import sysconfig; print(sysconfig.get_path("include"))')
printf '%s\\n' '#include <Python.h>' \\
  'static struct PyModuleDef m = {PyModuleDef_HEAD_INIT, "probe", NULL, -1, NULL};' \\
  'PyMODINIT_FUNC PyInit_probe(void) { return PyModule_Create(&m); }' > /tmp/probe.c
gcc -shared -fPIC -I"$include" -o /tmp/probe.so /tmp/probe.c
cd /tmp && python3 -c 'import probe; print("imported", probe.__name__)'
"""
    result = docker("run", "--rm", *LOCKED_DOWN_COMPILING, "--user", "12345:0", "--entrypoint", "sh", cpu_image,
                    "-c", script)
    assert result.returncode == 0, output_of(result)
    assert result.stdout.strip() == "imported probe"


def test_trains_with_compile_on_read_only_as_an_arbitrary_uid(cpu_image, container_assets, output_dir):
    # inductor builds C++ kernels with the image's g++ into TORCHINDUCTOR_CACHE_DIR (/tmp) and loads them.
    result = docker("run", "--rm", *LOCKED_DOWN_COMPILING, "--user", "12345:0", "-e", "FINETUNE_COMPILE=on",
                    *mounts(container_assets, output_dir), cpu_image, "train", "--preset", "smoke",
                    "--model", "/model", "--max-steps", "4", "--eval-steps", "4", "--save-steps", "4")
    assert result.returncode == 0, output_of(result)
    log = result.stdout + result.stderr
    assert "compile: on (--compile on)" in log and "compile: first step took" in log, log
    assert_published(output_dir)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (output_dir / "model" / name).stat().st_size > 0, name
    assert (output_dir / "model" / "COMPLETE").stat().st_uid == 12345


def test_compile_on_with_a_noexec_tmp_exits_2_in_one_line(cpu_image, container_assets, output_dir):
    result = docker("run", "--rm", *LOCKED_DOWN, "--user", "12345:0", "-e", "FINETUNE_COMPILE=on",
                    *mounts(container_assets, output_dir), cpu_image, "train", "--preset", "smoke", "--model", "/model")
    assert result.returncode == 2, output_of(result)
    assert "Traceback" not in result.stderr
    assert ("error: --compile on loads the kernels it builds from /tmp/.cache/torchinductor, which is on a noexec "
            "mount; mount it with exec (docker run --tmpfs /tmp:exec)") in result.stderr, output_of(result)
    assert "model: loading" not in result.stderr
