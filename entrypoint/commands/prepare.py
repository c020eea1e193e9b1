"""`prepare`: tokenize and pack the data into the cache only, once, so that many trainings (or the nodes of one)
start from it. Several processes or an Indexed Job's pods may share the work, one shard each."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from entrypoint import logs
from entrypoint.config.platforms import shard_default
from entrypoint.config.schema import TrainConfig
from entrypoint.data import pipeline, survey
from entrypoint.data.options import DataOptions
from entrypoint.errors import ConfigError
from entrypoint.train.model import load_tokenizer
from entrypoint.train.preemption import StopRequest
from entrypoint.train.preflight import check_model_dir, preflight, vocabulary

log = logs.area("data")


def settle(cfg: TrainConfig, shard: int | None, num_shards: int,
           environ: Mapping[str, str]) -> tuple[TrainConfig, int]:
    """The configuration preparing runs with and this process's shard (by default an Indexed Job's completion
    index when the work is shared, else 0), or the ConfigError naming the fix."""
    # An Indexed Job's index would also set --node-rank; preparing is not a training run, so it does not apply.
    cfg = dataclasses.replace(cfg, nnodes="1", node_rank=0)
    if shard is None:
        shard = shard_default(environ) if num_shards > 1 else 0
    if shard >= num_shards:
        raise ConfigError(f"--shard {shard} must be below --num-shards {num_shards}; shards count from 0 (set "
                          "--num-shards to the Indexed Job's completions).")
    return cfg, shard


def prepare(cfg: TrainConfig, shard: int, num_shards: int) -> str:
    """Check what preparing needs, then tokenize this shard into the cache; returns the line that says what was
    prepared. A signal ends it within seconds, leaving no partial cache."""
    if Path(cfg.model).is_dir():  # a local model without tokenizer files would tokenize everything to nothing
        check_model_dir(Path(cfg.model), "--model", weights=False)
    checked = preflight(cfg, trains=False)
    stop = StopRequest().install()
    tokenizer = load_tokenizer(cfg)
    opts = DataOptions.of(cfg, vocab_size=vocabulary(checked.model_config))  # as train's, so the cache keys agree
    for report in survey.check(opts, tokenizer, checked.block_size):  # every problem in the first records, at once
        log.info(f"{report.path}: {report.line()}")
    stats = pipeline.prepare_shard(opts, tokenizer, checked.block_size, shard, num_shards, stop=stop)
    if stats is None:
        return (f"prepared: shard {shard} of {num_shards} in {cfg.data_cache_dir}; the cache is complete once "
                "every shard is written")
    return (f"prepared: {stats.train_rows} training and {stats.valid_rows} validation rows of "
            f"{checked.block_size} tokens of {stats.data_format} data in {cfg.data_cache_dir}")
