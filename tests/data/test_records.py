"""Instruction, chat, Alpaca and ShareGPT records and pretokenized rows through the data pipeline (sources -> shards ->
TokenDataset -> collators -> Trainer): their conversions (records.py), loss masks in the cache, BOS/EOS by each
tokenizer's convention, isolated documents, sharded builds, and what `finetune train` reports. Real files of every
supported type, real tokenizers and real tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from entrypoint.config.schema import TrainConfig
from entrypoint.data import cache, collate, formats, pipeline, records
from entrypoint.data.formats import CHAT, IGNORE, INSTRUCTION, TEXT
from entrypoint.data.options import DataOptions
from entrypoint.data.sources import discover
from entrypoint.errors import DataError
from entrypoint.train.model import load_model
from tests.support import records as samples
from tests.support.archs import save_tiny_model
from tests.support.helpers import finetune, train_env
from tests.support.tokenizers import CHATML, llama_style

BLOCK = 32
PROMPTS = [{"prompt": f"Question {i}: which {word} comes after {i}?\n", "completion": f"The {word} {i + 1} does."}
           for i, word in enumerate(["number", "page", "step", "row"] * 15)]
CHATS = [{"messages": [{"role": "user", "content": f"Say {word} {i} times."},
                       {"role": "assistant", "content": f"{word.title()} said {i} times."},
                       {"role": "user", "content": "Again, shorter."},
                       {"role": "assistant", "content": f"{word} x{i}"}]}
         for i, word in enumerate(["hello", "yes", "ok"] * 12)]


def write_records(directory: Path, name: str, records: list[dict], kind: str) -> None:
    """`records` as <name>.<kind>: jsonl, json (an array), csv, parquet; or `saved` (a save_to_disk folder)."""
    import datasets

    directory.mkdir(parents=True, exist_ok=True)
    if kind == "jsonl":
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    elif kind == "json":
        (directory / f"{name}.json").write_text(json.dumps(records))
    elif kind == "csv":
        datasets.Dataset.from_list(records).to_csv(str(directory / f"{name}.csv"), index=False)
    elif kind == "parquet":
        datasets.Dataset.from_list(records).to_parquet(str(directory / f"{name}.parquet"))
    else:
        raise ValueError(kind)


def split_dir(tmp_path: Path, records: list[dict], kind: str = "jsonl", valid: int = 6) -> Path:
    """train and valid files (no held-out split, so the expected stream is every training record in order): the
    last `valid` records validate."""
    directory = tmp_path / "data"
    if kind == "saved":
        import datasets

        datasets.DatasetDict({"train": datasets.Dataset.from_list(records[:-valid]),
                              "validation": datasets.Dataset.from_list(records[-valid:])}).save_to_disk(str(directory))
        return directory
    write_records(directory, "train", records[:-valid], kind)
    write_records(directory, "valid", records[-valid:], kind)
    return directory


def prepare(tokenizer, directory: Path, block_size: int = BLOCK, **options):
    cfg = TrainConfig(data_dir=directory, output_dir=directory.parent / "out", preprocessing_workers=1, **options)
    return pipeline.prepare(DataOptions.of(cfg), tokenizer, block_size)


def expected_stream(tokenizer, records: list[dict], fmt: str, train_on_prompt: bool = False):
    """formats.encode of each record, concatenated: ids and labels (formats' own tests prove each document)."""
    conv = formats.convention(tokenizer)
    docs = [formats.encode(r, fmt, tokenizer, conv, train_on_prompt=train_on_prompt) for r in records]
    return [i for d in docs for i in d.ids], [label for d in docs for label in d.labels]


def collated(dataset) -> dict[str, torch.Tensor]:
    """Every row of a packed split through the real collator."""
    return collate.PackedCollator()([dataset[i] for i in range(len(dataset))])


def saved_tokenizer(tokenizer, directory: Path) -> Path:
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "saved"])
def test_instruction_records_in_every_file_type_carry_loss_on_completions_only(tokenizer, tmp_path, kind):
    train, _, stats = prepare(tokenizer, split_dir(tmp_path, PROMPTS, kind))
    assert stats.data_format == "instruction" and stats.isolated
    ids, labels = expected_stream(tokenizer, PROMPTS[:-6], INSTRUCTION)
    batch = collated(train)
    assert batch["input_ids"].flatten().tolist() == ids[:len(train) * BLOCK]
    assert batch["labels"].flatten().tolist() == labels[:len(train) * BLOCK]
    # Read back the other way: the tokens that carry loss are the completions and their EOS, nothing else.
    targets = batch["input_ids"][batch["labels"] != IGNORE].tolist()
    completions = [t for r in PROMPTS[:-6] for t in
                   tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    assert targets == completions[:len(targets)] and len(targets) > len(train) * BLOCK // 4


def test_train_on_prompt_puts_loss_on_every_token_but_each_documents_first(tokenizer, tmp_path):
    train, _, _ = prepare(tokenizer, split_dir(tmp_path, PROMPTS), train_on_prompt=True)
    ids, labels = expected_stream(tokenizer, PROMPTS[:-6], INSTRUCTION, train_on_prompt=True)
    batch = collated(train)
    assert batch["labels"].flatten().tolist() == labels[:len(train) * BLOCK]
    assert sum(label == IGNORE for label in labels) == len(PROMPTS) - 6  # one per document: its first token


def test_renamed_instruction_fields_are_read(tokenizer, tmp_path):
    renamed = [{"question": r["prompt"], "answer": r["completion"], "id": i} for i, r in enumerate(PROMPTS)]
    train, _, stats = prepare(tokenizer, split_dir(tmp_path, renamed), prompt_field="question",
                              completion_field="answer")
    ids, labels = expected_stream(tokenizer, PROMPTS[:-6], INSTRUCTION)
    assert stats.data_format == "instruction"
    assert collated(train)["labels"].flatten().tolist() == labels[:len(train) * BLOCK]


@pytest.mark.parametrize("template", [None, CHATML], ids=["default-template", "own-template"])
@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_chat_records_carry_loss_on_assistant_turns_only(tokenizer, tmp_path, template, kind):
    tok = tokenizer if template is None else llama_style(tokenizer, template)
    train, _, stats = prepare(tok, split_dir(tmp_path, CHATS, kind), block_size=64)
    assert stats.data_format == "chat"
    ids, labels = expected_stream(tok, CHATS[:-6], CHAT)
    batch = collated(train)
    assert batch["input_ids"].flatten().tolist() == ids[:len(train) * 64]
    assert batch["labels"].flatten().tolist() == labels[:len(train) * 64]
    said = tok.decode(batch["input_ids"][batch["labels"] != IGNORE])
    assert "Hello said 0 times." in said and "hello x0" in said and "Say" not in said and "Again" not in said
    if template == CHATML:
        assert "<|im_start|>" in tok.decode(batch["input_ids"][0])  # rendered by the tokenizer's own template


def test_text_gets_bos_and_eos_with_a_llama_style_tokenizer_and_eos_only_with_a_gpt2_style_one(tokenizer, tmp_path):
    docs = [f"Plain document number {i} about {w}." for i, w in enumerate(["owls", "rain", "bread"] * 10)]
    directory = tmp_path / "data"
    directory.mkdir()
    (directory / "train.txt").write_text("".join(d + "\n" for d in docs[:-4]))
    (directory / "valid.txt").write_text("".join(d + "\n" for d in docs[-4:]))
    llama = llama_style(tokenizer)
    for tok, bos in ((tokenizer, []), (llama, [llama.bos_token_id])):
        train, _, stats = prepare(tok, directory, cache_dir=tmp_path / f"cache-{len(bos)}")
        eos = [tok.eos_token_id]
        stream = [t for d in docs[:-4] for t in bos + tok(d, add_special_tokens=False)["input_ids"] + eos]
        batch = collated(train)
        assert stats.data_format == "text" and not stats.isolated and "position_ids" not in batch
        assert batch["input_ids"].flatten().tolist() == stream[:len(train) * BLOCK]
        assert torch.equal(batch["labels"], batch["input_ids"])  # plain text: every token is a target
        assert stream.count(llama.bos_token_id) == (len(docs) - 4 if bos else 0)


def test_text_that_already_ends_with_eos_or_starts_with_bos_gets_neither_twice(tokenizer, tmp_path):
    llama = llama_style(tokenizer)
    docs = ["<s>Begins with BOS already.", "Ends with EOS already.</s>", "<s>Has both.</s>", "Has neither."] * 8
    directory = tmp_path / "data"
    directory.mkdir()
    (directory / "train.txt").write_text("".join(d + "\n" for d in docs))
    (directory / "valid.txt").write_text("".join(d + "\n" for d in docs))
    train, _, _ = prepare(llama, directory, block_size=8)
    stream = collated(train)["input_ids"].flatten().tolist()
    plain = [llama(d.replace("<s>", "").replace("</s>", ""), add_special_tokens=False)["input_ids"] for d in docs]
    expected = [t for ids in plain for t in [llama.bos_token_id, *ids, llama.eos_token_id]]
    assert stream == expected[:len(stream)] and len(stream) > len(expected) // 2


def test_unpacked_instruction_rows_keep_their_mask_and_pad_without_loss(tokenizer, tmp_path):
    train, _, stats = prepare(tokenizer, split_dir(tmp_path, PROMPTS), packing=False)
    assert not stats.isolated  # an unpacked row holds one document
    rows = [train[i] for i in range(4)]
    batch = collate.PaddingCollator(tokenizer.eos_token_id, BLOCK)(rows)
    conv = formats.convention(tokenizer)
    for i, row in enumerate(rows):
        encoded = formats.encode(PROMPTS[i], INSTRUCTION, tokenizer, conv)
        n = len(encoded.ids)
        assert row["input_ids"].tolist() == encoded.ids and batch["labels"][i, :n].tolist() == encoded.labels
        assert (batch["labels"][i, n:] == IGNORE).all() and (batch["attention_mask"][i, n:] == 0).all()


def test_a_sharded_build_of_instruction_records_equals_the_single_process_one(tokenizer, tmp_path):
    directory = tmp_path / "data"
    write_records(directory, "train", PROMPTS, "jsonl")  # the validation documents are held out of it

    def cfg(cache):
        return TrainConfig(data_dir=directory, output_dir=tmp_path / "out", cache_dir=tmp_path / cache,
                           preprocessing_workers=1)

    train, valid, stats = pipeline.prepare(DataOptions.of(cfg("single")), tokenizer, BLOCK)
    for shard in (1, 2, 0):
        last = pipeline.prepare_shard(DataOptions.of(cfg("sharded")), tokenizer, BLOCK, shard, 3)
    assert last is not None and last.fingerprint == stats.fingerprint
    train3, valid3, stats3 = pipeline.prepare(DataOptions.of(cfg("sharded")), tokenizer, BLOCK)
    assert stats3.cache_hit and stats3.valid_documents == stats.valid_documents > 0
    for one, three in ((train, train3), (valid, valid3)):
        for key in ("input_ids", "labels", "position_ids"):
            assert collated(one)[key].tolist() == collated(three)[key].tolist()
    target = tmp_path / "sharded" / f"blocks-{stats.fingerprint}"
    masks = [np.fromfile(target / pipeline.shard_name(i, 3) / "train.mask", dtype=np.uint8) for i in range(3)]
    assert all(len(m) and set(np.unique(m)) <= {0, 1} for m in masks)  # one byte per token, in every shard


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_document_in_an_isolated_packed_block_from_the_cache_has_its_solo_logits(tokenizer, tiny_model, tmp_path,
                                                                                   arch):
    model_dir = save_tiny_model(arch, tiny_model, tmp_path / arch)
    model = load_model(TrainConfig(model=str(model_dir))).eval()
    train, _, _ = prepare(tokenizer, split_dir(tmp_path, PROMPTS), block_size=64)
    batch = collate.PackedCollator()([train[1]])
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    first, end = starts[1], starts[2]  # the second document starting in this block, wholly inside it
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0, first:end]
        alone = model(input_ids=batch["input_ids"][:, first:end]).logits[0]
        mixed = model(input_ids=batch["input_ids"]).logits[0, first:end]
    assert torch.allclose(packed, alone, atol=1e-4), (packed - alone).abs().max()
    assert (mixed - alone).abs().max() > 1e-3  # without the position ids it would see the document before


