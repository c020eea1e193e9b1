"""Packed blocks (data.formats.pack) as a batch of tensors, for tests that run a model on them."""

from __future__ import annotations

from collections.abc import Mapping

import torch


class BlockCollator:
    """Stacks packed blocks into a batch: input_ids, labels (IGNORE already where no loss) and, for isolated
    blocks, position_ids. No attention mask: transformers builds the block-diagonal causal mask from the
    restarted position ids only when the attention mask is None."""

    def __call__(self, rows: list[Mapping]) -> dict[str, torch.Tensor]:
        batch = {key: torch.stack([torch.as_tensor(r[key], dtype=torch.long) for r in rows])
                 for key in ("input_ids", "labels", "position_ids") if key in rows[0]}
        return batch
