"""The fault matrix: each row injects a real fault into a real 2-rank ZeRO-3 run on gloo and asserts
what dft_ds promises (docs/faults.md, "what happens when").

| fault                                   | promise                                                      |
|-----------------------------------------|--------------------------------------------------------------|
| a rank SIGKILLed mid-step               | the survivor exits non-zero in bounded time; latest resumes   |
| SIGTERM to every rank                   | checkpoint at the next step boundary, exit 75                  |
| disk full while writing a checkpoint    | exit 74 naming the error; latest unchanged and resumable      |
| a shard truncated after the fact        | auto resume skips it, names the file, uses the previous one   |
| non-finite loss, train.nonfinite=stop   | exit 3; the last good state is saved and named                |
| non-finite loss, train.nonfinite=skip   | the step changes no weight; counted as skipped_steps          |
| NaN gradient with a finite loss         | exit 3 on every rank, nothing saved; latest resumes           |
| out of memory in a step (injected)      | exit 4 with the settings that shrink a step                   |
| out of memory in a step (RLIMIT_AS)     | a real failed allocation: exit 4, the peer exits within       |
|                                         | train.comm_timeout_s, latest resumes with the same command    |

Ranks are started directly (RANK/WORLD_SIZE in the environment, no torchrun), so no launcher tears
the survivors down on our behalf: what is measured is dft_ds's own behaviour.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from dft_ds.errors import EXIT_NONFINITE, EXIT_OUT_OF_MEMORY, EXIT_PREEMPTED, EXIT_SAVE_FAILED
from tests.distributed.helpers import QUICK, SMALL, clean_env, free_port, read_metrics

pytestmark = pytest.mark.slow

BASE = QUICK + SMALL + ["train.micro_batch_size=2", "train.global_batch_size=8", "logging.tensorboard=false",
                "train.comm_timeout_s=60"]


def launch(tmp_path, out, *extra, env_extra=None, name="run"):
    """Start 2 ranks directly; returns (processes, log paths)."""
    port, procs, logs = free_port(), [], []
    for rank in range(2):
        env = clean_env(tmp_path)
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), **(env_extra or {}))
        log = tmp_path / f"{name}-rank{rank}.log"
        logs.append(log)
        with open(log, "w") as fh:  # a file, not a pipe: an unread pipe can block a rank mid-collective
            procs.append(subprocess.Popen([sys.executable, "-m", "dft_ds.train", *BASE, f"train.output_dir={out}",
                                           *extra], env=env, stdout=fh, stderr=subprocess.STDOUT))
    return procs, logs


def run_ranks(tmp_path, out, *extra, env_extra=None, name="run", timeout=300):
    procs, logs = launch(tmp_path, out, *extra, env_extra=env_extra, name=name)
    codes = [p.wait(timeout=timeout) for p in procs]
    return codes, "\n".join(log.read_text() for log in logs)


def wait_timed(procs, timeout: float) -> tuple[list[int], list[float]]:
    """Every process's exit code and the monotonic time it was seen to exit."""
    deadline, ends = time.monotonic() + timeout, [None] * len(procs)
    while None in ends and time.monotonic() < deadline:
        for i, p in enumerate(procs):
            if ends[i] is None and p.poll() is not None:
                ends[i] = time.monotonic()
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
    return [p.wait() for p in procs], ends


def latest(out) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def steps_logged(out) -> list[int]:
    return [r["step"] for r in read_metrics(out)]


def resume_ok(tmp_path, out, steps: int, name: str, *extra) -> str:
    """A normal 2-rank run in `out` to `steps` succeeds; returns its log."""
    codes, log = run_ranks(tmp_path, out, f"train.max_steps={steps}", *extra, name=name)
    assert codes == [0, 0], log[-4000:]
    assert steps_logged(out)[-1] == steps
    return log


def test_rank_killed_mid_step_survivor_exits_in_bounded_time(tmp_path):
    out = tmp_path / "run"
    start = time.monotonic()
    procs, logs = launch(tmp_path, out, "train.max_steps=12", "checkpoint.every_steps=2",
                         env_extra={"DFT_DS_FAULT": "kill_in_step:5:1"})
    codes = [p.wait(timeout=240) for p in procs]
    elapsed = time.monotonic() - start
    text = logs[0].read_text()
    assert codes[1] == -signal.SIGKILL
    assert codes[0] not in (0, None), text[-3000:]
    # Bounded: the dead peer's closed connection fails the survivor's collective at once, long
    # before train.comm_timeout_s (60 s here) would; 200 s covers start-up on a loaded machine.
    assert elapsed < 200, elapsed
    assert latest(out) == "step-4"
    log = resume_ok(tmp_path, out, 6, "resume")
    assert "resumed from" in log and "step-4" in log
    assert steps_logged(out) == list(range(1, 7))


