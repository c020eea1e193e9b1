"""Tiny random causal LMs of several architectures, built with transformers' own config classes."""

from __future__ import annotations

from pathlib import Path

ARCHITECTURES = ("gpt2", "llama", "qwen2", "gpt_neox", "opt")


def tiny_config(arch: str, vocab_size: int, token_id: int = 0, positions: int = 128):
    """About 100k parameters: two layers, width 32, four heads (two key/value heads where grouped)."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig, Qwen2Config

    ids = {"bos_token_id": token_id, "eos_token_id": token_id, "pad_token_id": token_id}
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=positions, n_embd=32, n_layer=2, n_head=4, **ids)
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions, **ids)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions, **ids)
    if arch == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=positions, **ids)
    if arch == "opt":
        return OPTConfig(vocab_size=vocab_size, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=positions, word_embed_proj_dim=32, **ids)
    raise KeyError(arch)


def save_tiny_model(arch: str, tokenizer_dir: Path, target: Path, seed: int = 0) -> Path:
    """A random `arch` model saved with the tokenizer from `tokenizer_dir` beside it: an ordinary model directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), tokenizer.eos_token_id))
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target
