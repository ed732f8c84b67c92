"""The new loss variants in real runs of the embedded default: the plan names them, the logged
weights obey their definitions, and micro_batch_mean's warning is printed."""

import subprocess
import sys

import pytest

from tests.distributed.helpers import clean_env, read_metrics

pytestmark = pytest.mark.slow
SETTINGS = ["data.synthetic_size=64", "data.max_length=128", "train.micro_batch_size=2", "train.global_batch_size=4",
            "train.max_steps=3", "logging.progress_bar=false", "checkpoint.save_final=false", "loss.fused=true"]


def train(tmp_path, name, *extra, check=False):
    out = tmp_path / name
    cmd = [sys.executable, "-m", "dft_ds.train", *(["--check"] if check else []), *SETTINGS,
           f"train.output_dir={out}", *extra]
    proc = subprocess.run(cmd, env=clean_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_eaft_logs_its_entropy_and_weight(tmp_path):
    out, stdout = train(tmp_path, "eaft", "loss.type=eaft")
    assert "loss: eaft w=(H_20/ln 20)^1 (fused head)" in stdout
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert 0 < r["mean_entropy"] < 1
        assert r["mean_weight"] == pytest.approx(r["mean_entropy"], rel=1e-9)  # alpha = 1: w is the entropy
        assert r["zero_weight_share"] == 0
        assert 0 < r["loss"] < r["nll"]  # every weight below 1


def test_only_top_p_gates_exactly_the_low_probability_tokens(tmp_path):
    out, stdout = train(tmp_path, "top", "loss.type=only_top_p", "loss.threshold=0.1", "loss.threshold_base=sft")
    assert "loss: only_top_p sft weight where p > 0.1, else 0 (fused head)" in stdout
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        # The gate drops p < 0.1: the share the run also logs as low_prob_share.
        assert r["zero_weight_share"] == pytest.approx(r["low_prob_share"])
        assert r["zero_weight_share"] > 0.5  # a fresh model: most targets are unlikely
        assert r["mean_weight"] == pytest.approx(1 - r["zero_weight_share"])
        assert "mean_entropy" not in r
    # dft, for comparison: no token at weight 0, the mean weight is the mean probability.
    out, _ = train(tmp_path, "dft", "loss.type=dft", "loss.prob_floor=0")
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["zero_weight_share"] == 0 and r["mean_weight"] == pytest.approx(r["mean_token_prob"])


def test_micro_batch_mean_is_named_and_warned_in_the_plan(tmp_path):
    _, stdout = train(tmp_path, "mbm", "loss.normalize=micro_batch_mean", check=True)
    assert "micro-batch means (loss.normalize)" in stdout
    assert "warning: loss.normalize=micro_batch_mean" in stdout
    assert "the 2 micro-batches of a step summed" in stdout and "depends on how the batch is split" in stdout
    _, stdout = train(tmp_path, "step", check=True)
    assert "loss.normalize=micro_batch_mean" not in stdout and "micro-batch means" not in stdout
