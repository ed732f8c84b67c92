"""The paper in miniature: pretrain a tiny base, fine-tune it with SFT and with DFT at equal compute,
evaluate base / SFT / DFT in domain and out of domain, and write a table and a plot.

    .venv/bin/python benchmarks/replicate.py [--out runs/replicate] [--seeds 1,2,3] [--ranks 2]
        [--pretrain-samples 6000] [--finetune-samples 3000] [--eval-problems 100] [--samples 4]

Steps (each a real `dft-train` / `dft-eval` run, 2 ranks, ZeRO-3, on the built-in synthetic math):
1. pretrain: plain next-token loss (loss.type=sft on whole chat transcripts with an empty prompt,
   so every token is a target) from random init, on problems drawn with data seed 1001;
2. fine-tune copies of that base on chain-of-thought problems drawn with data seed 2002 (prompt
   masked, as in the paper) with loss.type=sft and loss.type=dft (pure DFT, no floor), the same
   steps, batch and learning rate; one pair per seed (the seed sets data order);
3. evaluate the base and every fine-tuned model with Average@K at temperature 1.0 on the held-out
   in-domain test split (`synthetic`) and the harder out-of-domain split (`synthetic-ood`: larger
   numbers, more steps);
4. write results.md (table: mean and spread over seeds), results.json and results.png (training
   curves of loss, NLL and mean token probability; accuracy bars with the per-seed points).

The result is reported whichever way it falls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.common import free_port  # noqa: E402

BENCHMARKS = ("synthetic", "synthetic-ood")
# The models a report shows: (key, label in the table, colour in the plot); offline_rl.py passes its own.
MODELS = (("base", "base (pretrained only)", "grey"), ("sft", "SFT", "tab:blue"), ("dft", "DFT", "tab:orange"))
COMMON = ["data.max_length=512", "train.micro_batch_size=4", "train.global_batch_size=8", "train.warmup_ratio=0.05"]



def sh(cmd: list[str], log_path: str) -> None:
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        with open(log_path, encoding="utf-8") as fh:
            tail = fh.read()[-3000:]
        sys.exit(f"failed (exit {rc}): {' '.join(cmd)}\n{tail}")
    print(f"  {time.perf_counter() - start:6.1f} s  {os.path.basename(log_path)}", flush=True)


def new_out_dir(out: str) -> None:
    """--out must be new or empty: a benchmark never writes over an earlier run's results."""
    if os.path.exists(out) and os.listdir(out):
        sys.exit(f"{out} exists and is not empty; choose a new --out")
    os.makedirs(out, exist_ok=True)


def write_data(out: str, pretrain_n: int, finetune_n: int) -> tuple[str, str]:
    from dft_ds import synthetic

    pre = os.path.join(out, "pretrain.jsonl")
    with open(pre, "w", encoding="utf-8") as fh:
        for ex in synthetic.generate_examples(pretrain_n, 1001, "train"):
            # The whole transcript is the "response": next-token loss on every token.
            fh.write(json.dumps({"prompt": "", "response": synthetic._render_chat(ex["prompt"], ex["response"])}) + "\n")
    fine = os.path.join(out, "finetune.jsonl")
    with open(fine, "w", encoding="utf-8") as fh:
        for ex in synthetic.generate_examples(finetune_n, 2002, "train"):
            fh.write(json.dumps({"prompt": ex["prompt"], "response": ex["response"]}) + "\n")
    return pre, fine


def train(args, run_dir: str, overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.ranks}",
           f"--master-port={free_port()}", "-m", "dft_ds.train", f"train.output_dir={run_dir}",
           "logging.progress_bar=false", "export.hf=true", "checkpoint.keep=1", *overrides]
    sh(cmd, run_dir + ".log")


