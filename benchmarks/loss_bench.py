"""Loss head cost: forward+backward time and peak memory of plain cross-entropy, unfused DFT and fused DFT.

    .venv/bin/python benchmarks/loss_bench.py [--n 4096] [--hidden 1024] [--vocabs 32000,151936]
        [--dtypes fp32,bf16] [--n-for 151936=1024] [--threads N] [--timeout 900] [--repeat 2]
    .venv/bin/python benchmarks/loss_bench.py --family --dtypes fp32 [--rounds 3]

Variants, each in its OWN subprocess (peak RSS is a process-lifetime maximum, so processes must not
share it):
  ce        F.cross_entropy(hidden @ W.T, labels)            plain cross-entropy on full logits
  dft       dft_loss(hidden @ W.T, labels)                    DFT via log_softmax+gather, full logits
  fused     fused_linear_dft_loss(hidden, W, labels)          chunked fused head, default chunk size
  floor     the fused path's three matrix products alone (h@W.T, dz@W, dz.T@h over the target rows,
            in the fused path's fp32 compute dtype): the time floor the fused loss is held to
--family times the fused head with each loss type of the family (dft, eaft top-20 and whole-vocabulary,
only_top_p, only_bottom_p, sft), alternated over --rounds rounds, and prints medians and ratios to fused dft.
hidden [N, H] and W [V, H] both require grad; every position is a target. Memory is peak RSS
(getrusage ru_maxrss) minus the RSS right after the inputs are allocated, so it is what the loss
adds; tracemalloc does not see torch's allocator. Each worker first runs the same variant on a
tiny problem so that one-off kernel/library start-up is not timed; then --repeat timed runs, the
fastest reported (the machine may be shared; the peak is over all runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

VARIANTS = ("floor", "ce", "dft", "fused")
# --family: the fused head with each weighting of the loss family, against fused dft.
FAMILY = {"fused": {"loss_type": "dft"}, "fused-eaft": {"loss_type": "eaft"},
          "fused-eaft-full": {"loss_type": "eaft", "eaft_top_k": 0}, "fused-top-p": {"loss_type": "only_top_p"},
          "fused-bottom-p": {"loss_type": "only_bottom_p"}, "fused-sft": {"loss_type": "sft"}}


def _maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _run_variant(variant: str, hidden, weight, labels) -> None:
    import torch
    import torch.nn.functional as F

    from dft_ds.loss import default_chunk_rows, dft_loss, fused_linear_dft_loss

    if variant in FAMILY and variant != "fused":
        from dft_ds.loss import fused_linear_loss, token_weight

        kw = dict(FAMILY[variant])
        fused_linear_loss(hidden, weight, labels, token_weight(kw.pop("loss_type"), **kw)).loss.backward()
    elif variant == "ce":
        F.cross_entropy(hidden @ weight.T, labels).backward()
    elif variant == "dft":
        dft_loss(hidden @ weight.T, labels).backward()
    elif variant == "fused":
        fused_linear_dft_loss(hidden, weight, labels).backward()
    elif variant == "floor":
        with torch.no_grad():
            w = weight.float()
            rows = default_chunk_rows(weight.shape[0])
            gw = torch.zeros_like(w)
            for s in range(0, hidden.shape[0], rows):
                h = hidden[s:s + rows].float()
                z = h @ w.T
                z @ w
                gw.addmm_(z.T, h)
    else:
        raise ValueError(variant)


def worker(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    def make(n, h, v, seed):
        g = torch.Generator().manual_seed(seed)
        # Drawn directly in the dtype: an fp32 temporary would raise ru_maxrss before the baseline.
        hidden = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_(True)
        weight = torch.randn(v, h, generator=g, dtype=dtype).div_(h ** 0.5).requires_grad_(True)
        labels = torch.randint(0, v, (n,), generator=g)
        return hidden, weight, labels

    _run_variant(args.variant, *make(16, 64, 128, 1))  # warm-up: library start-up, not timed
    hidden, weight, labels = make(args.n, args.hidden, args.vocab, 0)
    base = _maxrss_bytes()
    times = []
    for _ in range(args.repeat):
        hidden.grad = weight.grad = None
        t0 = time.perf_counter()
        _run_variant(args.variant, hidden, weight, labels)
        times.append(time.perf_counter() - t0)
    seconds = min(times)  # the machine is shared: the fastest run is the least disturbed
    print(json.dumps({"seconds": seconds, "peak_bytes": _maxrss_bytes() - base}))


def _cell(args, variant, vocab, dtype, n):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--variant", variant, "--vocab", str(vocab),
           "--dtype", dtype, "--n", str(n), "--hidden", str(args.hidden), "--threads", str(args.threads), "--repeat", str(args.repeat)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=True)
    except subprocess.TimeoutExpired:
        return None, f"timeout>{args.timeout}s"
    except subprocess.CalledProcessError as err:
        return None, (err.stderr.strip().splitlines() or ["failed"])[-1]
    return json.loads(out.stdout.strip().splitlines()[-1]), ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS + tuple(FAMILY), help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=4096, help="tokens (all targets)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocabs", default="32000,151936")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--variants", default=None, help=f"default {','.join(VARIANTS)}; with --family, {','.join(FAMILY)}")
    parser.add_argument("--n-for", default="", help="per-vocab token count, e.g. 151936=1024")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per cell; the minimum is reported")
    parser.add_argument("--family", action="store_true",
                        help="the fused head with every loss type against fused dft: --rounds alternated rounds "
                             "of one timed run per variant, medians reported")
    parser.add_argument("--rounds", type=int, default=3, help="--family: rounds (each variant once per round)")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.family:
        return family(args)

    variants = (args.variants or ",".join(VARIANTS)).split(",")
    gib = 1 << 30
    print(f"{'V':>7} {'dtype':>5} {'N':>5} {'variant':>7} {'time s':>8} {'peak GiB':>9} "
          f"{'t/ce':>6} {'m/ce':>6} {'t/dft':>6} {'m/dft':>6} {'t/floor':>7}", flush=True)
    for vocab, dtype, n in _grid(args):
        res = {}
        for variant in variants:
            res[variant], note = _cell(args, variant, vocab, dtype, n)
            r = res[variant]
            if r is None:
                print(f"{vocab:>7} {dtype:>5} {n:>5} {variant:>7}  {note}", flush=True)
                continue

            def ratio(other, key):
                o = res.get(other)
                return f"{r[key] / o[key]:.2f}" if o and o[key] > 0 else "-"

            print(f"{vocab:>7} {dtype:>5} {n:>5} {variant:>7} {r['seconds']:>8.2f} "
                  f"{r['peak_bytes'] / gib:>9.3f} {ratio('ce', 'seconds'):>6} {ratio('ce', 'peak_bytes'):>6} "
                  f"{ratio('dft', 'seconds'):>6} {ratio('dft', 'peak_bytes'):>6} {ratio('floor', 'seconds'):>7}",
                  flush=True)


def _grid(args):
    """(vocab, dtype, tokens) of every cell: --vocabs x --dtypes, with --n-for's token counts."""
    n_for = {int(k): int(v) for k, v in (kv.split("=") for kv in args.n_for.split(",") if kv)}
    for vocab in (int(v) for v in args.vocabs.split(",")):
        for dtype in args.dtypes.split(","):
            yield vocab, dtype, n_for.get(vocab, args.n)


