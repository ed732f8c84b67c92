"""The Engine seam: a DeepSpeed engine with the few verbs the loop needs, and the engines of a run.

The loop calls `Engine.forward/backward/step/all_reduce_sum/barrier` and never touches
torch.distributed directly. No loss math lives here. Its neighbours: procgroup (the process group
and exit_rank), ds_config (precision and the DeepSpeed config), schedule (the learning rate),
sequence_parallel (train.sequence_parallel), deepspeed_setup (importing DeepSpeed quietly).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace
from typing import Any, Optional

import torch

from dft_ds.deepspeed_setup import fix_arch_list_for_deepspeed, import_muon_eager
from dft_ds.ds_config import reference_ds_config, torch_dtype
from dft_ds.loss import HiddenStatesHead
from dft_ds.procgroup import DistInfo, barrier
from dft_ds.schedule import warmup_cosine
from dft_ds.sequence_parallel import SequenceParallel, sequence_group


def rows_end_to_end(attention: str, batch_rows: int, sequence_parallel: bool = False) -> bool:
    """Whether a micro-batch runs as one row of its rows laid end to end.

    flash_attention_2 reads documents from position-id restarts only in a batch of one row (at more
    rows transformers runs each row as one causal sequence, across its documents). Laid end to end,
    each row starts at position 0, so the rows stay apart as well. While sequence parallelism runs
    (`sequence_parallel`), the exchange does this itself, over the whole rows."""
    return attention == "flash_attention_2" and batch_rows > 1 and not sequence_parallel


def _forward(ds, device, batch: dict[str, torch.Tensor], head=None, sequence: Optional[SequenceParallel] = None):
    """The model's output on a batch; with `head` (loss.FusedHead, loss.HiddenStatesHead) what the head
    returns (model.accept_head). `sequence`: the run's sequence parallelism, if any."""
    kwargs = {} if head is None else {"head": head}
    # No attention_mask: the model builds a block-diagonal causal mask from position_ids restarts.
    input_ids, positions = batch["input_ids"], batch["position_ids"]
    rows, width = input_ids.shape
    flat = rows_end_to_end(getattr(ds.module.config, "_attn_implementation", None), rows,
                           sequence is not None and sequence.active)
    if flat:  # a head views the hidden states back to the rows itself
        input_ids, positions = input_ids.reshape(1, -1), positions.reshape(1, -1)
    out = ds(input_ids=input_ids.to(device, non_blocking=True),
             position_ids=positions.to(device, non_blocking=True), use_cache=False, **kwargs)
    if flat and head is None:
        out.logits = out.logits.view(rows, width, -1)
    return out


class ReferenceEngine:
    """asft's frozen starting model, run forward only, on the same batches as the policy."""

    def __init__(self, model, ds_config: dict[str, Any], sequence: Optional[SequenceParallel] = None):
        import deepspeed

        model.requires_grad_(False)
        self.sequence = sequence
        self.ds, *_ = deepspeed.initialize(model=model, config=ds_config)
        self.ds.eval()
        self.device = self.ds.device
        self.head = model.get_output_embeddings().weight

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor], hidden: bool):
        """Last hidden states (the fused path gathers the head itself) or full logits."""
        if hidden:
            return _forward(self.ds, self.device, batch, HiddenStatesHead(), self.sequence)
        return _forward(self.ds, self.device, batch, sequence=self.sequence).logits

    def head_weight(self, policy_weight):
        """Context manager giving this model's full head weight (a collective under ZeRO-3: every rank
        enters); the policy's is not used."""
        if hasattr(self.head, "ds_id"):
            import deepspeed

            @contextlib.contextmanager
            def gathered():
                with deepspeed.zero.GatheredParameters([self.head], modifier_rank=None):
                    yield self.head
            return gathered()
        return contextlib.nullcontext(self.head)


class AdapterOffReference:
    """asft's reference under model.lora: the policy model itself with its adapters switched off, which
    is exactly the frozen base it started from. No second copy of the weights; one more forward."""

    def __init__(self, engine: "Engine"):
        self.engine = engine

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor], hidden: bool):
        from dft_ds.model import adapters_off

        with adapters_off(self.engine.module):
            if hidden:
                return self.engine.forward(batch, head=HiddenStatesHead())
            return self.engine.forward(batch).logits

    @staticmethod
    def head_weight(policy_weight):
        """The base's head is the policy's: frozen under LoRA (lora_train_embeddings with asft is refused)."""
        return contextlib.nullcontext(policy_weight)


