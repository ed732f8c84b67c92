"""The paper in miniature: pretrain a tiny base, fine-tune it with SFT and with DFT at equal compute,
evaluate base / SFT / DFT in domain and out of domain, and write a table and a plot.

    .venv/bin/python benchmarks/replicate.py [--out runs/replicate] [--seeds 1,2,3] [--ranks 2]
        [--pretrain-samples 6000] [--finetune-samples 3000] [--eval-problems 100] [--samples 4]
        [--task synthetic|easy] [--losses sft,dft[,dft-floor,eaft,asft,mix]]

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

`--task easy` (issue 18) swaps in the easy family of dft_ds/synthetic.py, where a 3.4M-parameter
model can learn the arithmetic: pretraining is 60% easy-train, 20% retention-train (single-digit
products) and 20% the existing synthetic train transcripts; fine-tuning is easy-train only (no
product anywhere); evaluation is `synthetic-easy` (in domain), `synthetic-easy-ood` (four
to six operations instead of one to three) and `synthetic-retention` (the products: forgetting).

`--losses` names the fine-tuning losses, each a set of dft-train overrides (LOSSES below); every
other override is shared, so the runs are at equal compute. The default, sft,dft, is the paper's pair.

The result is reported whichever way it falls.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.common import free_port  # noqa: E402

BENCHMARKS = ("synthetic", "synthetic-ood")
# The models a report shows: (key, label in the table, colour in the plot); offline_rl.py passes its own.
MODELS = (("base", "base (pretrained only)", "grey"), ("sft", "SFT", "tab:blue"), ("dft", "DFT", "tab:orange"))
COMMON = ["data.max_length=512", "train.micro_batch_size=4", "train.global_batch_size=8", "train.warmup_ratio=0.05"]
# Each --losses name: its dft-train overrides, its label and colour. "mix" also gets loss.mix_end = half the
# planned steps (mix_overrides). sft and dft pass loss.prob_floor=0 as replicate always did.
LOSSES = {
    "sft": (["loss.type=sft", "loss.prob_floor=0"], "SFT", "tab:blue"),
    "dft": (["loss.type=dft", "loss.prob_floor=0"], "DFT", "tab:orange"),
    "dft-floor": (["loss.type=dft", "loss.prob_floor=0.1"], "DFT, prob_floor 0.1", "tab:green"),
    "eaft": (["loss.type=eaft"], "EAFT", "tab:red"),
    "asft": (["loss.type=asft"], "ASFT (DFT + KL to the base)", "tab:purple"),
    "mix": (["loss.type=mix"], "mix (SFT to DFT by half the steps)", "tab:brown"),
}
# Column labels: (table header, short label).
BENCH_LABELS = {
    "synthetic": ("in-domain (synthetic test)", "in-domain"),
    "synthetic-ood": ("out-of-domain (synthetic-ood)", "out-of-domain"),
    "synthetic-easy": ("in-domain (synthetic-easy)", "in-domain"),
    "synthetic-easy-ood": ("out-of-domain (synthetic-easy-ood)", "out-of-domain"),
    "synthetic-retention": ("retention (synthetic-retention)", "retention"),
}


@dataclass(frozen=True)
class Task:
    """What --task switches: the pretraining mix, the fine-tuning split and the evaluation."""

    pretrain: tuple[tuple[str, float], ...]  # (synthetic split, share of --pretrain-samples), interleaved
    finetune: str  # synthetic split of the fine-tuning problems
    benchmarks: tuple[str, ...]
    max_new_tokens: int


TASKS = {
    "synthetic": Task((("train", 1.0),), "train", BENCHMARKS, 320),
    # Easy answers are short (easy-ood responses are at most ~70 tokens): 160 leaves room and saves time.
    "easy": Task((("easy-train", 0.6), ("retention-train", 0.2), ("train", 0.2)), "easy-train",
                 ("synthetic-easy", "synthetic-easy-ood", "synthetic-retention"), 160),
}



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


def write_data(out: str, pretrain_n: int, finetune_n: int, task: Task = TASKS["synthetic"]) -> tuple[str, str]:
    from dft_ds import synthetic

    pre = os.path.join(out, "pretrain.jsonl")
    with open(pre, "w", encoding="utf-8") as fh:
        for ex in pretrain_examples(pretrain_n, task):
            # The whole transcript is the "response": next-token loss on every token.
            fh.write(json.dumps({"prompt": "", "response": synthetic._render_chat(ex["prompt"], ex["response"])}) + "\n")
    fine = os.path.join(out, "finetune.jsonl")
    with open(fine, "w", encoding="utf-8") as fh:
        for ex in synthetic.generate_examples(finetune_n, 2002, task.finetune):
            fh.write(json.dumps({"prompt": ex["prompt"], "response": ex["response"]}) + "\n")
    return pre, fine


def pretrain_examples(n: int, task: Task) -> list[dict]:
    """n pretraining examples (data seed 1001): each split's share, interleaved round-robin so every
    stretch of the file (and every packed row) mixes them."""
    from dft_ds import synthetic

    counts = [round(n * share) for _, share in task.pretrain]
    counts[0] += n - sum(counts)
    parts = [synthetic.generate_examples(count, 1001, split) for (split, _), count in zip(task.pretrain, counts)]
    if len(parts) == 1:
        return parts[0]
    # Position i of a part of length c goes at (i + 0.5) / c: an even spread, whatever the shares.
    keyed = [((i + 0.5) / len(part), k, ex) for k, part in enumerate(parts) for i, ex in enumerate(part)]
    return [ex for _, _, ex in sorted(keyed, key=lambda item: item[:2])]


def train(args, run_dir: str, overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.ranks}",
           f"--master-port={free_port()}", "-m", "dft_ds.train", f"train.output_dir={run_dir}",
           "logging.progress_bar=false", "export.hf=true", "checkpoint.keep=1", *overrides]
    sh(cmd, run_dir + ".log")


def evaluate(args, model_dir: str, out_dir: str, benchmarks=BENCHMARKS, max_new_tokens: int = 320) -> dict:
    cmd = [sys.executable, "-m", "dft_ds.eval.cli", "--model", model_dir, "--out", out_dir,
           "--samples", str(args.samples), "--temperature", "1.0", "--max-new-tokens", str(max_new_tokens),
           "--limit", str(args.eval_problems), "--batch-size", "32", "--prompt", "chat", "--no-progress"]
    for bench in benchmarks:
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


def planned_steps(args, overrides: list[str]) -> int:
    """The optimizer steps a fine-tune with these overrides will take: `dft-train --check`'s plan."""
    cmd = [sys.executable, "-m", "dft_ds.train", "--check", "--world-size", str(args.ranks), *overrides]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    match = re.search(r"per epoch; (\d+) steps?;", done.stdout)
    if done.returncode != 0 or match is None:
        sys.exit(f"dft-train --check gave no step count (exit {done.returncode}): {' '.join(cmd)}\n"
                 f"{(done.stdout + done.stderr)[-3000:]}")
    return int(match.group(1))


