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

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch

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


@dataclass(frozen=True)
class TokenWeight:
    """The detached weight of each target token's -log p.

    Probability weights:  w = (1 - mix) + mix * max(p, floor)^alpha.  sft is mix=0; dft is mix=1,
    alpha=1; power is mix=1 with its alpha (0 is sft, 1 is dft); mix moves `mix` from 0 to 1 over a
    range of steps. The gradient of -w log p is -w grad p / p, so dft's w = p turns it into -grad p.

    Entropy weights (eaft, `entropy_k` set):  w = (H_k / ln k)^alpha, H_k the entropy of the
    position's top-k next-token distribution renormalised over those k (k = 0: the whole vocabulary,
    divided by ln V). A confident position (low entropy) learns little, whatever its target.

    A gate (`keep` = "above" or "below" `threshold`) multiplies either weight by 1 where the target's
    own p is strictly above (below) the threshold and by 0 elsewhere: only_top_p / only_bottom_p.
    Gated-out tokens still count in the normalising token count.
    """

    mix: float = 1.0
    alpha: float = 1.0
    floor: float = 0.0
    entropy_k: Optional[int] = None
    keep: Optional[str] = None
    threshold: float = 0.0

    @property
    def needs_entropy(self) -> bool:
        return self.entropy_k is not None

    @property
    def is_constant(self) -> bool:
        return self.entropy_k is None and self.keep is None and (self.mix == 0 or self.alpha == 0)

    def __call__(self, logp: torch.Tensor, entropy: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Weights of target log-probs `logp`; `entropy` (the normalised entropy at each of those
        positions, see normalized_entropy) is required when `needs_entropy`."""
        logp = logp.detach()
        if self.entropy_k is not None:
            if entropy is None:
                raise ValueError("TokenWeight: an entropy weight needs the positions' normalised entropy")
            w = entropy.detach().to(logp.dtype).reshape(logp.shape)
            w = w if self.alpha == 1 else w.pow(self.alpha)
        elif self.mix == 0 or self.alpha == 0:
            w = torch.ones_like(logp)
        else:
            p = logp.exp()
            if self.floor > 0:
                p = p.clamp(min=self.floor)
            if self.alpha != 1:
                p = p.pow(self.alpha)
            w = p if self.mix == 1 else (1 - self.mix) + self.mix * p
        if self.keep is not None:
            p = logp.exp()
            w = w * ((p > self.threshold) if self.keep == "above" else (p < self.threshold)).to(w.dtype)
        return w


def normalized_entropy(rows: torch.Tensor, k: int) -> torch.Tensor:
    """Entropy of each row's next-token distribution over its top k logits, renormalised over those k,
    divided by ln k (so in [0, 1]); k = 0 or k >= V: the whole distribution, divided by ln V. In the
    rows' precision at least fp32; detached."""
    rows = rows.detach()
    rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
    vocab = rows.shape[-1]
    if 0 < k < vocab:
        rows = rows.topk(k, dim=-1, sorted=False).values
    n = rows.shape[-1]
    if n < 2:
        return torch.zeros(rows.shape[:-1], dtype=rows.dtype, device=rows.device)
    logq = torch.log_softmax(rows, dim=-1)
    return -(logq.exp() * logq).sum(-1) / math.log(n)


SFT = TokenWeight(mix=0.0)
DFT = TokenWeight()

LOSS_TYPES = ("dft", "sft", "power", "mix", "asft", "eaft", "only_top_p", "only_bottom_p")
# only_top_p / only_bottom_p weight the tokens they keep as one of these.
THRESHOLD_BASES = ("dft", "sft")


def mix_fraction(step: int, start: int, end: int) -> float:
    """Share of the DFT weight at optimizer step `step` (0-based): 0 before start, 1 from end on, linear between."""
    if step >= end:
        return 1.0
    if step < start:
        return 0.0
    return (step - start) / (end - start)


def token_weight(loss_type: str, *, step: int = 0, prob_floor: float = 0.0, alpha: float = 1.0,
                 mix_start: int = 0, mix_end: int = 0, eaft_top_k: int = 20, threshold: float = 0.1,
                 threshold_base: str = "dft") -> TokenWeight:
    """The TokenWeight of `loss_type` at optimizer step `step` (asft weights its tokens as dft)."""
    if loss_type == "sft":
        return SFT
    if loss_type in ("dft", "asft"):
        return TokenWeight(floor=prob_floor)
    if loss_type == "power":
        return TokenWeight(alpha=alpha, floor=prob_floor)
    if loss_type == "mix":
        return TokenWeight(mix=mix_fraction(step, mix_start, mix_end), floor=prob_floor)
    if loss_type == "eaft":
        return TokenWeight(alpha=alpha, entropy_k=int(eaft_top_k))
    if loss_type in ("only_top_p", "only_bottom_p"):
        if threshold_base not in THRESHOLD_BASES:
            raise ValueError(f"unknown threshold base {threshold_base!r}; expected one of {', '.join(THRESHOLD_BASES)}")
        base = SFT if threshold_base == "sft" else TokenWeight(floor=prob_floor)
        return TokenWeight(mix=base.mix, floor=base.floor, keep="above" if loss_type == "only_top_p" else "below",
                           threshold=float(threshold))
    raise ValueError(f"unknown loss type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")


def _reduce(token_loss: torch.Tensor, num_tokens: Optional[float | torch.Tensor]) -> torch.Tensor:
    count = token_loss.numel() if num_tokens is None else num_tokens
    # max(count, 1): a micro-batch with no targets contributes zero, not NaN.
    if isinstance(count, torch.Tensor):
        return token_loss.sum() / count.clamp(min=1).to(token_loss.dtype)
    return token_loss.sum() / max(float(count), 1.0)


def sft_loss(logits, labels, *, num_tokens=None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum of -log p(y_t) over target positions, divided by num_tokens (default: targets here)."""
    logp, _ = target_logprobs(logits, labels, ignore_index)
    return _reduce(-logp, num_tokens)


def dft_loss(logits, labels, *, num_tokens=None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum of -sg(p(y_t)) log p(y_t) over target positions, divided by num_tokens (default: targets here)."""
    logp, _ = target_logprobs(logits, labels, ignore_index)
    return _reduce(-DFT(logp) * logp, num_tokens)


def kl_ref_model(logits_rows: torch.Tensor, ref_rows: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) per row, in fp32: sum_v q_v (log q_v - log p_v)."""
    dtype = torch.promote_types(logits_rows.dtype, torch.float32)
    logp = torch.log_softmax(logits_rows.to(dtype), dim=-1)
    logq = torch.log_softmax(ref_rows.to(dtype), dim=-1)
    return (logq.exp() * (logq - logp)).sum(-1)


# Bucket edges of the target-probability histogram: 20 equal bins on [0, 1].
HIST_BINS = 20
LOW_PROB = 0.1


class LossParts(NamedTuple):
    """What one micro-batch contributes: the loss to back-propagate and detached sums for logging."""

    loss: torch.Tensor
    loss_sum: torch.Tensor
    nll_sum: torch.Tensor
    prob_sum: torch.Tensor
    tokens: int
    low_prob: int = 0                       # targets with p < LOW_PROB
    kl_sum: float = 0.0                     # asft: sum of per-token KL(reference || model)
    hist: Optional[torch.Tensor] = None     # [HIST_BINS] counts of target probabilities
    weight_sum: float = 0.0                 # sum of the detached token weights
    zero_weight: int = 0                    # targets whose weight is exactly 0 (gated out, or p underflowed)
    entropy_sum: float = 0.0                # eaft: sum of the normalised entropies


def _parts(loss: torch.Tensor, loss_sum: torch.Tensor, logp: torch.Tensor, kl_sum=0.0,
           weights: Optional[torch.Tensor] = None, entropy: Optional[torch.Tensor] = None) -> LossParts:
    """Logging sums from the detached target log-probs and weights of this micro-batch (a few thousand values)."""
    logp = logp.detach()
    p = logp.exp()
    weights = torch.ones_like(p) if weights is None else weights.detach()
    return LossParts(loss=loss, loss_sum=loss_sum.detach(), nll_sum=-logp.sum(), prob_sum=p.sum(),
                     tokens=int(p.numel()), low_prob=int((p < LOW_PROB).sum()), kl_sum=float(kl_sum),
                     hist=torch.histc(p.float().cpu(), bins=HIST_BINS, min=0.0, max=1.0),
                     weight_sum=float(weights.sum()), zero_weight=int((weights == 0).sum()),
                     entropy_sum=float(entropy.detach().sum()) if entropy is not None else 0.0)


def kl_term_on(reference, kl_coef: float) -> bool:
    """The KL(reference || model) term is added when a reference is given with a positive weight."""
    return reference is not None and kl_coef > 0


def compute_loss(weighting: TokenWeight | str, logits, labels, *, num_tokens, prob_floor: float = 0.0,
                 ref_logits: Optional[torch.Tensor] = None, kl_coef: float = 0.0,
                 ignore_index: int = IGNORE_INDEX) -> LossParts:
    """The weighted loss (plus kl_coef x KL(reference || model) when ref_logits is given), with NLL,
    probability and histogram sums from the same log-softmax pass. Unfused: holds the full logits."""
    if isinstance(weighting, str):
        weighting = token_weight(weighting, prob_floor=prob_floor)
    logp, mask = target_logprobs(logits, labels, ignore_index)
    entropy = None
    if weighting.needs_entropy:
        entropy = normalized_entropy(logits.reshape(-1, logits.shape[-1])[mask], weighting.entropy_k)
    weights = weighting(logp, entropy)
    token_loss = -weights * logp
    kl_sum = 0.0
    if kl_term_on(ref_logits, kl_coef):
        kl = kl_ref_model(logits.reshape(-1, logits.shape[-1])[mask], ref_logits.reshape(-1, ref_logits.shape[-1])[mask])
        token_loss = token_loss + kl_coef * kl
        kl_sum = float(kl.detach().sum())
    return _parts(_reduce(token_loss, num_tokens), token_loss.detach().sum(), logp, kl_sum, weights, entropy)


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

    Chunk size matters more than the fusion itself: at 4096 tokens and a 32000-token vocabulary on
    a CPU, TRL's fused head with 32768-token chunks peaked at +3.1 GiB, above the unfused loss, and
    with 1024-token chunks at +216 MiB.
    """
    return max(1, int(budget_bytes) // (int(vocab) * 4))


class _FusedLinearTokenLoss(torch.autograd.Function):
    """SUM over target rows of -w * log softmax(z)_y [+ kl_coef * KL(ref || model)], where z = h @ W.T,
    or z = cap * tanh(h @ W.T / cap) with a softcap; gradients computed in the forward pass. Also
    returns the detached target log-probs and KL sum."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, weighting: TokenWeight, ignore_index: int, chunk_size: int,
                need_grads: bool, ref_hidden, ref_weight, kl_coef: float, softcap: Optional[float]):
        hidden_shape, hidden_dtype = hidden.shape, hidden.dtype
        flat_h = hidden.reshape(-1, hidden.shape[-1])
        flat_y = labels.reshape(-1)
        idx = (flat_y != ignore_index).nonzero().squeeze(1)
        rows, targets = flat_h.index_select(0, idx), flat_y.index_select(0, idx)
        use_ref = ref_hidden is not None  # fused_linear_loss passes it only when the term is on
        if use_ref:
            ref_rows = ref_hidden.reshape(-1, ref_hidden.shape[-1]).index_select(0, idx)
        # Accumulate in fp32 from bf16/fp16 inputs (fp64 stays fp64). The upcast weight is a copy
        # only for half-precision heads; fp32 heads are used in place.
        cdt = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
        w = weight.to(cdt)
        w_ref = ref_weight.to(cdt) if use_ref else None
        want_h = need_grads and ctx.needs_input_grad[0]
        want_w = need_grads and ctx.needs_input_grad[1]
        grad_rows = torch.empty((rows.shape[0], w.shape[1]), dtype=cdt, device=w.device) if want_h else None
        grad_w = torch.zeros_like(w, dtype=cdt) if want_w else None
        logps = torch.empty(rows.shape[0], dtype=cdt, device=w.device)
        weights = torch.empty(rows.shape[0], dtype=cdt, device=w.device)
        use_entropy = weighting.needs_entropy
        top_k = weighting.entropy_k if use_entropy and 0 < weighting.entropy_k < w.shape[0] else 0
        entropies = torch.empty(rows.shape[0] if use_entropy else 0, dtype=cdt, device=w.device)
        ent_buf = (torch.empty((min(ENTROPY_BLOCK_ROWS, max(rows.shape[0], 1)), w.shape[0]), dtype=cdt, device=w.device)
                   if use_entropy and not top_k else None)
        total = torch.zeros((), dtype=cdt, device=w.device)
        kl_total = torch.zeros((), dtype=cdt, device=w.device)
        for start in range(0, rows.shape[0], chunk_size):
            h = rows[start:start + chunk_size].to(cdt)
            y = targets[start:start + chunk_size].unsqueeze(1)
            z = h @ w.T                                     # [c, V], the model's only vocab-sized tensor
            if softcap:
                # z <- cap * tanh(z / cap), in place; dz/draw = 1 - tanh^2 needs one more [c, V] (the
                # chunk is halved for it by fused_linear_loss).
                t = z.div_(softcap).tanh_()
                dcap = torch.mul(t, t).neg_().add_(1) if (want_h or want_w) else None
                z = t.mul_(softcap)
                del t
            z_y = z.gather(1, y)                            # [c, 1]
            if top_k:
                # eaft: the top-k logits ([c, k], small) before z is overwritten.
                ent = normalized_entropy(z.topk(top_k, dim=-1, sorted=False).values, 0)
            # log-sum-exp by hand, in z's storage: torch.logsumexp allocates a second [c, V].
            z_max = z.amax(dim=-1, keepdim=True)
            e = z.sub_(z_max).exp_()                        # z is now exp(z - max)
            sum_e = e.sum(dim=-1, keepdim=True)
            logp_y = z_y - z_max - sum_e.log()
            logps[start:start + chunk_size] = logp_y.squeeze(1)
            if use_entropy and not top_k:
                ent = _entropy_from_exp(e, sum_e, ent_buf) / math.log(w.shape[0])
            if use_entropy:
                entropies[start:start + chunk_size] = ent
            tok_w = weighting(logp_y, ent if use_entropy else None)
            weights[start:start + chunk_size] = tok_w.squeeze(1)
            total -= (tok_w * logp_y).sum()
            probs = e.div_(sum_e)                           # softmax, still in z's storage
            if use_ref:
                # KL(q || p) = sum_v q (log q - log p), d/dz = p - q. log p from the same storage.
                ref_z = ref_rows[start:start + chunk_size].to(cdt) @ w_ref.T
                if softcap:
                    ref_z = ref_z.div_(softcap).tanh_().mul_(softcap)
                logq = torch.log_softmax(ref_z, dim=-1)
                del ref_z
                q = logq.exp()
                logq.sub_(probs.clamp(min=torch.finfo(cdt).tiny).log_())   # log q - log p, in place
                kl_total += torch.vdot(q.reshape(-1), logq.reshape(-1))    # no [c, V] temporary
                del logq
            if want_h or want_w:
                # dz = w * (softmax - onehot) [+ kl_coef * (softmax - q)], built in z's own storage.
                dz = probs.mul_(tok_w + kl_coef if use_ref else tok_w).scatter_add_(1, y, -tok_w)
                if use_ref:
                    dz.sub_(q.mul_(kl_coef))
                if softcap:
                    dz.mul_(dcap)                           # through the cap: d/draw = d/dz * (1 - tanh^2)
                    del dcap
                if want_h:
                    torch.mm(dz, w, out=grad_rows[start:start + chunk_size])
                if want_w:
                    grad_w.addmm_(dz.T, h)
                del dz
            # Drop every name of this chunk's [c, V] storage before the next chunk allocates its own.
            del z, e, probs
            if use_ref:
                del q
        if use_ref:
            total += kl_coef * kl_total
        ctx.hidden_meta = (hidden_shape, hidden_dtype, weight.dtype)
        ctx.grad_w = grad_w
        ctx.save_for_backward(idx, grad_rows if want_h else None)
        ctx.mark_non_differentiable(logps, kl_total, weights, entropies)
        return total, logps, kl_total, weights, entropies

    @staticmethod
    def backward(ctx, grad_out, _grad_logps, _grad_kl, _grad_weights, _grad_entropies):
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
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None, None


def _entropy_from_exp(e: torch.Tensor, sum_e: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax rows from e = exp(z - max) and its row sums:  H = log S - sum(e log e) / S.
    `buf` ([b, V], allocated once per forward) holds e log e for b rows at a time: a few MiB that
    stay in cache, instead of a [c, V] temporary per chunk."""
    out = torch.empty(e.shape[0], dtype=e.dtype, device=e.device)
    block = buf.shape[0]
    for i in range(0, e.shape[0], block):
        eb = e[i:i + block]
        t = torch.special.xlogy(eb, eb, out=buf[:eb.shape[0]])
        out[i:i + block] = sum_e[i:i + block, 0].log() - t.sum(-1) / sum_e[i:i + block, 0]
    return out


# Rows per block of the whole-vocabulary entropy (eaft with eaft_top_k=0): 8 x 151936 fp32 is 4.6 MiB.
ENTROPY_BLOCK_ROWS = 8


def _check_shapes(hidden, weight, labels) -> None:
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"fused loss: hidden {tuple(hidden.shape)} must be labels {tuple(labels.shape)} + [H]")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"fused loss: weight {tuple(weight.shape)} must be [V, {hidden.shape[-1]}]")


def fused_linear_loss(hidden, weight, labels, weighting: TokenWeight, *, num_tokens=None,
                      ignore_index: int = IGNORE_INDEX, chunk_size: Optional[int] = None,
                      chunk_budget: int = DEFAULT_CHUNK_BUDGET_BYTES, ref_hidden=None, ref_weight=None, kl_coef: float = 0.0,
                      softcap: Optional[float] = None) -> LossParts:
    """The whole loss family on the fused path: LossParts as `compute_loss(weighting, hidden @ weight.T, ...)`
    gives, without ever holding [tokens, vocab] logits. With ref_hidden/ref_weight (a frozen
    reference model's last hidden states and head) and kl_coef > 0, adds kl_coef x KL(ref || model).
    With `softcap` the logits are cap * tanh(hidden @ weight.T / cap) (Gemma 2's final_logit_softcapping),
    for the model and the reference alike."""
    _check_shapes(hidden, weight, labels)
    use_ref = kl_term_on(ref_hidden, kl_coef)
    if use_ref:
        _check_shapes(ref_hidden, ref_weight, labels)
        if ref_weight.shape[0] != weight.shape[0]:
            raise ValueError(f"fused loss: reference vocabulary {ref_weight.shape[0]} != model's {weight.shape[0]}")
    # With a reference, a chunk holds up to four [c, V] tensors at once instead of one; a softcap adds one.
    if chunk_size is None:
        chunk = max(1, default_chunk_rows(weight.shape[0], chunk_budget) // ((4 if use_ref else 1) + bool(softcap)))
    else:
        chunk = int(chunk_size)
    if chunk < 1:
        raise ValueError(f"fused loss: chunk_size must be >= 1, got {chunk_size}")
    need_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    total, logps, kl, weights, entropies = _FusedLinearTokenLoss.apply(hidden, weight, labels, weighting, int(ignore_index), chunk,
                                                   need_grads, ref_hidden if use_ref else None,
                                                   ref_weight if use_ref else None, float(kl_coef),
                                                   float(softcap) if softcap else None)
    loss = _reduce(total, logps.numel() if num_tokens is None else num_tokens)
    return _parts(loss, total.detach(), logps, kl, weights, entropies if weighting.needs_entropy else None)


# --------------------------------------------------------------------------------------------
# Heads: what a model's forward hands its last hidden states to (model.accept_head)


class Reference(NamedTuple):
    """The frozen reference of a step with a KL term (asft), as the fused head needs it."""

    hidden: torch.Tensor  # the reference's last hidden states of the same micro-batch
    model: Any            # has head_weight(policy_weight): a context manager giving the reference's head weight
    kl_coef: float


@dataclass
class FusedHead:
    """The output head and the loss of one micro-batch on the fused path, as one object.

    The training step builds one per micro-batch and passes it to the model's forward
    (`engine.forward(batch, head=FusedHead(...))`). The forward runs the decoder and, instead of
    projecting every position to the vocabulary, calls `head(hidden, weight, softcap)` with its
    last hidden states, its output-head weight (gathered by ZeRO-3 for the forward like any other
    parameter) and its final-logit softcap (Gemma 2) or None. The head computes the loss chunk by
    chunk (fused_linear_loss: never [tokens, vocab] logits) and returns LossParts. That value is what
    the forward, and so the engine's forward, returns: the step back-propagates its `loss` (under
    ZeRO-3 the returned tensors carry the engine's backward hooks, so back-propagate the returned
    value, not another reference to it) and logs its sums.

    `hidden` may come as one long row (rows laid end to end, engine.rows_end_to_end): it is viewed
    back to the shape of `labels`, as is the reference's.
    """

    labels: torch.Tensor
    weighting: TokenWeight
    num_tokens: Optional[torch.Tensor] = None   # targets of the whole optimizer step (default: these)
    chunk_budget: int = DEFAULT_CHUNK_BUDGET_BYTES
    reference: Optional[Reference] = None

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor, softcap: Optional[float] = None) -> LossParts:
        labels = self.labels.to(hidden.device)
        hidden = hidden.view(*labels.shape, hidden.shape[-1])
        num_tokens = self.num_tokens.to(hidden.device) if isinstance(self.num_tokens, torch.Tensor) else self.num_tokens
        common = dict(num_tokens=num_tokens, chunk_budget=self.chunk_budget, softcap=softcap)
        ref = self.reference
        if ref is None:
            return fused_linear_loss(hidden, weight, labels, self.weighting, **common)
        with ref.model.head_weight(weight) as ref_weight:  # a collective under ZeRO-3: every rank enters
            return fused_linear_loss(hidden, weight, labels, self.weighting, ref_hidden=ref.hidden.view_as(hidden),
                                     ref_weight=ref_weight, kl_coef=ref.kl_coef, **common)


class HiddenStatesHead:
    """The head that returns the last hidden states as they come: a frozen reference's forward on
    the fused path, whose states FusedHead then projects chunk by chunk."""

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor, softcap: Optional[float] = None) -> torch.Tensor:
        return hidden


