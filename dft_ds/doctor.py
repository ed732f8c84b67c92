"""`dft-train --check [CONFIG.yaml] [overrides] [--world-size N]`: everything a run checks before it
starts, without starting it.

Validates the config, reads and tokenises the data, checks tokenizer against model config, renders
the DeepSpeed config for the given world size, looks at the output directory, and prints what the
run would be: samples, rows, tokens, steps, and a rough per-rank memory estimate. No process group,
no weights loaded (the model is built on the meta device only to count parameters), nothing written.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from dft_ds.config import Config, resolve_batch

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
                    torch_adam: bool = False) -> MemoryEstimate:
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
    """
    b = 2 if precision in ("bf16", "fp16") else 4
    opt_bytes = (12 if b == 2 else 8) * n_params
    shard = {3: (world, world, world), 2: (1, world, world), 1: (1, 1, world)}.get(stage, (1, 1, 1))
    params = b * n_params / shard[0]
    grads = b * n_params / shard[1]
    optimizer = 0.0 if offload else opt_bytes / shard[2]
    if offload and stage == 3:
        params = b * n_params / world / 4  # only the layers in flight are on the device; a rough share
    hidden, layers = config.hidden_size, config.num_hidden_layers
    per_layer = 34 * hidden * tokens_per_micro * (b / 2)
    activations = (2 * hidden * b * tokens_per_micro * layers + per_layer) if checkpointing else per_layer * layers
    vocab = config.vocab_size
    if fused:
        loss_head = (chunk_mb << 20) + 4 * vocab * hidden  # one chunk of fp32 logits + the fp32 head gradient
    else:
        loss_head = 3 * 4 * tokens_per_micro * vocab     # logits, log-softmax and its gradient, fp32
    working = b * min(n_params, ZERO3_MAX_LIVE) if stage == 3 else 0.0
    if torch_adam and not offload:
        working += 2 * 4 * n_params / shard[2]
    return MemoryEstimate(params, grads, optimizer, activations, loss_head, working)


def meta_model(model_config):
    """The model class built on the meta device: shapes and structure, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


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


def output_dir_status(cfg: Config) -> str:
    from dft_ds.checkpoint import find_resume
    from dft_ds.train import check_output_dir

    check_output_dir(cfg)  # raises UserError for a directory that is not ours
    path = cfg.train.output_dir
    if not os.path.isdir(path) or not os.listdir(path):
        return f"{path} (new)"
    notes = []
    point = find_resume(cfg.checkpoint.resume, os.path.join(path, "checkpoints"), notes.append)
    if point is None:
        return f"{path} (a dft_ds run without checkpoints: starts from step 0)"
    extra = f"; {'; '.join(notes)}" if notes else ""
    return f"{path} (resumes from {point.tag_dir} at step {point.state['global_step']}{extra})"


def check(cfg: Config, world_size: int, print_=print) -> None:
    """Raise UserError on the first problem a run would hit before training; print the plan otherwise."""
    from dft_ds import engine as eng
    from dft_ds import model as mdl
    from dft_ds.checkpoint import fingerprints
    from dft_ds.data import StepSampler, build_train_data
    from dft_ds.train import choose_fused_head

    out = output_dir_status(cfg)
    plan = resolve_batch(cfg.train, world_size)
    tokenizer = mdl.load_tokenizer(cfg.model)
    model_config = mdl.load_model_config(cfg.model, tokenizer)
    data = build_train_data(cfg.data, tokenizer, cfg.train.seed)
    fingerprints(model_config, tokenizer, data.rows)
    sampler = StepSampler(len(data.rows), plan, 0, cfg.train.seed)
    steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * sampler.steps_per_epoch)
    precision = eng.resolve_precision(cfg.train.precision)
    on_cpu = eng.device().type == "cpu"
    ds_config = eng.render_ds_config(cfg, plan, precision, model_config.hidden_size, on_cpu)
    stage = eng.zero_stage(ds_config)
    offload = "offload_optimizer" in ds_config.get("zero_optimization", {})

    model = meta_model(model_config)
    warnings = []
    fused = choose_fused_head(cfg, model, warnings.append)
    n_params = count_parameters(model)
    mem = estimate_memory(n_params, model_config, stage, world_size, precision,
                          plan.micro_batch_size * cfg.data.max_length, cfg.model.gradient_checkpointing, fused,
                          cfg.loss.chunk_mb, offload, torch_adam=on_cpu)
    ref = ""
    if cfg.loss.type == "asft" and cfg.loss.kl_coef > 0:
        b = 2 if precision in ("bf16", "fp16") else 4
        ref_bytes = b * n_params / (world_size if stage == 3 else 1)
        ref = f"; asft reference model {ref_bytes / GIB:.2f} GiB more"
    lines = [
        "dft-train --check: OK",
        f"  output_dir: {out}",
        f"  data: {data.report.summary()}",
        f"  batch: micro {plan.micro_batch_size} x accumulation {plan.gradient_accumulation_steps} x world "
        f"{world_size} = global {plan.global_batch_size} rows; {sampler.steps_per_epoch} steps per epoch; "
        f"{steps} steps",
        f"  model: {cfg.model.name_or_path}, {n_params / 1e6:.1f}M parameters, vocabulary {model_config.vocab_size}",
        f"  loss: {cfg.loss.type} ({'fused head' if fused else 'full logits'}); precision {precision}; "
        f"DeepSpeed ZeRO-{stage}{' with offload' if offload else ''}",
        f"  memory per rank (rough): {mem.total / GIB:.2f} GiB = parameters {mem.params / GIB:.2f} + gradients "
        f"{mem.grads / GIB:.2f} + optimizer {mem.optimizer / GIB:.2f} + working set {mem.working_set / GIB:.2f} + "
        f"activations {mem.activations / GIB:.2f} "
        f"+ loss head {mem.loss_head / GIB:.2f}{ref}",
    ]
    lines += [f"  warning: {w}" for w in warnings]
    print_("\n".join(lines))
