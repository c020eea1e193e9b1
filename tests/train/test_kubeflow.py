"""Progress in the TrainJob status, as a Kubeflow Trainer controller receives it: a real run posting to a local
HTTPS endpoint (self-signed certificate, token file), stopped by SIGTERM and resumed."""

from __future__ import annotations

import json
import re
from urllib.error import HTTPError

import pytest

from entrypoint.errors import DataError, Diverged, ExitCode
from entrypoint.train.kubeflow import Reporter
from tests.support.helpers import REPO, finetune
from tests.support.runs import STEPS, assert_preempted_and_unpublished, env_for, interrupt_at
from tests.support.statusserver import StatusServer, invalid

OURS = {"phase", "step", "train_loss", "useful_tokens_per_second", "target_tokens", "divergence_guard"}


def phases(bodies: list[dict]) -> list[str]:
    names = []
    for body in bodies:
        metrics = {m["name"]: m["value"] for m in body["trainerStatus"]["metrics"]}
        if not names or names[-1] != metrics["phase"]:
            names.append(metrics["phase"])
    return names


@pytest.fixture(scope="module")
def preempted_then_resumed(tmp_path_factory, tiny_model, corpus_dir):
    """(bodies of the run stopped by SIGTERM at step 10 of 24, bodies of its resumed run): one server for both, as
    one TrainJob has one endpoint whichever pod runs. Step 10 is no save or evaluation step (every 8): the stop
    saves its own checkpoint there."""
    tmp = tmp_path_factory.mktemp("trainjob-status")
    out = tmp / "out"
    with StatusServer(tmp / "server") as server:
        env = env_for(tiny_model, corpus_dir, out, **server.env)
        code, log = interrupt_at(env, 10)
        assert_preempted_and_unpublished(code, log, out)
        first = list(server.received)
        server.rotate("token-after-restart")  # the pod of the rerun has a new token
        result = finetune("train", env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert not server.invalid and not server.refused, (server.invalid, server.refused)
        (tmp / "bodies.json").write_text(json.dumps(server.received, indent=1))  # for docs/kubernetes.md
        return first, server.received[len(first):]


def percentages(bodies: list[dict]) -> list[int]:
    return [b["trainerStatus"]["progressPercentage"] for b in bodies if "progressPercentage" in b["trainerStatus"]]


def test_percentages_rise_across_a_sigterm_and_resume_and_reach_100_only_when_published(preempted_then_resumed):
    first, resumed = preempted_then_resumed
    stopped_at = percentages(first)[-1]  # the kept share: the checkpoint the stop saved
    assert 100 * 10 // STEPS <= stopped_at < 100
    assert percentages(first) == sorted(percentages(first))
    # The rerun starts at its checkpoint's share of the whole run, never at 0 (a newer one within the 5 s between
    # posts may replace that first one), and rises to 100 once published.
    assert percentages(resumed)[0] >= stopped_at
    assert percentages(resumed) == sorted(percentages(resumed)) and percentages(resumed)[-1] == 100
    assert 100 not in percentages(resumed)[:-1]


def test_a_preempted_run_says_where_and_why_it_stopped(preempted_then_resumed):
    first, _ = preempted_then_resumed
    last = {m["name"]: m["value"] for m in first[-1]["trainerStatus"]["metrics"]}
    assert last["phase"] == "preempted"
    assert re.match(rf"PREEMPTED \({int(ExitCode.PREEMPTED)}\): at step (1[01])/{STEPS}, last checkpoint at step \1: "
                    "stopped by SIGTERM", last["stopped"]), last["stopped"]
    assert "estimatedRemainingSeconds" not in first[-1]["trainerStatus"]


def test_data_preparation_is_its_own_phase_and_our_metrics_are_posted_by_one_reporter(preempted_then_resumed):
    first, resumed = preempted_then_resumed
    for bodies in (first, resumed):
        assert phases(bodies)[0] == "preparing data"
        assert "progressPercentage" not in bodies[0]["trainerStatus"]  # unknown until a checkpoint is chosen
    assert phases(resumed)[-1] == "succeeded"
    names = {m["name"] for b in first + resumed for m in b["trainerStatus"]["metrics"]}
    assert names >= OURS
    assert "total_steps" not in names  # transformers' KubeflowCallback (which sends it) did not post
    assert all(len(n) <= 64 for n in names)


def test_the_body_docs_kubernetes_md_shows_is_one_such_run_posts(preempted_then_resumed):
    first, _ = preempted_then_resumed
    text = (REPO / "docs" / "kubernetes.md").read_text()
    shown = re.search(r"```json\n(\{\"trainerStatus\".*?)\n```", text, re.S).group(1)
    assert invalid(shown.encode()) is None
    names = {m["name"] for m in json.loads(shown)["trainerStatus"]["metrics"]}
    assert names == {m["name"] for m in first[-1]["trainerStatus"]["metrics"]} - {"mfu"}  # mfu: on a known GPU


@pytest.mark.parametrize(("exc", "phase", "stopped"), [
    (Diverged("training diverged: loss nan"), "diverged", "DIVERGED (8): while training: training diverged"),
    (HTTPError("http://hub", 404, "Not Found", None, None), "failed", "INTERNAL (1): while training: HTTP Error 404"),
    (KeyboardInterrupt(), "preempted", "PREEMPTED (7): while training: KeyboardInterrupt"),
])
def test_an_early_end_is_named_by_its_exit_code_whatever_raised_it(exc, phase, stopped):
    report = Reporter(None)  # rank 0 without an endpoint: keeps its status, posts nothing
    report.phase("training")
    report.ended_early(exc)
    assert report.metrics["phase"] == phase and report.metrics["stopped"].startswith(stopped)
    assert report.percent is None


def test_a_failure_while_preparing_data_is_posted_without_a_percentage_and_other_ranks_post_nothing(tmp_path):
    with StatusServer(tmp_path / "server") as server:
        assert not Reporter.of(server.env, rank=1).active
        report = Reporter.of(server.env, rank=0)
        report.phase("preparing data")
        report.ended_early(DataError("no training files in /data; mount the data or set --data-dir."))
        report.close()
    assert server.metrics()["stopped"] == "DATA (3): while preparing data: no training files in /data; mount the " \
                                          "data or set --data-dir."
    assert all("progressPercentage" not in b["trainerStatus"] for b in server.received)
