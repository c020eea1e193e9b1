"""A real S3-protocol server on 127.0.0.1 (moto's standalone server, in its own process) and a TCP proxy in
front of it that can cut the connection after a byte budget, as a store that fails in the middle of an upload.

    with S3Server() as server, Proxy(server.port) as proxy:
        env = server.env(proxy.port)       # AWS_ENDPOINT_URL and dummy credentials for s3fs / botocore
        proxy.budget = 100_000             # upstream bytes forwarded before every connection is dropped
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request

SECRET = "finetune-test-secret-Zq7"  # a secret key no log line may contain


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self):
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> S3Server:
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/moto-api/", timeout=2)
                return self
            time.sleep(0.2)
        self.process.kill()
        raise RuntimeError("moto server did not start within 60 s")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)

    def env(self, port: int | None = None) -> dict[str, str]:
        """What a pod would get from a Secret: an endpoint and credentials (moto accepts any)."""
        return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port or self.port}", "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        import boto3

        env = self.env()
        return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                            aws_secret_access_key=SECRET, region_name="us-east-1")

    def objects(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        client = self.client()
        listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        return {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


class Proxy:
    """Forwards TCP connections to the server until `budget` bytes have gone upstream (None: no limit); then it
    resets every open connection and refuses new ones, until the budget is raised again."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.budget: int | None = None
        self.forwarded = 0
        self.lock = threading.Lock()
        self.open: set[socket.socket] = set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stopped = False

    def __enter__(self) -> Proxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped = True
        self.listener.close()
        self.cut()

    @property
    def exhausted(self) -> bool:
        return self.budget is not None and self.forwarded >= self.budget

    def cut(self) -> None:
        with self.lock:
            for s in list(self.open):
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
                    s.close()
            self.open.clear()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.exhausted:
                client.close()  # the store is gone: the client sees its connection closed at once
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.open |= {client, upstream}
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, counted: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if counted:
                    with self.lock:
                        self.forwarded += len(data)
                    if self.exhausted:
                        self.cut()
                        return
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
