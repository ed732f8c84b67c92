"""The CUDA path: NCCL, bf16 by `precision=auto`, fused Adam. Skipped on machines without a GPU."""

import os

import pytest
import torch

from tests.distributed.helpers import BIN, QUICK, clean_env, free_port, read_metrics, run

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_gpu_run_uses_bf16_and_learns(tmp_path):
    out = tmp_path / "run"
    ngpu = min(2, torch.cuda.device_count())
    cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", str(ngpu), "--master_port", str(free_port()),
           "--module", "dft_ds.train"] + QUICK + [f"train.output_dir={out}", "train.max_steps=20"]
    proc = run(cmd, clean_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"  # auto must take bf16 where the card has it
    assert f"precision {expected}" in proc.stdout
    rows = read_metrics(out)
    assert rows[-1]["nll"] < rows[0]["nll"] - 0.5


def test_fused_head_on_cuda_bf16_matches_fp64_reference():
    """The fused head's bf16 CUDA kernels (cuBLAS, fp32 accumulation) against an fp64 reference."""
    from dft_ds.loss import compute_loss, fused_linear_loss, token_weight

    g = torch.Generator().manual_seed(0)
    n, h, v = 3000, 256, 32000
    hidden = torch.randn(n, h, generator=g).bfloat16()
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).bfloat16()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    for weighting in (token_weight("dft"), token_weight("power", alpha=0.5, prob_floor=0.05), token_weight("sft")):
        hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
        ref = compute_loss(weighting, hd @ wd.T, labels, num_tokens=None)
        ref.loss.backward()
        hc = hidden.cuda().requires_grad_()
        wc = weight.cuda().requires_grad_()
        got = fused_linear_loss(hc, wc, labels.cuda(), weighting, chunk_size=700)
        got.loss.backward()
        assert got.loss.item() == pytest.approx(ref.loss.item(), rel=1e-4)
        torch.testing.assert_close(hc.grad.double().cpu(), hd.grad, rtol=2e-2, atol=1e-5)
        torch.testing.assert_close(wc.grad.double().cpu(), wd.grad, rtol=2e-2, atol=1e-5)


def test_flash_attention_keeps_packed_documents_apart_in_a_batch_of_rows():
    """flash_attention_2 on two packed rows: each document's logits equal the document run alone
    (engine._forward lays the rows end to end; transformers alone would attend across documents)."""
    pytest.importorskip("flash_attn")
    from transformers import AutoModelForCausalLM

    from dft_ds import engine, synthetic

    torch.manual_seed(0)
    config = synthetic.tiny_model_config(64, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=2, intermediate_size=256)
    config._attn_implementation = "flash_attention_2"
    model = AutoModelForCausalLM.from_config(config).cuda().bfloat16().eval()

    class Wrapped:
        module = model

        def __call__(self, **kwargs):
            return model(**kwargs)

    ids = torch.randint(4, 64, (2, 12))
    positions = torch.tensor([list(range(5)) + list(range(7)), list(range(8)) + list(range(4))])
    with torch.no_grad():
        got = engine._forward(Wrapped(), torch.device("cuda"), {"input_ids": ids, "position_ids": positions}).logits
        for row, cut in ((0, 5), (1, 8)):
            for doc in (slice(0, cut), slice(cut, 12)):
                alone = model(input_ids=ids[row:row + 1, doc].cuda()).logits
                torch.testing.assert_close(got[row:row + 1, doc].float(), alone.float(), atol=2e-2, rtol=2e-2)
