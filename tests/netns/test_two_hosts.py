"""Two hosts on one machine: a 2-node x 1-rank ZeRO-3 training across two network namespaces joined
by a veth pair, started with dft-launch on each "host", through torchrun and through deepspeed
without ssh.

Each rank reaches the other only through 10.77.0.1/10.77.0.2 (its own loopback is private), so a
wrong master address, port or socket interface shows up as a hang or a refused connection. The
run directory lives on the shared filesystem (same machine), as it would on a cluster. The
torchrun test also runs the same 2 ranks on one host and prints both throughputs (run with -s).

Needs root and `ip netns`: skipped otherwise.
"""

import os
import signal
import statistics
import subprocess
import sys

import pytest
import yaml

from tests.distributed.helpers import QUICK, REPO, clean_env, read_metrics
from tests.netns.hosts import NetnsUnavailable, TwoHosts

pytestmark = [pytest.mark.slow, pytest.mark.netns]

LAUNCHER = os.path.join(REPO, "launcher", "dft-launch")
STEPS = 6
# Each namespace has a port space of its own, so a fixed port cannot collide with anything outside.
PORT = 29500
TIMEOUT = 420


@pytest.fixture
def hosts():
    net = TwoHosts()
    try:
        made = net.__enter__()
    except NetnsUnavailable as exc:
        pytest.skip(f"network namespaces unavailable: {exc}")
    try:
        yield made
    finally:
        net.close()


def train_env(tmp_path) -> dict:
    env = clean_env(tmp_path)
    # Both "hosts" share this machine's cores: one thread per rank, as torchrun would set for 2 local
    # ranks, so the 1-host and 2-host runs do the same work and differ only in the link.
    env["OMP_NUM_THREADS"] = "1"
    # A rank was once seen to abort (SIGABRT, "terminate called without an active exception") at exit
    # after a finished run on a loaded machine; procgroup.exit_rank now ends ranks past that (its
    # docstring has the cause). If an abort shows up again, the log shows where.
    env["PYTHONFAULTHANDLER"] = "1"
    return env


def overrides(out) -> list[str]:
    return QUICK + [f"train.max_steps={STEPS}", f"train.output_dir={out}"]


def run_all(cmds: list[list[str]], env: dict, logs: list) -> list[int]:
    """Start every command at once (output to files: a full pipe would stall a rank mid-collective),
    wait for all; on a timeout kill every process tree, which `ip netns del` alone would not stop."""
    procs = []
    try:
        for cmd, log in zip(cmds, logs):
            with open(log, "w") as fh:
                procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        return [p.wait(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def launch_two_hosts(hosts, via: str, out, tmp_path) -> list[str]:
    cmds = [h.exec_prefix() + [sys.executable, LAUNCHER, "--nnodes", "2", "--node-rank", str(rank),
                               "--nproc-per-node", "1", "--master-addr", hosts[0].address,
                               "--master-port", str(PORT), "--via", via] + overrides(out)
            for rank, h in enumerate(hosts)]
    logs = [tmp_path / f"{via}-node{rank}.log" for rank in range(2)]
    codes = run_all(cmds, train_env(tmp_path), logs)
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(f"--- node {r} ---\n{t[-4000:]}" for r, t in enumerate(texts))
    return texts


def check_run_dir(out) -> list[dict]:
    text = (out / "config.yaml").read_text()
    assert "# world_size: 2" in text
    assert yaml.safe_load(text)["train"]["output_dir"] == str(out)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{STEPS}"
    shards = sorted(p.name for p in (out / "checkpoints" / f"step-{STEPS}").glob("*model_states.pt"))
    assert len(shards) == 2, shards  # one per rank, written by each host into the shared directory
    return rows


def step_rate(rows) -> float:
    """Median tokens/s over the steps after the first (which carries the warm-up)."""
    return statistics.median(r["tokens_per_s"] for r in rows[1:])


def check_interfaces(hosts, texts) -> None:
    # Each node chose its own interface, the one facing the master address (on node 0: the one holding it).
    for h, text in zip(hosts, texts):
        assert f"GLOO_SOCKET_IFNAME={h.interface}" in text, text[:2000]


def test_two_hosts_torchrun_and_one_host_baseline(hosts, tmp_path):
    out = tmp_path / "two-hosts"
    texts = launch_two_hosts(hosts, "torchrun", out, tmp_path)
    check_interfaces(hosts, texts)
    rows = check_run_dir(out)
    assert "done: 6 steps" in texts[0] and "done:" not in texts[1]  # rank 0 speaks

    # The same 2 ranks on one host (loopback): same batches, so the same losses; only the link differs.
    one = tmp_path / "one-host"
    log = tmp_path / "one-host.log"
    codes = run_all([[sys.executable, LAUNCHER, "--nproc-per-node", "2", "--via", "torchrun"] + overrides(one)],
                    train_env(tmp_path), [log])
    assert codes == [0], log.read_text()[-4000:]
    base = check_run_dir(one)
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in base], rel=1e-4)
    two_rate, one_rate = step_rate(rows), step_rate(base)
    print(f"\n2 hosts over veth: {two_rate:.0f} tokens/s; 1 host over loopback: {one_rate:.0f} tokens/s "
          f"(median of steps 2-{STEPS}; ratio {two_rate / one_rate:.2f})")


def test_two_hosts_deepspeed_without_ssh(hosts, tmp_path):
    out = tmp_path / "two-hosts"
    texts = launch_two_hosts(hosts, "deepspeed", out, tmp_path)
    check_interfaces(hosts, texts)
    for text in texts:
        assert "--no_ssh" in text
    rows = check_run_dir(out)
    print(f"\n2 hosts over veth via deepspeed: {step_rate(rows):.0f} tokens/s (median of steps 2-{STEPS})")
