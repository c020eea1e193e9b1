"""torch.compile's toolchain, checked before the model loads: a missing compiler or Python.h is one line and exit 2
from `train` and `doctor`, where inductor would otherwise die at the first step with a traceback.

"No compiler" is made the way inductor and Triton look for one: CXX naming nothing, or a PATH (the venv's bin
alone) without g++, gcc or clang. The noexec cache is proven in the CPU image (tests/docker/test_image.py), where
Docker's default tmpfs is noexec.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

from entrypoint.errors import ConfigError, ExitCode
from entrypoint.runtime.toolchain import find
from entrypoint.train.plan import RunPlan
from entrypoint.train.preflight import Checked, check_compile
from tests.support.helpers import clean_env, finetune, train_env

# A PATH with python and finetune but no compiler: the interpreter's own folder (the venv's bin).
NO_COMPILER_PATH = str(Path(sys.executable).parent)


@pytest.fixture(scope="module", autouse=True)
def compilers_present():
    if find(clean_env()).cxx is None:
        pytest.skip("these tests need g++ on PATH to remove it (apt-get install g++)")
    assert not any((Path(NO_COMPILER_PATH) / name).exists() for name in ("g++", "gcc", "clang"))


def test_compile_on_without_a_cxx_compiler_exits_2_in_one_line_before_the_model_loads(tmp_path, tiny_model,
                                                                                      corpus_dir):
    result = finetune("train", "--compile", "on",
                      env=train_env(tiny_model, corpus_dir, tmp_path / "out", CXX="/nonexistent/g++"))
    assert result.returncode == ExitCode.USAGE, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --compile on needs a C++ compiler for inductor's CPU kernels and '/nonexistent/g++' "
                      "does not run; install g++ (apt-get install g++), set CXX to a working compiler, or use "
                      "--compile off."]
    assert "Traceback" not in result.stderr
    assert "model: loading" not in result.stderr and "plan:" not in result.stderr
    assert not (tmp_path / "out" / "model").exists()


def test_doctor_fails_compile_on_without_a_compiler_on_path_and_passes_with_one(tmp_path, tiny_model, corpus_dir):
    env = clean_env(FINETUNE_MODEL=str(tiny_model), FINETUNE_DATA_DIR=str(corpus_dir),
                    FINETUNE_OUTPUT_DIR=str(tmp_path / "out"), FINETUNE_COMPILE="on")
    missing = finetune("doctor", env={**env, "PATH": NO_COMPILER_PATH})
    assert missing.returncode == ExitCode.USAGE, missing.stdout + missing.stderr
    fails = [line for line in missing.stdout.splitlines() if line.startswith("FAIL")]
    assert fails == ["FAIL  compile: --compile on needs a C++ compiler for inductor's CPU kernels and 'g++' does not "
                     "run; install g++ (apt-get install g++), set CXX to a working compiler, or use --compile off."]

    present = finetune("doctor", env=env)
    assert present.returncode == 0, present.stdout + present.stderr
    line = next(line for line in present.stdout.splitlines() if line.split(":")[0] == "ok    compile")
    assert "C++ compiler g++" in line and "Python.h" in line


def test_no_compiler_is_needed_when_compile_stays_off(tmp_path, tiny_model, corpus_dir):
    # --compile auto (the default) never compiles on CPU, so a machine without a compiler trains as before.
    result = finetune("doctor", env=clean_env(FINETUNE_MODEL=str(tiny_model), FINETUNE_DATA_DIR=str(corpus_dir),
                                              FINETUNE_OUTPUT_DIR=str(tmp_path / "out"), PATH=NO_COMPILER_PATH))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok    compile: off (auto: not on a CUDA GPU with a known peak), nothing to build" in result.stdout


def gpu_plan(compiled: bool) -> RunPlan:
    return RunPlan(device="NVIDIA H100 80GB HBM3", precision="bf16", block_size=1024, batch_size=16, grad_accum=1,
                   compile=compiled, tf32=True, preprocessing_workers=2, dataloader_workers=2, world_size=1,
                   why={"compile": "auto: about 40 min of training repays about 60 s of compiling"})


def test_compile_auto_on_a_gpu_needs_a_c_compiler_for_triton():
    # Triton takes $CC as it is, else gcc, else clang on PATH; inductor's C++ compiler is not what it needs.
    named = find(clean_env(CC="/nonexistent/cc"))
    checked = Checked(device="NVIDIA H100 80GB HBM3", precision="bf16", block_size=1024, model_config=None,
                      toolchain=named)
    with pytest.raises(ConfigError) as raised:
        check_compile(gpu_plan(compiled=True), checked)
    assert raised.value.problems == [
        "--compile auto, which compiles this run, needs a C compiler for Triton's kernel launchers and none was "
        "found (looked for CC='/nonexistent/cc'); install gcc (apt-get install gcc), set CC to a working compiler, "
        "or use --compile off."]
    assert "gcc or clang on PATH; CC is unset" in find(clean_env(PATH=NO_COMPILER_PATH)).problems(True, "x")[0]
    check_compile(gpu_plan(compiled=False), checked)  # auto chose not to compile: nothing to build, no error
    check_compile(gpu_plan(compiled=True), Checked(device="gpu", precision="bf16", block_size=1024,
                                                   model_config=None, toolchain=find(clean_env())))


def test_missing_python_headers_is_one_line(tmp_path):
    toolchain = find(clean_env())
    headless = replace(toolchain, python_h=tmp_path / "include" / "Python.h")
    assert headless.problems(False, "--compile on") == [
        f"--compile on compiles against {tmp_path / 'include' / 'Python.h'}, which is missing; install the Python "
        "headers (apt-get install python3-dev) or use --compile off."]
    assert toolchain.problems(False, "--compile on") == []
