"""entrypoint/data/pipeline.py and collate.py:
documents -> tokens -> packed or padded rows, the collators, and the on-disk
cache.

Real files, the real tiny tokenizer (conftest), the real `datasets` code; block sizes are small (16-64
tokens) so each prepare takes a fraction of a second.
"""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path

import pytest
import torch

from entrypoint.config.schema import TrainConfig
from entrypoint.data import pipeline, shards
from entrypoint.data.collate import PackedCollator, PaddingCollator
from entrypoint.data.options import DataOptions
from entrypoint.errors import DataError
from tests.support.helpers import finetune

BLOCK = 16  # tokens
# Forty distinct one-line documents of roughly 8-20 tokens each, two of them non-ASCII.
DOCS = [f"Line {i}: the {animal} jumps over {i * 7 % 13} lazy dogs, then rests." for i, animal in enumerate(
    ["fox", "cat", "owl", "elk", "yak", "emu", "ant", "bee"] * 5)]
DOCS[3] = "Café ☕ naïve — “curly quotes” 日本語."
DOCS[17] = "Tab\tseparated\tand ending with an ellipsis…"
TRAIN, VALID = DOCS[:32], DOCS[32:]


def write_txt(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(doc + "\n" for doc in docs))
    return path


@pytest.fixture
def split_dir(tmp_path) -> Path:
    """train.txt and valid.txt, one document a line."""
    write_txt(tmp_path / "data" / "train.txt", TRAIN)
    write_txt(tmp_path / "data" / "valid.txt", VALID)
    return tmp_path / "data"


def prepare(tokenizer, data_dir: Path, output_dir: Path, block_size: int = BLOCK, **options):
    cfg = TrainConfig(data_dir=data_dir, output_dir=output_dir, preprocessing_workers=1, **options)
    return pipeline.prepare(DataOptions.of(cfg), tokenizer, block_size)


def token_stream(tokenizer, docs: list[str]) -> list[int]:
    """tokenize(doc) + [eos] for each document, concatenated: what packing must cut into blocks."""
    return [t for doc in docs for t in tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]


def row_documents(tokenizer, row_ids: list[list[int]]) -> list[str]:
    """Rows made without packing from documents shorter than a block, decoded back to those documents."""
    eos = tokenizer.eos_token_id
    assert all(row[-1] == eos and eos not in row[:-1] for row in row_ids)
    return [tokenizer.decode(row[:-1]) for row in row_ids]


def rows(dataset) -> list[list[int]]:
    return list(dataset["input_ids"])


def flat(row_ids: list[list[int]]) -> list[int]:
    return [t for row in row_ids for t in row]


# Every format, end to end.


@pytest.mark.parametrize("name", ["train.txt", "train.jsonl", "train.json", "train.csv", "train.parquet",
                                  "train.txt.gz", "train.jsonl.gz"])
def test_every_format_becomes_one_eos_terminated_row_per_document(tokenizer, tmp_path, name):
    import datasets

    path = tmp_path / "data" / name
    path.parent.mkdir()
    # Written by datasets' own exporters (pandas and pyarrow underneath), as other tools would write them.
    docs = datasets.Dataset.from_dict({"text": DOCS, "n": list(range(len(DOCS)))})
    gz = {"compression": "gzip"} if name.endswith(".gz") else {}
    if name.startswith("train.txt"):
        body = "".join(doc + "\n" for doc in DOCS).encode()
        path.write_bytes(gzip.compress(body) if gz else body)
    elif name.startswith("train.jsonl"):
        docs.to_json(str(path), force_ascii=False, **gz)
    elif name == "train.json":
        docs.to_json(str(path), lines=False, force_ascii=False)
    elif name == "train.csv":
        docs.to_csv(str(path), index=False)
    else:
        docs.to_parquet(str(path))
    train, valid, stats = prepare(tokenizer, tmp_path / "data", tmp_path / "out", block_size=64, packing=False)
    assert stats.train_documents + stats.valid_documents == len(DOCS)
    assert flat(rows(train) + rows(valid)).count(tokenizer.eos_token_id) == len(DOCS)
    assert sorted(row_documents(tokenizer, rows(train) + rows(valid))) == sorted(DOCS)


# Held-out split when there is no validation file.


def held_out(tokenizer, tmp_path: Path, run: str, **options) -> tuple[list[str], list[str], pipeline.DataStats]:
    train, valid, stats = prepare(tokenizer, tmp_path / "data", tmp_path / run, block_size=64, packing=False,
                                  **options)
    return row_documents(tokenizer, rows(train)), row_documents(tokenizer, rows(valid)), stats


