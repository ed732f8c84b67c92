"""The per-token losses: plain cross-entropy (SFT) and Dynamic Fine-Tuning (DFT).

SFT minimises  -log p(y_t).  DFT minimises  -sg(p(y_t)) * log p(y_t): the token's own probability,
detached, rescales its loss, so the gradient is -grad p instead of -grad p / p.

Every loss is the SUM of per-token losses divided by `num_tokens`. For training, `num_tokens` is
the number of target tokens in the whole optimizer step (all micro-batches, all data-parallel
ranks), so a global batch gives the same gradient however it is split. Labels are already
shifted: `labels[..., i]` is the target of `logits[..., i, :]`.

Pure tensor functions: no deepspeed, no torch.distributed.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def target_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX):
    """log p(label) at every target position, in fp32, and the mask of target positions.

    Only the rows that carry a target go through log_softmax: prompt and padding positions cost nothing.
    """
    logits = logits.reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    mask = labels != ignore_index
    rows = logits[mask]
    rows = rows.to(torch.promote_types(rows.dtype, torch.float32))  # bf16/fp16 -> fp32; fp64 stays
    logp = torch.log_softmax(rows, dim=-1).gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)
    return logp, mask


def sft_token_loss(logp: torch.Tensor, prob_floor: float = 0.0) -> torch.Tensor:
    return -logp


def dft_token_loss(logp: torch.Tensor, prob_floor: float = 0.0) -> torch.Tensor:
    # exp(logp).detach() is p(y_t) with the gradient stopped: d/dθ [-sg(p) log p] = -grad p.
    # A floor keeps tokens the model finds unlikely from vanishing from the loss (weight max(p, floor)).
    weight = logp.detach().exp()
    if prob_floor > 0:
        weight = weight.clamp(min=prob_floor)
    return -weight * logp


TOKEN_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "sft": sft_token_loss,
    "dft": dft_token_loss,
}


def _reduce(token_loss: torch.Tensor, num_tokens: Optional[float | torch.Tensor]) -> torch.Tensor:
    count = token_loss.numel() if num_tokens is None else num_tokens
    # max(count, 1): a micro-batch with no targets contributes zero, not NaN.
    if isinstance(count, torch.Tensor):
        return token_loss.sum() / count.clamp(min=1).to(token_loss.dtype)
    return token_loss.sum() / max(float(count), 1.0)


def sft_loss(logits, labels, *, num_tokens=None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum of -log p(y_t) over target positions, divided by num_tokens (default: targets here)."""
    logp, _ = target_logprobs(logits, labels, ignore_index)
    return _reduce(sft_token_loss(logp), num_tokens)


def dft_loss(logits, labels, *, num_tokens=None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum of -sg(p(y_t)) log p(y_t) over target positions, divided by num_tokens (default: targets here)."""
    logp, _ = target_logprobs(logits, labels, ignore_index)
    return _reduce(dft_token_loss(logp), num_tokens)


class LossParts(NamedTuple):
    """What one micro-batch contributes: the loss to back-propagate and detached sums for logging."""

    loss: torch.Tensor
    loss_sum: torch.Tensor
    nll_sum: torch.Tensor
    prob_sum: torch.Tensor
    tokens: int


def compute_loss(loss_type: str, logits, labels, *, num_tokens, prob_floor: float = 0.0,
                 ignore_index: int = IGNORE_INDEX) -> LossParts:
    """The configured loss plus NLL and mean-probability sums from the same log-softmax pass."""
    logp, mask = target_logprobs(logits, labels, ignore_index)
    token_loss = TOKEN_LOSSES[loss_type](logp, prob_floor)
    detached = logp.detach()
    return LossParts(
        loss=_reduce(token_loss, num_tokens),
        loss_sum=token_loss.detach().sum(),
        nll_sum=-detached.sum(),
        prob_sum=detached.exp().sum(),
        tokens=int(mask.sum()),
    )
