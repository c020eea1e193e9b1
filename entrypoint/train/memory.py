"""The memory plan: peak memory per device, estimated from the model's configuration before any weight loads.

    weights      every parameter in fp32 (the master copy autocast reads), or for --quantize the linear layers
                 at 4.13 bits (NF4 plus the double-quantized scales) or 8 bits and the rest in fp32
    adapters     LoRA's A and B, fp32
    gradients    one fp32 value per trainable parameter
    optimizer    AdamW's two fp32 moments per trainable parameter
    buckets      with several processes, DDP's gradient buckets: another copy of the trainable gradients
    --fsdp       weights, gradients and AdamW state divided by the world size, no buckets, plus what FSDP holds
                 whole for the layer it computes: that layer's and the prefetched next one's weights, and one
                 layer's gradients before they are reduce-scattered (fp32, erring high: bf16 runs gather in bf16)
    activations  what the backward pass keeps: per token and layer about 10 x width + 3 x MLP width values (the
                 layer's input, norms, q/k/v, attention output, MLP input, hidden and activation), in the
                 autocast dtype (fp32 holds 4 bytes, bf16/fp16 a mix of 2 and 4: 2.5); with gradient checkpointing
                 only each layer's input plus one layer recomputed; plus one layer's worth of transient gradients
    logits       the output head's logits and their gradient, for every token of the micro-batch
    runtime      what the process holds before training: on CPU this process's resident memory now (Python,
                 torch, transformers), on a GPU the CUDA context and library workspaces (0.6 GiB, assumed)

A margin of 10% covers the allocator's fragmentation. tests/train/test_memory.py checks the estimate against
measured peak memory on CPU; docs/performance.md has the figures.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from entrypoint import logs

GIB = 2**30
MARGIN = 1.10
CUDA_RUNTIME = int(0.6 * GIB)  # context, cuBLAS/cuDNN workspaces: not measured here (no GPU)
NF4_BYTES = 4.127 / 8  # 4 bits a weight, an 8-bit scale per 64 weights, and a 32-bit scale per 256 scales
INT8_BYTES = 1.0 + 4 / 4096  # a byte a weight and an fp32 scale per row of (typically) 4096
ACTIVATION_BYTES = {"fp32": 4.0, "bf16": 2.5, "fp16": 2.5}
PER_TOKEN_WIDTHS = 10  # values of the model's width each layer keeps per token
PER_TOKEN_MLP = 3  # values of the MLP's width each layer keeps per token
LORA_COPIES, LORA_DROPOUT_COPIES = 1.2, 3.0
# With checkpointing the forward pass still builds each layer's activations, then frees them. A GPU's caching
# allocator hands the freed blocks to the next layer; glibc on a CPU keeps them mapped, so the resident set grows
# past what is held. Measured (bench/memory_plan.py and an in-process probe, 8 x 256 tokens, width 512): tensors
# saved for the backward 45-53 MiB, resident growth in the forward 342-921 MiB, about 4 layers' activations.
CPU_RETAINED_LAYERS = 3
SUGGESTED_RANK = 16  # the LoRA rank a run without LoRA is told would fit
FSDP_GATHERED_LAYERS = 3  # --fsdp: a layer's weights, the next one's (prefetched) and a layer's unsharded gradients


@dataclass(frozen=True)
class Shape:
    """What the estimate needs from a model: parameter counts by role, and the sizes activations scale with."""

    parameters: int
    quantizable: int  # weights of the linear layers bitsandbytes would quantize (all but the output head)
    adapters: int  # LoRA parameters at the configured rank and targets (0 without LoRA)
    adapted_inputs: int  # the input widths of every adapted layer, summed over the model
    layers: int
    width: int
    mlp_width: int
    vocab: int


@dataclass(frozen=True)
class Mode:
    """How the model trains: the options the estimate depends on."""

    lora: bool = False
    lora_dropout: bool = True
    quantize: str | None = None
    precision: str = "fp32"
    batch: int = 8
    block: int = 1024
    checkpointing: bool = False
    world_size: int = 1
    fsdp: bool = False
    cpu: bool = False  # glibc's allocator, not the caching allocator of a GPU (see CPU_RETAINED_LAYERS)
    preference: bool = False  # DPO: two rows (chosen, rejected) a pair, and a reference model's log-probabilities


@dataclass(frozen=True)
class Estimate:
    weights: int
    adapters: int
    reference: int
    gradients: int
    optimizer: int
    buckets: int
    activations: int
    logits: int
    runtime: int

    @property
    def total(self) -> int:
        return int(sum(getattr(self, f.name) for f in fields(self)) * MARGIN)

    def line(self, available: int | None) -> str:
        parts = ", ".join(f"{f.name} {logs.size(getattr(self, f.name))}" for f in fields(self)
                          if getattr(self, f.name))
        of = f" of {logs.size(available)}" if available else ""
        return f"about {logs.size(self.total)}{of} ({parts}; +10% margin)"


def estimate(shape: Shape, mode: Mode, runtime: int) -> Estimate:
    """The peak bytes one process holds training `shape` in `mode`."""
    trainable = shape.adapters if mode.lora else shape.parameters
    if mode.quantize:
        per_weight = NF4_BYTES if mode.quantize == "4bit" else INT8_BYTES
        weights = shape.quantizable * per_weight + (shape.parameters - shape.quantizable) * 4
    else:
        weights = shape.parameters * 4
    shards = mode.world_size if mode.fsdp else 1
    tokens = mode.batch * mode.block * (2 if mode.preference else 1)
    per_layer = tokens * (PER_TOKEN_WIDTHS * shape.width + PER_TOKEN_MLP * shape.mlp_width) \
        * ACTIVATION_BYTES[mode.precision]
    if mode.lora:  # measured (bench/memory_plan.py): peft keeps about 1.2 copies of each adapted layer's input
        # per token, and with dropout 3 (the dropped copy, its mask, and transients)
        per_layer += tokens * shape.adapted_inputs / shape.layers * ACTIVATION_BYTES[mode.precision] \
            * (LORA_DROPOUT_COPIES if mode.lora_dropout else LORA_COPIES)
    kept = shape.layers * tokens * shape.width * 4 + per_layer if mode.checkpointing else shape.layers * per_layer
    if mode.checkpointing and mode.cpu:
        kept += CPU_RETAINED_LAYERS * per_layer
    logit_bytes = 4 if mode.precision == "fp32" else 2
    gathered = FSDP_GATHERED_LAYERS * shape.parameters / shape.layers * 4 if mode.fsdp else 0
    # DPO's reference: with LoRA the trained model with its adapter off (nothing more), otherwise a whole frozen
    # fp32 copy (train/dpo.py), outside any shards; its logits come on top of the trained model's.
    reference = (0 if mode.lora else shape.parameters * 4) + tokens * shape.vocab * 4 if mode.preference else 0
    return Estimate(weights=int(weights / shards + gathered), adapters=shape.adapters * 4 if mode.lora else 0,
                    reference=reference,
                    gradients=trainable * 4 // shards, optimizer=trainable * 8 // shards,
                    buckets=trainable * 4 if mode.world_size > 1 and not mode.fsdp else 0,
                    activations=int(kept + per_layer), logits=tokens * shape.vocab * (logit_bytes + 4),
                    runtime=runtime)


@dataclass(frozen=True)
class Sizing:
    """One run's memory inputs: the model's shape, how it trains, what the process holds before it, and what the
    device has."""

    shape: Shape
    mode: Mode
    runtime: int
    available: int

    def at(self, batch: int) -> Estimate:
        return estimate(self.shape, replace(self.mode, batch=batch), self.runtime)

    def largest_batch(self, limit: int) -> int:
        """The largest power of two up to `limit` whose estimate fits (1 when none does): where --batch-size
        auto's probe starts."""
        batch = 1 << (max(limit, 1).bit_length() - 1)
        while batch > 1 and self.at(batch).total > self.available:
            batch //= 2
        return batch


