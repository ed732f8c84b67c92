"""The per-rank memory model behind `dft-plan` and `dft-train --check`, and the advice a run prints
when a step runs out of memory. Shapes only: models are built on the meta device, nothing is
allocated and DeepSpeed is not imported.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30


@dataclass
class MemoryEstimate:
    """Bytes per rank, by kind; a planning figure (within tens of percent), not a measurement."""

    params: float
    grads: float
    optimizer: float
    activations: float
    loss_head: float
    working_set: float = 0.0  # ZeRO-3's gathered parameters in flight; optimizer temporaries

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.loss_head + self.working_set


# DeepSpeed's stage3_max_live_parameters in ds_configs/zero3*.json: how many gathered parameters ZeRO-3
# may keep in flight between uses (it releases them only past stage3_max_reuse_distance).
ZERO3_MAX_LIVE = 1e9


def estimate_memory(n_params: int, config, stage: int, world: int, precision: str, tokens_per_micro: int,
                    checkpointing: bool, fused: bool, chunk_mb: int, offload: bool,
                    torch_adam: bool = False, n_trainable: int | None = None,
                    head_trains: bool = True, mlp_tiles: int = 0,
                    offload_activations: bool = False, scores_for: tuple[int, int] | None = None,
                    sequence_parallel: int = 1) -> MemoryEstimate:
    """Per-rank bytes on the accelerator (on CPU: host memory) of one training step.

    Weights and gradients in the training precision; AdamW keeps two fp32 moments, plus an fp32
    master copy when training in 16 bits. ZeRO-3 shards all three over ranks, ZeRO-2 the gradients
    and optimizer states, ZeRO-1 the optimizer states. Offload moves optimizer states (and under
    ZeRO-3 the parameters) to host memory. ZeRO-3 also keeps gathered parameters in flight, up to
    stage3_max_live_parameters of them (all of a model below 1e9 parameters). `torch_adam` (the CPU
    path; GPUs use DeepSpeed's fused Adam) adds the foreach implementation's temporaries, about two
    fp32 copies of the rank's partition. Activations: about 34 x hidden bytes per token per layer
    in 16 bits with a fused attention kernel (Korthikanti et al., 2022), twice that in fp32; with
    checkpointing only each layer's input is kept, plus one layer's full activations.

    `n_trainable` (model.lora: adapters, plus embeddings when they train): only these have gradients,
    optimizer states and optimizer temporaries; `n_params` counts them too. `head_trains=False`: the
    fused head computes no head gradient.

    Long rows (docs/long_sequences.md): `tokens_per_micro` is what one rank holds (1/N of each row
    under sequence parallelism). `mlp_tiles` (model.tiled_mlp): the MLP's share of a layer's
    activations, 19 of the 34 x hidden bytes in that account, exists for one tile at a time.
    `offload_activations`: what the backward waits for (every layer's input with checkpointing,
    every layer's activations without) is in host memory; the device keeps the layer at work.

    `scores_for` (rows, tokens per row): an attention that materializes its score matrices (eager, and
    sdpa's math kernel, the one the CPU runs) adds 5 x heads x row^2 bytes per row and layer in 16 bits
    (the scores, their softmax and what the backward keeps; Korthikanti et al.'s 5as^2b term), twice that
    in fp32; a rank of `sequence_parallel` N holds 1/N of the heads of whole rows. Fused kernels (flash,
    memory-efficient) keep none. Measured on CPU (benchmarks/plan_check.py): without it the estimate
    was 14-22% low, the missing part the size of this term.
    """
    b = 2 if precision in ("bf16", "fp16") else 4
    trainable = n_params if n_trainable is None else n_trainable
    opt_bytes = (12 if b == 2 else 8) * trainable
    shard = {3: (world, world, world), 2: (1, world, world), 1: (1, 1, world)}.get(stage, (1, 1, 1))
    params = b * n_params / shard[0]
    grads = b * trainable / shard[1]
    optimizer = 0.0 if offload else opt_bytes / shard[2]
    if offload and stage == 3:
        params = b * n_params / world / 4  # only the layers in flight are on the device; a rough share
    hidden, layers = config.hidden_size, config.num_hidden_layers
    per_layer = 34 * hidden * tokens_per_micro * (b / 2)
    if mlp_tiles > 1:
        per_layer *= (15 + 19 / mlp_tiles) / 34
    if scores_for:
        rows, length = scores_for
        heads = max(1, config.num_attention_heads // sequence_parallel)
        per_layer += 5 * heads * length * length * rows * (b / 2)
    stored = 2 * hidden * b * tokens_per_micro * layers if checkpointing else per_layer * (layers - 1)
    activations = per_layer + (0 if offload_activations else stored)
    vocab = config.vocab_size
    if fused:
        # one chunk of fp32 logits + the fp32 head gradient (none for a frozen head)
        loss_head = (chunk_mb << 20) + (4 * vocab * hidden if head_trains else 0)
    else:
        loss_head = 3 * 4 * tokens_per_micro * vocab     # logits, log-softmax and its gradient, fp32
    working = b * min(n_params, ZERO3_MAX_LIVE) if stage == 3 else 0.0
    if torch_adam and not offload:
        working += 2 * 4 * trainable / shard[2]
    return MemoryEstimate(params, grads, optimizer, activations, loss_head, working)


def materializes_scores(attention: str, on_cpu: bool) -> bool:
    """Whether this attention keeps [row x row] score matrices per head: eager always, sdpa on the CPU
    (its math kernel); sdpa's fused kernels and flash-attention on a GPU do not."""
    return attention == "eager" or (attention == "sdpa" and on_cpu)


def meta_model(model_config, trust_remote_code: bool = False):
    """The model class built on the meta device: shapes and structure, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)


def count_parameters(model_or_config) -> int:
    """Parameters of a model (or of the model a config describes), tied weights counted once."""
    import torch

    model = model_or_config if isinstance(model_or_config, torch.nn.Module) else meta_model(model_or_config)
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    text = str(exc)
    return (isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text.lower()
            or "can't allocate memory" in text)


def out_of_memory_advice(exc: BaseException, step: int, cfg, stage: int, fused: bool) -> str:
    """What ran out, the shape of a step of this run (`cfg`: its Config), and the settings that make it smaller."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"out of memory in training step {step} ({first}). A step here is "
            f"train.micro_batch_size={cfg.train.micro_batch_size} rows x data.max_length={cfg.data.max_length} tokens, "
            f"ZeRO stage {stage}, model.gradient_checkpointing={str(cfg.model.gradient_checkpointing).lower()}, "
            f"loss head {'fused' if fused else 'full logits'}. To fit: lower train.micro_batch_size (keep "
            "train.global_batch_size: accumulation grows to match); lower data.max_length; set "
            "model.gradient_checkpointing=true; use deepspeed.config=zero3, or zero3_offload to keep optimizer "
            "states and parameters in host memory; keep loss.fused=auto (or lower loss.chunk_mb). "
            "The last checkpoint is untouched.")
