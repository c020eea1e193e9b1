"""`prepare`'s work without click: which shard a process takes, and a real preparation into the cache."""

from __future__ import annotations

import signal

import pytest

from entrypoint.commands import prepare as preparing
from entrypoint.config.schema import TrainConfig
from entrypoint.errors import ConfigError, DataError
from tests.support import records as samples


def test_a_shard_comes_from_the_indexed_jobs_completion_index_only_when_the_work_is_shared(tmp_path):
    cfg = TrainConfig(output_dir=tmp_path, nnodes="4", node_rank=2)
    index = {"JOB_COMPLETION_INDEX": "3"}
    settled, shard = preparing.settle(cfg, None, 4, index)
    assert shard == 3 and (settled.nnodes, settled.node_rank) == ("1", 0)  # preparing is not a training run
    assert preparing.settle(cfg, None, 1, index)[1] == 0
    assert preparing.settle(cfg, 1, 4, index)[1] == 1  # --shard wins
    with pytest.raises(ConfigError, match="--shard 4 must be below --num-shards 4"):
        preparing.settle(cfg, 4, 4, {})


def test_prepare_fills_the_cache_and_says_what_it_prepared(tmp_path, tiny_model, corpus_dir):
    cfg = TrainConfig(model=str(tiny_model), data_dir=corpus_dir, output_dir=tmp_path / "out", block_size=64,
                      preprocessing_workers=1)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:  # prepare installs its stop request's handlers, as the command's process wants
        assert preparing.prepare(cfg, 1, 2).startswith("prepared: shard 1 of 2 in ")
        line = preparing.prepare(cfg, 0, 2)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert line.startswith("prepared: ") and " rows of 64 tokens of text data in " in line, line
    assert list((tmp_path / "out" / "cache").glob("blocks-*/COMPLETE"))


def test_prepare_reports_every_problem_in_the_first_records_of_each_file_before_tokenizing(tmp_path, tiny_model):
    data = tmp_path / "data"
    role = samples.write_records(data, "train", samples.bad_records("sharegpt-unknown-role"), "jsonl")
    end = samples.write_records(data, "valid", samples.bad_records("sharegpt-ends-with-user"), "jsonl")
    cfg = TrainConfig(model=str(tiny_model), data_dir=data, output_dir=tmp_path / "out", preprocessing_workers=1)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with pytest.raises(DataError) as raised:
            preparing.prepare(cfg, 0, 1)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    problems = raised.value.problems
    assert len(problems) == 2 and problems[0].startswith(f"{role} line 4: ") and problems[1].startswith(f"{end} line 4")
    assert not list((tmp_path / "out" / "cache").glob("blocks-*"))
