"""engine.py's filters of DeepSpeed's unactionable lines: the accelerator line logged at import is gone
(and other DeepSpeed warnings stay); the printed lines are dropped, everything else passes at once."""

import io
import logging
import subprocess
import sys

import pytest

from dft_ds.deepspeed_setup import _DropPrinted, _gpu_present, deepspeed_prints_filtered, quiet_deepspeed


def test_the_accelerator_line_at_import_is_filtered_and_other_warnings_stay():
    if _gpu_present():
        pytest.skip("with a GPU device node the accelerator line is news and is kept")
    code = ("from dft_ds.deepspeed_setup import quiet_deepspeed; quiet_deepspeed()\n"
            "import deepspeed\n"
            "from deepspeed.utils import logger\n"
            "logger.warning('a warning the user can act on')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "Setting accelerator to CPU" not in out
    assert "a warning the user can act on" in out


def test_the_log_filter_drops_only_the_named_messages():
    quiet_deepspeed()
    quiet_deepspeed()  # idempotent: one filter
    logger = logging.getLogger("DeepSpeed")
    assert sum(type(f).__name__ == "_DeepSpeedLogNoise" for f in logger.filters) == 1
    make = lambda msg: logging.LogRecord("DeepSpeed", logging.INFO, __file__, 1, msg, None, None)  # noqa: E731
    assert not logger.filter(make("Setting ds_accelerator to cpu (auto detect)"))
    assert logger.filter(make("ZeRO-3 is enabled"))


def test_printed_noise_is_dropped_and_the_rest_passes_unbuffered(capsys):
    with deepspeed_prints_filtered():
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("our own line")
        print("Processing zero checkpoint '/x/checkpoints/step-3'", file=sys.stderr)
        print("Reconstructed Trainable fp32 state dict with 39 params 3426560 elements")
        print("a real warning", file=sys.stderr)
    captured = capsys.readouterr()
    assert captured.out == "our own line\n"
    assert captured.err == "a real warning\n"

    target = io.StringIO()
    stream = _DropPrinted(target)
    stream.write("\rdft-convert:  50%|#####     | 1/2")  # a tqdm update reaches the target at once
    assert target.getvalue() == "\rdft-convert:  50%|#####     | 1/2"
    assert stream.getvalue() == target.getvalue()  # other attributes are the real stream's


def test_zero_to_fp32_bars_are_off_only_inside_the_block():
    import deepspeed.utils.zero_to_fp32 as z2f

    original = z2f.tqdm
    with deepspeed_prints_filtered(conversion=True):
        assert z2f.tqdm([1, 2], desc="Loading checkpoint shards").disable
    assert z2f.tqdm is original
