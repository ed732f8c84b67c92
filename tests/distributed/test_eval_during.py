"""eval.every_steps: the evaluation sharded over ZeRO-3 ranks during training gives what dft-eval
gives on the exported weights (greedy decoding, fp32: the same generations)."""

import json
import subprocess
import sys

import pytest

from tests.distributed.helpers import QUICK, clean_env, free_port

pytestmark = pytest.mark.slow


def test_in_training_eval_matches_dft_eval_on_the_export(tmp_path):
    out = tmp_path / "run"
    env = clean_env(tmp_path)
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "dft_ds.train"] + QUICK + [
        f"train.output_dir={out}", "train.max_steps=6", "eval.every_steps=3", "eval.limit=5",
        "eval.max_new_tokens=24", "export.hf=true", "logging.tensorboard=false"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "eval.jsonl")]
    assert [r["step"] for r in rows] == [3, 6]
    assert all(r["problems"] == 5 and r["benchmark"] == "synthetic" for r in rows)
    assert rows[-1]["generated_tokens"] > 0

    ev = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "-m", "dft_ds.eval", "--model", str(out / "hf"), "--benchmark", "synthetic",
                           "--limit", "5", "--samples", "1", "--temperature", "0", "--prompt", "chat",
                           "--max-new-tokens", "24", "--no-progress", "--out", str(ev)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = [json.loads(line) for line in open(ev / "samples.jsonl")]
    assert len(samples) == 5
    tokens = sum(g["tokens"] for s in samples for g in s["generations"])
    correct = sum(s["correct"] for s in samples)
    assert rows[-1]["generated_tokens"] == tokens
    assert rows[-1]["accuracy"] == pytest.approx(correct / 5)
