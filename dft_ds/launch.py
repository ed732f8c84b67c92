"""`dft-launch [options] [CONFIG.yaml] [section.key=value ...]`: one entry from one process to many nodes.

dft-launch works out the shape of the run (nodes, ranks per node, node rank, master address and
port) from its options, a Slurm allocation or a hostfile, then starts `python -m dft_ds.train`
through torchrun, the deepspeed launcher or srun. It runs once per node (torchrun, and deepspeed
without ssh) or once per job (srun, and deepspeed fanning out over ssh).

Three rules it keeps:
- Commands are argument lists run without a shell; user values never pass through one.
- The training's exit code comes back as dft-launch's own (75: stopped and checkpointed, run again
  to resume; 2: bad input), and SIGTERM/SIGUSR1 sent to dft-launch reach the training ranks, which
  checkpoint at the next step boundary.
- Communication settings are added only where the user has not set them.

Everything here is import-light (no torch): it runs before any rank exists.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from dft_ds.errors import EXIT_BAD_INPUT, UserError
from dft_ds.net import free_port

VIAS = ("torchrun", "deepspeed", "srun")
TRAIN_MODULE = "dft_ds.train"
# For tests and wrappers: run another module in place of dft_ds.train (it gets the same arguments).
TRAIN_MODULE_ENV = "DFT_LAUNCH_TRAIN_MODULE"
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Slurm: every node derives the same port from the job id, so no node has to tell the others.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000

EXAMPLES = """\
examples:
  dft-launch --nproc-per-node 8 configs/qwen2.5-math-1.5b_numina.yaml
  dft-launch --dry-run --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500 train.lr=1e-5
  # node 1 of 2, deepspeed without ssh (run the same with --node-rank 0 on node 0):
  dft-launch --via deepspeed --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 --master-port 29500 my.yaml
  # in an sbatch script (srun starts every rank of every node):
  dft-launch my.yaml
  # or one dft-launch per node, each reading its node rank from its own task:
  srun --ntasks-per-node=1 dft-launch --via torchrun my.yaml

defaults (an option given on the command line always wins):
  --nproc-per-node  $NPROC_PER_NODE, else the GPUs in CUDA_VISIBLE_DEVICES, else those nvidia-smi
                    lists, else 1 (one CPU rank)
  --nnodes          the hosts in --hostfile, else $SLURM_NNODES, else 1
  --node-rank       $SLURM_NODEID inside a Slurm task (never in the batch shell, where every node
                    would read 0); required for --nnodes > 1 elsewhere
  --master-addr     $MASTER_ADDR, else the first host of --hostfile, else 127.0.0.1 for one node
                    (not srun), else in Slurm the first host of `scontrol show hostnames
                    $SLURM_STEP_NODELIST` (or $SLURM_JOB_NODELIST); required elsewhere
  --master-port     $MASTER_PORT, else a free loopback port for one node (not srun), else in Slurm
                    20000 + SLURM_JOB_ID % 20000 (the same on every node); required elsewhere
  --via             srun in a Slurm allocation outside a task (the batch shell), else torchrun

environment added to the training processes only where unset:
  GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME  the interface this node uses to reach the master
                    address, when that address is not loopback (gloo otherwise picks the address
                    the host name resolves to, which other nodes may not reach)
  MASTER_ADDR, MASTER_PORT  with --via srun (each task maps SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID
                    to RANK/WORLD_SIZE/LOCAL_RANK itself)

signals: SIGTERM or SIGUSR1 sent to dft-launch is passed to the training ranks (with srun: to srun,
which passes it on); they save a checkpoint at the next step boundary and exit 75. A second one
acts at once. Ctrl-C reaches every process of the terminal's group and needs no forwarding.

