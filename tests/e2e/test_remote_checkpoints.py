"""The --checkpoint-to fault cases (bench/fault_remote.py, also in `make faults`) as tests: a node lost after its second
remote checkpoint and a new node with empty disks resuming to the uninterrupted run's weights, SIGKILL and SIGTERM
in the middle of an upload, retention, two runs on one prefix, and the store going away. One moto S3 server (behind
the proxy that can cut it off) serves the whole module: the lab starts it with the first case and stops it after the
last."""

from __future__ import annotations

import pytest

from bench.fault_remote import NAMES
from bench.faults import CASES, verdict


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_remote_fault_ends_as_expected(lab, name):
    case = CASES[name]
    outcome = case.run(lab)
    assert verdict(lab, case, outcome) == "ok", outcome


def test_every_checkpoint_to_fault_the_issue_names_is_staged():
    names = " | ".join(NAMES).lower()
    for fault in ("new node", "mid-upload", "retention", "same --checkpoint-to", "sigterm during an upload",
                  "store goes away"):
        assert fault in names, fault
