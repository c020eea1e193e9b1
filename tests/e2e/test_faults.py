"""The fault matrix as tests: every case in bench.faults.CASES, run for real, must end as the case says (exit
codes, published or not, and for the exact ones the uninterrupted reference's final step and eval loss)."""

from __future__ import annotations

import pytest

from bench import fault_remote, fault_storage
from bench.faults import CASES, Skip, verdict

LOCAL = [name for name in CASES if name not in fault_remote.NAMES]  # the rest: test_remote_checkpoints.py


@pytest.mark.slow
@pytest.mark.parametrize("name", LOCAL)
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