def fused_linear_dft_loss(hidden, weight, labels, *, num_tokens=None, ignore_index: int = IGNORE_INDEX,
                          prob_floor: float = 0.0, chunk_size: Optional[int] = None) -> torch.Tensor:
    """`dft_loss(hidden @ weight.T, labels, ...)` without the full logits: same value and gradients.

    hidden [N, H] or [B, T, H] with labels [N] / [B, T] (already shifted); weight [V, H]. Only target
    rows are projected, `chunk_size` rows at a time (default: default_chunk_rows(V)); logits are
    accumulated in fp32, gradients return in the input dtypes. The DFT weight is max(p, prob_floor).
    """
    return fused_linear_loss(hidden, weight, labels, TokenWeight(floor=prob_floor), num_tokens=num_tokens,
                             ignore_index=ignore_index, chunk_size=chunk_size).loss


def fused_linear_sft_loss(hidden, weight, labels, *, num_tokens=None, ignore_index: int = IGNORE_INDEX,
                          prob_floor: float = 0.0, chunk_size: Optional[int] = None) -> torch.Tensor:
    """`sft_loss(hidden @ weight.T, labels, ...)` without the full logits (prob_floor is ignored)."""
    return fused_linear_loss(hidden, weight, labels, SFT, num_tokens=num_tokens, ignore_index=ignore_index,
                             chunk_size=chunk_size).loss