exit codes: the training's own (0 done, 2 bad input, 75 stopped with a checkpoint saved: run the
same command again to resume); 2 for a bad dft-launch option; 128+N when the launcher died of signal N.
"""


@dataclass
class LaunchSpec:
    """Everything dft-launch decided, before anything runs."""

    via: str
    nnodes: int
    nproc_per_node: int
    node_rank: Optional[int]  # None: this process does not run per node (srun; deepspeed over ssh)
    master_addr: str
    master_port: int
    train_args: list[str]
    command: list[str]  # what this process runs
    node_commands: list[tuple[Optional[int], list[str]]]  # what each node runs, where computable
    env: dict[str, str] = field(default_factory=dict)  # added to the child's environment
    hostfile: Optional[str] = None  # the deepspeed hostfile given or generated
    hostfile_text: Optional[str] = None  # set when dft-launch writes the hostfile itself
    slurm_job: Optional[str] = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Options


# dft-train's own options (dft_ds/train.py parse_args), passed to it wherever they stand; True: takes a
# value. A unit test pins this against dft-train's parser, and keeps both sets of names apart.
TRAIN_OPTIONS = {"--check": False, "--world-size": True, "--prepare-data": True, "--translate": True,
                 "--local_rank": True, "--local-rank": True}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dft-launch", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        usage="dft-launch [options] [CONFIG.yaml] [section.key=value ...] [-- dft-train arguments]",
        description="Start `python -m dft_ds.train` on one node or many, through torchrun, the deepspeed "
                    "launcher or srun. The options below may stand before or after the config and overrides; "
                    "dft-train's own --check, --world-size N and --prepare-data DIR are passed on to it; any "
                    "other option is refused (exit 2, named). Everything after `--` goes to dft-train unchanged.")
    parser.add_argument("--nproc-per-node", type=int, metavar="N", help="training ranks per node")
    parser.add_argument("--nnodes", type=int, metavar="N", help="number of nodes")
    parser.add_argument("--node-rank", type=int, metavar="R", help="this node's index, 0 .. nnodes-1")
    parser.add_argument("--master-addr", metavar="A",
                        help="address or host name of node 0, reachable from every node")
    parser.add_argument("--master-port", type=int, metavar="P", help="a free TCP port on node 0, the same on every node")
    parser.add_argument("--hostfile", metavar="PATH",
                        help="DeepSpeed/MPI-style hostfile, one 'host slots=N' per line: gives the nodes "
                             "(and node 0) for every launcher; passed to deepspeed. With --via deepspeed and "
                             "no --hostfile, one is generated for the run (Slurm: from the allocation's hosts)")
    parser.add_argument("--via", choices=VIAS,
                        help="which launcher starts the ranks (see defaults below). deepspeed runs once per "
                             "node with --no_ssh when the node rank is known, else fans out over ssh from node 0")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the command each node runs, and the environment added, then exit 0")
    parser.add_argument("train_args", nargs="*", metavar="[CONFIG.yaml] [section.key=value ...]",
                        help="passed to dft-train as they are")
    return parser


def split_argv(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str]]:
    """dft-launch's options apart from dft-train's arguments, each kept in order.

    A launcher option after the config used to be passed to every rank, which refused it there
    after start-up (or, for a misspelt one, each rank printed the same usage): now it is taken
    wherever it stands, and an option neither command knows stops dft-launch before anything runs.
    """
    takes_value = {name: action.nargs != 0 for action in parser._actions for name in action.option_strings}
    ours, theirs = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            theirs += argv[i + 1:]
            break
        if not arg.startswith("-") or arg == "-":  # the config or an override
            theirs.append(arg)
            i += 1
            continue
        name, has_value, _ = arg.partition("=")
        if name in TRAIN_OPTIONS:
            width = 2 if TRAIN_OPTIONS[name] and not has_value else 1
            theirs += argv[i:i + width]
            i += width
            continue
        # argparse takes unique prefixes (--nproc for --nproc-per-node); so does this.
        matches = [n for n in takes_value if n == name] or [n for n in takes_value if n.startswith(name)]
        if len(matches) != 1:
            parser.error(unknown_option(name, matches, list(takes_value)))
        width = 2 if takes_value[matches[0]] and not has_value else 1
        ours += argv[i:i + width]
        i += width
    return ours, theirs


def unknown_option(name: str, matches: list[str], known: list[str]) -> str:
    import difflib

    if matches:
        return f"option {name} is ambiguous: it could be {', '.join(sorted(matches))}"
    longs = [n for n in known if n.startswith("--") and n != "--help"]
    near = difflib.get_close_matches(name, longs + [n for n in TRAIN_OPTIONS if n != "--local_rank"], n=1)
    return (f"unknown option {name}" + (f" (did you mean {near[0]}?)" if near else "") +
            f". dft-launch's options ({', '.join(longs)}) may stand before or after the config; dft-train's own "
            "are --check, --world-size N and --prepare-data DIR; put any other argument meant for dft-train after "
            "`--`")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    ours, theirs = split_argv(parser, list(sys.argv[1:] if argv is None else argv))
    ns = parser.parse_args(ours)
    ns.train_args = theirs
    return ns


# --------------------------------------------------------------------------------------------
# Where we are: Slurm, GPUs, hostfiles


def in_slurm_allocation(env: Mapping[str, str]) -> bool:
    return bool(env.get("SLURM_JOB_ID"))


def in_slurm_task(env: Mapping[str, str]) -> bool:
    """Inside a task started by srun (per-node environment), not in the batch shell."""
    return in_slurm_allocation(env) and bool(env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID"))


def slurm_hosts(env: Mapping[str, str]) -> list[str]:
    """The allocation's (or this step's) hosts in order, from `scontrol show hostnames`."""
    nodelist = env.get("SLURM_STEP_NODELIST") if in_slurm_task(env) else None
    nodelist = nodelist or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise UserError("in a Slurm allocation (SLURM_JOB_ID is set) but SLURM_JOB_NODELIST is not; "
                        "pass --master-addr")
    scontrol = shutil.which("scontrol", path=env.get("PATH"))
    if scontrol is None:
        raise UserError("in a Slurm allocation but `scontrol` is not on PATH; pass --master-addr")
    proc = subprocess.run([scontrol, "show", "hostnames", nodelist], env=dict(env), capture_output=True,
                          text=True, timeout=60)
    hosts = proc.stdout.split()
    if proc.returncode != 0 or not hosts:
        raise UserError(f"`scontrol show hostnames {nodelist}` failed ({proc.stderr.strip() or 'no hosts'}); "
                        "pass --master-addr")
    return hosts


def read_hostfile(path: str) -> list[tuple[str, int]]:
    """`host slots=N` lines (the format deepspeed reads); '#' comments and blank lines skipped."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.readlines()
    except OSError as exc:
        raise UserError(f"--hostfile: cannot read '{path}' ({exc.strerror})") from None
    hosts, seen = [], set()
    for lineno, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit():
            raise UserError(f"{path}:{lineno}: expected 'HOST slots=N', got '{raw.strip()}'")
        if parts[0] in seen:
            raise UserError(f"{path}:{lineno}: host '{parts[0]}' is listed twice")
        seen.add(parts[0])
        hosts.append((parts[0], int(parts[1][6:])))
    if not hosts:
        raise UserError(f"{path}: no 'HOST slots=N' lines")
    return hosts


