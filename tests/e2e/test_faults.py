"""The fault matrix as tests: every case in bench.faults.CASES, run for real, must end as the case says (exit
codes, published or not, and for the exact ones the uninterrupted reference's final step and eval loss)."""

from __future__ import annotations

import pytest

from bench import fault_remote, fault_storage
from bench.faults import CASES, Skip, verdict

LOCAL = [name for name in CASES if name not in fault_remote.NAMES]  # the rest: test_remote_checkpoints.py
STORAGE = [name for name in LOCAL if name.startswith("storage: ")]


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in LOCAL if name not in STORAGE])
def test_fault_ends_as_expected(lab, name):
    case = CASES[name]
    try:
        outcome = case.run(lab)
    except Skip as exc:
        pytest.skip(str(exc))
    finally:
        lab.unmount_all()
    assert verdict(lab, case, outcome) == "ok", outcome


def test_the_matrix_covers_every_fault_the_issue_names():
    names = " | ".join(CASES).lower()
    for fault in ("sigterm at a random step", "sigkill during a checkpoint save", "torn", "disk full", "read-only",
                  "rerun after success", "second run", "stale lease", "divergence", "--publish-worse",
                  "model loading", "evaluation", "publishing", "misspelt", "new node", "mid-upload", "retention",
                  "same --checkpoint-to", "sigterm during an upload", "store goes away"):
        assert fault in names, fault


def test_the_storage_matrix_moves_each_fault_through_every_phase_of_a_run():
    sites = {phase.site for phase in fault_storage.PHASES}
    assert {"data preparation (cache shards)", "first checkpoint", "later checkpoint", "publishing the model",
            "metrics and loss plot"} <= sites
    for phase in fault_storage.PHASES:
        for kind in ("ENOSPC", "EROFS"):
            assert fault_storage.name(phase, kind) in LOCAL


@pytest.mark.slow
@pytest.mark.parametrize("name", STORAGE)
def test_storage_fault_ends_with_one_line_and_exit_4_and_a_rerun_publishes(lab, name):
    """Each phase x fault of bench/fault_storage.py. A read-only volume is cleared and rerun like a full one (make
    faults does both): here only the full one is rerun, to keep make test within its budget; the resume point
    after either is the same checkpoint, which the fault run's own checks prove is intact."""
    case = CASES[name]
    rerun = "read-only" not in name
    try:
        outcome = case.run(lab, rerun=rerun)
    except Skip as exc:
        pytest.skip(str(exc))
    finally:
        lab.unmount_all()
    assert outcome.codes == list(case.codes if rerun else case.codes[:1]), outcome
    assert outcome.published == rerun, outcome
