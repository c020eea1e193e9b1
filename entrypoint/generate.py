"""`generate`: sample from a model directory, reproducibly (seeded)."""

from __future__ import annotations

from .config import GenerateConfig
from .errors import ModelLoadError


def sample(cfg: GenerateConfig) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    if not (cfg.model_dir / "config.json").is_file():
        raise ModelLoadError(f"{cfg.model_dir} is not a model directory (no config.json); train first or point "
                             "--model-dir at a published model/.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model_dir, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(cfg.model_dir, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load {cfg.model_dir} ({str(exc).splitlines()[0][:120]}); "
                             "is the model complete (model/COMPLETE)?") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    set_seed(cfg.seed)
    if cfg.chat:
        ids = torch.tensor([chat_prompt(tokenizer, cfg.prompt)] * cfg.num_samples)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    else:
        inputs = tokenizer([cfg.prompt] * cfg.num_samples, return_tensors="pt")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    greedy = cfg.temperature == 0
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=cfg.max_new_tokens, do_sample=not greedy,
                             temperature=None if greedy else cfg.temperature, top_p=None if greedy else cfg.top_p,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    if cfg.chat:
        out = out[:, inputs["input_ids"].shape[1]:]
    return [tokenizer.decode(seq, skip_special_tokens=True) for seq in out]


def chat_prompt(tokenizer, message: str) -> list[int]:
    """A user message rendered and tokenized exactly as chat training renders the turns before an answer."""
    from . import formats

    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         chat_template=formats.chat_template(tokenizer), add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = formats.convention(tokenizer).bos_id
    return [bos, *ids] if bos is not None and ids[:1] != [bos] else ids
