"""loss.normalize=micro_batch_mean reproduces the DFT paper code's rule; step does not depend on the split.

Real DeepSpeed ZeRO-3 engines on gloo, one optimizer step of the real trainer on chosen rows
(grad_probe.py, DFT_PROBE_ROWS; the five steps in two launches), one row per micro-batch, two rows
with unequal target counts:

- the gradient of one row alone is g_a = S_a / n_a (S: the gradient of the row's summed token losses);
- the paper's rule for the two rows as two micro-batches of one rank is g_a + g_b, and on two
  ranks with one micro-batch each (g_a + g_b) / 2;
- loss.normalize=step gives (n_a g_a + n_b g_b) / (n_a + n_b) for both splits.
"""

import pytest
import torch

from tests.distributed.helpers import run_probes

ROW_A, ROW_B = 0, 1


def overrides(tmp_path, ranks: int, accum: int, normalize: str, loss: str = "dft") -> list[str]:
    return [f"train.output_dir={tmp_path / 'unused'}", "data.synthetic_size=64", "data.packing=false",
            "data.max_length=128", "train.micro_batch_size=1", f"train.global_batch_size={ranks * accum}",
            "train.max_grad_norm=0", f"loss.type={loss}", "loss.prob_floor=0", f"loss.normalize={normalize}",
            "logging.tensorboard=false"]


def probes(tmp_path) -> dict:
    """Every step the test compares, in two launches: the 1-rank ones together, then the 2-rank one."""
    one = run_probes(tmp_path, 1, {"a": overrides(tmp_path, 1, 1, "step"), "b": overrides(tmp_path, 1, 1, "step"),
                                   "mbm-1x2": overrides(tmp_path, 1, 2, "micro_batch_mean"),
                                   "step-1x2": overrides(tmp_path, 1, 2, "step")},
                     rows={"a": f"{ROW_A}", "b": f"{ROW_B}", "mbm-1x2": f"{ROW_A},{ROW_B}", "step-1x2": f"{ROW_A},{ROW_B}"})
    two = run_probes(tmp_path, 2, {"mbm-2x1": overrides(tmp_path, 2, 1, "micro_batch_mean")},
                     rows={"mbm-2x1": f"{ROW_A}|{ROW_B}"})
    results = {**one, **two}
    for name, ranks, accum in (("a", 1, 1), ("b", 1, 1), ("mbm-1x2", 1, 2), ("step-1x2", 1, 2), ("mbm-2x1", 2, 1)):
        assert results[name]["accum"] == accum and results[name]["world_size"] == ranks
    return results


def combine(results: list[dict], coefs: list[float]) -> dict:
    return {name: sum(c * r["grads"][name] for c, r in zip(coefs, results)) for name in results[0]["grads"]}


def assert_grads_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=f"{name}: {what}")


@pytest.mark.slow
def test_micro_batch_mean_is_the_paper_rule_and_step_is_not(tmp_path):
    got = probes(tmp_path)
    a, b = got["a"], got["b"]
    n_a, n_b = a["targets"], b["targets"]
    assert n_a != n_b and min(n_a, n_b) > 0  # unequal token counts, or the two rules coincide
    norm = torch.sqrt(sum((g ** 2).sum() for g in a["grads"].values()))
    assert norm > 1e-3

    paper = combine([a, b], [1.0, 1.0])                      # sum of the micro-batch means
    per_token = combine([a, b], [n_a / (n_a + n_b), n_b / (n_a + n_b)])

    mbm_1x2 = got["mbm-1x2"]
    assert_grads_close(mbm_1x2["grads"], paper, "micro_batch_mean, 1 rank x 2 micro-batches = g_a + g_b")
    mbm_2x1 = got["mbm-2x1"]
    assert_grads_close(mbm_2x1["grads"], combine([a, b], [0.5, 0.5]),
                       "micro_batch_mean, 2 ranks x 1 = (g_a + g_b) / 2")
    step_1x2 = got["step-1x2"]
    assert_grads_close(step_1x2["grads"], per_token, "step = the token mean of the two rows")

    # The rules differ by what the formulas say, far beyond the tolerance: at equal counts by exactly the
    # number of micro-batches; here (n_a + n_b) (g_a + g_b) against n_a g_a + n_b g_b.
    diff = sum(float(((paper[k] - per_token[k]) ** 2).sum()) for k in paper) ** 0.5
    assert diff > 0.3 * sum(float((per_token[k] ** 2).sum()) for k in per_token) ** 0.5
