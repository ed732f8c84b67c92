"""What a run decides before any process group or weights exist, computed once by `build_plan`.

`dft-train` builds its run from the plan, and `dft-train --check` prints the same plan, so what
--check says (batch, steps, resume point, loss head, precision, DeepSpeed config) is what the run
does. Nothing here starts a process or writes a file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from dft_ds import checkpoint as ckpt
from dft_ds import rundir
from dft_ds.batch import BatchSplit, resolve_batch
from dft_ds.config import SYNTHETIC, Config, to_dict
from dft_ds.errors import ConfigError, DataError, ModelError, counted
from dft_ds.hub import check_hub_names
from dft_ds.memory import GIB
from dft_ds.model import BASE_DIR


@dataclass(frozen=True)
class LoraBase:
    """Where a LoRA run's frozen base weights live: the pretrained model.name_or_path, or for the
    embedded default the random-init model that the run writes once to output_dir/base/."""

    path: str
    written_here: bool


@dataclass
class RunPlan:
    cfg: Config
    world_size: int
    batch: BatchSplit
    resume: Optional[ckpt.CheckpointRef]
    tokenizer: Any
    model_config: Any
    data: Any  # dft_ds.data.TrainData
    fingerprints: dict[str, str]
    steps_per_epoch: int
    total_steps: int
    precision: str
    on_cpu: bool
    ds_config: dict[str, Any]
    fused: bool
    n_params: int
    attention: str = "sdpa"   # the attention kernel the model runs (model.choose_attention)
    heldout: Any = None       # TrainData of data.eval_source / data.eval_fraction, or None
    changed: list[str] = field(default_factory=list)   # settings a resume changes ('key changed from a to b')
    warnings: list[str] = field(default_factory=list)
    lora_targets: list[str] = field(default_factory=list)  # model.lora: the resolved target modules
    n_trainable: Optional[int] = None  # model.lora: adapter (+ embedding) parameters; None: all train

    @property
    def start_step(self) -> int:
        return self.resume.step if self.resume is not None else 0

    @property
    def complete(self) -> bool:
        """The run directory already holds a run these settings do not extend: nothing to train."""
        return self.resume is not None and self.start_step >= self.total_steps

    @property
    def load_universal(self) -> bool:
        """A resume on another world size loads through DeepSpeed's universal checkpoint format."""
        return self.resume is not None and self.resume.world_size != self.world_size

    @property
    def offload(self) -> bool:
        """The DeepSpeed config keeps optimizer states (and under ZeRO-3 parameters) in host memory."""
        return "offload_optimizer" in self.ds_config.get("zero_optimization", {})

    @property
    def zero_stage(self) -> int:
        from dft_ds.ds_config import zero_stage

        return zero_stage(self.ds_config)

    def sampler(self, rank: int):
        from dft_ds.data import StepSampler

        # The ranks of a sequence-parallel group take the same rows (each its slice of them).
        return StepSampler(len(self.data.rows), self.batch, rank // self.cfg.train.sequence_parallel,
                           self.cfg.train.seed)

    @property
    def lora_base(self) -> Optional[LoraBase]:
        m = self.cfg.model
        if not m.lora:
            return None
        if m.name_or_path == SYNTHETIC:
            return LoraBase(os.path.abspath(os.path.join(self.cfg.train.output_dir, BASE_DIR)), True)
        return LoraBase(m.name_or_path, False)

    def lora_record(self) -> Optional[dict[str, Any]]:
        """model.lora as a checkpoint records it: what dft-convert needs to merge or write the adapter."""
        m = self.cfg.model
        if not m.lora:
            return None
        return {"rank": m.lora_rank, "alpha": m.lora_alpha, "dropout": m.lora_dropout, "targets": self.lora_targets,
                "train_embeddings": m.lora_train_embeddings, "base": self.lora_base.path,
                "trainable_parameters": self.n_trainable}

    def checkpoint_record(self) -> dict[str, Any]:
        """What every checkpoint of this run records beside its step and sampler position."""
        out = {"world_size": self.world_size, "global_batch_size": self.batch.global_batch_size,
               "zero_stage": self.zero_stage, "precision": self.precision, "fingerprints": self.fingerprints,
               "config": to_dict(self.cfg)}
        if self.cfg.model.lora:
            out["lora"] = self.lora_record()
        return out

    # ---- what is printed, the same by --check and by the run

    def batch_line(self) -> str:
        b = self.batch
        start = f" from step {self.start_step}" if self.resume is not None else ""
        n = self.cfg.train.sequence_parallel
        ranks = (f"world {b.world_size}" if n == 1 else
                 f"data-parallel {b.world_size} (world {self.world_size} / sequence_parallel {n}: each row split "
                 f"over {n} ranks)")
        return (f"batch: micro {b.micro_batch_size} x accumulation {b.gradient_accumulation_steps} x {ranks}"
                f" = global {counted(b.global_batch_size, 'row')}; {counted(self.steps_per_epoch, 'step')} per "
                f"epoch; {counted(self.total_steps, 'step')}{start}; attention {self.attention_line()}")

    def attention_line(self) -> str:
        from dft_ds.model import PACKED_ISOLATION

        m = self.cfg.model
        more = (f"; each MLP in {m.tiled_mlp} tiles" if m.tiled_mlp > 1 else "") + \
            ("; activations offloaded to host memory" if m.offload_activations else "")
        if not self.cfg.data.packing:
            return f"{self.attention} (one document per row){more}"
        how = PACKED_ISOLATION.get(self.attention, "position ids")
        if self.cfg.train.sequence_parallel > 1 and self.attention == "sdpa":
            how = "running attention one document at a time over the gathered row"
        return f"{self.attention} (packed documents kept apart by {how}){more}"

    def heldout_line(self) -> str:
        d, r = self.cfg.data, self.heldout.report
        where = f"{d.eval_source}" if d.eval_source is not None else f"data.eval_fraction={d.eval_fraction} of {d.source}"
        every = f"every {self.cfg.eval.loss_every} steps" if self.cfg.eval.loss_every else "never evaluated (eval.loss_every=0)"
        return f"{r.samples} samples from {where} -> {r.rows} rows, {r.target_tokens} targets; {every}"

    def loss_line(self) -> str:
        return (f"loss: {self.cfg.loss.type}{self.loss_detail()} ({'fused head' if self.fused else 'full logits'}); "
                f"{'micro-batch means (loss.normalize), ' if self.cfg.loss.normalize == 'micro_batch_mean' else ''}"
                f"precision "
                f"{self.precision}; DeepSpeed ZeRO-{self.zero_stage}{' with offload' if self.offload else ''}"
                f"{self.lora_line()}")

    def loss_detail(self) -> str:
        """The settings of the new variants that say what is trained, e.g. ' w=(H_20/ln 20)^1.0'."""
        lo = self.cfg.loss
        if lo.type == "eaft":
            h = f"H_{lo.eaft_top_k}/ln {lo.eaft_top_k}" if lo.eaft_top_k else "H/ln V"
            return f" w=({h})^{lo.alpha:g}"
        if lo.type in ("only_top_p", "only_bottom_p"):
            return f" {lo.threshold_base} weight where p {'>' if lo.type == 'only_top_p' else '<'} {lo.threshold:g}, else 0"
        return ""

    def lora_line(self) -> str:
        m = self.cfg.model
        if not m.lora:
            return ""
        embeddings = " + embeddings and head" if m.lora_train_embeddings else ""
        return (f"; LoRA r={m.lora_rank} alpha={m.lora_alpha:g} on {','.join(self.lora_targets)}{embeddings}: "
                f"{self.n_trainable / 1e6:.2f}M of {self.n_params / 1e6:.1f}M parameters train")

    def output_dir_line(self) -> str:
        path = self.cfg.train.output_dir
        if self.complete:
            return (f"output_dir: {path} (already complete: its checkpoint {self.resume.tag_dir} is at step "
                    f"{self.start_step} of {self.total_steps}; nothing to train)")
        if self.resume is not None:
            return f"output_dir: {path} (resumes from {self.resume.tag_dir} at step {self.start_step})"
        if rundir.is_started(path):
            return f"output_dir: {path} (a dft_ds run without checkpoints: starts from step 0)"
        return f"output_dir: {path} (new)"

    def complete_message(self) -> str:
        return (f"{self.cfg.train.output_dir} is already complete: its checkpoint {self.resume.tag_dir} is at step "
                f"{self.start_step} of {self.total_steps}; nothing was trained and no file was changed. To train "
                "further raise train.max_steps or train.epochs; for another run set a new train.output_dir; to "
                f"export it, run dft-convert {rundir.checkpoints_dir(self.cfg.train.output_dir)} OUT_DIR")

    def check_report(self) -> str:
        """`dft-train --check`: the plan, and a per-rank memory estimate."""
        from dft_ds.memory import estimate_memory, materializes_scores

        cfg = self.cfg
        scores = ((self.batch.micro_batch_size, cfg.data.max_length)
                  if materializes_scores(self.attention, self.on_cpu) else None)
        mem = estimate_memory(self.n_params, self.model_config, self.zero_stage, self.world_size, self.precision,
                              # a rank holds 1/N of each row under train.sequence_parallel = N
                              self.batch.micro_batch_size * -(-cfg.data.max_length // cfg.train.sequence_parallel),
                              cfg.model.gradient_checkpointing,
                              self.fused, cfg.loss.chunk_mb, self.offload, torch_adam=self.on_cpu,
                              n_trainable=self.n_trainable,
                              head_trains=not cfg.model.lora or cfg.model.lora_train_embeddings,
                              mlp_tiles=cfg.model.tiled_mlp, offload_activations=cfg.model.offload_activations,
                              scores_for=scores, sequence_parallel=cfg.train.sequence_parallel)
        ref = ""
        if cfg.loss.uses_reference and cfg.model.lora:
            ref = "; asft reference = the base with adapters off (no second copy)"
        elif cfg.loss.uses_reference:
            b = 2 if self.precision in ("bf16", "fp16") else 4
            ref_bytes = b * self.n_params / (self.world_size if self.zero_stage == 3 else 1)
            ref = f"; asft reference model {ref_bytes / GIB:.2f} GiB more"
        lines = [
            "dft-train --check: OK",
            f"  {self.output_dir_line()}",
            f"  data: {self.data.report.summary()}",
            *([f"  held-out: {self.heldout_line()}"] if self.heldout is not None else []),
            f"  {self.batch_line()}",
            f"  model: {cfg.model.name_or_path}, {self.n_params / 1e6:.1f}M parameters, vocabulary "
            f"{self.model_config.vocab_size}",
            f"  {self.loss_line()}",
            f"  memory per rank (rough): {mem.total / GIB:.2f} GiB = parameters {mem.params / GIB:.2f} + gradients "
            f"{mem.grads / GIB:.2f} + optimizer {mem.optimizer / GIB:.2f} + working set {mem.working_set / GIB:.2f} + "
            f"activations {mem.activations / GIB:.2f} + loss head {mem.loss_head / GIB:.2f}{ref}",
        ]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def build_plan(cfg: Config, world_size: int) -> RunPlan:
    """Everything a run decides before it starts; raises UserError on bad input, having written nothing."""
    from dft_ds import ds_config as dsc
    from dft_ds.procgroup import device
    from dft_ds import model as mdl
    from dft_ds.data import StepSampler
    from dft_ds.tokenised import build_datasets
    from dft_ds.memory import count_parameters, meta_model

    out = cfg.train.output_dir
    rundir.check_output_dir(cfg)
    check_hub_names(cfg)  # before any loading: one network probe, and one message for every missing name
    warnings: list[str] = []
    holder = rundir.read_lock(out)
    # a run builds its plan holding the lock itself; --check and dft-plan never hold it
    if holder and not rundir.held_here(holder) and rundir.stale_reason(holder, cfg.train.lock_stale_s) is None:
        warnings.append(f"train.output_dir: '{out}' is locked by a live run ({rundir.lock_text(holder)}); a start "
                        "now exits 2 unless it is a requeued attempt of that Slurm job, which waits for it")
    resume = ckpt.find_resume(cfg.checkpoint.resume, rundir.checkpoints_dir(out), warnings.append,
                             cfg.checkpoint.verify)
    batch = resolve_batch(cfg.train, world_size, resume.state.get("global_batch_size") if resume else None)
    if batch.note:
        warnings.append(batch.note)
    if cfg.loss.normalize == "micro_batch_mean":
        g = batch.gradient_accumulation_steps
        warnings.append(f"loss.normalize=micro_batch_mean: each micro-batch's token mean on its own rank, the {g} "
                        f"micro-batches of a step summed, so the gradient depends on how the batch is split "
                        f"(train.micro_batch_size, accumulation): about {g}x that of loss.normalize=step here, and "
                        "a row's tokens weigh more in a micro-batch with fewer targets; it exists to reproduce the "
                        "DFT paper code's numbers")
    tokenizer = mdl.load_tokenizer(cfg.model)
    model_config = mdl.load_model_config(cfg.model, tokenizer)
    data, heldout = build_datasets(cfg.data, tokenizer, cfg.train.seed)
    warnings += data.report.warnings
    fingerprints = rundir.fingerprints(model_config, tokenizer, data.rows)
    precision = dsc.resolve_precision(cfg.train.precision)
    changed: list[str] = []
    if resume is not None:
        changed = check_resume_settings(resume, cfg, precision, fingerprints)
        warnings += [f"resume: {c}" for c in changed]
    rundir.check_run_fingerprints(out, fingerprints)
    if len(data.rows) < batch.global_batch_size:
        r = data.report
        raise DataError(short_data_message(cfg, len(data.rows), r.samples - r.heldout - r.dropped_overlong
                                           - r.dropped_no_target, batch.global_batch_size))
    steps_per_epoch = StepSampler(len(data.rows), batch, 0, cfg.train.seed).steps_per_epoch
    total_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * steps_per_epoch)
    on_cpu = device().type == "cpu"
    load_universal = resume is not None and resume.world_size != world_size
    if load_universal:
        warnings.append(f"resume: world size {resume.world_size} -> {world_size}; loading through DeepSpeed's "
                        "universal checkpoint format")
    # DeepSpeed sees every rank as data-parallel (sequence parallelism is ours): its batch counts all ranks.
    ds_config = dsc.render_ds_config(cfg, BatchSplit(batch.micro_batch_size, batch.gradient_accumulation_steps,
                                                    world_size), precision, model_config.hidden_size, on_cpu,
                                     load_universal=load_universal, warn=warnings.append)
    model = meta_model(model_config, cfg.model.trust_remote_code)
    fused = choose_fused_head(cfg, model, warnings.append)
    attention = mdl.choose_attention(cfg.model.attn_implementation, model_config, device().type == "cuda")
    check_sequence_parallel(cfg, model_config, attention)
    if cfg.model.tiled_mlp > 1 and not mdl.mlp_modules(model):
        raise ConfigError(f"model.tiled_mlp={cfg.model.tiled_mlp}: this model ({type(model).__name__}) has no decoder "
                          "layers with an `mlp` to tile; set model.tiled_mlp=0")
    n_params = count_parameters(model)
    targets, trainable = [], None
    if cfg.model.lora:
        targets, trainable = plan_lora(cfg, model, resume, world_size)
        n_params += trainable - (embedding_count(model) if cfg.model.lora_train_embeddings else 0)
    return RunPlan(cfg, world_size, batch, resume, tokenizer, model_config, data, fingerprints, steps_per_epoch,
                   total_steps, precision, on_cpu, ds_config, fused, n_params, attention, heldout,
                   changed, warnings, targets, trainable)


