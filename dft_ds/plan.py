"""`dft-plan`: per-GPU memory of a fine-tuning run, before you book the GPUs.

    dft-plan --model qwen2.5-math-1.5b --nodes 1 --gpus-per-node 8 --gpu-memory 80 --max-length 2048
    dft-plan --model /models/my-llm --gpus-per-node 4 --gpu-memory 24

For a named preset or any Hugging Face config (read, never downloaded here: give a directory), and
a cluster shape, prints per GPU: parameters, gradients, optimizer states, activations (with and
without gradient checkpointing) and loss buffers (fused head and full logits) under ZeRO-2, ZeRO-3
and ZeRO-3 with offload, and the largest micro batch that fits. The formulas are those of
`dft_ds.memory.estimate_memory` (documented there and in docs/benchmarks.md, with the measured
error on CPU runs).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from dft_ds.memory import GIB, count_parameters, estimate_memory

# Architecture numbers from the models' published config.json files.
PRESETS: dict[str, dict] = {
    "qwen2.5-math-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                              num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                              tie_word_embeddings=True),
    "qwen2.5-math-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                            num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                            tie_word_embeddings=False),
    "llama-3.2-3b": dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, vocab_size=128256, head_dim=128,
                         tie_word_embeddings=True),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         tie_word_embeddings=False),
    "deepseek-math-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=30,
                             num_attention_heads=32, num_key_value_heads=32, vocab_size=102400,
                             tie_word_embeddings=False),
}

# Not available to tensors: the CUDA context, NCCL buffers and allocator fragmentation.
RESERVE_GIB = 2.0
STRATEGIES = (("ZeRO-2", 2, False), ("ZeRO-3", 3, False), ("ZeRO-3 + offload", 3, True))


def load_config(name: str):
    from transformers import AutoConfig

    if name.lower() in PRESETS:
        fields = dict(PRESETS[name.lower()])
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    return AutoConfig.from_pretrained(name)


@dataclass
class Row:
    strategy: str
    checkpointing: bool
    fused: bool
    per_gpu_gib: float        # at micro batch 1
    parts: dict
    max_micro_batch: int      # 0: not even one row fits


def plan(config, world: int, gpu_gib: float, max_length: int, precision: str = "bf16") -> list[Row]:
    n_params = count_parameters(config)
    budget = gpu_gib - RESERVE_GIB
    rows = []
    for name, stage, offload in STRATEGIES:
        for ckpt in (False, True):
            for fused in (True, False):
                def at(micro: int):
                    return estimate_memory(n_params, config, stage, world, precision, micro * max_length, ckpt, fused,
                                           128, offload)
                one = at(1)
                per_row = at(2).total - one.total  # activations and unfused logits grow with the micro batch
                fits = 0 if one.total / GIB > budget else 1 + int((budget * GIB - one.total) // max(per_row, 1))
                rows.append(Row(name, ckpt, fused, one.total / GIB,
                                {k: getattr(one, k) / GIB for k in ("params", "grads", "optimizer", "activations",
                                                                    "loss_head", "working_set")}, fits))
    return rows


def render(rows: list[Row], n_params: int, world: int, gpu_gib: float, max_length: int) -> str:
    lines = [f"{n_params / 1e9:.2f}B parameters; {world} GPUs of {gpu_gib:g} GiB ({RESERVE_GIB:g} GiB reserved for "
             f"CUDA context and fragmentation); bf16 weights and gradients, fp32 AdamW states; rows of {max_length} "
             "tokens. GiB per GPU at micro batch 1:", "",
             "| strategy | checkpointing | loss head | params | grads | optimizer | ZeRO-3 live params | activations "
             "| loss head | total | largest micro batch |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        p = r.parts
        lines.append(f"| {r.strategy} | {'on' if r.checkpointing else 'off'} | {'fused' if r.fused else 'full logits'} "
                     f"| {p['params']:.2f} | {p['grads']:.2f} | {p['optimizer']:.2f} | {p['working_set']:.2f} | {p['activations']:.2f} | "
                     f"{p['loss_head']:.2f} | {r.per_gpu_gib:.2f} | {r.max_micro_batch or 'does not fit'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dft-plan", description=__doc__.splitlines()[0],
                                     epilog="presets: " + ", ".join(PRESETS))
    parser.add_argument("--model", required=True, help="a preset name or a Hugging Face model directory")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    parser.add_argument("--max-length", type=int, default=2048, help="tokens per row (data.max_length)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.model)
    except (OSError, ValueError) as exc:
        print(f"dft-plan: error: --model {args.model}: not a preset ({', '.join(PRESETS)}) and not a readable "
              f"model directory ({exc})", file=sys.stderr)
        return 2
    world = args.nodes * args.gpus_per_node
    rows = plan(config, world, args.gpu_memory, args.max_length)
    print(render(rows, count_parameters(config), world, args.gpu_memory, args.max_length))
    return 0


if __name__ == "__main__":
    sys.exit(main())
