"""`init-model`: a random GPT-2 with a byte-level BPE tokenizer trained on a local corpus.

The result is an ordinary Hugging Face model directory, so the demo, the tests and air-gapped clusters can
exercise the whole pipeline without the Hub.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .config import MODEL_SIZES, InitModelConfig
from .errors import DataError, OutputError

log = logging.getLogger(__name__)
EOS = "<|endoftext|>"


def corpus_files(corpus: Path) -> list[Path]:
    files = sorted(p for p in corpus.rglob("*.txt") if p.is_file()) if corpus.is_dir() else [corpus]
    if not files or not all(p.is_file() for p in files):
        raise DataError(f"--corpus {corpus} has no .txt file; point it at a text file or a folder of them.")
    return files


def train_tokenizer(files: list[Path], vocab_size: int):
    """A GPT-2-style byte-level BPE: every byte is representable, so no input is ever <unk>."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train([str(p) for p in files], vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
              show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS,
                                   unk_token=EOS, model_max_length=None)


def init_model(cfg: InitModelConfig) -> Path:
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    if cfg.corpus is None:
        raise DataError("init-model needs --corpus: a .txt file or folder to train the tokenizer on "
                        "(finetune corpus writes one).")
    files = corpus_files(cfg.corpus)
    try:
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {cfg.output_dir} ({exc.strerror}); choose a writable --output-dir.") from None
    tokenizer = train_tokenizer(files, cfg.vocab_size)
    tokenizer.model_max_length = cfg.context
    layers, heads, width = MODEL_SIZES[cfg.size]
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=cfg.context, n_embd=width, n_layer=layers,
                        n_head=heads, bos_token_id=eos_id, eos_token_id=eos_id)
    torch.manual_seed(cfg.seed)
    model = GPT2LMHeadModel(config)
    model.generation_config = GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    model.save_pretrained(cfg.output_dir)
    tokenizer.save_pretrained(cfg.output_dir)
    for path in cfg.output_dir.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; the model is often made by one user and read by another
    params = sum(p.numel() for p in model.parameters())
    log.info("init-model: %s GPT-2 (%d layers, %d heads, width %d, %.2fM parameters), vocabulary %d, "
             "context %d -> %s", cfg.size, layers, heads, width, params / 1e6, len(tokenizer), cfg.context,
             cfg.output_dir)
    return cfg.output_dir