def evaluate(args, model_dir: str, out_dir: str) -> dict:
    cmd = [sys.executable, "-m", "dft_ds.eval.cli", "--model", model_dir, "--out", out_dir,
           "--samples", str(args.samples), "--temperature", "1.0", "--max-new-tokens", "320",
           "--limit", str(args.eval_problems), "--batch-size", "32", "--prompt", "chat", "--no-progress"]
    for bench in BENCHMARKS:
        cmd += ["--benchmark", bench]
    sh(cmd, out_dir + ".log")
    with open(os.path.join(out_dir, "results.json"), encoding="utf-8") as fh:
        return json.load(fh)


def pretrain(args, out: str, pre_data: str) -> str:
    """Step 1: next-token loss on whole transcripts from random init; returns the run directory (HF model in hf/)."""
    base = os.path.join(out, "base")
    train(args, base, [f"data.source={pre_data}", "data.template=plain", "loss.type=sft", "train.lr=1e-3",
                       f"train.epochs={args.pretrain_epochs}", "train.seed=0", *COMMON])
    return base


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/replicate")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--pretrain-samples", type=int, default=6000)
    parser.add_argument("--pretrain-epochs", type=float, default=1.0)
    parser.add_argument("--finetune-samples", type=int, default=3000)
    parser.add_argument("--finetune-lr", type=float, default=3e-4)
    parser.add_argument("--eval-problems", type=int, default=100)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--report-only", type=float, default=None, metavar="MINUTES",
                        help="rewrite results.* from an existing --out (the pipeline's wall time in minutes)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = os.path.abspath(args.out)
    if args.report_only is not None:
        return report(out, seeds, args, args.report_only * 60)
    new_out_dir(out)
    start = time.perf_counter()
    pre_data, fine_data = write_data(out, args.pretrain_samples, args.finetune_samples)
    common = COMMON

    print("1. pretrain (next-token loss on whole transcripts, random init)", flush=True)
    base = pretrain(args, out, pre_data)

    print("2. fine-tune copies with sft and dft at equal compute", flush=True)
    runs = {}
    for seed in seeds:
        for loss in ("sft", "dft"):
            run_dir = os.path.join(out, f"{loss}-seed{seed}")
            train(args, run_dir, [f"model.name_or_path={base}/hf", f"data.source={fine_data}", f"loss.type={loss}",
                                  "loss.prob_floor=0", f"train.lr={args.finetune_lr}", "train.epochs=1",
                                  f"train.seed={seed}", *common])
            runs[(loss, seed)] = run_dir

    print("3. evaluate", flush=True)
    evaluate(args, f"{base}/hf", os.path.join(out, "eval-base"))
    for (loss, seed), run_dir in runs.items():
        evaluate(args, f"{run_dir}/hf", os.path.join(out, f"eval-{loss}-seed{seed}"))
    report(out, seeds, args, time.perf_counter() - start)


def report(out: str, seeds: list[int], args, seconds: float) -> None:
    """Read every eval-*/results.json and run's metrics back; write results.{md,json,png}."""
    runs = {(loss, seed): os.path.join(out, f"{loss}-seed{seed}") for seed in seeds for loss in ("sft", "dft")}
    results = {"base": [json.load(open(os.path.join(out, "eval-base", "results.json")))]}
    for (loss, seed) in runs:
        results.setdefault(loss, []).append(json.load(open(os.path.join(out, f"eval-{loss}-seed{seed}", "results.json"))))
    summary = summarise(results, seeds, args, runs, seconds)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    table = markdown(summary)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as fh:
        fh.write(table)
    plot(summary, runs, seeds, os.path.join(out, "results.png"))
    print(table)
    print(f"wrote {out}/results.md, results.json, results.png")