def visible_gpus(env: Mapping[str, str]) -> int:
    """GPUs this node would give the ranks, without importing torch (which takes seconds)."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v for v in visible.split(",") if v.strip()]
        return 0 if ids[:1] == ["-1"] else len(ids)
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def interface_for(addr: str) -> Optional[str]:
    """The local interface that carries this node's traffic to `addr`; None for loopback or unknown.

    connect() on a UDP socket makes the kernel choose a route and a source address without sending
    anything; the interface holding that source address is the answer. On node 0 itself (the master
    address is local) this gives the interface with that address, not `lo`, unlike `ip route get`.
    """
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(addr, None, type=socket.SOCK_DGRAM)[0]
    except (socket.gaierror, UnicodeError):
        return None
    if ipaddress.ip_address(sockaddr[0].split("%")[0]).is_loopback:
        return None
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((sockaddr[0], 9))
            source = sock.getsockname()[0].split("%")[0]
    except OSError:
        return None
    import psutil  # a dependency of deepspeed

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == source for a in addrs):
            return name
    return None


def comm_env(master_addr: str, nnodes: int, env: Mapping[str, str]) -> dict[str, str]:
    """Communication settings the user has not set. Only the socket interface, for multi-node runs.

    TORCH_NCCL_ASYNC_ERROR_HANDLING is left alone on purpose: since torch 2.2 its default (3) already
    tears a rank down when a collective fails or times out, and torch warns about the old
    NCCL_ASYNC_ERROR_HANDLING name. The collective timeout is set in code (dft_ds.procgroup.init_distributed).
    """
    added: dict[str, str] = {}
    if nnodes > 1:
        iface = interface_for(master_addr)
        if iface:
            for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
                if key not in env:
                    added[key] = iface
    return added


# --------------------------------------------------------------------------------------------
# The plan


def _positive(name: str, value: Optional[int]) -> None:
    if value is not None and value < 1:
        raise UserError(f"{name} must be at least 1, got {value}")


def make_launch_spec(ns: argparse.Namespace, env: Optional[Mapping[str, str]] = None) -> LaunchSpec:
    """Resolve every default and build the commands. Raises UserError on contradictory input."""
    env = os.environ if env is None else env
    slurm = in_slurm_allocation(env)
    via = ns.via or ("srun" if slurm and not in_slurm_task(env) else "torchrun")
    if via == "srun" and not slurm:
        raise UserError("--via srun needs a Slurm allocation (SLURM_JOB_ID is not set); use sbatch/salloc, "
                        "or --via torchrun|deepspeed")
    if via == "srun" and (ns.node_rank is not None or ns.hostfile):
        raise UserError("--via srun starts the ranks of every node itself; drop --node-rank/--hostfile")
    _positive("--nproc-per-node", ns.nproc_per_node)
    _positive("--nnodes", ns.nnodes)
    hosts = [h for h, _ in read_hostfile(ns.hostfile)] if ns.hostfile else None
    if ns.nnodes:
        nnodes = ns.nnodes
    elif hosts:
        nnodes = len(hosts)
    else:
        nnodes = int(env.get("SLURM_NNODES") or 1) if slurm else 1
    if hosts is not None and nnodes > len(hosts):
        raise UserError(f"--nnodes {nnodes} but --hostfile {ns.hostfile} lists {_count(len(hosts), 'host')}")
    node_rank = resolve_node_rank(ns, via, nnodes, env)
    allocation = SlurmHosts(env, nnodes)
    master_addr, master_port = resolve_master(ns, via, nnodes, hosts, allocation, env)
    plan = LaunchSpec(via=via, nnodes=nnodes, nproc_per_node=resolve_nproc(ns, env), node_rank=node_rank,
                master_addr=master_addr, master_port=master_port, train_args=list(ns.train_args), command=[],
                node_commands=[], slurm_job=env.get("SLURM_JOB_ID") or None)
    if via == "deepspeed":
        plan_hostfile(plan, ns.hostfile, allocation)
    build_commands(plan, env.get(TRAIN_MODULE_ENV) or TRAIN_MODULE)
    if via == "deepspeed" and node_rank is None:
        check_pdsh_safe(plan)
    plan.env.update(comm_env(master_addr, nnodes, env))
    return plan


# What deepspeed's pdsh runner may put into the remote shell as is: it joins the arguments, the master
# address, the working directory and the python path into one command line that ssh hands to a shell
# on every node, and quotes only arguments with a space (in double quotes, where $, ` and \ still act);
# pdsh itself replaces %n and %h in it.
PDSH_SAFE = re.compile(r"[A-Za-z0-9_@+=:,./ -]*")


def check_pdsh_safe(plan: LaunchSpec) -> None:
    """Refuse any value that a shell would read as more than text on the ssh fan-out (exit 2, nothing run)."""
    values = [("argument", a) for a in plan.train_args] + [("master address", plan.master_addr),
                                                           ("working directory", os.getcwd()),
                                                           ("python", sys.executable)]
    for what, value in values:
        if not PDSH_SAFE.fullmatch(value):
            bad = "".join(sorted({c for c in value if not PDSH_SAFE.fullmatch(c)}))
            raise UserError(f"--via deepspeed over ssh: the {what} {value!r} holds {bad!r}, which the remote shell "
                            "would interpret (deepspeed's pdsh runner passes it unquoted); put the value in the "
                            "config file, or run one dft-launch per node with --node-rank, or use --via srun")


def resolve_nproc(ns: argparse.Namespace, env: Mapping[str, str]) -> int:
    if ns.nproc_per_node is not None:
        return ns.nproc_per_node
    from_env = env.get("NPROC_PER_NODE")
    if from_env:
        if not from_env.isdigit() or int(from_env) < 1:
            raise UserError(f"NPROC_PER_NODE must be a positive integer, got '{from_env}'")
        return int(from_env)
    return visible_gpus(env) or 1


def resolve_node_rank(ns: argparse.Namespace, via: str, nnodes: int, env: Mapping[str, str]) -> Optional[int]:
    """This node's rank, or None where this process starts every node (srun; deepspeed over ssh)."""
    if via == "srun":
        return None
    node_rank = ns.node_rank
    if node_rank is None and nnodes == 1:
        node_rank = 0
    if node_rank is None and in_slurm_task(env) and env.get("SLURM_NODEID", "").isdigit():
        # Read from this task's own environment; in the batch shell it would be 0 on every node.
        node_rank = int(env["SLURM_NODEID"])
    if node_rank is not None and not 0 <= node_rank < nnodes:
        raise UserError(f"--node-rank must be in 0 .. {nnodes - 1} for --nnodes {nnodes}, got {node_rank}")
    slurm = in_slurm_allocation(env)
    if node_rank is None and via == "torchrun":
        where = ("in the batch shell every node would read SLURM_NODEID=0: run one dft-launch per node "
                 "under `srun --ntasks-per-node=1`, or use --via srun" if slurm else "pass --node-rank on every node")
        raise UserError(f"--nnodes {nnodes} with --via torchrun needs this node's rank: {where}")
    if node_rank is None and not (ns.hostfile or slurm):
        raise UserError(f"--nnodes {nnodes} with --via deepspeed needs --node-rank on every node (runs without ssh), "
                        "or a --hostfile to fan out over ssh from node 0")
    return node_rank


