"""The paper's offline-RL setting in miniature: sample K answers per training problem from a tiny
pretrained base, keep the correct ones, train DFT and RFT (SFT on the kept samples) from the base
at equal compute, evaluate base / RFT / DFT in domain and out of domain, and write a table.

    .venv/bin/python benchmarks/offline_rl.py [--out runs/offline-rl-mini] [--base DIR] [--seeds 1,2,3]
        [--problems synthetic-train|finetune|pretrain] [--limit 500] [--k 8] [--steps 60] [--lr 3e-4]
        [--eval-problems 100] [--samples 4] [--quick]

Steps (each a real `dft-sample` / `dft-train` / `dft-eval` run; training on 2 ranks, ZeRO-3):
1. the base: replicate.py's pretraining (next-token loss on 6000 whole chat transcripts, data seed
   1001, random init), or `--base DIR`, an HF model directory (e.g. runs/replicate/base/hf) or a run
   directory holding hf/;
2. `dft-sample` K answers (temperature 1.0, `--prompt chat`, as the base was trained) per problem of
   the training-problem benchmark `--problems`:
   - `synthetic-train` (default): the embedded default's training problems (data seed 0), first --limit;
   - `finetune`: replicate.py's fine-tune problems (data seed 2002), written as a benchmark file
     (problem, solution; the gold is the solution's last \\boxed{});
   - `pretrain`: the problems of the base's own pretraining data (data seed 1001), written the same
     way. The easier option: the base has seen these transcripts, so it solves more of them. Use it
     when the other two keep too few samples; it is then no longer "problems the model has not
     seen", and the report says which set was used. (With --base, the base must be replicate's for
     these to be its pretraining problems.)
3. keep the correct ones (dft-sample's default selection: every correct sample that finished);
4. train DFT (loss.type=dft, prob_floor 0) and RFT (loss.type=sft) from the base on that kept file,
   with the same steps, batch (8 samples, unpacked), learning rate and data, once per seed (the seed sets data order);
5. evaluate the base and every trained model as replicate.py does (Average@K, temperature 1.0, on
   `synthetic` and `synthetic-ood`), and write results.md (mean ± spread over seeds, and the sampling
   counts: problems, samples, correct, kept), results.json and results.png.

`--quick` is a smoke run (11.3 min with --base on 2 CPU cores shared with other jobs, mostly the
three evaluations; pretraining on 1500 transcripts adds a few minutes): 60 problems, K=4, 1 seed, 10 steps, 20 evaluation problems, K=2 in evaluation,
--min-kept 1. Its figures mean nothing.

If fewer than --min-kept samples are kept (default 50) the script says so and stops before training
(pass --min-kept 1 to train on what there is). The result is reported whichever way it falls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import replicate  # noqa: E402
from benchmarks.replicate import COMMON, evaluate, markdown, plot, sh, summarise, train  # noqa: E402

MODELS = (("base", "base (pretrained only, the sampler)", "grey"), ("rft", "RFT (SFT loss on kept samples)", "tab:blue"),
          ("dft", "DFT (on the same kept samples)", "tab:orange"))
LOSS_TYPE = {"rft": "sft", "dft": "dft"}
QUICK = {"limit": 60, "k": 4, "seeds": "1", "steps": 10, "eval_problems": 20, "samples": 2,
         "pretrain_samples": 1500, "pretrain_epochs": 1.0, "min_kept": 1}


def hf_dir(path: str) -> str:
    """An HF model directory: PATH itself, or PATH/hf of a run directory."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    if os.path.isfile(os.path.join(path, "hf", "config.json")):
        return os.path.join(path, "hf")
    sys.exit(f"--base {path}: no config.json in it or in its hf/; expected an HF model directory "
             "(e.g. runs/replicate/base/hf)")


def write_problems(out: str, kind: str, n: int) -> str:
    """The --problems benchmark argument for dft-sample: the built-in name, or NAME=FILE written here."""
    if kind == "synthetic-train":
        return "synthetic-train"
    from dft_ds import synthetic

    seed = {"finetune": 2002, "pretrain": 1001}[kind]
    path = os.path.join(out, f"problems-{kind}.jsonl")
    with open(path, "w", encoding="utf-8") as fh:
        for i, ex in enumerate(synthetic.generate_examples(n, seed, "train")):
            fh.write(json.dumps({"id": f"{kind}-{i}", "problem": ex["prompt"], "solution": ex["response"]}) + "\n")
    return f"{kind}={path}"


