"""How far is the memory planner (`dft-plan`, `dft-train --check`) from measured per-rank memory?

    .venv/bin/python benchmarks/plan_check.py [--steps 3] [--ranks 1,2] [--hidden 768] [--layers 12] [--checkpointing]

For a ~100M-parameter Llama (fp32, ZeRO-3, rows of 512 tokens, micro batch 2, fused head) on this
CPU: the peak RSS of the largest rank in a short real run, minus the peak RSS of the SAME command
with a near-empty model (1 layer, hidden 32): what is left is what the model, its gradients,
optimizer states, activations and loss head cost. Compared with `dft_ds.memory.estimate_memory`
at 1 and 2 ranks; the relative error is printed.
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

MIB = 1 << 20



def model_dir(work: str, name: str, hidden: int, layers: int, vocab: int) -> tuple[str, object]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dft_ds import synthetic

    tok = AutoTokenizer.from_pretrained(synthetic.ensure_assets())
    config = synthetic.tiny_model_config(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id)
    config.hidden_size, config.num_hidden_layers, config.vocab_size = hidden, layers, vocab
    config.intermediate_size = hidden * 8 // 3 // 64 * 64 or 64
    config.num_attention_heads = config.num_key_value_heads = max(1, hidden // 64)
    config.head_dim = hidden // config.num_attention_heads
    torch.manual_seed(0)
    path = os.path.join(work, name)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path, config


def peak_rss(path: str, ranks: int, steps: int, out: str, checkpointing: bool = False) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
           f"--master-port={free_port()}", "-m", "dft_ds.train", f"train.output_dir={out}",
           f"model.name_or_path={path}", "data.max_length=512", "train.micro_batch_size=2",
           "train.gradient_accumulation_steps=1", f"train.max_steps={steps}", "train.precision=fp32",
           "logging.progress_bar=false", "logging.tensorboard=false", "checkpoint.save_final=false",
           "data.synthetic_size=600", f"model.gradient_checkpointing={str(checkpointing).lower()}"]
    proc, rss = run_peak_rss(cmd)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    return rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--checkpointing", action="store_true", help="model.gradient_checkpointing=true")
    args = parser.parse_args()
    from dft_ds.memory import count_parameters, estimate_memory

    rows = []
    with tempfile.TemporaryDirectory(prefix="plan_check-") as work:
        big, config = model_dir(work, "big", args.hidden, args.layers, args.vocab)
        empty, _ = model_dir(work, "empty", 32, 1, 512)
        n = count_parameters(config)
        print(f"model: {n / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}); "
              f"fp32, ZeRO-3, micro batch 2 x 512 tokens, fused head, checkpointing {'on' if args.checkpointing else 'off'}",
              flush=True)
        print(f"{'ranks':>5} {'measured MiB':>13} {'estimate MiB':>13} {'error':>7}   (measured = model run - empty-model run)")
        for ranks in (int(r) for r in args.ranks.split(",")):
            base = peak_rss(empty, ranks, args.steps, os.path.join(work, f"empty-{ranks}"), args.checkpointing)
            full = peak_rss(big, ranks, args.steps, os.path.join(work, f"big-{ranks}"), args.checkpointing)
            measured = full - base
            est = estimate_memory(n, config, 3, ranks, "fp32", 2 * 512, args.checkpointing, True, 128, False, torch_adam=True,
                                  scores_for=(2, 512))  # sdpa's math kernel on the CPU
            error = (est.total - measured) / measured
            rows.append({"ranks": ranks, "measured": measured, "estimate": est.total, "error": error,
                         "parts": {k: getattr(est, k) for k in ("params", "grads", "optimizer", "activations",
                                                                "loss_head", "working_set")}})
            print(f"{ranks:>5} {measured / MIB:>13.0f} {est.total / MIB:>13.0f} {100 * error:>6.0f}%", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
