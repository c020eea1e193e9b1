"""What of --fsdp can run without GPUs, run with torch's own FSDP2 on CPU processes (gloo): accelerate will not
shard on CPU, so Trainer is not in this, but the two pieces the job adds around it are.

1. A sharded checkpoint as accelerate writes it (torch.distributed.checkpoint into pytorch_model_fsdp_0/ and
   optimizer_0/, every rank its own shard) passes checkpoints.problem, and loads back into a sharded model exactly.
2. Publishing: every rank joins in gathering the full state dict (in CPU memory on rank 0), then rank 0 alone writes
   it through save_published from the sharded model; the written model equals the unsharded weights.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m bench.fsdp_cpu --workdir .bench/fsdp

Rank 0 prints one line per check; the process exits 1 if one fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import fully_shard

from entrypoint.train import checkpoints
from entrypoint.train.model import save_published


def sharded_model(seed: int):
    """A tiny GPT-2 sharded as accelerate shards it: each decoder block, then the whole model."""
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32, bos_token_id=0,
                        eos_token_id=0)
    model = AutoModelForCausalLM.from_config(config)
    unsharded = {k: v.clone() for k, v in model.state_dict().items()}
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return model, unsharded


def train_step(model) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(dist.get_rank()))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return optimizer


def save_sharded(model, optimizer, path: Path) -> None:
    """A checkpoint of the layout Trainer leaves under --fsdp (accelerate's save_fsdp_model/save_fsdp_optimizer)."""
    dcp.save({"model": get_model_state_dict(model)},
             storage_writer=dcp.FileSystemWriter(path / checkpoints.SHARDED_MODEL))
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)},
             storage_writer=dcp.FileSystemWriter(path / checkpoints.SHARDED_OPTIMIZER))
    if dist.get_rank() == 0:
        torch.save({"last_epoch": 1}, path / "scheduler.pt")
        (path / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
        checkpoints.mark_complete(path, 0.0, {"world_size": dist.get_world_size()})
    dist.barrier()


def full(model) -> dict:
    """The full state dict on rank 0 (empty elsewhere): a collective."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".bench/fsdp"))
    workdir = parser.parse_args(argv).workdir
    dist.init_process_group("gloo")
    rank, failed = dist.get_rank(), []

    def report(name: str, ok: bool, detail: str) -> None:
        if rank == 0:
            print(f"{'ok' if ok else 'FAIL':5} {name}: {detail}", flush=True)
        if not ok:
            failed.append(name)

    model, _ = sharded_model(seed=0)
    optimizer = train_step(model)
    checkpoint = workdir / "checkpoint-1"
    save_sharded(model, optimizer, checkpoint)
    names = sorted(p.name for p in (checkpoint / checkpoints.SHARDED_MODEL).iterdir())
    reason = checkpoints.problem(checkpoint)
    report("sharded checkpoint", reason is None, f"{checkpoints.SHARDED_MODEL}/ holds {names}; problem: {reason}")

    trained = full(model)
    other, _ = sharded_model(seed=1)  # another start, so a load that did nothing shows
    state = {"model": get_model_state_dict(other)}
    dcp.load(state, storage_reader=dcp.FileSystemReader(checkpoint / checkpoints.SHARDED_MODEL))
    set_model_state_dict(other, state["model"])
    loaded = full(other)
    if rank == 0:
        diff = max((loaded[k] - v).abs().max().item() for k, v in trained.items())
        report("resume", diff == 0.0, f"weights loaded from the shards differ by at most {diff}")

    held = torch.tensor(len(trained) if rank else 0)
    dist.all_reduce(held)
    report("gather", held.item() == 0 and bool(trained or rank), f"rank 0 holds {len(trained)} tensors of the "
           f"gathered state, the other ranks {held.item()}")
    published = workdir / "model"
    if rank == 0:
        class NoTokenizer:
            def save_pretrained(self, directory):
                pass

        from transformers import AutoModelForCausalLM

        save_published(model, NoTokenizer(), published, dict(trained))  # saving empties the dict it is given
        written = AutoModelForCausalLM.from_pretrained(published).state_dict()
        diff = max((written[k] - v).abs().max().item() for k, v in trained.items())
        report("publish", diff == 0.0, f"{sorted(p.name for p in published.iterdir())}, differs from the trained "
               f"weights by at most {diff}")
    dist.barrier()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
