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


# ---------------------------------------------------------------- fused LM head + loss
#
# The unfused path materialises [tokens, vocab] logits (0.5 GiB at 4096 x 32000 in fp32, 2.5 GiB at
# vocab 151936), then autograd keeps the log-softmax output and allocates its gradient: three or
# four such tensors at the peak. DFT needs nothing cross-entropy does not already compute (the
# weight is exp(logp_y), detached), so one pass per chunk of target rows gives the loss AND the
# gradient wrt that chunk's logits:  d/dz [-w * log softmax(z)_y] = w * (softmax(z) - onehot_y),
# with w = max(p_y, floor) for DFT and 1 for SFT. The chunk's logits die before the next chunk.

# 128 MiB: 1048 rows at vocab 32000, 220 at 151936 -- still large enough matmuls to run at full
# speed, small enough that the head's peak is dominated by the [V, H] weight gradient, not by logits.
DEFAULT_CHUNK_BUDGET_BYTES = 128 << 20


def default_chunk_rows(vocab: int, budget_bytes: int = DEFAULT_CHUNK_BUDGET_BYTES) -> int:
    """Rows per chunk so that one chunk's fp32 logits stay within `budget_bytes`.

    Chunk size matters more than the fusion itself: TRL's 32768-token chunks peaked above the
    unfused loss on this machine, 1024-token chunks at +216 MiB (FACTS.md).
    """
    return max(1, int(budget_bytes) // (int(vocab) * 4))


class _FusedLinearTokenLoss(torch.autograd.Function):
    """SUM over target rows of -w * log softmax(h @ W.T)_y; gradients computed in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, dft: bool, prob_floor: float, ignore_index: int,
                chunk_size: int, need_grads: bool):
        hidden_shape, hidden_dtype = hidden.shape, hidden.dtype
        flat_h = hidden.reshape(-1, hidden.shape[-1])
        flat_y = labels.reshape(-1)
        idx = (flat_y != ignore_index).nonzero().squeeze(1)
        rows, targets = flat_h.index_select(0, idx), flat_y.index_select(0, idx)
        # Accumulate in fp32 from bf16/fp16 inputs (fp64 stays fp64). The upcast weight is a copy
        # only for half-precision heads; fp32 heads are used in place.
        cdt = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
        w = weight.to(cdt)
        want_h = need_grads and ctx.needs_input_grad[0]
        want_w = need_grads and ctx.needs_input_grad[1]
        grad_rows = torch.empty((rows.shape[0], w.shape[1]), dtype=cdt, device=w.device) if want_h else None
        grad_w = torch.zeros_like(w, dtype=cdt) if want_w else None
        total = torch.zeros((), dtype=cdt, device=w.device)
        for start in range(0, rows.shape[0], chunk_size):
            h = rows[start:start + chunk_size].to(cdt)
            y = targets[start:start + chunk_size].unsqueeze(1)
            z = h @ w.T                                     # [c, V], the only vocab-sized tensor
            z_y = z.gather(1, y)                            # [c, 1]
            # log-sum-exp by hand, in z's storage: torch.logsumexp allocates a second [c, V].
            z_max = z.amax(dim=-1, keepdim=True)
            e = z.sub_(z_max).exp_()                        # z is now exp(z - max)
            sum_e = e.sum(dim=-1, keepdim=True)
            logp_y = z_y - z_max - sum_e.log()
            if dft:
                tok_w = logp_y.exp()
                if prob_floor > 0:
                    tok_w = tok_w.clamp(min=prob_floor)
            else:
                tok_w = torch.ones_like(logp_y)
            total -= (tok_w * logp_y).sum()
            if not (want_h or want_w):
                continue
            # dz = w * (softmax - onehot), built in z's own storage.
            dz = e.div_(sum_e).mul_(tok_w).scatter_add_(1, y, -tok_w)
            if want_h:
                torch.mm(dz, w, out=grad_rows[start:start + chunk_size])
            if want_w:
                grad_w.addmm_(dz.T, h)
            del z, e, dz
        ctx.hidden_meta = (hidden_shape, hidden_dtype, weight.dtype)
        ctx.grad_w = grad_w
        ctx.save_for_backward(idx, grad_rows if want_h else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        hidden_shape, hidden_dtype, weight_dtype = ctx.hidden_meta
        idx, grad_rows = ctx.saved_tensors
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = torch.zeros((hidden_shape[:-1].numel(), hidden_shape[-1]),
                                      dtype=hidden_dtype, device=idx.device)
            if grad_rows is not None and grad_rows.shape[0]:
                grad_hidden.index_copy_(0, idx, (grad_rows * grad_out).to(hidden_dtype))
            grad_hidden = grad_hidden.reshape(hidden_shape)
        if ctx.needs_input_grad[1]:
            grad_w = ctx.grad_w
            if grad_w is None:
                raise RuntimeError("fused_linear_*_loss: backward ran twice (retain_graph) or the "
                                   "forward ran without grad; the weight gradient is consumed once")
            # In place: the fp32 [V, H] accumulator is the largest thing here, so no second copy.
            ctx.grad_w = None
            grad_weight = grad_w.mul_(grad_out).to(weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _fused_linear_loss(hidden, weight, labels, *, dft: bool, num_tokens, ignore_index: int,
                       prob_floor: float, chunk_size: Optional[int]) -> torch.Tensor:
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"fused loss: hidden {tuple(hidden.shape)} must be labels {tuple(labels.shape)} + [H]")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"fused loss: weight {tuple(weight.shape)} must be [V, {hidden.shape[-1]}]")
    chunk = default_chunk_rows(weight.shape[0]) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"fused loss: chunk_size must be >= 1, got {chunk_size}")
    need_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    total = _FusedLinearTokenLoss.apply(hidden, weight, labels, dft, float(prob_floor), int(ignore_index),
                                        chunk, need_grads)
    count = int((labels != ignore_index).sum()) if num_tokens is None else num_tokens
    if isinstance(count, torch.Tensor):
        return total / count.clamp(min=1).to(total.dtype)
    return total / max(float(count), 1.0)


def fused_linear_dft_loss(hidden, weight, labels, *, num_tokens=None, ignore_index: int = IGNORE_INDEX,
                          prob_floor: float = 0.0, chunk_size: Optional[int] = None) -> torch.Tensor:
    """`dft_loss(hidden @ weight.T, labels, ...)` without the full logits: same value and gradients.

    hidden [N, H] or [B, T, H] with labels [N] / [B, T] (already shifted); weight [V, H]. Only target
    rows are projected, `chunk_size` rows at a time (default: default_chunk_rows(V)); logits are
    accumulated in fp32, gradients return in the input dtypes. The DFT weight is max(p, prob_floor).
    """
    return _fused_linear_loss(hidden, weight, labels, dft=True, num_tokens=num_tokens,
                              ignore_index=ignore_index, prob_floor=prob_floor, chunk_size=chunk_size)


def fused_linear_sft_loss(hidden, weight, labels, *, num_tokens=None, ignore_index: int = IGNORE_INDEX,
                          prob_floor: float = 0.0, chunk_size: Optional[int] = None) -> torch.Tensor:
    """`sft_loss(hidden @ weight.T, labels, ...)` without the full logits (prob_floor is ignored)."""
    return _fused_linear_loss(hidden, weight, labels, dft=False, num_tokens=num_tokens,
                              ignore_index=ignore_index, prob_floor=prob_floor, chunk_size=chunk_size)
