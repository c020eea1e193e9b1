"""Tokenizers built from the session's tiny GPT-2 one, for the record-format tests."""

from __future__ import annotations

from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

def llama_style(gpt2_style, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """The fixture's BPE with <s> and </s> added and a post-processor that puts <s> first, as Llama's does."""
    backend = Tokenizer.from_str(gpt2_style.backend_tokenizer.to_str())
    backend.add_special_tokens(["<s>", "</s>", "<|im_start|>", "<|im_end|>"])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = chat_template
    return tokenizer
