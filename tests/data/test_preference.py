"""entrypoint/data/preference.py: preference records checked, converted and tokenized into the token cache as
chosen/rejected row pairs; the bad-input matrix (empty answer, identical answers, a prompt leaving no room) fails
naming file, line and fix. Real files, the real tiny tokenizer (conftest), block sizes of 32-64 tokens."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from entrypoint.config.schema import TrainConfig
from entrypoint.data import cache, formats, pipeline, preference
from entrypoint.data.collate import PaddingCollator, PairCollator
from entrypoint.data.formats import Fields
from entrypoint.data.options import DataOptions
from entrypoint.data.sources import discover
from entrypoint.errors import DataError

PAIRS = [{"prompt": f"def f{i}(x):\n", "chosen": f"Return {i} plus x.", "rejected": f"Open file number {i}."}
         for i in range(24)]
CHAT = {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"}],
        "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]}
RENAMED = Fields(prompt="question", chosen="good", rejected="bad")
RENAMED_OPTIONS = {"prompt_field": "question", "chosen_field": "good", "rejected_field": "bad"}


def renamed(record: dict) -> dict:
    """`record` with its prompt, chosen and rejected fields called question, good and bad."""
    names = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    return {names.get(key, key): value for key, value in record.items()}


def write(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def prepare(tokenizer, data_dir: Path, output_dir: Path, block_size: int = 64, **options):
    cfg = TrainConfig(data_dir=data_dir, output_dir=output_dir, preprocessing_workers=1, **options)
    return pipeline.prepare(DataOptions.of(cfg), tokenizer, block_size)


def test_preference_records_are_detected_by_chosen_and_rejected():
    assert formats.detect({"prompt", "chosen", "rejected"}) == formats.PREFERENCE
    assert formats.detect({"chosen", "rejected"}) == formats.PREFERENCE


def test_renamed_preference_fields_are_detected_and_the_defaults_then_are_not():
    assert formats.detect({"question", "good", "bad"}, RENAMED) == formats.PREFERENCE
    assert formats.detect({"good", "bad"}, RENAMED) == formats.PREFERENCE
    assert formats.detect({"prompt", "chosen", "rejected", "text"}, RENAMED) == formats.TEXT


@pytest.mark.parametrize(("keys", "fields", "says"), [
    ({"question", "better", "worse"}, Fields(), "records look like preference records with answers in 'better' and "
     "'worse' (fields: better, question, worse); use --prompt-field question --chosen-field better --rejected-field "
     "worse."),
    ({"prompt", "preferred", "rejected"}, Fields(), "; use --chosen-field preferred --rejected-field rejected."),
    ({"prompt", "chosen"}, Fields(), "hold one answer only, in 'chosen' (fields: chosen, prompt); add the rejected "
                                     "answer, or name both answers' fields with --chosen-field and --rejected-field"),
    ({"question", "bad"}, RENAMED, "hold one answer only, in 'bad'"),
])
def test_preference_like_fields_get_a_hint_naming_the_options(keys, fields, says):
    with pytest.raises(DataError, match=re.escape(says)):
        formats.detect(keys, fields)


@pytest.mark.parametrize("record", [PAIRS[0], CHAT, {"prompt": [{"role": "user", "content": "Hi"}],
                                                     "chosen": [{"role": "assistant", "content": "Hello."}],
                                                     "rejected": [{"role": "assistant", "content": "No."}]}],
                         ids=["text", "chat-shared-prefix", "chat-prompt-list"])
def test_renamed_fields_convert_to_the_same_canonical_row_as_the_defaults(record):
    assert preference.pair(renamed(record), RENAMED) == preference.pair(record, Fields())


def test_pairs_become_chosen_then_rejected_rows_with_loss_on_the_answer_only(tokenizer, tmp_path):
    write(tmp_path / "data" / "train.jsonl", PAIRS[:20])
    write(tmp_path / "data" / "valid.jsonl", PAIRS[20:])
    train, valid, stats = prepare(tokenizer, tmp_path / "data", tmp_path / "out")
    assert (len(train), len(valid), stats.data_format) == (20, 4, "preference")
    item = train[3]
    for side in ("chosen", "rejected"):
        row = item[side]
        answer = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
        expected = tokenizer(PAIRS[3][side], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert answer == expected
        assert tokenizer.decode(row["input_ids"]).startswith(PAIRS[3]["prompt"])
    batch = PairCollator(PaddingCollator(tokenizer.eos_token_id, 64))([train[0], train[1]])
    assert batch["input_ids"].shape[0] == 4  # chosen 0, chosen 1, rejected 0, rejected 1
    assert torch.equal(batch["input_ids"][2, :len(train[0]["rejected"]["input_ids"])],
                       torch.as_tensor(train[0]["rejected"]["input_ids"]))


def test_held_out_pairs_stay_whole_and_a_capped_evaluation_keeps_pairs(tokenizer, tmp_path):
    write(tmp_path / "data" / "train.jsonl", PAIRS)
    train, valid, _ = prepare(tokenizer, tmp_path / "data", tmp_path / "out", validation_split=20)
    assert len(train) + len(valid) == len(PAIRS) and len(valid) > 0
    seen = [tokenizer.decode(item["chosen"]["input_ids"]) for item in [*train, *valid]]
    for item in [*train, *valid]:  # the rejected row belongs to the same prompt as the chosen one
        chosen, rejected = (tokenizer.decode(item[s]["input_ids"]) for s in ("chosen", "rejected"))
        assert chosen.split("\n")[0] == rejected.split("\n")[0]
    assert len(set(seen)) == len(PAIRS)
    capped = valid.capped(valid.tokens() // 2)
    assert 0 < len(capped) < len(valid)
    assert all(c["chosen"]["input_ids"][:5].tolist() == c["rejected"]["input_ids"][:5].tolist() for c in capped)


def test_chat_pairs_train_only_the_answers_after_the_shared_prefix(tokenizer):
    conv = formats.convention(tokenizer)
    multi = {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes?"},
                        {"role": "user", "content": "Help me"}],
             "chosen": [{"role": "assistant", "content": "Sure, gladly."}],
             "rejected": [{"role": "assistant", "content": "No."}]}
    for record, answers in ((CHAT, ("Hello, how can I help?", "Go away.")), (multi, ("Sure, gladly.", "No."))):
        chosen, rejected, cut = preference.encode(preference.pair(record, Fields()), tokenizer, conv, 128)
        assert not cut
        for doc, answer in ((chosen, answers[0]), (rejected, answers[1])):
            learnt = tokenizer.decode([t for t, label in zip(doc.ids, doc.labels, strict=True) if label != -100])
            assert learnt.strip() == answer + tokenizer.eos_token


def test_a_long_answer_is_cut_to_the_block_keeping_the_prompt(tokenizer):
    conv = formats.convention(tokenizer)
    record = preference.pair({"prompt": "Say:\n", "chosen": "word " * 100, "rejected": "no"}, Fields())
    chosen, rejected, cut = preference.encode(record, tokenizer, conv, 32)
    assert cut and len(chosen.ids) == 32 and len(rejected.ids) < 32
    assert tokenizer.decode(chosen.ids).startswith("Say:\n")


BAD_PAIRS = [
    ({"prompt": "p\n", "chosen": "  ", "rejected": "no"}, "the answer in 'chosen' is empty; write the answer"),
    ({"prompt": "p\n", "chosen": "yes", "rejected": ""}, "the answer in 'rejected' is empty"),
    ({"prompt": "p\n", "chosen": "same", "rejected": "same"},
     "the answers in 'chosen' and 'rejected' are the same text"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "field 'prompt' is int, not a string"),
    ({"prompt": "p\n", "chosen": "a", "rejected": 7},
     "field 'rejected' is int, not a string; write text there (or message lists in both 'chosen' and 'rejected')"),
    ({**CHAT, "rejected": CHAT["chosen"]}, "the answers in 'chosen' and 'rejected' are the same, so"),
    ({"chosen": [{"role": "user", "content": "Hi"}], "rejected": CHAT["rejected"]},
     "the conversation in 'chosen' has no assistant turn after the shared prompt"),
    ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     "the conversation has no prompt (no turn before the answers); add the user's turn in 'prompt'"),
    ({"chosen": CHAT["chosen"], "rejected": "no"}, "field 'rejected' is not a non-empty list of messages"),
]


@pytest.mark.parametrize(("record", "problem"), BAD_PAIRS)
def test_bad_pairs_name_the_problem_and_the_fix(record, problem):
    with pytest.raises(DataError, match=re.escape(problem)):
        preference.pair(record, Fields())


@pytest.mark.parametrize(("record", "problem"), BAD_PAIRS)
def test_bad_pairs_with_renamed_fields_name_the_fields_as_the_records_call_them(record, problem):
    for default, name in (("'prompt'", "'question'"), ("'chosen'", "'good'"), ("'rejected'", "'bad'")):
        problem = problem.replace(default, name)
    with pytest.raises(DataError, match=re.escape(problem)):
        preference.pair(renamed(record), RENAMED)


@pytest.mark.parametrize(("bad", "problem"), [
    ({"prompt": "p\n", "chosen": "", "rejected": "no"}, "the answer in 'chosen' is empty; write the answer or remove"),
    ({"prompt": "p\n", "chosen": "same", "rejected": "same"},
     "the answers in 'chosen' and 'rejected' are the same text, so nothing is preferred; give a "),
])
def test_a_bad_record_in_a_file_is_named_by_file_and_line(tokenizer, tmp_path, bad, problem):
    path = write(tmp_path / "data" / "train.jsonl", [*PAIRS[:6], bad, *PAIRS[6:]])
    with pytest.raises(DataError, match=f"{path} line 7: {problem}"):
        prepare(tokenizer, tmp_path / "data", tmp_path / "out")


def test_a_prompt_leaving_no_room_for_the_answer_is_an_error_naming_the_fix(tokenizer, tmp_path):
    long = {"prompt": "word " * 80 + "\n", "chosen": "a", "rejected": "b"}
    write(tmp_path / "data" / "train.jsonl", [*PAIRS[:4], long, *PAIRS[4:]])
    with pytest.raises(DataError, match=r"record 5 of the training data: the prompt takes \d+ tokens, leaving no room "
                                        r"for the answer within --block-size 32; shorten the prompt or raise"):
        prepare(tokenizer, tmp_path / "data", tmp_path / "out", block_size=32)


def test_pairs_with_an_answer_cut_to_the_block_are_counted(tokenizer, tmp_path):
    long = {"prompt": "Say:\n", "chosen": "word " * 60, "rejected": "no"}
    write(tmp_path / "data" / "train.jsonl", [*PAIRS[:20], long])
    write(tmp_path / "data" / "valid.jsonl", PAIRS[20:])
    train, _, stats = prepare(tokenizer, tmp_path / "data", tmp_path / "out", block_size=32)
    assert stats.cut_pairs == 1 and len(train) == 21
    assert max(len(item["chosen"]["input_ids"]) for item in train) == 32


def test_renamed_fields_in_a_file_prepare_the_same_rows_and_a_bad_record_names_them(tokenizer, tmp_path):
    write(tmp_path / "plain" / "train.jsonl", PAIRS[:20])
    write(tmp_path / "plain" / "valid.jsonl", PAIRS[20:])
    write(tmp_path / "data" / "train.jsonl", [renamed(r) for r in PAIRS[:20]])
    path = write(tmp_path / "data" / "valid.jsonl", [renamed(r) for r in PAIRS[20:]])
    expected, _, _ = prepare(tokenizer, tmp_path / "plain", tmp_path / "out-plain")
    train, valid, stats = prepare(tokenizer, tmp_path / "data", tmp_path / "out", **RENAMED_OPTIONS)
    assert (len(train), len(valid), stats.data_format) == (20, 4, "preference")
    for side in ("chosen", "rejected"):
        assert [item[side]["input_ids"].tolist() for item in train] == \
            [item[side]["input_ids"].tolist() for item in expected]
    write(path, [*map(renamed, PAIRS[20:22]), {"question": "p\n", "good": "", "bad": "no"}])
    with pytest.raises(DataError, match=re.escape(f"{path} line 3: the answer in 'good' is empty")):
        prepare(tokenizer, tmp_path / "data", tmp_path / "out", **RENAMED_OPTIONS)


def test_the_cache_key_changes_with_the_answer_fields_and_not_at_their_defaults(tokenizer, tmp_path):
    write(tmp_path / "data" / "train.jsonl", PAIRS)

    def key(**options):
        opts = DataOptions.of(TrainConfig(data_dir=tmp_path / "data", output_dir=tmp_path / "out", **options))
        return cache.cache_key(opts, tokenizer, *discover(opts), 64)

    plain = key()
    assert key(chosen_field="chosen", rejected_field="rejected") == plain
    assert len({plain, key(chosen_field="good"), key(rejected_field="bad")}) == 3
