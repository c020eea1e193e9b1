"""The TrainJob status poster against a real HTTPS server on 127.0.0.1 with a self-signed certificate and a token
file: what it sends, how often, with which token, and that failures neither raise nor repeat in the log."""

from __future__ import annotations

import json
import logging
import time

import pytest

from entrypoint.runtime.kubeflow import MAX_NAME, Endpoint, Poster, trainer_status
from tests.support.statusserver import StatusServer, invalid


@pytest.fixture
def server(tmp_path):
    with StatusServer(tmp_path / "server") as s:
        yield s


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_endpoint_comes_from_the_controllers_variables_and_transformers_opt_out_turns_it_off(server):
    endpoint = Endpoint.of(server.env)
    assert (endpoint.url, endpoint.ca_cert, endpoint.token_file) == (server.url, server.cert, server.token_file)
    assert Endpoint.of({}) is None
    assert Endpoint.of({**server.env, "DISABLE_KUBEFLOW_INTEGRATION": "true"}) is None


def test_a_status_reaches_the_server_verified_by_its_ca_with_the_token_and_valid_for_the_api(server):
    poster = Poster(Endpoint.of(server.env))
    poster.update(42, 120.7, {"phase": "training", "mfu": 0.41})
    poster.close()
    [body] = server.received
    status = body["trainerStatus"]
    assert (status["progressPercentage"], status["estimatedRemainingSeconds"]) == (42, 120)
    assert status["metrics"] == [{"name": "phase", "value": "training"}, {"name": "mfu", "value": "0.41"}]
    assert not server.invalid and not server.refused


def test_updates_within_the_interval_collapse_into_the_newest_and_the_last_word_is_sent_on_close(server):
    poster = Poster(Endpoint.of(server.env), min_interval_s=0.5)
    started = time.monotonic()
    for percent in range(10):
        poster.update(percent, None, {})
    poster.close()
    assert server.percentages() in ([0, 9], [9])  # the thread may take the first before the rest arrive
    if len(server.received) == 2:
        assert time.monotonic() - started >= 0.5


def test_a_rotated_token_is_read_again(server):
    poster = Poster(Endpoint.of(server.env), min_interval_s=0.05)
    poster.update(1, None, {})
    wait_until(lambda: len(server.received) == 1)
    server.rotate("token-2")
    poster.update(2, None, {})
    poster.close()
    assert server.percentages() == [1, 2] and not server.refused


def test_failures_to_post_are_logged_once_and_never_raised(server, caplog):
    server.failing = True
    poster = Poster(Endpoint.of(server.env), min_interval_s=0.05)
    with caplog.at_level(logging.WARNING, logger="finetune.status"):
        for percent in range(3):
            poster.update(percent, None, {})
            time.sleep(0.15)
        poster.close()
    warnings = [r.getMessage() for r in caplog.records if "cannot post progress" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert poster.posted == 0


def test_a_server_with_another_certificate_is_not_trusted(server, tmp_path, caplog):
    with StatusServer(tmp_path / "other") as other:
        endpoint = Endpoint(server.url, other.cert, server.token_file)
        poster = Poster(endpoint)
        with caplog.at_level(logging.WARNING, logger="finetune.status"):
            poster.update(5, None, {})
            poster.close()
    assert not server.received and "CERTIFICATE_VERIFY_FAILED" in caplog.text


def test_names_are_cut_to_the_limit_and_values_are_strings():
    body = trainer_status(150, -3, {"n" * 100: 1.5})
    status = body["trainerStatus"]
    assert status["progressPercentage"] == 100 and status["estimatedRemainingSeconds"] == 0
    assert status["metrics"] == [{"name": "n" * MAX_NAME, "value": "1.5"}]
    assert invalid(json.dumps(body).encode()) is None
    assert "unknown" in invalid(json.dumps({"trainerStatus": {**status, "phase": "x"}}).encode())
