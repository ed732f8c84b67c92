"""The universal-format copy a world-size change makes (`step-N_universal/`) is unpickled by every
rank's load, so its `.complete` marker records each file's size and hash: a cached copy is reused
while it verifies, and converted again, with a warning, when a byte of it changed."""

import json
import logging
import os
import subprocess
import sys

import pytest

from dft_ds.checkpoint import ensure_universal, file_hash, find_resume
from tests.distributed.helpers import QUICK, clean_env

pytestmark = pytest.mark.slow


def test_a_damaged_universal_copy_is_converted_again(tmp_path, caplog):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "dft_ds.train", *QUICK, "train.max_steps=2",
                           "logging.tensorboard=false", f"train.output_dir={out}"], env=clean_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    point = find_resume("auto", str(out / "checkpoints"))
    tag = ensure_universal(point, True, lambda: None)
    universal = out / "checkpoints" / tag
    record = json.loads((universal / ".complete").read_text())
    assert record["files"] and sorted(record["files"]) == sorted(record["hashes"])
    victim = max(record["files"], key=record["files"].get)  # the largest file: a weight or an optimizer state
    for rel, digest in record["hashes"].items():
        assert file_hash(universal / rel) == digest
    stamp = (universal / victim).stat().st_mtime_ns

    assert ensure_universal(point, True, lambda: None) == tag  # intact: reused, not converted again
    assert (universal / victim).stat().st_mtime_ns == stamp

    data = bytearray((universal / victim).read_bytes())
    data[len(data) // 2] ^= 1
    (universal / victim).write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="dft_ds.checkpoint"):
        ensure_universal(point, True, lambda: None, "size")  # size cannot see a flipped byte
        assert not caplog.records
        ensure_universal(point, True, lambda: None, "hash")
    assert f"{universal} is damaged ({os.path.join(str(universal), victim)} has other content" in caplog.text
    assert file_hash(universal / victim) == record["hashes"][victim]  # converted again, as it was
