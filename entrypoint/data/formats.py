"""Records -> token ids and labels: plain text, prompt/completion pairs, chat transcripts and pretokenized rows.

Pure functions, no I/O: the data pipeline reads records, calls `detect` once per input and `encode` per record,
then `pack` cuts the encoded documents into training blocks.

Conventions, per the tokenizer:
- BOS starts every document where the tokenizer's own post-processing adds one (Llama-style); EOS ends every
  document; neither is ever doubled (a chat template that already writes them is left alone).
- labels are -100 where a token carries no loss: the first token of every document (nothing in the document
  precedes it), prompt tokens, and every chat turn but the assistant's, unless `train_on_prompt`.
- prompt and completion are tokenized separately and joined with nothing between them: the data supplies any
  separator (a newline, a space) at the end of the prompt, exactly as it will at inference.
- pretokenized rows carry their ids and labels already (records.py checks them): nothing is added.

Alpaca and ShareGPT records are detected here and converted to instruction and chat records by records.py before
they reach `encode`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from entrypoint.errors import DataError, ModelLoadError

TEXT, INSTRUCTION, CHAT = "text", "prompt-completion", "chat"
ALPACA, SHAREGPT, PRETOKENIZED = "alpaca", "sharegpt", "pretokenized"
PREFERENCE = "preference"  # prompt/chosen/rejected pairs for DPO (preference.py encodes them)
# The fields each fixed-name format is detected by, and those it reads
ALPACA_FIELDS = ("instruction", "output")
ALPACA_READS = ("system", "instruction", "input", "output")
SHAREGPT_FIELD = "conversations"
PRETOKENIZED_READS = ("input_ids", "labels", "attention_mask")
IGNORE = -100  # the label value transformers' loss skips

# Used when the tokenizer has no chat template of its own. A conversation renders as
#   User:\n<content>\n\nAssistant:\n<content><eos>
# (role names capitalised, turns separated by a blank line, each assistant turn closed by EOS so the model
# learns to stop). The generation prompt is "Assistant:\n".
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first %}{{ '\\n\\n' }}{% endif -%}"
    "{{ message['role'] | capitalize }}:{{ '\\n' }}{{ message['content'] }}"
    "{%- if message['role'] == 'assistant' %}{{ eos_token }}{% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if messages %}{{ '\\n\\n' }}{% endif -%}Assistant:{{ '\\n' }}"
    "{%- endif -%}"
)

# Architectures whose attention builds its mask without the position ids, so restarted position ids do not
# isolate documents (tests/data/test_formats.py proves both lists against the installed transformers).
ISOLATION_UNSUPPORTED = {"opt"}


@dataclass(frozen=True)
class Fields:
    """Which record fields hold what (--text-field, --prompt-field, --completion-field, --messages-field,
    --chosen-field, --rejected-field). A preference record's prompt is in the prompt field."""

    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"
    chosen: str = "chosen"
    rejected: str = "rejected"

    @classmethod
    def from_config(cls, cfg) -> Fields:
        return cls(cfg.text_field, cfg.prompt_field, cfg.completion_field, cfg.messages_field, cfg.chosen_field,
                   cfg.rejected_field)


@dataclass(frozen=True)
class Convention:
    """The special tokens every document gets: `bos_id` first (None: none), `eos_id` last (None: none)."""

    bos_id: int | None
    eos_id: int | None


@dataclass(frozen=True)
class Encoded:
    """One document: token ids and, position for position, the labels (IGNORE where no loss)."""

    ids: list[int]
    labels: list[int]

    @property
    def target_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def detect(keys: Iterable[str], fields: Fields = Fields()) -> str:
    """The format of records with these fields, the first that fits: preference pairs (the chosen and rejected
    fields), chat (the messages field), ShareGPT (`conversations`), pretokenized (`input_ids`), prompt/completion
    (both fields), Alpaca (`instruction` and `output`), text. Raises DataError naming the option to use (`hint`)
    when none fits."""
    keys = set(keys)
    if fields.chosen in keys and fields.rejected in keys:
        return PREFERENCE
    if fields.messages in keys:
        return CHAT
    if SHAREGPT_FIELD in keys:
        return SHAREGPT
    if "input_ids" in keys:
        return PRETOKENIZED
    if fields.prompt in keys and fields.completion in keys:
        return INSTRUCTION
    if all(name in keys for name in ALPACA_FIELDS):
        return ALPACA
    if fields.text in keys:
        return TEXT
    found = ", ".join(sorted(keys)) or "none"
    raise DataError(hint(keys, fields) or (
        f"records have no {fields.text!r}, {fields.prompt!r}+{fields.completion!r} or {fields.messages!r} field "
        f"(found: {found}); name yours with --text-field, --prompt-field and --completion-field, or "
        "--messages-field."))


