"""Model FLOPs utilisation (MFU): the share of the GPU's dense peak that the useful tokens account for.

FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B), as nanoGPT's `estimate_mfu` does:
6N for the forward and backward matmuls of N parameters, plus 12 * layers * width * seq for attention scores
and values. N leaves out the position embeddings (a lookup, no matmul) but keeps the token embedding, which
GPT-2 ties to the output projection. Only useful (non-padding) tokens count, so padding lowers MFU.
`seq` is the block size: for padded rows that overstates attention work, never understates it.
"""

from __future__ import annotations

# Dense (no 2:4 sparsity) peak TFLOP/s: (bf16/fp16 tensor, tf32 tensor, fp32 without tensor cores), from the
# vendors' datasheets: NVIDIA H100 (SXM5, PCIe, NVL), H200, A100, L40S, L4, A10, T4 and V100 datasheets.
# A10G (AWS g5) has no public NVIDIA datasheet: 70 fp16 tensor TFLOP/s is Baseten's figure ("NVIDIA A10 vs
# A10G for ML model inference"); its tf32 entry assumes Ampere's half of that and its fp32 entry the A10's.
# First match wins, so specific names come before their prefixes.
PEAK_TFLOPS: list[tuple[str, tuple[float, float | None, float]]] = [
    ("H100 PCIe", (756.0, 378.0, 51.0)),
    ("H100 NVL", (835.0, 418.0, 60.0)),
    ("H100", (989.4, 494.7, 66.9)),  # SXM5: "NVIDIA H100 80GB HBM3"
    ("H200", (989.4, 494.7, 66.9)),
    ("A100", (312.0, 156.0, 19.5)),  # SXM4 and PCIe alike
    ("L40S", (362.0, 183.0, 91.6)),
    ("L40", (181.0, 90.5, 90.5)),
    ("L4", (121.0, 60.0, 30.3)),
    ("A10G", (70.0, 35.0, 31.2)),
    ("A10", (125.0, 62.5, 31.2)),
    ("T4", (65.0, None, 8.1)),  # fp16 only: no bf16, no tf32
    ("V100", (125.0, None, 15.7)),  # SXM2; fp16 only
]


def peak_flops(device_name: str, precision: str, tf32: bool = False) -> float | None:
    """The GPU's dense peak in FLOP/s for `precision` (bf16, fp16, fp32), or None for a CPU or an unknown GPU.
    fp32 counts as tf32 when TF32 matmuls are enabled and the GPU has them."""
    name = device_name.lower()
    for fragment, (half, tf32_peak, fp32_peak) in PEAK_TFLOPS:
        if fragment.lower() in name:
            if precision in ("bf16", "fp16"):
                return half * 1e12
            return (tf32_peak if tf32 and tf32_peak else fp32_peak) * 1e12
    return None


def flops_per_token(model, seq: int) -> float:
    """6N + 12 * layers * width * seq (see the module docstring), for any architecture: transformers' attribute
    maps give every config the standard names (GPT-2's n_layer and n_embd read as num_hidden_layers and
    hidden_size). Learned position embeddings (GPT-2's wpe, OPT's embed_positions) are lookups and left out.
    A frozen weight (LoRA's base model) costs 4 FLOPs per token, not 6: forward and input gradient, no weight
    gradient; with every weight trainable this is the 6N above."""
    config = model.config.get_text_config()
    matmul = [p for name, p in model.named_parameters() if not name.endswith(("wpe.weight", "embed_positions.weight"))]
    frozen = sum(p.numel() for p in matmul if not p.requires_grad)
    return 6 * sum(p.numel() for p in matmul) - 2 * frozen + 12 * config.num_hidden_layers * config.hidden_size * seq


def mfu(model, device_name: str, precision: str, seq: int, tokens_per_second_per_device: float,
        tf32: bool = False) -> float | None:
    """Useful model FLOPs per second over the device's peak; None where there is no known peak (CPU)."""
    return mfu_from(flops_per_token(model, seq), device_name, precision, tokens_per_second_per_device, tf32)


def mfu_from(flops: float, device_name: str, precision: str, tokens_per_second_per_device: float,
             tf32: bool = False) -> float | None:
    """MFU from FLOPs per token: the one formula the job (metrics.json) and the benchmarks share."""
    peak = peak_flops(device_name, precision, tf32)
    if not peak:
        return None
    return flops * tokens_per_second_per_device / peak
