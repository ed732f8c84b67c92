"""The loss family as pure math: hand-computed values, the DFT gradient (-grad p), ignored positions,
the probability floor, the logging sums, bf16 input, and the property the whole design rests on: a
global batch gives the same gradient however it is split into micro-batches and ranks."""

from __future__ import annotations

import math

import pytest
import torch

from dft_ds.loss import (
    IGNORE_INDEX,
    compute_loss,
    SFT,
    TokenWeight,
    dft_loss,
    sft_loss,
    target_logprobs,
    token_weight,
)


def dft_token_loss(logp, prob_floor=0.0):
    return -TokenWeight(floor=prob_floor)(logp) * logp


def sft_token_loss(logp, prob_floor=0.0):
    return -SFT(logp) * logp

# ---------------------------------------------------------------- hand-computed values

LOGITS = [
    [1.0, 2.0, 0.5, -1.0],
    [0.0, 0.0, 3.0, 1.0],   # ignored position
    [-0.5, 1.5, 0.0, 2.0],
]
LABELS = [1, IGNORE_INDEX, 3]


def _hand_logp(row: list[float], target: int) -> float:
    """log softmax(row)[target] in plain Python."""
    return row[target] - math.log(sum(math.exp(v) for v in row))


def _hand_sums() -> tuple[float, float, int]:
    """(sum of -log p, sum of -p log p, number of targets) over LOGITS/LABELS, by hand."""
    sft = dft = 0.0
    count = 0
    for row, target in zip(LOGITS, LABELS):
        if target == IGNORE_INDEX:
            continue
        logp = _hand_logp(row, target)
        sft += -logp
        dft += -math.exp(logp) * logp
        count += 1
    return sft, dft, count


def test_hand_values_are_what_we_think():
    # Guard the hand computation itself: row 0 target 1 -> e^2 / (e + e^2 + e^0.5 + e^-1)
    # = 7.3891 / (2.7183 + 7.3891 + 1.6487 + 0.3679) = 7.3891 / 12.1240 = 0.6095.
    p0 = math.exp(2.0) / (math.exp(1.0) + math.exp(2.0) + math.exp(0.5) + math.exp(-1.0))
    assert math.isclose(math.exp(_hand_logp(LOGITS[0], 1)), p0)
    assert p0 == pytest.approx(0.6095, abs=1e-4)


@pytest.mark.parametrize("shape", [(3, 4), (1, 3, 4)])
def test_sft_and_dft_match_hand_computation(shape):
    logits = torch.tensor(LOGITS).reshape(shape)
    labels = torch.tensor(LABELS).reshape(shape[:-1])
    sft_sum, dft_sum, count = _hand_sums()
    assert count == 2
    # Default num_tokens: the targets in this call.
    assert sft_loss(logits, labels).item() == pytest.approx(sft_sum / count, rel=1e-6)
    assert dft_loss(logits, labels).item() == pytest.approx(dft_sum / count, rel=1e-6)
    # Explicit num_tokens (e.g. the targets of the whole optimizer step): sum / 10.
    assert sft_loss(logits, labels, num_tokens=10).item() == pytest.approx(sft_sum / 10, rel=1e-6)
    assert dft_loss(logits, labels, num_tokens=10).item() == pytest.approx(dft_sum / 10, rel=1e-6)
    # A tensor count (what an all-reduce hands back) gives the same.
    assert dft_loss(logits, labels, num_tokens=torch.tensor(10)).item() == pytest.approx(dft_sum / 10, rel=1e-6)
    # DFT weights each -log p by p < 1, so it is strictly below SFT here.
    assert dft_loss(logits, labels).item() < sft_loss(logits, labels).item()


def test_target_logprobs_returns_targets_only_and_mask():
    logp, mask = target_logprobs(torch.tensor(LOGITS), torch.tensor(LABELS))
    assert mask.tolist() == [True, False, True]
    assert logp.shape == (2,) and logp.dtype == torch.float32
    assert logp.tolist() == pytest.approx([_hand_logp(LOGITS[0], 1), _hand_logp(LOGITS[2], 3)], rel=1e-6)


def test_custom_ignore_index():
    logits = torch.tensor(LOGITS)
    labels = torch.tensor([1, -1, 3])
    sft_sum, dft_sum, count = _hand_sums()
    assert dft_loss(logits, labels, ignore_index=-1).item() == pytest.approx(dft_sum / count, rel=1e-6)
    assert sft_loss(logits, labels, ignore_index=-1).item() == pytest.approx(sft_sum / count, rel=1e-6)


# ---------------------------------------------------------------- gradients


