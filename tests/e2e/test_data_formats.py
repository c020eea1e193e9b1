"""`finetune train` from the command line on each record format people bring from the Hub: Alpaca and ShareGPT
records and pretokenized rows in JSON Lines and Parquet. Each trains a few steps on the session's tiny model and
publishes; metrics.json says the loss fell on the answers only."""

from __future__ import annotations

import json

import pytest

from tests.support import records as samples
from tests.support.helpers import finetune, train_env

STEPS = {"FINETUNE_MAX_STEPS": "2", "FINETUNE_EVAL_STEPS": "2", "FINETUNE_SAVE_STEPS": "2"}


@pytest.mark.parametrize("kind, data_format", [("alpaca-jsonl", "instruction"), ("sharegpt-jsonl", "chat"),
                                               ("pretokenized-jsonl", "pretokenized"),
                                               ("pretokenized-parquet", "pretokenized")])
def test_train_publishes_from_each_record_format_with_loss_on_the_answers(tiny_model, tokenizer, tmp_path, kind,
                                                                          data_format):
    fmt, suffix = kind.split("-")
    records = {"alpaca": samples.ALPACA, "sharegpt": samples.SHAREGPT}.get(fmt) or samples.pretokenized(tokenizer)
    samples.write_records(tmp_path / "data", "train", records, suffix)
    out = tmp_path / "out"
    result = finetune("train", env=train_env(tiny_model, tmp_path / "data", out, **STEPS), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data_format"] == data_format and metrics["isolate_documents"] is True
    assert 0 < metrics["target_tokens"] < metrics["train_tokens"] * 3 // 4, metrics  # questions carry no loss
    assert (out / "model" / "model.safetensors").is_file()
