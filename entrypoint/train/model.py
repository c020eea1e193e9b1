"""Load the tokenizer and the model, wire LoRA in (peft), and save what gets published.

With `--lora-rank N` only low-rank adapters on the target modules train: checkpoints hold the adapter and its
optimizer state, and publishing merges the adapter into the base weights, so `model/` is an ordinary model that
plain transformers loads, with the adapter itself beside it in `model/adapter/`.

The model is loaded the way a GPU runs it fastest with the same results: causal SDPA with no mask tensor for text
(attention_for, causal_sdpa), PyTorch's one-kernel tanh GELU for `gelu_new` (fast_gelu) and the chunked loss
(loss.py). tests/train/test_attention.py and tests/train/test_loss.py prove each on CPU.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import torch

from entrypoint import logs
from entrypoint.config.schema import TrainConfig
from entrypoint.errors import ModelLoadError
from entrypoint.train.loss import causal_lm_loss
from entrypoint.train.preflight import model_path, needs_remote_code, remote_code_error

log = logs.area("model")
ADAPTER_DIR = "adapter"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Default LoRA targets per architecture (config.model_type): the attention and MLP projections. Unknown
# architectures get peft's all-linear (every linear layer but the output head).
LORA_TARGETS = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gemma": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}


def load_tokenizer(cfg: TrainConfig):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path(cfg), token=cfg.hub_token, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        if needs_remote_code(exc):
            raise remote_code_error(cfg.model) from None
        raise ModelLoadError(f"cannot load the tokenizer of {cfg.model!r} ({str(exc).splitlines()[0][:120]}); "
                             "the model directory needs tokenizer files.") from None
    if not getattr(tokenizer, "is_fast", False) or tokenizer.eos_token_id is None:
        raise ModelLoadError(f"{cfg.model!r} has no fast tokenizer with an EOS token; save one with "
                             "tokenizer.json (transformers' PreTrainedTokenizerFast).")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # only ever used under an attention mask of 0
    return tokenizer


CAUSAL = "sdpa_causal"  # transformers' SDPA under a name that has no mask builder: see causal_sdpa
TANH_GELU = "gelu_pytorch_tanh"
ACTIVATION_FIELDS = ("activation_function", "hidden_act", "hidden_activation")


def attention_for(isolated: bool, precision: str) -> str:
    """How attention runs. Isolated documents: flash-attention's variable-length kernels on a GPU in half precision
    where the flash_attn package is installed (the collator hands it each document's span, collate.varlen_spans),
    else SDPA with the block-diagonal mask transformers builds from the restarted position ids. Everything else:
    causal SDPA with no mask at all (causal_sdpa). Unmeasured: no GPU with flash_attn was available yet."""
    import importlib.util

    if not isolated:
        return CAUSAL
    if precision in ("bf16", "fp16") and torch.cuda.is_available() \
            and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def causal_sdpa(module, query, key, value, attention_mask, **kwargs):
    """SDPA with `is_causal=True` and no mask tensor, the call the flash kernel needs.

    transformers builds a B x 1 x T x T mask whenever it cannot prove it redundant: under torch.compile always
    (its packed-sequence check on the position ids returns a tensor while tracing), and in eager mode for every
    padded batch. Neither is needed here: packed rows that do not isolate documents are plainly causal, and the
    padding collator pads on the right, so a real token never sees a pad token before it (pad positions carry no
    loss). Registered under a name with no mask function, transformers' mask creation returns None at once."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


def has_local_attention(config) -> bool:
    """Sliding-window or chunked layers need the mask transformers builds; causal_sdpa would drop their window."""
    layer_types = getattr(config, "layer_types", None) or ()
    return bool(getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)) \
        or bool(getattr(config, "attention_chunk_size", None)) or any(t != "full_attention" for t in layer_types)


def fast_gelu(config) -> dict[str, str]:
    """The config fields naming `gelu_new` (GPT-2, GPT-Neo, GPT-J, CodeGen), set to PyTorch's tanh GELU: the same
    function within about 1e-6 in fp32, as one kernel instead of a pow/tanh chain that autocast runs in fp32."""
    return {name: TANH_GELU for name in ACTIVATION_FIELDS if getattr(config, name, None) == "gelu_new"}


