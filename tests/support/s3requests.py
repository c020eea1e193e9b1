"""Which requests the test S3 server answered (moto's request recorder), so a test can prove what a run did not
download:

    with recording_server(tmp_path) as (server, recorder):
        ...                               # set up buckets and objects
        recorder.reset()
        run_something()
        assert recorder.object_reads() == []
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from tests.support.s3server import S3Server


class Recorder:
    def __init__(self, server: S3Server, log: Path):
        self.server, self.log = server, log

    def _call(self, action: str) -> None:
        request = urllib.request.Request(f"http://127.0.0.1:{self.server.port}/moto-api/recorder/{action}",
                                         method="POST", data=b"")
        urllib.request.urlopen(request, timeout=10).read()

    def reset(self) -> None:
        """Forget what was recorded so far (recording goes on)."""
        self._call("reset-recording")

    def requests(self) -> list[tuple[str, str]]:
        """(method, path?query) of every request since the last reset, in order."""
        if not self.log.is_file():
            return []
        found = []
        for line in self.log.read_text().splitlines():
            entry = json.loads(line)
            url = urlsplit(entry["url"])
            found.append((entry["method"], url.path + (f"?{url.query}" if url.query else "")))
        return found

    def object_reads(self) -> list[str]:
        """The objects read (GET of /bucket/key), listings and bucket checks left out."""
        return [path for method, path in self.requests()
                if method == "GET" and len(path.split("?")[0].strip("/").split("/")) >= 2]


@contextlib.contextmanager
def recording_server(directory: Path) -> Iterator[tuple[S3Server, Recorder]]:
    """An S3Server that records every request it answers into `directory`/requests.jsonl."""
    log = directory / "requests.jsonl"
    saved = os.environ.get("MOTO_RECORDER_FILEPATH")
    os.environ["MOTO_RECORDER_FILEPATH"] = str(log)  # read by the server process as it starts
    try:
        server = S3Server().__enter__()
    finally:
        if saved is None:
            os.environ.pop("MOTO_RECORDER_FILEPATH")
        else:
            os.environ["MOTO_RECORDER_FILEPATH"] = saved
    try:
        recorder = Recorder(server, log)
        recorder._call("start-recording")
        yield server, recorder
    finally:
        server.__exit__(None, None, None)
