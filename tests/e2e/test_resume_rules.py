"""A run directory never describes weights it does not hold, and `--check` predicts a resume.

Real runs of the trainer (one plain process, and torchrun for the world-size change):
- a finished run started again unchanged says it is complete and leaves every file as it was;
- a setting that changes what the weights mean is refused with exit 2, naming the key and the
  directory, and nothing is touched;
- a setting that only continues the run is taken, and the run's config history gains a segment;
- `--check --world-size 2` on a 1-rank run's directory prints the batch and steps that the
  2-rank resume then really uses (the saved global batch, split into a micro batch that fits).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.distributed.helpers import QUICK, clean_env, free_port, read_metrics

pytestmark = pytest.mark.slow
# The case: the default micro batch of 4 on one rank, so the saved global batch is 4.
ARGS = QUICK + ["train.micro_batch_size=4", "logging.tensorboard=false"]


def train(tmp_path, out, *extra, ranks: int = 0, check: bool = False):
    """ranks=0: one plain process; otherwise torchrun with that many ranks."""
    launcher = [sys.executable, "-m", "dft_ds.train"] if not ranks else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", f"--master-port={free_port()}",
        "-m", "dft_ds.train"]
    cmd = launcher + (["--check"] if check else []) + ARGS + [f"train.output_dir={out}", *extra]
    return subprocess.run(cmd, env=clean_env(tmp_path), capture_output=True, text=True, timeout=600)


def snapshot(path) -> dict:
    """Every file under path: its bytes' hash and its modification time."""
    files = {}
    for dirpath, _, names in os.walk(path):
        for name in names:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as fh:
                files[os.path.relpath(full, path)] = (hashlib.sha256(fh.read()).hexdigest(), os.stat(full).st_mtime_ns)
    return files


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    out = tmp / "run"
    proc = train(tmp, out, "train.max_steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture
def copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def test_a_finished_run_started_again_unchanged_is_complete_and_untouched(tmp_path, copy):
    before = snapshot(copy)
    proc = train(tmp_path, copy, "train.max_steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"dft-train: {copy} is already complete" in proc.stdout and "at step 3 of 3" in proc.stdout
    assert snapshot(copy) == before


@pytest.mark.parametrize("override, key", [("loss.type=sft", "loss.type changed from 'dft' to 'sft'"),
                                           ("loss.prob_floor=0.3", "loss.prob_floor changed from 0.1 to 0.3"),
                                           ("train.seed=7", "train.seed changed from 42 to 7")])
def test_a_setting_that_changes_what_the_weights_mean_is_refused(tmp_path, copy, dft_train, override, key):
    before = snapshot(copy)
    args = [*ARGS, f"train.output_dir={copy}", "train.max_steps=6", override]
    # --check says what the run says: the real program for the first setting, main in-process for the others.
    runs = [train(tmp_path, copy, "train.max_steps=6", override)] if override.startswith("loss.type") else \
        [dft_train(*args)]
    for proc in [dft_train("--check", *args), *runs]:
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert f"dft-train: error: cannot resume {copy} from {copy / 'checkpoints' / 'step-3'}" in proc.stderr
        assert key in proc.stderr and "set a new train.output_dir" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(copy) == before


def test_a_longer_run_continues_and_its_segments_are_recorded(tmp_path, copy):
    proc = train(tmp_path, copy, "train.max_steps=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = [json.loads(line) for line in (copy / "config_history.jsonl").read_text().splitlines()]
    assert [(h["from_step"], h["steps"], h["resumed_from"]) for h in history] == [
        (0, 3, None), (3, 5, str(copy / "checkpoints" / "step-3"))]
    assert history[0]["changed"] == [] and history[1]["changed"] == ["train.max_steps changed from 3 to 5"]
    assert history[0]["config"]["train"]["max_steps"] == 3 and history[1]["config"]["train"]["max_steps"] == 5
    assert yaml.safe_load((copy / "config.yaml").read_text())["train"]["max_steps"] == 5
    assert [r["step"] for r in read_metrics(copy)] == [1, 2, 3, 4, 5]


def batch_line(text: str) -> str:
    (line,) = [x.strip() for x in text.splitlines() if x.strip().startswith("batch: ")]
    return line.split("; loss: ")[0]  # the run prints the loss line after it on the same line


def test_check_predicts_the_resume_on_another_world_size(tmp_path, copy, dft_train):
    check = dft_train("--check", *ARGS, f"train.output_dir={copy}", "train.max_steps=6")
    check2 = dft_train("--check", "--world-size", "2", *ARGS, f"train.output_dir={copy}", "train.max_steps=6")
    assert check.returncode == 0 and check2.returncode == 0, check2.stderr[-3000:]
    assert batch_line(check.stdout).startswith("batch: micro 4 x accumulation 1 x world 1 = global 4 rows;")
    predicted = batch_line(check2.stdout)
    assert predicted.startswith("batch: micro 2 x accumulation 1 x world 2 = global 4 rows;")
    assert predicted.endswith("; 6 steps from step 3; attention sdpa (packed documents kept apart by a block mask "
                              "from position ids)")
    assert "resume keeps the checkpoint's global batch of 4 rows: micro batch 2 (train.micro_batch_size is 4)" \
        in check2.stdout

    run = train(tmp_path, copy, "train.max_steps=6", ranks=2)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert batch_line(run.stdout) == predicted
    assert [r["step"] for r in read_metrics(copy)] == [1, 2, 3, 4, 5, 6]
    state = json.loads((copy / "checkpoints" / "step-6" / "dft_state.json").read_text())
    assert state["world_size"] == 2 and state["global_batch_size"] == 4


def test_a_world_size_that_cannot_share_the_saved_batch_is_refused_by_check_and_run(tmp_path, copy, dft_train):
    before = snapshot(copy)
    check = dft_train("--check", "--world-size", "3", *ARGS, f"train.output_dir={copy}", "train.max_steps=6")
    run = train(tmp_path, copy, "train.max_steps=6", ranks=3)
    expected = "a global batch of 4 rows, which 3 ranks cannot share evenly"
    assert check.returncode == 2 and expected in check.stderr
    assert run.returncode != 0 and expected in run.stdout + run.stderr
    assert snapshot(copy) == before