def eval_loss_over_targets(model_dir: Path, dataset) -> float:
    """Cross-entropy of the published model summed over every target token of `dataset`, divided by their count."""
    model = load_model(TrainConfig(model=str(model_dir))).eval()
    total = count = 0.0
    for i in range(len(dataset)):
        batch = collate.PackedCollator()([dataset[i]])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids")).logits
        labels = batch["labels"][0, 1:]
        keep = labels != IGNORE
        total += torch.nn.functional.cross_entropy(logits[0, :-1][keep], labels[keep], reduction="sum").item()
        count += int(keep.sum())
    return total / count


def test_finetune_train_on_instruction_records_reports_target_tokens_and_the_format(tiny_model, tmp_path):
    directory = split_dir(tmp_path, PROMPTS, valid=20)
    out = tmp_path / "out"
    # Evaluation batches of 3 rows holding different numbers of answer tokens: a mean of batch means would differ.
    result = finetune("train", env=train_env(tiny_model, directory, out, FINETUNE_MAX_STEPS="6",
                                             FINETUNE_EVAL_STEPS="6", FINETUNE_SAVE_STEPS="6",
                                             FINETUNE_BATCH_SIZE="3"))
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data_format"] == "instruction" and metrics["isolate_documents"] is True
    assert 0 < metrics["target_tokens"] < metrics["train_tokens"] // 2  # prompts carry no loss
    done = [line for line in (result.stdout + result.stderr).splitlines() if "done:" in line]
    assert done and "on instruction data" in done[-1]
    assert "on instruction data" in (out / "model" / "README.md").read_text()
    # The eval loss is the mean over the validation set's target tokens, prompts excluded.
    cache = next((out / "cache").glob("blocks-*"))
    valid = pipeline.load(DataOptions.of(TrainConfig(data_dir=directory, output_dir=out)), cache, 0.0, True)[1]
    assert math.isclose(metrics["eval_loss"], eval_loss_over_targets(out / "model", valid), rel_tol=1e-4)