# The attention kernels train.sequence_parallel wraps: each takes the gathered position ids (packed
# documents), sdpa through a document mask built from them, flash-attention as variable-length rows.
SEQUENCE_PARALLEL_ATTENTION = ("sdpa", "flash_attention_2")


def check_sequence_parallel(cfg: Config, model_config, attention: str) -> None:
    """train.sequence_parallel > 1: what the model and settings must allow (exit 2, every problem at once)."""
    n = cfg.train.sequence_parallel
    if n == 1:
        return
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    problems = []
    if heads % n:
        problems.append(f"train.sequence_parallel: the model has {heads} attention heads, which {n} does not divide; "
                        f"use a divisor of {heads}")
    if kv % n and n % kv:
        problems.append(f"train.sequence_parallel: the model has {kv} key/value heads; {n} must divide them or be a "
                        f"multiple of them (then they are replicated); use a divisor or multiple of {kv}")
    if attention not in SEQUENCE_PARALLEL_ATTENTION:
        why = ("eager would hold a full [row x row] score matrix per head" if attention == "eager" else
               f"{attention}'s block mask is built for a rank's slice, not the whole row")
        problems.append(f"model.attn_implementation: {attention} cannot run sequence parallel (train.sequence_parallel="
                        f"{n}): {why}; set model.attn_implementation=sdpa (or flash_attention_2 on CUDA)")
    if cfg.loss.normalize == "micro_batch_mean":
        problems.append("loss.normalize=micro_batch_mean divides by each rank's own targets, which sequence "
                        "parallelism splits; set loss.normalize=step with train.sequence_parallel > 1")
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def embedding_count(model) -> int:
    from dft_ds.model import embedding_parameters

    return sum(p.numel() for p in embedding_parameters(model))


