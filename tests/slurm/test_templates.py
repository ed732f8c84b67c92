"""slurm/*.sbatch outside Slurm: argument handling, exit codes and the signal trap, with stand-ins
for srun, scontrol and python that record what they were given. Quick; needs only bash."""

import os
import signal
import stat
import subprocess
import time

import pytest

from tests.slurm import harness

FAKE_SRUN = """#!/bin/bash
# Record argv (one per line, NUL-free test values), then behave as FAKE_SRUN_MODE says.
printf '%s\\n' "$@" > "$FAKE_LOG/srun.args"
case "${FAKE_SRUN_MODE:-exit}" in
  exit) exit "${FAKE_RC:-0}" ;;
  wait-signal)  # a training step: exits 75 once it is asked to stop
    trap 'echo got-usr1 >> "$FAKE_LOG/srun.signals"; exit 75' USR1
    trap 'echo got-term >> "$FAKE_LOG/srun.signals"; exit 1' TERM
    echo started > "$FAKE_LOG/srun.started"
    for _ in $(seq 1 300); do sleep 0.1; done
    exit 0 ;;
esac
"""
FAKE_SCONTROL = """#!/bin/bash
printf '%s\\n' "$@" >> "$FAKE_LOG/scontrol.args"
exit 0
"""
FAKE_PYTHON = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_LOG/python.args"
exit "${FAKE_RC:-0}"
"""
FAKE_SBATCH = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_LOG/sbatch.args"
echo 4242
"""


