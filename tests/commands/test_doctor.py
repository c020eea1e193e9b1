"""`finetune doctor`: a readable preflight that really tries, and a non-zero exit on a blocking problem."""

from __future__ import annotations

import pytest

from entrypoint.commands.doctor import diagnose
from entrypoint.config.schema import TrainConfig
from entrypoint.data import formats, survey
from entrypoint.errors import DataError, ExitCode
from tests.support import records as samples
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


def data_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.split(":")[0].split(maxsplit=1)[-1].startswith("data ")]


@pytest.mark.parametrize("kind", ["alpaca-jsonl", "sharegpt-jsonl", "pretokenized-jsonl", "pretokenized-parquet"])
def test_doctor_reads_each_good_file_names_its_format_and_passes(tmp_path, tiny_model, tokenizer, kind):
    fmt, suffix = kind.split("-")
    records = {"alpaca": samples.ALPACA, "sharegpt": samples.SHAREGPT}.get(fmt) or samples.pretokenized(tokenizer)
    samples.write_records(tmp_path / "data", "train", records, suffix)
    lines = []
    diagnose(TrainConfig(model=str(tiny_model), data_dir=tmp_path / "data", output_dir=tmp_path / "out",
                         block_size=32), lines.append)
    assert data_lines(lines) == [f"ok    data train.{suffix}: {fmt} data from "
                                 f"{', '.join(survey._fields_read(fmt, records[0], formats.Fields()))}; "
                                 f"{len(records)} records checked (all of them)"]
    assert lines[-1] == "doctor: ready to train"


@pytest.mark.parametrize("name", list(samples.BAD))
def test_doctor_fails_on_each_bad_file_in_one_line_naming_the_file_and_the_record(tmp_path, tiny_model, name):
    path = samples.write_records(tmp_path / "data", "train", samples.bad_records(name), "jsonl")
    lines = []
    with pytest.raises(DataError):
        diagnose(TrainConfig(model=str(tiny_model), data_dir=tmp_path / "data", output_dir=tmp_path / "out"),
                 lines.append)
    fails = [line for line in lines if line.startswith("FAIL")]
    assert fails == [f"FAIL  data train.jsonl: {path} line 4: " + fails[0].split(" line 4: ", 1)[-1]], lines
    assert all(word in fails[0] for word in samples.BAD[name][2])
    assert lines[-1] == "doctor: 1 blocking problem(s)"


def test_the_doctor_command_exits_with_the_data_code_on_a_bad_file(tmp_path, tiny_model):
    samples.write_records(tmp_path / "data", "train", samples.bad_records("sharegpt-unknown-role"), "jsonl")
    result = finetune("doctor", env=clean_env(FINETUNE_MODEL=str(tiny_model), FINETUNE_DATA_DIR=str(tmp_path / "data"),
                                              FINETUNE_OUTPUT_DIR=str(tmp_path / "out")))
    assert result.returncode == ExitCode.DATA, result.stdout + result.stderr
    fails = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and "line 4: turn 1 is from 'bot'" in fails[0] and "Traceback" not in result.stderr


def test_doctor_fails_on_data_too_small_for_what_train_makes_of_it(tmp_path, tiny_model):
    samples.write_records(tmp_path / "data", "train", samples.ALPACA[:3], "jsonl")
    lines = []
    with pytest.raises(DataError):
        diagnose(TrainConfig(model=str(tiny_model), data_dir=tmp_path / "data", output_dir=tmp_path / "out"),
                 lines.append)
    assert [line for line in lines if line.startswith("FAIL")] == [
        "FAIL  data formats: only 3 document(s), too few to hold out 5% for validation; add --valid-file, add text, "
        "or split .txt by line (--txt-split line)."]
