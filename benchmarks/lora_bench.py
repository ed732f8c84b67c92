"""LoRA against full fine-tuning on the ~100M Llama: per-rank peak memory, tokens/s, checkpoint size,
and `dft-train --check`'s memory estimate beside the measured peak.

    .venv/bin/python benchmarks/lora_bench.py [--ranks 2] [--steps 8] [--repeat 2] [--stages 3,2] [override ...]

The model is scaling_bench.py's (hidden 768, 12 layers, 12 heads, vocabulary 32000: 134M
parameters, random init). Every run is a real `torchrun ... -m dft_ds.train` (fp32, fused head,
loss dft, packed 512-token rows, micro batch 1 row per rank, accumulation 1), identical except for
model.lora (all-linear, rank 16, alpha 32; 2.8M trainable parameters) and deepspeed.config. For
each stage one warm-up run per contender saves its final checkpoint (its size on disk is reported,
its speed is not); then the contenders alternate (full, lora, full, lora, ...) so that a drift in
machine load hits both alike. Reported: median training tokens/s from summary.json (set-up
excluded), median peak RSS of the largest rank (a wrapper's RUSAGE_CHILDREN, so each run is measured
alone), and the ratio LoRA/full of each.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.common import free_port, run_peak_rss  # noqa: E402
from benchmarks.scaling_bench import model_100m  # noqa: E402

CONTENDERS = {"full": ["model.lora=false"], "lora": ["model.lora=true", "model.lora_rank=16", "model.lora_alpha=32"]}


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def settings(args, model: str, stage: int, mode: str) -> list[str]:
    return [f"model.name_or_path={model}", f"deepspeed.config=zero{stage}", "loss.type=dft", "loss.fused=true",
            "data.max_length=512", "train.micro_batch_size=1", "train.gradient_accumulation_steps=1",
            "train.precision=fp32", "data.synthetic_size=3000", *CONTENDERS[mode], *args.overrides]


def estimate_gib(args, overrides: list[str], out: str) -> float:
    """`dft-train --check`'s 'memory per rank (rough)' for the same run."""
    cmd = [sys.executable, "-m", "dft_ds.train", "--check", "--world-size", str(args.ranks),
           f"train.output_dir={out}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    found = re.search(r"memory per rank \(rough\): ([0-9.]+) GiB", proc.stdout)
    if not found:
        sys.exit(f"--check gave no memory estimate:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return float(found.group(1))


def one_run(args, overrides: list[str], out: str, save: bool) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.ranks}",
           f"--master-port={free_port()}", "-m", "dft_ds.train", f"train.output_dir={out}",
           f"train.max_steps={args.steps}", "logging.progress_bar=false", "logging.tensorboard=false",
           f"checkpoint.save_final={'true' if save else 'false'}", *overrides]
    proc, rss = run_peak_rss(cmd)
    if proc.returncode != 0:
        sys.exit(f"run failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    result = {"tokens_per_s": summary["session"]["tokens_per_s"], "rss": rss, "last_loss": summary["run"]["last_loss"]}
    if save:
        result["checkpoint_bytes"] = dir_size(os.path.join(out, "checkpoints", f"step-{args.steps}"))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--stages", default="3,2", help="ZeRO stages, comma-separated")
    parser.add_argument("overrides", nargs="*", help="section.key=value passed to every run")
    args = parser.parse_args()
    mib = 1 << 20
    table = []
    with tempfile.TemporaryDirectory(prefix="lora_bench-") as work:
        model = model_100m(work)
        print(f"{'stage':>5} {'run':>6} {'mode':>5} {'tokens/s':>9} {'max rank RSS MiB':>17} {'last loss':>10}",
              flush=True)
        for stage in (int(s) for s in args.stages.split(",")):
            runs = {mode: [] for mode in CONTENDERS}
            est, ckpt = {}, {}
            for mode in CONTENDERS:
                overrides = settings(args, model, stage, mode)
                est[mode] = estimate_gib(args, overrides, os.path.join(work, f"check-{stage}-{mode}"))
                r = one_run(args, overrides, os.path.join(work, f"warm-{stage}-{mode}"), save=True)
                ckpt[mode] = r["checkpoint_bytes"]
                print(f"{stage:>5} {'warm':>6} {mode:>5} {r['tokens_per_s']:>9.0f} {r['rss'] / mib:>17.0f} "
                      f"{r['last_loss']:>10.4f}", flush=True)
            for i in range(args.repeat):
                for mode in CONTENDERS:
                    r = one_run(args, settings(args, model, stage, mode), os.path.join(work, f"{stage}-{mode}-{i}"),
                                save=False)
                    runs[mode].append(r)
                    print(f"{stage:>5} {i:>6} {mode:>5} {r['tokens_per_s']:>9.0f} {r['rss'] / mib:>17.0f} "
                          f"{r['last_loss']:>10.4f}", flush=True)
            med = {mode: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "rss")}
                   for mode, rs in runs.items()}
            table.append({"stage": stage, "median": med, "check_gib": est, "checkpoint_bytes": ckpt,
                          "runs": runs})
    print()
    print(f"LoRA (all-linear, r=16) against full fine-tuning, 134M Llama, {args.ranks} ranks, fp32, fused head, "
          f"{args.steps} steps of 512-token rows; medians of {args.repeat} runs")
    print("| ZeRO | | tokens/s | max rank peak RSS | --check estimate per rank | checkpoint per step |")
    print("|---|---|---|---|---|---|")
    for row in table:
        m, e, c = row["median"], row["check_gib"], row["checkpoint_bytes"]
        for mode in CONTENDERS:
            print(f"| {row['stage']} | {mode} | {m[mode]['tokens_per_s']:,.0f} | {m[mode]['rss'] / mib:,.0f} MiB | "
                  f"{e[mode]:.2f} GiB | {c[mode] / mib:,.1f} MiB |")
        print(f"| {row['stage']} | **LoRA/full** | **{m['lora']['tokens_per_s'] / m['full']['tokens_per_s']:.2f}** | "
              f"**{m['lora']['rss'] / m['full']['rss']:.2f}** | {e['lora'] / e['full']:.2f} | "
              f"**{c['lora'] / c['full']:.3f}** |")
    print(json.dumps(table))


if __name__ == "__main__":
    main()
