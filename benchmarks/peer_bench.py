"""dft-train against Hugging Face TRL's SFTTrainer(loss_type="dft") on the same model, data and batch.

    .venv/bin/pip install 'trl>=1.10,<2'      # or: pip install -e '.[peer]'
    .venv/bin/python benchmarks/peer_bench.py [--samples 960] [--ranks 2] [--repeat 1]

Both runs: the same tiny Llama (saved once, same initial weights), the same prompt/response pairs
through the same chat template, prompt tokens masked, no packing, rows of at most 512 tokens,
micro batch 4 per rank x 2 ranks = global 8, one epoch, AdamW (lr 1e-3, betas 0.9/0.95, weight
decay 0.01), cosine schedule with 10% warmup, gradient clipping 1.0, fp32, DeepSpeed ZeRO-3 on
gloo; dft-train started by torchrun, TRL by `accelerate launch` (its own launcher). Pure DFT (no probability floor: TRL has none).

Reported: training tokens/s (dft-train: summary.json; TRL: the dataset's real tokens over its
train_runtime), wall time including start-up, peak RSS of the largest rank, and the two loss curves
(written as JSON and overlaid in peer_bench.png). Ratios are dft-train / TRL from this invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.common import free_port, run_peak_rss  # noqa: E402

LR, WARMUP, MAX_LEN, MICRO = 1e-3, 0.1, 512, 4

TRL_SCRIPT = r'''
import json, os, sys
import datasets, torch
from trl import SFTConfig, SFTTrainer
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, data_path, out_dir, ds_config = sys.argv[1:5]
rows = [json.loads(line) for line in open(data_path)]
ds = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                  "completion": [{"role": "assistant", "content": r["response"]}]} for r in rows])
tok = AutoTokenizer.from_pretrained(model_dir)
args = SFTConfig(output_dir=out_dir, per_device_train_batch_size=%(micro)d, gradient_accumulation_steps=1,
                 num_train_epochs=1, learning_rate=%(lr)r, lr_scheduler_type="cosine", warmup_steps=%(warmup)r,
                 weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0,
                 logging_steps=1, report_to=[], save_strategy="no", max_length=%(max_len)d, packing=False,
                 loss_type="dft", completion_only_loss=True, bf16=False, fp16=False, seed=42,
                 dataloader_drop_last=True, disable_tqdm=True, use_cpu=True)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
result = trainer.train()
if trainer.is_world_process_zero():
    tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
    losses = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    json.dump({"train_runtime": result.metrics["train_runtime"], "tokens": tokens, "losses": losses},
              open(os.path.join(out_dir, "peer_result.json"), "w"))
''' % {"micro": MICRO, "lr": LR, "warmup": WARMUP, "max_len": MAX_LEN}

DS_CONFIG = {
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True,
                                                       "stage3_gather_16bit_weights_on_model_save": False},
    "bf16": {"enabled": False}, "fp16": {"enabled": False}, "zero_allow_untested_optimizer": True,
}



def timed(cmd: list[str], log: str) -> tuple[float, int]:
    start = time.perf_counter()
    proc, rss = run_peak_rss(cmd)
    wall = time.perf_counter() - start
    with open(log, "w", encoding="utf-8") as fh:
        fh.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-3000:]}")
    return wall, rss


def prepare(work: str, samples: int, model: str | None) -> tuple[str, str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dft_ds import synthetic

    if model:
        model_dir = model
    else:
        tok = AutoTokenizer.from_pretrained(synthetic.ensure_assets())
        torch.manual_seed(0)
        config = synthetic.tiny_model_config(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                             pad_token_id=tok.pad_token_id)
        model_dir = os.path.join(work, "model")
        AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    data = os.path.join(work, "data.jsonl")
    with open(data, "w", encoding="utf-8") as fh:
        for ex in synthetic.generate_examples(samples, 7, "train"):
            fh.write(json.dumps({"prompt": ex["prompt"], "response": ex["response"]}) + "\n")
    return model_dir, data


def run_ours(args, work: str, model_dir: str, data: str, i: int) -> dict:
    out = os.path.join(work, f"dft-{i}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.ranks}",
           f"--master-port={free_port()}", "-m", "dft_ds.train", f"train.output_dir={out}",
           f"model.name_or_path={model_dir}", f"data.source={data}", "data.template=chat", "data.packing=false",
           f"data.max_length={MAX_LEN}", f"train.micro_batch_size={MICRO}", "train.gradient_accumulation_steps=1",
           "train.epochs=1", f"train.lr={LR}", f"train.warmup_ratio={WARMUP}", "loss.type=dft", "loss.prob_floor=0",
           "logging.progress_bar=false", "logging.tensorboard=false", "checkpoint.save_final=false",
           "train.precision=fp32"]
    wall, rss = timed(cmd, out + ".log")
    summary = json.load(open(os.path.join(out, "summary.json")))
    losses = [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))]
    return {"wall": wall, "rss": rss, "tokens_per_s": summary["session"]["tokens_per_s"], "losses": losses,
            "tokens": summary["session"]["tokens"]}


def run_trl(args, work: str, model_dir: str, data: str, i: int) -> dict:
    out = os.path.join(work, f"trl-{i}")
    os.makedirs(out)
    script, ds = os.path.join(work, "peer_trl.py"), os.path.join(work, "ds_zero3.json")
    with open(script, "w") as fh:
        fh.write(TRL_SCRIPT)
    with open(ds, "w") as fh:
        json.dump(DS_CONFIG, fh)
    # accelerate's launcher: under plain torchrun on CPU, accelerate's state saw one process.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(args.ranks), "--num_machines",
           "1", "--main_process_port", str(free_port()), "--use_deepspeed", "--deepspeed_config_file", ds,
           "--mixed_precision", "no", script, model_dir, data, out, ds]
    wall, rss = timed(cmd, out + ".log")
    res = json.load(open(os.path.join(out, "peer_result.json")))
    return {"wall": wall, "rss": rss, "tokens_per_s": res["tokens"] / res["train_runtime"], "losses": res["losses"],
            "tokens": res["tokens"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=960)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out", default=None, help="also keep the loss curves and plot here")
    parser.add_argument("--model", default=None,
                        help="a Hugging Face directory of the tiny Llama to start from (default: random init; pure DFT "
                             "from random init collapses, so e.g. the base of benchmarks/replicate.py is the better test)")
    args = parser.parse_args()
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit("TRL is not installed: .venv/bin/pip install 'trl>=1.10,<2' (or pip install -e '.[peer]')")
    results = {"dft-train": [], "trl": []}
    with tempfile.TemporaryDirectory(prefix="peer_bench-") as work:
        model_dir, data = prepare(work, args.samples, args.model)
        for i in range(args.repeat):
            results["dft-train"].append(run_ours(args, work, model_dir, data, i))
            results["trl"].append(run_trl(args, work, model_dir, data, i))
            for name in results:
                r = results[name][-1]
                print(f"{name:>9}: {r['tokens_per_s']:8.0f} tokens/s  wall {r['wall']:6.1f} s  max rank RSS "
                      f"{r['rss'] / 2**20:6.0f} MiB  steps {len(r['losses'])}  tokens {r['tokens']}", flush=True)
    med = {n: {k: statistics.median(r[k] for r in v) for k in ("tokens_per_s", "wall", "rss")}
           for n, v in results.items()}
    ours, peer = med["dft-train"], med["trl"]
    print(f"ratio dft-train / TRL: tokens/s {ours['tokens_per_s'] / peer['tokens_per_s']:.2f}, wall "
          f"{ours['wall'] / peer['wall']:.2f}, max rank RSS {ours['rss'] / peer['rss']:.2f}")
    a, b = dict(results["dft-train"][0]["losses"]), dict(results["trl"][0]["losses"])
    common = sorted(set(a) & set(b))
    diffs = [abs(a[s] - b[s]) / max(abs(b[s]), 1e-12) for s in common]

    def smooth(curve, w=10):  # the two samplers order the same rows differently: compare trends
        return [statistics.mean(curve[max(0, i - w + 1):i + 1]) for i in range(len(curve))]
    sa, sb = smooth([a[s] for s in common]), smooth([b[s] for s in common])
    sdiffs = [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(sa, sb)]
    print(f"loss curves: {len(common)} common steps; step 1: {a[common[0]]:.5f} vs {b[common[0]]:.5f}; "
          f"per-step relative difference median {statistics.median(diffs):.3f}; 10-step moving average: median "
          f"{statistics.median(sdiffs):.3f}, max {max(sdiffs):.3f}; last {sa[-1]:.5f} vs {sb[-1]:.5f}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "peer_bench.json"), "w") as fh:
            json.dump({"median": med, "runs": results}, fh, indent=2)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(common, [a[s] for s in common], label="dft-train")
        ax.plot(common, [b[s] for s in common], "--", label="TRL SFTTrainer(loss_type='dft')")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("DFT loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "peer_bench.png"), dpi=110)


if __name__ == "__main__":
    main()