def plan_lora(cfg: Config, model, resume: Optional[ckpt.CheckpointRef], world_size: int) -> tuple[list[str], int]:
    """model.lora on the meta-built model: (resolved targets, trainable parameters); bad input is exit 2."""
    import importlib.util

    from dft_ds.model import lora_parameter_count, lora_targets

    if importlib.util.find_spec("peft") is None:
        raise ModelError("model.lora=true needs peft, which is not installed: pip install 'dft_ds[lora]' "
                         "(peft>=0.17)")
    targets = lora_targets(model, cfg.model.lora_targets)
    trainable = lora_parameter_count(model, targets, cfg.model.lora_rank)
    if cfg.model.lora_train_embeddings:
        trainable += embedding_count(model)
    if resume is not None and resume.world_size != world_size:
        raise ConfigError(f"cannot resume the LoRA run {cfg.train.output_dir} from {resume.tag_dir} on {world_size} "
                          f"ranks: its checkpoints hold only the trainable parameters, which DeepSpeed's universal "
                          f"format (the path to another world size) does not take; resume on {resume.world_size} "
                          "ranks, or convert it (dft-convert) and start a new run from the merged model")
    return targets, trainable


def short_data_message(cfg: Config, rows: int, samples: int, global_batch: int) -> str:
    d = cfg.data
    made = (f"packing (data.packing=true) made them from {samples} samples, several to a row of data.max_length="
            f"{d.max_length} tokens" if d.packing and samples > rows else f"one sample per row, from {samples} samples")
    fixes = [f"lower train.global_batch_size to at most {rows}"]
    if d.packing and samples > rows:
        fixes.append(f"set data.packing=false for up to {samples} rows")
    fixes.append("give more data")
    return (f"the data gives {rows} rows ({made}), fewer than one global batch of {global_batch} rows "
            f"(train.global_batch_size); {', or '.join(fixes)}")


