"""The collators that turn rows of a TokenDataset into batches: full packed blocks as they are, or unpacked rows
padded per batch.
"""

from __future__ import annotations

import torch


class PackedCollator:
    """Full blocks: labels are the inputs (the model shifts them), or the cache's labels (-100 where no loss) for
    records; position ids for isolated documents. No attention mask: the causal kernel runs without a mask tensor
    (model.causal_sdpa), and for isolated documents transformers builds SDPA's block-diagonal mask from the
    restarted position ids only when there is none.

    `varlen` (flash-attention) adds each document's span, varlen_spans: transformers derives spans from position
    ids only for a batch of one row, so at batch > 1 its flash path would attend across documents."""

    def __init__(self, varlen: bool = False):
        self.varlen = varlen

    def __call__(self, rows):
        batch = {key: torch.stack([torch.as_tensor(r[key], dtype=torch.long) for r in rows])
                 for key in ("input_ids", "labels", "position_ids") if key in rows[0]}
        batch.setdefault("labels", batch["input_ids"].clone())
        if self.varlen and "position_ids" in batch:
            batch.update(varlen_spans(batch["position_ids"]))
        return batch


def varlen_spans(position_ids: torch.Tensor) -> dict:
    """flash-attention's variable-length arguments for rows whose position ids restart at 0 at every document
    (and every row): the documents' boundaries in the B x T tokens read as one stream, which is how transformers'
    flash path flattens the batch when it is given them. The longest span is bounded by the row length, a
    constant, so a compiled step does not see a new integer every batch (an upper bound only costs idle blocks)."""
    starts = (position_ids.reshape(-1) == 0).nonzero().view(-1)
    bounds = torch.cat([starts, torch.tensor([position_ids.numel()])]).to(torch.int32)
    longest = position_ids.shape[-1]
    return {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": longest, "max_length_k": longest}


class PaddingCollator:
    """Pads to the longest row in the batch (not to a fixed 512) and sets labels to -100 exactly where the
    attention mask is 0, so a real EOS stays a target even when pad_token_id == eos_token_id."""

    def __init__(self, pad_token_id: int, block_size: int, multiple_of: int = 8):
        self.pad_token_id = pad_token_id
        self.block_size = block_size
        self.multiple_of = multiple_of  # tensor-core friendly lengths on GPUs

    def __call__(self, rows):
        seqs = [torch.as_tensor(r["input_ids"], dtype=torch.long) for r in rows]
        longest = max(len(s) for s in seqs)
        width = max(longest, min(self.block_size, -(-longest // self.multiple_of) * self.multiple_of))
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq)] = seq
            mask[i, : len(seq)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        for i, row in enumerate(rows):
            if "labels" in row:  # records: the cache's loss mask
                labels[i, : len(seqs[i])] = torch.as_tensor(row["labels"], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class PairCollator:
    """Preference pairs as one padded batch of 2 x B rows: the B chosen rows first, then the B rejected rows in the
    same order (the DPO loss splits it there), so the model reads both answers in one forward pass."""

    def __init__(self, padding: PaddingCollator):
        self.padding = padding

    def __call__(self, pairs):
        return self.padding([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
