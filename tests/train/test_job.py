"""End to end: the real CLI trains a real tiny model on real files and publishes a loadable model."""

from __future__ import annotations

import json
import stat

import pytest

from entrypoint.errors import ExitCode
from tests.support.helpers import clean_env, finetune, train_env


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model, corpus_dir):
    """One run configured only by environment variables, shared by the assertions below."""
    out = tmp_path_factory.mktemp("run") / "out"
    env = train_env(tiny_model, corpus_dir, out, FINETUNE_HUB_TOKEN="hf_do_not_print")
    result = finetune("train", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result, env


def test_env_only_run_publishes_a_complete_model(trained):
    out, _, _ = trained
    model = out / "model"
    assert json.loads((model / "COMPLETE").read_text())["config_hash"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"):
        assert (model / name).is_file(), name
    assert not list(out.glob(".model.*")), "staging folders must not survive a successful publish"


def test_published_model_loads_with_plain_transformers(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, _ = trained
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    ids = tokenizer("Return the value", return_tensors="pt")
    assert model(**ids).logits.shape[-1] == len(tokenizer)


def test_published_files_are_readable_by_other_users(trained):
    out, _, _ = trained
    for path in [*(out / "model").iterdir(), out / "metrics.json", out / "loss.png", out / "status.json"]:
        assert path.stat().st_mode & stat.S_IROTH, f"{path} is not world-readable"


def test_training_lowers_eval_loss_well_below_the_untrained_model(trained):
    metrics = json.loads((trained[0] / "metrics.json").read_text())
    assert metrics["eval_loss"] < metrics["initial_eval_loss"] - 0.5


def test_metrics_report_what_the_run_did(trained):
    metrics = json.loads((trained[0] / "metrics.json").read_text())
    required = {"eval_loss", "perplexity", "train_loss", "global_step", "epoch", "train_runtime", "train_tokens",
                "useful_tokens_per_second", "padding_fraction", "world_size", "device", "precision",
                "peak_memory_bytes"}
    assert required <= metrics.keys()
    assert metrics["global_step"] == 16
    assert metrics["train_tokens"] == 16 * 8 * 32  # steps x batch x block: packed, so every position is real
    assert metrics["padding_fraction"] == 0.0
    assert (metrics["device"], metrics["precision"], metrics["world_size"]) == ("cpu", "fp32", 1)
    # Evaluations inside the loop (at steps 0, 8 and 16) are in train_runtime but are not training.
    assert 0 < metrics["eval_seconds"] < metrics["train_runtime"]
    assert metrics["useful_tokens_per_second"] == pytest.approx(
        metrics["train_tokens"] / (metrics["train_runtime"] - metrics["eval_seconds"]))


def test_outputs_include_plot_tensorboard_config_and_status(trained):
    out, _, _ = trained
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "runs").glob("events.out.tfevents.*"))
    config_text = (out / "config.yaml").read_text()
    assert "hf_do_not_print" not in config_text and "hub_token: '***'" in config_text
    assert json.loads((out / "status.json").read_text())["state"] == "succeeded"
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-16", "checkpoint-8"]


def test_logs_start_with_config_and_end_with_a_summary(trained):
    _, result, _ = trained
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "config: model=" in lines[0]
    assert "hf_do_not_print" not in result.stderr
    assert "done: eval loss" in lines[-1] and "tokens/s" in lines[-1] and "model at" in lines[-1]
    assert any("train step 8/16" in line and "loss" in line and "eta" in line for line in lines)


def test_generate_samples_from_the_published_model(trained):
    out, _, _ = trained
    result = finetune("generate", "--model-dir", str(out / "model"), "--prompt", "Return", "--max-new-tokens", "8",
                      "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Return") and len(result.stdout.split()) > 1
    again = finetune("generate", "--model-dir", str(out / "model"), "--prompt", "Return", "--max-new-tokens", "8",
                     "--seed", "3")
    assert again.stdout == result.stdout, "the same seed must give the same sample"


def test_rerun_after_success_is_a_no_op(trained):
    out, _, env = trained
    before = (out / "model" / "model.safetensors").stat().st_mtime_ns
    result = finetune("train", env=env)
    assert result.returncode == 0
    assert "done already" in result.stderr
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == before


def test_different_configuration_over_a_published_model_needs_overwrite(trained, tmp_path):
    out, _, env = trained
    changed = {**env, "FINETUNE_LEARNING_RATE": "1e-3"}
    result = finetune("train", env=changed)
    assert result.returncode == ExitCode.USAGE
    assert "--overwrite" in result.stderr


@pytest.mark.slow
def test_padding_path_trains_and_reports_its_padding(tmp_path, tiny_model, corpus_dir):
    out = tmp_path / "out"
    # 128-token rows: at 32 most are full-length pieces of longer documents, and batches of rows grouped by
    # length would then need no padding at all in 16 steps.
    result = finetune("train", "--no-packing", env=train_env(tiny_model, corpus_dir, out, FINETUNE_BLOCK_SIZE="128"))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["padding_fraction"] < 0.9
    assert metrics["eval_loss"] < metrics["initial_eval_loss"]


@pytest.mark.slow
def test_early_stopping_stops_and_publishes_the_best_model(tmp_path, tiny_model, corpus_dir):
    """With a learning rate of 0 no evaluation improves on the first, so patience 1 stops after the second."""
    out = tmp_path / "out"
    env = train_env(tiny_model, corpus_dir, out, FINETUNE_LEARNING_RATE="0", FINETUNE_EARLY_STOPPING_PATIENCE="1",
                  FINETUNE_MAX_STEPS="40", FINETUNE_EVAL_STEPS="4", FINETUNE_SAVE_STEPS="4")
    result = finetune("train", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["global_step"] == 8
    assert metrics["eval_loss"] == pytest.approx(metrics["best_eval_loss"])


@pytest.mark.slow
def test_finetunes_a_model_made_elsewhere_on_text_it_never_saw(tmp_path, corpus_dir):
    """A GPT-2 built with plain transformers and tokenizers (not init-model), tokenizer trained on docstrings,
    fine-tuned through environment variables alone on the language reference topics shipped in pydoc_data."""
    from pydoc_data.topics import topics

    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    base = tmp_path / "base"
    bpe = ByteLevelBPETokenizer()
    bpe.train([str(corpus_dir / "train.txt")], vocab_size=1024, special_tokens=["<|endoftext|>"],
              show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=64, n_layer=2, n_head=2,
                               eos_token_id=0, bos_token_id=0)).save_pretrained(base)
    tokenizer.save_pretrained(base)

    data = tmp_path / "reference"
    data.mkdir()
    paragraphs = [p.strip() for text in topics.values() for p in text.split("\n\n") if len(p.strip()) > 40]
    (data / "topics.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    out = tmp_path / "out"
    result = finetune("train", env=clean_env(FINETUNE_MODEL=str(base), FINETUNE_DATA_DIR=str(data),
                                             FINETUNE_OUTPUT_DIR=str(out), FINETUNE_BLOCK_SIZE="64",
                                             FINETUNE_BATCH_SIZE="16", FINETUNE_GRAD_ACCUM="1",
                                             FINETUNE_MAX_STEPS="150", FINETUNE_LEARNING_RATE="3e-3",
                                             FINETUNE_EVAL_STEPS="50", FINETUNE_SAVE_STEPS="50"))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_loss"] < metrics["initial_eval_loss"] - 1.5, metrics