class SlurmHosts:
    """The allocation's hosts, asked of scontrol once and only when needed."""

    def __init__(self, env: Mapping[str, str], nnodes: int):
        self.env, self.nnodes, self._hosts = env, nnodes, None

    def get(self) -> list[str]:
        if self._hosts is None:
            self._hosts = slurm_hosts(self.env)
            if self.nnodes > len(self._hosts):
                raise UserError(f"--nnodes {self.nnodes} but the Slurm allocation has {_count(len(self._hosts), 'node')}")
        return self._hosts


def resolve_master(ns: argparse.Namespace, via: str, nnodes: int, hosts: Optional[list[str]],
                   allocation: SlurmHosts, env: Mapping[str, str]) -> tuple[str, int]:
    slurm = in_slurm_allocation(env)
    # One node started here (not by srun elsewhere in the allocation) talks over loopback on a free port.
    local_only = nnodes == 1 and via != "srun"
    addr = ns.master_addr or env.get("MASTER_ADDR")
    if not addr:
        if hosts:
            addr = hosts[0]
        elif local_only:
            addr = "127.0.0.1"
        elif slurm:
            addr = allocation.get()[0]
        else:
            raise UserError(f"--nnodes {nnodes} outside Slurm needs --master-addr (node 0's address, "
                            "reachable from every node)")
    port = ns.master_port
    if port is None and env.get("MASTER_PORT"):
        if not env["MASTER_PORT"].isdigit():
            raise UserError(f"MASTER_PORT must be a port number, got '{env['MASTER_PORT']}'")
        port = int(env["MASTER_PORT"])
    if port is None:
        if local_only:
            port = free_port("127.0.0.1" if _is_loopback(addr) else "")
        elif slurm and env["SLURM_JOB_ID"].isdigit():
            port = SLURM_PORT_BASE + int(env["SLURM_JOB_ID"]) % SLURM_PORT_SPAN
        else:
            raise UserError(f"--nnodes {nnodes} outside Slurm needs --master-port (the same free port on every node)")
    if not 0 < port < 65536:
        raise UserError(f"--master-port must be in 1 .. 65535, got {port}")
    return addr, port


