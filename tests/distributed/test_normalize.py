"""loss.normalize=micro_batch_mean reproduces the DFT paper code's rule; step does not depend on the split.

Real DeepSpeed ZeRO-3 engines on gloo, one optimizer step of the real trainer on chosen rows
(grad_probe.py, DFT_PROBE_ROWS), one row per micro-batch, two rows with unequal target counts:

- the gradient of one row alone is g_a = S_a / n_a (S: the gradient of the row's summed token losses);
- the paper's rule for the two rows as two micro-batches of one rank is g_a + g_b, and on two
  ranks with one micro-batch each (g_a + g_b) / 2;
- loss.normalize=step gives (n_a g_a + n_b g_b) / (n_a + n_b) for both splits.
"""

import os
import sys

import pytest
import torch

from tests.distributed.helpers import clean_env, free_port, run

PROBE = os.path.join(os.path.dirname(__file__), "grad_probe.py")
ROW_A, ROW_B = 0, 1


def probe(tmp_path, name: str, ranks: int, rows: str, accum: int, normalize: str, loss: str = "dft") -> dict:
    out = tmp_path / f"grad-{name}.pt"
    env = clean_env(tmp_path)
    env["DFT_PROBE_ROWS"] = rows
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
           f"--master-port={free_port()}", PROBE, str(out),
           f"train.output_dir={tmp_path / 'unused'}", "data.synthetic_size=64", "data.packing=false",
           "data.max_length=128", "train.micro_batch_size=1", f"train.global_batch_size={ranks * accum}",
           "train.max_grad_norm=0", f"loss.type={loss}", "loss.prob_floor=0", f"loss.normalize={normalize}",
           "logging.tensorboard=false"]
    proc = run(cmd, env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(out)
    assert result["accum"] == accum and result["world_size"] == ranks
    return result


def combine(results: list[dict], coefs: list[float]) -> dict:
    return {name: sum(c * r["grads"][name] for c, r in zip(coefs, results)) for name in results[0]["grads"]}


def assert_grads_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=f"{name}: {what}")


@pytest.mark.slow
def test_micro_batch_mean_is_the_paper_rule_and_step_is_not(tmp_path):
    a = probe(tmp_path, "a", 1, f"{ROW_A}", 1, "step")
    b = probe(tmp_path, "b", 1, f"{ROW_B}", 1, "step")
    n_a, n_b = a["targets"], b["targets"]
    assert n_a != n_b and min(n_a, n_b) > 0  # unequal token counts, or the two rules coincide
    norm = torch.sqrt(sum((g ** 2).sum() for g in a["grads"].values()))
    assert norm > 1e-3

    paper = combine([a, b], [1.0, 1.0])                      # sum of the micro-batch means
    per_token = combine([a, b], [n_a / (n_a + n_b), n_b / (n_a + n_b)])

    mbm_1x2 = probe(tmp_path, "mbm-1x2", 1, f"{ROW_A},{ROW_B}", 2, "micro_batch_mean")
    assert_grads_close(mbm_1x2["grads"], paper, "micro_batch_mean, 1 rank x 2 micro-batches = g_a + g_b")
    mbm_2x1 = probe(tmp_path, "mbm-2x1", 2, f"{ROW_A}|{ROW_B}", 1, "micro_batch_mean")
    assert_grads_close(mbm_2x1["grads"], combine([a, b], [0.5, 0.5]),
                       "micro_batch_mean, 2 ranks x 1 = (g_a + g_b) / 2")
    step_1x2 = probe(tmp_path, "step-1x2", 1, f"{ROW_A},{ROW_B}", 2, "step")
    assert_grads_close(step_1x2["grads"], per_token, "step = the token mean of the two rows")

    # The rules differ by what the formulas say, far beyond the tolerance: at equal counts by exactly the
    # number of micro-batches; here (n_a + n_b) (g_a + g_b) against n_a g_a + n_b g_b.
    diff = sum(float(((paper[k] - per_token[k]) ** 2).sum()) for k in paper) ** 0.5
    assert diff > 0.3 * sum(float((per_token[k] ** 2).sum()) for k in per_token) ** 0.5
