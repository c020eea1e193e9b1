"""The fault lab the fault tests share: one per test module (tiny model, corpus, reference run)."""

from __future__ import annotations

import pytest

from bench.faults import Lab


@pytest.fixture(scope="module")
def lab(tmp_path_factory, tiny_model, corpus_dir, request):
    lab = Lab(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]), tiny_model, corpus_dir)
    yield lab
    lab.close()
