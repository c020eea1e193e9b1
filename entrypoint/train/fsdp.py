"""--fsdp: full fine-tuning sharded over the GPUs with FSDP2, which Trainer drives through accelerate.

Every weight, its gradient and its AdamW state live in 1/world-size shards, one per process; each decoder layer
(the model's `_no_split_modules` class) is gathered whole just before its forward and backward and freed after
(full shard, ZeRO-3's layout). Checkpoints are sharded too (`checkpoints.SHARDED_MODEL`: every rank writes its own
shard, nothing is gathered to save), and load only into a run sharded the same way: --fsdp is part of the run's
identity. The published model is gathered once at the end into an ordinary safetensors model.

Not run yet: no GPU has been lent to this project. What runs here are the refusals (CPU, one process, with
--quantize or --lora-rank) and the arguments Trainer is given (tests/train/test_fsdp.py).
"""

from __future__ import annotations

from entrypoint.errors import ConfigError


def problem(device: str, world_size: int | None) -> str | None:
    """Why --fsdp cannot engage on `device` with `world_size` processes (None: not known yet), or None. Trainer
    refuses FSDP in a single process, and accelerate quietly runs DDP for several CPU processes: both would be a
    different run from the one asked for, so both are refused."""
    if device == "cpu":
        return ("--fsdp shards over CUDA GPUs and this run has none (on CPU, accelerate would run plain DDP instead); "
                "run it on two or more GPUs, or drop --fsdp.")
    if world_size is not None and world_size < 2:
        return (f"--fsdp shards over several processes and this run has {world_size}; give --nproc-per-node auto on "
                "a node with two or more GPUs (or N >= 2, or --nnodes), or drop --fsdp.")
    return None


def layer_classes(model) -> list[str]:
    """The decoder layer classes FSDP shards one by one: the model's `_no_split_modules`, transformers' list of the
    blocks that must stay whole on one device (GPT2Block, LlamaDecoderLayer, ...)."""
    names = list(getattr(model, "_no_split_modules", None) or [])
    if not names:
        raise ConfigError(f"--fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules) to shard "
                          "by; drop --fsdp for this architecture.")
    return names


def training_arguments(layers: list[str], checkpointing: bool) -> dict:
    """TrainingArguments' FSDP fields for sharding `layers` (layer_classes), with FSDP's own activation checkpointing
    when `checkpointing` (Trainer refuses it together with its own, which would gather every layer a third time)."""
    return {"fsdp": True, "fsdp_config": {
        "version": 2,
        "reshard_after_forward": True,  # full shard: a layer's weights are freed after its forward, gathered again
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": layers,
        "state_dict_type": "SHARDED_STATE_DICT",  # each rank saves its shard: no full copy gathered at every save
        # Each process loads the whole fp32 model before it is sharded (node RAM holds one copy per process):
        # transformers loads on rank 0 only when accelerate's launcher variables are set before the model loads,
        # and here the model loads before TrainingArguments exist.
        "cpu_ram_efficient_loading": False,
        "cpu_offload": False,
        "activation_checkpointing": checkpointing,
    }}


def gathered_state(trainer) -> dict | None:
    """The sharded model's full state dict on rank 0, in CPU memory (None on the other ranks, and without FSDP).
    A collective: every rank calls it, before rank 0 alone publishes."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    state = trainer.accelerator.get_state_dict(trainer.model)
    return state if trainer.accelerator.is_main_process else None
