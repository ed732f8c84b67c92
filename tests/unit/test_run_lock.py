"""run.lock: one run per directory. A live holder is named and refused, a dead one is taken over
with a warning, a requeued attempt of the same Slurm job waits for its predecessor, and the lock
is only ever removed by its own holder."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from dft_ds.rundir import LOCK_FILE, RunLock, RunLocked, is_started, read_lock, stale_reason


def fake_holder(path, **fields) -> dict:
    info = {"host": "node17", "pid": 4242, "slurm_job_id": None, "started": time.time() - 60,
            "heartbeat": time.time(), "token": "someone-else"}
    info.update(fields)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, LOCK_FILE), "w") as fh:
        json.dump(info, fh)
    return info


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_lock_records_its_holder_and_is_removed_on_release(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    run = str(tmp_path / "run")
    lock = RunLock.acquire(run, stale_s=60)
    info = read_lock(run)
    assert info["host"] == socket.gethostname() and info["pid"] == os.getpid() and info["slurm_job_id"] == "777"
    assert abs(info["started"] - time.time()) < 30 and info["heartbeat"] >= info["started"]
    assert not is_started(run)  # a lock alone does not make a run directory
    lock.release()
    assert not os.path.exists(os.path.join(run, LOCK_FILE))


def test_a_second_start_is_refused_and_names_the_holder(tmp_path):
    run = str(tmp_path / "run")
    first = RunLock.acquire(run, stale_s=60)
    with pytest.raises(RunLocked) as err:
        RunLock.acquire(run, stale_s=60)
    message = str(err.value)
    assert f"'{run}' is locked by a live run (host {socket.gethostname()} pid {os.getpid()}" in message
    assert "another run is training in it" in message and "train.lock_stale_s=60" in message
    assert read_lock(run)["token"] == first.info["token"]  # the refused start changed nothing
    first.release()


def test_a_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    run = str(tmp_path / "run")
    pid = dead_pid()
    fake_holder(run, host=socket.gethostname(), pid=pid)
    warnings = []
    lock = RunLock.acquire(run, stale_s=600, warn=warnings.append)
    assert read_lock(run)["pid"] == os.getpid()
    assert len(warnings) == 1 and "taking over a stale lock" in warnings[0] and f"no process {pid} runs" in warnings[0]
    assert sorted(os.listdir(run)) == [LOCK_FILE]  # the stale one is not left beside it
    lock.release()


def test_a_lock_on_another_host_is_stale_only_when_its_heartbeat_is_old(tmp_path):
    run = str(tmp_path / "run")
    fake_holder(run, heartbeat=time.time() - 5)
    with pytest.raises(RunLocked, match="host node17 pid 4242"):
        RunLock.acquire(run, stale_s=60)
    fake_holder(run, heartbeat=time.time() - 120)
    warnings = []
    RunLock.acquire(run, stale_s=60, warn=warnings.append).release()
    assert "its heartbeat is 120 s old (train.lock_stale_s=60)" in warnings[0]
    assert stale_reason({"host": "x"}, 60) == "the lock file cannot be read as a lock"


def test_the_heartbeat_is_renewed_while_held(tmp_path):
    run = str(tmp_path / "run")
    lock = RunLock.acquire(run, stale_s=10)  # renewed every second
    first = read_lock(run)["heartbeat"]
    time.sleep(2.5)
    assert read_lock(run)["heartbeat"] > first
    lock.release()


def test_a_requeued_attempt_waits_for_its_predecessor_of_the_same_job(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "31")
    run = str(tmp_path / "run")
    fake_holder(run, slurm_job_id="31")
    threading.Timer(1.5, lambda: os.remove(os.path.join(run, LOCK_FILE))).start()  # it finishes saving
    warnings = []
    start = time.monotonic()
    lock = RunLock.acquire(run, stale_s=60, warn=warnings.append, wait_s=30, poll_s=0.1)
    assert 1.0 < time.monotonic() - start < 20
    assert "still held by an earlier attempt of Slurm job 31" in warnings[0] and "waiting up to 30 s" in warnings[0]
    lock.release()
    fake_holder(run, slurm_job_id="31")  # ... and one that never finishes is refused after the wait
    with pytest.raises(RunLocked, match="an earlier attempt of this Slurm job still holds it after 1 s"):
        RunLock.acquire(run, stale_s=60, wait_s=1, poll_s=0.1)


def test_another_job_is_not_waited_for(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "31")
    run = str(tmp_path / "run")
    fake_holder(run, slurm_job_id="32")
    start = time.monotonic()
    with pytest.raises(RunLocked, match="Slurm job 32"):
        RunLock.acquire(run, stale_s=60, wait_s=30)
    assert time.monotonic() - start < 5


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    run = str(tmp_path / "run")
    lock = RunLock.acquire(run, stale_s=60)
    os.remove(os.path.join(run, LOCK_FILE))
    other = fake_holder(run)  # taken over by another start meanwhile
    lock.release()
    assert read_lock(run)["token"] == other["token"]


def test_racing_starts_get_exactly_one_lock(tmp_path):
    run = str(tmp_path / "run")
    code = ("import sys, time; from dft_ds.rundir import RunLock, RunLocked\n"
            "try:\n  lock = RunLock.acquire(sys.argv[1], 60); print('won', flush=True); time.sleep(3); lock.release()\n"
            "except RunLocked: print('refused', flush=True)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, run], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outcomes == ["refused", "refused", "refused", "won"]
    assert not os.path.exists(os.path.join(run, LOCK_FILE))


def test_check_reports_a_live_holder(tmp_path, dft_train):
    run = tmp_path / "run"
    fake_holder(str(run), host=socket.gethostname(), pid=os.getppid(), slurm_job_id="55")  # a live process
    proc = dft_train("--check", f"train.output_dir={run}", "data.synthetic_size=64")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"'{run}' is locked by a live run (host {socket.gethostname()} pid {os.getppid()}, Slurm job 55" in proc.stdout
    assert sorted(os.listdir(run)) == [LOCK_FILE]


def test_a_lock_with_this_process_s_pid_that_it_does_not_hold_is_taken_over(tmp_path):
    """A resumed start given the pid of the dead run that left the lock (containers and Slurm steps
    number their processes alike) was warned that the run was locked by itself."""
    run = str(tmp_path / "run")
    fake_holder(run, host=socket.gethostname(), pid=os.getpid())  # a fresh heartbeat: only the pid tells
    warnings = []
    lock = RunLock.acquire(run, stale_s=600, warn=warnings.append)
    assert read_lock(run)["token"] == lock.info["token"]
    assert len(warnings) == 1 and f"pid {os.getpid()} is this start's own" in warnings[0], warnings
    # the plan a run builds while holding its lock has no word about it
    assert stale_reason(read_lock(run), 600) is None
    lock.release()
