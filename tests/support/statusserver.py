"""A stand-in for Kubeflow Trainer's status endpoint: HTTPS on 127.0.0.1 with a freshly made self-signed certificate,
a bearer token in a file (as the controller injects them), every accepted body validated by the kubeflow-trainer-api
2.3 models and kept for the test to read."""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import json
import ssl
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kubeflow_trainer_api.models import TrainerV1alpha1UpdateTrainJobStatusRequest


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, written under `directory`: (cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "trainjob-status-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "ca.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


STATUS_FIELDS = {"progressPercentage", "estimatedRemainingSeconds", "metrics", "lastUpdatedTime"}


def invalid(body: bytes) -> str | None:
    """Why the API would refuse `body`, or None: the 2.3 models in strict mode, and no field they do not know."""
    try:
        TrainerV1alpha1UpdateTrainJobStatusRequest.model_validate_json(body, strict=True)
        parsed = json.loads(body)
        status = parsed["trainerStatus"]
        unknown = (set(parsed) - {"trainerStatus"}) | (set(status) - STATUS_FIELDS) | \
            {k for m in status.get("metrics", []) for k in m if k not in ("name", "value")}
        return f"unknown fields {sorted(unknown)}" if unknown else None
    except Exception as exc:  # noqa: BLE001 - the reason is what the test reports
        return f"{exc}: {body[:300]!r}"


class StatusServer:
    """`with StatusServer(tmp_path) as s:` serves until the block ends. `s.env` is what the controller injects;
    `s.token` the accepted token (change it with `rotate`); `s.received` the accepted bodies, `s.refused` the
    Authorization headers of refused ones. `s.failing = True` answers 503 to everything."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.cert, key = self_signed(directory)
        self.token_file = directory / "token"
        self.token = "token-1"
        self.token_file.write_text(self.token + "\n")
        self.received: list[dict] = []
        self.refused: list[str] = []
        self.invalid: list[str] = []  # why each refused body was refused
        self.failing = False
        self.lock = threading.Lock()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}/apis/trainer/status"

    @property
    def env(self) -> dict[str, str]:
        return {"KUBEFLOW_TRAINER_SERVER_URL": self.url, "KUBEFLOW_TRAINER_SERVER_CA_CERT": str(self.cert),
                "KUBEFLOW_TRAINER_SERVER_TOKEN": str(self.token_file)}

    def rotate(self, token: str) -> None:
        """As the kubelet does: a new file moved over the old one."""
        fresh = self.token_file.with_name("token.new")
        fresh.write_text(token + "\n")
        fresh.replace(self.token_file)
        self.token = token

    def percentages(self) -> list[int]:
        with self.lock:
            return [b["trainerStatus"]["progressPercentage"] for b in self.received
                    if "progressPercentage" in b["trainerStatus"]]

    def metrics(self, index: int = -1) -> dict[str, str]:
        with self.lock:
            return {m["name"]: m["value"] for m in self.received[index]["trainerStatus"]["metrics"]}

    def __enter__(self) -> StatusServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if server.failing:
                    return self._answer(503)
                if self.headers.get("Authorization") != f"Bearer {server.token}":
                    with server.lock:
                        server.refused.append(self.headers.get("Authorization", ""))
                    return self._answer(401)
                problem = invalid(body)
                with server.lock:
                    (server.invalid if problem else server.received).append(problem or json.loads(body))
                self._answer(422 if problem else 200)

            def _answer(self, code: int) -> None:
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        return Handler