# Field names that say which format a record was meant to be, when detect finds none.
PROMPT_LIKE = ("instruction", "question", "query", "input", "prompt", "context")
ANSWER_LIKE = ("output", "answer", "response", "completion", "target")
CHOSEN_LIKE = ("chosen", "preferred", "accepted", "winner", "better")
REJECTED_LIKE = ("rejected", "dispreferred", "loser", "worse")
CHAT_LIKE = ("messages", "conversation", "conversations", "dialog", "dialogue", "chat", "turns")
IDS_LIKE = ("tokens", "token_ids", "ids", "input_ids")


def hint(keys: Iterable[str], fields: Fields = Fields()) -> str | None:
    """What records with these fields (none of a known format) look like, and the option that reads them; None
    when they look like nothing known."""
    keys = set(keys)
    found = ", ".join(sorted(keys))
    preference = _preference_hint(keys, fields, found)
    if preference:
        return preference
    chat = next((k for k in CHAT_LIKE if k in keys), None)
    if chat:
        return (f"records look like chat records in {chat!r} (fields: {found}); use --messages-field {chat}.")
    prompt = next((k for k in PROMPT_LIKE if k in keys), None)
    answer = next((k for k in ANSWER_LIKE if k in keys and k != prompt), None)
    if prompt == "instruction" and not answer:
        return (f"records look like Alpaca records but have no 'output' field (fields: {found}); add the answer "
                "as 'output', or name the fields with --prompt-field instruction --completion-field NAME.")
    if prompt and answer:
        return (f"records look like prompt/completion records in {prompt!r} and {answer!r} (fields: {found}); use "
                f"--prompt-field {prompt} --completion-field {answer}.")
    ids = next((k for k in IDS_LIKE if k in keys), None)
    if ids:
        return (f"records look like pretokenized rows in {ids!r} (fields: {found}); name that column input_ids "
                "(with optional labels and attention_mask).")
    return None


def _preference_hint(keys: set[str], fields: Fields, found: str) -> str | None:
    chosen = next((k for k in (fields.chosen, *CHOSEN_LIKE) if k in keys), None)
    rejected = next((k for k in (fields.rejected, *REJECTED_LIKE) if k in keys), None)
    if chosen and rejected:
        prompt = next((k for k in (fields.prompt, *PROMPT_LIKE) if k in keys), fields.prompt)
        prompt_option = "" if prompt == fields.prompt else f"--prompt-field {prompt} "
        return (f"records look like preference records with answers in {chosen!r} and {rejected!r} (fields: "
                f"{found}); use {prompt_option}--chosen-field {chosen} --rejected-field {rejected}.")
    # One answer alone says preference only under the name configured for it (a lone 'accepted' may be a flag).
    one = next((k for k in (fields.chosen, fields.rejected) if k in keys), None)
    if one:
        missing = "rejected" if one == fields.chosen else "chosen"
        return (f"records look like preference records but hold one answer only, in {one!r} (fields: {found}); add "
                f"the {missing} answer, or name both answers' fields with --chosen-field and --rejected-field.")
    return None


def isolate_by_default(fmt: str, requested: bool | None) -> bool:
    """--isolate-documents when given, else on for instruction and chat data and off for plain text."""
    return requested if requested is not None else fmt != TEXT


def isolation_problem(model_type: str) -> str | None:
    if model_type in ISOLATION_UNSUPPORTED:
        return (f"--isolate-documents is not honoured by {model_type} models in this transformers version (their "
                "attention mask ignores position ids); use --no-isolate-documents.")
    return None


def convention(tokenizer) -> Convention:
    """BOS where the tokenizer's own post-processing puts one first; EOS whenever the tokenizer has one."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and len(with_special) > len(plain) and with_special[0] == bos
    conv = Convention(bos_id=bos if adds_bos else None, eos_id=tokenizer.eos_token_id)
    if conv.bos_id is None and conv.eos_id is None:
        raise ModelLoadError("the tokenizer has neither a BOS it adds nor an EOS token, so documents cannot be "
                             "told apart; set one (tokenizer.eos_token = '...') and save_pretrained it again.")
    return conv


def chat_template(tokenizer) -> str:
    """The tokenizer's own chat template, or DEFAULT_CHAT_TEMPLATE when it has none."""
    return getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE


def encode(record: Mapping, fmt: str, tokenizer, conv: Convention, fields: Fields = Fields(),
           train_on_prompt: bool = False) -> Encoded:
    """One record (in format `fmt`, from `detect`) -> its token ids and labels. Raises DataError for a record
    whose fields have the wrong type."""
    if fmt == TEXT:
        return _finish([(_string(record, fields.text), True)], tokenizer, conv, eos_is_target=True)
    if fmt == INSTRUCTION:
        prompt, completion = _string(record, fields.prompt), _string(record, fields.completion)
        return _finish([(prompt, train_on_prompt), (completion, True)], tokenizer, conv, eos_is_target=True)
    if fmt == PRETOKENIZED:  # records.pretokenized checked and normalised the row
        labels = list(record["labels"])
        return Encoded(list(record["input_ids"]), [IGNORE, *labels[1:]])
    if fmt == CHAT:
        messages = _messages(record, fields.messages)
        segments = chat_segments(messages, tokenizer)
        if train_on_prompt:
            segments = [(text, True) for text, _ in segments]
        last_is_answer = messages[-1]["role"] == "assistant"
        return _finish(segments, tokenizer, conv, eos_is_target=last_is_answer or train_on_prompt)
    raise ValueError(f"unknown format {fmt!r}")


