"""Fault injection for the fault-matrix tests: DFT_DS_FAULT=<point>:<step>[:<rank>].

Only the places a fault is injected at import this: the loop (kill_in_step, oom, nan_loss, nan_grad,
memory_limit; and DFT_DS_FAULT_STEP_SLEEP, a pause before each step) and the checkpoint writer
(kill_after_shards). Without DFT_DS_FAULT every call is one dictionary lookup.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

# memory_limit: how much address space the rank may still map once the limit is set.
HEADROOM_MIB = int(os.environ.get("DFT_DS_FAULT_HEADROOM_MIB", "16"))


# DFT_DS_FAULT_STEP_SLEEP: the pause before each optimizer step (pace_step), read once.
STEP_SLEEP_S = float(os.environ.get("DFT_DS_FAULT_STEP_SLEEP", "0") or 0)


def pace_step() -> None:
    """DFT_DS_FAULT_STEP_SLEEP=S: every optimizer step first waits S seconds. A test that needs a run
    alive for a while (to signal it, start a second run beside it, or hold its lock) waits idle
    instead of computing many steps, which leaves the CPU to the tests beside it."""
    if STEP_SLEEP_S > 0:
        time.sleep(STEP_SLEEP_S)


def fault_here(point: str, step: int) -> bool:
    """Whether DFT_DS_FAULT names this point and optimizer step on this rank (rank 0 by default)."""
    spec = os.environ.get("DFT_DS_FAULT", "")
    if not spec:
        return False
    name, at_step, *rank = spec.split(":")
    return name == point and int(at_step) == step and int(os.environ.get("RANK", "0")) == int(rank[0] if rank else 0)


def inject_fault(point: str, step: int) -> None:
    """SIGKILL this process at a named point (see fault_here): a rank dying with no chance to clean up."""
    if fault_here(point, step):
        os.kill(os.getpid(), signal.SIGKILL)


def limit_memory(step: int) -> None:
    """memory_limit: cap this rank's address space (the soft RLIMIT_AS) at what it maps now plus
    DFT_DS_FAULT_HEADROOM_MIB (16), so that the step's next large allocation really fails in the
    allocator, as it does on a host that is out of memory.

    Why a limit set inside the rank at a step, and not `prlimit` on the process or a cgroup: a limit
    from the start must sit between the start-up peak (imports, DeepSpeed's set-up) and a step's,
    which is a guess on a loaded machine; a limit set from outside lands at a moment nobody chose
    (a checkpoint write, a log line); and a cgroup's limit ends in the kernel's OOM killer (SIGKILL,
    the kill_in_step row), never in a failed allocation the rank can report.

    glibc keeps freed memory for reuse and raises its mmap threshold to the largest block freed, so
    after a few steps a step may map nothing new and never meet the limit; the test starts the rank
    with MALLOC_MMAP_THRESHOLD_=65536, which fixes the threshold and makes each large tensor a new
    mapping, as a step of a model that fills the host does.
    """
    if not fault_here("memory_limit", step):
        return
    import resource

    with open("/proc/self/status", encoding="ascii") as fh:
        mapped = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped + (HEADROOM_MIB << 20), hard))


@contextlib.contextmanager
def nan_gradient(module, step: int):
    """nan_grad: during the backward passes inside this block, the gradient of one parameter (the
    module's first trainable one) becomes NaN on this rank, while the loss stays finite."""
    if not fault_here("nan_grad", step):
        yield
        return
    param = next(p for p in module.parameters() if p.requires_grad)
    handle = param.register_hook(lambda grad: grad * float("nan"))
    try:
        yield
    finally:
        handle.remove()
