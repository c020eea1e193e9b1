"""Preference pairs for DPO: a prompt, the answer preferred (`chosen`) and the answer not (`rejected`).

Two layouts (docs/data.md shows each), under the default field names (--prompt-field, --chosen-field and
--rejected-field rename them; errors name the fields as the records call them):
- text: `{"prompt": "...", "chosen": "...", "rejected": "..."}`, each pair trained as two instruction records,
  prompt + chosen and prompt + rejected (the prompt's separator at its end, as for prompt/completion records);
- chat: `chosen` and `rejected` are message lists. The conversation they share (a `prompt` message list, or a
  string taken as the user's turn, or, without a prompt, the messages the two lists begin with in common) is the
  context; the assistant turns after it are the answers.

`pair` checks a record and converts it to one canonical row (records.convert writes them, so a bad record is named
by file and line); `encode` tokenizes a canonical row into its two documents, each a sequence of at most
`block_size` tokens with loss on the answer only. An answer that does not fit is cut at the block's end (the
prompt's start is kept, as at inference); a prompt that leaves no room for one answer token is an error.
"""

from __future__ import annotations

from collections.abc import Mapping

from entrypoint.data import formats
from entrypoint.data.formats import IGNORE, Convention, Encoded, Fields
from entrypoint.errors import DataError

FIX_SAME = "give a different rejected answer or remove the record"


def pair(record: Mapping, fields: Fields) -> dict:
    """A preference record (its fields named by `fields`: prompt, chosen, rejected) as {prompt, chosen, rejected}
    strings (text layout) plus {prefix, chosen_turns, rejected_turns} message lists (chat layout); the other
    layout's fields are empty."""
    chosen, rejected = record.get(fields.chosen), record.get(fields.rejected)
    prompt = record.get(fields.prompt)
    if isinstance(chosen, list) or isinstance(rejected, list):
        return _chat_pair(prompt, chosen, rejected, fields)
    prompt = "" if prompt is None else prompt
    for name, value in ((fields.prompt, prompt), (fields.chosen, chosen), (fields.rejected, rejected)):
        if not isinstance(value, str):
            raise DataError(f"field {name!r} is {type(value).__name__}, not a string; write text there (or message "
                            f"lists in both {fields.chosen!r} and {fields.rejected!r}).")
    for name, value in ((fields.chosen, chosen), (fields.rejected, rejected)):
        if not value.strip():
            raise DataError(_empty(name))
    if chosen == rejected:
        raise DataError(f"the answers in {fields.chosen!r} and {fields.rejected!r} are the same text, so nothing is "
                        f"preferred; {FIX_SAME}.")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "prefix": [], "chosen_turns": [],
            "rejected_turns": []}


def _chat_pair(prompt, chosen, rejected, fields: Fields) -> dict:
    chosen, rejected = _messages(chosen, fields.chosen, fields), _messages(rejected, fields.rejected, fields)
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}] if prompt.strip() else []
    prefix = [] if prompt is None else _messages(prompt, fields.prompt, fields, allow_empty=True)
    # The answers may repeat the prompt (as many published sets do) or follow it.
    if prefix and chosen[:len(prefix)] != prefix:
        chosen = prefix + chosen
    if prefix and rejected[:len(prefix)] != prefix:
        rejected = prefix + rejected
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    shared = max(len(prefix), min(shared, _last_context(chosen), _last_context(rejected)))
    answers = ((fields.chosen, chosen[shared:]), (fields.rejected, rejected[shared:]))
    for name, turns in answers:
        if not turns:
            raise DataError(f"the conversation in {name!r} has no assistant turn after the shared prompt; end it with "
                            "the answer or remove the record.")
        if any(turn["role"] != "assistant" for turn in turns):
            raise DataError(f"the answer in {name!r} holds a {turns[0]['role']} turn after the shared prompt; put "
                            f"every turn but the assistant's answers in the prompt ({fields.prompt!r}).")
        if not any(turn["content"].strip() for turn in turns):
            raise DataError(_empty(name))
    (_, chosen_turns), (_, rejected_turns) = answers
    if chosen_turns == rejected_turns:
        raise DataError(f"the answers in {fields.chosen!r} and {fields.rejected!r} are the same, so nothing is "
                        f"preferred; {FIX_SAME}.")
    if not chosen[:shared]:
        raise DataError(f"the conversation has no prompt (no turn before the answers); add the user's turn in "
                        f"{fields.prompt!r}.")
    return {"prompt": "", "chosen": "", "rejected": "", "prefix": chosen[:shared], "chosen_turns": chosen_turns,
            "rejected_turns": rejected_turns}


def _empty(name: str) -> str:
    return f"the answer in {name!r} is empty; write the answer or remove the record."


def _last_context(messages: list[dict]) -> int:
    """How many messages come before the trailing run of assistant turns (the most the shared prompt can hold)."""
    end = len(messages)
    while end and messages[end - 1]["role"] == "assistant":
        end -= 1
    return end


def _messages(value, name: str, fields: Fields, allow_empty: bool = False) -> list[dict]:
    example = (f'[{{"role": "assistant", "content": "..."}}] (or text in {fields.prompt!r}, {fields.chosen!r} and '
               f'{fields.rejected!r})')
    return formats.checked_messages(value, name, example, allow_empty)


def encode(row: Mapping, tokenizer, conv: Convention, block_size: int) -> tuple[Encoded, Encoded, bool]:
    """A canonical row (`pair`) as (chosen, rejected) documents of at most `block_size` tokens, loss on the answer
    only, and whether either answer was cut to fit."""
    docs = []
    for side in ("chosen", "rejected"):
        if row["prefix"]:
            docs.append(_chat(row["prefix"], row[f"{side}_turns"], tokenizer, conv))
        else:
            docs.append(formats.encode({"prompt": row["prompt"], "completion": row[side]}, formats.INSTRUCTION,
                                       tokenizer, conv))
    cut = [_fit(doc, block_size) for doc in docs]
    return cut[0][0], cut[1][0], cut[0][1] or cut[1][1]


def _chat(prefix: list[dict], answer: list[dict], tokenizer, conv: Convention) -> Encoded:
    """The conversation with loss on the answer's assistant turns only, not on assistant turns of the prompt."""
    segments = formats.chat_segments(prefix + answer, tokenizer)
    # The prompt's own assistant turns are the first targets (chat_segments checked the template renders the
    # prompt alike with or without the answers after it); the rest are the answer's.
    before = sum(target for _, target in formats.chat_segments(prefix, tokenizer))
    targets = [i for i, (_, target) in enumerate(segments) if target][before:]
    segments = [(text, i in targets) for i, (text, _) in enumerate(segments)]
    return formats.encode_segments(segments, tokenizer, conv, eos_is_target=True)


def _fit(doc: Encoded, block_size: int) -> tuple[Encoded, bool]:
    if len(doc.ids) <= block_size:
        return doc, False
    prompt = next((i for i, label in enumerate(doc.labels) if label != IGNORE), len(doc.ids))
    if prompt >= block_size:
        raise DataError(f"the prompt takes {prompt} tokens, leaving no room for the answer within --block-size "
                        f"{block_size}; shorten the prompt or raise --block-size.")
    return Encoded(doc.ids[:block_size], doc.labels[:block_size]), True
