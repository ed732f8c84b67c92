"""The gradient of a global batch does not depend on how it is split into ranks and micro-batches.

Real DeepSpeed ZeRO-3 engines on gloo, started by torchrun, running the real trainer's step on
the same global batch of 4 rows with uneven target counts: 1 rank x 4 micro-batches,
2 ranks x 2, 4 ranks x 1. Pure DFT and SFT: one launch per world size probes both.
"""

import pytest
import torch

from tests.distributed.helpers import run_probes

SPLITS = [(1, 4), (2, 2), (4, 1)]  # (ranks, accumulation)
LOSSES = ["dft", "sft"]


def overrides(tmp_path, loss: str) -> list[str]:
    return [f"train.output_dir={tmp_path / 'unused'}", "data.synthetic_size=64", "data.packing=false",
            "data.max_length=128", "train.micro_batch_size=1", "train.global_batch_size=4",
            "train.max_grad_norm=0", f"loss.type={loss}", "loss.prob_floor=0", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> dict:
    """{(ranks, loss): probe result} for every split and loss."""
    tmp = tmp_path_factory.mktemp("splits")
    results = {}
    for ranks, _ in SPLITS:
        got = run_probes(tmp, ranks, {loss: overrides(tmp, loss) for loss in LOSSES})
        results.update({(ranks, loss): got[loss] for loss in LOSSES})
    return results


@pytest.mark.slow
@pytest.mark.parametrize("loss", LOSSES)
def test_same_gradient_for_every_split(splits, loss):
    results = {ranks: splits[ranks, loss] for ranks, _ in SPLITS}
    for ranks, accum in SPLITS:
        assert results[ranks]["world_size"] == ranks and results[ranks]["accum"] == accum
    base = results[1]
    assert len(base["grads"]) > 10
    norm = torch.sqrt(sum((g ** 2).sum() for g in base["grads"].values()))
    assert norm > 1e-3  # a real gradient, not zeros
    for ranks, _ in SPLITS[1:]:
        other = results[ranks]
        assert other["targets"] == base["targets"]
        assert other["loss"] == pytest.approx(base["loss"], rel=1e-6)
        for name, grad in base["grads"].items():
            torch.testing.assert_close(other["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=f"{name} ({ranks} ranks)")


@pytest.mark.slow
def test_the_two_losses_differ(splits):
    """The probes of one launch are separate runs: DFT's gradient is not SFT's (random init: p ~ 1/V)."""
    dft, sft = splits[1, "dft"], splits[1, "sft"]
    assert dft["targets"] == sft["targets"] and dft["loss"] < 0.1 * sft["loss"]
