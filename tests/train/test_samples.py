"""--sample-prompts: samples at every evaluation that leave training untouched, kept across a resume, in the
card beside the loss before and after training; bad prompt files stop the run before training with exit 3."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from entrypoint.config.schema import TrainConfig
from entrypoint.data import prompts
from entrypoint.errors import DataError, ExitCode
from entrypoint.publish import outputs
from entrypoint.train import samples
from tests.support.helpers import FAST_TRAIN, finetune, train_env
from tests.support.runs import interrupt_at

CHAT = [{"role": "user", "content": "Return the path"}]


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps("The function") + "\n" + json.dumps({"messages": CHAT}) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model)


def sampler(tmp_path, prompt_file, tokenizer, **options) -> samples.Samples:
    cfg = TrainConfig(output_dir=tmp_path, sample_prompts=prompt_file, sample_max_new_tokens=8, **options)
    return samples.for_run(cfg, tokenizer, 128)


def test_a_round_leaves_random_states_and_train_mode_as_they_were(tmp_path, prompt_file, tokenizer, model):
    sampling = sampler(tmp_path, prompt_file, tokenizer)
    model.train()
    random.random(), torch.rand(1)  # states somewhere other than a fresh seed
    before = random.getstate(), torch.get_rng_state()
    rows = sampling.round(model, 5)
    assert model.training
    assert random.getstate() == before[0] and torch.equal(torch.get_rng_state(), before[1])
    assert [(r["step"], r["prompt"]) for r in rows] == [(5, "The function"), (5, CHAT)]
    assert all(r["completion"] for r in rows)
    assert sampling.round(model, 6)[0]["completion"] == rows[0]["completion"], "greedy: the same model, the same text"
    written = [json.loads(line) for line in (tmp_path / outputs.SAMPLES).read_text().splitlines()]
    assert [r["step"] for r in written] == [5, 5, 6, 6]
    assert list((tmp_path / "runs").glob("events.out.tfevents.*")), "TensorBoard text entries"


def test_a_round_past_its_time_limit_skips_the_rest_and_says_so(tmp_path, prompt_file, tokenizer, model, monkeypatch,
                                                                caplog):
    monkeypatch.setattr(samples, "SAMPLE_SECONDS", 0.0)
    assert sampler(tmp_path, prompt_file, tokenizer, report_to="none").round(model, 3) == []
    assert "sampled 0 of 2 prompts in 0 s" in caplog.text


def test_a_resume_keeps_the_samples_up_to_its_step_and_a_fresh_start_none(tmp_path):
    path = tmp_path / outputs.SAMPLES
    path.write_text("".join(json.dumps({"step": s, "prompt": "p", "completion": "c"}) + "\n" for s in (0, 8, 16)))
    assert samples.keep_until(path, 8) == {0, 8}
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 8]
    assert samples.keep_until(path, 0) == set() and path.read_text() == ""


def test_no_option_no_sampler_and_a_prompt_too_long_for_the_context_is_refused(tmp_path, tokenizer):
    assert samples.for_run(TrainConfig(output_dir=tmp_path), tokenizer, 128) is None
    long = tmp_path / "long.txt"
    long.write_text("word " * 200 + "\n")
    with pytest.raises(DataError, match="prompt 1 is .* exceeds the model's 128-token context"):
        samples.for_run(TrainConfig(output_dir=tmp_path, sample_prompts=long), tokenizer, 128)


def test_the_card_shows_loss_before_and_after_and_each_prompts_first_and_last_sample():
    rows = [{"step": s, "prompt": p, "completion": f"{s}-{i}"} for s in (0, 8, 16) for i, p in enumerate(["A", CHAT])]
    card = outputs.model_card("base", "f" * 8, {}, {"eval_loss": 2.0, "perplexity": 7.389, "initial_eval_loss": 6.0,
                                                    "initial_perplexity": 403.4}, rows)
    assert "| eval loss | 6 | 2 |" in card and "| perplexity | 403.4 | 7.389 |" in card
    assert card.count("**Prompt:**") == 2 and "user: Return the path" in card
    assert "0-0" in card and "16-0" in card and "16-1" in card and "8-0" not in card
    assert "## Samples" not in outputs.model_card("base", "f", {}, {"eval_loss": 2.0, "perplexity": 7.4})


def test_a_missing_prompt_file_stops_train_before_anything_loads(tmp_path, tiny_model, corpus_dir):
    env = train_env(tiny_model, corpus_dir, tmp_path / "out", FINETUNE_SAMPLE_PROMPTS=str(tmp_path / "none.txt"))
    result = finetune("train", env=env, timeout=120)
    assert result.returncode == ExitCode.DATA, result.stderr[-2000:]
    assert f"--sample-prompts {tmp_path / 'none.txt'} does not exist" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out" / "model").exists()


@pytest.mark.slow
def test_samples_leave_training_exact_across_a_resume_and_reach_log_card_and_summary(tmp_path, tiny_model,
                                                                                     corpus_dir, prompt_file):
    """A run without samples, and one with samples stopped by SIGTERM at step 11 and resumed, train the same model."""
    base = {**FAST_TRAIN, "FINETUNE_LOGGING_STEPS": "1"}
    plain = train_env(tiny_model, corpus_dir, tmp_path / "plain", base=base)
    assert finetune("train", env=plain).returncode == 0
    out = tmp_path / "sampled"
    env = train_env(tiny_model, corpus_dir, out, base=base, FINETUNE_SAMPLE_PROMPTS=str(prompt_file),
                    FINETUNE_SAMPLE_MAX_NEW_TOKENS="6")
    code, log = interrupt_at(env, 11)
    assert code == ExitCode.PREEMPTED, log[-2000:]
    assert "samples: step 8: 'The function' -> " in log
    result = finetune("train", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    got = json.loads((out / "metrics.json").read_text())
    assert got["eval_loss"] == pytest.approx(expected["eval_loss"], abs=1e-6)
    assert [json.loads(line)["step"] for line in (out / outputs.SAMPLES).read_text().splitlines()] == \
        [0, 0, 8, 8, 16, 16]
    assert "samples: step 16: 'Return the path' -> " in result.stderr
    assert "(before training " in result.stderr.strip().splitlines()[-1]
    card = (out / "model" / "README.md").read_text()
    assert "## Before and after" in card and "## Samples" in card
    assert [p.shown() for p in prompts.read(prompt_file)] == ["The function", CHAT]
