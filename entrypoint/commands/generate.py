"""`generate`: sample from a model directory, reproducibly (seeded).

Two requests have a defined meaning rather than being errors or crashes:
- an empty --prompt samples unconditionally: generation starts from the model's BOS token, or its EOS token when
  it has no BOS (GPT-2's <|endoftext|> is both); the start token is not printed;
- the prompt's tokens plus --max-new-tokens must fit the model's context (n_positions); a longer request is a usage
  error that names the context and the largest --max-new-tokens allowed, never a silent clamp.
"""

from __future__ import annotations

from collections.abc import Iterator

from entrypoint.config.options import check_values
from entrypoint.config.schema import GenerateConfig
from entrypoint.data import prompts
from entrypoint.errors import ConfigError, ModelLoadError, OutOfMemory
from entrypoint.train.preflight import check_model_dir

MIN_TEMPERATURE = 1e-3  # smaller ones act as greedy anyway, and far smaller ones overflow float32 logits to inf
BATCH = 32  # samples generated together; more are generated batch after batch, so memory stays bounded


def sample(cfg: GenerateConfig) -> Iterator[str]:
    """Yield `cfg.num_samples` texts. Everything checkable (prompt, model files, length) is checked before the
    weights load."""
    check_inputs(cfg)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, set_seed

    config = _load(AutoConfig, cfg.model_dir, "config")
    tokenizer = _load(AutoTokenizer, cfg.model_dir, "tokenizer")
    ids = chat_prompt(tokenizer, cfg.prompt) if cfg.chat else prompt_ids(tokenizer, cfg.prompt)
    check_length(len(ids), cfg.max_new_tokens, context_of(config))
    model = _load(AutoModelForCausalLM, cfg.model_dir, "weights", config=config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    set_seed(cfg.seed)
    greedy = cfg.temperature == 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, cfg.num_samples, BATCH):
        input_ids = torch.tensor([ids] * min(BATCH, cfg.num_samples - start), device=device)
        try:
            with torch.no_grad():
                out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                     max_new_tokens=cfg.max_new_tokens, do_sample=not greedy,
                                     temperature=None if greedy else cfg.temperature,
                                     top_p=None if greedy else cfg.top_p, pad_token_id=pad)
        except torch.OutOfMemoryError:
            raise OutOfMemory(f"out of memory generating {input_ids.shape[0]} samples of {cfg.max_new_tokens} "
                              "tokens; lower --max-new-tokens or --num-samples.") from None
        for seq in out:
            yield tokenizer.decode(seq[len(ids):] if cfg.chat else seq, skip_special_tokens=True)


def check_inputs(cfg: GenerateConfig) -> None:
    """The checks that need no library: the sampling values, the prompt's encoding and the model directory's files."""
    problems = check_values(cfg)
    if 0 < cfg.temperature < MIN_TEMPERATURE:
        problems.append(f"--temperature {cfg.temperature} is too small to sample with; use 0 (greedy) or a value of "
                        f"at least {MIN_TEMPERATURE}.")
    if problems:
        raise ConfigError(*problems)
    check_prompt(cfg.prompt)
    check_model_dir(cfg.model_dir, "--model-dir")


def check_prompt(prompt: str) -> None:
    """A prompt from a flag or env var that was not UTF-8 arrives with surrogate escapes, which no tokenizer takes."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        byte = len(prompt[:exc.start].encode("utf-8", "surrogateescape"))
        raise ConfigError(f"--prompt is not valid UTF-8 (byte {byte}); pass UTF-8 text, e.g. convert it with "
                          "iconv -f latin1 -t utf-8.") from None


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids; an empty prompt is the start token alone (BOS, else EOS)."""
    ids = tokenizer(prompt)["input_ids"] if prompt else []
    if ids:
        return ids
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ConfigError("the model's tokenizer has neither a BOS nor an EOS token to start an unconditional "
                          "sample from; give a --prompt.")
    return [start]


def context_of(config) -> int | None:
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def check_length(prompt_tokens: int, max_new_tokens: int, context: int | None) -> None:
    if context is None or prompt_tokens + max_new_tokens <= context:
        return
    if prompt_tokens >= context:
        raise ConfigError(f"--prompt is {prompt_tokens} tokens but the model's context is {context} tokens; "
                          "shorten the prompt.")
    raise ConfigError(f"--max-new-tokens {max_new_tokens} plus the prompt's {prompt_tokens} token(s) exceeds the "
                      f"model's {context}-token context; use --max-new-tokens {context - prompt_tokens} or less.")


def _load(auto, model_dir, what: str, **kwargs):
    """from_pretrained, with every loader failure (OSError, ValueError, SafetensorError, ...) as one line."""
    try:
        return auto.from_pretrained(model_dir, trust_remote_code=False, **kwargs)
    except Exception as exc:  # the loaders raise many types for a bad file; all mean "this model cannot be loaded"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ModelLoadError(f"cannot load the {what} in {model_dir} ({type(exc).__name__}: {first}); is the model "
                             "complete (model/COMPLETE)? Publish it again with finetune train.") from None


def chat_prompt(tokenizer, message: str) -> list[int]:
    """A user message rendered and tokenized exactly as chat training renders the turns before an answer."""
    return prompts.chat_ids(tokenizer, [{"role": "user", "content": message}])
