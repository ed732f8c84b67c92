"""The loss family (sft, dft, dft with a floor, power, mix, asft) on the unfused and the fused path.

Formulas are checked against hand-written per-token expressions; then the fused path's value,
gradients (hidden states and head weight) and logging sums are checked against the unfused path
for every type, with ignored tokens, chunk sizes that do not divide the targets, and bf16 inputs,
with and without Gemma 2's final-logit softcapping (cap * tanh(z / cap)) inside the fused head.
"""

from __future__ import annotations

import math

import pytest
import torch

from dft_ds.loss import (
    IGNORE_INDEX,
    TokenWeight,
    compute_loss,
    fused_linear_loss,
    kl_ref_model,
    mix_fraction,
    token_weight,
)

B, T, H, V = 2, 11, 12, 41

# (name, TokenWeight, kl_coef): every member of the family, asft with its KL term.
FAMILY = [
    ("sft", token_weight("sft"), 0.0),
    ("dft", token_weight("dft"), 0.0),
    ("dft-floor", token_weight("dft", prob_floor=0.2), 0.0),
    ("power-0.5", token_weight("power", alpha=0.5), 0.0),
    ("power-0.5-floor", token_weight("power", alpha=0.5, prob_floor=0.05), 0.0),
    ("mix-mid", token_weight("mix", step=30, mix_start=10, mix_end=50), 0.0),
    ("asft", token_weight("asft"), 0.3),
]


def _inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, H, generator=g) * 1.5).to(dtype)
    weight = torch.randn(V, H, generator=g).to(dtype)
    ref_hidden = (torch.randn(B, T, H, generator=g) * 1.5).to(dtype)
    ref_weight = torch.randn(V, H, generator=g).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels.view(-1)[::4] = IGNORE_INDEX
    return hidden, weight, ref_hidden, ref_weight, labels


# ---------------------------------------------------------------- formulas


def test_weights_follow_their_formulas():
    p = torch.tensor([0.9, 0.3, 0.02], dtype=torch.float64)
    logp = p.log()
    assert token_weight("sft")(logp).tolist() == [1.0, 1.0, 1.0]
    assert token_weight("dft")(logp).tolist() == pytest.approx(p.tolist(), rel=1e-12)
    assert token_weight("dft", prob_floor=0.1)(logp).tolist() == pytest.approx([0.9, 0.3, 0.1], rel=1e-12)
    assert token_weight("power", alpha=0.5)(logp).tolist() == pytest.approx([math.sqrt(x) for x in p.tolist()])
    # alpha 0 is SFT, alpha 1 is DFT.
    assert token_weight("power", alpha=0.0)(logp).tolist() == [1.0, 1.0, 1.0]
    assert token_weight("power", alpha=1.0)(logp).tolist() == pytest.approx(p.tolist(), rel=1e-12)
    # mix at a quarter of the way: 0.75 * 1 + 0.25 * p.
    w = token_weight("mix", step=15, mix_start=10, mix_end=30)(logp)
    assert w.tolist() == pytest.approx([0.75 + 0.25 * x for x in p.tolist()], rel=1e-12)


def test_weight_is_detached():
    logp = torch.tensor([math.log(0.5), math.log(0.2)], dtype=torch.float64, requires_grad=True)
    (-token_weight("power", alpha=0.5)(logp) * logp).sum().backward()
    assert logp.grad.tolist() == pytest.approx([-math.sqrt(0.5), -math.sqrt(0.2)], rel=1e-12)


def test_mix_schedule():
    assert [mix_fraction(s, 10, 30) for s in (0, 9, 10, 20, 29, 30, 99)] == [0, 0, 0, 0.5, 0.95, 1, 1]
    # start == end switches at once.
    assert [mix_fraction(s, 5, 5) for s in (4, 5)] == [0.0, 1.0]
    assert token_weight("mix", step=0, mix_start=10, mix_end=30) == TokenWeight(mix=0.0)


def test_kl_ref_model_matches_torch_kl_div():
    g = torch.Generator().manual_seed(3)
    logits, ref = torch.randn(5, V, generator=g, dtype=torch.float64), torch.randn(5, V, generator=g, dtype=torch.float64)
    expected = torch.nn.functional.kl_div(torch.log_softmax(logits, -1), torch.log_softmax(ref, -1),
                                          log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl_ref_model(logits, ref), expected)
    assert kl_ref_model(ref, ref).abs().max() < 1e-12