def test_sigterm_to_every_rank_checkpoints_and_exits_75(tmp_path):
    out = tmp_path / "run"
    procs, logs = launch(tmp_path, out, "train.max_steps=40", "data.synthetic_size=1200")
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=240) for p in procs]
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], logs[0].read_text()[-3000:]
    stopped = int(latest(out).split("-")[1])
    assert stopped >= 2 and steps_logged(out) == list(range(1, stopped + 1))


def _can_mount_tmpfs() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root to mount a small tmpfs")
def test_disk_full_during_checkpoint_keeps_the_previous_one(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    # One checkpoint of the tiny model on 2 ranks is about 40 MiB: the first fits, the second does not.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(disk)], check=True)
    try:
        out = disk / "run"
        # The embedded default's own shape, whose checkpoint sizes the disk above.
        codes, log = run_ranks(tmp_path, out, "train.max_steps=8", "checkpoint.every_steps=2", "checkpoint.keep=3",
                               "model.config_overrides=")
        assert EXIT_SAVE_FAILED in codes and 0 not in codes, (codes, log[-4000:])
        assert "writing checkpoint" in log and "step-4" in log and "failed" in log
        assert "No space left on device" in log or "the disk is full" in log
        assert f"'latest' still names {out / 'checkpoints' / 'step-2'}" in log
        assert "Traceback" not in log.split("writing checkpoint")[0][-2000:]
        assert latest(out) == "step-2"
        # More room, and the same command resumes from step-2.
        subprocess.run(["mount", "-o", "remount,size=400m", str(disk)], check=True)
        log = resume_ok(tmp_path, out, 6, "resume", "model.config_overrides=")
        assert "resumed from" in log and "step-2" in log
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_truncated_shard_resume_falls_back_and_names_the_file(tmp_path):
    out = tmp_path / "run"
    codes, log = run_ranks(tmp_path, out, "train.max_steps=4", "checkpoint.every_steps=2")
    assert codes == [0, 0], log[-3000:]
    assert latest(out) == "step-4"
    shard = next((out / "checkpoints" / "step-4").glob("*optim_states.pt"))
    os.truncate(shard, shard.stat().st_size // 2)
    log = resume_ok(tmp_path, out, 6, "resume")
    assert f"{shard} is {shard.stat().st_size} bytes" in log and "is damaged, skipped" in log
    assert f"resuming from {out / 'checkpoints' / 'step-2'}" in log
    # Steps 3 and 4 were recomputed from step-2's state.
    assert steps_logged(out) == list(range(1, 7))


def test_nonfinite_loss_stop_saves_last_good_state(tmp_path):
    out = tmp_path / "run"
    codes, log = run_ranks(tmp_path, out, "train.max_steps=8", "train.nonfinite=stop",
                           env_extra={"DFT_DS_FAULT": "nan_loss:3"})
    assert codes == [EXIT_NONFINITE, EXIT_NONFINITE], log[-3000:]
    assert "non-finite loss at step 3" in log
    assert f"the last good state is {out / 'checkpoints' / 'step-2'} (step 2)" in log
    assert latest(out) == "step-2" and steps_logged(out) == [1, 2]


def _weights(out, tag):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=tag)


def test_nonfinite_loss_skip_changes_no_weight_and_is_counted(tmp_path):
    out = tmp_path / "run"
    codes, log = run_ranks(tmp_path, out, "train.max_steps=5", "train.nonfinite=skip", "checkpoint.every_steps=1",
                           "checkpoint.keep=10", "train.gradient_accumulation_steps=2",
                           env_extra={"DFT_DS_FAULT": "nan_loss:3"})
    assert codes == [0, 0], log[-3000:]
    assert "non-finite loss at step 3: step skipped" in log
    rows = {r["step"]: r for r in read_metrics(out)}
    assert rows[3]["skipped_steps"] == 1 and rows[3]["loss"] is None
    assert all("skipped_steps" not in rows[s] for s in (1, 2, 4, 5))
    assert json.loads((out / "summary.json").read_text())["run"]["skipped_steps"] == 1
    before, after, later = _weights(out, "step-2"), _weights(out, "step-3"), _weights(out, "step-4")
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert any(not torch.equal(after[n], later[n]) for n in after)  # training goes on after it


def test_out_of_memory_names_the_settings_that_shrink_a_step(tmp_path):
    out = tmp_path / "run"
    codes, log = run_ranks(tmp_path, out, "train.max_steps=6", env_extra={"DFT_DS_FAULT": "oom:2"})
    assert codes[0] == EXIT_OUT_OF_MEMORY and codes[1] != 0, (codes, log[-3000:])
    for knob in ("out of memory in training step 2", "train.micro_batch_size=2", "data.max_length=192",
                 "model.gradient_checkpointing=true", "zero3_offload", "train.global_batch_size"):
        assert knob in log, knob


def test_nan_gradient_with_a_finite_loss_exits_3_without_saving(tmp_path):
    out = tmp_path / "run"
    args = ("train.max_steps=4", "checkpoint.every_steps=2")
    # Rank 1's first parameter gets a NaN gradient in step 3; every loss stays finite.
    codes, log = run_ranks(tmp_path, out, *args, env_extra={"DFT_DS_FAULT": "nan_grad:3:1"})
    assert codes == [EXIT_NONFINITE, EXIT_NONFINITE], log[-3000:]
    assert "non-finite gradient norm (" in log and "with a finite loss at step 3; this state is not saved" in log
    assert "non-finite loss" not in log  # the loss check before backward did not fire
    assert f"the last good state is {out / 'checkpoints' / 'step-2'} (step 2)" in log
    assert latest(out) == "step-2" and not (out / "checkpoints" / "step-3").exists()
    assert steps_logged(out) == [1, 2]
    # The same command resumes from the last good state; without the fault step 3 is an ordinary step.
    codes, log = run_ranks(tmp_path, out, *args, name="resume")
    assert codes == [0, 0], log[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step-2'}" in log
    assert steps_logged(out) == [1, 2, 3, 4]


def test_out_of_memory_under_a_real_address_space_limit_exits_4_and_resumes(tmp_path):
    out = tmp_path / "run"
    # The embedded default's own shape: a step of it maps more than the limit's headroom.
    args = ("train.max_steps=4", "checkpoint.every_steps=2", "model.config_overrides=")
    # Rank 1 caps its own RLIMIT_AS at step 3 (dft_ds/faults.py limit_memory says why this way);
    # the fixed mmap threshold makes each large tensor a new mapping that the limit can refuse.
    procs, logs = launch(tmp_path, out, *args, env_extra={"DFT_DS_FAULT": "memory_limit:3:1",
                                                          "MALLOC_MMAP_THRESHOLD_": "65536"})
    codes, ends = wait_timed(procs, timeout=300)
    oom_log, peer_log = logs[1].read_text(), logs[0].read_text()
    assert codes[1] == EXIT_OUT_OF_MEMORY, (codes, oom_log[-3000:])
    assert "can't allocate memory" in oom_log or "MemoryError" in oom_log, oom_log[-3000:]
    assert "injected" not in oom_log and "Traceback" not in oom_log
    for knob in ("out of memory in training step 3", "train.micro_batch_size=2", "data.max_length=192",
                 "model.gradient_checkpointing=true", "zero3_offload", "The last checkpoint is untouched"):
        assert knob in oom_log, knob
    # The peer's next collective fails on the closed connection, well inside train.comm_timeout_s=60.
    assert codes[0] not in (0, EXIT_OUT_OF_MEMORY), (codes, peer_log[-3000:])
    assert ends[0] - ends[1] < 60, ends
    assert latest(out) == "step-2" and steps_logged(out) == [1, 2]
    codes, log = run_ranks(tmp_path, out, *args, name="resume")
    assert codes == [0, 0], log[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step-2'}" in log
    assert steps_logged(out) == [1, 2, 3, 4]


def test_real_allocation_failures_are_recognised_as_out_of_memory():
    """What a failed allocation really raises on CPU, and what a CUDA one is, map to exit 4; a peer's
    closed connection does not."""
    from dft_ds.memory import is_out_of_memory

    with pytest.raises(RuntimeError) as allocator:
        torch.empty(1 << 60, dtype=torch.uint8)  # DefaultCPUAllocator: can't allocate memory
    with pytest.raises(MemoryError) as python:
        bytearray(1 << 60)
    assert is_out_of_memory(allocator.value) and is_out_of_memory(python.value)
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_out_of_memory(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer"))
