"""`dft-train --check`: validates everything a run checks before training, prints the plan, writes nothing.

The default plan runs the real program; the rest call its main in-process (the dft_train fixture)."""

import json
import subprocess
import sys

import pytest

from dft_ds.memory import estimate_memory
from tests.distributed.helpers import clean_env

pytestmark = pytest.mark.slow


def test_default_plan_is_printed_and_nothing_written(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dft_ds.train", "--check", "--world-size", "2", f"train.output_dir={out}"]
    proc = subprocess.run(cmd, env=clean_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "dft-train --check: OK" in text and f"{out} (new)" in text
    assert "4000 samples -> " in text
    assert "micro 4 x accumulation 1 x world 2 = global 8 rows" in text
    assert "loss: dft (fused head)" in text and "ZeRO-3" in text
    assert "memory per rank (rough):" in text
    assert not out.exists()


def test_steps_follow_world_size(tmp_path, dft_train):
    one = dft_train("--check", "--world-size", "1", "train.global_batch_size=8", f"train.output_dir={tmp_path / 'r'}")
    two = dft_train("--check", "--world-size", "2", "train.global_batch_size=8", f"train.output_dir={tmp_path / 'r'}")
    assert one.returncode == two.returncode == 0
    assert "accumulation 2 x world 1 = global 8" in one.stdout
    assert "accumulation 1 x world 2 = global 8" in two.stdout


def test_bad_data_line_is_reported_with_exit_2(tmp_path, dft_train):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n{broken\n")
    proc = dft_train("--check", f"data.source={data}", f"train.output_dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert f"{data}:2" in proc.stderr and "Traceback" not in proc.stderr


def test_foreign_output_dir_is_reported(tmp_path, dft_train):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "notes.txt").write_text("not a run")
    proc = dft_train("--check", f"train.output_dir={out}")
    assert proc.returncode == 2 and "not a dft_ds run" in proc.stderr
    assert (out / "notes.txt").read_text() == "not a run"


def test_world_size_that_does_not_divide_the_global_batch(tmp_path, dft_train):
    proc = dft_train("--check", "--world-size", "3", "train.global_batch_size=8", f"train.output_dir={tmp_path / 'r'}")
    assert proc.returncode == 2, proc.stdout
    assert "train.global_batch_size: 8 is not divisible by micro_batch_size 4 x world size 3 = 12; the nearest " \
           "valid values are train.global_batch_size=12 (multiples of 12)" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_memory_estimate_shards_as_zero_does():
    class Cfg:
        hidden_size, num_hidden_layers, vocab_size = 1536, 28, 151936

    psi = 1_543_714_304  # Qwen2.5-1.5B
    z3 = estimate_memory(psi, Cfg, 3, 8, "bf16", 2048, False, True, 128, False)
    z2 = estimate_memory(psi, Cfg, 2, 8, "bf16", 2048, False, True, 128, False)
    assert z3.params == pytest.approx(2 * psi / 8) and z2.params == pytest.approx(2 * psi)
    assert z3.optimizer == z2.optimizer == pytest.approx(12 * psi / 8)
    ckpt = estimate_memory(psi, Cfg, 3, 8, "bf16", 2048, True, True, 128, False)
    assert ckpt.activations < z3.activations / 5
    unfused = estimate_memory(psi, Cfg, 3, 8, "bf16", 2048, False, False, 128, False)
    assert unfused.loss_head == pytest.approx(12 * 2048 * 151936) and unfused.loss_head > 3 * z3.loss_head