def plan_hostfile(plan: LaunchSpec, given: Optional[str], allocation: SlurmHosts) -> None:
    """deepspeed needs a hostfile for several nodes; write one from the allocation when none is given."""
    if given:
        plan.hostfile = given
        return
    if plan.nnodes == 1:
        return
    slurm = plan.slurm_job is not None
    names = allocation.get()[:plan.nnodes] if slurm else [f"node{i}" for i in range(plan.nnodes)]
    plan.hostfile_text = "".join(f"{h} slots={plan.nproc_per_node}\n" for h in names)
    # The name --dry-run shows; a run writes the same text to a private temp file (mkstemp).
    plan.hostfile = os.path.join(tempfile.gettempdir(), f"dft-launch-{plan.slurm_job or os.getpid()}.hostfile")
    if not slurm:
        plan.notes.append("hostfile names are placeholders: without ssh deepspeed uses only the slot counts")


def build_commands(plan: LaunchSpec, module: str) -> None:
    python = sys.executable
    if plan.via == "srun":
        plan.command = srun_command(plan, python, module)
        plan.node_commands = [(None, plan.command)]
        plan.env.update(MASTER_ADDR=plan.master_addr, MASTER_PORT=str(plan.master_port))
        plan.notes.append("srun runs on every node; each task reads its rank from SLURM_PROCID/SLURM_LOCALID")
        return
    build = torchrun_command if plan.via == "torchrun" else deepspeed_command
    plan.command = build(plan, python, module, plan.node_rank)
    if plan.node_rank is None:
        plan.node_commands = [(None, plan.command)]
        plan.notes.append("deepspeed starts every node's ranks over ssh from here (pdsh)")
    else:
        plan.node_commands = [(r, build(plan, python, module, r)) for r in range(plan.nnodes)]


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return addr == "localhost"


