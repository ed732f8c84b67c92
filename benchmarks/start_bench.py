"""What a short run costs: a start of the embedded default (its smaller test shape) on RANKS ranks through
torchrun with the tokenised set already cached, STEPS optimizer steps, the CPU time of the whole
process tree (launcher, ranks, and what they start: ninja, compilers), the wall time, and the step
loop's own seconds (the `done: N steps in S s` line).

    .venv/bin/python benchmarks/start_bench.py [--ranks 2] [--steps 4 --steps 40] [--repeats 3]
        [--launch torchrun|hand] [--baseline-repo DIR]

--launch hand starts the ranks as srun or a user's script does: RANK, WORLD_SIZE, LOCAL_RANK and a
loopback MASTER_ADDR in each rank's environment, no OMP_NUM_THREADS (torchrun sets it to 1).

Most of the test suite's time is such runs (several hundred rank starts), and every user's job
starts this way. --baseline-repo runs the same commands from another checkout (for example
`git worktree add /tmp/base REV`), alternating with this one after one warm-up start of each;
the table gives medians and the ratios this/baseline.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.common import free_port, run_measured  # noqa: E402

SMALL = "hidden_size=64,num_hidden_layers=2,num_attention_heads=2,num_key_value_heads=2,intermediate_size=128"
# The shape and data of the suite's control-flow tiers (tests/distributed/helpers.py QUICK + SMALL).
SETTINGS = ["data.synthetic_size=300", "data.max_length=192", "train.micro_batch_size=2", "train.global_batch_size=8",
            "logging.progress_bar=false", "logging.plot=false", f"model.config_overrides={SMALL}"]

# By hand: one process per rank with its variables, as srun or a user's script starts them.
_BY_HAND = ("import os, subprocess, sys; n = int(sys.argv[1]); "
            "procs = [subprocess.Popen(sys.argv[2:], env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), "
            "WORLD_SIZE=str(n))) for r in range(n)]; sys.exit(max(p.wait() for p in procs))")


def one_run(repo: str, ranks: int, steps: int, work: str, env: dict, launch: str = "torchrun") -> dict:
    out = os.path.join(work, "run")
    shutil.rmtree(out, ignore_errors=True)
    train = ["-m", "dft_ds.train", *SETTINGS, f"train.max_steps={steps}", f"train.output_dir={out}"]
    if launch == "hand":
        env = dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        env.pop("OMP_NUM_THREADS", None)
        cmd = [sys.executable, "-c", _BY_HAND, str(ranks), sys.executable, *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
               f"--master-port={free_port()}", *train]
    start = time.perf_counter()
    proc, _, cpu = run_measured(cmd, cwd=repo, env=dict(env, PYTHONPATH=repo))
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"run from {repo} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    done = re.search(r"done: \d+ steps? in ([\d.]+) s", proc.stdout + proc.stderr)
    return {"wall": wall, "cpu": cpu, "loop": float(done.group(1)) if done else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, action="append", help="optimizer steps per run (repeatable; default 4, 40)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--launch", choices=["torchrun", "hand"], default="torchrun")
    ap.add_argument("--baseline-repo", help="another checkout, run alternately as the baseline")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "dft_ds-start-bench"))
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    bin_dir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # As in an activated venv (and the test suite): DeepSpeed's CPU comm op is checked by the venv's ninja.
    env.update(PATH=bin_dir + os.pathsep + env.get("PATH", ""), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               DFT_DS_CACHE=os.path.join(args.work, "cache"),
               TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions")))
    repos = {"this": REPO}
    if args.baseline_repo:
        repos["baseline"] = os.path.abspath(args.baseline_repo)
    results = {}
    for steps in args.steps or [4, 40]:
        for name, repo in repos.items():  # warm-up: tokenised set cached, comm op built, files in the page cache
            one_run(repo, args.ranks, steps, args.work, env, args.launch)
        runs = {name: [] for name in repos}
        for _ in range(args.repeats):
            for name, repo in repos.items():
                runs[name].append(one_run(repo, args.ranks, steps, args.work, env, args.launch))
        results[steps] = {name: {key: statistics.median(r[key] for r in rs) for key in ("wall", "cpu", "loop")}
                          for name, rs in runs.items()}
    print(f"\n# a short run: {args.ranks} ranks ({'by hand' if args.launch == 'hand' else 'through torchrun'}), the suite's small shape, tokenised set cached; "
          f"medians of {args.repeats} (after a warm-up), {os.cpu_count()} CPUs\n")
    print("| steps | checkout | wall (s) | CPU, all processes (s) | step loop (s) |")
    print("|---|---|---|---|---|")
    for steps, by_name in results.items():
        for name, f in by_name.items():
            print(f"| {steps} | {name} | {f['wall']:.2f} | {f['cpu']:.2f} | {f['loop']:.2f} |")
    if "baseline" in repos:
        print()
        for steps, by_name in results.items():
            this, base = by_name["this"], by_name["baseline"]
            print(f"{steps} steps, this / baseline: wall {this['wall'] / base['wall']:.2f}x, "
                  f"CPU {this['cpu'] / base['cpu']:.2f}x, step loop {this['loop'] / base['loop']:.2f}x")


if __name__ == "__main__":
    main()
