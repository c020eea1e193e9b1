"""Datasets by name (--dataset) from local dataset repositories: resolution of configs, splits and revisions, the
records through the same format path as files, the cache keyed by the files' bytes, and one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from entrypoint.config.schema import TrainConfig
from entrypoint.data import formats, hubdata, mixture, pipeline
from entrypoint.data.options import DataOptions
from entrypoint.errors import ConfigError, DataError, ExitCode
from tests.support.datarepos import carded_repo, plain_repo, texts, write_split
from tests.support.records import ALPACA, SHAREGPT

BLOCK = 32
PAIRS = [{"prompt": f"Question {i}: what follows {i}?\n", "completion": f"{i + 1} follows."} for i in range(40)]


def options(tmp_path: Path, *names: str, **more) -> DataOptions:
    cfg = TrainConfig(dataset=names, data_dir=tmp_path / "absent", output_dir=tmp_path / "out",
                      preprocessing_workers=1, **more)
    return DataOptions.of(cfg)


def prepare(tokenizer, opts: DataOptions):
    return pipeline.prepare(opts, tokenizer, BLOCK)


def test_a_plain_repository_trains_on_train_and_evaluates_on_its_own_validation_split(tokenizer, tmp_path):
    repo = plain_repo(tmp_path / "repo", {"train": PAIRS[:34], "validation": PAIRS[34:]})
    train, valid = mixture.discover(options(tmp_path, str(repo)))
    (part,) = train.parts
    assert (part.named.split, part.named.valid_split, part.named.local) == ("train", "validation", True)
    assert part.named.revision.startswith("local-") and valid  # validation comes from the dataset
    _, _, stats = prepare(tokenizer, options(tmp_path, str(repo)))
    assert (stats.data_format, stats.train_documents, stats.valid_documents) == ("instruction", 34, 6)
    conv = formats.convention(tokenizer)
    expected = sum(len(formats.encode(r, formats.INSTRUCTION, tokenizer, conv).ids) for r in PAIRS[:34])
    assert stats.source_tokens == {str(repo): expected}


def test_records_from_a_dataset_equal_the_same_records_from_a_file(tokenizer, tmp_path):
    repo = plain_repo(tmp_path / "repo", {"train": PAIRS[:34], "validation": PAIRS[34:]})
    files = plain_repo(tmp_path / "files", {"train": PAIRS[:34], "valid": PAIRS[34:]})
    by_name, by_name_valid, _ = prepare(tokenizer, options(tmp_path, str(repo)))
    cfg = TrainConfig(data_dir=files, output_dir=tmp_path / "out2", preprocessing_workers=1)
    by_file, by_file_valid, _ = pipeline.prepare(DataOptions.of(cfg), tokenizer, BLOCK)
    assert [r["labels"].tolist() for r in by_name] == [r["labels"].tolist() for r in by_file]
    assert [r["input_ids"].tolist() for r in by_name_valid] == [r["input_ids"].tolist() for r in by_file_valid]


@pytest.mark.parametrize("records", [ALPACA, SHAREGPT], ids=["alpaca", "sharegpt"])
def test_alpaca_and_sharegpt_records_from_a_dataset_equal_the_same_records_from_a_file(tokenizer, tmp_path, records):
    repo = plain_repo(tmp_path / "repo", {"train": records[:-4], "validation": records[-4:]})
    files = plain_repo(tmp_path / "files", {"train": records[:-4], "valid": records[-4:]})
    by_name, by_name_valid, stats = prepare(tokenizer, options(tmp_path, str(repo)))
    cfg = TrainConfig(data_dir=files, output_dir=tmp_path / "out2", preprocessing_workers=1)
    by_file, by_file_valid, _ = pipeline.prepare(DataOptions.of(cfg), tokenizer, BLOCK)
    assert stats.data_format == ("instruction" if records is ALPACA else "chat")
    assert [r["labels"].tolist() for r in by_name] == [r["labels"].tolist() for r in by_file]
    assert [r["input_ids"].tolist() for r in by_name_valid] == [r["input_ids"].tolist() for r in by_file_valid]


def test_a_card_names_configs_and_an_unknown_config_or_split_is_one_line_naming_them(tmp_path):
    repo = carded_repo(tmp_path / "repo", {"en": {"train": texts("en", 20), "test": texts("et", 5)},
                                           "fr": {"train": texts("fr", 20)}}, default="en")
    named = hubdata.resolve(str(repo), options(tmp_path, str(repo), dataset_config="fr"))
    assert (named.config, named.split, named.valid_split, named.loader) == ("fr", "train", None, "parquet")
    assert [p.name for p in named.files] == ["train-00000-of-00001.parquet"] and "fr" in str(named.files[0])
    assert hubdata.resolve(str(repo), options(tmp_path, str(repo))).config == "en"  # the card's default
    with pytest.raises(DataError) as bad_config:
        hubdata.resolve(str(repo), options(tmp_path, str(repo), dataset_config="de"))
    with pytest.raises(DataError) as bad_split:
        hubdata.resolve(str(repo), options(tmp_path, str(repo), dataset_split="dev"))
    for exc in (bad_config.value, bad_split.value):
        assert exc.code == ExitCode.DATA and len(exc.problems) == 1 and "\n" not in str(exc)
    assert "--dataset-config" in str(bad_config.value) and "en, fr" in str(bad_config.value)
    assert "--dataset-split 'dev'" in str(bad_split.value) and "train, test" in str(bad_split.value)


def test_a_missing_local_repository_is_a_data_error_and_a_revision_of_a_local_one_a_usage_error(tmp_path):
    with pytest.raises(DataError, match="no such local dataset repository") as missing:
        mixture.discover(options(tmp_path, str(tmp_path / "nowhere")))
    assert missing.value.code == ExitCode.DATA
    repo = plain_repo(tmp_path / "repo", {"train": texts("a", 5)})
    with pytest.raises(ConfigError, match="--dataset-revision v1 applies to Hub datasets") as revision:
        mixture.discover(options(tmp_path, str(repo), dataset_revision="v1"))
    assert revision.value.code == ExitCode.USAGE


def test_a_hub_id_that_cannot_be_reached_offline_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="cannot reach the Hugging Face Hub.*local copy") as exc:
        mixture.discover(options(tmp_path, "someone/no-such-dataset"))
    assert len(exc.value.problems) == 1
    assert hubdata.looks_local("./x") and hubdata.looks_local("a/b/c") and hubdata.looks_local("x.jsonl")
    assert not hubdata.looks_local("org/name") and not hubdata.looks_local("imdb")


def test_an_unchanged_rerun_is_a_cache_hit_a_touched_file_too_and_changed_bytes_a_miss(tokenizer, tmp_path):
    repo = plain_repo(tmp_path / "repo", {"train": texts("a", 60)}, suffix=".parquet")
    opts = options(tmp_path, str(repo))
    _, _, first = prepare(tokenizer, opts)
    assert not first.cache_hit and first.valid_documents == 3  # no validation split: 5% held out
    _, _, again = prepare(tokenizer, opts)
    assert again.cache_hit and again.fingerprint == first.fingerprint
    assert again.source_tokens == first.source_tokens  # read back from the cache's stats
    data = repo / "train.parquet"
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))
    assert prepare(tokenizer, opts)[2].cache_hit  # the key hashes bytes, not times
    write_split(data, texts("b", 60))
    changed = prepare(tokenizer, opts)[2]
    assert not changed.cache_hit and changed.fingerprint != first.fingerprint


def test_one_data_file_is_a_dataset_and_a_split_it_lacks_is_refused(tokenizer, tmp_path):
    path = write_split(tmp_path / "pairs.jsonl", PAIRS)
    _, _, stats = prepare(tokenizer, options(tmp_path, str(path)))
    assert stats.data_format == "instruction" and stats.train_documents + stats.valid_documents == len(PAIRS)
    with pytest.raises(DataError, match="one file"):
        mixture.discover(options(tmp_path, str(path), dataset_split="validation"))
