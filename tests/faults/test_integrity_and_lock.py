"""Real runs against the two newest promises of docs/faults.md:

| fault                                              | promise                                                      |
|----------------------------------------------------|--------------------------------------------------------------|
| one byte flipped in a model shard, an optimizer     | the resume names the file, falls back to the previous        |
| shard or dft_state.json of `latest`                 | checkpoint, continues exactly; the damaged one is kept aside |
| a second start on a directory a run trains in       | it exits 2 naming the holder; the first run is untouched     |
| a stale lock (its holder died)                      | taken over with a warning; the run trains                    |
| a requeued attempt while its predecessor still runs | it waits, then resumes from the checkpoint the other saved   |

2-rank ZeRO-3 runs on gloo, started directly (RANK/WORLD_SIZE in the environment), as in the
fault matrix.
"""

import json
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from dft_ds.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED
from dft_ds.rundir import LOCK_FILE
from tests.distributed.helpers import QUICK, REPO, SMALL, clean_env, free_port, read_metrics

pytestmark = pytest.mark.slow

BASE = QUICK + SMALL + ["train.micro_batch_size=2", "train.global_batch_size=8", "logging.tensorboard=false",
                "train.comm_timeout_s=60"]


def start(tmp_path, out, *extra, ranks=2, name="run", env_extra=None):
    port, procs, logs = free_port(), [], []
    for rank in range(ranks):
        env = clean_env(tmp_path)
        env.update(RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), **(env_extra or {}))
        log = tmp_path / f"{name}-rank{rank}.log"
        logs.append(log)
        with open(log, "w") as fh:
            procs.append(subprocess.Popen([sys.executable, "-m", "dft_ds.train", *BASE, f"train.output_dir={out}",
                                           *extra], env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO))
    return procs, logs


def finish(procs, logs, timeout=300):
    codes = [p.wait(timeout=timeout) for p in procs]
    return codes, "\n".join(log.read_text() for log in logs)


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out)}


def flip_middle_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(data)


