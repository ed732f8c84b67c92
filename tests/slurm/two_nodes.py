"""A real 2-node Slurm on one machine: two network namespaces as two nodes, joined by a bridge.

    root namespace:  bridge dftbr<pid> at 10.78.X.254, slurmctld listening there
    namespace dftn1<pid>: eth0 at 10.78.X.1, `slurmd -N n1`     (X = pid % 250)
    namespace dftn2<pid>: eth0 at 10.78.X.2, `slurmd -N n2`

As FACTS.md records it: `SlurmctldHost=<host>(<bridge addr>)`, one slurmd per namespace, and
per-node spool, pid and log files through %n. Each node has its own port space, so both slurmd
listen on the same SlurmdPort. The node names resolve inside the namespaces only: `ip netns exec`
bind-mounts /etc/netns/<ns>/hosts over /etc/hosts for the daemons it starts and all they start
(dft-launch takes the master address from `scontrol show hostnames`), so this machine's
/etc/hosts is never touched.

Every name carries the pid, so a leftover of an earlier run cannot collide; `close()` takes down
daemons, namespaces, bridge and files whatever state they are in. The clients (sbatch, scontrol)
run in the root namespace through the `LocalSlurm` API of harness.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.slurm import harness

SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
NODES = ("n1", "n2")
CONF_TEMPLATE = Path(__file__).resolve().parents[2] / "scripts" / "slurm.conf.in"
# Quick failure detection: slurmctld marks a silent node DOWN after SlurmdTimeout, and only then
# ends the job that ran on it (the default 300 s would dominate the node-loss test).
SLURMD_TIMEOUT = 10
# `ip netns exec NS` bind-mounts the files of /etc/netns/NS over those of /etc.
ETC_NETNS = Path("/etc/netns")


def why_not_available() -> str | None:
    reason = harness.why_not_available()
    if reason:
        return reason
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed: no network namespaces"
    probe = f"dftprobe{os.getpid()}"
    proc = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return f"`ip netns add` refused here: {proc.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def free_subnet(start: int) -> str:
    """A 10.78.X.0/24 that no interface of the root namespace holds (a leftover of a killed run may)."""
    for i in range(250):
        subnet = f"10.78.{(start + i) % 250}"
        held = subprocess.run(["ip", "-o", "addr", "show", "to", f"{subnet}.0/24"], capture_output=True, text=True,
                              timeout=30).stdout.strip()
        if not held:
            return subnet
    raise RuntimeError("every 10.78.X.0/24 is in use")


@dataclass(frozen=True)
class Node:
    name: str       # the Slurm node name (n1, n2)
    namespace: str
    veth: str       # the root-namespace end of its veth pair; the other end is eth0 inside
    address: str

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.namespace]

    def pids(self) -> list[int]:
        """Every process in this node's network namespace (slurmd, slurmstepd, the job's)."""
        out = subprocess.run(["ip", "netns", "pids", self.namespace], capture_output=True, text=True,
                             timeout=30).stdout
        return [int(p) for p in out.split() if p.isdigit()]


class TwoNodeSlurm(harness.LocalSlurm):
    """The cluster, with harness.LocalSlurm's clients (sbatch, job, wait_job, diagnostics)."""

    def __init__(self, state_dir: Path):
        pid = os.getpid()
        subnet = free_subnet(pid % 250)
        self.bridge = f"dftbr{pid}"[:15]
        self.bridge_address = f"{subnet}.254"
        self.nodes = [Node(name, f"dft{name}{pid}", f"dft{name}{pid}"[:15], f"{subnet}.{i + 1}")
                      for i, name in enumerate(NODES)]
        conf = str(state_dir / "slurm.conf")
        super().__init__(state_dir, conf, dict(os.environ, SLURM_CONF=conf, PATH=SBIN_PATH))
        self.port = harness.free_port_pair()
        self._made: list[str] = []  # what close() takes down, in the order it was made
        self._etc: list[Path] = []

    # -- the network

    def make_network(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made.append("bridge")
        _ip("addr", "add", f"{self.bridge_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for node in self.nodes:
            _ip("netns", "add", node.namespace)
            self._made.append(node.namespace)
            _ip("link", "add", node.veth, "type", "veth", "peer", "name", "eth0", "netns", node.namespace)
            _ip("link", "set", node.veth, "master", self.bridge)
            _ip("link", "set", node.veth, "up")
            _ip("-n", node.namespace, "addr", "add", f"{node.address}/24", "dev", "eth0")
            _ip("-n", node.namespace, "link", "set", "eth0", "up")
            _ip("-n", node.namespace, "link", "set", "lo", "up")
            self.write_hosts(node)

    def write_hosts(self, node: Node) -> None:
        if not ETC_NETNS.is_dir():
            ETC_NETNS.mkdir()
            self._made.append("etc-netns")
        etc = ETC_NETNS / node.namespace
        etc.mkdir()
        self._etc.append(etc)
        lines = [open("/etc/hosts").read().rstrip("\n")]
        lines += [f"{n.address} {n.name}" for n in self.nodes]
        (etc / "hosts").write_text("\n".join(lines) + "\n")

    # -- the daemons

    def write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        d = self.dir
        (d / "state").mkdir(parents=True, exist_ok=True)
        nodes = "\n".join(f"NodeName={n.name} NodeAddr={n.address} NodeHostname={host} CPUs=1 State=UNKNOWN"
                          for n in self.nodes)
        # The settings scripts/local_slurm.sh uses too (the reasons are in the template), with per-node
        # files (%n) and a short SlurmdTimeout. Ports: slurmctld on the bridge address; each slurmd in its
        # own namespace.
        fields = {"CLUSTER": "dfttwo", "HOST": host, "ADDRESS": self.bridge_address, "PORT": self.port,
                  "SLURMD_PORT": self.port + 1, "DIR": d, "NODE": ".%n", "SLURMD_TIMEOUT": SLURMD_TIMEOUT}
        text = CONF_TEMPLATE.read_text()
        for name, value in fields.items():
            text = text.replace(f"@{name}@", str(value))
        unfilled = [line for line in text.splitlines() if not line.startswith("#") and re.search("@[A-Z_]+@", line)]
        assert not unfilled, f"fields of {CONF_TEMPLATE} left unfilled: {unfilled}"
        Path(self.conf).write_text(f"{text}{nodes}\nPartitionName=two Nodes={','.join(NODES)} Default=YES "
                                   "MaxTime=INFINITE State=UP\n")
        (d / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n")

    def start_slurmd(self, node: Node) -> None:
        subprocess.run(node.exec_prefix() + ["slurmd", "-f", self.conf, "-N", node.name], env=self.env,
                       check=True, capture_output=True, timeout=60)

    def start(self, wait: float = 90) -> None:
        self.make_network()
        self.write_conf()
        self._made.append("daemons")
        subprocess.run(["slurmctld", "-f", self.conf, "-c", "-i"], env=self.env, check=True, capture_output=True,
                       timeout=60)
        for node in self.nodes:
            self.start_slurmd(node)
        self.wait_nodes_up(wait)

    def node_state(self, node: Node) -> str:
        proc = self.run("sinfo", "-h", "-N", "-n", node.name, "-o", "%T", check=False)
        return proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else ""

    def wait_nodes_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = [self.node_state(n) for n in self.nodes]
            if all(s.rstrip("*") in ("idle", "mixed", "allocated") for s in states):
                return
            for node, state in zip(self.nodes, states):
                if state.startswith(("down", "drain")):  # a first registration can race the controller
                    self.run("scontrol", "update", f"NodeName={node.name}", "State=RESUME", check=False)
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes not up after {timeout:.0f} s: {dict(zip(NODES, states))}\n"
                                   + self.diagnostics({}))
            time.sleep(0.5)

    def reset(self, timeout: float = 90) -> None:
        """No job left, every node's slurmd running and the nodes idle again."""
        self.run("scancel", "--full", "--quiet", "--partition=two", check=False)
        deadline = time.monotonic() + timeout
        while self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip():
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs still queued {timeout:.0f} s after scancel\n" + self.diagnostics({}))
            time.sleep(0.5)
        for node in self.nodes:
            if not node.pids():  # lost, and not brought back
                self.start_slurmd(node)
        self.wait_nodes_up(timeout)

    def kill_node(self, node: Node, timeout: float = 30) -> None:
        """What a node failure does: every process of the node (slurmd, slurmstepd, the job's
        processes) dies at once with SIGKILL, without a word to anyone."""
        deadline = time.monotonic() + timeout
        while pids := node.pids():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"processes of {node.name} still alive after SIGKILL: {pids}")
            time.sleep(0.1)

    def diagnostics(self, info: dict) -> str:
        parts = [f"scontrol: {info}"]
        paths = [info.get("StdOut"), self.dir / "slurmctld.log"] + [self.dir / f"slurmd.{n}.log" for n in NODES]
        for path in paths:
            if path and os.path.isfile(path):
                parts.append(f"--- {path} (tail)\n" + "".join(open(path, errors="replace").readlines()[-40:]))
        return "\n".join(parts)

    # -- taking it all down

    def close(self) -> None:
        if "daemons" in self._made:
            self.run("scancel", "--full", "--quiet", "--partition=two", check=False)
            for node in self.nodes:  # the job's processes and slurmd of each node
                try:
                    self.kill_node(node, timeout=15)
                except (TimeoutError, subprocess.SubprocessError):
                    pass
            pidfile = self.dir / "slurmctld.pid"
            if pidfile.is_file():
                try:
                    pid = int(pidfile.read_text().strip())
                    os.kill(pid, signal.SIGTERM)
                    for _ in range(50):
                        os.kill(pid, 0)
                        time.sleep(0.2)
                    os.kill(pid, signal.SIGKILL)
                except (ValueError, ProcessLookupError):
                    pass
        for node in self.nodes:
            if node.namespace in self._made:
                subprocess.run(["ip", "netns", "del", node.namespace], capture_output=True, timeout=30)
            subprocess.run(["ip", "link", "del", node.veth], capture_output=True, timeout=30)
        if "bridge" in self._made:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30)
        for etc in self._etc:
            shutil.rmtree(etc, ignore_errors=True)
        if "etc-netns" in self._made:
            try:
                ETC_NETNS.rmdir()  # only when empty: someone else may have put a namespace's files there since
            except OSError:
                pass
        self._made.clear()
        self._etc.clear()


def start(state_dir: Path) -> TwoNodeSlurm:
    """Start the cluster; everything made so far is taken down again when starting fails."""
    slurm = TwoNodeSlurm(state_dir)
    try:
        slurm.start()
    except BaseException:
        slurm.close()
        raise
    return slurm
