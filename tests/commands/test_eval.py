"""`finetune eval`: the held-out loss of any model directory, scored as training scores it (answer tokens only for
instruction data), lm-evaluation-harness tasks defined by the test, and one-line refusals of bad input."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from entrypoint.commands import eval as evaluation
from entrypoint.config.schema import EvalConfig, TrainConfig
from entrypoint.data import pipeline
from entrypoint.data.options import DataOptions
from entrypoint.errors import ConfigError, ExitCode, ModelLoadError
from tests.support.helpers import clean_env, finetune, train_env

TASK = "finetune_tiny_choice"
CHOICES = [("The function returns", [" the value", " zzzz"]), ("Return the", [" path", " qqqq"]),
           ("If the argument is", [" None", " xxxx"])]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, corpus_dir) -> Path:
    directory = tmp_path_factory.mktemp("small-data")
    lines = (corpus_dir / "train.txt").read_text().splitlines()
    (directory / "train.txt").write_text("\n".join(lines[:300]) + "\n")
    (directory / "valid.txt").write_text("\n".join(lines[300:340]) + "\n")
    return directory


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A multiple-choice task of three questions, read from a local JSON Lines file (nothing downloaded)."""
    directory = tmp_path_factory.mktemp("tasks")
    rows = [{"question": q, "choices": c, "answer": 0} for q, c in CHOICES]
    (directory / "choices.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "tiny.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {directory / "choices.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    return directory


def config(model: Path, data: Path, out: Path, **options) -> TrainConfig:
    return TrainConfig(model=str(model), data_dir=data, output_dir=out, block_size=32, batch_size=8, **options)


def reference_loss(cfg: TrainConfig, model_dir: Path) -> tuple[float, int, str]:
    """Mean cross-entropy over every target token of the held-out rows, computed here row by row; the target
    tokens; the fingerprint of the rows (eval must score these same rows)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    _, eval_ds, stats = pipeline.prepare(DataOptions.of(cfg), tokenizer, cfg.block_size)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in eval_ds:
            ids = torch.as_tensor(row["input_ids"])[None]
            labels = torch.as_tensor(row.get("labels", row["input_ids"]))[None][:, 1:]  # text: every token
            positions = {"position_ids": torch.as_tensor(row["position_ids"])[None]} if "position_ids" in row else {}
            logits = model(input_ids=ids, **positions).logits[:, :-1]  # isolated documents restart positions
            mask = labels != -100
            losses = torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum")
            total, count = total + float(losses), count + int(mask.sum())
    return total / count, count, stats.fingerprint


def test_eval_scores_the_held_out_tokens_as_a_hand_computed_cross_entropy(tmp_path, tiny_model, small_data):
    cfg = config(tiny_model, small_data, tmp_path / "out")
    loss, tokens, fingerprint = reference_loss(cfg, tiny_model)
    result = evaluation.evaluate(cfg, EvalConfig(output=tmp_path / "eval.json"), {})
    assert result["data_fingerprint"] == fingerprint, "the same held-out rows"
    assert result["eval_tokens"] == tokens and result["eval_loss"] == pytest.approx(loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(2.718281828 ** loss, rel=1e-5)
    assert json.loads((tmp_path / "eval.json").read_text()) == json.loads(json.dumps(result))


def test_eval_of_instruction_data_scores_the_completions_only(tmp_path, tiny_model):
    data = tmp_path / "sft"
    data.mkdir()
    pairs = [{"prompt": f"Question {i}: what follows {i}?", "completion": f" {i + 1} follows."} for i in range(60)]
    (data / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[:50]))
    (data / "valid.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[50:]))
    cfg = config(tiny_model, data, tmp_path / "out")
    loss, tokens, _ = reference_loss(cfg, tiny_model)
    result = evaluation.evaluate(cfg, EvalConfig(), {})
    assert result["data_format"] == "instruction" and result["answers_only"]
    assert result["eval_tokens"] == tokens < result["eval_rows"] * 14  # answers, far fewer than every token
    # Within 1e-4, not 1e-5 as for text: the run's attention over isolated documents and this reference's
    # (position ids alone) differ in the last digits (measured 5.6e-5 relative).
    assert result["eval_loss"] == pytest.approx(loss, rel=1e-4)


def test_eval_runs_a_local_harness_task_and_writes_comparable_json(tmp_path, tiny_model, small_data, task_dir):
    out = tmp_path / "base.json"
    result = finetune("eval", "--model", str(tiny_model), "--data-dir", str(small_data), "--output-dir",
                      str(tmp_path / "run"), "--block-size", "32", "--batch-size", "8", "--output", str(out),
                      "--tasks", TASK, "--include-path", str(task_dir),
                      env=clean_env(HF_DATASETS_OFFLINE="1"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads(out.read_text())
    assert written == json.loads(result.stdout)
    assert written["tasks"][TASK]["sample_len"] == len(CHOICES) and 0 <= written["tasks"][TASK]["acc,none"] <= 1
    assert {"eval_loss", "perplexity", "eval_tokens", "data_fingerprint"} <= set(written)


def test_an_unknown_task_is_refused_naming_it(task_dir):
    with pytest.raises(ConfigError, match="--tasks no_such_task: no such lm-evaluation-harness task"):
        evaluation.find_tasks([TASK, "no_such_task"], task_dir)


def test_tasks_without_the_harness_name_the_extra_to_install(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as on an image without the eval extra
    with pytest.raises(ConfigError, match=r"pip install 'finetune-gpt2\[eval\]'") as caught:
        evaluation.check_inputs(TrainConfig(model=str(tiny_model)), EvalConfig(tasks=("hellaswag",)))
    assert caught.value.code == ExitCode.USAGE


@pytest.mark.parametrize(("args", "code", "expected"), [
    (["--model", "{tmp}/missing"], ExitCode.MODEL, "{tmp}/missing is not a model directory"),
    (["--include-path", "{tmp}/nowhere"], ExitCode.USAGE, "--include-path {tmp}/nowhere is not a directory"),
])
def test_bad_eval_input_is_one_line_with_its_exit_code_and_nothing_written(tmp_path, tiny_model, small_data, args,
                                                                           code, expected):
    args = [a.format(tmp=tmp_path) for a in args]
    base = ["--model", str(tiny_model)] if "--model" not in args else []
    result = finetune("eval", *base, *args, "--data-dir", str(small_data), "--output-dir", str(tmp_path / "run"),
                      "--output", str(tmp_path / "eval.json"), timeout=120)
    assert result.returncode == code, result.stderr[-2000:]
    assert expected.format(tmp=tmp_path) in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "eval.json").exists()


def test_a_checkpoint_scores_as_the_model_published_from_it_given_the_base_models_tokenizer(tmp_path, tiny_model,
                                                                                            small_data):
    """Trainer's checkpoints hold no tokenizer: without --tokenizer the refusal names it; with it, the checkpoint
    of the last step scores exactly as the model published from it."""
    out = tmp_path / "run"
    trained = finetune("train", env=train_env(tiny_model, small_data, out, FINETUNE_MAX_STEPS="4",
                                              FINETUNE_SAVE_STEPS="4", FINETUNE_EVAL_STEPS="4"))
    assert trained.returncode == 0, trained.stderr[-2000:]
    checkpoint = out / "checkpoints" / "checkpoint-4"
    common = ["--data-dir", str(small_data), "--output-dir", str(out), "--block-size", "32"]
    refused = finetune("eval", "--model", str(checkpoint), *common, timeout=120)
    assert refused.returncode == ExitCode.MODEL and "--tokenizer" in refused.stderr, refused.stderr[-2000:]
    scores = []
    for model, extra in ((checkpoint, ["--tokenizer", str(tiny_model)]), (out / "model", [])):
        result = finetune("eval", "--model", str(model), *extra, *common, "--output", str(tmp_path / "e.json"),
                          timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        scores.append(json.loads((tmp_path / "e.json").read_text()))
    assert scores[0]["eval_loss"] == pytest.approx(scores[1]["eval_loss"], abs=1e-6)
    assert scores[0]["eval_tokens"] == scores[1]["eval_tokens"] > 0


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model, small_data) -> Path:
    """A two-step LoRA run: checkpoint-2 holds the adapter alone, model/ the adapter merged into the base."""
    out = tmp_path_factory.mktemp("lora-run")
    trained = finetune("train", env=train_env(tiny_model, small_data, out, FINETUNE_LORA_RANK="4",
                                              FINETUNE_MAX_STEPS="2", FINETUNE_SAVE_STEPS="2",
                                              FINETUNE_EVAL_STEPS="2"))
    assert trained.returncode == 0, trained.stderr[-2000:]
    return out


def test_a_lora_checkpoint_scores_as_its_base_with_the_adapter_merged_as_published(tmp_path, tiny_model,
                                                                                   small_data, lora_run):
    """A LoRA checkpoint holds the adapter alone (no config.json, no weights, no tokenizer): eval loads the base
    model its adapter_config.json names, with the base's tokenizer, and scores exactly as the published model."""
    checkpoint = lora_run / "checkpoints" / "checkpoint-2"
    assert not (checkpoint / "config.json").exists() and (checkpoint / "adapter_config.json").is_file()
    lora, published = (evaluation.evaluate(config(model, small_data, lora_run), EvalConfig(), {})
                       for model in (checkpoint, lora_run / "model"))
    assert lora["model"] == str(checkpoint) and lora["base_model"] == str(tiny_model)
    assert lora["eval_loss"] == pytest.approx(published["eval_loss"], abs=1e-6)
    assert lora["eval_tokens"] == published["eval_tokens"] > 0
    before = json.loads((lora_run / "metrics.json").read_text())["initial_eval_loss"]
    assert abs(lora["eval_loss"] - before) > 1e-3, "the adapter was applied: the base alone scores otherwise"


def test_a_lora_checkpoint_whose_base_moved_is_refused_naming_the_base_and_the_fix(tmp_path, small_data, lora_run):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(lora_run / "checkpoints" / "checkpoint-2", checkpoint)
    adapter_config = json.loads((checkpoint / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(tmp_path / "moved")
    (checkpoint / "adapter_config.json").write_text(json.dumps(adapter_config))
    with pytest.raises(ModelLoadError) as caught:
        evaluation.check_inputs(config(checkpoint, small_data, tmp_path / "out"), EvalConfig())
    (line,) = caught.value.problems
    assert f"base model {tmp_path / 'moved'}" in line and "restore the base model at that path" in line
    assert caught.value.code == ExitCode.MODEL