def load_model(cfg: TrainConfig, attention: str = "sdpa", precision: str = "fp32"):
    """The model to train: the base model, wrapped with LoRA adapters when --lora-rank > 0, its frozen weights
    quantized by bitsandbytes with --quantize (QLoRA; `precision` is the plan's, the adapters' compute dtype)."""
    from transformers import AutoModelForCausalLM

    try:
        # fp32 master weights; mixed precision comes from autocast (fp16/bf16 flags), not from the weights.
        model = _from_pretrained(AutoModelForCausalLM, cfg, attention, quantization(cfg.quantize, precision))
    except Exception as exc:  # loaders raise OSError, ValueError, SafetensorError, RuntimeError... for bad files
        if needs_remote_code(exc):
            raise remote_code_error(cfg.model) from None
        raise ModelLoadError(f"cannot load model weights of {cfg.model!r} ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:120]}); check the directory has a complete "
                             "model.safetensors, or the Hub id and HF_TOKEN.") from None
    # Training never reads a KV cache. With one, transformers also skips the block-diagonal mask it builds from
    # restarted position ids (isolated documents), and the cache holds every layer's keys and values.
    model.config.use_cache = False
    use_chunked_loss(model)
    if cfg.quantize:
        model = prepare_quantized(model, cfg, precision)
    if cfg.lora_rank:
        model = add_lora(model, cfg)
    return model


def quantization(quantize: str | None, precision: str):
    """bitsandbytes' settings for --quantize: 4bit is NF4 with double quantization (the QLoRA recipe), computing in
    the plan's precision; 8bit is LLM.int8(). None without --quantize."""
    if not quantize:
        return None
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        # LLM.int8() casts every layer input to fp16 and says so on each forward pass; said once here instead.
        logs.quiet("bitsandbytes.autograd._functions")
        log.info("8bit: bitsandbytes' LLM.int8() multiplies in fp16 (layer inputs are cast to it)")
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=DTYPES.get(precision, torch.float32))


def prepare_quantized(model, cfg: TrainConfig, precision: str):
    """peft's preparation for training on a quantized base: every base weight frozen, the weights bitsandbytes left
    unquantized (norms, embeddings, the head) in fp32. Gradient checkpointing stays with TrainingArguments, and
    add_lora makes the inputs require gradients when it is on. Publishing needs the unquantized base again
    (save_published), so where it came from is kept on the model."""
    from peft import prepare_model_for_kbit_training

    with peft_quietly():
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for module in model.modules():
        # On a CPU with AVX512-BF16, bitsandbytes evaluates 4-bit layers with a packed bf16 kernel and repacks the
        # weights in place for it; training then runs on the repacked weights, so a run resumed after an evaluation
        # would no longer match one that never stopped (measured: 1.4e-5 in the eval loss). One path, the one
        # training uses, keeps the resume exact and evaluation in the plan's precision.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    model.unquantized_base = (cfg.model, cfg.hub_token, DTYPES.get(precision, torch.float32))
    log.info(f"base weights quantized to {cfg.quantize} ({model.get_memory_footprint() / 2**20:.1f} MiB held); "
             "LoRA adapters train on top", quantize=cfg.quantize, model_bytes=model.get_memory_footprint())
    return model


def use_chunked_loss(model) -> None:
    """Models whose loss is transformers' ForCausalLMLoss compute the same loss without a full fp32 copy of the
    logits (loss.py)."""
    if getattr(model, "loss_type", None) in (None, "ForCausalLM"):
        model.loss_function = causal_lm_loss


def _from_pretrained(auto, cfg: TrainConfig, attention: str, quantized=None):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path(cfg), token=cfg.hub_token, trust_remote_code=False)
    faster = fast_gelu(config) if cfg.tanh_gelu else {}
    if faster:
        config.update(faster)
        log.info(f"{', '.join(faster)} GELU as {TANH_GELU} (--no-tanh-gelu keeps gelu_new)")
    model = _load(auto, cfg, config, attention, quantized)
    model.replaced_gelu = list(faster)  # save_published names gelu_new again, as the base model did
    return model


def _load(auto, cfg: TrainConfig, config, attention: str, quantized=None):
    from transformers import AttentionInterface

    if attention == CAUSAL:
        if has_local_attention(config):
            attention = "sdpa"
        else:
            AttentionInterface.register(CAUSAL, causal_sdpa)
    kwargs = {"config": config, "dtype": torch.float32, "token": cfg.hub_token, "trust_remote_code": False}
    if quantized is not None:
        # bitsandbytes quantizes while loading, on the device the weights land on; Trainer never moves a quantized
        # model, so each process loads onto its own GPU (LOCAL_RANK; torchrun sets it).
        kwargs["quantization_config"] = quantized
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    if attention != "sdpa":
        try:
            return auto.from_pretrained(model_path(cfg), attn_implementation=attention, **kwargs)
        except (ImportError, ValueError) as exc:  # the architecture or the installed flash_attn does not support it
            log.warning(f"{attention} unavailable ({str(exc).splitlines()[0][:160]}); using sdpa")
    return auto.from_pretrained(model_path(cfg), attn_implementation="sdpa", **kwargs)