def test_without_a_validation_file_a_percentage_of_documents_is_held_out_disjointly(tokenizer, tmp_path):
    write_txt(tmp_path / "data" / "train.txt", DOCS)
    train, valid, stats = held_out(tokenizer, tmp_path, "a", validation_split=10)
    assert len(valid) == stats.valid_documents == 4  # 10% of 40 documents
    assert len(train) == stats.train_documents == 36
    assert not set(train) & set(valid)
    assert sorted(train + valid) == sorted(DOCS)


def test_held_out_split_is_the_same_every_run_and_changes_with_the_seed(tokenizer, tmp_path):
    write_txt(tmp_path / "data" / "train.txt", DOCS)
    _, first, _ = held_out(tokenizer, tmp_path, "a", validation_split=25)
    _, again, stats = held_out(tokenizer, tmp_path, "b", validation_split=25)  # fresh output: no cache
    _, other_seed, _ = held_out(tokenizer, tmp_path, "c", validation_split=25, seed=1)
    assert not stats.cache_hit
    assert again == first and len(first) == 10
    assert sorted(other_seed) != sorted(first)


def test_too_few_documents_to_hold_out_is_a_data_error(tokenizer, tmp_path):
    write_txt(tmp_path / "data" / "train.txt", [" ".join(DOCS)])
    with pytest.raises(DataError, match=r"only 1 document\(s\), too few .* add --valid-file"):
        prepare(tokenizer, tmp_path / "data", tmp_path / "out")


# Packing.


@pytest.mark.parametrize("block_size", [8, BLOCK, 29])
def test_packing_cuts_the_eos_separated_stream_into_full_blocks(tokenizer, split_dir, tmp_path, block_size):
    train, valid, stats = prepare(tokenizer, split_dir, tmp_path / "out", block_size=block_size)
    stream = token_stream(tokenizer, TRAIN)
    blocks = rows(train)
    assert all(len(block) == block_size for block in blocks)  # no short block, so no padding anywhere
    assert flat(blocks) == stream[: len(blocks) * block_size]  # same tokens, same order, EOS between docs
    assert len(blocks) == stats.train_rows == len(stream) // block_size
    assert stats.dropped_tokens == len(stream) % block_size
    assert stats.train_tokens == len(blocks) * block_size
    assert flat(rows(valid)) == token_stream(tokenizer, VALID)[: stats.valid_rows * block_size]


def test_packing_drops_only_the_final_partial_block(tokenizer, split_dir, tmp_path):
    stream = token_stream(tokenizer, TRAIN)
    block_size = len(stream) // 4 + 1  # three full blocks and a remainder of at least one token
    train, _, stats = prepare(tokenizer, split_dir, tmp_path / "out", block_size=block_size)
    assert len(train) == 3
    assert stats.dropped_tokens == len(stream) - 3 * block_size > 0
    assert flat(rows(train)) + stream[3 * block_size:] == stream


def test_packed_collator_labels_are_the_inputs_which_the_model_shifts(tokenizer, tiny_model, split_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    train, _, _ = prepare(tokenizer, split_dir, tmp_path / "out")
    batch = PackedCollator()([train[i] for i in range(4)])
    assert set(batch) == {"input_ids", "labels"}  # no attention mask: every position is real
    assert batch["input_ids"].shape == (4, BLOCK) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        out = model(**batch)
    # Position t predicts token t+1: the model does the shift, so the collator must not.
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())
    assert torch.allclose(out.loss, manual, atol=1e-5)


# Without packing.


def test_without_packing_each_document_is_one_row_ending_in_eos(tokenizer, split_dir, tmp_path):
    train, _, stats = prepare(tokenizer, split_dir, tmp_path / "out", block_size=64, packing=False)
    assert row_documents(tokenizer, rows(train)) == TRAIN
    assert stats.train_rows == len(TRAIN) and stats.dropped_tokens == 0
    assert stats.train_tokens == len(token_stream(tokenizer, TRAIN))


