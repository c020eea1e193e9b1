"""Prompts to sample from (--sample-prompts): read and checked before anything loads, tokenized as `generate` does.

A file ending in .jsonl holds one JSON value per line: a string (a plain prompt), {"prompt": "..."}, or a chat
record {"messages": [{"role": ..., "content": ...}, ...]} rendered through the model's chat template (finetune's
default when it has none) with the assistant's header opened, exactly as chat training renders the turns before an
answer. Any other file is text, one prompt per non-blank line. Every problem is a DataError (exit 3), as for
--corpus: the file is an input, like the training data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from entrypoint.data import formats
from entrypoint.errors import DataError

MAX_PROMPTS = 64  # samples are for reading in a log: more would only stall training at every evaluation


@dataclass(frozen=True)
class Prompt:
    """One prompt: plain text, or a conversation (`messages`) that the chat template renders."""

    text: str = ""
    messages: tuple[dict, ...] = ()

    def shown(self) -> str | list[dict]:
        """What samples.jsonl and the card show as the prompt: the text, or the messages."""
        return [dict(m) for m in self.messages] if self.messages else self.text

    def label(self) -> str:
        """One line for the log: the text, or the last message's content."""
        return self.messages[-1]["content"] if self.messages else self.text


def read(path: Path, option: str = "--sample-prompts") -> list[Prompt]:
    """The prompts in `path`; raises a DataError naming the file, the line and the fix."""
    fix = "give a text file of one prompt per line, or .jsonl of prompts or chat messages"
    if not path.is_file():
        raise DataError(f"{option} {path} {'is not a file' if path.exists() else 'does not exist'}; {fix}.")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{option} {path} is not UTF-8 (byte {exc.start}); convert it, e.g. with iconv -t utf-8.") \
            from None
    except OSError as exc:
        raise DataError(f"{option} {path} cannot be read ({exc.strerror}); {fix}.") from None
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    prompts = [_record(path, n, line, option) if path.suffix == ".jsonl" else Prompt(text=line)
               for n, line in numbered]
    if not prompts:
        raise DataError(f"{option} {path} holds no prompt; {fix}.")
    if len(prompts) > MAX_PROMPTS:
        raise DataError(f"{option} {path} holds {len(prompts)} prompts; keep at most {MAX_PROMPTS} (each one is "
                        "generated at every evaluation).")
    return prompts


def _record(path: Path, n: int, line: str, option: str) -> Prompt:
    where = f"{option} {path} line {n}"
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where} is not JSON ({exc.msg}); write one JSON value per line.") from None
    if isinstance(value, dict) and isinstance(value.get("prompt"), str) and value["prompt"]:
        value = value["prompt"]
    if isinstance(value, str) and value:
        return Prompt(text=value)
    messages = value.get("messages") if isinstance(value, dict) else None
    if isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        return Prompt(messages=tuple({"role": m["role"], "content": m["content"]} for m in messages))
    raise DataError(f'{where} is neither a non-empty string, {{"prompt": "..."}} nor {{"messages": [{{"role": ..., '
                    '"content": ...}, ...]}; fix the line.')


def token_ids(tokenizer, prompt: Prompt) -> list[int]:
    """The prompt's token ids: plain text as the tokenizer encodes it (its BOS included), or the chat render."""
    if prompt.messages:
        return chat_ids(tokenizer, list(prompt.messages))
    return tokenizer(prompt.text)["input_ids"]


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """A conversation rendered and tokenized exactly as chat training renders the turns before an answer."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=formats.chat_template(tokenizer),
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = formats.convention(tokenizer).bos_id
    return [bos, *ids] if bos is not None and ids[:1] != [bos] else ids


def check_fit(lengths: list[int], max_new_tokens: int, context: int, path: Path) -> None:
    """A DataError when a prompt (of `lengths` tokens, in file order) plus the tokens to generate exceeds the
    model's context."""
    for n, length in enumerate(lengths, 1):
        if length + max_new_tokens > context:
            raise DataError(f"--sample-prompts {path}: prompt {n} is {length} tokens, which with "
                            f"--sample-max-new-tokens {max_new_tokens} exceeds the model's {context}-token context; "
                            "shorten the prompt or lower --sample-max-new-tokens.")
