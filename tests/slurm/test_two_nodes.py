"""slurm/train.sbatch on a real 2-node Slurm (tests/slurm/two_nodes.py): a node lost mid-step, and
a preemption with requeue, each followed by an exact resume.

1 rank per node, ZeRO-3 on gloo across the bridge, fp32, one thread per rank. The reference is
the same run uninterrupted, as 2 ranks under plain torchrun on one host: the same global batch and
world size. Needs root and `ip netns`: skipped otherwise.
"""

import os
import re
import sys
import time

import pytest

from dft_ds import checkpoint
from tests.distributed.helpers import QUICK, REPO, clean_env, read_metrics
from tests.slurm import harness, two_nodes

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.netns]

STEPS = 6
# The survivor of a lost peer must give up within this (the floor train.comm_timeout_s accepts is 10).
COMM_TIMEOUT = 30
ARGS = QUICK + [f"train.max_steps={STEPS}", "train.global_batch_size=8", "data.packing=true",
                "data.synthetic_size=1200", "checkpoint.every_steps=2", "logging.tensorboard=false",
                f"train.comm_timeout_s={COMM_TIMEOUT}"]
JOB_TIMEOUT = 420


def losses(out) -> list[tuple]:
    return [(r["step"], r["loss"], r["nll"]) for r in read_metrics(out)]


def weights(out, tag):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=tag)


def assert_same_run(out, reference) -> None:
    """Every step's losses and the final weights equal the uninterrupted run's (to fp32 rounding)."""
    import torch

    got, want = losses(out), losses(reference)
    assert [s for s, *_ in got] == list(range(1, STEPS + 1))
    flat = [v for row in got for v in row[1:]]
    assert flat == pytest.approx([v for row in want for v in row[1:]], rel=1e-6, abs=1e-9), list(zip(got, want))
    mine, theirs = weights(out, f"step-{STEPS}"), weights(reference, f"step-{STEPS}")
    assert mine.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-5, atol=1e-7, msg=name)