def test_without_packing_long_documents_continue_in_the_next_row_and_nothing_is_lost(tokenizer, tmp_path):
    docs = [" ".join(DOCS[:12]), DOCS[12], " ".join(DOCS[13:30])]  # several blocks, under one, several
    write_txt(tmp_path / "data" / "train.txt", docs)
    write_txt(tmp_path / "data" / "valid.txt", VALID)
    train, _, stats = prepare(tokenizer, tmp_path / "data", tmp_path / "out", packing=False)
    pieces = rows(train)
    lengths = [len(token_stream(tokenizer, [doc])) for doc in docs]
    assert lengths[0] > 3 * BLOCK and lengths[2] > 3 * BLOCK  # the test needs documents spanning rows
    assert all(1 <= len(row) <= BLOCK for row in pieces)
    assert len(pieces) == sum(-(-n // BLOCK) for n in lengths)  # ceil(tokens / block) rows per document
    assert flat(pieces) == token_stream(tokenizer, docs)
    assert sum(len(row) for row in pieces) == stats.train_tokens == sum(lengths)
    assert stats.dropped_tokens == 0


def test_padding_collator_pads_to_the_longest_row_and_masks_only_the_padding(tokenizer):
    eos = tokenizer.eos_token_id
    row_ids = [[11, 12, eos], [21, eos, 23, 24, 25, eos], [eos]]  # EOS mid-row too: a real token, not padding
    batch = PaddingCollator(pad_token_id=eos, block_size=BLOCK, multiple_of=1)([{"input_ids": r} for r in row_ids])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["labels"].shape == (3, 6)
    assert torch.equal(batch["labels"] == -100, batch["attention_mask"] == 0)
    for i, row in enumerate(row_ids):
        assert batch["input_ids"][i].tolist() == row + [eos] * (6 - len(row))
        assert batch["attention_mask"][i].tolist() == [1] * len(row) + [0] * (6 - len(row))
        assert batch["labels"][i].tolist() == row + [-100] * (6 - len(row))  # every real EOS is a target


def test_padding_collator_rounds_width_to_a_multiple_but_never_past_the_block(tokenizer):
    batch = [{"input_ids": [1] * 5}, {"input_ids": [2] * 9}]
    assert PaddingCollator(tokenizer.eos_token_id, block_size=BLOCK)(batch)["input_ids"].shape == (2, 16)
    assert PaddingCollator(tokenizer.eos_token_id, block_size=12)(batch)["input_ids"].shape == (2, 12)
    assert PaddingCollator(tokenizer.eos_token_id, block_size=9)(batch)["input_ids"].shape == (2, 9)


def test_padded_batch_loss_counts_real_tokens_only(tokenizer, tiny_model, split_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    train, _, _ = prepare(tokenizer, split_dir, tmp_path / "out", block_size=64, packing=False)
    batch = PaddingCollator(tokenizer.eos_token_id, block_size=64)([train[i] for i in range(6)])
    mask = batch["attention_mask"]
    assert (mask == 0).any() and (batch["input_ids"][mask == 1] == tokenizer.eos_token_id).sum() == 6
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        out = model(**batch)
    real = mask[:, 1:] == 1  # targets are positions 1..n-1 that hold a real token, EOS included
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1][real], batch["input_ids"][:, 1:][real])
    assert torch.allclose(out.loss, manual, atol=1e-5)


# Cache.


def test_second_prepare_with_the_same_inputs_is_a_cache_hit(tokenizer, split_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="finetune")
    train, valid, first = prepare(tokenizer, split_dir, tmp_path / "out")
    assert not first.cache_hit and "cache miss" in caplog.text
    caplog.clear()
    train2, valid2, second = prepare(tokenizer, split_dir, tmp_path / "out")
    assert second.cache_hit and "cache hit" in caplog.text and "cache miss" not in caplog.text
    assert second.fingerprint == first.fingerprint
    assert (second.train_rows, second.dropped_tokens) == (first.train_rows, first.dropped_tokens)
    assert rows(train2) == rows(train) and rows(valid2) == rows(valid)


def test_touching_a_file_without_changing_it_is_still_a_cache_hit(tokenizer, split_dir, tmp_path):
    first = prepare(tokenizer, split_dir, tmp_path / "out")[2]
    os.utime(split_dir / "train.txt", (2_000_000_000, 2_000_000_000))
    second = prepare(tokenizer, split_dir, tmp_path / "out")[2]
    assert second.cache_hit and second.fingerprint == first.fingerprint


@pytest.mark.parametrize("change", ["file content", "block size", "packing", "tokenizer", "text split"])
def test_changing_what_the_blocks_depend_on_rebuilds_them(tokenizer, split_dir, tmp_path, change, caplog):
    caplog.set_level(logging.INFO, logger="finetune")
    first = prepare(tokenizer, split_dir, tmp_path / "out")[2]
    options, block_size, tok = {}, BLOCK, tokenizer
    if change == "file content":
        write_txt(split_dir / "train.txt", TRAIN[:-1])
    elif change == "block size":
        block_size = BLOCK * 2
    elif change == "packing":
        options["packing"] = False
    elif change == "tokenizer":
        tok = tokenizer.train_new_from_iterator(DOCS, vocab_size=300)
    else:
        options["txt_split"] = "paragraph"
    caplog.clear()
    second = prepare(tok, split_dir, tmp_path / "out", block_size=block_size, **options)[2]
    assert not second.cache_hit and "cache miss" in caplog.text
    assert second.fingerprint != first.fingerprint
    assert prepare(tok, split_dir, tmp_path / "out", block_size=block_size, **options)[2].cache_hit


def test_changed_file_is_rebuilt_from_its_new_content_even_with_the_old_mtime(tokenizer, split_dir, tmp_path):
    # Files restored from an archive, or copied with cp -p / rsync -t, can change content but keep mtime.
    train_txt = split_dir / "train.txt"
    before = train_txt.stat()
    prepare(tokenizer, split_dir, tmp_path / "out", block_size=64, packing=False)
    edited = [doc.replace("jumps", "leaps") for doc in TRAIN]  # same size, same mtime, other text
    write_txt(train_txt, edited)
    os.utime(train_txt, ns=(before.st_atime_ns, before.st_mtime_ns))
    train, _, stats = prepare(tokenizer, split_dir, tmp_path / "out", block_size=64, packing=False)
    assert not stats.cache_hit
    assert row_documents(tokenizer, rows(train)) == edited


@pytest.mark.slow  # two CLI processes, ~8 s each
def test_prepare_command_says_cache_hit_on_its_second_run(tiny_model, split_dir, tmp_path):
    args = ("prepare", "--model", str(tiny_model), "--data-dir", str(split_dir), "--output-dir", str(tmp_path / "out"),
            "--block-size", str(BLOCK))
    first, second = finetune(*args), finetune(*args)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert "data: cache miss" in first.stdout + first.stderr
    assert "data: cache hit" in second.stdout + second.stderr
    assert "prepared: " in second.stdout and second.stdout.splitlines()[-1] == first.stdout.splitlines()[-1]


def test_cache_dir_holds_complete_builds_that_any_output_dir_reuses(tokenizer, split_dir, tmp_path):
    cache = tmp_path / "shared-cache"
    cfg = TrainConfig(data_dir=split_dir, output_dir=tmp_path / "out", cache_dir=cache, preprocessing_workers=1)
    stats = pipeline.prepare(DataOptions.of(cfg), tokenizer, BLOCK)[2]
    target = cache / f"blocks-{stats.fingerprint}"
    assert (target / pipeline.COMPLETE).is_file() and (target / "stats.json").is_file()
    assert not (tmp_path / "out").exists()
    other_output = TrainConfig(data_dir=split_dir, output_dir=tmp_path / "out2", cache_dir=cache)
    assert pipeline.prepare(DataOptions.of(other_output), tokenizer, BLOCK)[2].cache_hit


# Text too short.


@pytest.mark.parametrize("short", ["train", "valid"])
def test_text_too_short_for_one_block_is_a_data_error(tokenizer, tmp_path, short):
    write_txt(tmp_path / "data" / "train.txt", ["Hi."] if short == "train" else TRAIN)
    write_txt(tmp_path / "data" / "valid.txt", ["Hi."] if short == "valid" else VALID)
    with pytest.raises(DataError) as caught:
        prepare(tokenizer, tmp_path / "data", tmp_path / "out", block_size=64)
    message = str(caught.value)
    which = "training" if short == "train" else "validation"
    assert message.startswith(f"the {which} text has fewer than --block-size 64 tokens") and "\n" not in message
    assert "lower --block-size" in message and "--no-packing" in message
    # The fix the message names works.
    assert prepare(tokenizer, tmp_path / "data", tmp_path / "out", block_size=64, packing=False)[2].train_rows


def test_tokenizing_in_parallel_processes_gives_the_single_process_tokens(tokenizer, corpus_dir, monkeypatch):
    import datasets

    lines = (corpus_dir / "train.txt").read_text().splitlines()
    docs = datasets.Dataset.from_dict({"text": lines})
    monkeypatch.setattr(shards, "PARALLEL_MIN_BYTES", 0)  # the corpus is smaller than the threshold
    flat, lengths = shards.tokenize(docs, tokenizer, workers=2)
    one_flat, one_lengths = shards.tokenize(docs, tokenizer, workers=1)
    assert flat.tolist() == one_flat.tolist() and lengths.tolist() == one_lengths.tolist()
    assert flat.tolist() == token_stream(tokenizer, lines)
