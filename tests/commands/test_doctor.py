"""`finetune doctor`: a readable preflight that really tries, and a non-zero exit on a blocking problem."""

from __future__ import annotations

from entrypoint.errors import ExitCode
from tests.support.helpers import clean_env, finetune


def test_doctor_passes_a_runnable_configuration(tmp_path, tiny_model, corpus_dir):
    result = finetune("doctor", env=clean_env(FINETUNE_MODEL=str(tiny_model), FINETUNE_DATA_DIR=str(corpus_dir),
                                              FINETUNE_OUTPUT_DIR=str(tmp_path / "out")))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for check in ("versions", "config", "device", "data", "output dir", "checkpoint dir", "model", "shared memory"):
        assert any(line.split(":")[0].split(maxsplit=1)[-1] == check for line in lines), f"no {check} line"
    assert "torch " in result.stdout and "transformers " in result.stdout
    assert "cpu: no GPU visible" in result.stdout
    assert "available offline" in result.stdout  # the tests run with HF_HUB_OFFLINE=1
    assert lines[-1] == "doctor: ready to train"
    assert not list((tmp_path / "out").glob(".write-test-*")), "the write probe must clean up after itself"


def test_doctor_reports_every_blocking_problem_and_exits_with_the_first_code(tmp_path, tiny_model):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = finetune("doctor", "--precision", "bf16",
                      env=clean_env(FINETUNE_MODEL=str(tiny_model), FINETUNE_DATA_DIR=str(tmp_path / "none"),
                                    FINETUNE_OUTPUT_DIR=str(blocker / "out")))
    fails = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert any("device" in f and "needs a CUDA GPU" in f for f in fails)
    assert any("data" in f and "does not exist" in f for f in fails)
    assert any("output dir" in f and "not writable" in f for f in fails)
    assert result.returncode == ExitCode.USAGE
    assert "blocking problem(s)" in result.stdout
