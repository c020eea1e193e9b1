"""Direct Preference Optimization (Rafailov et al., 2023), the sigmoid loss, inside our own Trainer subclass.

A batch from collate.PairCollator holds 2 x B rows: B chosen answers, then their B rejected answers. Each row's
log-probability is summed over its answer tokens (labels other than -100, after the shift), under the model being
trained (the policy) and under the reference: the base model with the LoRA adapter disabled (no second copy of the
weights), or, for full fine-tuning, a frozen copy of the base model made before training (memory: one more set of
weights, no gradients or optimizer state). The reference runs in eval mode (no dropout), so its log-probabilities
depend on the batch only.

    reward = beta x (log p_policy(answer) - log p_reference(answer))
    loss   = -log sigmoid(reward_chosen - reward_rejected), averaged over the pairs

Why not TRL's DPOTrainer: docs/lora-and-formats.md ("Preference tuning").
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F

IGNORE = -100
# The statistics summed per pair while training and evaluating, in this order.
STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the summed log-probability of the labels (position t predicts label t + 1; -100 skipped), in fp32.
    One cross-entropy over the whole batch (its log-softmax is one fp32 copy of the logits): slicing row by row
    would make the backward pass add a full-size gradient per row."""
    targets = labels[:, 1:]
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    token = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE, reduction="none")
    return -token.view(targets.shape).sum(dim=1)


class Preference:
    """The DPO objective with `beta`; `reference` is a frozen model, or None to use the trained LoRA model with its
    adapter disabled."""

    def __init__(self, beta: float, reference=None):
        self.beta, self.reference = beta, reference

    @classmethod
    def for_model(cls, model, beta: float) -> Preference:
        """With LoRA (a peft model) the reference is the base under the adapter; otherwise a frozen copy, made now,
        before any training step or checkpoint load changes the weights."""
        if hasattr(model, "disable_adapter"):
            return cls(beta)
        reference = copy.deepcopy(model).eval()
        reference.requires_grad_(False)
        return cls(beta, reference)

    def loss(self, model, unwrapped, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss over the batch's pairs, the STATS summed over them, detached, and the pair count last).
        `model` is what Trainer trains (maybe DDP-wrapped), `unwrapped` the model inside it."""
        ids, mask, labels = inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"]
        policy = sequence_logps(model(input_ids=ids, attention_mask=mask).logits, labels)
        with torch.no_grad():
            reference = sequence_logps(self._reference_logits(unwrapped, ids, mask), labels)
        rewards = self.beta * (policy - reference)
        pairs = ids.shape[0] // 2
        chosen, rejected = rewards[:pairs], rewards[pairs:]
        margin = chosen - rejected
        losses = -F.logsigmoid(margin)
        stats = torch.stack([losses.sum(), chosen.sum(), rejected.sum(), margin.sum(), (margin > 0).float().sum(),
                             torch.tensor(float(pairs), device=margin.device)]).detach()
        return losses.mean(), stats

    def _reference_logits(self, unwrapped, ids, mask) -> torch.Tensor:
        reference = self.reference if self.reference is not None else unwrapped
        if self.reference is not None and next(reference.parameters()).device != ids.device:
            reference.to(ids.device)  # once: Trainer moved the trained model after the copy was made
        adapter_off = contextlib.nullcontext() if self.reference is not None else unwrapped.disable_adapter()
        was_training = reference.training
        reference.eval()
        try:
            with adapter_off:
                return reference(input_ids=ids, attention_mask=mask).logits
        finally:
            reference.train(was_training)


def averages(sums: list[float], prefix: str = "") -> dict[str, float]:
    """The STATS per pair from their sums (the pair count last), named with `prefix`; {} for no pairs."""
    *totals, pairs = sums
    if not pairs:
        return {}
    return {f"{prefix}{name}": total / pairs for name, total in zip(STATS, totals, strict=True)}