def wait_for(predicate, timeout: float, what: str, logs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"no {what} after {timeout:.0f} s\n" + "\n".join(log.read_text()[-2000:] for log in logs))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run of 6 steps stopped at step 4 with step-2 and step-4, and the same run continued to 6 (the reference)."""
    tmp = tmp_path_factory.mktemp("integrity")
    out = tmp / "run"
    # stop_at_step keeps the schedule of 6 steps, so every continuation below is the same run.
    codes, log = finish(*start(tmp, out, "train.max_steps=6", "train.stop_at_step=4", "checkpoint.every_steps=2",
                               "checkpoint.keep=3"))
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], log[-3000:]
    reference = tmp / "reference"
    shutil.copytree(out, reference)
    codes, log = finish(*start(tmp, reference, "train.max_steps=6", "checkpoint.every_steps=2",
                               "checkpoint.keep=3", name="reference"))
    assert codes == [0, 0], log[-3000:]
    return out, losses(reference)


@pytest.mark.parametrize("victim", ["zero_pp_rank_1_mp_rank_00_model_states.pt",
                                    "zero_pp_rank_0_mp_rank_00_optim_states.pt", "dft_state.json"])
def test_a_flipped_byte_in_latest_is_named_and_the_resume_falls_back(saved, tmp_path, victim):
    original, reference = saved
    out = tmp_path / "run"
    shutil.copytree(original, out)
    step4 = out / "checkpoints" / "step-4"
    flip_middle_byte(step4 / victim)
    damaged = (step4 / victim).read_bytes()

    if victim != "dft_state.json":  # dft-convert refuses it too, before unpickling anything
        proc = subprocess.run([sys.executable, "-m", "dft_ds.convert", str(out), str(tmp_path / "hf")],
                              env=clean_env(tmp_path), capture_output=True, text=True, timeout=300)
        assert proc.returncode == EXIT_BAD_INPUT, proc.stderr[-2000:]
        assert f"{step4 / victim} has other content than was written" in proc.stderr
        assert not (tmp_path / "hf").exists()

    codes, log = finish(*start(tmp_path, out, "train.max_steps=6", "checkpoint.every_steps=2", "checkpoint.keep=3"))
    assert codes == [0, 0], log[-3000:]
    assert f"{step4} is damaged, skipped: {step4 / victim}" in log or (
        victim == "dft_state.json" and f"{step4} is damaged, skipped: " in log and "dft_state.json" in log)
    assert f"resuming from {out / 'checkpoints' / 'step-2'}" in log
    # The same losses as the uninterrupted run (steps 3 to 6 recomputed from step-2).
    got = losses(out)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in (3, 4, 5, 6):
        assert got[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    # Nothing overwritten: the damaged checkpoint is kept aside byte for byte, and step-4 was saved anew.
    aside = out / "checkpoints" / "step-4.superseded"
    assert (aside / victim).read_bytes() == damaged
    assert "moved to" in log and str(aside) in log
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-6"
    assert not (out / LOCK_FILE).exists()


def test_a_second_start_exits_2_naming_the_holder_and_touches_nothing(tmp_path):
    out = tmp_path / "run"
    # Alive for 30 s or more (each step waits 1 s first): the second start meets it running.
    first, first_logs = start(tmp_path, out, "train.max_steps=30", "data.synthetic_size=600", ranks=1, name="first",
                              env_extra={"DFT_DS_FAULT_STEP_SLEEP": "1"})
    wait_for(lambda: (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 1,
             240, "first step of the first run", first_logs)
    holder = json.loads((out / LOCK_FILE).read_text())
    assert holder["pid"] == first[0].pid and holder["host"] == socket.gethostname()
    files_before = sorted(p.name for p in out.iterdir())

    codes, log = finish(*start(tmp_path, out, "train.max_steps=30", "data.synthetic_size=600", name="second"))
    assert codes == [EXIT_BAD_INPUT, EXIT_BAD_INPUT], log[-3000:]
    assert f"'{out}' is locked by a live run (host {socket.gethostname()} pid {first[0].pid}" in log
    assert "another run is training in it" in log and "Traceback" not in log
    assert first[0].poll() is None  # the first run goes on
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(LOCK_FILE)) == \
        [n for n in files_before if not n.startswith(LOCK_FILE)]

    codes, log = finish(first, first_logs)
    assert codes == [0], log[-3000:]
    assert sorted(losses(out)) == list(range(1, 31))
    assert len((out / "config_history.jsonl").read_text().splitlines()) == 1  # one start trained
    assert not (out / LOCK_FILE).exists()

    # A lock its holder left behind (SIGKILL, here a pid that no longer exists) is taken over.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "slurm_job_id": None,
                                             "started": time.time() - 99, "heartbeat": time.time(), "token": "x"}))
    codes, log = finish(*start(tmp_path, out, "train.max_steps=32", "data.synthetic_size=600", name="stale"))
    assert codes == [0, 0], log[-3000:]
    assert "taking over a stale lock" in log and f"no process {dead.pid} runs on this host" in log
    assert sorted(losses(out)) == list(range(1, 33)) and not (out / LOCK_FILE).exists()


def test_a_requeued_attempt_waits_for_its_predecessor_then_resumes_from_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    job = {"SLURM_JOB_ID": "4711"}  # both attempts belong to one Slurm job
    args = ("train.max_steps=30", "data.synthetic_size=600")
    # The first attempt lives until its SIGTERM (each step waits 1 s first); the second does not wait.
    before, before_logs = start(tmp_path, out, *args, ranks=1, name="attempt1",
                                env_extra=dict(job, DFT_DS_FAULT_STEP_SLEEP="1"))
    wait_for(lambda: (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2,
             240, "second step of the first attempt", before_logs)
    after, after_logs = start(tmp_path, out, *args, ranks=1, name="attempt2", env_extra=job)
    wait_for(lambda: "waiting up to" in after_logs[0].read_text(), 240, "wait message of the second attempt",
             after_logs)
    before[0].send_signal(signal.SIGTERM)  # the first attempt is preempted: it saves, then exits 75
    codes, log1 = finish(before, before_logs)
    assert codes == [EXIT_PREEMPTED], log1[-3000:]
    stopped = int((out / "checkpoints" / "latest").read_text().strip().split("-")[1])

    codes, log2 = finish(after, after_logs)
    assert codes == [0], log2[-3000:]
    assert "still held by an earlier attempt of Slurm job 4711" in log2
    assert f"resumed from {out / 'checkpoints' / f'step-{stopped}'} at step {stopped}" in log2
    history = [json.loads(line) for line in (out / "config_history.jsonl").read_text().splitlines()]
    assert [h["from_step"] for h in history] == [0, stopped]
    assert sorted(losses(out)) == list(range(1, 31)) and not (out / LOCK_FILE).exists()
