"""What document isolation costs: forward and backward tokens/s with plain packing against packed blocks whose
position ids restart at every document (transformers then builds a block-diagonal mask instead of running the
causal kernel). Random weights and tokens; CPU or whatever torch picks by default.

    python -m bench.isolation [repeats]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

BATCH, BLOCK, DOCUMENT = 8, 256, 64  # sequences, tokens per block, tokens per document

CONFIGS = {
    "gpt2 (4 layers, width 256)": GPT2Config(vocab_size=2048, n_positions=BLOCK, n_embd=256, n_layer=4, n_head=4,
                                             bos_token_id=0, eos_token_id=0),
    "llama (4 layers, width 256)": LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=1024,
                                               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                               max_position_embeddings=BLOCK),
}


def step(model, ids, positions) -> float:
    """Seconds for one forward and backward pass."""
    start = time.perf_counter()
    model(input_ids=ids, labels=ids, position_ids=positions).loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(repeats: int = 15) -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 2048, (BATCH, BLOCK))
    isolated = torch.arange(BLOCK).remainder(DOCUMENT).unsqueeze(0).expand(BATCH, -1)
    for name, config in CONFIGS.items():
        config.use_cache = False  # with a cache, transformers skips the packed-document mask
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()

        step(model, ids, None), step(model, ids, isolated)  # warm-up
        plain, iso = [], []
        for _ in range(repeats):  # interleaved, so a busy machine slows both alike
            plain.append(step(model, ids, None))
            iso.append(step(model, ids, isolated))
        p, i = statistics.median(plain), statistics.median(iso)
        tokens = BATCH * BLOCK
        print(f"{name}: plain {tokens / p:.0f} tokens/s, isolated {tokens / i:.0f} tokens/s, "
              f"isolated/plain {p / i:.3f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
