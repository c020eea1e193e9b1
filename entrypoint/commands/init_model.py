"""`init-model`: a random GPT-2 with a byte-level BPE tokenizer trained on a local corpus.

The result is an ordinary Hugging Face model directory, so the demo, the tests and air-gapped clusters can
exercise the whole pipeline without the Hub. The directory appears whole or not at all: a new one is written
beside its final place and renamed into it; an existing model directory is rewritten from a staging folder
inside it. A failure removes the staging folder and leaves what was there before.
"""

from __future__ import annotations

from pathlib import Path

from entrypoint import fsutil, logs
from entrypoint.config.schema import MODEL_SIZES, InitModelConfig
from entrypoint.data.sources import check_text_file
from entrypoint.errors import ConfigError, DataError, OutputError
from entrypoint.fsutil import COMPLETE
from entrypoint.publish.outputs import check_writable

log = logs.area("init-model")
EOS = "<|endoftext|>"
BYTE_SYMBOLS = 256  # a byte-level BPE starts from one symbol per byte


def corpus_files(corpus: Path) -> list[Path]:
    """The corpus's .txt files, each checked readable, non-empty and UTF-8 (by file and byte when it is not)."""
    fix = "point --corpus at a .txt file or a folder of them (finetune corpus writes one)"
    if not corpus.exists():
        raise DataError(f"--corpus {corpus} does not exist; {fix}.")
    if corpus.is_dir():
        files = sorted(p for p in corpus.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"--corpus {corpus} has no .txt file; {fix}.")
    elif not corpus.is_file():
        raise DataError(f"--corpus {corpus} is not a regular file; {fix}.")
    elif corpus.suffix == ".gz":
        raise DataError(f"--corpus {corpus} is compressed; decompress it first (gunzip -k {corpus}).")
    else:
        files = [corpus]
    for path in files:
        check_text_file(path)
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


def check_vocabulary(tokenizer, corpus: Path, vocab_size: int) -> None:
    """A corpus with no repeated word piece teaches the BPE nothing: refuse a vocabulary of bare bytes (or of
    whitespace runs only) rather than build a model that cannot represent a word as one token."""
    by_id = sorted((i, t) for t, i in tokenizer.get_vocab().items() if t != EOS)
    learned = [t for _, t in by_id[BYTE_SYMBOLS:]]
    if not any(tokenizer.convert_tokens_to_string([t]).strip() for t in learned):
        raise DataError(f"--corpus {corpus} has too little text to learn a vocabulary (no piece of a word occurs "
                        "twice); give it more text, e.g. the files finetune corpus writes.")
    if len(tokenizer) < vocab_size:
        log.warning(f"the corpus yields {len(tokenizer)} tokens, fewer than --vocab-size {vocab_size}; more text "
                    "gives a larger vocabulary")


def check_output_dir(output_dir: Path) -> None:
    """Refuse a destination whose contents would be mixed with or replaced by a model by mistake."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputError(f"--output-dir {output_dir} is a file; choose a directory path.")
    above = next((p for p in output_dir.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise OutputError(f"--output-dir {output_dir} is under {above}, which is a file; choose a directory path.")
    if (output_dir / COMPLETE).is_file():  # a model train published, not one init-model made
        raise OutputError(f"--output-dir {output_dir} holds a model published by finetune train; choose another "
                          "--output-dir (init-model will not replace a trained model).")
    if output_dir.is_dir() and not (output_dir / "config.json").is_file():
        others = sorted(p.name for p in output_dir.iterdir() if not fsutil.is_temporary(p))
        if others:
            raise OutputError(f"--output-dir {output_dir} holds other files ({', '.join(others[:3])}); choose a new "
                              "or empty directory (init-model replaces only a model directory).")
    # Where the staging folder will go (see save): a read-only or misplaced volume shows now, not after the
    # tokenizer has trained.
    check_writable(output_dir if output_dir.is_dir() else output_dir.parent, "output dir")


def save(model, tokenizer, output_dir: Path) -> None:
    """Write the model directory with fsutil.publish_dir: a new one is staged beside its place and renamed into it;
    an existing one (perhaps a mount point, which cannot be renamed) is staged inside and its files moved over,
    config.json last, so that its presence marks a whole model."""
    def fill(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for path in staging.iterdir():
            path.chmod(0o644)  # safetensors writes 0600; the model is often made by one user and read by another

    try:
        fsutil.publish_dir(output_dir, fill, if_exists="update", last="config.json")
    except Exception as exc:  # OSError, or safetensors' own error type for a failed write (disk full)
        raise OutputError(f"cannot write the model to {output_dir} ({getattr(exc, 'strerror', None) or exc}); "
                          "free space or choose another --output-dir.") from None


def check_inputs(cfg: InitModelConfig) -> list[Path]:
    """The checks that need no library: the corpus (every byte) and the destination. Returns the corpus files."""
    if cfg.corpus is None:
        raise ConfigError("init-model needs --corpus: a .txt file or folder to train the tokenizer on "
                          "(finetune corpus writes one).")
    files = corpus_files(cfg.corpus)
    check_output_dir(cfg.output_dir)
    return files


def init_model(cfg: InitModelConfig, files: list[Path] | None = None) -> Path:
    """Write the model directory; `files` is what check_inputs returned, when the caller ran it already."""
    files = files or check_inputs(cfg)
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    tokenizer = train_tokenizer(files, cfg.vocab_size)
    check_vocabulary(tokenizer, cfg.corpus, cfg.vocab_size)
    tokenizer.model_max_length = cfg.context
    layers, heads, width = MODEL_SIZES[cfg.size]
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=cfg.context, n_embd=width, n_layer=layers,
                        n_head=heads, bos_token_id=eos_id, eos_token_id=eos_id)
    torch.manual_seed(cfg.seed)
    try:
        model = GPT2LMHeadModel(config)
    except (MemoryError, RuntimeError) as exc:  # torch's CPU allocator raises RuntimeError when memory runs out
        raise ConfigError(f"not enough memory for a {cfg.size} model with {len(tokenizer)} tokens and context "
                          f"{cfg.context} ({str(exc).splitlines()[0][:120]}); lower --size, --vocab-size or "
                          "--context.") from None
    model.generation_config = GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    save(model, tokenizer, cfg.output_dir)
    params = sum(p.numel() for p in model.parameters())
    log.info(f"{cfg.size} GPT-2 ({layers} layers, {heads} heads, width {width}, {params / 1e6:.2f}M parameters), "
             f"vocabulary {len(tokenizer)}, context {cfg.context} -> {cfg.output_dir}")
    return cfg.output_dir
