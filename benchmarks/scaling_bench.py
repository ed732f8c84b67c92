"""Scaling on this machine: tokens/s and per-rank memory at 1 and 2 ranks, and tokens/s against
sequence length, for the tiny default model and a ~100M-parameter Llama.

    .venv/bin/python benchmarks/scaling_bench.py [--steps 8] [--lengths 512,1024,2048,4096]

Every cell is a real `torchrun ... -m dft_ds.train` run (ZeRO-3, fp32, fused head, packed rows,
micro batch 1 row per rank, accumulation 1), training tokens/s from summary.json (set-up excluded)
and the peak RSS of the largest rank. Rows of one length keep the tokens per step fixed per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.common import free_port, run_peak_rss  # noqa: E402




def model_100m(work: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dft_ds import synthetic

    tok = AutoTokenizer.from_pretrained(synthetic.ensure_assets())
    config = synthetic.tiny_model_config(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id)
    config.hidden_size, config.num_hidden_layers, config.vocab_size, config.intermediate_size = 768, 12, 32000, 2048
    config.num_attention_heads = config.num_key_value_heads = 12
    config.head_dim = 64
    config.max_position_embeddings = 4096
    torch.manual_seed(0)
    path = os.path.join(work, "llama-100m")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def cell(model: list[str], ranks: int, length: int, steps: int, out: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
           f"--master-port={free_port()}", "-m", "dft_ds.train", f"train.output_dir={out}", *model,
           f"data.max_length={length}", "train.micro_batch_size=1", "train.gradient_accumulation_steps=1",
           f"train.max_steps={steps}", "train.precision=fp32", "logging.progress_bar=false",
           "logging.tensorboard=false", "checkpoint.save_final=false", "data.synthetic_size=3000"]
    proc, rss = run_peak_rss(cmd)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    summary = json.load(open(os.path.join(out, "summary.json")))
    return {"tokens_per_s": summary["session"]["tokens_per_s"], "rss_mib": rss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lengths", default="512,1024,2048,4096")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="scaling-") as work:
        models = {"tiny (3.4M)": ["model.name_or_path=synthetic", "train.lr=1e-3"],
                  "llama-100m": [f"model.name_or_path={model_100m(work)}"]}
        print(f"{'model':>12} {'ranks':>5} {'length':>6} {'tokens/s':>9} {'max rank RSS MiB':>17}", flush=True)
        for name, model in models.items():
            for ranks, length in [(1, lengths[0])] + [(2, n) for n in lengths]:
                r = cell(model, ranks, length, args.steps, os.path.join(work, f"{len(results)}"))
                results.append({"model": name, "ranks": ranks, "length": length, **r})
                if "error" in r:
                    print(f"{name:>12} {ranks:>5} {length:>6}  {r['error']}", flush=True)
                else:
                    print(f"{name:>12} {ranks:>5} {length:>6} {r['tokens_per_s']:>9.0f} {r['rss_mib']:>17.0f}",
                          flush=True)
    for name in models:
        one = next(r for r in results if r["model"] == name and r["ranks"] == 1 and "error" not in r)
        two = next(r for r in results if r["model"] == name and r["ranks"] == 2 and r["length"] == lengths[0]
                   and "error" not in r)
        print(f"{name}: 2 ranks / 1 rank at {lengths[0]} tokens: tokens/s x{two['tokens_per_s'] / one['tokens_per_s']:.2f}, "
              f"max rank RSS x{two['rss_mib'] / one['rss_mib']:.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