def family(args) -> None:
    """Each variant in its own process once per round, the variants alternated within each round (a
    shared machine's slow spell hits them all alike); the median time and the largest peak are reported."""
    import statistics

    args.repeat = 1
    # --variants picks some (fused, the baseline, always runs); the default list is the other mode's.
    picked = [v for v in (args.variants or "").split(",") if v in FAMILY]
    names = ["fused"] + [v for v in (picked or FAMILY) if v != "fused"]
    gib = 1 << 30
    print(f"{'V':>7} {'dtype':>5} {'N':>5} {'variant':>16} {'median s':>9} {'runs s':>20} {'peak GiB':>9} "
          f"{'t/dft':>6} {'m/dft':>6}", flush=True)
    for vocab, dtype, n in _grid(args):
        runs = {v: [] for v in names}
        for _ in range(args.rounds):
            for variant in names:
                r, note = _cell(args, variant, vocab, dtype, n)
                if r is None:
                    print(f"{vocab:>7} {dtype:>5} {n:>5} {variant:>16}  {note}", flush=True)
                    continue
                runs[variant].append(r)
        med = {v: statistics.median(x["seconds"] for x in rs) for v, rs in runs.items() if rs}
        peak = {v: max(x["peak_bytes"] for x in rs) for v, rs in runs.items() if rs}
        for variant in names:
            if variant not in med:
                continue
            times = ",".join(f"{x['seconds']:.2f}" for x in runs[variant])
            t = f"{med[variant] / med['fused']:.3f}" if "fused" in med else "-"
            m = f"{peak[variant] / peak['fused']:.3f}" if peak.get("fused") else "-"
            print(f"{vocab:>7} {dtype:>5} {n:>5} {variant:>16} {med[variant]:>9.2f} {times:>20} "
                  f"{peak[variant] / gib:>9.3f} {t:>6} {m:>6}", flush=True)


if __name__ == "__main__":
    main()