def write_exe(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake(tmp_path):
    """A PATH with fake srun/scontrol, a fake venv whose python3 records its arguments, and a
    Slurm-like environment for a 2-node job 123."""
    bin_dir, venv, logs = tmp_path / "bin", tmp_path / "venv", tmp_path / "fake-log"
    for d in (bin_dir, venv / "bin", logs):
        d.mkdir(parents=True)
    write_exe(bin_dir / "srun", FAKE_SRUN)
    write_exe(bin_dir / "scontrol", FAKE_SCONTROL)
    write_exe(bin_dir / "sbatch", FAKE_SBATCH)
    write_exe(venv / "bin" / "python3", FAKE_PYTHON)
    write_exe(venv / "bin" / "python", FAKE_PYTHON)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "FAKE_LOG": str(logs),
           "REPO": harness.REPO, "VENV": str(venv), "SLURM_JOB_ID": "123", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_SUBMIT_DIR": str(tmp_path)}
    return tmp_path, env, logs


def run_template(script, args, env, cwd, timeout=60):
    return subprocess.run(["bash", script, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def lines(path):
    return path.read_text().splitlines() if path.exists() else []


SLURM_DIR = os.path.join(harness.REPO, "slurm")


def train_call(tmp, env, logs):
    """Defaults: one dft-launch per node through srun, torchrun inside."""
    return logs / "srun.args", ["--nodes=2", "--ntasks-per-node=1", str(tmp / "venv" / "bin" / "python3"),
                                os.path.join(harness.REPO, "launcher", "dft-launch"), "--via", "torchrun"]


def convert_call(tmp, env, logs):
    env.update(CHECKPOINT_DIR="runs/r/checkpoints")
    return logs / "python.args", ["-m", "dft_ds.convert", "runs/r/checkpoints", "runs/r/hf", "--no-progress"]


def eval_call(tmp, env, logs):
    """Array task 1 of 2: its shard of dft-eval (task 0 would also submit the merge)."""
    env.update(MODEL="runs/r/hf", BENCHMARKS="synthetic math500=m.jsonl", OUT="evals/r", SLURM_ARRAY_TASK_ID="1",
               SLURM_ARRAY_TASK_COUNT="2", SLURM_ARRAY_JOB_ID="77")
    return logs / "python.args", ["-m", "dft_ds.eval", "--model", "runs/r/hf", "--shard", "1/2", "--out",
                                  "evals/r.shards/shard-1-of-2", "--samples", "16", "--temperature", "1.0",
                                  "--backend", "hf", "--no-progress", "--benchmark", "synthetic", "--benchmark",
                                  "math500=m.jsonl"]


def sample_call(tmp, env, logs):
    """Array task 1 of 2: its shard of dft-sample (task 0 would also submit the merge)."""
    env.update(MODEL="runs/r/hf", BENCHMARKS="synthetic-train train=t.jsonl", OUT="samples/r", SLURM_ARRAY_TASK_ID="1",
               SLURM_ARRAY_TASK_COUNT="2", SLURM_ARRAY_JOB_ID="77")
    return logs / "python.args", ["-m", "dft_ds.sample", "--model", "runs/r/hf", "--shard", "1/2", "--out",
                                  "samples/r.shards/shard-1-of-2", "--samples", "8", "--temperature", "1.0",
                                  "--backend", "hf", "--no-progress", "--benchmark", "synthetic-train", "--benchmark",
                                  "train=t.jsonl"]


# Every template in slurm/, with how to run it and the command it must hand to the (fake) scheduler.
TEMPLATE_CALLS = {"train.sbatch": train_call, "convert.sbatch": convert_call, "eval.sbatch": eval_call,
                  "sample.sbatch": sample_call}


def test_every_template_is_exercised_here():
    assert sorted(n for n in os.listdir(SLURM_DIR) if n.endswith(".sbatch")) == sorted(TEMPLATE_CALLS)


@pytest.mark.parametrize("name", sorted(TEMPLATE_CALLS))
def test_every_template_runs_against_fakes(fake, name):
    tmp, env, logs = fake
    record, expected = TEMPLATE_CALLS[name](tmp, env, logs)
    proc = run_template(os.path.join(SLURM_DIR, name), [], env, tmp)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert lines(record) == expected


def test_eval_task_zero_submits_the_merge_once(fake):
    tmp, env, logs = fake
    eval_call(tmp, env, logs)
    env.update(SLURM_ARRAY_TASK_ID="0")
    for _ in range(2):  # a requeued task 0 must not submit a second merge
        proc = run_template(os.path.join(SLURM_DIR, "eval.sbatch"), [], env, tmp)
        assert proc.returncode == 0, proc.stderr + proc.stdout
        if _ == 0:
            submit = lines(logs / "sbatch.args")
            (logs / "sbatch.args").unlink()
    assert submit[:4] == ["--parsable", "--dependency=afterok:77", "--array=0", "--job-name=dft-eval-merge"]
    assert "MODE=merge,SHARD_COUNT=2,OUT=evals/r" in submit[4] and submit[-1].endswith("slurm/eval.sbatch")
    assert not (logs / "sbatch.args").exists()
    assert lines(logs / "python.args")[:6] == ["-m", "dft_ds.eval", "--model", "runs/r/hf", "--shard", "0/2"]


def test_a_template_without_its_required_knob_exits_2(fake):
    tmp, env, logs = fake
    proc = run_template(os.path.join(SLURM_DIR, "eval.sbatch"), [], env, tmp)
    assert proc.returncode == 2 and "set OUT" in proc.stdout
    assert not (logs / "python.args").exists()



def test_sample_task_zero_submits_the_merge_once(fake):
    tmp, env, logs = fake
    sample_call(tmp, env, logs)
    env.update(SLURM_ARRAY_TASK_ID="0")
    submits = []
    for _ in range(2):  # a requeued task 0 must not submit a second merge
        proc = run_template(os.path.join(SLURM_DIR, "sample.sbatch"), [], env, tmp)
        assert proc.returncode == 0, proc.stderr + proc.stdout
        submits.append(lines(logs / "sbatch.args"))
        (logs / "sbatch.args").unlink(missing_ok=True)
    submit = submits[0]
    assert submit[:4] == ["--parsable", "--dependency=afterok:77", "--array=0", "--job-name=dft-sample-merge"]
    assert "MODE=merge,SHARD_COUNT=2,OUT=samples/r,SHARDS_DIR=samples/r.shards" in submit[4]
    assert submit[-1].endswith("slurm/sample.sbatch") and submits[1] == []
    assert lines(logs / "python.args")[:6] == ["-m", "dft_ds.sample", "--model", "runs/r/hf", "--shard", "0/2"]


def test_sample_without_auto_merge_submits_nothing(fake):
    tmp, env, logs = fake
    sample_call(tmp, env, logs)
    env.update(SLURM_ARRAY_TASK_ID="0", AUTO_MERGE="0")
    proc = run_template(os.path.join(SLURM_DIR, "sample.sbatch"), [], env, tmp)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert not (logs / "sbatch.args").exists()
    assert lines(logs / "python.args")[4:6] == ["--shard", "0/2"]


@pytest.mark.parametrize("unset,message", [("OUT", "set OUT"), ("MODEL", "set MODEL"),
                                           ("BENCHMARKS", "set BENCHMARKS")])
def test_sample_without_a_required_knob_exits_2(fake, unset, message):
    tmp, env, logs = fake
    sample_call(tmp, env, logs)
    del env[unset]
    proc = run_template(os.path.join(SLURM_DIR, "sample.sbatch"), [], env, tmp)
    assert proc.returncode == 2 and message in proc.stdout
    assert not (logs / "python.args").exists() and not (logs / "sbatch.args").exists()


def test_sample_outside_an_array_or_with_odd_ids_exits_2(fake):
    tmp, env, logs = fake
    sample_call(tmp, env, logs)
    env.update(SLURM_ARRAY_TASK_MIN="1", SLURM_ARRAY_TASK_MAX="2")
    proc = run_template(os.path.join(SLURM_DIR, "sample.sbatch"), [], env, tmp)
    assert proc.returncode == 2 and "array task ids must be 0..n-1" in proc.stdout
    del env["SLURM_ARRAY_TASK_ID"]
    proc = run_template(os.path.join(SLURM_DIR, "sample.sbatch"), [], env, tmp)
    assert proc.returncode == 2 and "not an array task" in proc.stdout
    assert not (logs / "python.args").exists()


def test_sample_passes_user_values_through_as_literal_words(fake):
    tmp, env, logs = fake
    sample_call(tmp, env, logs)
    (tmp / "a.jsonl").write_text("")  # a glob that would match if the knobs were expanded unquoted
    env.update(MODEL="runs/my model/hf", OUT="samples/my run/", BENCHMARKS="train=*.jsonl",
               SAMPLES="4", TEMPERATURE="0.7", MAX_NEW_TOKENS="512", BACKEND="vllm",
               EXTRA_ARGS="--max-per-problem 2  --dedup --field problem=$(touch pwned)")
    proc = run_template(os.path.join(SLURM_DIR, "sample.sbatch"), [], env, tmp)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert lines(logs / "python.args") == [
        "-m", "dft_ds.sample", "--model", "runs/my model/hf", "--shard", "1/2", "--out",
        "samples/my run.shards/shard-1-of-2", "--samples", "4", "--temperature", "0.7", "--backend", "vllm",
        "--no-progress", "--max-new-tokens", "512", "--benchmark", "train=*.jsonl",
        "--max-per-problem", "2", "--dedup", "--field", "problem=$(touch", "pwned)"]
    assert not (tmp / "pwned").exists()


def test_sample_skips_a_finished_shard(fake):
    tmp, env, logs = fake
    sample_call(tmp, env, logs)
    shard = tmp / "samples" / "r.shards" / "shard-1-of-2"
    shard.mkdir(parents=True)
    (shard / "train.jsonl").write_text("")  # an unfinished shard (no selection.json) is sampled again
    proc = run_template(os.path.join(SLURM_DIR, "sample.sbatch"), [], env, tmp)
    assert proc.returncode == 0 and (logs / "python.args").exists()
    (logs / "python.args").unlink()
    (shard / "selection.json").write_text("{}")
    proc = run_template(os.path.join(SLURM_DIR, "sample.sbatch"), [], env, tmp)
    assert proc.returncode == 0 and "already done" in proc.stdout
    assert not (logs / "python.args").exists()


def test_sample_merge_mode_names_every_shard(fake):
    tmp, env, logs = fake
    env.update(MODE="merge", OUT="samples/r/", SHARD_COUNT="3")
    proc = run_template(os.path.join(SLURM_DIR, "sample.sbatch"), [], env, tmp)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert lines(logs / "python.args") == ["-m", "dft_ds.sample", "merge", "samples/r.shards/shard-0-of-3",
                                           "samples/r.shards/shard-1-of-3", "samples/r.shards/shard-2-of-3",
                                           "--out", "samples/r"]
    del env["SHARD_COUNT"]
    proc = run_template(os.path.join(SLURM_DIR, "sample.sbatch"), [], env, tmp)
    assert proc.returncode == 2 and "SHARD_COUNT" in proc.stdout


def test_sample_dry_run_prints_and_runs_nothing(fake):
    tmp, env, logs = fake
    sample_call(tmp, env, logs)
    env.update(SLURM_ARRAY_TASK_ID="0", DRY_RUN="1")
    proc = run_template(os.path.join(SLURM_DIR, "sample.sbatch"), [], env, tmp)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "sbatch --parsable" in proc.stdout and "-m dft_ds.sample --model runs/r/hf --shard 0/2" in proc.stdout
    assert not (logs / "python.args").exists() and not (logs / "sbatch.args").exists()
    assert not (tmp / "samples").exists()


def test_train_passes_user_values_through_as_literal_words(fake):
    tmp, env, logs = fake
    (tmp / "a.jsonl").write_text("")  # a glob that would match if OVERRIDES were expanded unquoted
    env.update(NPROC_PER_NODE="4", OUTPUT_DIR="runs/my run", OVERRIDES="data.source=*.jsonl  train.lr=1e-5",
               CONFIG="ignored.yaml")
    proc = run_template(harness.TRAIN, ["my config.yaml", "model.name_or_path=$(touch pwned) `x`"], env, tmp)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    python = str(tmp / "venv" / "bin" / "python3")
    assert lines(logs / "srun.args") == [
        "--nodes=2", "--ntasks-per-node=1",
        python, os.path.join(harness.REPO, "launcher", "dft-launch"), "--via", "torchrun", "--nproc-per-node", "4",
        "my config.yaml", "train.output_dir=runs/my run", "data.source=*.jsonl", "train.lr=1e-5",
        "model.name_or_path=$(touch pwned) `x`"]
    assert not (tmp / "pwned").exists()
    assert lines(logs / "scontrol.args") == []  # exit 0: nothing to requeue


def test_train_defaults_and_cpus_per_task(fake):
    tmp, env, logs = fake
    env.update(SLURM_CPUS_PER_TASK="16", VIA="deepspeed")
    proc = run_template(harness.TRAIN, [], env, tmp)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    args = lines(logs / "srun.args")
    assert args[:3] == ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=16"]
    assert args[-2:] == ["--via", "deepspeed"]  # no --nproc-per-node: dft-launch counts the GPUs


@pytest.mark.parametrize("rc,restarts,expect_rc,requeued", [
    (75, "0", 0, True),       # stopped with a checkpoint: requeue
    (75, "20", 75, False),    # MAX_REQUEUES reached: stop for good, say so with 75
    (3, "0", 3, False),       # a failure propagates
    (2, "0", 2, False),       # bad input propagates
])
def test_train_exit_codes(fake, rc, restarts, expect_rc, requeued):
    tmp, env, logs = fake
    env.update(FAKE_RC=str(rc), SLURM_RESTART_COUNT=restarts)
    proc = run_template(harness.TRAIN, [], env, tmp)
    assert proc.returncode == expect_rc, proc.stdout + proc.stderr
    assert lines(logs / "scontrol.args") == (["requeue", "123"] if requeued else [])


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=lambda s: s.name)
def test_train_trap_asks_the_step_to_stop_waits_and_requeues(fake, sig):
    """USR1 or TERM to the batch shell reach the step as USR1 (checkpoint and stop), once."""
    tmp, env, logs = fake
    env.update(FAKE_SRUN_MODE="wait-signal")
    proc = subprocess.Popen(["bash", harness.TRAIN], env=env, cwd=tmp, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not (logs / "srun.started").exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() else ""
        time.sleep(0.05)
    proc.send_signal(sig)
    time.sleep(0.3)
    proc.send_signal(sig)  # a second one is not passed on again
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert lines(logs / "srun.signals") == ["got-usr1"]
    assert lines(logs / "scontrol.args") == ["requeue", "123"]
    assert f"got {sig.name}" in out and "passing SIGUSR1 to the training step" in out and "requeueing job 123 (restart 1)" in out


def test_convert_builds_arguments_from_knobs(fake):
    tmp, env, logs = fake
    env.update(CHECKPOINT_DIR="runs/a b/checkpoints/", TAG="step-4", DTYPE="bf16", VERIFY="1")
    proc = run_template(harness.CONVERT, [], env, tmp)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert lines(logs / "python.args") == ["-m", "dft_ds.convert", "runs/a b/checkpoints", "runs/a b/hf",
                                           "--no-progress", "--tag", "step-4", "--dtype", "bf16", "--verify"]


def test_convert_of_a_run_directory_writes_beside_its_checkpoints(fake):
    # dft-convert takes a run directory for its checkpoints/; the default OUT_DIR was <run>/../hf
    tmp, env, logs = fake
    (tmp / "runs" / "r" / "checkpoints").mkdir(parents=True)
    env.update(CHECKPOINT_DIR="runs/r")
    proc = run_template(harness.CONVERT, [], env, tmp)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert lines(logs / "python.args") == ["-m", "dft_ds.convert", "runs/r", "runs/r/hf", "--no-progress"]


def test_convert_arguments_win_and_exit_code_propagates(fake):
    tmp, env, logs = fake
    env.update(CHECKPOINT_DIR="ignored", FAKE_RC="2")
    proc = run_template(harness.CONVERT, ["ck", "out", "--overwrite"], env, tmp)
    assert proc.returncode == 2
    assert lines(logs / "python.args") == ["-m", "dft_ds.convert", "ck", "out", "--overwrite"]


def test_convert_without_a_checkpoint_says_so(fake):
    tmp, env, logs = fake
    proc = run_template(harness.CONVERT, [], env, tmp)
    assert proc.returncode == 2 and "no checkpoint" in proc.stdout
