"""The real templates on a real (local) Slurm: a single-node run, preemption with requeue and an
exact resume, and the CPU conversion job.

2 ranks on one node through slurm/train.sbatch -> srun -> launcher/dft-launch -> torchrun, ZeRO-3
on gloo, fp32: the per-step losses of a Slurm run, interrupted or not, equal those of a plain
torchrun run of the same config bit for bit.
"""

import importlib.util
import re
import sys
import time

import pytest

from tests.distributed.helpers import QUICK, REPO, clean_env, read_metrics
from tests.slurm import harness

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

STEPS = 10
# As tests/distributed/test_resume.py: packing, accumulation 2; each step takes about a second
# here, which leaves the signal time to arrive before the run ends.
ARGS = QUICK + [f"train.max_steps={STEPS}", "train.global_batch_size=8", "data.packing=true",
                "data.synthetic_size=1200", "checkpoint.every_steps=2", "logging.tensorboard=false"]
JOB_TIMEOUT = 420


def losses(out) -> list[tuple]:
    return [(r["step"], r["loss"], r["nll"]) for r in read_metrics(out)]


def report(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\n[slurm timing] {text}", flush=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The submission directory: jobs run here, runs/ and the logs are relative to it."""
    return tmp_path_factory.mktemp("slurm-work")


@pytest.fixture(scope="module")
def job_env(workdir):
    env = clean_env(workdir)  # one tokenizer cache (workdir/cache) for the reference and every job
    env.update(REPO=REPO, VENV=sys.prefix, NPROC_PER_NODE="2")
    return env


@pytest.fixture(scope="module")
def reference(workdir, job_env):
    """The uninterrupted run, started with plain torchrun outside Slurm."""
    return harness.torchrun_reference(workdir, job_env, ARGS)


def log_path(workdir, job_id: str, name: str = "dft-train"):
    return workdir / f"{name}-{job_id}.out"  # --output=%x-%j.out: the submission directory


@pytest.fixture(scope="module")
def finished(local_slurm, workdir, job_env):
    """A single-node job run to the end. Submitted held, so that a line can be put in its log first:
    the job must append to it (--open-mode=append), not replace it."""
    out = "runs/single"
    job = local_slurm.sbatch(harness.TRAIN, *ARGS, f"train.output_dir={out}", env=job_env, cwd=workdir,
                             options=["--hold"])
    log = log_path(workdir, job)
    log.write_text("line written before the job started\n")
    released = time.monotonic()
    local_slurm.run("scontrol", "release", job)
    first = harness.wait_for_lines(workdir / out / "metrics.jsonl", 1, JOB_TIMEOUT, local_slurm, job)
    info = local_slurm.wait_job(job, JOB_TIMEOUT)
    return {"job": job, "info": info, "out": workdir / out, "log": log, "to_first_step": first - released}


def test_single_node_job_finishes_with_metrics_and_checkpoint(local_slurm, finished, reference, capsys):
    info, out = finished["info"], finished["out"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", local_slurm.diagnostics(info)
    assert info["Restarts"] == "0"
    assert info["StdOut"] == str(finished["log"])
    text = finished["log"].read_text()
    assert text.startswith("line written before the job started\n")  # appended, not replaced
    assert f"job {finished['job']} (restart 0) on 1 node: " in text
    assert "--via torchrun --nproc-per-node 2" in text and "training exited with 0" in text
    assert [r["step"] for r in read_metrics(out)] == list(range(1, STEPS + 1))
    assert open(out / "checkpoints" / "latest").read().strip() == f"step-{STEPS}"
    assert (out / "checkpoints" / f"step-{STEPS}" / "dft_state.json").is_file()
    assert (out / "summary.json").is_file()
    assert losses(out) == losses(reference)  # the Slurm path changes nothing
    report(capsys, f"release of a held sbatch job -> first metrics line: {finished['to_first_step']:.1f} s")


def test_bare_sbatch_from_a_directory_without_logs_writes_its_log(local_slurm, job_env, tmp_path):
    # The template's default was --output=logs/%x-%j.out: Slurm does not create logs/, and the job
    # failed with no log at all to say why.
    submit_dir = tmp_path / "fresh"
    submit_dir.mkdir()
    job = local_slurm.sbatch(harness.TRAIN, *QUICK, "train.max_steps=2", "logging.tensorboard=false",
                             "train.output_dir=runs/bare", env=job_env, cwd=submit_dir)
    info = local_slurm.wait_job(job, JOB_TIMEOUT)
    log = submit_dir / f"dft-train-{job}.out"
    assert log.is_file(), local_slurm.diagnostics(info)
    assert info["StdOut"] == str(log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
    assert f"job {job} (restart 0) on 1 node: " in text and "training exited with 0" in text
    assert not (submit_dir / "logs").exists()
    assert (submit_dir / "runs" / "bare" / "summary.json").is_file()


def test_preempted_job_checkpoints_requeues_and_resumes_exactly(local_slurm, workdir, job_env, reference, capsys):
    out = workdir / "runs" / "preempted"
    submitted = time.monotonic()
    job = local_slurm.sbatch(harness.TRAIN, *ARGS, "train.output_dir=runs/preempted", env=job_env, cwd=workdir)
    first = harness.wait_for_lines(out / "metrics.jsonl", 1, JOB_TIMEOUT, local_slurm, job)
    harness.wait_for_lines(out / "metrics.jsonl", 2, JOB_TIMEOUT, local_slurm, job)
    signalled = time.monotonic()
    # What `--signal=B:USR1@S` does before the time limit, now: the batch shell alone gets SIGUSR1.
    local_slurm.run("scancel", "--signal=USR1", "--batch", job)
    info = local_slurm.wait_job(job, JOB_TIMEOUT)
    text = log_path(workdir, job).read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", local_slurm.diagnostics(info)
    assert info["Restarts"] == "1", text[-3000:]

    match = re.search(r"stopped at step (\d+) \(signal", text)
    assert match, text[-3000:]
    stopped = int(match.group(1))
    assert 2 <= stopped < STEPS
    # One log, both runs of the job, in order.
    milestones = ["(restart 0)", "passing SIGUSR1 to the training step", f"stopped at step {stopped}",
                  f"requeueing job {job} (restart 1)", "(restart 1)",
                  f"resumed from runs/preempted/checkpoints/step-{stopped} at step {stopped}",
                  "training exited with 0"]
    positions = [text.find(m) for m in milestones]
    assert -1 not in positions and positions == sorted(positions), list(zip(milestones, positions))

    assert [r["step"] for r in read_metrics(out)] == list(range(1, STEPS + 1))
    assert losses(out) == losses(reference)  # bit for bit, every step, across the requeue
    assert open(out / "checkpoints" / "latest").read().strip() == f"step-{STEPS}"
    report(capsys, f"sbatch -> first metrics line: {first - submitted:.1f} s; "
                   f"USR1 -> job complete again after requeue: {time.monotonic() - signalled:.1f} s "
                   f"(stopped at step {stopped})")


def test_convert_job_makes_a_loadable_hugging_face_directory(local_slurm, workdir, job_env, finished):
    if importlib.util.find_spec("dft_ds.convert") is None:
        pytest.skip("dft_ds/convert.py does not exist yet")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = finished["out"]
    env = dict(job_env, CHECKPOINT_DIR="runs/single/checkpoints", VERIFY="1")  # OUT_DIR: runs/single/hf
    job = local_slurm.sbatch(harness.CONVERT, env=env, cwd=workdir)
    info = local_slurm.wait_job(job, JOB_TIMEOUT)
    text = log_path(workdir, job, "dft-convert").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
    assert "dft-convert exited with 0" in text
    hf = run / "hf"
    model = AutoModelForCausalLM.from_pretrained(hf)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    ids = tokenizer("What is 2 + 3?", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
