"""The new loss variants in real runs of the embedded default: the plan names them, the logged
weights obey their definitions, and micro_batch_mean's warning is printed."""

import subprocess
import sys

import pytest

from tests.distributed.helpers import clean_env, read_metrics

pytestmark = pytest.mark.slow
SETTINGS = ["data.synthetic_size=64", "data.max_length=128", "train.micro_batch_size=2", "train.global_batch_size=4",
            "train.max_steps=3", "logging.progress_bar=false", "checkpoint.save_final=false", "loss.fused=true"]


def train(tmp_path, name, *extra):
    out = tmp_path / name
    cmd = [sys.executable, "-m", "dft_ds.train", *SETTINGS,
           f"train.output_dir={out}", *extra]
    proc = subprocess.run(cmd, env=clean_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_eaft_logs_its_entropy_and_weight(tmp_path):
    """The logged entropy, weight and loss of step 1 against the same figures computed here, in float64,
    from the model and rows of that step: one step over all 8 rows, the weights read back from the export
    (a learning rate of 1e-12 leaves them as they were for the step). alpha 0.5, so the weight is not
    the entropy itself."""
    settings = SETTINGS + ["data.synthetic_size=8", "data.packing=false", "train.global_batch_size=8",
                           "train.max_steps=1", "train.lr=1e-12", "train.warmup_ratio=0", "export.hf=true",
                           "loss.prob_floor=0"]
    out, stdout = train(tmp_path, "eaft", *settings, "loss.type=eaft", "loss.alpha=0.5")
    assert "loss: eaft w=(H_20/ln 20)^0.5 (fused head)" in stdout
    # SETTINGS say checkpoint.save_final=false: export.hf saves the checkpoint it converts all the same.
    assert (out / "checkpoints" / "step-1").is_dir() and (out / "hf" / "config.json").is_file()
    (row,) = read_metrics(out)
    assert row["step"] == 1 and 0 < row["loss"] < row["nll"] and row["zero_weight_share"] == 0

    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dft_ds import synthetic
    from dft_ds.config import load_config
    from dft_ds.data import IGNORE_INDEX
    from dft_ds.tokenised import build_datasets

    cfg = load_config(None, settings)
    rows, _ = build_datasets(cfg.data, AutoTokenizer.from_pretrained(synthetic.ensure_assets()), cfg.train.seed)
    assert len(rows.rows) == 8
    model = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float64).eval()
    nll = entropy = weight = loss = 0.0
    targets = 0
    with torch.no_grad():
        for (ids, labels), in rows.rows.docs:
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            lab = torch.tensor(labels)
            keep = lab != IGNORE_INDEX
            logp = torch.log_softmax(logits[keep], -1).gather(1, lab[keep].unsqueeze(1)).squeeze(1)
            top = torch.log_softmax(logits[keep].topk(20, dim=-1).values, -1)
            h = -(top.exp() * top).sum(-1) / math.log(20)
            nll -= float(logp.sum())
            entropy += float(h.sum())
            weight += float(h.sqrt().sum())
            loss -= float((h.sqrt() * logp).sum())
            targets += int(keep.sum())
    assert row["target_tokens"] == targets
    assert row["nll"] == pytest.approx(nll / targets, rel=1e-4)
    assert row["mean_entropy"] == pytest.approx(entropy / targets, rel=2e-5)
    assert row["mean_weight"] == pytest.approx(weight / targets, rel=2e-5)
    assert row["loss"] == pytest.approx(loss / targets, rel=1e-4)
    # A fresh model's entropies are near 1, so sqrt(H) and H are close: still 20 tolerances apart.
    assert abs(row["mean_weight"] - row["mean_entropy"]) > 4e-4


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


def test_micro_batch_mean_is_named_and_warned_in_the_plan(tmp_path, dft_train):
    def check(*extra):
        proc = dft_train("--check", *SETTINGS, f"train.output_dir={tmp_path / 'run'}", *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    stdout = check("loss.normalize=micro_batch_mean")
    assert "micro-batch means (loss.normalize)" in stdout
    assert "warning: loss.normalize=micro_batch_mean" in stdout
    assert "the 2 micro-batches of a step summed" in stdout and "depends on how the batch is split" in stdout
    stdout = check()
    assert "loss.normalize=micro_batch_mean" not in stdout and "micro-batch means" not in stdout
