"""Exact resume, resume on another world size, a kill mid-save, rotation, refused resumes.

Real 2-rank ZeRO-3 runs on gloo (torchrun), packing on, accumulation 2.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from dft_ds.errors import EXIT_PREEMPTED
from tests.distributed.helpers import PACED, QUICK, SMALL, clean_env, free_port, read_metrics

pytestmark = pytest.mark.slow
STEPS = 8


def train(tmp_path, out, ranks: int, *extra, env_extra=None, timeout=600):
    env = clean_env(tmp_path)
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", f"--master-port={free_port()}",
           "-m", "dft_ds.train"] + QUICK + SMALL + [
        f"train.output_dir={out}", f"train.max_steps={STEPS}", "train.micro_batch_size=2",
        "train.global_batch_size=8", "data.packing=true", "logging.tensorboard=false"] + list(extra)
    log = tmp_path / f"{os.path.basename(out)}-{len(os.listdir(tmp_path))}.log"
    with open(log, "w") as fh:  # a file, not a pipe: an unread pipe can block a rank mid-collective
        rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
    return rc, log.read_text()


def assert_exit(rc: int, log: str, code: int) -> None:
    """A rank exited with `code`. torchrun reports any failed worker as 1 and may SIGTERM the slower
    rank once the first has exited, so the code is read from its report."""
    assert rc == code or (rc == 1 and f"exitcode  : {code} " in log), log[-3000:]


def assert_preempted(rc: int, log: str) -> None:
    assert_exit(rc, log, EXIT_PREEMPTED)
    assert "stopped at step" in log


def final_weights(out, tag=f"step-{STEPS}") -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(os.path.join(out, "checkpoints"), tag=tag)


def losses(out) -> list[tuple]:
    return [(r["step"], r["loss"], r["nll"]) for r in read_metrics(out)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The reference: 2 ranks, 8 steps in one go."""
    tmp = tmp_path_factory.mktemp("straight")
    out = tmp / "run"
    rc, log = train(tmp, out, 2)
    assert rc == 0, log[-3000:]
    return out


def test_stop_and_resume_is_exact(tmp_path, straight):
    out = tmp_path / "run"
    rc, log = train(tmp_path, out, 2, "train.stop_at_step=4")
    assert_preempted(rc, log)
    assert open(out / "checkpoints" / "latest").read().strip() == "step-4"
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    rc, log = train(tmp_path, out, 2)
    assert rc == 0, log[-3000:]
    assert "resumed from" in log and "at step 4" in log
    assert losses(out) == losses(straight)  # bit for bit, every step
    a, b = final_weights(out), final_weights(straight)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_resume_on_another_world_size(tmp_path, straight, first, second):
    out = tmp_path / "run"
    rc, log = train(tmp_path, out, first, "train.stop_at_step=4")
    assert_preempted(rc, log)
    rc, log = train(tmp_path, out, second)
    assert rc == 0, log[-3000:]
    assert f"world size {first} -> {second}" in log
    assert os.path.isdir(out / "checkpoints" / "step-4_universal")
    rows, ref = read_metrics(out), read_metrics(straight)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # Same samples per step; only the summation order of reductions differs between world sizes.
    for r, q in zip(rows, ref):
        assert r["loss"] == pytest.approx(q["loss"], rel=2e-4) and r["nll"] == pytest.approx(q["nll"], rel=2e-4)
    a, b = final_weights(out), final_weights(straight)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-5)
    state = json.load(open(out / "checkpoints" / f"step-{STEPS}" / "dft_state.json"))
    assert state["world_size"] == second and state["global_batch_size"] == 8


