"""`dft-plan`: per-GPU memory of a fine-tuning run, before you book the GPUs.

    dft-plan --model qwen2.5-math-1.5b --nodes 1 --gpus-per-node 8 --gpu-memory 80 --max-length 2048
    dft-plan --model /models/my-llm --gpus-per-node 4 --gpu-memory 24

For a named preset or any Hugging Face config (read, never downloaded here: give a directory), and
a cluster shape, prints per GPU: parameters, gradients, optimizer states, activations (with and
without gradient checkpointing) and loss buffers (fused head and full logits) under ZeRO-2, ZeRO-3
and ZeRO-3 with offload, and the largest micro batch that fits. The formulas are those of
`dft_ds.memory.estimate_memory` (documented there and in docs/benchmarks.md, with the measured
error on CPU runs).

A model directory needs only its config.json (a `dft-convert` output without a tokenizer will do):
the parameters are counted on a meta-device model built from it. Rows longer than the model's
max_position_embeddings get a warning; a shape that cannot be planned (0 nodes, 0 GPUs, rows of 0
tokens, GPUs no larger than the reserve) exits 2 with the option named.
"""

from __future__ import annotations

import argparse
import os
import math
import sys
from dataclasses import dataclass

from dft_ds.errors import UserError
from dft_ds.hub import check_names
from dft_ds.memory import GIB, count_parameters, estimate_memory

# Architecture numbers from the models' published config.json files.
PRESETS: dict[str, dict] = {
    "qwen2.5-math-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                              num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                              max_position_embeddings=4096, tie_word_embeddings=True),
    "qwen2.5-math-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                            num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                            max_position_embeddings=4096, tie_word_embeddings=False),
    "llama-3.2-3b": dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, vocab_size=128256, head_dim=128,
                         max_position_embeddings=131072, tie_word_embeddings=True),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=131072, tie_word_embeddings=False),
    "deepseek-math-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=30,
                             num_attention_heads=32, num_key_value_heads=32, vocab_size=102400,
                             max_position_embeddings=4096, tie_word_embeddings=False),
}

# Not available to tensors: the CUDA context, NCCL buffers and allocator fragmentation.
RESERVE_GIB = 2.0
STRATEGIES = (("ZeRO-2", 2, False), ("ZeRO-3", 3, False), ("ZeRO-3 + offload", 3, True))


def load_model_config(name: str):
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


def lora_counts(config, rank: int, targets: str) -> tuple[int, int]:
    """(all parameters, trainable parameters) of the model with LoRA adapters of this rank."""
    from dft_ds.memory import meta_model
    from dft_ds.model import lora_parameter_count, lora_targets

    model = meta_model(config)
    adapters = lora_parameter_count(model, lora_targets(model, targets), rank)
    return count_parameters(model) + adapters, adapters