def torchrun_command(plan: LaunchSpec, python: str, module: str, node_rank: int) -> list[str]:
    # Static rendezvous: every node is told the same master address and port and its own rank.
    return [python, "-m", "torch.distributed.run", "--nnodes", str(plan.nnodes), "--node-rank", str(node_rank),
            "--nproc-per-node", str(plan.nproc_per_node), "--master-addr", plan.master_addr,
            "--master-port", str(plan.master_port), "-m", module, *plan.train_args]


def deepspeed_command(plan: LaunchSpec, python: str, module: str, node_rank: Optional[int]) -> list[str]:
    script = os.path.join(os.path.dirname(python), "deepspeed")
    launcher = [script] if os.path.isfile(script) else [python, "-m", "deepspeed.launcher.runner"]
    cmd = launcher + ["--num_nodes", str(plan.nnodes), "--num_gpus", str(plan.nproc_per_node),
                      "--master_addr", plan.master_addr, "--master_port", str(plan.master_port)]
    if plan.hostfile:
        cmd += ["--hostfile", plan.hostfile]
    if plan.nnodes > 1 and node_rank is not None:
        # One launcher per node, each told its rank: no ssh between nodes.
        cmd += ["--no_ssh", "--node_rank", str(node_rank)]
    return cmd + ["--module", module, *plan.train_args]


