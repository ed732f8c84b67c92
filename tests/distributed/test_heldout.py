"""eval.loss_every: the held-out loss sharded over 2 ZeRO-3 ranks (an odd number of rows, so one rank
runs a forward it does not count) equals the NLL that plain transformers computes on the exported
weights, row by row; and data.eval_fraction keeps held-out samples out of the training rows."""

import json
import math
import subprocess
import sys

import pytest
import torch

from dft_ds import synthetic
from dft_ds.config import load_config
from dft_ds.data import IGNORE_INDEX
from dft_ds.tokenised import build_datasets
from tests.distributed.helpers import QUICK, clean_env, free_port

pytestmark = pytest.mark.slow

HELDOUT = [{"prompt": f"What is {i} times {i + 2}?", "response": f"{i} x {i + 2} = {i * (i + 2)}. The answer is "
            f"{i * (i + 2)}."} for i in range(7)]


def test_heldout_loss_on_two_ranks_equals_transformers_on_the_export(tmp_path):
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in HELDOUT), encoding="utf-8")
    out = tmp_path / "run"
    env = clean_env(tmp_path)
    env["OMP_NUM_THREADS"] = "1"
    settings = QUICK + [f"data.eval_source={data}", "data.packing=false", "train.max_steps=4", "eval.loss_every=2",
                        "train.global_batch_size=4", "train.max_grad_norm=0", "export.hf=true",
                        "logging.tensorboard=false", "loss.prob_floor=0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "dft_ds.train", f"train.output_dir={out}"] + settings
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out: 7 samples from" in proc.stdout and "held-out at step 4: loss" in proc.stdout
    logged = [json.loads(line) for line in open(out / "heldout.jsonl")]
    assert [r["step"] for r in logged] == [2, 4] and all(r["rows"] == 7 for r in logged)
    assert logged[0]["nll"] != logged[1]["nll"]  # the model moved between the two

    # The same rows, scored by transformers on the final weights (step 4 is the last step).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(synthetic.ensure_assets())
    cfg = load_config(None, settings)
    _, heldout = build_datasets(cfg.data, tok, cfg.train.seed)
    model = AutoModelForCausalLM.from_pretrained(out / "hf", torch_dtype=torch.float32).eval()
    nll, prob, targets = 0.0, 0.0, 0
    with torch.no_grad():
        for (ids, labels), in heldout.rows.docs:
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
            lab = torch.tensor(labels)
            keep = lab != IGNORE_INDEX
            logp = torch.log_softmax(logits[keep], -1).gather(1, lab[keep].unsqueeze(1)).squeeze(1)
            nll -= float(logp.sum())
            prob += float(logp.exp().sum())
            targets += int(keep.sum())
    assert logged[-1]["target_tokens"] == targets
    assert math.isclose(logged[-1]["nll"], nll / targets, rel_tol=1e-4)
    assert math.isclose(logged[-1]["mean_token_prob"], prob / targets, rel_tol=1e-4)
    # loss.type=dft with no floor: the loss is the probability-weighted NLL, below the NLL.
    assert logged[-1]["loss"] < logged[-1]["nll"]


def test_eval_fraction_holds_samples_out_of_training(tmp_path):
    tok = synthetic.ensure_assets()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok)
    cfg = load_config(None, ["data.synthetic_size=200", "data.eval_fraction=0.1", "data.packing=false"])
    train, heldout = build_datasets(cfg.data, tok, cfg.train.seed)
    assert len(heldout.rows) == 20 and len(train.rows) == 180
    assert train.report.heldout == 20 and "(20 held out by data.eval_fraction)" in train.report.summary()
    train_docs = {tuple(ids) for row in train.rows.docs for ids, _ in row}
    held_docs = {tuple(ids) for row in heldout.rows.docs for ids, _ in row}
    assert not train_docs & held_docs
    again = build_datasets(cfg.data, tok, cfg.train.seed)[1]
    assert [r[0][0] for r in again.rows.docs] == [r[0][0] for r in heldout.rows.docs]  # seeded


def test_loss_every_without_heldout_rows_is_refused():
    from dft_ds.errors import ConfigError

    with pytest.raises(ConfigError, match="eval.loss_every: held-out loss needs held-out rows: set data.eval_source"):
        load_config(None, ["eval.loss_every=5"])
