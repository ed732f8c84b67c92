"""`make gpu-check` fails fast and clearly where there is no CUDA device (it runs on GPUs only)."""

import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: gpu-check would run for real")
def test_gpu_check_without_cuda_exits_2_at_once():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "gpu_check.py")], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    assert "gpu-check: error: no CUDA device is visible" in proc.stderr
    assert "Traceback" not in proc.stderr and not os.path.exists(os.path.join(REPO, "runs", "gpu-check"))
