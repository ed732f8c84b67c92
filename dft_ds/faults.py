"""Fault injection for the fault-matrix tests: DFT_DS_FAULT=<point>:<step>[:<rank>].

Only the places a fault is injected at import this: the loop (kill_in_step, oom, nan_loss) and the
checkpoint writer (kill_after_shards). Without DFT_DS_FAULT every call is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal


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
