"""DPO (entrypoint/train/dpo.py) in the real Trainer: the loss and its reference in process, and whole runs on the
demo's preference pairs (finetune corpus --preferences): reward accuracy rising on the training pairs, an exact
resume after SIGTERM, metrics, card and plot, and a published model plain transformers loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from entrypoint.data import sftcorpus
from entrypoint.train import dpo
from tests.support.helpers import finetune, train_env
from tests.support.runs import final_metrics, stopped_then_resumed

STEPS = 16
# 8 pairs (16 rows of at most 128 tokens) a step, evaluated on the training pairs themselves.
RUN = {"FINETUNE_BLOCK_SIZE": "128", "FINETUNE_BATCH_SIZE": "8", "FINETUNE_GRAD_ACCUM": "1",
       "FINETUNE_MAX_STEPS": str(STEPS), "FINETUNE_EVAL_STEPS": "8", "FINETUNE_SAVE_STEPS": "8",
       "FINETUNE_LOGGING_STEPS": "1", "FINETUNE_LEARNING_RATE": "3e-3", "FINETUNE_DPO_BETA": "0.5"}


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pairs")
    sftcorpus.build(directory, max_records=40, preferences=True)
    return directory


def env_for(model: Path, data: Path, out: Path) -> dict[str, str]:
    return train_env(model, data, out, base=RUN, FINETUNE_CACHE_DIR=str(out.parent / "cache"),
                     FINETUNE_VALID_FILE=str(data / "train.jsonl"))


@pytest.fixture(scope="module")
def reference_out(tmp_path_factory, tiny_model, pairs_dir) -> Path:
    """An uninterrupted full fine-tuning DPO run: its output directory."""
    out = tmp_path_factory.mktemp("dpo") / "out"
    result = finetune("train", env=env_for(tiny_model, pairs_dir, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_sequence_logps_sum_the_answer_tokens_log_probabilities():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 2, -100, -100]])
    expected = [sum(torch.log_softmax(logits[r, t - 1], -1)[labels[r, t]].item() for t in range(1, 5)
                    if labels[r, t] != -100) for r in range(2)]
    assert dpo.sequence_logps(logits, labels).tolist() == pytest.approx(expected, abs=1e-5)


def test_with_lora_the_reference_is_the_base_model_under_the_disabled_adapter(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=4, target_modules=["c_attn"]))
    preference = dpo.Preference.for_model(model, beta=0.5)
    assert preference.reference is None  # no second copy of the weights
    ids = torch.arange(24).reshape(2, 12) % base.config.vocab_size
    labels = ids.masked_fill(torch.arange(12) < 6, -100)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    model.eval()
    loss, _ = preference.loss(model, model, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # the adapter starts as zero: policy == reference
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_()
        reference = dpo.sequence_logps(preference._reference_logits(model, ids, batch["attention_mask"]), labels)
        assert torch.allclose(reference, dpo.sequence_logps(base(input_ids=ids).logits, labels), atol=1e-5)
        moved = dpo.sequence_logps(model(input_ids=ids).logits, labels)
    assert not torch.allclose(moved, reference, atol=1e-3)


def test_dpo_raises_reward_accuracy_on_the_training_pairs_and_reports_it(reference_out):
    metrics = final_metrics(reference_out)
    assert metrics["data_format"] == "preference"
    assert metrics["initial_eval_loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    assert metrics["eval_loss"] < 0.6 and metrics["reward_accuracy"] >= 0.75, metrics  # chance: 0.5
    assert metrics["reward_margin"] > 0 and metrics["rewards_chosen"] > metrics["rewards_rejected"]
    history = json.loads((reference_out / "history.json").read_text())
    assert any("rewards/accuracy" in h for h in history) and any("eval_rewards/margin" in h for h in history)
    card = (reference_out / "model" / "README.md").read_text()
    assert "| reward_accuracy |" in card and "| dpo_beta | 0.5 |" in card
    assert (reference_out / "loss.png").stat().st_size > 0


def test_the_published_dpo_model_loads_in_plain_transformers(reference_out):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(reference_out / "model")
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size


@pytest.mark.slow
def test_dpo_sigterm_then_rerun_equals_an_uninterrupted_run(tmp_path, tiny_model, pairs_dir, reference_out):
    out = tmp_path / "out"
    env = env_for(tiny_model, pairs_dir, out)
    log = stopped_then_resumed(env, 5, out)
    assert "memory with preference pairs: about" in log and "reference" in log  # a frozen copy without LoRA
    reference = final_metrics(reference_out)
    assert final_metrics(out)["reward_accuracy"] == reference["reward_accuracy"]
    resumed, uninterrupted = (load_file(o / "model" / "model.safetensors") for o in (out, reference_out))
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(resumed[name], tensor), name


@pytest.mark.slow
def test_two_processes_train_dpo_on_their_halves_of_the_pairs(tmp_path, tiny_model, pairs_dir):
    """DDP over the pairs: each process takes 4 whole pairs a step (8 a step together, as the one-process run)."""
    out = tmp_path / "out"
    env = {**env_for(tiny_model, pairs_dir, out), "FINETUNE_NPROC_PER_NODE": "2", "FINETUNE_BATCH_SIZE": "4"}
    result = finetune("train", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = final_metrics(out)
    assert (metrics["world_size"], metrics["global_step"], metrics["data_format"]) == (2, STEPS, "preference")
    assert metrics["reward_accuracy"] >= 0.75 and metrics["eval_loss"] < 0.6, metrics  # chance: 0.5
