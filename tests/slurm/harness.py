"""A real Slurm for tests: start/stop it with scripts/local_slurm.sh, submit templates, poll jobs.

Everything waits with a bounded poll; on a timeout the job's log and the daemons' logs are shown.
There is no slurmdbd (so no sacct): `scontrol show job` keeps finished jobs for an hour (MinJobAge).
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.distributed.helpers import REPO, free_port

SCRIPT = os.path.join(REPO, "scripts", "local_slurm.sh")
TRAIN = os.path.join(REPO, "slurm", "train.sbatch")
CONVERT = os.path.join(REPO, "slurm", "convert.sbatch")
# Job states after which nothing more happens (a requeued job passes through REQUEUED/PENDING instead).
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}


def why_not_available() -> str | None:
    """The reason the local Slurm cannot be started here, or None when it can."""
    if os.geteuid() != 0:
        return "the local Slurm runs slurmctld/slurmd as root (SlurmUser=root); not root here"
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    installed = all(shutil.which(b, path=path) for b in ("slurmctld", "slurmd", "sbatch"))
    if not installed and shutil.which("apt-get") is None:
        return "Slurm is not installed and apt-get is not available to install it"
    return None


def free_port_pair() -> int:
    """A port P with P+1 also free (slurmctld on P, slurmd on P+1)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two adjacent free ports")


@dataclass
class LocalSlurm:
    dir: Path
    conf: str
    env: dict  # the environment for the Slurm clients (SLURM_CONF)

    def run(self, *cmd: str, check: bool = True, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=env or self.env, cwd=cwd, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}{proc.stdout}")
        return proc

    def sbatch(self, script: str, *args: str, env: dict, cwd, options=()) -> str:
        """Submit; returns the job id. `env` becomes the job's environment (sbatch --export=ALL)."""
        env = dict(env, SLURM_CONF=self.conf)
        out = self.run("sbatch", "--parsable", *options, script, *args, env=env, cwd=cwd).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        fields = {}
        for word in text.split():
            key, sep, value = word.partition("=")
            if sep and key not in fields:
                fields[key] = value
        return fields

    def wait_job(self, job_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in FINAL:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s\n"
                                   + self.diagnostics(info))
            time.sleep(0.5)

    def diagnostics(self, info: dict) -> str:
        parts = [f"scontrol: {info}"]
        for path in (info.get("StdOut"), self.dir / "slurmctld.log", self.dir / "slurmd.log"):
            if path and os.path.isfile(path):
                parts.append(f"--- {path} (tail)\n" + "".join(open(path, errors="replace").readlines()[-40:]))
        return "\n".join(parts)


def start(state_dir: Path) -> LocalSlurm:
    env = dict(os.environ, DFT_SLURM_DIR=str(state_dir), DFT_SLURM_PORT=str(free_port_pair()))
    proc = subprocess.run(["bash", SCRIPT, "start"], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/local_slurm.sh start failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("export SLURM_CONF=")][-1]
    conf = line.split("=", 1)[1]
    return LocalSlurm(state_dir, conf, dict(env, SLURM_CONF=conf))


def stop(slurm: LocalSlurm) -> None:
    subprocess.run(["bash", SCRIPT, "stop"], env=slurm.env, capture_output=True, text=True, timeout=120)


def wait_for_lines(path: Path, n: int, timeout: float, slurm: LocalSlurm, job_id: str) -> float:
    """Wait until the file has at least n lines while the job runs; returns the monotonic time it was seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return time.monotonic()
        info = slurm.job(job_id)
        if info.get("JobState") in FINAL:
            raise RuntimeError(f"job {job_id} ended before {path} had {n} lines\n" + slurm.diagnostics(info))
        time.sleep(0.1)
    raise TimeoutError(f"{path} has fewer than {n} lines after {timeout:.0f} s\n"
                       + slurm.diagnostics(slurm.job(job_id)))


def torchrun_reference(workdir: Path, job_env: dict, args: list[str]) -> Path:
    """The uninterrupted run a Slurm job is compared with: 2 ranks under plain torchrun on one host,
    outside Slurm, in the job's environment less the template's knobs."""
    out = workdir / "reference"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "dft_ds.train"] + args + [f"train.output_dir={out}"]
    env = {k: v for k, v in job_env.items() if k not in ("NPROC_PER_NODE", "REPO", "VENV")}
    log = workdir / "reference.log"
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, timeout=600).returncode
    assert rc == 0, log.read_text()[-3000:]
    return out
