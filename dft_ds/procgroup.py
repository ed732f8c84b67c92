"""The process group: joining it however the ranks were started, the rank helpers, and leaving it
(exit_rank: how a program that joined one ends)."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn, Optional

import torch

from dft_ds.deepspeed_setup import deepspeed_prints_filtered, import_deepspeed, quiet_deepspeed
from dft_ds.net import free_port

# Set by init_distributed: the program must end through exit_rank.
_JOINED_PROCESS_GROUP = False


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def map_launcher_env(env: Optional[dict[str, str]] = None) -> None:
    """Give torch.distributed its RANK/WORLD_SIZE/LOCAL_RANK however the process was started.

    deepspeed and torchrun set them; srun sets SLURM_*; a plain process sets nothing and becomes a
    world of one on a free loopback port.

    `env` defaults to os.environ as it is at the call, never as a default argument's value: datasets'
    multi-process map replaces the os.environ object with a copy (datasets 4.x, `os.environ = prev_env`),
    after which writes to the object bound at import went nowhere the process reads, and the next
    `os.environ["WORLD_SIZE"]` was a KeyError (every function here that reads the environment does the same).
    """
    env = os.environ if env is None else env
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "RANK" not in env:
        env.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    env.setdefault("LOCAL_RANK", "0")


def ranks_on_this_node(env: Optional[dict[str, str]] = None) -> int | None:
    """How many ranks share this machine, from what the launcher says (None where it says nothing)."""
    env = os.environ if env is None else env
    if env.get("LOCAL_WORLD_SIZE"):  # torchrun
        return int(env["LOCAL_WORLD_SIZE"])
    if env.get("LOCAL_SIZE"):  # the deepspeed launcher
        return int(env["LOCAL_SIZE"])
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node and "SLURM_PROCID" in env:  # srun: "2(x3),1" is 2 tasks on each of 3 nodes, then 1
        counts = []
        for part in per_node.split(","):
            count, _, times = part.partition("(x")
            counts += [int(count)] * (int(times.rstrip(")")) if times else 1)
        node = int(env.get("SLURM_NODEID", "0"))
        return counts[node] if node < len(counts) else None
    if env.get("MASTER_ADDR") in ("127.0.0.1", "localhost", "::1") and env.get("WORLD_SIZE"):
        return int(env["WORLD_SIZE"])  # started by hand on one machine
    return None


def cpu_threads_per_rank(env: Optional[dict[str, str]] = None) -> int | None:
    """Intra-op threads for a rank on the CPU accelerator: the cores this process may use divided
    among the ranks of its machine, or None to leave torch's choice (OMP_NUM_THREADS set, or the
    number of local ranks unknown).

    torch gives every process a thread per core. torchrun sets OMP_NUM_THREADS=1 for its ranks, but
    srun and a start by hand set nothing: two ranks on a 2-core machine then ran four compute threads,
    whose OpenMP workers spin waiting for cores the other rank holds."""
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS"):
        return None
    local = ranks_on_this_node(env)
    if not local or local < 1:
        return None
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, cpus // local)


def init_distributed(timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group on the accelerator's backend (NCCL on CUDA, gloo or ccl on CPU)."""
    deepspeed = import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    # DeepSpeed 0.19 calls torch collectives that torch 2.13 deprecates, once per bucket per step.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+`? is deprecated")
    quiet_deepspeed()
    map_launcher_env()
    local_rank = int(os.environ["LOCAL_RANK"])
    accel = get_accelerator()
    if accel.device_name() != "cpu":
        accel.set_device(local_rank)
    else:
        threads = cpu_threads_per_rank()
        if threads is not None and threads < torch.get_num_threads():
            torch.set_num_threads(threads)
        from dft_ds.deepspeed_setup import CPU_COMM_OP, cpu_comm_op_built

        if local_rank == 0 and not cpu_comm_op_built():
            print(f"deepspeed: compiling its CPU communication op ({CPU_COMM_OP}) into "
                  f"{os.environ['TORCH_EXTENSIONS_DIR']}, once for this environment (about a minute on two cores)",
                  flush=True)
    global _JOINED_PROCESS_GROUP
    _JOINED_PROCESS_GROUP = True
    with deepspeed_prints_filtered():  # the CPU comm op announces itself on every start
        deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), auto_mpi_discovery=False,
                                   verbose=False, timeout=timedelta(seconds=timeout_s))
    info = DistInfo(int(os.environ["RANK"]), local_rank, int(os.environ["WORLD_SIZE"]))
    if accel.device_name() == "cpu":
        unlink_shm_buffer(info)
    return info


