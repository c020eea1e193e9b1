"""The S3-protocol server the publish tests share: one per test module, and a cutting proxy per test."""

from __future__ import annotations

import pytest

from tests.support.s3server import Proxy, S3Server


@pytest.fixture(scope="module")
def server():
    with S3Server() as s:
        yield s


@pytest.fixture
def proxy(server):
    with Proxy(server.port) as p:
        yield p
