"""The paper in miniature under LoRA: DFT-LoRA against SFT-LoRA at several learning rates.

    .venv/bin/python benchmarks/lora_sweep.py [--out runs/lora-sweep] [--lr 3e-4] [--lr-multipliers 1,3,10]
        [--seed 1] [--lora-rank 16] [--base DIR] [--pretrain-samples 6000] [--pretrain-epochs 2]
        [--finetune-samples 3000] [--eval-problems 50] [--samples 4] [--full-reference]

The pipeline of benchmarks/replicate.py (its data, pretraining and evaluation functions), with the
fine-tuning step swapped for a sweep:
1. pretrain the tiny base exactly as replicate.py does (or reuse one: --base DIR, a Hugging Face
   directory such as runs/replicate/base/hf);
2. for every multiplier m and for loss.type in (sft, dft): fine-tune the base with model.lora=true
   (all-linear, rank 16, alpha 32) at lr = m x --lr, one seed, the same 80 steps and batch as
   replicate.py, with the held-out NLL (eval.loss_every) on 200 in-domain test problems not
   evaluated below; --full-reference adds full fine-tuning at 1x for both losses;
3. merge each run's adapters into the base (W + alpha/r * B @ A, fp32) and evaluate the merged model
   with replicate.py's Average@K in domain and out of domain;
4. write sweep.md / sweep.json: per (loss, lr) final training loss and NLL, held-out NLL and mean
   token probability, and accuracy.

The 1x lr is replicate.py's full fine-tuning lr (3e-4), so the sweep reads as "how much higher than
full fine-tuning does LoRA want", the usual question when switching a recipe to adapters.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.common import free_port  # noqa: E402
from benchmarks.replicate import BENCHMARKS, evaluate, read_metrics, sh, write_data  # noqa: E402

COMMON = ["data.max_length=512", "train.micro_batch_size=4", "train.global_batch_size=8", "train.warmup_ratio=0.05"]
HELDOUT_PROBLEMS = 200


def train(args, run_dir: str, overrides: list[str]) -> None:
    # export.hf is off: dft-convert does not merge LoRA checkpoints yet, merge_adapters() below does.
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.ranks}",
           f"--master-port={free_port()}", "-m", "dft_ds.train", f"train.output_dir={run_dir}",
           "logging.progress_bar=false", "logging.tensorboard=false", "checkpoint.keep=1", *overrides]
    sh(cmd, run_dir + ".log")


def write_heldout(out: str) -> str:
    from dft_ds import synthetic

    path = os.path.join(out, "heldout.jsonl")
    with open(path, "w", encoding="utf-8") as fh:
        # In-domain test-split problems of a seed the evaluation does not draw.
        for ex in synthetic.generate_examples(HELDOUT_PROBLEMS, 3003, "test"):
            fh.write(json.dumps({"prompt": ex["prompt"], "response": ex["response"]}) + "\n")
    return path


def latest_checkpoint(run_dir: str) -> tuple[str, str]:
    root = os.path.join(run_dir, "checkpoints")
    with open(os.path.join(root, "latest"), encoding="utf-8") as fh:
        return root, fh.read().strip()


def merge_adapters(run_dir: str, base: str, rank: int, alpha: float, out_dir: str) -> None:
    """The base with the run's final adapters folded in, as a Hugging Face directory (fp32)."""
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM

    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        root, tag = latest_checkpoint(run_dir)
        adapters = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    state = model.state_dict()
    scale = alpha / rank
    merged = 0
    for key, a in adapters.items():
        if not key.endswith(".lora_A.default.weight"):
            continue
        prefix = key[: -len(".lora_A.default.weight")]
        b = adapters[prefix + ".lora_B.default.weight"]
        state[prefix + ".weight"] += scale * (b.float() @ a.float())
        merged += 1
    if not merged:
        sys.exit(f"{run_dir}: no LoRA adapters in checkpoint {tag}")
    model.load_state_dict(state)
    shutil.copytree(base, out_dir)  # tokenizer, chat template, generation config
    model.save_pretrained(out_dir)


