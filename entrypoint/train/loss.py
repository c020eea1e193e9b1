"""The causal-LM loss without a full fp32 copy of the logits.

transformers' default loss (`ForCausalLMLoss`) upcasts the whole B x T x V logits to fp32 and hands them to
`cross_entropy`, which keeps its log-softmax (another B x T x V in fp32) for the backward pass: for GPT-2 at
16 x 1,024 tokens that is two 3.3 GB tensors beside the logits themselves. `causal_lm_loss` takes the same
arguments and computes the same value (within 1e-5, tests/train/test_loss.py) a slice of rows at a time: it keeps
only the logits the model already produced and one fp32 log-sum-exp per token, and writes the gradient into one
tensor of the logits' own dtype. bench/loss.py measures the peak memory of both.

It is installed as the model's `loss_function` (model.load_model), so the model's forward computes it with the
`num_items_in_batch` Trainer passes: the token averaging, gradient accumulation included, is Trainer's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
CHUNK_ELEMENTS = 1 << 24  # logits upcast at a time: 64 MB of fp32, 333 rows of GPT-2's 50,257-token vocabulary


class _ChunkedCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of `logits` (N x V) against `targets` (N, IGNORE where no loss)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows = max(1, CHUNK_ELEMENTS // logits.shape[-1])
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            part, wanted = logits[start:start + rows].float(), targets[start:start + rows]
            lse[start:start + rows] = part_lse = torch.logsumexp(part, dim=-1)
            picked = part.gather(1, wanted.clamp(min=0).unsqueeze(1)).squeeze(1)
            total += torch.where(wanted != IGNORE, part_lse - picked, 0.0).sum()
        ctx.save_for_backward(logits, targets, lse)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        rows = max(1, CHUNK_ELEMENTS // logits.shape[-1])
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], rows):
            wanted = targets[start:start + rows]
            valid = (wanted != IGNORE).unsqueeze(1)
            # d(lse - logit[target]) / d logits = softmax - one_hot(target), zero on ignored rows
            part = (logits[start:start + rows].float() - lse[start:start + rows, None]).exp_()
            part.scatter_add_(1, wanted.clamp(min=0).unsqueeze(1), torch.full_like(part[:, :1], -1.0))
            grad[start:start + rows] = part.mul_(valid * grad_total)
        return grad, None


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over rows of `logits` (any leading shape) whose target is not IGNORE.

    Under torch.compile it is the plain cross-entropy, traced into the model's graph: the chunk loop runs over a
    count of rows that depends on the batch, which would break the graph there and give the frames after the break
    a recompile at every new batch shape (an epoch's short last batch); inductor fuses the fp32 upcast into the
    log-sum-exp reduction instead of writing the upcast logits out."""
    logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    if torch.compiler.is_compiling():
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")
    return _ChunkedCrossEntropy.apply(logits, targets)


def causal_lm_loss(logits, labels, vocab_size: int, num_items_in_batch=None, shift_labels=None,
                   **kwargs) -> torch.Tensor:
    """transformers' `ForCausalLMLoss`, chunked: the next-token loss summed and divided by `num_items_in_batch`
    (Trainer's count over the accumulated micro-batches), or the mean over this batch's targets without it. Its
    other keywords (`ignore_index`, and what the model passes besides) are accepted as `ForCausalLMLoss` accepts
    them; `ignore_index` must be -100."""
    ignore_index = kwargs.get("ignore_index", IGNORE)
    if ignore_index != IGNORE:
        raise ValueError(f"causal_lm_loss ignores label {IGNORE} only, not {ignore_index}")
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE)[..., 1:]  # position t predicts label t + 1
    shift_labels = shift_labels.to(logits.device)
    total = chunked_cross_entropy(logits.reshape(-1, vocab_size), shift_labels)
    if num_items_in_batch is None:
        return total / shift_labels.ne(IGNORE).sum()  # no targets: nan, as cross_entropy's mean gives
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