def sample(args, base_hf: str, benchmark: str, out_dir: str) -> dict:
    cmd = [sys.executable, "-m", "dft_ds.sample", "--model", base_hf, "--benchmark", benchmark,
           "--limit", str(args.limit), "--samples", str(args.k), "--temperature", "1.0", "--prompt", "chat",
           "--max-new-tokens", "320", "--batch-size", "32", "--seed", "0", "--no-progress", "--out", out_dir]
    sh(cmd, out_dir + ".log")
    with open(os.path.join(out_dir, "selection.json"), encoding="utf-8") as fh:
        return json.load(fh)["counts"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/offline-rl-mini")
    parser.add_argument("--base", default=None, metavar="DIR", help="a pretrained HF base; skips pretraining")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--pretrain-samples", type=int, default=6000)
    parser.add_argument("--pretrain-epochs", type=float, default=2.0, help="2, as `make replicate`")
    parser.add_argument("--problems", choices=("synthetic-train", "finetune", "pretrain"), default="synthetic-train")
    parser.add_argument("--limit", type=int, default=500, help="training problems to sample (synthetic-train has 500)")
    parser.add_argument("--k", type=int, default=8, help="samples per training problem")
    parser.add_argument("--min-kept", type=int, default=50)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of each DFT / RFT run (global batch 8)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--eval-problems", type=int, default=100)
    parser.add_argument("--samples", type=int, default=4, help="K of Average@K in evaluation")
    parser.add_argument("--quick", action="store_true", help="a smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--report-only", type=float, default=None, metavar="MINUTES",
                        help="rewrite results.* from an existing --out (the pipeline's wall time in minutes)")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def main() -> None:
    args = parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = os.path.abspath(args.out)
    if args.report_only is not None:
        return report(out, seeds, args, args.report_only * 60)
    replicate.new_out_dir(out)
    start = time.perf_counter()

    if args.base:
        base_hf = hf_dir(args.base)
        print(f"1. base: {base_hf}", flush=True)
    else:
        print("1. pretrain the base (replicate.py's step 1)", flush=True)
        pre_data, _ = replicate.write_data(out, args.pretrain_samples, 0)
        base_hf = replicate.pretrain(args, out, pre_data) + "/hf"

    print(f"2-3. dft-sample K={args.k} on {args.limit} {args.problems} problems, keep the correct", flush=True)
    samples_dir = os.path.join(out, "samples")
    counts = sample(args, base_hf, write_problems(out, args.problems, args.limit), samples_dir)
    print(f"     {counts['problems']} problems, {counts['samples']} samples, {counts['correct']} correct, "
          f"{counts['kept']} kept", flush=True)
    if counts["kept"] < args.min_kept:
        sys.exit(f"only {counts['kept']} samples kept (< --min-kept {args.min_kept}): too few to train on; sample "
                 "more (--limit, --k), try --problems pretrain (the easier set), or pass --min-kept 1")

    print(f"4. train DFT and RFT from the base on the kept samples, {args.steps} steps each", flush=True)
    kept = os.path.join(samples_dir, "train.jsonl")
    for seed in seeds:
        for name, loss in LOSS_TYPE.items():
            # Equal compute: every override is shared; only loss.type and the output directory differ.
            # No packing: the kept set is small (a few hundred samples pack into a few dozen rows), and one
            # sample a row makes a step the same 8 samples for both losses.
            train(args, os.path.join(out, f"{name}-seed{seed}"),
                  [f"model.name_or_path={base_hf}", f"data.source={kept}", f"loss.type={loss}", "loss.prob_floor=0",
                   f"train.lr={args.lr}", f"train.max_steps={args.steps}", f"train.seed={seed}", "data.packing=false",
                   *COMMON])

    print("5. evaluate", flush=True)
    evaluate(args, base_hf, os.path.join(out, "eval-base"))
    for seed in seeds:
        for name in LOSS_TYPE:
            evaluate(args, os.path.join(out, f"{name}-seed{seed}", "hf"), os.path.join(out, f"eval-{name}-seed{seed}"))
    report(out, seeds, args, time.perf_counter() - start)


def report(out: str, seeds: list[int], args, seconds: float) -> None:
    """Read the sampling counts, every eval-*/results.json and run's metrics back; write results.{md,json,png}."""
    runs = {(name, seed): os.path.join(out, f"{name}-seed{seed}") for seed in seeds for name in LOSS_TYPE}
    results = {"base": [json.load(open(os.path.join(out, "eval-base", "results.json")))]}
    for (name, seed) in runs:
        results.setdefault(name, []).append(json.load(open(os.path.join(out, f"eval-{name}-seed{seed}", "results.json"))))
    summary = summarise(results, seeds, args, runs, seconds)
    with open(os.path.join(out, "samples", "selection.json"), encoding="utf-8") as fh:
        selection = json.load(fh)
    summary["sampling"] = {"problems_set": args.problems, "k": args.k, **selection["counts"],
                           "policy": selection.get("policy_text")}
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    c = summary["sampling"]
    text = (f"Sampling from the base ({c['problems_set']} problems, K={c['k']}, temperature 1.0, --prompt chat): "
            f"{c['problems']} problems, {c['samples']} samples, {c['correct']} correct, {c['kept']} kept "
            f"({c['policy']}). RFT and DFT: {args.steps} steps each, global batch 8, lr {args.lr}, from the base, "
            f"on those kept samples.\n\n" + markdown(summary, MODELS))
    if args.quick:
        text = "**Quick mode (a smoke run): these figures mean nothing.**\n\n" + text
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as fh:
        fh.write(text)
    plot(summary, runs, seeds, os.path.join(out, "results.png"), MODELS)
    print(text)
    print(f"wrote {out}/results.md, results.json, results.png")


if __name__ == "__main__":
    main()