def shape_of(model_config, lora_rank: int, targets: list[str] | str) -> Shape:
    """Count a model's parameters by role on the meta device: no memory, no weights read, exact for any
    architecture transformers can build from the configuration."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    head = model.get_output_embeddings()
    quantizable = adapters = adapted_inputs = 0
    for name, module in model.named_modules():
        if module is head or not isinstance(module, torch.nn.Linear | Conv1D):
            continue
        quantizable += module.weight.numel()
        if lora_rank and (targets == "all-linear" or name.rsplit(".", 1)[-1] in targets):
            adapters += lora_rank * sum(module.weight.shape)  # A: rank x inputs, B: outputs x rank
            adapted_inputs += module.weight.shape[0 if isinstance(module, Conv1D) else 1]
    text = model_config.get_text_config()
    width = getattr(text, "hidden_size", None) or text.n_embd
    mlp = getattr(text, "intermediate_size", None) or getattr(text, "ffn_dim", None) or getattr(text, "n_inner", None)
    return Shape(parameters=sum(p.numel() for p in model.parameters()), quantizable=quantizable, adapters=adapters,
                 adapted_inputs=adapted_inputs, layers=text.num_hidden_layers, width=width, mlp_width=mlp or 4 * width,
                 vocab=text.vocab_size)


def runtime_bytes(device: str) -> int:
    """What the process holds before the model: its resident memory now on CPU, the CUDA runtime on a GPU."""
    if device != "cpu":
        return CUDA_RUNTIME
    import psutil

    return psutil.Process().memory_info().rss


def available_bytes(device: str) -> int:
    """The memory one process may use: the GPU's, or on CPU its share (torchrun's LOCAL_WORLD_SIZE) of the
    container's limit (cgroup v2 memory.max) or the machine's RAM, whichever is smaller."""
    if device != "cpu":
        return torch.cuda.get_device_properties(0).total_memory
    import psutil

    total = psutil.virtual_memory().total
    limit = Path("/sys/fs/cgroup/memory.max")
    text = limit.read_text().strip() if limit.is_file() and os.access(limit, os.R_OK) else "max"
    machine = min(total, int(text)) if text.isdigit() else total
    return machine // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # CPU processes of one node share its RAM


def what_fits(shape: Shape, mode: Mode, runtime: int, available: int) -> list[str]:
    """The changes, cheapest first and then combined, that bring the estimate under `available`: what a run that
    does not fit should try."""
    candidates = [replace(mode, checkpointing=True), replace(mode, batch=1)]
    if mode.world_size > 1 and not mode.lora:  # full fine-tuning over several GPUs: shard it (--fsdp is full only)
        candidates += [replace(mode, fsdp=True), replace(mode, fsdp=True, checkpointing=True)]
    if mode.fsdp:
        candidates += [replace(mode, world_size=mode.world_size * more) for more in (2, 4)]
    candidates += [replace(mode, lora=True, fsdp=False), replace(mode, lora=True, quantize="4bit", fsdp=False),
                   replace(mode, lora=True, quantize="4bit", checkpointing=True, batch=1, fsdp=False)]
    fits = []
    for changed in candidates:
        if changed != mode and estimate(shape, changed, runtime).total <= available:
            text = describe(mode, changed)
            fits += [text] if text not in fits else []
    return fits


def describe(mode: Mode, changed: Mode) -> str:
    """The options that turn `mode` into `changed`."""
    options = [f"--lora-rank {SUGGESTED_RANK}" if changed.lora != mode.lora else "",
               f"--quantize {changed.quantize}" if changed.quantize != mode.quantize else "",
               "--gradient-checkpointing" if changed.checkpointing != mode.checkpointing else "",
               "--batch-size 1 (and more --grad-accum for the same effective batch)" if changed.batch != mode.batch
               else "",
               ("--fsdp" if changed.fsdp else "no --fsdp") if changed.fsdp != mode.fsdp else "",
               f"{changed.world_size} GPUs (--nproc-per-node, --nnodes)" if changed.world_size != mode.world_size
               else ""]
    return " ".join(o for o in options if o)


# Llama-family shapes (vocabulary 32000, grouped key/value heads where the models have them) for the table below.
LLAMA_SHAPES = {
    "1B": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_key_value_heads": 8},
    "3B": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_key_value_heads": 8},
    "8B": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_key_value_heads": 8},
    "13B": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_key_value_heads": 40},
    "70B": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_key_value_heads": 8},
}
GPUS = {"24 GiB (L4, RTX 4090)": 24, "40 GiB (A100 40G)": 40, "80 GiB (A100, H100)": 80, "141 GiB (H200)": 141}


def which_mode_fits() -> str:
    """A markdown table: for each model size and GPU memory, the first of full fine-tuning, LoRA and QLoRA (rank
    16, bf16, one 2048-token sequence per step, gradient checkpointing on) whose estimate fits one GPU, and where
    full fine-tuning does not, the fewest GPUs (2, 4 or 8) --fsdp would shard it over."""
    from transformers import LlamaConfig

    modes = (("full", Mode()), ("LoRA", Mode(lora=True)), ("QLoRA", Mode(lora=True, quantize="4bit")))
    rows = ["| model | " + " | ".join(GPUS) + " |", "| --- |" + " --- |" * len(GPUS)]
    for name, dims in LLAMA_SHAPES.items():
        config = LlamaConfig(vocab_size=32000, num_attention_heads=dims["hidden_size"] // 128, **dims)
        shape = shape_of(config, SUGGESTED_RANK, "all-linear")
        cells = []
        for gib in GPUS.values():
            fitting = [(label, _table_estimate(shape, mode)) for label, mode in modes]
            first = next(((label, total) for label, total in fitting if total <= gib * GIB), None)
            cell = f"{first[0]} ({first[1] / GIB:.0f} GiB)" if first else "none on one GPU"
            if not first or first[0] != "full":
                gpus = next((n for n in (2, 4, 8) if _table_estimate(shape, Mode(fsdp=True, world_size=n))
                             <= gib * GIB), None)
                cell += f"; full: --fsdp on {gpus} GPUs" if gpus else "; full: --fsdp on more than 8 GPUs"
            cells.append(cell)
        rows.append(f"| {name} ({shape.parameters / 1e9:.1f}B) | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _table_estimate(shape: Shape, mode: Mode) -> int:
    return estimate(shape, replace(mode, precision="bf16", batch=1, block=2048, checkpointing=True),
                    CUDA_RUNTIME).total
