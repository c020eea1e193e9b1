"""Mixing --dataset sources: the NAME:WEIGHT syntax, token shares within a tolerance, the same documents for the same
seed, whole concatenation without weights, and each source's own validation split or hold-out."""

from __future__ import annotations

from pathlib import Path

import pytest

from entrypoint.config.schema import TrainConfig
from entrypoint.data import mixture, pipeline
from entrypoint.data.options import DataOptions
from entrypoint.errors import ConfigError, DataError, ExitCode
from tests.support.datarepos import plain_repo, texts

BLOCK = 32


def prepare(tokenizer, tmp_path: Path, names: tuple[str, ...], out: str = "out", **more):
    cfg = TrainConfig(dataset=names, data_dir=tmp_path / "absent", output_dir=tmp_path / out,
                      preprocessing_workers=1, **more)
    return pipeline.prepare(DataOptions.of(cfg), tokenizer, BLOCK)


@pytest.fixture
def repos(tmp_path) -> tuple[Path, Path]:
    """Two sources of unlike documents: many short ones, and fewer long ones with their own validation split."""
    short = plain_repo(tmp_path / "short", {"train": texts("s", 400, words=6)})
    long = plain_repo(tmp_path / "long", {"train": texts("l", 120, words=40), "validation": texts("v", 10)})
    return short, long


def test_the_weight_is_a_trailing_number_and_everything_else_is_the_name():
    assert mixture.parse(("org/name:0.7", "./odd:2:1", "/data/x.jsonl:3e-1")) == [
        ("org/name", 0.7), ("./odd:2", 1.0), ("/data/x.jsonl", 0.3)]
    assert mixture.parse(("a", "hf:x")) == [("a", None), ("hf:x", None)]


@pytest.mark.parametrize(("values", "says"), [
    (("a:0.5", "b"), "give every --dataset a weight"),
    (("a:0", "b:1"), "above 0"),
    (("a:1", "a:2"), "given twice"),
    (("",), "is empty"),
])
def test_bad_weights_are_usage_errors_naming_the_fix(values, says):
    with pytest.raises(ConfigError, match=says) as exc:
        mixture.parse(values)
    assert exc.value.code == ExitCode.USAGE and len(exc.value.problems) == 1


def test_weights_are_shares_of_training_tokens_within_a_tolerance(tokenizer, tmp_path, repos):
    short, long = repos
    for weights in ((0.7, 0.3), (0.25, 0.75)):
        names = (f"{short}:{weights[0]}", f"{long}:{weights[1]}")
        _, _, stats = prepare(tokenizer, tmp_path, names, out=f"out-{weights[0]}")
        tokens = stats.source_tokens
        assert set(tokens) == {str(short), str(long)}
        share = tokens[str(short)] / sum(tokens.values())
        assert share == pytest.approx(weights[0], abs=0.03), tokens
        # The limiting source is read whole: no document is taken twice, so nothing else could be added.
        assert stats.train_tokens + stats.dropped_tokens == sum(tokens.values())


def test_the_same_seed_takes_the_same_documents_and_another_seed_others(tokenizer, tmp_path, repos):
    names = tuple(f"{repo}:1" for repo in repos)

    def rows(out: str, seed: int):
        train, valid, stats = prepare(tokenizer, tmp_path, names, out=out, seed=seed)
        return [r["input_ids"].tolist() for r in train], stats

    first, stats = rows("a", 1)
    again, again_stats = rows("b", 1)  # another cache folder: built again, not read back
    other, _ = rows("c", 2)
    assert not again_stats.cache_hit and first == again and stats.source_tokens == again_stats.source_tokens
    assert other != first


def test_without_weights_every_document_of_every_source_is_read(tokenizer, tmp_path, repos):
    short, long = repos
    _, _, stats = prepare(tokenizer, tmp_path, (str(short), str(long)))
    # The short source has no validation split (5% held out); the long one evaluates on its own.
    assert stats.train_documents == 400 - 20 + 120 and stats.valid_documents == 20 + 10


def test_sources_of_different_formats_are_refused_naming_each(tokenizer, tmp_path, repos):
    pairs = plain_repo(tmp_path / "pairs", {"train": [{"prompt": f"{i}?", "completion": "yes"} for i in range(50)]})
    with pytest.raises(DataError, match=r"different record formats .*text.*prompt-completion"):
        prepare(tokenizer, tmp_path, (str(repos[0]), str(pairs)))


def test_a_sharded_build_of_a_mixture_equals_the_single_process_one(tokenizer, tmp_path, repos):
    names = (f"{repos[0]}:0.5", f"{repos[1]}:0.5")

    def opts(cache: str) -> DataOptions:
        return DataOptions.of(TrainConfig(dataset=names, output_dir=tmp_path / "out", cache_dir=tmp_path / cache,
                                          preprocessing_workers=1))

    train, valid, stats = pipeline.prepare(opts("single"), tokenizer, BLOCK)
    for shard in (1, 0):
        last = pipeline.prepare_shard(opts("sharded"), tokenizer, BLOCK, shard, 2)
    assert last is not None and last.fingerprint == stats.fingerprint
    assert last.source_tokens == stats.source_tokens  # each shard's counts, summed
    train2, valid2, _ = pipeline.prepare(opts("sharded"), tokenizer, BLOCK)
    for one, two in ((train, train2), (valid, valid2)):
        assert [r["input_ids"].tolist() for r in one] == [r["input_ids"].tolist() for r in two]