def srun_command(plan: LaunchSpec, python: str, module: str) -> list[str]:
    return ["srun", "--nodes", str(plan.nnodes), "--ntasks-per-node", str(plan.nproc_per_node),
            "--kill-on-bad-exit=1", python, "-m", module, *plan.train_args]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def describe(plan: LaunchSpec) -> str:
    """The dry-run text: a header, the environment added, then `node R: COMMAND` per node."""
    where = f"this is node {plan.node_rank}" if plan.node_rank is not None else "run once for all nodes"
    lines = [f"# dft-launch via {plan.via}: {_count(plan.nnodes, 'node')} x {_count(plan.nproc_per_node, 'rank')}, "
             f"master {plan.master_addr}:{plan.master_port}; {where}"]
    lines += [f"# {note}" for note in plan.notes]
    if plan.env:
        lines.append("# environment added (on this node): " + " ".join(f"{k}={shlex.quote(v)}"
                                                                    for k, v in sorted(plan.env.items())))
    if plan.hostfile_text is not None:
        lines.append(f"# hostfile {plan.hostfile} (a private copy is written for the run and removed after it):")
        lines += [f"#   {line}" for line in plan.hostfile_text.splitlines()]
    for rank, cmd in plan.node_commands:
        lines.append(f"{'all' if rank is None else f'node {rank}'}: {shlex.join(cmd)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Running: exit codes and signals


def runs_module(argv: list[str], module: str) -> bool:
    """True for `python [interpreter options] -m MODULE ...` (a training rank, not a launcher)."""
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "-m":
            return i + 1 < len(argv) and argv[i + 1] == module
        if arg.startswith("-m"):
            return arg[2:] == module
        if arg in ("-X", "-W"):
            i += 2
            continue
        if not arg.startswith("-") or arg.startswith("-c"):
            return False
        i += 1
    return False


def catches(pid: int, sig: int) -> bool:
    """Whether the process has a handler installed for `sig` (Linux /proc; True where unknown)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError):
        pass
    return True


class SignalForwarder:
    """Passes SIGTERM/SIGUSR1 received by dft-launch on to the training ranks.

    Not to the launcher's process group: a launcher process dies of SIGUSR1 (no handler), and both
    torchrun and the deepspeed launcher answer SIGTERM by terminating their ranks, which a rank
    reads as the urgent second signal; torchrun's ranks also live in sessions of their own. So the
    ranks are found among the child's descendants by their command line (`python -m dft_ds.train`)
    and signalled directly, once each has installed its handler (until then the default action would
    kill it). With srun the signal goes to srun, which passes it to every task. A second signal of
    the same kind is delivered at once, handler or not.
    """

    def __init__(self, child: subprocess.Popen, module: str, direct: bool, log: Callable[[str], None]):
        self.child, self.module, self.direct, self.log = child, module, direct, log
        self.received: dict[int, int] = {}
        self.delivered: dict[tuple[int, int], int] = {}
        self._previous: dict[int, object] = {}

    def install(self) -> "SignalForwarder":
        for sig in FORWARDED_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        # Ctrl-C reaches the whole foreground process group, ranks included: just keep waiting for them.
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda *_: None)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.received[signum] = self.received.get(signum, 0) + 1

    def ranks(self) -> list[int]:
        import psutil

        try:
            root = psutil.Process(self.child.pid)
            procs = [root] + root.children(recursive=True)
        except psutil.Error:
            return []
        found = []
        for proc in procs:
            try:
                if runs_module(proc.cmdline(), self.module):
                    found.append(proc.pid)
            except psutil.Error:
                continue
        return found

    def pump(self) -> None:
        if not self.received:
            return
        if not self.direct and in_slurm_task(os.environ):
            return  # Slurm signals every process of the step: the ranks have it already
        targets = [self.child.pid] if self.direct else self.ranks()
        for sig, count in list(self.received.items()):  # the handler may add to it meanwhile
            for pid in targets:
                sent = self.delivered.get((pid, sig), 0)
                if sent >= count or (sent == 0 and count == 1 and not self.direct and not catches(pid, sig)):
                    continue
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    continue
                self.delivered[(pid, sig)] = count
                self.log(f"passed {signal.Signals(sig).name} to {'srun' if self.direct else 'rank'} pid {pid}")


def torchrun_error_code(path: str) -> Optional[int]:
    """torchrun exits 1 whatever its ranks returned; the first failed rank's code is in its error file.

    torchrun copies a failed rank's error file (if the rank wrote one, see `dft_ds.errors.report_exit_code`) to
    TORCHELASTIC_ERROR_FILE with message.errorCode set to that rank's real exit code.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    message = data.get("message") if isinstance(data, dict) else None
    code = message.get("errorCode") if isinstance(message, dict) else None
    return code if isinstance(code, int) and code > 0 else None


def exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def execute(cmd: list[str], env: dict[str, str], *, module: str = TRAIN_MODULE, direct: bool = False,
            error_file: Optional[str] = None, log: Callable[[str], None] = print) -> int:
    """Run `cmd` (no shell), pass signals on, and return the exit code to exit with."""
    # The launcher processes (torchrun, deepspeed's) have no SIGUSR1 handler and would die of one
    # that Slurm sends to every process of the step: they inherit "ignore"; the ranks install
    # their own handler over it.
    previous = None if direct else signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        child = subprocess.Popen(cmd, env=env)
    finally:
        if previous is not None:
            signal.signal(signal.SIGUSR1, previous)
    forwarder = SignalForwarder(child, module, direct, log).install()
    try:
        while True:
            try:
                returncode = child.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                forwarder.pump()
    finally:
        forwarder.uninstall()
    code = exit_status(returncode)
    if code == 1 and error_file:
        code = torchrun_error_code(error_file) or code
    return code


def run(plan: LaunchSpec, env: Optional[Mapping[str, str]] = None) -> int:
    env = os.environ if env is None else env
    child_env = dict(env)
    child_env.update(plan.env)
    module = env.get(TRAIN_MODULE_ENV) or TRAIN_MODULE
    cleanup: list[str] = []
    error_file = None

    def log(message: str) -> None:
        print(f"dft-launch: {message}", file=sys.stderr, flush=True)

    try:
        if plan.hostfile_text is not None:
            fd, plan_path = tempfile.mkstemp(prefix="dft-launch-", suffix=".hostfile")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(plan.hostfile_text)
            cleanup.append(plan_path)
            cmd = [plan_path if arg == plan.hostfile else arg for arg in plan.command]
        else:
            cmd = list(plan.command)
        if plan.via == "torchrun" and "TORCHELASTIC_ERROR_FILE" not in child_env:
            workdir = tempfile.mkdtemp(prefix="dft-launch-")
            error_file = os.path.join(workdir, "torchrun-error.json")
            child_env["TORCHELASTIC_ERROR_FILE"] = error_file
            cleanup.append(workdir)
        added = " ".join(f"{k}={v}" for k, v in sorted(plan.env.items()))
        log(f"node {plan.node_rank if plan.node_rank is not None else 'all'} of {plan.nnodes}: "
            f"{shlex.join(cmd)}" + (f"  [env {added}]" if added else ""))
        return execute(cmd, child_env, module=module, direct=plan.via == "srun", error_file=error_file, log=log)
    except FileNotFoundError as exc:
        log(f"error: cannot run '{exc.filename}' ({exc.strerror})")
        return EXIT_BAD_INPUT
    finally:
        for path in cleanup:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.remove(path)


def main(argv: Optional[list[str]] = None) -> int:
    ns = parse_args(argv)
    try:
        plan = make_launch_spec(ns, os.environ)
    except UserError as exc:
        print(f"dft-launch: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    if ns.dry_run:
        print(describe(plan), flush=True)
        return 0
    return run(plan, os.environ)


if __name__ == "__main__":
    sys.exit(main())