def test_kill_during_save_resumes_from_previous_checkpoint(tmp_path, straight):
    out = tmp_path / "run"
    rc, log = train(tmp_path, out, 2, "checkpoint.every_steps=2",
                    env_extra={"DFT_DS_FAULT": "kill_after_shards:6"})
    assert rc != 0
    ckpts = out / "checkpoints"
    assert open(ckpts / "latest").read().strip() == "step-4"
    assert (ckpts / "step-6").is_dir() and not (ckpts / "step-6" / "dft_state.json").exists()  # the torn save
    rc, log = train(tmp_path, out, 2, "checkpoint.every_steps=2")
    assert rc == 0, log[-3000:]
    assert "at step 4" in log
    assert losses(out) == losses(straight)
    assert sorted(p for p in os.listdir(ckpts) if p.startswith("step-")) == ["step-6", "step-8"]  # keep=2
    assert (ckpts / "step-6" / "dft_state.json").exists()


def test_rotation_keeps_the_newest_and_latest(tmp_path):
    out = tmp_path / "run"
    rc, log = train(tmp_path, out, 2, "checkpoint.every_steps=1", "checkpoint.keep=3")
    assert rc == 0, log[-3000:]
    ckpts = out / "checkpoints"
    assert sorted(p for p in os.listdir(ckpts) if p.startswith("step-")) == ["step-6", "step-7", "step-8"]
    assert open(ckpts / "latest").read().strip() == "step-8"


def test_changed_data_is_refused_and_nothing_is_touched(tmp_path, straight):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    before = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(out) for p in fs}
    rc, log = train(tmp_path, out, 2, "train.max_steps=12", "data.synthetic_size=301")
    assert_exit(rc, log, 2)
    assert f"cannot resume {out} from {out / 'checkpoints' / 'step-8'}" in log
    assert "data.synthetic_size changed from 300 to 301" in log and "the data differ from the checkpoint's" in log
    after = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(out) for p in fs}
    assert before == after


def test_longer_run_and_new_peak_are_allowed_with_a_warning(tmp_path, straight):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    rc, log = train(tmp_path, out, 2, "train.max_steps=10", "train.lr=0.002")
    assert rc == 0, log[-3000:]
    assert "train.max_steps changed from 8 to 10" in log and "train.lr changed from 0.001 to 0.002" in log
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert rows[:STEPS] == read_metrics(straight)


def test_signal_checkpoints_at_the_next_step_and_resume_matches(tmp_path, straight):
    """SIGUSR1 to every rank (as Slurm's --signal does): both stop at the same step boundary with a
    checkpoint and exit code 75; the resumed run reproduces the uninterrupted one."""
    import time

    out, port = tmp_path / "run", free_port()
    args = QUICK + SMALL + [f"train.output_dir={out}", f"train.max_steps={STEPS}", "train.micro_batch_size=2",
                    "train.global_batch_size=8", "data.packing=true", "logging.tensorboard=false",
                    "data.synthetic_size=1200"]
    procs, logs = [], [tmp_path / f"rank{r}.log" for r in range(2)]
    for rank in range(2):
        env = clean_env(tmp_path)
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), **PACED)  # steps left to run when the signal comes
        with open(logs[rank], "w") as fh:
            procs.append(subprocess.Popen([sys.executable, "-m", "dft_ds.train"] + args, env=env, stdout=fh,
                                          stderr=subprocess.STDOUT))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGUSR1)
    codes = [p.wait(timeout=300) for p in procs]
    text = logs[0].read_text()
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], text[-3000:] + logs[1].read_text()[-2000:]
    stopped = int(open(out / "checkpoints" / "latest").read().strip().split("-")[1])
    assert 2 <= stopped < STEPS and f"stopped at step {stopped}" in text
    assert [r["step"] for r in read_metrics(out)] == list(range(1, stopped + 1))

    ref = tmp_path / "ref"
    rc, log = train(tmp_path, ref, 2, "data.synthetic_size=1200")
    assert rc == 0, log[-3000:]
    rc, log = train(tmp_path, out, 2, "data.synthetic_size=1200")
    assert rc == 0, log[-3000:]
    assert losses(out) == losses(ref)
