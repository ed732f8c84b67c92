"""eaft, only_top_p / only_bottom_p: their formulas by hand, the fused head against the full logits,
the logged weight sums, and loss.normalize's rule inside the trainer."""

import math

import pytest
import torch

from dft_ds.loss import IGNORE_INDEX, compute_loss, fused_linear_loss, normalized_entropy, token_weight

LOG = math.log


def test_topk_entropy_by_hand():
    # Top 3 of the row are 0.5, 0.25, 0.25 after renormalising (the tail is far below): H = 1.5 ln 2.
    row = torch.tensor([[LOG(0.5), LOG(0.25), LOG(0.25), -40.0, -41.0]], dtype=torch.float64)
    assert normalized_entropy(row, 3).item() == pytest.approx(1.5 * LOG(2) / LOG(3), rel=1e-12)
    # Two equal logits: H = ln 2 over k = 2, weight 1; a near one-hot row: weight near 0.
    assert normalized_entropy(torch.tensor([[2.0, 2.0, -9.0]], dtype=torch.float64), 2).item() == pytest.approx(1.0)
    assert normalized_entropy(torch.tensor([[30.0, 0.0, 0.0, 0.0]], dtype=torch.float64), 3).item() < 1e-10
    # k = 0 and k >= V: the whole distribution over ln V; the uniform row is 1.
    assert normalized_entropy(torch.zeros(1, 7, dtype=torch.float64), 0).item() == pytest.approx(1.0)
    assert normalized_entropy(torch.zeros(1, 7, dtype=torch.float64), 50).item() == pytest.approx(1.0)
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    full = -(p * p.log()).sum() / LOG(3)
    assert normalized_entropy(p.log().unsqueeze(0), 0).item() == pytest.approx(full.item(), rel=1e-12)
    # The top-k renormalisation differs from the full entropy when the tail carries mass.
    assert normalized_entropy(p.log().unsqueeze(0), 2).item() == pytest.approx(
        -(0.625 * LOG(0.625) + 0.375 * LOG(0.375)) / LOG(2), rel=1e-12)


def test_eaft_loss_by_hand():
    logits = torch.tensor([[LOG(0.5), LOG(0.25), LOG(0.25), -40.0],
                           [5.0, 5.0, -30.0, -30.0],
                           [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 0, IGNORE_INDEX])
    h0 = 1.5 * LOG(2) / LOG(3)  # top-3 entropy of row 0
    h1 = LOG(2) / LOG(3)        # top-3 of row 1: 0.5, 0.5, ~0
    logp = torch.log_softmax(logits.detach(), -1)
    nll = [-logp[0, 1].item(), -logp[1, 0].item()]
    for alpha in (1.0, 0.5):
        parts = compute_loss(token_weight("eaft", alpha=alpha, eaft_top_k=3), logits, labels, num_tokens=None)
        want = (h0 ** alpha * nll[0] + h1 ** alpha * nll[1]) / 2
        assert parts.loss.item() == pytest.approx(want, rel=1e-6)
        assert parts.weight_sum == pytest.approx(h0 ** alpha + h1 ** alpha, rel=1e-6)
        assert parts.entropy_sum == pytest.approx(h0 + h1, rel=1e-6)
    # The weight is detached: the gradient is the weight times SFT's.
    parts = compute_loss(token_weight("eaft", eaft_top_k=3), logits, labels, num_tokens=None)
    (g,) = torch.autograd.grad(parts.loss, logits)
    onehot = torch.zeros_like(logp[:2])
    onehot[0, 1] = onehot[1, 0] = 1
    want = torch.stack([h0 * (logp[0].exp() - onehot[0]), h1 * (logp[1].exp() - onehot[1])]) / 2
    torch.testing.assert_close(g[:2], want)
    assert g[2].abs().max() == 0


@pytest.mark.parametrize("base", ["dft", "sft"])
def test_thresholds_by_hand(base):
    p = torch.tensor([0.9, 0.3, 0.12, 0.05], dtype=torch.float64)
    logp = p.log()
    w_base = p if base == "dft" else torch.ones_like(p)
    top = token_weight("only_top_p", threshold=0.1, threshold_base=base)(logp)
    bottom = token_weight("only_bottom_p", threshold=0.1, threshold_base=base)(logp)
    torch.testing.assert_close(top, w_base * torch.tensor([1, 1, 1, 0.0], dtype=torch.float64))
    torch.testing.assert_close(bottom, w_base * torch.tensor([0, 0, 0, 1.0], dtype=torch.float64))
    if base == "dft":  # the floor applies to the kept tokens' dft weight
        floored = token_weight("only_bottom_p", threshold=0.2, prob_floor=0.08)(logp)
        torch.testing.assert_close(floored, torch.tensor([0, 0, 0.12, 0.08], dtype=torch.float64))


def test_gated_out_tokens_still_count_in_the_normaliser():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 0.0], [0.0, 4.0, 0.0]],
                          dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 2, IGNORE_INDEX])
    logp = torch.log_softmax(logits.detach(), -1)[torch.arange(3), labels[:3]]
    parts = compute_loss(token_weight("only_top_p", threshold=0.2, threshold_base="sft"), logits, labels,
                         num_tokens=None)
    # p = 0.96, 0.018, 0.333: the middle token is gated out, and the mean is still over 3 tokens.
    assert parts.loss.item() == pytest.approx(-(logp[0] + logp[2]).item() / 3, rel=1e-12)
    assert parts.tokens == 3 and parts.zero_weight == 1 and parts.weight_sum == 2.0
    (g,) = torch.autograd.grad(parts.loss, logits)
    assert g[1].abs().max() == 0 and g[3].abs().max() == 0 and g[0].abs().max() > 0


