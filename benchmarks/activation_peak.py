"""One rank of `dft_ds.train` under the PyTorch profiler's CPU memory accounting: the activation peak of
each training micro-batch, as a GPU's max_memory_allocated would give it.

    python -m torch.distributed.run --nproc-per-node 2 benchmarks/activation_peak.py OUT_PREFIX [settings...]

Writes OUT_PREFIX.rank<R>.json: for every micro-batch, the most bytes allocated since its forward
began and not yet freed, at any moment of its forward and backward ("peak"), and at the end of the
forward ("after_forward"). Weights, gradient partitions and optimizer states that exist before the
forward are not in it; buffers that ZeRO-3 allocates during the backward are.

Peak RSS is not this figure on CPU: glibc keeps freed blocks, and how much depends on which thread
frees them. The profiler reports every allocation and free of PyTorch's CPU allocator, with two
gaps that `activation_peaks` closes:
- A tensor freed on one of gloo's worker threads (the last owner of a collective's buffers) has no
  free event. An address handed out again is counted as freed then.
- The sequence-parallel exchange's send and receive buffers (`_AllToAll`'s `stack` and
  `empty_like`) go to gloo. They are counted as freed when the exchange returns, as they are.
"""

from __future__ import annotations

import bisect
import json
import os
import sys
from typing import Iterable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

EXCHANGE = "_AllToAll"
EXCHANGE_BUFFERS = ("aten::stack", "aten::empty_like")


def activation_peaks(events: Iterable[dict]) -> list[dict]:
    """Per (dft::forward, dft::backward) pair of a Chrome trace's events: {"peak", "after_forward",
    "late_frees"} in bytes (late_frees counts the frees inferred by the two rules of the docstring)."""
    events = list(events)
    spans = {n: sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("ph") == "X" and e.get("name") == n)
             for n in ("dft::forward", "dft::backward", EXCHANGE)}
    buffer_ops = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                        if e.get("ph") == "X" and e.get("name") in EXCHANGE_BUFFERS)
    exchanges = spans[EXCHANGE]
    starts = [a for a, _ in exchanges]

    def exchange_end(ts: float):
        """The end of the exchange whose send or receive buffer an allocation at `ts` is, else None."""
        i = bisect.bisect_right(starts, ts) - 1
        if i < 0 or ts > exchanges[i][1]:
            return None
        a, b = exchanges[i]
        j = bisect.bisect_left(buffer_ops, (a,))
        while j < len(buffer_ops) and buffer_ops[j][0] <= b:
            if buffer_ops[j][0] <= ts <= buffer_ops[j][1]:
                return b
            j += 1
        return None

    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    out = []
    for (f0, f1), (_, b1) in zip(spans["dft::forward"], spans["dft::backward"]):
        live: dict[int, int] = {}
        due: list[tuple[float, int]] = []  # (when, address) of exchange buffers to count as freed
        run = peak = after_forward = late = 0

        def settle(now: float) -> None:
            nonlocal run, late
            while due and due[0][0] <= now:
                _, addr = due.pop(0)
                if addr in live:
                    run -= live.pop(addr)
                    late += 1

        for e in memory:
            ts = e["ts"]
            if ts < f0:
                continue
            if ts > b1:
                break
            settle(ts)
            addr, size = e["args"]["Addr"], e["args"]["Bytes"]
            if size > 0:
                if addr in live:  # its free happened on a thread the profiler does not follow
                    run -= live.pop(addr)
                    late += 1
                live[addr] = size
                run += size
                end = exchange_end(ts)
                if end is not None:
                    bisect.insort(due, (end, addr))
            elif addr in live:
                run -= live.pop(addr)
            peak = max(peak, run)
            if ts <= f1:
                after_forward = run
        out.append({"peak": peak, "after_forward": after_forward, "late_frees": late})
    return out


def main(argv: list[str]) -> int:
    from torch.profiler import ProfilerActivity, profile, record_function

    from dft_ds import engine, train

    if not argv or "=" in argv[0]:
        sys.exit("usage: python -m torch.distributed.run ... benchmarks/activation_peak.py OUT_PREFIX [settings...]")
    prefix, settings = argv[0], argv[1:]
    for name in ("forward", "backward"):
        def traced(self, *args, _inner=getattr(engine.Engine, name), _name=name, **kwargs):
            with record_function(f"dft::{_name}"):
                return _inner(self, *args, **kwargs)
        setattr(engine.Engine, name, traced)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        rc = train.main(settings)
    rank = int(os.environ.get("RANK", "0"))
    trace = f"{prefix}.rank{rank}.trace.json"
    prof.export_chrome_trace(trace)
    with open(trace, encoding="utf-8") as fh:
        events = json.load(fh)["traceEvents"]
    os.remove(trace)
    with open(f"{prefix}.rank{rank}.json", "w", encoding="utf-8") as fh:
        json.dump({"rank": rank, "micro_batches": activation_peaks(events)}, fh)
    return rc


if __name__ == "__main__":
    from dft_ds.procgroup import exit_rank

    exit_rank(main(sys.argv[1:]))  # the rank joined a process group: see procgroup.exit_rank