class Engine:
    """A DeepSpeed engine with the few verbs the loop needs.

    With `frozen` parameters (model.lora), checkpoints hold only the trainable ones and their
    optimizer state; the frozen base is rebuilt from its source on resume.
    """

    def __init__(self, model, ds_config: dict, dist: DistInfo, lr_schedule, sequence: SequenceParallel,
                 frozen: bool = False, offload_activations: bool = False):
        """`lr_schedule`: DeepSpeed's lr_scheduler argument (schedule.warmup_cosine); `sequence`: the
        run's sequence parallelism (a group of 1 without it)."""
        import deepspeed

        fix_arch_list_for_deepspeed(dist.rank == 0)
        import_muon_eager(ds_config)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds_config, lr_scheduler=lr_schedule)
        self.dist = dist
        self.device = self.ds.device
        self.frozen = frozen
        self.sp = sequence
        self.offload_activations = offload_activations

    @property
    def is_rank0(self) -> bool:
        return self.dist.is_rank0

    @property
    def module(self):
        """The model DeepSpeed wraps (sharded under ZeRO-3): for generation and for its config."""
        return self.ds.module

    def forward(self, batch: dict[str, torch.Tensor], head=None):
        """The model's output, or with `head` (loss.FusedHead; model.accept_head) what the head returns."""
        return _forward(self.ds, self.device, batch, head, self.sp)

    def offloaded_activations(self):
        """model.offload_activations: the tensors this block's forward saves for the backward wait in
        host memory (pinned on CUDA) until the backward needs them. On CPU they are there already."""
        if not self.offload_activations or self.device.type == "cpu":
            return contextlib.nullcontext()
        return torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda")

    def sequence_parallel(self):
        """The block in which attention runs Ulysses over this rank's group (a no-op at N = 1)."""
        return self.sp.running()

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is already divided by the target tokens of the whole optimizer step on all ranks.
        # DeepSpeed averages gradients over data-parallel ranks, so multiply by the world size to
        # keep a sum, and do not let it divide again by the accumulation steps (scale_wrt_gas).
        self.ds.backward(loss * self.dist.world_size, scale_wrt_gas=False)

    def step(self) -> None:
        """Called after every micro-batch; DeepSpeed steps the optimizer at accumulation boundaries."""
        self.ds.step()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        import deepspeed.comm as comm

        out = values.to(self.device).clone()
        if self.dist.world_size > 1:
            comm.all_reduce(out, op=comm.ReduceOp.SUM)
        return out.cpu()

    def barrier(self) -> None:
        barrier(self.dist.world_size)

    def load_checkpoint(self, directory: str, tag: str) -> None:
        path, _ = self.ds.load_checkpoint(directory, tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True, load_module_strict=not self.frozen)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint at {os.path.join(directory, tag)}")

    def null_backward(self) -> None:
        """A backward that adds exactly zero to every gradient, through a real forward of one 8-token row.

        DeepSpeed (ZeRO-3 in particular) expects a backward for every micro-step before its optimizer
        step; this stands in for a micro-batch whose loss was not finite.
        """
        ids = torch.zeros((1, 8), dtype=torch.long, device=self.device)
        pos = torch.arange(8, device=self.device).unsqueeze(0)
        logits = self.ds(input_ids=ids, position_ids=pos, use_cache=False).logits
        self.ds.backward(logits.float().sum() * 0.0, scale_wrt_gas=False)

    def zero_lr_for_this_step(self) -> None:
        """The optimizer step about to run changes no weight (AdamW's update and decay scale with lr);
        the scheduler sets the next step's rate as usual."""
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0

    def set_peak_lr(self, lr: float) -> None:
        """After a resume with a new peak: rescale the restored schedule to it from the current step on."""
        sched = self.scheduler
        sched.base_lrs = [lr for _ in sched.base_lrs]
        for group, factor in zip(self.optimizer.param_groups, sched.lr_lambdas):
            group["lr"] = lr * factor(sched.last_epoch)

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    @property
    def grad_norm(self) -> Optional[float]:
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def save_checkpoint(self, directory: str, tag: str) -> None:
        # save_latest=False: dft_ds writes `latest` itself, atomically, once every rank has finished.
        self.ds.save_checkpoint(directory, tag=tag, save_latest=False, exclude_frozen_parameters=self.frozen)

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        """No dropout (held-out loss); train() turns it back on."""
        self.ds.eval()


def build_engines(plan, dist: DistInfo) -> tuple["Engine", Optional[ReferenceEngine]]:
    """The policy engine of a RunPlan (dft_ds.runplan), and asft's frozen reference when the loss uses one.

    Both are built from the same seeded init (or the same pretrained weights): the reference is the
    starting model, never a checkpoint.
    """
    from dft_ds import model as mdl

    cfg, dtype = plan.cfg, torch_dtype(plan.precision)
    model, keepalive = mdl.build_model(cfg.model, plan.model_config, plan.ds_config, dtype, cfg.train.seed,
                                       attention=plan.attention)
    lora = cfg.model.lora
    if lora:
        base = plan.lora_base
        if base.written_here and not os.path.isdir(base.path):  # the random-init base, once per run
            mdl.save_base(model, plan.tokenizer, base.path, dist.is_rank0)
        mdl.apply_lora(model, cfg.model, cfg.train.seed)
    if plan.fused:
        mdl.accept_head(model)
    if cfg.model.tiled_mlp:
        mdl.apply_tiled_mlp(model, cfg.model.tiled_mlp)
    sequence = SequenceParallel(sequence_group(dist, cfg.train.sequence_parallel))
    if sequence.size > 1:
        sequence.install(plan.attention)
    schedule = warmup_cosine(plan.total_steps, cfg.train.warmup_ratio, cfg.train.min_lr_ratio)
    engine = Engine(model, plan.ds_config, dist, schedule, sequence, frozen=lora,
                    offload_activations=cfg.model.offload_activations)
    del keepalive
    reference = None
    if cfg.loss.uses_reference and lora:
        reference = AdapterOffReference(engine)
    elif cfg.loss.uses_reference:
        ref_config = reference_ds_config(plan.ds_config)
        ref_model, keepalive = mdl.build_model(replace(cfg.model, gradient_checkpointing=False),
                                               plan.model_config, ref_config, dtype, cfg.train.seed,
                                               attention=plan.attention)
        if plan.fused:
            mdl.accept_head(ref_model)
        reference = ReferenceEngine(ref_model, ref_config, sequence)
        del keepalive
    return engine, reference
