"""Record formats: detection, BOS/EOS by each tokenizer's convention, loss masks, chat templates, packing and
document isolation, with real tokenizers and real tiny models."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from entrypoint.config.schema import TrainConfig
from entrypoint.data import formats
from entrypoint.data.formats import CHAT, IGNORE, INSTRUCTION, TEXT, Encoded, Fields
from entrypoint.errors import DataError, ModelLoadError
from entrypoint.train.model import load_model
from tests.support.archs import save_tiny_model
from tests.support.blocks import BlockCollator
from tests.support.tokenizers import CHATML, llama_style

# Writes BOS itself and closes each answer with EOS, as Llama-2-style templates do.
INST = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
                {"role": "user", "content": "More"}, {"role": "assistant", "content": "Sure."}]


def targets(tokenizer, encoded: Encoded) -> str:
    return tokenizer.decode([i for i, label in zip(encoded.ids, encoded.labels, strict=True) if label != IGNORE])


def test_format_is_detected_from_the_fields_present():
    assert formats.detect(["messages", "prompt"]) == CHAT
    assert formats.detect(["prompt", "completion", "text"]) == INSTRUCTION
    assert formats.detect(["text", "prompt"]) == TEXT
    assert formats.detect(["q", "a"], Fields(prompt="q", completion="a")) == INSTRUCTION
    with pytest.raises(DataError) as err:
        formats.detect(["body"])
    assert "found: body" in str(err.value) and "--prompt-field" in str(err.value) and "\n" not in str(err.value)


def test_alpaca_sharegpt_and_pretokenized_records_are_detected_before_their_lookalikes():
    assert formats.detect(["instruction", "input", "output"]) == formats.ALPACA
    assert formats.detect(["instruction", "output", "text"]) == formats.ALPACA  # tatsu-lab/alpaca has a text column
    assert formats.detect(["conversations", "id"]) == formats.SHAREGPT
    assert formats.detect(["input_ids", "attention_mask", "text"]) == formats.PRETOKENIZED
    assert formats.detect(["messages", "conversations"]) == CHAT  # the --messages-field names it
    assert formats.detect(["prompt", "completion", "instruction", "output"]) == INSTRUCTION


@pytest.mark.parametrize("keys, says", [
    (["question", "answer"], "use --prompt-field question --completion-field answer"),
    (["instruction", "input"], "look like Alpaca records but have no 'output'"),
    (["dialog", "id"], "use --messages-field dialog"),
    (["tokens"], "pretokenized rows in 'tokens' (fields: tokens); name that column input_ids"),
])
def test_fields_that_look_like_a_known_format_get_its_name_and_option(keys, says):
    with pytest.raises(DataError) as err:
        formats.detect(keys)
    assert says in str(err.value) and "\n" not in str(err.value)
    assert formats.hint(["body", "id"]) is None


def test_isolation_defaults_on_for_instruction_and_chat_and_off_for_text():
    assert [formats.isolate_by_default(f, None) for f in (TEXT, INSTRUCTION, CHAT)] == [False, True, True]
    assert formats.isolate_by_default(CHAT, False) is False and formats.isolate_by_default(TEXT, True) is True


def test_gpt2_style_tokenizer_gets_eos_after_each_document_and_no_bos(tokenizer):
    conv = formats.convention(tokenizer)
    assert conv.bos_id is None and conv.eos_id == tokenizer.eos_token_id
    encoded = formats.encode({"text": "Return the value."}, TEXT, tokenizer, conv)
    assert encoded.ids == tokenizer("Return the value.")["input_ids"] + [tokenizer.eos_token_id]
    assert encoded.labels == [IGNORE, *encoded.ids[1:]]
    ending = formats.encode({"text": "Done.<|endoftext|>"}, TEXT, tokenizer, conv)
    assert ending.ids.count(tokenizer.eos_token_id) == 1


def test_llama_style_tokenizer_gets_bos_and_eos_never_doubled(tokenizer):
    llama = llama_style(tokenizer)
    conv = formats.convention(llama)
    bos, eos = llama.convert_tokens_to_ids(["<s>", "</s>"])
    assert (conv.bos_id, conv.eos_id) == (bos, eos)
    encoded = formats.encode({"text": "Return the value."}, TEXT, llama, conv)
    assert encoded.ids[0] == bos and encoded.ids[-1] == eos and encoded.labels[0] == IGNORE
    assert encoded.ids == llama("Return the value.")["input_ids"] + [eos]  # the tokenizer's own BOS, once
    written = formats.encode({"text": "<s>Return the value.</s>"}, TEXT, llama, conv)
    assert written.ids == encoded.ids


def test_tokenizer_with_neither_bos_nor_eos_is_refused_with_the_fix(tokenizer):
    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer.backend_tokenizer.to_str()))
    with pytest.raises(ModelLoadError) as err:
        formats.convention(bare)
    assert "eos_token" in str(err.value) and "\n" not in str(err.value)


def test_prompt_tokens_never_carry_loss_unless_train_on_prompt(tokenizer):
    conv = formats.convention(tokenizer)
    record = {"prompt": "def area(r):\n", "completion": "Return the area of a circle."}
    encoded = formats.encode(record, INSTRUCTION, tokenizer, conv)
    prompt_ids = tokenizer(record["prompt"])["input_ids"]
    assert encoded.ids[:len(prompt_ids)] == prompt_ids
    assert set(encoded.labels[:len(prompt_ids)]) == {IGNORE}
    assert targets(tokenizer, encoded) == record["completion"] + "<|endoftext|>"
    assert encoded.target_tokens == len(tokenizer(record["completion"])["input_ids"]) + 1
    everything = formats.encode(record, INSTRUCTION, tokenizer, conv, train_on_prompt=True)
    assert everything.ids == encoded.ids
    assert everything.labels == [IGNORE, *everything.ids[1:]]


def test_renamed_fields_are_read(tokenizer):
    conv = formats.convention(tokenizer)
    fields = Fields(prompt="question", completion="answer")
    encoded = formats.encode({"question": "Why?\n", "answer": "Because."}, INSTRUCTION, tokenizer, conv, fields)
    assert targets(tokenizer, encoded) == "Because.<|endoftext|>"


def test_chat_without_a_template_uses_the_default_and_trains_on_assistant_turns_only(tokenizer):
    conv = formats.convention(tokenizer)
    encoded = formats.encode({"messages": CONVERSATION}, CHAT, tokenizer, conv)
    assert tokenizer.decode(encoded.ids) == ("User:\nHi\n\nAssistant:\nHello there.<|endoftext|>\n\n"
                                             "User:\nMore\n\nAssistant:\nSure.<|endoftext|>")
    assert targets(tokenizer, encoded) == "Hello there.<|endoftext|>Sure.<|endoftext|>"
    prompt = tokenizer.apply_chat_template(CONVERSATION[:1], chat_template=formats.chat_template(tokenizer),
                                           tokenize=False, add_generation_prompt=True)
    assert prompt == "User:\nHi\n\nAssistant:\n"


def test_chat_uses_the_tokenizers_own_template(tokenizer):
    chatml = llama_style(tokenizer, CHATML)
    conv = formats.convention(chatml)
    encoded = formats.encode({"messages": CONVERSATION}, CHAT, chatml, conv)
    rendered = chatml.apply_chat_template(CONVERSATION, tokenize=False)
    assert chatml.decode(encoded.ids) == "<s>" + rendered + "</s>"
    assert targets(chatml, encoded) == "Hello there.<|im_end|>\nSure.<|im_end|>\n</s>"
    everything = formats.encode({"messages": CONVERSATION}, CHAT, chatml, conv, train_on_prompt=True)
    assert everything.target_tokens == len(everything.ids) - 1


def test_a_template_that_writes_bos_and_eos_itself_gets_neither_twice(tokenizer):
    inst = llama_style(tokenizer, INST)
    conv = formats.convention(inst)
    encoded = formats.encode({"messages": CONVERSATION}, CHAT, inst, conv)
    assert encoded.ids.count(conv.bos_id) == 1 and encoded.ids[0] == conv.bos_id
    assert encoded.ids[-1] == conv.eos_id and encoded.ids[-2] != conv.eos_id
    assert targets(inst, encoded) == " Hello there.</s> Sure.</s>"


@pytest.mark.parametrize("messages, says", [
    ("hello", "non-empty list"),
    ([], "non-empty list"),
    ([{"role": "user"}], "{role, content}"),
    ([{"role": "assistant", "content": "Hi"}], "starts with an assistant turn"),
])
def test_malformed_chat_records_are_refused_in_one_line(tokenizer, messages, says):
    with pytest.raises(DataError) as err:
        formats.encode({"messages": messages}, CHAT, tokenizer, formats.convention(tokenizer))
    assert says in str(err.value) and "\n" not in str(err.value)


def test_a_non_string_field_is_refused(tokenizer):
    with pytest.raises(DataError, match="'completion' is int"):
        formats.encode({"prompt": "a", "completion": 3}, INSTRUCTION, tokenizer, formats.convention(tokenizer))


def test_pack_keeps_labels_and_restarts_positions_at_documents_and_blocks():
    docs = [Encoded([1, 2, 3], [IGNORE, 2, 3]), Encoded([4, 5, 6, 7, 8], [IGNORE, IGNORE, 6, 7, 8]),
            Encoded([9, 10], [IGNORE, 10])]
    blocks = list(formats.pack(docs, 4, isolate=True))
    assert [b["input_ids"] for b in blocks] == [[1, 2, 3, 4], [5, 6, 7, 8]]  # [9, 10] is the dropped remainder
    assert [b["labels"] for b in blocks] == [[IGNORE, 2, 3, IGNORE], [IGNORE, 6, 7, 8]]
    assert [b["position_ids"] for b in blocks] == [[0, 1, 2, 0], [0, 1, 2, 3]]
    plain = list(formats.pack(docs, 4, isolate=False))
    assert "position_ids" not in plain[0] and plain[0]["labels"] == blocks[0]["labels"]
    batch = BlockCollator()(blocks)
    assert batch["position_ids"].shape == (2, 4) and "attention_mask" not in batch


def packed_and_alone_logits(tmp_path, tiny_model, arch: str):
    """Logits of a second document inside an isolated packed block, and of the same document alone."""
    from transformers import AutoTokenizer

    directory = save_tiny_model(arch, tiny_model, tmp_path / arch)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = load_model(TrainConfig(model=str(directory))).eval()
    conv = formats.convention(tokenizer)
    first = formats.encode({"text": "The first document, which comes before."}, TEXT, tokenizer, conv)
    second = formats.encode({"prompt": "Q: what follows?\n", "completion": "A: the second one."}, INSTRUCTION,
                            tokenizer, conv)
    size = len(first.ids) + len(second.ids)
    [block] = formats.pack([first, second], size, isolate=True)
    batch = BlockCollator()([block])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0, len(first.ids):]
        alone = model(input_ids=torch.tensor([second.ids])).logits[0]
    return packed, alone


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "gpt_neox"])
def test_a_document_inside_an_isolated_packed_block_has_the_logits_it_has_alone(tmp_path, tiny_model, arch):
    assert formats.isolation_problem(arch) is None
    packed, alone = packed_and_alone_logits(tmp_path, tiny_model, arch)
    assert torch.allclose(packed, alone, atol=1e-4), (packed - alone).abs().max()


def test_opt_ignores_restarted_position_ids_so_isolation_is_refused_for_it(tmp_path, tiny_model):
    packed, alone = packed_and_alone_logits(tmp_path, tiny_model, "opt")
    assert (packed - alone).abs().max() > 1e-3  # attends across the boundary: the refusal below is needed
    assert "--no-isolate-documents" in formats.isolation_problem("opt")


@pytest.mark.parametrize("template", [None, CHATML, INST])
def test_generate_chat_feeds_exactly_what_chat_training_conditions_an_answer_on(tokenizer, template):
    from entrypoint.commands.generate import chat_prompt

    tok = tokenizer if template is None else llama_style(tokenizer, template)
    encoded = formats.encode({"messages": CONVERSATION[:2]}, CHAT, tok, formats.convention(tok))
    first_target = next(i for i, label in enumerate(encoded.labels) if label != IGNORE)
    assert chat_prompt(tok, "Hi") == encoded.ids[:first_target]


def test_generate_chat_prints_the_answer_only(tiny_model):
    from tests.support.helpers import finetune

    result = finetune("generate", "--model-dir", str(tiny_model), "--chat", "--prompt", "Hi", "--max-new-tokens",
                      "8", "--temperature", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "User:" not in result.stdout and "Assistant:" not in result.stdout  # the prompt is not echoed