def varlen_attention(model) -> bool:
    """Whether the model runs flash-attention, whose variable-length kernel isolates documents only when the batch
    carries each document's span (collate.PackedCollator(varlen=True))."""
    return getattr(model.config, "_attn_implementation", None) == "flash_attention_2"


def lora_targets(model_type: str, requested: str | None) -> list[str] | str:
    """The module names LoRA adapts: the option's comma-separated list, or the architecture's default."""
    if requested:
        names = [n.strip() for n in requested.split(",") if n.strip()]
        return "all-linear" if names == ["all-linear"] else names
    return list(LORA_TARGETS.get(model_type, ())) or "all-linear"


def add_lora(model, cfg: TrainConfig):
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model.config.model_type, cfg.lora_target_modules)
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank,
                      lora_dropout=cfg.lora_dropout, target_modules=targets, task_type="CAUSAL_LM",
                      fan_in_fan_out=model.config.model_type == "gpt2")  # GPT-2's Conv1D stores weights transposed
    torch.manual_seed(cfg.seed)  # lora_A starts random: the same seed makes a run, and its rerun, repeatable
    try:
        with peft_quietly():
            model = get_peft_model(model, lora)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise ModelLoadError(f"--lora-target-modules {cfg.lora_target_modules or ','.join(targets)}: "
                             f"{str(exc).splitlines()[0][:160]}; name modules the model has, or use all-linear."
                             ) from None
    if cfg.gradient_checkpointing:
        # The embeddings are frozen, so without this the recomputed blocks would see inputs that need no
        # gradient and the adapters inside them would get none.
        model.enable_input_require_grads()
    return model


def merged_onto(base: tuple, adapter: Path):
    """The adapter merged into the base model reloaded unquantized, in the plan's precision, on the CPU: what QLoRA
    publishes. Merging into the dequantized NF4 weights instead would bake the quantization error (about 1e-2
    relative per weight) into every layer of the published model; the original weights plus the trained update
    keep the base model exact where the adapter is zero. The reload needs the base's size in CPU memory."""
    from transformers import AutoModelForCausalLM

    name, token, dtype = base
    log.info(f"merging the adapter into {name} reloaded unquantized ({str(dtype).removeprefix('torch.')})")
    unquantized = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, token=token, trust_remote_code=False)
    return merge_adapter(unquantized, adapter)


def merge_adapter(model, adapter: Path):
    """`model` with the saved adapter in `adapter` (adapter_config.json, adapter_model.safetensors) folded into its
    weights: an ordinary model again, as publishing a LoRA run makes one."""
    from peft import PeftModel

    with peft_quietly():
        return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()


@contextlib.contextmanager
def peft_quietly():
    """peft reads transformers' deprecated `is_gradient_checkpointing`, and each process printed the FutureWarning
    with its source line into the job's log; it says nothing about the run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def is_lora(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save_published(model, tokenizer, directory: Path, state_dict: dict | None = None) -> None:
    """Write an ordinary model to `directory`; a LoRA model also leaves its adapter in `directory/adapter`.
    `state_dict` is the full state of a model sharded by --fsdp (fsdp.gathered_state), written in place of the
    model's own shards.

    Merging changes the wrapped model in place (the adapter folds into the base weights), so this is the last
    thing done with it."""
    if is_lora(model):
        model.save_pretrained(directory / ADAPTER_DIR)
        (directory / ADAPTER_DIR / "README.md").unlink(missing_ok=True)  # peft's blank card; model/README.md says it
        base = getattr(model.get_base_model(), "unquantized_base", None)
        model = merged_onto(base, directory / ADAPTER_DIR) if base else model.merge_and_unload()
    model.config.use_cache = True  # off only for training (load_model); generation wants it
    if model.config._attn_implementation == CAUSAL:
        model.set_attn_implementation("sdpa")  # CAUSAL is registered in this process only
    for name in getattr(model, "replaced_gelu", ()):  # the base model's own name for the same function
        setattr(model.config, name, "gelu_new")
    model.save_pretrained(directory, state_dict=state_dict)
    tokenizer.save_pretrained(directory)