def test_finetune_train_on_chat_records_with_a_llama_model_and_its_own_template(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    model_dir = save_tiny_model("llama", saved_tokenizer(llama_style(AutoTokenizer.from_pretrained(tiny_model),
                                                                     CHATML), tmp_path / "tok"), tmp_path / "llama")
    directory, out = split_dir(tmp_path, CHATS), tmp_path / "out"
    result = finetune("train", env=train_env(model_dir, directory, out, FINETUNE_MAX_STEPS="4",
                                             FINETUNE_EVAL_STEPS="4", FINETUNE_SAVE_STEPS="4",
                                             FINETUNE_BLOCK_SIZE="64"))
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data_format"] == "chat" and 0 < metrics["target_tokens"] < metrics["train_tokens"] // 2
    # The cache training read: Llama's BOS starts every conversation; only assistant turns carry loss.
    tok = AutoTokenizer.from_pretrained(out / "model")
    opts = DataOptions.of(TrainConfig(data_dir=directory, output_dir=out))
    train = pipeline.load(opts, next((out / "cache").glob("blocks-*")), 0.0, True)[0]
    ids, labels = expected_stream(tok, CHATS[:-6], CHAT)
    batch = collated(train)
    assert batch["input_ids"].flatten().tolist() == ids[:len(train) * 64] and ids[0] == tok.bos_token_id
    assert batch["labels"].flatten().tolist() == labels[:len(train) * 64]
    assert "<|im_start|>user" not in tok.decode(batch["input_ids"][batch["labels"] != IGNORE])


def test_plain_text_metrics_count_every_predicted_token_as_a_target(tiny_model, data_dir, tmp_path):
    out = tmp_path / "out"
    result = finetune("train", env=train_env(tiny_model, data_dir, out, FINETUNE_MAX_STEPS="2",
                                             FINETUNE_EVAL_STEPS="2", FINETUNE_SAVE_STEPS="2"))
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["train_tokens"] // 32  # packed 32-token blocks; a row's first token is never predicted
    assert metrics["data_format"] == "text" and metrics["target_tokens"] == metrics["train_tokens"] - rows


def test_an_architecture_that_cannot_isolate_documents_is_refused_before_loading(tiny_model, tmp_path):
    model_dir = save_tiny_model("opt", tiny_model, tmp_path / "opt")
    out = tmp_path / "out"
    result = finetune("train", env=train_env(model_dir, split_dir(tmp_path, PROMPTS), out))
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "--no-isolate-documents" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr and not (out / "model").exists()


def test_text_records_are_still_text(tokenizer, tmp_path):
    records = [{"text": f"A plain record {i}.", "prompt": f"only a prompt {i}"} for i in range(60)]
    directory = tmp_path / "data"
    write_records(directory, "train", records, "jsonl")
    _, _, stats = prepare(tokenizer, directory)
    assert stats.data_format == "text" and formats.detect(["text", "prompt"]) == TEXT


def test_chat_records_in_a_csv_file_are_refused_in_one_line(tokenizer, tmp_path):
    directory = tmp_path / "data"
    write_records(directory, "train", [{"messages": json.dumps(c["messages"])} for c in CHATS], "csv")
    with pytest.raises(DataError) as raised:
        prepare(tokenizer, directory)
    assert "is not a non-empty list of messages" in str(raised.value) and "\n" not in str(raised.value)
    assert not list((directory.parent / "out" / "cache").glob(f"*/{pipeline.COMPLETE}"))


# Alpaca and ShareGPT records and pretokenized rows (records.py): converted, then the same pipeline as above.

def test_alpaca_layout_joins_system_instruction_and_input_by_blank_lines_and_ends_the_prompt_with_a_newline():
    assert records.alpaca({"instruction": "Add 2 and 3.", "input": "", "output": "5"}) == {"prompt": "Add 2 and 3.\n",
                                                                                         "completion": "5"}
    full = {"system": "Be exact.", "instruction": "Add.", "input": "2 3", "output": "5"}
    assert records.alpaca(full) == {"prompt": "Be exact.\n\nAdd.\n\n2 3\n", "completion": "5"}


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_alpaca_records_train_as_their_prompt_completion_rendering_with_loss_on_the_output(tokenizer, tmp_path, kind):
    train, _, stats = prepare(tokenizer, split_dir(tmp_path, samples.ALPACA, kind))
    assert stats.data_format == "instruction" and stats.isolated
    ids, labels = expected_stream(tokenizer, [records.alpaca(r) for r in samples.ALPACA[:-6]], INSTRUCTION)
    batch = collated(train)
    assert batch["input_ids"].flatten().tolist() == ids[:len(train) * BLOCK]
    assert batch["labels"].flatten().tolist() == labels[:len(train) * BLOCK]
    said = tokenizer.decode(batch["input_ids"][batch["labels"] != IGNORE])
    assert "The number 1 does." in said and "Which" not in said and "Counting" not in said


def test_alpaca_records_with_train_on_prompt_carry_loss_on_the_prompt_too(tokenizer, tmp_path):
    train, _, stats = prepare(tokenizer, split_dir(tmp_path, samples.ALPACA), train_on_prompt=True)
    _, labels = expected_stream(tokenizer, [records.alpaca(r) for r in samples.ALPACA[:-6]], INSTRUCTION, True)
    assert collated(train)["labels"].flatten().tolist() == labels[:len(train) * BLOCK]
    assert stats.train_target_tokens == stats.train_tokens + stats.dropped_tokens - (len(samples.ALPACA) - 6)


def test_sharegpt_roles_map_to_chat_roles_and_role_content_turns_are_taken_too():
    turns = [("system", "Be brief."), ("human", "Weather?"), ("function_call", '{"name": "weather"}'),
             ("observation", "Sunny."), ("gpt", "Sunny."), ("user", "Thanks."), ("assistant", "Welcome.")]
    converted = records.sharegpt({"conversations": [{"from": f, "value": v} for f, v in turns]})["messages"]
    assert [m["role"] for m in converted] == ["system", "user", "assistant", "tool", "assistant", "user", "assistant"]
    assert [m["content"] for m in converted] == [v for _, v in turns]
    as_chat = records.sharegpt({"conversations": [{"role": "user", "content": "Hi"}, {"role": "gpt", "content": "Yo"}]})
    assert as_chat == {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_sharegpt_records_train_as_chat_with_loss_on_assistant_turns_only(tokenizer, tmp_path, kind):
    train, _, stats = prepare(tokenizer, split_dir(tmp_path, samples.SHAREGPT, kind), block_size=64)
    assert stats.data_format == "chat"
    ids, labels = expected_stream(tokenizer, [records.sharegpt(r) for r in samples.SHAREGPT[:-6]], CHAT)
    batch = collated(train)
    assert batch["input_ids"].flatten().tolist() == ids[:len(train) * 64]
    assert batch["labels"].flatten().tolist() == labels[:len(train) * 64]
    said = tokenizer.decode(batch["input_ids"][batch["labels"] != IGNORE])
    assert "Hello said 0 times." in said and "Be brief" not in said and "Again" not in said


@pytest.mark.parametrize("name", list(samples.BAD))
def test_a_bad_record_stops_preparation_in_one_line_naming_the_file(tokenizer, tmp_path, name):
    path = samples.write_records(tmp_path / "data", "train", samples.bad_records(name), "jsonl")
    with pytest.raises(DataError) as raised:
        prepare(tokenizer, tmp_path / "data")
    message = str(raised.value)
    assert str(path) in message and "\n" not in message
    if name != "alpaca-list-input":  # datasets' JSON reader refuses a column changing type before any record is read
        assert all(word in message for word in samples.BAD[name][2]), message
    assert not list((tmp_path / "out" / "cache").glob(f"*/{pipeline.COMPLETE}"))


def pretokenized_stream(rows: list[dict]) -> tuple[list[int], list[int]]:
    """The rows' ids without padding, and labels with each row's first token carrying no loss."""
    ids, labels = [], []
    for row in rows:
        keep = [i for i, m in enumerate(row["attention_mask"]) if m]
        ids += [row["input_ids"][i] for i in keep]
        labels += [IGNORE] + [row["labels"][i] for i in keep[1:]]
    return ids, labels


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_pretokenized_rows_are_taken_as_they_are_without_padding_and_with_their_labels(tokenizer, tmp_path, kind):
    rows = samples.pretokenized(tokenizer)
    # A Llama-style tokenizer would add BOS to text: not to rows that are already tokens.
    train, _, stats = prepare(llama_style(tokenizer), split_dir(tmp_path, rows, kind))
    assert stats.data_format == "pretokenized" and stats.isolated
    ids, labels = pretokenized_stream(rows[:-6])
    batch = collated(train)
    assert batch["input_ids"].flatten().tolist() == ids[:len(train) * BLOCK]
    assert batch["labels"].flatten().tolist() == labels[:len(train) * BLOCK]
    said = tokenizer.decode(batch["input_ids"][batch["labels"] != IGNORE])
    assert "Page 1." in said and "Which" not in said
    assert stats.train_tokens + stats.dropped_tokens == len(ids)


def test_pretokenized_ids_are_checked_against_the_models_vocabulary(tokenizer, tmp_path):
    directory = split_dir(tmp_path, samples.pretokenized(tokenizer))
    cfg = TrainConfig(data_dir=directory, output_dir=tmp_path / "out", preprocessing_workers=1)
    with pytest.raises(DataError, match="outside the model's vocabulary of 100 ids"):
        pipeline.prepare(DataOptions.of(cfg, vocab_size=100), tokenizer, BLOCK)
    assert pipeline.prepare(DataOptions.of(cfg, vocab_size=len(tokenizer)), tokenizer, BLOCK)[2].train_rows > 0


def test_a_folder_mixing_formats_lists_which_file_is_which(tokenizer, tmp_path):
    directory = tmp_path / "data"
    samples.write_records(directory, "alpaca", samples.ALPACA, "jsonl")
    samples.write_records(directory, "chats", samples.SHAREGPT, "parquet")
    (directory / "notes.txt").write_text("A line of text.\n")
    with pytest.raises(DataError) as raised:
        prepare(tokenizer, directory)
    message = str(raised.value)
    assert "alpaca.jsonl: alpaca; chats.parquet: sharegpt; notes.txt: text" in message and "--train-file" in message


def test_the_cache_key_changes_with_the_rendering_of_converted_records(tokenizer, tmp_path, monkeypatch):
    directory = split_dir(tmp_path, samples.ALPACA)
    opts = DataOptions.of(TrainConfig(data_dir=directory, output_dir=tmp_path / "out"), vocab_size=512)
    train, valid = discover(opts)
    before = cache.cache_key(opts, tokenizer, train, valid, BLOCK)
    monkeypatch.setattr(records, "RENDERING", records.RENDERING + "+changed")
    assert cache.cache_key(opts, tokenizer, train, valid, BLOCK) != before


def test_a_record_the_tokenizer_refuses_is_named_by_its_number(tokenizer, tmp_path):
    no_system = llama_style(tokenizer, "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception("
                                       "'no system turns') }}{% endif %}{{ m['content'] }}{% endfor %}")
    records = [{"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Yo."}]}] * 4
    records[2] = {"messages": [{"role": "system", "content": "Be brief."}, *records[0]["messages"]]}
    with pytest.raises(DataError) as raised:
        prepare(no_system, split_dir(tmp_path, records * 10, valid=4))
    assert str(raised.value).startswith("record 3 of the training data: the chat template rejects this conversation")


def test_pretokenized_rows_are_cached_by_the_vocabulary_not_the_tokenizer(tokenizer, tmp_path):
    directory = split_dir(tmp_path, samples.pretokenized(tokenizer))
    cfg = TrainConfig(data_dir=directory, output_dir=tmp_path / "out", preprocessing_workers=1)
    first, _, stats = pipeline.prepare(DataOptions.of(cfg, vocab_size=600), tokenizer, BLOCK)
    # Another tokenizer with the same vocabulary size: the rows are the same, so the cache is.
    again, _, hit = pipeline.prepare(DataOptions.of(cfg, vocab_size=600), llama_style(tokenizer), BLOCK)
    assert hit.cache_hit and hit.fingerprint == stats.fingerprint
    assert collated(again)["input_ids"].tolist() == collated(first)["input_ids"].tolist()
    assert not pipeline.prepare(DataOptions.of(cfg, vocab_size=700), tokenizer, BLOCK)[2].cache_hit
