"""End-to-end training throughput: the same run with the fused head + loss and with full logits.

    .venv/bin/python benchmarks/train_bench.py [--ranks 2] [--steps 40] [--repeat 2] [--vocab V] [override ...]

Each run is `torchrun --nproc-per-node RANKS -m dft_ds.train` on the embedded default (or whatever
the overrides say, e.g. model.name_or_path=DIR), identical except for loss.fused. `--vocab V`
swaps in the same tiny Llama with a V-row embedding and head (random init, saved as a model
directory; the synthetic tokenizer uses only its first 512 rows) and keeps the embedded default's
training settings: the head's share of the work is then that of a real vocabulary. Runs alternate
(fused, full, fused, full, ...) so that a drift in machine load hits both alike. Reported per run:
training tokens/s from summary.json (set-up excluded) and the peak RSS of the largest rank (from
a wrapper process's RUSAGE_CHILDREN, so each run is measured alone). The median over repeats and
the ratio fused/full are printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.common import free_port, run_peak_rss  # noqa: E402

# Runs the launcher as its child and prints the largest descendant's peak RSS once it is reaped.



def model_with_vocab(vocab: int, workdir: str) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dft_ds import synthetic
    from dft_ds.config import SYNTHETIC_PROFILE

    tok = AutoTokenizer.from_pretrained(synthetic.ensure_assets())
    torch.manual_seed(0)
    config = synthetic.tiny_model_config(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id)
    config.vocab_size = vocab
    path = os.path.join(workdir, f"tiny-vocab{vocab}")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    profile = [f"{sec}.{k}={v}" for sec, vals in SYNTHETIC_PROFILE.items() for k, v in vals.items()]
    return [f"model.name_or_path={path}", *profile]


def one_run(args, fused: str, workdir: str, index: int) -> dict:
    out = os.path.join(workdir, f"run-{fused}-{index}")
    cmd = [sys.executable, "-m", "torch.distributed.run",
           f"--nproc-per-node={args.ranks}", f"--master-port={free_port()}", "-m", "dft_ds.train",
           f"train.output_dir={out}", f"train.max_steps={args.steps}", f"loss.fused={fused}",
           "logging.progress_bar=false", "logging.tensorboard=false", "checkpoint.save_final=false", *args.overrides]
    proc, rss = run_peak_rss(cmd)
    if proc.returncode != 0:
        sys.exit(f"run failed (loss.fused={fused}):\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    return {"tokens_per_s": summary["session"]["tokens_per_s"], "max_rank_rss": rss, "last_loss": summary["run"]["last_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=0, help="tiny Llama with this vocabulary size (0: the default's 512)")
    parser.add_argument("overrides", nargs="*", help="section.key=value passed to every run")
    args = parser.parse_args()
    results = {"true": [], "false": []}
    mib = 1 << 20
    with tempfile.TemporaryDirectory(prefix="train_bench-") as workdir:
        if args.vocab:
            args.overrides = model_with_vocab(args.vocab, workdir) + args.overrides
        print(f"{'run':>4} {'fused':>6} {'tokens/s':>9} {'max rank RSS MiB':>17} {'last loss':>10}", flush=True)
        for i in range(args.repeat):
            for fused in ("true", "false"):
                r = one_run(args, fused, workdir, i)
                results[fused].append(r)
                print(f"{i:>4} {fused:>6} {r['tokens_per_s']:>9.0f} {r['max_rank_rss'] / mib:>17.0f} "
                      f"{r['last_loss']:>10.4f}", flush=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("tokens_per_s", "max_rank_rss")}
           for k, v in results.items()}
    print(f"median tokens/s: fused {med['true']['tokens_per_s']:.0f}, full logits {med['false']['tokens_per_s']:.0f}, "
          f"ratio {med['true']['tokens_per_s'] / med['false']['tokens_per_s']:.3f}")
    print(f"median max rank RSS: fused {med['true']['max_rank_rss'] / mib:.0f} MiB, full logits "
          f"{med['false']['max_rank_rss'] / mib:.0f} MiB, ratio {med['true']['max_rank_rss'] / med['false']['max_rank_rss']:.3f}")


if __name__ == "__main__":
    main()