def shm_buffer_path(rank: int, env: Optional[dict[str, str]] = None) -> str | None:
    """The /dev/shm file DeepSpeed's CPU communication op maps for `rank`, or None where it makes
    none (it does only when every rank is on this machine: LOCAL_SIZE equal to the world size)."""
    env = os.environ if env is None else env
    if not env.get("LOCAL_SIZE") or env.get("LOCAL_SIZE") != env.get("WORLD_SIZE"):
        return None
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
            f"{env.get('MASTER_PORT', '')}_{rank}")
    return os.path.join("/dev/shm", name)


def unlink_shm_buffer(info: DistInfo) -> None:
    """Remove this rank's DeepSpeed all-reduce buffer from /dev/shm once every rank has mapped it.

    The op creates a 69 MB file per rank and never removes it, so each run by the deepspeed
    launcher (or any start with LOCAL_SIZE) left its files behind until /dev/shm filled and the
    machine ran short of memory. The mappings outlive the name, so after a barrier (every rank has
    opened every other rank's file inside init_distributed) the name can go, and a run that is
    killed later leaves nothing behind either."""
    path = shm_buffer_path(info.rank)
    if path is None:
        return
    barrier(info.world_size)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def shutdown_distributed() -> None:
    """Leave the process group. A program that joined one ends through `exit_rank`, not a plain return."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def exit_rank(code: int) -> NoReturn:
    """End a program that has used a process group with `code`, without the interpreter's teardown.

    A gloo worker thread drops each finished collective a moment after the caller has seen it
    finish. Where that drop frees a tensor whose Python object was let go meanwhile, the thread
    needs the GIL. Once the interpreter is finalizing, CPython ends such a thread with
    pthread_exit, and its unwind through the work's (noexcept) destructor calls std::terminate:
    the rank aborts with rc -6, "terminate called without an active exception", after a run
    that finished. A barrier and destroy_process_group before exit only narrow the window. A core
    dump of such an abort shows ~AsyncAllgatherWork -> decref_pyobject -> take_gil -> pthread_exit
    -> std::terminate on a gloo `runLoop` thread; tests/distributed/exit_race.py provokes it.

    So: non-daemon threads are joined and the atexit handlers run (logging, trackers), as at a
    normal exit, while the interpreter is whole; then the streams are flushed and the process
    ends at once. A process that never joined a process group exits the ordinary way.
    """
    import atexit
    import threading

    import torch.distributed as tdist

    if not (_JOINED_PROCESS_GROUP or (tdist.is_available() and tdist.is_initialized())):
        sys.exit(code)
    shutdown_distributed()
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def barrier(world_size: int) -> None:
    import deepspeed.comm as comm

    if world_size > 1:
        comm.barrier()


def any_rank(flag: bool, world_size: int) -> bool:
    """Whether `flag` is true on any rank (one all-reduce); every rank learns the same answer."""
    if world_size == 1:
        return flag
    import deepspeed.comm as comm

    value = torch.tensor([1.0 if flag else 0.0], device=device())
    comm.all_reduce(value)
    return bool(value.item() > 0)


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(accel.device_name(int(os.environ.get("LOCAL_RANK", "0"))))
