"""Checkpoints bound to the run that wrote them: which options a resume may change, the refusal of the others, and
--overwrite / --no-resume as fresh starts that really start from the base model."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from entrypoint.config.schema import TrainConfig
from entrypoint.errors import ExitCode
from entrypoint.train import checkpoints, identity
from tests.support.helpers import finetune, train_env


def test_every_option_is_in_the_identity_or_listed_with_the_reason_it_may_change():
    options = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(identity.IDENTITY) | set(identity.MAY_CHANGE) == options
    assert not set(identity.IDENTITY) & set(identity.MAY_CHANGE)
    assert identity.REPORTING.issubset(identity.MAY_CHANGE)
    assert all(len(reason) > 10 for reason in identity.MAY_CHANGE.values())


def test_identity_is_what_was_asked_for_and_ignores_what_may_change():
    base = identity.values(TrainConfig(batch_size="auto", grad_accum=4), 32, "data-a")
    assert base["precision"] == "auto"  # as requested: auto may resolve to bf16 on one GPU and fp16 on another
    split_differently = identity.values(TrainConfig(batch_size=16, grad_accum=2), 32, "data-a")
    assert identity.digest(split_differently) == identity.digest(base)  # 8 x 4 and 16 x 2: 32 sequences a step
    extended = identity.values(TrainConfig(batch_size="auto", max_steps=900, eval_steps=7, save_steps=3,
                                           gradient_checkpointing=True, nproc_per_node="2", compile="off",
                                           data_dir=Path("/elsewhere")), 32, "data-a")
    assert identity.digest(extended) == identity.digest(base)
    changed = identity.values(TrainConfig(batch_size="auto", learning_rate=1e-3), 32, "data-b")
    assert identity.changes(base, changed) == [
        f"{identity.LABELS['data']} data-a -> data-b", "--learning-rate 5e-05 -> 0.001"]


def test_fsdp_binds_checkpoints_only_when_on_so_older_identities_still_match():
    plain = identity.values(TrainConfig(), 32, "data-a")
    assert "fsdp" not in plain  # the identity of every run without --fsdp is what it was before the option
    sharded = identity.values(TrainConfig(fsdp=True, nproc_per_node="2"), 32, "data-a")
    assert identity.changes(plain, sharded) == ["--fsdp None -> True"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model, corpus_dir) -> Path:
    """A published 16-step run at learning rate 3e-3 (FAST_TRAIN); tests copy it before changing anything."""
    root = tmp_path_factory.mktemp("finished")
    result = finetune("train", env=train_env(tiny_model, corpus_dir, root / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def copy_of(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    return tmp_path / "out"


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize(("name", "default", "changed"), [
    ("dpo_beta", 0.1, 0.5), ("chosen_field", "chosen", "good"), ("rejected_field", "rejected", "bad")])
def test_later_options_bind_checkpoints_only_when_changed_so_older_identities_still_match(name, default, changed):
    plain = identity.values(TrainConfig(), 32, "data-a")
    assert name not in plain  # at its default, the identity of a run is what it was before the option
    assert identity.values(TrainConfig(**{name: default}), 32, "data-a") == plain
    other = identity.values(TrainConfig(**{name: changed}), 32, "data-a")
    assert identity.changes(plain, other) == [f"--{name.replace('_', '-')} None -> {changed}"]


def test_changed_options_on_resume_exit_2_naming_them_and_both_fixes(tmp_path, finished, tiny_model, corpus_dir):
    out = copy_of(finished, tmp_path)
    shutil.rmtree(out / "model")  # the run trained to the end but its publish failed
    marker = (out / "checkpoints" / "checkpoint-16" / checkpoints.MARKER).read_text()
    env = train_env(tiny_model, corpus_dir, out, FINETUNE_LEARNING_RATE="0.01", FINETUNE_BATCH_SIZE="4")
    result = finetune("train", env=env)
    assert result.returncode == ExitCode.USAGE, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for says in ("checkpoint-16", "--learning-rate 0.003 -> 0.01", "--batch-size x --grad-accum 8 -> 4",
                 "--no-resume", "--checkpoint-dir"):
        assert says in errors[0]
    assert "Traceback" not in result.stderr and "train step" not in result.stderr
    assert (out / "checkpoints" / "checkpoint-16" / checkpoints.MARKER).read_text() == marker
    assert not (out / "model").exists()

    fresh = finetune("train", "--no-resume", env=env)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert (out / "checkpoints" / checkpoints.SET_ASIDE / "checkpoint-16" / checkpoints.MARKER).read_text() == marker
    assert "eval  step 0:" in fresh.stderr


@pytest.mark.slow
def test_overwrite_with_a_new_learning_rate_publishes_what_a_fresh_run_trains(tmp_path, finished, tiny_model,
                                                                              corpus_dir):
    out = copy_of(finished, tmp_path)
    old = weights(out / "model")
    result = finetune("train", "--overwrite", env=train_env(tiny_model, corpus_dir, out, FINETUNE_LEARNING_RATE="0.01"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--learning-rate 0.003 -> 0.01" in result.stderr and "starting fresh" in result.stderr
    assert (out / "checkpoints" / checkpoints.SET_ASIDE / "checkpoint-16").is_dir()

    alone = tmp_path / "alone"
    reference = finetune("train", env=train_env(tiny_model, corpus_dir, alone, FINETUNE_LEARNING_RATE="0.01"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    published, expected = weights(out / "model"), weights(alone / "model")
    assert published.keys() == expected.keys()
    assert all(torch.equal(published[k], expected[k]) for k in expected)
    assert not all(torch.equal(published[k], old[k]) for k in old)
    metrics, alone_metrics = (json.loads((d / "metrics.json").read_text()) for d in (out, alone))
    for key in ("global_step", "train_tokens", "initial_eval_loss", "eval_loss", "train_loss"):
        assert metrics[key] == alone_metrics[key], key


@pytest.mark.slow
def test_a_different_world_size_continues_and_says_the_resume_is_not_exact(tmp_path, finished, tiny_model,
                                                                           corpus_dir):
    out = copy_of(finished, tmp_path)
    shutil.rmtree(out / "model")
    marker_path = out / "checkpoints" / "checkpoint-16" / checkpoints.MARKER
    marker = json.loads(marker_path.read_text())
    marker_path.write_text(json.dumps({**marker, "world_size": 2}))  # as if two processes had saved it
    result = finetune("train", env=train_env(tiny_model, corpus_dir, out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("checkpoint-16 was saved by 2 processes and this run has 1: continuing, but the resume is no longer "
            "exact") in result.stderr
    assert (out / "model" / "COMPLETE").is_file()