def _random_case(positions=6, vocab=9, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(positions, vocab, generator=gen, dtype=dtype) * 2
    labels = torch.randint(0, vocab, (positions,), generator=gen)
    return logits, labels


def test_dft_gradient_is_minus_grad_p():
    logits, labels = _random_case()
    a = logits.clone().requires_grad_()
    dft_loss(a, labels, num_tokens=1).backward()  # the plain sum over positions

    b = logits.clone().requires_grad_()
    p = torch.softmax(b, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (-p.sum()).backward()

    assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    assert a.grad.abs().max() > 1e-3  # a real gradient, not two zeros


def test_sft_gradient_is_dft_gradient_divided_by_p():
    logits, labels = _random_case(positions=1, vocab=7, seed=3)
    a = logits.clone().requires_grad_()
    dft_loss(a, labels).backward()
    b = logits.clone().requires_grad_()
    sft_loss(b, labels).backward()
    p = torch.softmax(logits, dim=-1)[0, labels[0]]
    assert 0.0 < p < 0.9
    assert torch.allclose(b.grad, a.grad / p, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(b.grad, a.grad, rtol=1e-3)


def test_sft_gradient_matches_dft_over_p_at_every_position():
    logits, labels = _random_case(positions=5, vocab=6, seed=4)
    a = logits.clone().requires_grad_()
    dft_loss(a, labels, num_tokens=1).backward()
    b = logits.clone().requires_grad_()
    sft_loss(b, labels, num_tokens=1).backward()
    p = torch.softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1))  # [positions, 1]
    assert torch.allclose(b.grad, a.grad / p, rtol=1e-5, atol=1e-7)


def test_sft_matches_torch_cross_entropy():
    logits, labels = _random_case(positions=8, vocab=11, seed=5, dtype=torch.float32)
    labels[[1, 4]] = IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    assert torch.allclose(sft_loss(logits, labels), expected, rtol=1e-6)


# ---------------------------------------------------------------- ignored positions


@pytest.mark.parametrize("loss_fn", [sft_loss, dft_loss])
def test_ignored_positions_contribute_nothing(loss_fn):
    logits, labels = _random_case(positions=7, vocab=5, seed=6)
    ignored = torch.tensor([0, 3, 4])
    labels[ignored] = IGNORE_INDEX

    a = logits.clone().requires_grad_()
    value_a = loss_fn(a, labels)
    value_a.backward()

    changed = logits.clone()
    changed[ignored] = torch.randn(len(ignored), logits.shape[-1], dtype=logits.dtype) * 50
    b = changed.requires_grad_()
    value_b = loss_fn(b, labels)
    value_b.backward()

    assert value_a.item() == value_b.item()
    assert torch.equal(a.grad, b.grad)
    assert torch.count_nonzero(a.grad[ignored]) == 0
    kept = torch.tensor([i for i in range(7) if i not in ignored.tolist()])
    assert torch.count_nonzero(a.grad[kept]) > 0


@pytest.mark.parametrize("loss_fn", [sft_loss, dft_loss])
def test_all_ignored_gives_zero_not_nan(loss_fn):
    logits = torch.randn(2, 4, 5, requires_grad=True)
    labels = torch.full((2, 4), IGNORE_INDEX)
    value = loss_fn(logits, labels)
    assert value.item() == 0.0 and not torch.isnan(value)
    assert loss_fn(logits, labels, num_tokens=torch.tensor(0)).item() == 0.0
    value.backward()  # a rank with no targets must still be able to take part in backward
    assert torch.count_nonzero(logits.grad) == 0


# ---------------------------------------------------------------- probability floor


def test_prob_floor_uses_max_p_floor_as_weight():
    p = torch.tensor([0.5, 0.01, 0.1, 0.9], dtype=torch.float64)
    logp = p.log()
    got = dft_token_loss(logp, prob_floor=0.1)
    expected = [-max(q, 0.1) * math.log(q) for q in p.tolist()]
    assert got.tolist() == pytest.approx(expected, rel=1e-12)
    # Below the floor the weight is the floor, not p: 0.1 * -log 0.01, ten times plain DFT.
    assert got[1].item() == pytest.approx(-0.1 * math.log(0.01))
    assert got[1].item() == pytest.approx(10 * dft_token_loss(logp)[1].item())
    # Above the floor nothing changes.
    assert got[0].item() == pytest.approx(-0.5 * math.log(0.5))


def test_prob_floor_zero_is_plain_dft():
    p = torch.tensor([0.5, 0.01, 0.3], dtype=torch.float64)
    logp = p.log()
    expected = [-q * math.log(q) for q in p.tolist()]
    assert dft_token_loss(logp, prob_floor=0.0).tolist() == pytest.approx(expected, rel=1e-12)
    assert dft_token_loss(logp).tolist() == pytest.approx(expected, rel=1e-12)


def test_prob_floor_weight_is_detached():
    p = torch.tensor([0.5, 0.01], dtype=torch.float64)
    logp = p.log().requires_grad_()
    dft_token_loss(logp, prob_floor=0.1).sum().backward()
    # d/dlogp [-sg(w) logp] = -w: the weight itself carries no gradient.
    assert logp.grad.tolist() == pytest.approx([-0.5, -0.1], rel=1e-12)


def test_sft_token_loss_ignores_floor():
    # Through the library's own routes: the floor given to sft changes neither its weight nor its loss.
    logp = torch.tensor([math.log(0.01), math.log(0.6)])
    assert token_weight("sft", prob_floor=0.5)(logp).tolist() == [1.0, 1.0]
    logits = torch.tensor([[[math.log(0.01), math.log(0.99)], [math.log(0.6), math.log(0.4)]]])
    labels = torch.tensor([[0, 0]])
    for floor in (0.0, 0.5):
        parts = compute_loss("sft", logits, labels, num_tokens=2, prob_floor=floor)
        assert parts.loss.item() == pytest.approx(-(math.log(0.01) + math.log(0.6)) / 2, rel=1e-6)


# ---------------------------------------------------------------- compute_loss sums


@pytest.mark.parametrize("loss_type", ["dft", "sft"])
def test_compute_loss_parts_are_consistent(loss_type):
    logits, labels = _random_case(positions=10, vocab=8, seed=7, dtype=torch.float32)
    labels[[2, 5, 6]] = IGNORE_INDEX
    parts = compute_loss(loss_type, logits, labels, num_tokens=20)
    assert parts.tokens == 7

    loss_fn = {"dft": dft_loss, "sft": sft_loss}[loss_type]
    assert torch.allclose(parts.loss, loss_fn(logits, labels, num_tokens=20), rtol=1e-6)
    assert torch.allclose(parts.loss_sum, loss_fn(logits, labels, num_tokens=1), rtol=1e-6)
    assert torch.allclose(parts.loss_sum / 20, parts.loss, rtol=1e-6)
    assert torch.allclose(parts.nll_sum / parts.tokens, sft_loss(logits, labels), rtol=1e-6)

    probs = torch.softmax(logits.double(), dim=-1)
    kept = labels != IGNORE_INDEX
    mean_p = probs[kept].gather(-1, labels[kept].unsqueeze(-1)).mean().item()
    assert (parts.prob_sum / parts.tokens).item() == pytest.approx(mean_p, rel=1e-5)
    for detached in (parts.loss_sum, parts.nll_sum, parts.prob_sum):
        assert not detached.requires_grad
    p_kept = probs[kept].gather(-1, labels[kept].unsqueeze(-1)).squeeze(-1)
    assert parts.low_prob == int((p_kept < 0.1).sum())
    assert parts.hist.sum().item() == parts.tokens
    assert parts.hist.tolist() == torch.histc(p_kept.float(), bins=20, min=0, max=1).tolist()


def test_compute_loss_hand_values():
    parts = compute_loss("dft", torch.tensor(LOGITS), torch.tensor(LABELS), num_tokens=10)
    sft_sum, dft_sum, count = _hand_sums()
    assert parts.tokens == count
    assert parts.loss.item() == pytest.approx(dft_sum / 10, rel=1e-6)
    assert parts.loss_sum.item() == pytest.approx(dft_sum, rel=1e-6)
    assert parts.nll_sum.item() == pytest.approx(sft_sum, rel=1e-6)
    p_sum = math.exp(_hand_logp(LOGITS[0], 1)) + math.exp(_hand_logp(LOGITS[2], 3))
    assert parts.prob_sum.item() == pytest.approx(p_sum, rel=1e-6)


def test_compute_loss_applies_prob_floor():
    logits, labels = _random_case(positions=6, vocab=50, seed=8, dtype=torch.float32)
    plain = compute_loss("dft", logits, labels, num_tokens=6)
    floored = compute_loss("dft", logits, labels, num_tokens=6, prob_floor=0.5)
    logp, _ = target_logprobs(logits, labels)
    expected = (-(logp.exp().clamp(min=0.5)) * logp).sum() / 6
    assert torch.allclose(floored.loss, expected, rtol=1e-6)
    assert floored.loss.item() > plain.loss.item()
    assert torch.equal(floored.nll_sum, plain.nll_sum)  # logging sums do not depend on the floor


def test_compute_loss_gradient_flows_to_logits():
    logits, labels = _random_case(positions=4, vocab=6, seed=9)
    a = logits.clone().requires_grad_()
    compute_loss("dft", a, labels, num_tokens=4).loss.backward()
    b = logits.clone().requires_grad_()
    dft_loss(b, labels, num_tokens=4).backward()
    assert torch.allclose(a.grad, b.grad)


# ---------------------------------------------------------------- split invariance


SEQ_LEN, HIDDEN, VOCAB = 6, 5, 7
TARGETS_PER_SEQ = [1, 6, 2, 4]  # uneven on purpose: means of means would weight tokens unequally


def _global_batch():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(len(TARGETS_PER_SEQ), SEQ_LEN, HIDDEN, generator=gen, dtype=torch.float64)
    weight = torch.randn(HIDDEN, VOCAB, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, VOCAB, (len(TARGETS_PER_SEQ), SEQ_LEN), generator=gen)
    for row, targets in enumerate(TARGETS_PER_SEQ):
        labels[row, : SEQ_LEN - targets] = IGNORE_INDEX  # the prompt part carries no loss
    return x, weight, labels


def _grad(loss_fn, x, weight, labels, num_tokens):
    w = weight.clone().requires_grad_()
    loss = loss_fn(x @ w, labels, num_tokens=num_tokens)
    loss.backward()
    return w.grad, loss.detach()


def _split_grad(loss_fn, x, weight, labels, accum, world, num_tokens_of):
    """Gradient as a data-parallel run computes it.

    Rank r takes rows [r*per_rank, (r+1)*per_rank), split into `accum` micro-batches. Each rank sums
    its micro-batch gradients (gradient accumulation); DeepSpeed then AVERAGES over ranks, which
    Engine.backward undoes by scaling each loss by world_size.
    """
    rows = x.shape[0]
    per_rank = rows // world
    micro = per_rank // accum
    rank_grads, total_loss = [], 0.0
    for rank in range(world):
        w = weight.clone().requires_grad_()
        for step in range(accum):
            lo = rank * per_rank + step * micro
            sl = slice(lo, lo + micro)
            loss, scale = num_tokens_of(loss_fn, x[sl], w, labels[sl], accum, world)
            (loss * scale).backward()
            total_loss += loss.item()
        rank_grads.append(w.grad)
    return torch.stack(rank_grads).mean(0), total_loss


def _global_count(total):
    def fn(loss_fn, x, w, labels, accum, world):
        return loss_fn(x @ w, labels, num_tokens=total), world  # loss * world_size, as Engine.backward
    return fn


def _naive(loss_fn, x, w, labels, accum, world):
    # Mean over this micro-batch's own targets, divided by accumulation steps, averaged over ranks.
    return loss_fn(x @ w, labels), 1.0 / accum


SPLITS = [(1, 4), (2, 2), (4, 1), (1, 2), (2, 1), (1, 1)]  # (micro-batches per rank, ranks)


@pytest.mark.parametrize("loss_fn", [dft_loss, sft_loss], ids=["dft", "sft"])
@pytest.mark.parametrize("accum, world", SPLITS)
def test_gradient_does_not_depend_on_how_the_global_batch_is_split(loss_fn, accum, world):
    x, weight, labels = _global_batch()
    total = int((labels != IGNORE_INDEX).sum())
    assert total == sum(TARGETS_PER_SEQ)
    expected, expected_loss = _grad(loss_fn, x, weight, labels, total)
    got, got_loss = _split_grad(loss_fn, x, weight, labels, accum, world, _global_count(total))
    # target_logprobs computes in fp32, so the fp64 model agrees to fp32 precision.
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)
    # The logged step loss is the sum of the micro-batch losses over all ranks.
    assert got_loss == pytest.approx(expected_loss.item(), rel=1e-6)