def encode_segments(segments: list[tuple[str, bool]], tokenizer, conv: Convention, eos_is_target: bool) -> Encoded:
    """(text, carries loss) pieces as one document, BOS and EOS added as `encode` adds them."""
    return _finish(segments, tokenizer, conv, eos_is_target)


def chat_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, carries loss) pieces: each assistant turn's content (with whatever
    closes the turn) is a target; its header and every other turn are not.

    The template renders growing prefixes of the conversation; each must extend the last, which holds for the
    usual templates. Raises DataError for a conversation or a template that does not allow this."""
    template = chat_template(tokenizer)

    def render(upto: int, generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(messages[:upto], chat_template=template, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja2's TemplateError, or the template's raise_exception(...)
            raise DataError(f"the chat template rejects this conversation ({str(exc).splitlines()[0][:120]}); "
                            "fix the record's roles (usually: alternate user and assistant).") from None

    if messages[0]["role"] == "assistant":
        raise DataError("a chat record starts with an assistant turn; put the user's (or a system) turn first.")
    segments, done = [], ""
    for i, message in enumerate(messages):
        full = render(i + 1, False)
        if message["role"] == "assistant":
            header = render(i, True)
            if not (header.startswith(done) and full.startswith(header)):
                raise _unstable_template()
            segments += [(header[len(done):], False), (full[len(header):], True)]
        else:
            if not full.startswith(done):
                raise _unstable_template()
            segments.append((full[len(done):], False))
        done = full
    return [(text, target) for text, target in segments if text]


def _unstable_template() -> DataError:
    return DataError("the tokenizer's chat template renders earlier turns differently once later turns follow, so "
                     "assistant turns cannot be located; remove chat_template from tokenizer_config.json to use "
                     "finetune's default template, or supply a prefix-stable one.")


def _finish(segments: list[tuple[str, bool]], tokenizer, conv: Convention, eos_is_target: bool) -> Encoded:
    ids: list[int] = []
    labels: list[int] = []
    for text, target in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids += piece
        labels += piece if target else [IGNORE] * len(piece)
    if conv.bos_id is not None and ids[:1] != [conv.bos_id]:
        ids, labels = [conv.bos_id, *ids], [IGNORE, *labels]
    if conv.eos_id is not None and ids[-1:] != [conv.eos_id]:
        ids, labels = [*ids, conv.eos_id], [*labels, conv.eos_id if eos_is_target else IGNORE]
    if labels:
        labels[0] = IGNORE  # nothing in the document precedes its first token
    return Encoded(ids, labels)


def _string(record: Mapping, name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str):
        raise DataError(f"field {name!r} is {type(value).__name__}, not a string; every record needs text there.")
    return value


def _messages(record: Mapping, name: str) -> list[dict]:
    return checked_messages(record.get(name), name, '[{"role": "user", "content": "..."}, '
                            '{"role": "assistant", "content": "..."}]')


def checked_messages(value, name: str, example: str, allow_empty: bool = False) -> list[dict]:
    """Field `name`'s list of {role, content} messages, as plain dicts; a DataError showing `example` otherwise."""
    if not isinstance(value, list) or not (value or allow_empty):
        emptiness = "" if allow_empty else "non-empty "
        raise DataError(f"field {name!r} is not a {emptiness}list of messages; write {example}.")
    for message in value:
        if not (isinstance(message, Mapping) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise DataError(f"a message in {name!r} is not {{role, content}} with string values ({message!r:.80}); "
                            "fix the record.")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def pack(documents: Iterable[Encoded], block_size: int, isolate: bool) -> Iterator[dict[str, list[int]]]:
    """Concatenate documents and cut full blocks of `block_size` tokens; the last partial block is dropped.

    Each block has input_ids and labels; with `isolate` also position_ids restarting at 0 at every document
    start and at the block start (a document continued from the previous block is treated as a new one), from
    which transformers builds a block-diagonal causal mask."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for doc in documents:
        start = 0
        while start < len(doc.ids):
            piece = doc.ids[start:start + block_size - len(ids)]
            ids += piece
            labels += doc.labels[start:start + len(piece)]
            positions += range(len(piece))
            start += len(piece)
            if len(ids) == block_size:
                block = {"input_ids": ids, "labels": labels}
                if isolate:
                    block["position_ids"] = positions
                yield block
                ids, labels, positions = [], [], []