def summarise(results: dict, seeds: list[int], args, runs: dict, seconds: float) -> dict:
    table = {}
    for model, evals in results.items():
        table[model] = {}
        for bench in BENCHMARKS:
            values = [100 * e["benchmarks"][bench]["avg_at_k"] for e in evals]
            # Samples that end in an extractable answer: the format held, right or wrong.
            answered = [100 * (1 - e["benchmarks"][bench]["no_answer"] / (e["benchmarks"][bench]["problems"] * args.samples))
                        for e in evals]
            table[model][bench] = {"mean": statistics.mean(values),
                                   "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "per_seed": values,
                                   "answered_mean": statistics.mean(answered), "answered_per_seed": answered}
    final = {f"{loss}-seed{seed}": read_metrics(run)[-1] for (loss, seed), run in runs.items()}
    return {"avg_at_k": table, "k": args.samples, "problems": args.eval_problems, "seeds": seeds,
            "final_training_metrics": {k: {m: v.get(m) for m in ("loss", "nll", "mean_token_prob")}
                                       for k, v in final.items()},
            "settings": vars(args), "minutes": round(seconds / 60, 1)}


def markdown(summary: dict, models=MODELS) -> str:
    k, seeds = summary["k"], summary["seeds"]
    lines = [f"Average@{k} (%, temperature 1.0) on {summary['problems']} problems per split; "
             f"{' and '.join(label for key, label, _ in models if key != 'base')}: mean ± "
             f"standard deviation over fine-tuning seeds {', '.join(map(str, seeds))} (per-seed values in brackets); "
             "the base is one model.", "",
             "| model | in-domain (synthetic test) | out-of-domain (synthetic-ood) |", "|---|---|---|"]
    for model, label, _ in models:
        cells = []
        for bench in BENCHMARKS:
            c = summary["avg_at_k"][model][bench]
            per = ", ".join(f"{v:.1f}" for v in c["per_seed"])
            cells.append(f"{c['mean']:.1f}" if model == "base" else f"{c['mean']:.1f} ± {c['sd']:.1f} [{per}]")
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    lines += ["", "Samples that end in an extractable `\\boxed{}` answer (%, right or wrong), mean [per seed]:", "",
              "| model | in-domain | out-of-domain |", "|---|---|---|"]
    for model, label, _ in models:
        label = label.split(" (")[0]
        cells = []
        for bench in BENCHMARKS:
            c = summary["avg_at_k"][model][bench]
            cells.append(f"{c['answered_mean']:.1f} [" + ", ".join(f"{v:.1f}" for v in c["answered_per_seed"]) + "]")
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    fm = summary["final_training_metrics"]
    lines += ["", "Last logged training step (NLL of the fine-tuning targets; mean target-token probability):", ""]
    for key in sorted(fm):
        lines.append(f"- {key}: NLL {fm[key]['nll']:.3f}, mean p {fm[key]['mean_token_prob']:.3f}")
    lines += ["", f"Wall time for the whole pipeline: {summary['minutes']} min.", ""]
    return "\n".join(lines)


def plot(summary: dict, runs: dict, seeds: list[int], path: str, models=MODELS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    colours = {key: colour for key, _, colour in models}
    for (loss, seed), run_dir in runs.items():
        rows = [r for r in read_metrics(run_dir) if r.get("loss") is not None]
        steps = [r["step"] for r in rows]
        for ax, key in zip(axes[:3], ("loss", "nll", "mean_token_prob")):
            ax.plot(steps, [r[key] for r in rows], color=colours[loss], alpha=0.7,
                    label=loss.upper() if seed == seeds[0] else None)
    for ax, title in zip(axes[:3], ("training loss (as optimised)", "NLL of target tokens", "mean target-token probability")):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.legend()
    ax = axes[3]
    width = 0.25
    for i, (model, _, colour) in enumerate(models):
        for j, bench in enumerate(BENCHMARKS):
            c = summary["avg_at_k"][model][bench]
            x = j + (i - 1) * width
            ax.bar(x, c["mean"], width, color=colour,
                   label=model.upper() if j == 0 else None)
            ax.scatter([x] * len(c["per_seed"]), c["per_seed"], color="black", s=8, zorder=3)
    ax.set_xticks(range(len(BENCHMARKS)), ["in-domain", "out-of-domain"])
    ax.set_ylabel(f"Average@{summary['k']} (%)")
    ax.set_title("accuracy (dots: seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