def loss_overrides(args, loss: str, shared: list[str]) -> list[str]:
    """--losses name -> its overrides; mix turns fully DFT at half the planned steps."""
    overrides = list(LOSSES[loss][0])
    if loss == "mix":
        overrides.append(f"loss.mix_end={max(1, planned_steps(args, [*shared, *overrides]) // 2)}")
    return overrides


def parse_losses(text: str) -> list[str]:
    losses = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in losses if name not in LOSSES]
    if unknown or not losses or len(set(losses)) != len(losses):
        sys.exit(f"--losses {text}: expected distinct names from {', '.join(LOSSES)}, comma separated")
    return losses


def models_for(losses: list[str]) -> tuple:
    """The report's (key, label, colour) rows: the base, then each loss."""
    return (MODELS[0], *((loss, LOSSES[loss][1], LOSSES[loss][2]) for loss in losses))


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
    parser.add_argument("--task", choices=tuple(TASKS), default="synthetic",
                        help="easy: the easy family, with a retention split (issue 18); see the docstring")
    parser.add_argument("--losses", default="sft,dft", help=f"fine-tuning losses, comma separated: {', '.join(LOSSES)}")
    parser.add_argument("--report-only", type=float, default=None, metavar="MINUTES",
                        help="rewrite results.* from an existing --out (the pipeline's wall time in minutes)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    losses = parse_losses(args.losses)
    task = TASKS[args.task]
    out = os.path.abspath(args.out)
    if args.report_only is not None:
        return report(out, seeds, args, args.report_only * 60)
    new_out_dir(out)
    start = time.perf_counter()
    pre_data, fine_data = write_data(out, args.pretrain_samples, args.finetune_samples, task)
    common = COMMON

    print("1. pretrain (next-token loss on whole transcripts, random init)", flush=True)
    base = pretrain(args, out, pre_data)

    print(f"2. fine-tune copies with {', '.join(losses)} at equal compute", flush=True)
    runs = {}
    for seed in seeds:
        for loss in losses:
            run_dir = os.path.join(out, f"{loss}-seed{seed}")
            # Only the loss overrides differ between the runs of one seed.
            shared = [f"model.name_or_path={base}/hf", f"data.source={fine_data}"]
            rest = [f"train.lr={args.finetune_lr}", "train.epochs=1", f"train.seed={seed}", *common]
            own = loss_overrides(args, loss, [f"train.output_dir={run_dir}", *shared, *rest])
            train(args, run_dir, [*shared, *own, *rest])
            runs[(loss, seed)] = run_dir

    print("3. evaluate", flush=True)
    evaluate(args, f"{base}/hf", os.path.join(out, "eval-base"), task.benchmarks, task.max_new_tokens)
    for (loss, seed), run_dir in runs.items():
        evaluate(args, f"{run_dir}/hf", os.path.join(out, f"eval-{loss}-seed{seed}"), task.benchmarks,
                 task.max_new_tokens)
    report(out, seeds, args, time.perf_counter() - start)


def report(out: str, seeds: list[int], args, seconds: float) -> None:
    """Read every eval-*/results.json and run's metrics back; write results.{md,json,png}."""
    losses = parse_losses(args.losses)
    runs = {(loss, seed): os.path.join(out, f"{loss}-seed{seed}") for seed in seeds for loss in losses}
    results = {"base": [json.load(open(os.path.join(out, "eval-base", "results.json")))]}
    for (loss, seed) in runs:
        results.setdefault(loss, []).append(json.load(open(os.path.join(out, f"eval-{loss}-seed{seed}", "results.json"))))
    summary = summarise(results, seeds, args, runs, seconds, TASKS[args.task].benchmarks)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    table = markdown(summary, models_for(losses))
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as fh:
        fh.write(table)
    plot(summary, runs, seeds, os.path.join(out, "results.png"), models_for(losses))
    print(table)
    print(f"wrote {out}/results.md, results.json, results.png")


def summarise(results: dict, seeds: list[int], args, runs: dict, seconds: float, benchmarks=BENCHMARKS) -> dict:
    table = {}
    for model, evals in results.items():
        table[model] = {}
        for bench in benchmarks:
            values = [100 * e["benchmarks"][bench]["avg_at_k"] for e in evals]
            # Samples that end in an extractable answer: the format held, right or wrong.
            answered = [100 * (1 - e["benchmarks"][bench]["no_answer"] / (e["benchmarks"][bench]["problems"] * args.samples))
                        for e in evals]
            table[model][bench] = {"mean": statistics.mean(values),
                                   "sd": statistics.stdev(values) if len(values) > 1 else 0.0, "per_seed": values,
                                   "answered_mean": statistics.mean(answered), "answered_per_seed": answered}
    final = {f"{loss}-seed{seed}": read_metrics(run)[-1] for (loss, seed), run in runs.items()}
    return {"avg_at_k": table, "benchmarks": list(benchmarks), "k": args.samples, "problems": args.eval_problems,
            "seeds": seeds,
            "final_training_metrics": {k: {m: v.get(m) for m in ("loss", "nll", "mean_token_prob")}
                                       for k, v in final.items()},
            "settings": vars(args), "minutes": round(seconds / 60, 1)}


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(summary: dict, models=MODELS) -> str:
    k, seeds = summary["k"], summary["seeds"]
    benchmarks = summary.get("benchmarks", BENCHMARKS)
    rule = "|" + "---|" * (len(benchmarks) + 1)
    lines = [f"Average@{k} (%, temperature 1.0) on {summary['problems']} problems per split; "
             f"{' and '.join(label for key, label, _ in models if key != 'base')}: mean ± "
             f"standard deviation over fine-tuning seeds {', '.join(map(str, seeds))} (per-seed values in brackets); "
             "the base is one model.", "",
             _row(["model", *(BENCH_LABELS[b][0] for b in benchmarks)]), rule]
    for model, label, _ in models:
        cells = []
        for bench in benchmarks:
            c = summary["avg_at_k"][model][bench]
            per = ", ".join(f"{v:.1f}" for v in c["per_seed"])
            cells.append(f"{c['mean']:.1f}" if model == "base" else f"{c['mean']:.1f} ± {c['sd']:.1f} [{per}]")
        lines.append(_row([label, *cells]))
    lines += ["", "Samples that end in an extractable `\\boxed{}` answer (%, right or wrong), mean [per seed]:", "",
              _row(["model", *(BENCH_LABELS[b][1] for b in benchmarks)]), rule]
    for model, label, _ in models:
        label = label.split(" (")[0]
        cells = []
        for bench in benchmarks:
            c = summary["avg_at_k"][model][bench]
            cells.append(f"{c['answered_mean']:.1f} [" + ", ".join(f"{v:.1f}" for v in c["answered_per_seed"]) + "]")
        lines.append(_row([label, *cells]))
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
    benchmarks = summary.get("benchmarks", BENCHMARKS)
    width = min(0.25, 0.8 / len(models))
    for i, (model, _, colour) in enumerate(models):
        for j, bench in enumerate(benchmarks):
            c = summary["avg_at_k"][model][bench]
            x = j + (i - (len(models) - 1) / 2) * width
            ax.bar(x, c["mean"], width, color=colour,
                   label=model.upper() if j == 0 else None)
            ax.scatter([x] * len(c["per_seed"]), c["per_seed"], color="black", s=8, zorder=3)
    ax.set_xticks(range(len(benchmarks)), [BENCH_LABELS[b][1] for b in benchmarks])
    ax.set_ylabel(f"Average@{summary['k']} (%)")
    ax.set_title("accuracy (dots: seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
