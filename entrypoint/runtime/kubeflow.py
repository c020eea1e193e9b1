"""Kubeflow Trainer's runtime status contract (KEP-2779, the `TrainJobStatus` feature gate, Trainer 2.2+): where to
post the trainer's progress, and a poster that never slows or fails the run.

The controller injects three variables into the trainer pods: the HTTPS endpoint, its CA certificate (a file) and a
projected service-account token (a file the kubelet rotates: it is read again whenever it changes). The body is
`{"trainerStatus": {"progressPercentage", "estimatedRemainingSeconds", "metrics": [{"name", "value"}],
"lastUpdatedTime"}}`; the controller copies it into the TrainJob's `.status.trainerStatus`.

Posts go out from one background thread, at most one every MIN_INTERVAL_S: a newer status replaces one still waiting,
so the last word is always the newest. A failure to post is logged once and never raised: progress is a courtesy,
the run is the job.
"""

from __future__ import annotations

import json
import os
import ssl
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from entrypoint import logs

log = logs.area("status")

SERVER_URL = "KUBEFLOW_TRAINER_SERVER_URL"
SERVER_CA_CERT = "KUBEFLOW_TRAINER_SERVER_CA_CERT"
SERVER_TOKEN = "KUBEFLOW_TRAINER_SERVER_TOKEN"
DISABLE = "DISABLE_KUBEFLOW_INTEGRATION"  # transformers' opt-out; it turns ours off too

MIN_INTERVAL_S = 5.0  # the contract's limit: no more than one update every 5 s
HEARTBEAT_S = 60.0  # the last status again, newly stamped, when nothing changed (a long data preparation)
TIMEOUT_S = 5.0  # one request; the poster thread waits, training does not
MAX_NAME = 64  # the controller's limit on a metric's name


@dataclass(frozen=True)
class Endpoint:
    url: str
    ca_cert: Path | None
    token_file: Path | None

    @classmethod
    def of(cls, environ: Mapping[str, str]) -> Endpoint | None:
        """The endpoint the controller injected, or None outside such a TrainJob (or with transformers' opt-out)."""
        url = environ.get(SERVER_URL)
        if not url or environ.get(DISABLE, "").upper() == "TRUE":
            return None
        ca, token = environ.get(SERVER_CA_CERT), environ.get(SERVER_TOKEN)
        return cls(url, Path(ca) if ca else None, Path(token) if token else None)


def trainer_status(percent: int | None, remaining_s: float | None, metrics: Mapping[str, object]) -> dict:
    """The request body. Values become strings; names are cut to MAX_NAME characters."""
    status: dict = {}
    if percent is not None:
        status["progressPercentage"] = max(0, min(100, int(percent)))
    if remaining_s is not None:
        status["estimatedRemainingSeconds"] = max(0, int(remaining_s))
    status["metrics"] = [{"name": str(k)[:MAX_NAME], "value": str(v)} for k, v in metrics.items()]
    status["lastUpdatedTime"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"trainerStatus": status}


class Poster:
    """Posts statuses to `endpoint` from a daemon thread; `update` never blocks. `close` sends what is waiting (the
    last word of the run) and returns within `grace_s`."""

    def __init__(self, endpoint: Endpoint, min_interval_s: float = MIN_INTERVAL_S):
        self.endpoint = endpoint
        self.min_interval_s = min_interval_s
        self.posted = 0  # successful posts
        self._pending: tuple | None = None  # (percent, remaining, metrics) to send next
        self._last: tuple | None = None
        self._sent_at = -float("inf")
        self._closing = False
        self._failed = False
        self._token: tuple[tuple, str] | None = None  # (the file's stat, its text)
        self._context: ssl.SSLContext | None = None
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="trainjob-status", daemon=True)
        self._thread.start()

    def update(self, percent: int | None, remaining_s: float | None, metrics: Mapping[str, object]) -> None:
        with self._wake:
            self._pending = (percent, remaining_s, dict(metrics))
            self._wake.notify()

    def close(self, grace_s: float = MIN_INTERVAL_S + TIMEOUT_S) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(grace_s)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while True:
                    due = self._sent_at + self.min_interval_s
                    now = time.monotonic()
                    if self._pending is not None and now >= due:
                        item, self._pending = self._pending, None
                        break
                    if self._closing and self._pending is None:
                        return
                    if self._pending is None and self._last is not None and now >= self._sent_at + HEARTBEAT_S:
                        item = self._last
                        break
                    wait = due - now if self._pending is not None else self._sent_at + HEARTBEAT_S - now
                    self._wake.wait(max(0.01, wait) if self._last or self._pending else None)
                self._sent_at = time.monotonic()
            self._last = item
            self._send(trainer_status(*item))

    def _send(self, body: dict) -> None:
        try:
            request = urllib.request.Request(self.endpoint.url, data=json.dumps(body).encode(), method="POST",
                                             headers={"Content-Type": "application/json", **self._authorization()})
            with urllib.request.urlopen(request, timeout=TIMEOUT_S, context=self._ssl()) as response:
                response.read()
            self.posted += 1
        except Exception as exc:  # noqa: BLE001 - any failure: the run goes on, the status lags
            if not self._failed:
                self._failed = True
                log.warning(f"cannot post progress to {self.endpoint.url} ({exc}); training goes on, and the "
                            "TrainJob's status shows the last update that arrived (this is said once)",
                            url=self.endpoint.url)

    def _authorization(self) -> dict[str, str]:
        """The bearer token, read again whenever the file changes (the kubelet rotates it by swapping a link)."""
        path = self.endpoint.token_file
        if path is None:
            return {}
        stat = os.stat(path)
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if self._token is None or self._token[0] != key:
            self._token = (key, path.read_text().strip())
        return {"Authorization": f"Bearer {self._token[1]}"}

    def _ssl(self) -> ssl.SSLContext | None:
        if self._context is None and self.endpoint.url.startswith("https:"):
            ca = self.endpoint.ca_cert
            self._context = ssl.create_default_context(cafile=str(ca) if ca else None)
        return self._context
