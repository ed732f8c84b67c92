"""A Hugging Face model directory is loaded under ZeRO-3 with its own weights, not a fresh init.

The first logged NLL of a 1-step run must equal the NLL that plain transformers computes with the
saved weights on the same rows (the rows of step 0 as the sampler assigns them).
"""

import os
import subprocess
import sys

import pytest
import torch

from dft_ds import synthetic
from dft_ds.batch import BatchSplit
from dft_ds.config import load_config
from dft_ds.data import StepSampler
from dft_ds.tokenised import build_train_data
from dft_ds.loss import sft_loss
from tests.distributed.helpers import clean_env, read_metrics

pytestmark = pytest.mark.slow


def test_first_step_nll_matches_the_saved_weights(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(synthetic.ensure_assets())
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(synthetic.tiny_model_config(len(tok), num_hidden_layers=2))
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    out = tmp_path / "run"
    overrides = [f"model.name_or_path={model_dir}", f"train.output_dir={out}", "data.synthetic_size=64",
                 "data.max_length=128", "train.micro_batch_size=4", "train.max_steps=1", "loss.type=sft",
                 "logging.progress_bar=false", "checkpoint.save_final=false"]
    proc = subprocess.run([sys.executable, "-m", "dft_ds.train"] + overrides, env=clean_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = read_metrics(out)[0]["nll"]

    cfg = load_config(None, overrides)
    data = build_train_data(cfg.data, tok, cfg.train.seed)
    (indices,) = StepSampler(len(data.rows), BatchSplit(4, 1, 1), 0, cfg.train.seed).indices_for_step(0)
    batch = data.batch(indices)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    expected = float(sft_loss(logits, batch["labels"]))
    assert logged == pytest.approx(expected, rel=1e-5)
    assert os.path.exists(out / "summary.json")
