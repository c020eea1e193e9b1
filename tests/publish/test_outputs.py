"""What the job leaves for the platform when it fails: the termination message names the exit code first. The
rest of outputs.py (status, model publish, curves) is exercised through whole runs in tests/train/test_job.py."""

from __future__ import annotations

import pytest

from entrypoint.errors import ExitCode, Preempted
from entrypoint.publish import outputs


@pytest.fixture
def termination_log(tmp_path, monkeypatch):
    path = tmp_path / "termination-log"
    monkeypatch.setattr(outputs, "TERMINATION_LOG", path)
    return path


def test_the_termination_message_starts_with_the_exit_codes_name_and_number(termination_log):
    outputs.write_termination_message(Preempted.code, "stopped by SIGTERM at step 30 of 300; rerun to resume.")
    assert termination_log.read_text() == "PREEMPTED (7): stopped by SIGTERM at step 30 of 300; rerun to resume.\n"


@pytest.mark.parametrize("code", list(ExitCode))
def test_every_exit_code_has_its_name_in_the_message(code):
    assert outputs.termination_message(code, "x") == f"{code.name} ({int(code)}): x"


def test_a_long_message_is_cut_to_the_4096_bytes_kubernetes_keeps_without_splitting_a_character(termination_log):
    outputs.write_termination_message(ExitCode.DATA, "é" * 5000)
    text = termination_log.read_text()
    assert text.startswith("DATA (3): é") and len(text.encode()) <= 4097  # and the newline