NEW_TYPES = {
    "eaft": dict(eaft_top_k=20),
    "eaft-k5-alpha0.5": dict(eaft_top_k=5, alpha=0.5),
    "eaft-full": dict(eaft_top_k=0),
    "only_top_p-dft": dict(),
    "only_top_p-sft": dict(threshold_base="sft"),
    "only_bottom_p-dft": dict(prob_floor=0.01),
    "only_bottom_p-sft": dict(threshold_base="sft"),
}


@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("name", list(NEW_TYPES))
def test_fused_equals_unfused(name, chunk, softcap):
    torch.manual_seed(0)
    n, hdim, vocab = 37, 16, 60  # 37 rows: no chunk size here divides it
    hidden = torch.randn(n, hdim, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, hdim, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (n,))
    labels[::4] = IGNORE_INDEX
    count = torch.tensor(53.0, dtype=torch.float64)  # a step's count, larger than the rows here
    logits = hidden @ weight.T
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    kwargs = dict(NEW_TYPES[name])
    if name.startswith("only"):  # the threshold at the targets' median p: the gate keeps about half
        mask = labels != IGNORE_INDEX
        p = torch.softmax(logits.detach()[mask], -1).gather(1, labels[mask].unsqueeze(1))
        ps = p.flatten().sort().values
        middle = len(ps) // 2  # halfway between two targets' p: no token sits on the threshold
        kwargs["threshold"] = (ps[middle - 1] + ps[middle]).item() / 2
    weighting = token_weight(name.split("-")[0], **kwargs)
    full = compute_loss(weighting, logits, labels, num_tokens=count)
    g_full = torch.autograd.grad(full.loss, (hidden, weight))
    fused = fused_linear_loss(hidden, weight, labels, weighting, num_tokens=count, chunk_size=chunk, softcap=softcap)
    g_fused = torch.autograd.grad(fused.loss, (hidden, weight))
    assert fused.loss.item() == pytest.approx(full.loss.item(), rel=1e-12)
    for a, b in zip(g_fused, g_full):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert g_full[0].abs().max() > 0
    for field in ("loss_sum", "nll_sum", "prob_sum", "weight_sum", "entropy_sum"):
        assert float(getattr(fused, field)) == pytest.approx(float(getattr(full, field)), rel=1e-10, abs=1e-12), field
    for field in ("tokens", "low_prob", "zero_weight"):
        assert getattr(fused, field) == getattr(full, field), field
    assert torch.equal(fused.hist, full.hist)
    if name.startswith("only"):
        assert 0 < full.zero_weight < full.tokens  # the gate bites, on some tokens only
    if name.startswith("eaft"):
        assert 0 < full.entropy_sum < full.tokens


def test_every_type_logs_its_mean_weight():
    torch.manual_seed(1)
    logits = torch.randn(9, 30, dtype=torch.float64)
    labels = torch.randint(0, 30, (9,))
    p = torch.softmax(logits, -1)[torch.arange(9), labels]
    assert compute_loss(token_weight("sft"), logits, labels, num_tokens=None).weight_sum == pytest.approx(9.0)
    assert compute_loss(token_weight("dft"), logits, labels, num_tokens=None).weight_sum == pytest.approx(p.sum().item())
    assert compute_loss(token_weight("sft"), logits, labels, num_tokens=None).entropy_sum == 0.0


def test_unknown_threshold_base_is_refused():
    with pytest.raises(ValueError, match="threshold base 'x'"):
        token_weight("only_top_p", threshold_base="x")


class _Dist:
    world_size = 2


class _Engine:
    dist = _Dist()


def test_normaliser_rules():
    from dft_ds.config import LossConfig
    from dft_ds.trainer import Trainer

    trainer = Trainer.__new__(Trainer)
    trainer.engine = _Engine()
    batch = {"labels": torch.tensor([[IGNORE_INDEX, 5, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 1, IGNORE_INDEX]])}
    step_count = torch.tensor(40.0, dtype=torch.float64)
    trainer.loss = LossConfig(normalize="step")
    assert trainer.normaliser(step_count, batch) is step_count
    trainer.loss = LossConfig(normalize="micro_batch_mean")
    # 4 targets here; x world 2 because engine.backward multiplies by the world and DeepSpeed averages.
    assert trainer.normaliser(step_count, batch).item() == 8.0
