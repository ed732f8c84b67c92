"""The CUDA path: NCCL, bf16 by `precision=auto`, fused Adam. Skipped on machines without a GPU."""

import os
import sys

import pytest
import torch

from tests.distributed.helpers import BIN, QUICK, clean_env, free_port, read_metrics, run

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_gpu_run_uses_bf16_and_learns(tmp_path):
    out = tmp_path / "run"
    ngpu = min(2, torch.cuda.device_count())
    cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", str(ngpu), "--master_port", str(free_port()),
           "--module", "dft_ds.train"] + QUICK + [f"train.output_dir={out}", "train.max_steps=20"]
    proc = run(cmd, clean_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "precision bf16" in proc.stdout or "precision fp16" in proc.stdout
    rows = read_metrics(out)
    assert rows[-1]["nll"] < rows[0]["nll"] - 0.5
