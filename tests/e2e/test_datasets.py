"""`finetune train`, `prepare` and `doctor` with --dataset, as a user runs them: a local dataset repository trains
and publishes, a rerun into another output folder is a cache hit, a two-source mixture reports each source's tokens
in metrics.json, and the mistakes are one line with their exit codes before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

from entrypoint.errors import ExitCode
from tests.support.datarepos import carded_repo, plain_repo, texts
from tests.support.helpers import finetune, train_env

PAIRS = [{"prompt": f"Question {i}: what follows {i}?\n", "completion": f"{i + 1} follows {i}."} for i in range(120)]
SHORT = {"FINETUNE_MAX_STEPS": "2", "FINETUNE_EVAL_STEPS": "2", "FINETUNE_SAVE_STEPS": "2"}


def run(model: Path, out: Path, *args: str, **extra: str):
    # --data-dir names a folder that does not exist: --dataset replaces it, so it is never read.
    return finetune(*args, env=train_env(model, out.parent / "no-data-dir", out, **{**SHORT, **extra}))


def test_a_local_dataset_repository_trains_and_an_unchanged_rerun_is_a_cache_hit(tiny_model, tmp_path):
    repo = carded_repo(tmp_path / "repo", {"default": {"train": PAIRS[:100], "validation": PAIRS[100:]}})
    cache = str(tmp_path / "cache")
    first = run(tiny_model, tmp_path / "out1", "train", "--dataset", str(repo), FINETUNE_CACHE_DIR=cache)
    assert first.returncode == 0, first.stderr[-3000:]
    metrics = json.loads((tmp_path / "out1" / "metrics.json").read_text())
    assert metrics["data_format"] == "instruction" and not metrics["data_cache_hit"]
    assert 0 < metrics["target_tokens"] < metrics["train_tokens"] // 2  # loss on the answers only
    assert list(metrics["train_tokens_by_source"]) == [str(repo)] and (tmp_path / "out1" / "model").is_dir()
    again = run(tiny_model, tmp_path / "out2", "train", FINETUNE_CACHE_DIR=cache, FINETUNE_DATASET=str(repo))
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "out2" / "metrics.json").read_text())["data_cache_hit"] is True
    assert "cache hit" in again.stderr


def test_a_two_source_mixture_reports_each_sources_tokens_in_metrics(tiny_model, tmp_path):
    prose = plain_repo(tmp_path / "prose", {"train": texts("p", 300, words=8)})
    longer = plain_repo(tmp_path / "longer", {"train": texts("l", 80, words=30), "validation": texts("v", 8)},
                        suffix=".parquet")
    out = tmp_path / "out"
    result = run(tiny_model, out, "train", "--dataset", f"{prose}:0.6", "--dataset", f"{longer}:0.4")
    assert result.returncode == 0, result.stderr[-3000:]
    tokens = json.loads((out / "metrics.json").read_text())["train_tokens_by_source"]
    assert set(tokens) == {str(prose), str(longer)}
    assert abs(tokens[str(prose)] / sum(tokens.values()) - 0.6) < 0.03, tokens
    assert "training tokens by source" in result.stderr


def test_doctor_and_prepare_read_a_dataset_and_name_its_revision(tiny_model, tmp_path):
    repo = plain_repo(tmp_path / "repo", {"train": PAIRS})
    out = tmp_path / "out"
    doctor = run(tiny_model, out, "doctor", "--dataset", str(repo))
    assert doctor.returncode == 0, doctor.stdout[-3000:] + doctor.stderr[-3000:]
    data = next(line for line in doctor.stdout.splitlines() if line.startswith("ok    data:"))
    assert f"dataset {repo} (revision local-" in data and "held out" in data
    prepared = run(tiny_model, out, "prepare", "--dataset", str(repo))
    assert prepared.returncode == 0 and "prepared:" in prepared.stdout + prepared.stderr, prepared.stderr[-3000:]


def test_mistakes_with_dataset_are_one_line_with_their_exit_code_before_training(tiny_model, tmp_path):
    repo = plain_repo(tmp_path / "repo", {"train": PAIRS})
    cases = [
        (("--dataset", str(tmp_path / "missing")), ExitCode.DATA, "no such local dataset repository"),
        (("--dataset", str(repo), "--dataset-split", "test"), ExitCode.DATA, "--dataset-split 'test'"),
        (("--dataset", str(repo), "--train-file", "x.jsonl"), ExitCode.USAGE, "--train-file and --valid-file"),
        (("--dataset", f"{repo}:0.5", "--dataset", str(tmp_path)), ExitCode.USAGE, "give every --dataset a weight"),
    ]
    for args, code, says in cases:
        result = run(tiny_model, tmp_path / "out", "train", *args)
        assert result.returncode == code, (args, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and sum(says in line for line in result.stderr.splitlines()) == 1
        assert not (tmp_path / "out" / "model").exists()
