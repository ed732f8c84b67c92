"""The fused LM head + loss (fused_linear_{dft,sft}_loss) against the unfused losses on full logits:
values and gradients for hidden states and head weight, with ignored positions, num_tokens given,
chunk sizes that do and do not divide the targets, the probability floor, bf16 inputs and a batch
with no targets. Peak memory is measured in benchmarks/loss_bench.py, not here."""

from __future__ import annotations

import pytest
import torch

from dft_ds.loss import (
    IGNORE_INDEX,
    default_chunk_rows,
    dft_loss,
    fused_linear_dft_loss,
    fused_linear_sft_loss,
    sft_loss,
)

FUSED = {"dft": fused_linear_dft_loss, "sft": fused_linear_sft_loss}
UNFUSED = {"dft": dft_loss, "sft": sft_loss}
B, T, H, V = 2, 9, 16, 37


def _inputs(dtype=torch.float64, seed=0, ignore_every=3):
    g = torch.Generator().manual_seed(seed)
    # Large enough logits that probabilities spread over (0, 1): the DFT weight matters.
    hidden = (torch.randn(B, T, H, generator=g) * 1.5).to(dtype)
    weight = torch.randn(V, H, generator=g).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels.view(-1)[::ignore_every] = IGNORE_INDEX
    return hidden, weight, labels


def _value_and_grads(fn, hidden, weight, *args, **kwargs):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    loss = fn(h, w, *args, **kwargs)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _unfused(kind, prob_floor=0.0):
    base = UNFUSED[kind]
    if kind == "dft" and prob_floor > 0:
        from dft_ds.loss import compute_loss

        def base(logits, labels, *, num_tokens=None, ignore_index=IGNORE_INDEX):
            return compute_loss("dft", logits, labels, num_tokens=num_tokens, prob_floor=prob_floor,
                                ignore_index=ignore_index).loss

    def fn(h, w, labels, **kw):
        return base(h @ w.T, labels, **kw)
    return fn


@pytest.mark.parametrize("kind", ["dft", "sft"])
@pytest.mark.parametrize("chunk_size", [1, 7, 1000, None])
@pytest.mark.parametrize("num_tokens", [None, 40])
def test_fused_equals_unfused_fp64(kind, chunk_size, num_tokens):
    hidden, weight, labels = _inputs()
    ref = _value_and_grads(_unfused(kind), hidden, weight, labels, num_tokens=num_tokens)
    got = _value_and_grads(FUSED[kind], hidden, weight, labels, num_tokens=num_tokens, chunk_size=chunk_size)
    for r, g in zip(ref, got):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["dft", "sft"])
def test_fused_fp32_matches_fp64_reference(kind):
    hidden, weight, labels = _inputs()
    ref = _value_and_grads(_unfused(kind), hidden, weight, labels, num_tokens=25)
    got = _value_and_grads(FUSED[kind], hidden.float(), weight.float(), labels, num_tokens=25, chunk_size=5)
    for r, g in zip(ref, got):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-6)


def test_ignored_positions_get_zero_grad_and_no_loss():
    hidden, weight, labels = _inputs()
    _, gh, _ = _value_and_grads(fused_linear_dft_loss, hidden, weight, labels, chunk_size=4)
    ignored = labels == IGNORE_INDEX
    assert ignored.any() and (~ignored).any()
    assert torch.all(gh[ignored] == 0)
    assert torch.all(gh[~ignored].abs().sum(-1) > 0)
    # Changing hidden states at ignored positions changes nothing.
    moved = hidden.clone()
    moved[ignored] += 100.0
    torch.testing.assert_close(fused_linear_dft_loss(moved, weight, labels),
                               fused_linear_dft_loss(hidden, weight, labels))


def test_default_num_tokens_is_target_count():
    hidden, weight, labels = _inputs()
    n = int((labels != IGNORE_INDEX).sum())
    torch.testing.assert_close(fused_linear_dft_loss(hidden, weight, labels),
                               fused_linear_dft_loss(hidden, weight, labels, num_tokens=n))
    torch.testing.assert_close(fused_linear_dft_loss(hidden, weight, labels, num_tokens=torch.tensor(2 * n)),
                               fused_linear_dft_loss(hidden, weight, labels) / 2)