def plan(config, world: int, gpu_gib: float, max_length: int, precision: str = "bf16", lora_rank: int = 0,
         lora_targets: str = "all-linear", sequence_parallel: int = 1, mlp_tiles: int = 0,
         offload_activations: bool = False) -> list[Row]:
    """`lora_rank` > 0: model.lora with adapters of that rank on `lora_targets`, embeddings frozen.
    `sequence_parallel` N: each GPU holds 1/N of every row's tokens (train.sequence_parallel)."""
    per_rank = -(-max_length // sequence_parallel)
    n_params, n_trainable = count_parameters(config), None
    if lora_rank:
        n_params, n_trainable = lora_counts(config, lora_rank, lora_targets)
    budget = gpu_gib - RESERVE_GIB
    rows = []
    for name, stage, offload in STRATEGIES:
        for ckpt in (False, True):
            for fused in (True, False):
                def at(micro: int):
                    return estimate_memory(n_params, config, stage, world, precision, micro * per_rank, ckpt, fused,
                                           128, offload, n_trainable=n_trainable, head_trains=not lora_rank,
                                           mlp_tiles=mlp_tiles, offload_activations=offload_activations)
                one = at(1)
                per_row = at(2).total - one.total  # activations and unfused logits grow with the micro batch
                fits = 0 if one.total / GIB > budget else 1 + int((budget * GIB - one.total) // max(per_row, 1))
                rows.append(Row(name, ckpt, fused, one.total / GIB,
                                {k: getattr(one, k) / GIB for k in ("params", "grads", "optimizer", "activations",
                                                                    "loss_head", "working_set")}, fits))
    return rows


# The rows a recommendation tries, fastest first: offload moves every optimizer step through host memory
# and PCIe (slowest), checkpointing recomputes each layer's forward (about a third more compute), ZeRO-3
# gathers every layer's parameters in the forward and again in the backward. The loss head is fused
# (loss.fused=auto).
PREFERENCE = (("ZeRO-2", False), ("ZeRO-3", False), ("ZeRO-2", True), ("ZeRO-3", True),
              ("ZeRO-3 + offload", False), ("ZeRO-3 + offload", True))
CONFIG_NAME = {"ZeRO-2": "zero2", "ZeRO-3": "zero3", "ZeRO-3 + offload": "zero3_offload"}
HEADROOM = 0.9  # a recommended micro batch uses at most this share of what the estimate says fits
MAX_MICRO = 16  # beyond this a larger micro batch buys little; train.gradient_accumulation_steps does the rest
BUSY_TOKENS = 8192  # tokens per micro step that keep a GPU's matrix units busy: the default aim


def _micro(row: Row) -> int:
    """The micro batch recommended for a row: a power of two within HEADROOM of what fits, at most MAX_MICRO."""
    room = max(1, int(row.max_micro_batch * HEADROOM)) if row.max_micro_batch else 0
    return min(MAX_MICRO, 1 << (room.bit_length() - 1)) if room else 0


def host_gib_per_node(n_params: int, n_trainable: int | None, world: int, gpus_per_node: int) -> float:
    """Host memory a node needs under ZeRO-3 offload: its ranks' shares of the fp32 master weights, both
    AdamW moments and the fp32 gradients (16 bytes per trainable parameter), and of the bf16 parameters
    offloaded with them (2 bytes per parameter)."""
    trainable = n_params if n_trainable is None else n_trainable
    return (16 * trainable + 2 * n_params) * gpus_per_node / world / GIB


def recommend(rows: list[Row], max_length: int, want_micro: int | None, host_gib: float) -> str:
    """The settings dft-plan would choose: the fastest row (PREFERENCE) whose recommended micro batch (a
    power of two within HEADROOM of what fits) reaches `want_micro` (default: BUSY_TOKENS tokens), else
    the row with the largest one."""
    want_micro = want_micro or max(1, BUSY_TOKENS // max_length)
    fused = {(r.strategy, r.checkpointing): r for r in rows if r.fused}
    ordered = [fused[key] for key in PREFERENCE if key in fused]
    fitting = [r for r in ordered if r.max_micro_batch]
    if not fitting:
        return (f"recommended: none of these fits one row of {max_length} tokens; lower --max-length "
                "(data.max_length), split each row over GPUs (--sequence-parallel), use more GPUs, or train LoRA "
                "adapters (--lora-rank)")
    chosen = next((r for r in fitting if _micro(r) >= want_micro), max(fitting, key=_micro))
    micro = _micro(chosen)
    why = {("ZeRO-2", False): "no parameter gathering and no recompute",
           ("ZeRO-3", False): "no recompute; ZeRO-2 leaves no room",
           ("ZeRO-2", True): "ZeRO-2 with recompute; without it there is no room",
           ("ZeRO-3", True): "ZeRO-3 with recompute; nothing faster has room",
           ("ZeRO-3 + offload", False): "only with the optimizer in host memory is there room",
           ("ZeRO-3 + offload", True): "only with the optimizer in host memory and recompute is there room",
           }[(chosen.strategy, chosen.checkpointing)]
    target = "" if micro >= want_micro else f" (the aim was {want_micro})"
    host = (f"; needs {host_gib:.1f} GiB of host memory per node for the offloaded optimizer and parameters"
            if "offload" in chosen.strategy else "")
    return (f"recommended: deepspeed.config={CONFIG_NAME[chosen.strategy]} "
            f"model.gradient_checkpointing={str(chosen.checkpointing).lower()} train.micro_batch_size={micro}\n"
            f"  {chosen.strategy} {'with' if chosen.checkpointing else 'without'} checkpointing: {why}; up to "
            f"{chosen.max_micro_batch} rows of {max_length} tokens fit{target}, {micro} keep"
            f" {round(100 * (1 - HEADROOM))}% or more free for what the estimate leaves out{host}. Set "
            "train.global_batch_size as your recipe needs; gradient accumulation makes up the rest.")


def format_count(n: int) -> str:
    """1.54B, 3.40M, 202.05K: a small model is not "0.00B"."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def render(rows: list[Row], n_params: int, world: int, gpu_gib: float, max_length: int,
           n_trainable: int | None = None, sequence_parallel: int = 1, extras: str = "",
           host_gib: float = 0.0, gpus_per_node: int = 1, recommendation: str = "") -> str:
    lora = f" ({format_count(n_trainable)} in LoRA adapters, the only ones that train)" if n_trainable else ""
    sp = sequence_parallel
    split = (f", each split over {sp} GPUs (sequence parallelism: {-(-max_length // sp)} tokens of a row per GPU, "
             f"{world // sp} data-parallel {'rank' if world // sp == 1 else 'ranks'})") if sp > 1 else ""
    lines = [f"{format_count(n_params)} parameters{lora}; {world} {'GPU' if world == 1 else 'GPUs'} of {gpu_gib:g} GiB "
             f"({RESERVE_GIB:g} GiB reserved for "
             f"CUDA context and fragmentation); bf16 weights and gradients, fp32 AdamW states; rows of {max_length} "
             f"{'token' if max_length == 1 else 'tokens'}{split}{extras}. GiB per GPU at micro batch 1:", "",
             "| strategy | checkpointing | loss head | params | grads | optimizer | ZeRO-3 live params | activations "
             "| loss head | total | largest micro batch |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        p = r.parts
        lines.append(f"| {r.strategy} | {'on' if r.checkpointing else 'off'} | {'fused' if r.fused else 'full logits'} "
                     f"| {p['params']:.2f} | {p['grads']:.2f} | {p['optimizer']:.2f} | {p['working_set']:.2f} | {p['activations']:.2f} | "
                     f"{p['loss_head']:.2f} | {r.per_gpu_gib:.2f} | {r.max_micro_batch or 'does not fit'} |")
    host = (f"ZeRO-3 + offload rows keep the optimizer (and parameters) in host memory: {host_gib:.1f} GiB per node "
            f"({gpus_per_node} GPU{'s' if gpus_per_node > 1 else ''})." if host_gib else "")
    after = [line for line in (host, recommendation) if line]
    if after:
        lines += ["", *after]
    return "\n".join(lines)


def _at_least(low: int):
    """An argparse type: an integer >= low, with the value it got in the message."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got '{text}'") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    return parse


def _gpu_memory(text: str) -> float:
    """GiB per GPU: a finite number above the reserve, else no micro batch could ever fit."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GiB per GPU (a number), got '{text}'") from None
    if not math.isfinite(value) or value <= RESERVE_GIB:
        raise argparse.ArgumentTypeError(
            f"expected GiB per GPU above the {RESERVE_GIB:g} GiB reserved for the CUDA context and fragmentation, "
            f"got {text}")
    return value


def length_warning(config, max_length: int) -> str | None:
    """Rows longer than the model was built for: the plan still prints, the run would need longer positions."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit and max_length > limit:
        return (f"dft-plan: warning: --max-length {max_length} is longer than the model's max_position_embeddings "
                f"({limit}); positions past {limit} were never trained (set data.max_length <= {limit}, or extend "
                "the model's context first)")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dft-plan", description=__doc__.splitlines()[0],
                                     epilog="presets: " + ", ".join(PRESETS) + ". Bad values exit 2 with the option "
                                            "named.")
    parser.add_argument("--model", required=True,
                        help="a preset name or a Hugging Face model directory (config.json is enough: the "
                             "parameters are counted from it, weights and tokenizer are not read)")
    parser.add_argument("--nodes", type=_at_least(1), default=1, metavar="N", help="nodes (>= 1; default 1)")
    parser.add_argument("--gpus-per-node", type=_at_least(1), default=8, metavar="G",
                        help="GPUs per node (>= 1; default 8)")
    parser.add_argument("--gpu-memory", type=_gpu_memory, default=80.0, metavar="GIB",
                        help=f"GiB per GPU (default 80); more than the {RESERVE_GIB:g} GiB kept back for the CUDA "
                             "context and fragmentation")
    parser.add_argument("--max-length", type=_at_least(1), default=2048, metavar="T",
                        help="tokens per row (data.max_length; >= 1, default 2048); a warning if longer than the "
                             "model's max_position_embeddings")
    parser.add_argument("--sequence-parallel", type=_at_least(1), default=1, metavar="N",
                        help="train.sequence_parallel: each row split over N GPUs, which must divide the GPUs and "
                             "the model's attention heads (default 1: off)")
    parser.add_argument("--tiled-mlp", type=_at_least(0), default=0, metavar="T",
                        help="model.tiled_mlp: each MLP over T tiles of its tokens (default 0: off)")
    parser.add_argument("--offload-activations", action="store_true",
                        help="model.offload_activations: what the backward waits for is kept in host memory")
    parser.add_argument("--lora-rank", type=_at_least(0), default=0, metavar="R",
                        help="plan model.lora with adapters of rank R (model.lora_rank): only they have gradients "
                             "and optimizer states; 0 (default) is full fine-tuning")
    parser.add_argument("--micro-batch", type=_at_least(1), default=None, metavar="M",
                        help=f"rows per GPU per micro step the recommendation aims for (default: {BUSY_TOKENS} tokens' "
                             "worth, e.g. 4 rows of 2048): it picks the fastest strategy with room for M rows, else "
                             "the one with the most room")
    parser.add_argument("--lora-targets", default="all-linear", metavar="NAMES",
                        help="with --lora-rank: the adapted modules (model.lora_targets; default all-linear)")
    args = parser.parse_args(argv)
    try:
        if args.model.lower() not in PRESETS and not os.path.exists(args.model):
            check_names([("--model", args.model, "model")])  # one probe; offline, only a cached name goes on
    except UserError as exc:
        print(f"dft-plan: error: --model: not a preset ({', '.join(PRESETS)}), and {exc}", file=sys.stderr)
        return 2
    try:
        config = load_model_config(args.model)
    except (OSError, ValueError) as exc:
        print(f"dft-plan: error: --model {args.model}: not a preset ({', '.join(PRESETS)}) and not a readable "
              f"model directory ({exc})", file=sys.stderr)
        return 2
    warning = length_warning(config, args.max_length)
    if warning:
        print(warning, file=sys.stderr)
    world = args.nodes * args.gpus_per_node
    sp = args.sequence_parallel
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", 0) or 0
    kv = getattr(text, "num_key_value_heads", None) or heads
    if world % sp or (heads and heads % sp) or (kv and kv % sp and sp % kv):
        print(f"dft-plan: error: --sequence-parallel {sp}: it must divide the {world} GPUs and the model's {heads} "
              f"attention heads, and divide or be a multiple of its {kv} key/value heads", file=sys.stderr)
        return 2
    try:
        rows = plan(config, world, args.gpu_memory, args.max_length, lora_rank=args.lora_rank,
                    lora_targets=args.lora_targets, sequence_parallel=sp, mlp_tiles=args.tiled_mlp,
                    offload_activations=args.offload_activations)
        n_params, n_trainable = (lora_counts(config, args.lora_rank, args.lora_targets) if args.lora_rank
                                 else (count_parameters(config), None))
    except UserError as exc:
        print(f"dft-plan: error: --lora-targets: {exc}", file=sys.stderr)
        return 2
    extras = (f"; each MLP in {args.tiled_mlp} tiles" if args.tiled_mlp > 1 else "") + \
        ("; activations the backward waits for in host memory" if args.offload_activations else "")
    host = host_gib_per_node(n_params, n_trainable, world, args.gpus_per_node)
    advice = recommend(rows, args.max_length, args.micro_batch, host)
    print(render(rows, n_params, world, args.gpu_memory, args.max_length, n_trainable, sp, extras, host,
                 args.gpus_per_node, advice))
    return 0


if __name__ == "__main__":
    sys.exit(main())