@pytest.mark.parametrize("loss_fn", [dft_loss, sft_loss], ids=["dft", "sft"])
@pytest.mark.parametrize("accum, world", [(1, 4), (2, 2), (4, 1)])
def test_naive_mean_per_micro_batch_gives_a_different_gradient(loss_fn, accum, world):
    x, weight, labels = _global_batch()
    total = int((labels != IGNORE_INDEX).sum())
    expected, _ = _grad(loss_fn, x, weight, labels, total)
    naive, _ = _split_grad(loss_fn, x, weight, labels, accum, world, _naive)
    # The same check the invariance test makes would catch the reference implementation's bug.
    assert not torch.allclose(naive, expected, rtol=1e-5, atol=1e-7)
    assert (naive - expected).norm() > 0.05 * expected.norm()


def test_naive_mean_agrees_when_the_split_is_whole():
    # Sanity: with one micro-batch on one rank the two reductions coincide.
    x, weight, labels = _global_batch()
    total = int((labels != IGNORE_INDEX).sum())
    expected, _ = _grad(dft_loss, x, weight, labels, total)
    naive, _ = _split_grad(dft_loss, x, weight, labels, 1, 1, _naive)
    assert torch.allclose(naive, expected, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- bf16 input


@pytest.mark.parametrize("loss_fn", [dft_loss, sft_loss], ids=["dft", "sft"])
def test_bf16_logits_give_fp32_result_close_to_fp32(loss_fn):
    logits, labels = _random_case(positions=16, vocab=32, seed=12, dtype=torch.float32)
    labels[:4] = IGNORE_INDEX
    low = logits.to(torch.bfloat16).requires_grad_()
    value = loss_fn(low, labels)
    assert value.dtype == torch.float32
    # Exactly the fp32 computation on the bf16-rounded values (the upcast happens before log_softmax) ...
    assert torch.equal(value, loss_fn(low.detach().float(), labels))
    # ... and close to the fp32 computation on the unrounded logits.
    assert value.item() == pytest.approx(loss_fn(logits, labels).item(), rel=2e-2)
    value.backward()
    assert low.grad.dtype == torch.bfloat16
    parts = compute_loss("dft", low.detach(), labels, num_tokens=12)
    assert parts.loss.dtype == parts.nll_sum.dtype == parts.prob_sum.dtype == torch.float32


@pytest.mark.parametrize("tiles, shape", [(1, (2, 7, 16)), (3, (2, 7, 16)), (20, (1, 5, 16))])
def test_tiled_mlp_matches_the_mlp_in_value_and_gradients(tiles, shape):
    """model.tiled_mlp: the same output, input gradient and weight gradients, with more tiles than tokens too."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from dft_ds.model import _TiledMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=2, num_key_value_heads=2)).double()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(*shape, dtype=torch.float64)
    want = mlp(x)
    want.backward(g)
    want_grads = [x.grad.clone()] + [p.grad.clone() for p in mlp.parameters()]
    x.grad = None
    mlp.zero_grad()
    calls = []  # per MLP call: grad mode, and whether ZeRO was told each weight's gradient is ready

    def counted(part):
        calls.append((torch.is_grad_enabled(), [getattr(p, "ds_grad_is_ready", None) for p in mlp.parameters()]))
        return mlp.forward(part)

    got = _TiledMLP.apply(x, mlp, counted, tiles)
    assert [mode for mode, _ in calls] == [False] * tiles  # the forward: one call per tile, nothing stored
    del calls[:]
    got.backward(g)
    torch.testing.assert_close(got, want)
    for a, b in zip([x.grad] + [p.grad for p in mlp.parameters()], want_grads):
        torch.testing.assert_close(a, b)
    # The backward: exactly `tiles` calls again, whatever the number of tokens, and a weight's gradient
    # is reported ready only at the last one (after every slice has added to it).
    assert [mode for mode, _ in calls] == [True] * tiles
    assert [ready for _, ready in calls] == [[False] * 3] * (tiles - 1) + [[True] * 3]
    assert all(p.ds_grad_is_ready for p in mlp.parameters())


def test_tiled_mlp_trains_its_weights_when_its_input_needs_no_gradient():
    """The first layer's MLP under LoRA with frozen embeddings: x has no gradient, the weights still get theirs."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from dft_ds.model import apply_tiled_mlp, mlp_modules

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=2, num_key_value_heads=2))
    x = torch.randn(2, 6, 16)
    mlp(x).square().sum().backward()
    want = [p.grad.clone() for p in mlp.parameters()]
    mlp.zero_grad()

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Module()])
            self.layers[0].mlp = mlp

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = Decoder()

        def get_decoder(self):
            return self.decoder

    model = Model()
    names = [n for n, _ in mlp.named_parameters()]
    assert mlp_modules(model) == [mlp] and apply_tiled_mlp(model, 1) == 0 and apply_tiled_mlp(model, 4) == 1
    # The module keeps its class name and parameter names (checkpoints and exports see no wrapper) and its
    # forward now runs tile by tile: four calls of each projection in the forward.
    assert type(mlp).__name__ == "LlamaMLP" and [n for n, _ in mlp.named_parameters()] == names
    calls = []
    hook = mlp.gate_proj.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    out = mlp(x)
    assert calls == [False] * 4
    hook.remove()
    assert out.requires_grad
    out.square().sum().backward()
    for got, ref in zip([p.grad for p in mlp.parameters()], want):
        torch.testing.assert_close(got, ref)