@pytest.mark.parametrize("chunk_size", [1, 6])
def test_prob_floor_matches_unfused(chunk_size):
    hidden, weight, labels = _inputs()
    floor = 0.2
    ref = _value_and_grads(_unfused("dft", floor), hidden, weight, labels, num_tokens=30)
    got = _value_and_grads(fused_linear_dft_loss, hidden, weight, labels, num_tokens=30,
                           prob_floor=floor, chunk_size=chunk_size)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    # The floor is active on these inputs: without it the value differs.
    plain = fused_linear_dft_loss(hidden, weight, labels, num_tokens=30)
    assert not torch.allclose(plain, got[0])


def test_flat_inputs_and_weight_without_grad():
    hidden, weight, labels = _inputs()
    h = hidden.reshape(-1, H).clone().requires_grad_(True)
    loss = fused_linear_dft_loss(h, weight, labels.reshape(-1), chunk_size=3)
    loss.backward()
    ref = _value_and_grads(_unfused("dft"), hidden, weight, labels)
    torch.testing.assert_close(loss.detach(), ref[0])
    torch.testing.assert_close(h.grad.reshape(B, T, H), ref[1])
    assert weight.grad is None


def test_grad_output_scales_gradients():
    hidden, weight, labels = _inputs()
    ref = _value_and_grads(lambda h, w, y: 3.0 * _unfused("dft")(h, w, y), hidden, weight, labels)
    got = _value_and_grads(lambda h, w, y: 3.0 * fused_linear_dft_loss(h, w, y, chunk_size=5),
                           hidden, weight, labels)
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("kind", ["dft", "sft"])
def test_bf16_inputs_close_to_fp32_and_grads_bf16(kind):
    hidden, weight, labels = _inputs(torch.float32)
    hb, wb = hidden.bfloat16(), weight.bfloat16()
    # The fp32 computation on the same (bf16-rounded) inputs is the reference.
    ref = _value_and_grads(_unfused(kind), hb.float(), wb.float(), labels, num_tokens=20)
    loss, gh, gw = _value_and_grads(FUSED[kind], hb, wb, labels, num_tokens=20, chunk_size=4)
    assert loss.dtype == torch.float32  # accumulated in fp32, like dft_loss on bf16 logits
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh.float(), ref[1], rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(gw.float(), ref[2], rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("kind", ["dft", "sft"])
def test_all_ignored_gives_zero_and_zero_grads(kind):
    hidden, weight, _ = _inputs()
    labels = torch.full((B, T), IGNORE_INDEX)
    loss, gh, gw = _value_and_grads(FUSED[kind], hidden, weight, labels, chunk_size=4)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert gh.shape == hidden.shape and torch.all(gh == 0)
    assert gw.shape == weight.shape and torch.all(gw == 0)


def test_no_grad_forward_matches():
    hidden, weight, labels = _inputs()
    with torch.no_grad():
        a = fused_linear_dft_loss(hidden.requires_grad_(True), weight, labels, chunk_size=4)
    assert not a.requires_grad
    torch.testing.assert_close(a, dft_loss(hidden.detach() @ weight.T, labels))


def test_default_chunk_rows():
    assert default_chunk_rows(32000, 256 << 20) == (256 << 20) // (32000 * 4) == 2097
    assert default_chunk_rows(151936, 256 << 20) == 441
    assert default_chunk_rows(32000) == 1048  # the 128 MiB default budget
    assert default_chunk_rows(10**9, 1) == 1


def test_bad_shapes_are_named():
    hidden, weight, labels = _inputs()
    with pytest.raises(ValueError, match="labels"):
        fused_linear_dft_loss(hidden, weight, labels[:, :-1])
    with pytest.raises(ValueError, match="weight"):
        fused_linear_dft_loss(hidden, weight[:, :-1], labels)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_dft_loss(hidden, weight, labels, chunk_size=0)