def last_heldout(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "heldout.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return rows[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/lora-sweep")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-4, help="the 1x learning rate (replicate.py's full-FT lr)")
    parser.add_argument("--lr-multipliers", default="1,3,10")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=32.0)
    parser.add_argument("--base", default=None, help="a pretrained Hugging Face directory; default: pretrain one")
    parser.add_argument("--pretrain-samples", type=int, default=6000)
    parser.add_argument("--pretrain-epochs", type=float, default=2.0)
    parser.add_argument("--finetune-samples", type=int, default=3000)
    parser.add_argument("--eval-problems", type=int, default=50)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--heldout-every", type=int, default=40, help="eval.loss_every of the fine-tuning runs")
    parser.add_argument("--full-reference", action="store_true", help="also full fine-tuning at 1x, both losses")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="steps 3-4 on an existing --out whose fine-tuned runs are done (e.g. with fewer --eval-problems)")
    parser.add_argument("--report-only", action="store_true", help="rewrite sweep.* from an existing --out")
    args = parser.parse_args()
    mults = [float(m) for m in args.lr_multipliers.split(",")]
    out = os.path.abspath(args.out)
    cells = [(loss, m, True) for m in mults for loss in ("sft", "dft")]
    if args.full_reference:
        cells += [(loss, 1.0, False) for loss in ("sft", "dft")]
    if args.report_only:
        return report(out, cells, args, None)
    if args.evaluate_only:
        return evaluate_all(args, out, cells, args.base or os.path.join(out, "base", "hf"), time.perf_counter())
    if os.path.exists(out) and os.listdir(out):
        sys.exit(f"{out} exists and is not empty; choose a new --out")
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    pre_data, fine_data = write_data(out, args.pretrain_samples, args.finetune_samples)
    heldout = write_heldout(out)

    if args.base:
        base = os.path.abspath(args.base)
    else:
        print("1. pretrain (next-token loss on whole transcripts, random init)", flush=True)
        train(args, os.path.join(out, "base"), [f"data.source={pre_data}", "data.template=plain", "loss.type=sft",
                                                "train.lr=1e-3", f"train.epochs={args.pretrain_epochs}",
                                                "train.seed=0", "export.hf=true", *COMMON])
        base = os.path.join(out, "base", "hf")

    print("2. fine-tune: " + ", ".join(cell_name(*c) for c in cells), flush=True)
    for loss, m, lora in cells:
        run_dir = os.path.join(out, cell_name(loss, m, lora))
        lora_args = ["model.lora=true", f"model.lora_rank={args.lora_rank}", f"model.lora_alpha={args.lora_alpha}",
                     "export.hf=false"] if lora else ["export.hf=true"]
        train(args, run_dir, [f"model.name_or_path={base}", f"data.source={fine_data}", f"loss.type={loss}",
                              "loss.prob_floor=0", f"train.lr={m * args.lr:g}", "train.epochs=1",
                              f"train.seed={args.seed}", f"data.eval_source={heldout}",
                              f"eval.loss_every={args.heldout_every}", *lora_args, *COMMON])
        if lora:
            merge_adapters(run_dir, base, args.lora_rank, args.lora_alpha, os.path.join(run_dir, "hf"))

    evaluate_all(args, out, cells, base, start)


def evaluate_all(args, out: str, cells: list, base: str, start: float) -> None:
    print("3. evaluate", flush=True)
    evaluate(args, os.path.abspath(base), os.path.join(out, "eval-base"))
    for loss, m, lora in cells:
        name = cell_name(loss, m, lora)
        evaluate(args, os.path.join(out, name, "hf"), os.path.join(out, f"eval-{name}"))
    report(out, cells, args, time.perf_counter() - start, "evaluation" if args.evaluate_only else "whole sweep")


def cell_name(loss: str, mult: float, lora: bool) -> str:
    return f"{loss}-{'lora' if lora else 'full'}-lr{mult:g}x"


def report(out: str, cells: list, args, seconds, what: str = "whole sweep") -> None:
    rows = []
    base_eval = json.load(open(os.path.join(out, "eval-base", "results.json")))
    for loss, m, lora in cells:
        name = cell_name(loss, m, lora)
        final = [r for r in read_metrics(os.path.join(out, name)) if r.get("loss") is not None][-1]
        held = last_heldout(os.path.join(out, name))
        ev = json.load(open(os.path.join(out, f"eval-{name}", "results.json")))
        rows.append({"cell": name, "loss_type": loss, "lora": lora, "lr": m * args.lr, "lr_multiplier": m,
                     "step": final["step"], "train_loss": final["loss"], "train_nll": final["nll"],
                     "train_mean_p": final["mean_token_prob"], "heldout_nll": held["nll"],
                     "heldout_mean_p": held["mean_token_prob"],
                     **{f"acc_{b}": 100 * ev["benchmarks"][b]["avg_at_k"] for b in BENCHMARKS}})
    base_acc = {b: 100 * base_eval["benchmarks"][b]["avg_at_k"] for b in BENCHMARKS}
    summary = {"rows": rows, "base_avg_at_k": base_acc, "settings": vars(args),
               "minutes": round(seconds / 60, 1) if seconds else None}
    with open(os.path.join(out, "sweep.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    lines = [f"LoRA r={args.lora_rank} alpha={args.lora_alpha:g} all-linear, seed {args.seed}; 1x lr = {args.lr:g}; "
             f"Average@{args.samples} (%, temperature 1.0) on {args.eval_problems} problems per split; held-out: "
             f"{HELDOUT_PROBLEMS} in-domain test problems at the last step.", "",
             "| loss | tuning | lr | final train loss | final train NLL | held-out NLL | held-out mean p | "
             "in-domain Avg@K | out-of-domain Avg@K |", "|---|---|---|---|---|---|---|---|---|",
             f"| base | - | - | - | - | - | - | {base_acc[BENCHMARKS[0]]:.1f} | {base_acc[BENCHMARKS[1]]:.1f} |"]
    for r in rows:
        lines.append(f"| {r['loss_type'].upper()} | {'LoRA' if r['lora'] else 'full'} | {r['lr_multiplier']:g}x "
                     f"({r['lr']:.0e}) | {r['train_loss']:.3f} | {r['train_nll']:.3f} | {r['heldout_nll']:.3f} | "
                     f"{r['heldout_mean_p']:.3f} | {r[f'acc_{BENCHMARKS[0]}']:.1f} | {r[f'acc_{BENCHMARKS[1]}']:.1f} |")
    if seconds:
        lines += ["", f"Wall time for the {what}: {seconds / 60:.1f} min."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "sweep.md"), "w", encoding="utf-8") as fh:
        fh.write(text)
    print(text)
    print(f"wrote {out}/sweep.md, sweep.json")


if __name__ == "__main__":
    main()
