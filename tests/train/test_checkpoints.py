"""Checkpoint validation (entrypoint/train/checkpoints.py) for the layout a --fsdp run writes: no safetensors, a
folder of torch.distributed.checkpoint shards each for the weights and the optimizer. The ordinary layout and the
resume rules are proven through real runs in test_preemption.py and test_identity.py."""

from __future__ import annotations

from entrypoint.train import checkpoints
from tests.support.checkpoints import sharded_checkpoint


def test_a_complete_sharded_checkpoint_is_resumable(tmp_path):
    path = sharded_checkpoint(tmp_path, 8)
    assert sorted(p.name for p in (path / checkpoints.SHARDED_MODEL).iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]  # the names torch's writer gives, as the shards are looked up
    assert not list(path.glob("*.safetensors"))
    assert checkpoints.problem(path) is None
    assert checkpoints.latest_complete(tmp_path) == path


def test_a_sharded_checkpoint_missing_a_rank_or_its_metadata_is_skipped_for_the_one_before(tmp_path):
    older = sharded_checkpoint(tmp_path, 8)
    newer = sharded_checkpoint(tmp_path, 16)
    (newer / checkpoints.SHARDED_OPTIMIZER / "__1_0.distcp").unlink()  # rank 1 saved on a node-local disk
    reason = checkpoints.problem(newer)
    assert "optimizer_0 lacks the shard of rank 1 of 2" in reason and "every node shares" in reason
    assert checkpoints.latest_complete(tmp_path) == older
    (older / checkpoints.SHARDED_MODEL / checkpoints.SHARD_METADATA).write_bytes(b"")
    assert "pytorch_model_fsdp_0/.metadata is missing or empty" in checkpoints.problem(older)
    sharded = sharded_checkpoint(tmp_path / "again", 8)
    (sharded / "scheduler.pt").write_bytes(b"torn")
    assert checkpoints.problem(sharded) == "scheduler.pt is truncated or corrupt"
