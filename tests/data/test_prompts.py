"""--sample-prompts files: what they may hold, how each kind of prompt is tokenized, and the one-line errors."""

from __future__ import annotations

import json

import pytest

from entrypoint.data import formats, prompts
from entrypoint.data.formats import CHAT, IGNORE
from entrypoint.errors import DataError, ExitCode


def test_a_text_file_holds_one_prompt_per_non_blank_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("Once upon a time\n\n  \nThe function returns\n", encoding="utf-8")
    assert [p.text for p in prompts.read(path)] == ["Once upon a time", "The function returns"]


def test_jsonl_holds_strings_prompt_records_and_chat_messages(tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(v) for v in ["Plain", {"prompt": "Field"}, {"messages": chat}]) + "\n")
    read = prompts.read(path)
    assert [p.shown() for p in read] == ["Plain", "Field", chat]
    assert read[2].label() == "What is a list?"


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("missing.txt", None, "does not exist"),
    ("empty.txt", "\n \n", "holds no prompt"),
    ("bad.jsonl", '"fine"\n{"prompt": 3}\n', "line 2 is neither"),
    ("broken.jsonl", '{"prompt": \n', "line 1 is not JSON"),
    ("latin1.txt", b"caf\xe9\n", "is not UTF-8"),
])
def test_an_unusable_prompt_file_is_a_data_error_naming_the_file_and_the_fix(tmp_path, name, content, expected):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as caught:
        prompts.read(path)
    assert caught.value.code == ExitCode.DATA
    assert len(caught.value.problems) == 1 and str(path) in str(caught.value) and expected in str(caught.value)


def test_a_chat_prompt_is_what_chat_training_conditions_an_answer_on(tokenizer):
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
    encoded = formats.encode({"messages": conversation}, CHAT, tokenizer, formats.convention(tokenizer))
    first_target = next(i for i, label in enumerate(encoded.labels) if label != IGNORE)
    prompt = prompts.Prompt(messages=tuple(conversation[:1]))
    assert prompts.token_ids(tokenizer, prompt) == encoded.ids[:first_target]


def test_a_prompt_that_leaves_no_room_to_generate_is_refused_with_the_numbers(tmp_path):
    prompts.check_fit([10, 60], 60, 128, tmp_path / "p.txt")
    with pytest.raises(DataError, match=r"prompt 2 is 70 tokens, which with --sample-max-new-tokens 60 exceeds the "
                                        r"model's 128-token context"):
        prompts.check_fit([10, 70], 60, 128, tmp_path / "p.txt")