def test_asft_adds_kl_and_its_gradient_is_p_minus_q():
    hidden, weight, ref_hidden, ref_weight, labels = _inputs()
    logits = (hidden @ weight.T).requires_grad_()
    ref_logits = ref_hidden @ ref_weight.T
    dft = compute_loss(token_weight("dft"), logits, labels, num_tokens=None)
    asft = compute_loss(token_weight("asft"), logits, labels, num_tokens=None, ref_logits=ref_logits, kl_coef=0.5)
    mask = labels.reshape(-1) != IGNORE_INDEX
    kl = kl_ref_model(logits.detach().reshape(-1, V)[mask], ref_logits.reshape(-1, V)[mask])
    assert asft.kl_sum == pytest.approx(float(kl.sum()), rel=1e-12)
    assert asft.loss.item() == pytest.approx(dft.loss.item() + 0.5 * kl.mean().item(), rel=1e-12)
    # Against the same reference the KL term is zero, and so is its gradient.
    same = compute_loss(token_weight("asft"), logits, labels, num_tokens=None, ref_logits=logits.detach(), kl_coef=0.5)
    assert same.kl_sum == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- fused == unfused, every type


def capped(logits, softcap):
    """Gemma 2's final-logit softcapping, as its forward applies it after the head."""
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def _run(path, weighting, kl_coef, hidden, weight, ref_hidden, ref_weight, labels, softcap=None, **kw):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    if path == "fused":
        parts = fused_linear_loss(h, w, labels, weighting, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                  kl_coef=kl_coef, softcap=softcap, **kw)
    else:
        kw.pop("chunk_size", None)
        ref_logits = capped(ref_hidden @ ref_weight.T, softcap) if kl_coef else None
        parts = compute_loss(weighting, capped(h @ w.T, softcap), labels, ref_logits=ref_logits, kl_coef=kl_coef,
                             **kw)
    parts.loss.backward()
    return parts, h.grad, w.grad


@pytest.mark.parametrize("name,weighting,kl_coef", FAMILY, ids=[f[0] for f in FAMILY])
@pytest.mark.parametrize("chunk_size", [1, 5, None])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
def test_fused_equals_unfused_fp64(name, weighting, kl_coef, chunk_size, softcap):
    inputs = _inputs()
    ref, ref_gh, ref_gw = _run("unfused", weighting, kl_coef, *inputs, num_tokens=30, softcap=softcap)
    got, gh, gw = _run("fused", weighting, kl_coef, *inputs, num_tokens=30, chunk_size=chunk_size, softcap=softcap)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.loss_sum, ref.loss_sum, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.nll_sum, ref.nll_sum, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.prob_sum, ref.prob_sum, rtol=1e-10, atol=1e-12)
    assert got.tokens == ref.tokens == int((inputs[-1] != IGNORE_INDEX).sum())
    assert got.low_prob == ref.low_prob
    assert got.hist.tolist() == ref.hist.tolist()
    assert got.kl_sum == pytest.approx(ref.kl_sum, rel=1e-9, abs=1e-12)
    if kl_coef:
        assert got.kl_sum > 0


@pytest.mark.parametrize("name,weighting,kl_coef", FAMILY, ids=[f[0] for f in FAMILY])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
def test_fused_bf16_inputs_match_fp64_reference(name, weighting, kl_coef, softcap):
    inputs = _inputs()
    bf = [x.to(torch.bfloat16) if x.is_floating_point() else x for x in inputs]
    # The reference on the bf16-rounded inputs, in fp64: what remains is accumulation error only.
    rounded = [x.double() if x.is_floating_point() else x for x in bf]
    ref, ref_gh, ref_gw = _run("unfused", weighting, kl_coef, *rounded, num_tokens=None, softcap=softcap)
    got, gh, gw = _run("fused", weighting, kl_coef, *bf, num_tokens=None, chunk_size=7, softcap=softcap)
    assert gh.dtype == gw.dtype == torch.bfloat16
    assert got.loss.dtype == torch.float32  # accumulated in fp32
    torch.testing.assert_close(got.loss.double(), ref.loss, rtol=1e-5, atol=1e-6)
    # Gradients come back rounded to bf16 (8 bits of mantissa).
    torch.testing.assert_close(gh.double(), ref_gh, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(gw.double(), ref_gw, rtol=1e-2, atol=1e-3)


def test_reference_vocabulary_must_match():
    hidden, weight, ref_hidden, ref_weight, labels = _inputs()
    with pytest.raises(ValueError, match="reference vocabulary"):
        fused_linear_loss(hidden, weight, labels, token_weight("asft"), ref_hidden=ref_hidden,
                          ref_weight=ref_weight[:-1], kl_coef=0.1)
