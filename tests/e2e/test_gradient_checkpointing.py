"""Gradient checkpointing recomputes activations; it must not change what is learned."""

import subprocess
import sys

import pytest

from tests.distributed.helpers import QUICK, clean_env, read_metrics

pytestmark = pytest.mark.slow


def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    runs = {}
    for flag in ("false", "true"):
        out = tmp_path / f"run-{flag}"
        cmd = [sys.executable, "-m", "dft_ds.train"] + QUICK + [
            f"train.output_dir={out}", "train.max_steps=4", f"model.gradient_checkpointing={flag}",
            "checkpoint.save_final=false", "logging.tensorboard=false"]
        proc = subprocess.run(cmd, env=clean_env(tmp_path), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[flag] = read_metrics(out)
    assert len(runs["true"]) == 4
    for a, b in zip(runs["false"], runs["true"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["nll"] == pytest.approx(a["nll"], rel=1e-5)
    assert runs["true"][-1]["nll"] != runs["true"][0]["nll"]  # the steps really updated the model