def assert_intact(out, tag: str, world_size: int = 2) -> None:
    """`latest` names `tag`, which is complete: state file, every rank's shards, sizes as written."""
    root = out / "checkpoints"
    assert checkpoint.read_latest(root) == tag
    tag_dir = root / tag
    assert checkpoint.is_complete(str(tag_dir)), sorted(os.listdir(tag_dir))
    state = checkpoint.read_state(tag_dir)
    assert state["world_size"] == world_size
    assert checkpoint.find_damage(tag_dir, state) is None
    for rank in range(world_size):
        assert (tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").is_file()


def report(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\n[slurm 2-node timing] {text}", flush=True)


def training_pids(node: two_nodes.Node) -> list[int]:
    """The node's dft_ds.train processes (the rank and the torchrun that started it)."""
    found = []
    for pid in node.pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"dft_ds.train" in fh.read():
                    found.append(pid)
        except OSError:
            pass
    return found


def wait_for(what: str, done, timeout: float, cluster, job: str):
    deadline = time.monotonic() + timeout
    while True:
        value = done()
        if value:
            return value
        info = cluster.job(job)
        if info.get("JobState") in harness.FINAL:
            raise RuntimeError(f"{what}: the job ended first\n" + cluster.diagnostics(info))
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:.0f} s\n" + cluster.diagnostics(cluster.job(job)))
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = two_nodes.why_not_available()
    if reason:
        pytest.skip(reason)
    slurm = two_nodes.start(tmp_path_factory.mktemp("slurm-2nodes"))
    try:
        yield slurm
    finally:
        slurm.close()


@pytest.fixture(autouse=True)
def both_nodes_up_after(cluster):
    """A failed test leaves neither a job in the queue nor a node down for the next one."""
    yield
    cluster.reset()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("slurm-2nodes-work")


@pytest.fixture(scope="module")
def job_env(workdir):
    env = clean_env(workdir)
    # One thread per rank, as torchrun sets for 2 local ranks: the reference does the same arithmetic.
    env.update(REPO=REPO, VENV=sys.prefix, NPROC_PER_NODE="1", OMP_NUM_THREADS="1")
    return env


@pytest.fixture(scope="module")
def reference(workdir, job_env):
    """The uninterrupted run: 2 ranks under plain torchrun on one host, outside Slurm."""
    return harness.torchrun_reference(workdir, job_env, ARGS)


def submit(cluster, workdir, job_env, name: str) -> str:
    return cluster.sbatch(harness.TRAIN, *ARGS, f"train.output_dir=runs/{name}", env=job_env, cwd=workdir,
                          options=["--nodes=2"])


def log_text(workdir, job: str) -> str:
    return (workdir / f"dft-train-{job}.out").read_text(errors="replace")


def test_node_lost_mid_step_survivor_exits_and_the_run_resumes_exactly(cluster, workdir, job_env, reference,
                                                                       capsys):
    out = workdir / "runs" / "lost"
    job = submit(cluster, workdir, job_env, "lost")
    harness.wait_for_lines(out / "metrics.jsonl", 3, JOB_TIMEOUT, cluster, job)
    first, lost = cluster.nodes
    assert training_pids(first) and training_pids(lost), cluster.diagnostics(cluster.job(job))
    killed = time.monotonic()
    cluster.kill_node(lost)
    wait_for("the surviving rank exits", lambda: not training_pids(first), COMM_TIMEOUT + 60, cluster, job)
    survivor = time.monotonic() - killed
    assert survivor < COMM_TIMEOUT, f"the survivor took {survivor:.1f} s"

    # srun waits for the dead node's task until slurmctld marks the node DOWN (SlurmdTimeout): then
    # the job ends with NODE_FAIL and, being --requeue, Slurm puts it back in the queue itself.
    # It passes through COMPLETING (Restarts already 1) while the first node's part of it ends.
    requeued = wait_for("the job is requeued", lambda: (i := cluster.job(job))["Restarts"] == "1"
                        and i["JobState"] not in ("RUNNING", "COMPLETING") and i,
                        3 * two_nodes.SLURMD_TIMEOUT + 60, cluster, job)
    to_requeue = time.monotonic() - killed
    # Pending: it needs both nodes, and the lost one is DOWN.
    assert requeued["JobState"] in ("PENDING", "REQUEUED"), cluster.diagnostics(requeued)
    assert cluster.node_state(lost).startswith("down"), cluster.node_state(lost)
    runs = (cluster.dir / "jobcomp.log").read_text().splitlines()
    assert [r for r in runs if f"JobId={job} " in r and "JobState=NODE_FAIL" in r], runs
    steps = [r["step"] for r in read_metrics(out)]
    tag = checkpoint.read_latest(out / "checkpoints")
    saved = int(tag.split("-")[1])
    assert 2 <= saved <= steps[-1]
    assert_intact(out, tag)  # the shards of both ranks, as written: resumable

    # The node comes back (its slurmd registers again: ReturnToService=2) and the job runs again.
    cluster.start_slurmd(lost)
    cluster.wait_nodes_up(90)
    info = cluster.wait_job(job, JOB_TIMEOUT)
    text = log_text(workdir, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", cluster.diagnostics(info)
    assert info["Restarts"] == "1"
    milestones = ["(restart 0) on 2 nodes", "training exited with", "(restart 1) on 2 nodes",
                  f"resumed from runs/lost/checkpoints/{tag} at step {saved}"]
    positions = [text.find(m) for m in milestones]
    assert -1 not in positions and positions == sorted(positions), list(zip(milestones, positions))
    # The first run's step failed (srun passes on the survivor's 1, or says -1 when the node failure ends the
    # step first); no code 75, so no requeue by the template.
    codes = re.findall(r"training exited with (-?\d+)", text)
    assert len(codes) == 2 and codes[0] not in ("0", "75") and codes[1] == "0", codes
    assert_same_run(out, reference)
    report(capsys, f"node killed -> surviving rank gone: {survivor:.1f} s; -> job requeued: {to_requeue:.1f} s "
                   f"(resumed from {tag})")


def test_preempted_two_node_job_checkpoints_once_requeues_and_resumes_exactly(cluster, workdir, job_env,
                                                                              reference, capsys):
    out = workdir / "runs" / "preempted"
    job = submit(cluster, workdir, job_env, "preempted")
    harness.wait_for_lines(out / "metrics.jsonl", 2, JOB_TIMEOUT, cluster, job)
    signalled = time.monotonic()
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    # The stop is seen between the two runs of the job: the log says it requeued, the next run has
    # not yet saved anything.
    wait_for("the job requeues itself", lambda: f"requeueing job {job} (restart 1)" in log_text(workdir, job),
             JOB_TIMEOUT, cluster, job)
    text = log_text(workdir, job)
    match = re.search(r"stopped at step (\d+) \(signal", text)
    assert match, text[-3000:]
    stopped = int(match.group(1))
    assert 2 <= stopped < STEPS
    assert_intact(out, f"step-{stopped}")
    assert not [t for t in checkpoint.complete_tags(out / "checkpoints") if int(t.split("-")[1]) > stopped]

    info = cluster.wait_job(job, JOB_TIMEOUT)
    text = log_text(workdir, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", cluster.diagnostics(info)
    assert info["Restarts"] == "1", text[-3000:]
    milestones = ["(restart 0) on 2 nodes", "passing SIGUSR1 to the training step", f"stopped at step {stopped}",
                  f"requeueing job {job} (restart 1)", "(restart 1) on 2 nodes",
                  f"resumed from runs/preempted/checkpoints/step-{stopped} at step {stopped}",
                  "training exited with 0"]
    positions = [text.find(m) for m in milestones]
    assert -1 not in positions and positions == sorted(positions), list(zip(milestones, positions))
    assert_same_run(out, reference)
    report(capsys, f"USR1 -> job complete again after requeue: {time.monotonic() - signalled:.1f} s "
                   f"(stopped at step {stopped})")