def check_resume_settings(resume: ckpt.CheckpointRef, cfg: Config, precision: str,
                          fingerprints: dict[str, str]) -> list[str]:
    """Refuse settings that change what the weights mean, and a model, tokenizer or data that differ
    from the checkpoint's (exit 2, naming each key and the directory); return the other changed
    settings, which continue the run."""
    fixed, other = ckpt.resume_changes(resume.config, cfg)
    saved_precision = resume.state.get("precision")
    if saved_precision is not None and saved_precision != precision:
        fixed.append(f"train.precision resolves to {precision!r} here, but the checkpoint trained in "
                     f"{saved_precision!r}")
    fixed += ckpt.fingerprint_changes(resume, fingerprints)
    if fixed:
        listed = "\n".join(f"  - {c}" for c in fixed)
        raise ConfigError(
            f"cannot resume {cfg.train.output_dir} from {resume.tag_dir}: what its weights mean would change:\n"
            f"{listed}\nset these back to the checkpoint's to continue that run (same model, tokenizer and data), "
            "or set a new train.output_dir for a new run (runs are never overwritten)")
    return other


def choose_fused_head(cfg: Config, model, warn) -> bool:
    """loss.fused: auto uses the fused head + loss where it computes the same loss; true insists."""
    from dft_ds.model import fused_head_problem

    if cfg.loss.fused == "false":
        return False
    problem = fused_head_problem(model, cfg.model.trust_remote_code)
    if problem is None:
        return True
    if cfg.loss.fused == "true":
        raise ModelError(f"loss.fused=true: the fused head cannot stand in for {cfg.model.name_or_path}: {problem}; "
                         "set loss.fused=auto or false")
    warn(f"loss.fused=auto: using full logits, because {problem}")
    return False
