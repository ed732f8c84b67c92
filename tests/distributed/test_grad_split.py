"""The gradient of a global batch does not depend on how it is split into ranks and micro-batches.

Real DeepSpeed ZeRO-3 engines on gloo, started by torchrun, running the real trainer's step on
the same global batch of 4 rows with uneven target counts: 1 rank x 4 micro-batches,
2 ranks x 2, 4 ranks x 1. Pure DFT and SFT.
"""

import os
import sys

import pytest
import torch

from tests.distributed.helpers import BIN, clean_env, free_port, run

PROBE = os.path.join(os.path.dirname(__file__), "grad_probe.py")
SPLITS = [(1, 4), (2, 2), (4, 1)]  # (ranks, accumulation)


def probe(tmp_path, ranks: int, loss: str) -> dict:
    out = tmp_path / f"grad-{loss}-{ranks}.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
           f"--master-port={free_port()}", PROBE, str(out),
           f"train.output_dir={tmp_path / 'unused'}", "data.synthetic_size=64", "data.packing=false",
           "data.max_length=128", "train.micro_batch_size=1", "train.global_batch_size=4",
           "train.max_grad_norm=0", f"loss.type={loss}", "loss.prob_floor=0", "logging.tensorboard=false"]
    proc = run(cmd, clean_env(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["dft", "sft"])
def test_same_gradient_for_every_split(tmp_path, loss):
    results = {ranks: probe(tmp_path, ranks, loss) for ranks, _ in SPLITS}
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
