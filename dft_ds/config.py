"""The run configuration: typed dataclass sections, a YAML file, dotted overrides, one validation.

Precedence is command line > YAML file > defaults. Every field carries a docstring (the string
literal under it); `describe_fields()` reads them back for `--help` and docs/configuration.md, so
the reference cannot drift from the code. Validation runs once and reports every problem at once.
This module must not import torch.distributed or deepspeed.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import os
import textwrap
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from dft_ds.errors import ConfigError
from dft_ds.loss import LOSS_TYPES, THRESHOLD_BASES
from dft_ds.translate import Translation, is_flat, summary, translate

SYNTHETIC = "synthetic"

# A text field whose values are fixed is typed Literal[...]: validation and the reference read its allowed values
# from the annotation (`allowed_values()`).
AttnImplementation = Literal["auto", "eager", "sdpa", "flash_attention_2", "flex_attention"]
DataFormat = Literal["auto", "prompt_response", "messages", "alpaca", "sharegpt"]
LossType = Literal[LOSS_TYPES]
ThresholdBase = Literal[THRESHOLD_BASES]


@dataclass
class ModelConfig:
    name_or_path: str = SYNTHETIC
    """Hugging Face model directory or hub name of a causal LM, or "synthetic" for the embedded tiny Llama."""
    tokenizer: Optional[str] = None
    """Tokenizer directory or hub name; null means the same as model.name_or_path."""
    trust_remote_code: bool = False
    """Allow model code shipped with the checkpoint to run. Off unless you trust its source."""
    attn_implementation: AttnImplementation = "auto"
    """Attention kernel: auto picks, among those the model supports, flash_attention_2 (CUDA, flash_attn installed),
    else sdpa, else eager (Gemma 2); or name one: eager, sdpa, flash_attention_2, flex_attention. Packed documents
    stay apart with each; the batch line says which runs."""
    config_overrides: str = ""
    """Train from scratch with another shape: comma-separated key=value pairs set on the model config before the model
    is built, as run_clm's --config_overrides (hidden_size=64,num_hidden_layers=2). Only with
    model.name_or_path=synthetic: a pretrained checkpoint's weights fix its shape. Each key must be a field of the
    config; its value is read as YAML (64, 1e-5, true, silu)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    tiled_mlp: int = 0
    """Long rows: run each decoder layer's MLP over this many tiles of its tokens (in the forward, and again tile by
    tile in the backward), so only one tile's intermediate activations, the widest of a layer, exist at a time. 0 is
    off. Costs about one more MLP forward per step. docs/long_sequences.md."""
    offload_activations: bool = False
    """Long rows: the tensors the backward needs (with gradient_checkpointing, each layer's input) wait in host memory
    between the forward and the backward, copied back as the backward reaches them. Costs two host-device copies of
    them per step; on a CPU run it changes nothing. docs/long_sequences.md."""
    lora: bool = False
    """Train low-rank adapters (peft's LoRA) instead of every weight: the base stays frozen and carries no gradients
    or optimizer state. A pretrained model.name_or_path is the base; with synthetic, the random-init tiny Llama
    (written once to output_dir/base/ so dft-convert can merge). docs/models.md, LoRA."""
    lora_rank: int = 16
    """model.lora: the adapters' rank r (>= 1)."""
    lora_alpha: float = 32.0
    """model.lora: the adapters' scale is lora_alpha / lora_rank."""
    lora_dropout: float = 0.0
    """model.lora: dropout on the adapters' input, in [0, 1)."""
    lora_targets: str = "all-linear"
    """model.lora: the modules that get adapters, comma-separated names (q_proj,v_proj) matched against the end of
    each module's name; all-linear is every linear layer of the decoder (the head is never adapted)."""
    lora_train_embeddings: bool = False
    """model.lora: also train the input embeddings and the LM head, fully (no adapter); with tied weights they are one
    matrix."""


@dataclass
class DataConfig:
    source: str = SYNTHETIC
    """A .jsonl/.json/.parquet file, a directory saved by datasets.save_to_disk, a hub dataset name, or "synthetic"."""
    split: str = "train"
    """Split to read from a saved DatasetDict or a hub dataset."""
    format: DataFormat = "auto"
    """Sample layout: auto (detected from the first row's fields and printed), prompt_response (two fields: text, or
    TRL's conversational lists of messages), messages (a chat list of role/content), alpaca
    (instruction/input/output), sharegpt (conversations of from/value). docs/data.md shows each."""
    preset: Optional[PresetName] = None
    """Field-name preset: numina_cot (problem/solution). Fields you set yourself win over the preset."""
    prompt_field: str = "prompt"
    """Field holding the prompt text (format prompt_response)."""
    response_field: str = "response"
    """Field holding the response text (format prompt_response)."""
    messages_field: str = "messages"
    """Field holding the chat messages (format messages)."""
    template: Literal["auto", "chat", "plain"] = "auto"
    """How a prompt becomes text: chat (tokenizer's chat template), plain (prompt + newline), auto (chat when the
    tokenizer has one)."""
    max_length: int = 512
    """Tokens per sample (and per packed row)."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """What to do with samples longer than max_length: truncate or drop. The count is reported."""
    packing: bool = True
    """Pack samples into rows of max_length; positions restart per document and attention never crosses documents."""
    packing_method: Literal["greedy", "best_fit"] = "greedy"
    """data.packing: greedy fills rows with documents in their order, a new row when the next does not fit; best_fit
    places the longest documents first, each into the fullest row it still fits (best-fit decreasing): fewer rows
    and less padding, and rows that mix short and long documents. docs/data.md gives the padding of each."""
    max_samples: Optional[int] = None
    """Use only the first N samples of the source (null: all)."""
    synthetic_size: int = 4000
    """Number of generated training problems when source is "synthetic"."""
    eval_source: Optional[str] = None
    """Held-out rows for eval.loss_every, read like data.source (same layout and fields); "synthetic" is the synthetic
    test split (data.synthetic_size / 10 problems, at least 32). Null with eval_fraction 0: no held-out loss."""
    eval_split: str = "test"
    """Split of a saved DatasetDict or hub dataset given as data.eval_source."""
    eval_fraction: float = 0.0
    """Hold out this fraction of data.source's samples (seeded, before packing) for eval.loss_every, when
    data.eval_source is null."""
    cache_dir: str = "auto"
    """Where tokenised sets are kept (Arrow files that every rank memory-maps), one folder per digest of what
    decides a token (the files' paths, sizes and modification times, the tokenizer, the template, the layout and
    fields, max_length, overlong): a second start with the same inputs reads instead of tokenising, and a changed
    one tokenises again. auto is $DFT_DS_CACHE/data, else ~/.cache/dft_ds/data; off tokenises in memory at every
    start. Put it on a shared file system and one process of the whole job prepares a set. docs/data.md."""
    num_workers: int = 0
    """Processes that tokenise (datasets.map's num_proc); 0 picks one per CPU this process may use, at most one
    per 2,000 samples."""


@dataclass
class LossConfig:
    type: LossType = "dft"
    """Per-token loss -w*log p with w detached: sft (w=1), dft (w=p), power (w=p^alpha), mix (SFT turning into DFT
    between mix_start and mix_end), asft (dft + kl_coef x KL(reference || model)), eaft (w=(H_k/ln k)^alpha, the
    position's normalised top-k entropy), only_top_p / only_bottom_p (threshold_base's weight where p is above / below
    loss.threshold, 0 elsewhere). docs/method.md."""
    prob_floor: float = 0.0
    """dft, power, mix, asft (and only_*_p with threshold_base dft): p in the weight is max(p, prob_floor). 0 is pure
    DFT; about 0.1 keeps unlikely tokens learning (weak priors, random init)."""
    alpha: float = 1.0
    """power: the weight is p^alpha (0 is SFT, 1 is DFT, between them a softer DFT). eaft: the exponent of the
    normalised entropy."""
    eaft_top_k: int = 20
    """eaft only: the entropy is that of the top-k next-token distribution renormalised over those k, divided by ln k;
    0 is the whole vocabulary, divided by ln V."""
    threshold: float = 0.1
    """only_top_p / only_bottom_p: the probability q; a target token learns only where its p > q (only_top_p) or p < q
    (only_bottom_p). The others weigh 0 but still count in the normalising token count. 0.1 is the edge of the logged
    low_prob_share."""
    threshold_base: ThresholdBase = "dft"
    """only_top_p / only_bottom_p: the weight of the tokens kept: dft (p, or max(p, prob_floor)) or sft (1)."""
    normalize: Literal["step", "micro_batch_mean"] = "step"
    """step: the weighted token losses are divided by the target tokens of the whole optimizer step on all ranks (the
    same gradient however the batch is split). micro_batch_mean: each micro-batch's token mean on its own rank,
    micro-batches summed, ranks averaged -- the DFT paper code's rule, for reproducing its numbers; the gradient then
    depends on the micro-batch size and accumulation steps."""
    mix_start: int = 0
    """mix only: optimizer step where the weight starts moving from 1 (SFT) towards p (DFT)."""
    mix_end: int = 0
    """mix only: optimizer step from which the weight is p (DFT); linear in between, w = (1-f) + f*p."""
    kl_coef: float = 0.1
    """asft only: weight of the per-token KL(reference || model) against the frozen starting model (one more sharded
    copy of the weights)."""
    fused: Literal["auto", "true", "false"] = "auto"
    """Fused chunked LM head + loss, never holding [tokens, vocab] logits: auto (on when the head is a plain bias-free
    linear layer), true (error if it is not), false."""
    chunk_mb: int = 128
    """Fused path: MiB of fp32 logits per chunk of target tokens (chunk rows = chunk_mb MiB / (4 x vocab))."""

    @property
    def uses_reference(self) -> bool:
        """Whether the run needs the frozen starting model: the asft KL term with a non-zero weight."""
        return self.type == "asft" and self.kl_coef > 0


@dataclass
class TrainConfig:
    output_dir: str = "runs/dft-tiny"
    """Run directory: resolved config, metrics.jsonl, tensorboard/, checkpoints/. The same for every start, so a
    requeued job resumes its run; one holding a dft_ds run is resumed only with settings that keep what its weights
    mean (docs/checkpoints.md), so set a new one for each new run."""
    seed: int = 42
    """Seed for model init, data order and dropout."""
    micro_batch_size: int = 4
    """Rows per forward/backward on each data-parallel rank."""
    gradient_accumulation_steps: Optional[int] = None
    """Micro-batches per optimizer step on each rank; null derives it from global_batch_size (or 1)."""
    global_batch_size: Optional[int] = None
    """Rows per optimizer step over all ranks = micro_batch_size x gradient_accumulation_steps x data-parallel ranks
    (the world size / sequence_parallel)."""
    sequence_parallel: int = 1
    """Ulysses sequence parallelism: groups of N consecutive ranks share each row, each rank holding 1/N of its tokens
    (attention exchanges heads for tokens inside the group). The world size must be a multiple of N, the data-parallel
    ranks are world / N, and the model's attention heads (and its key/value heads, or N by them) must divide by N.
    Needs model.attn_implementation sdpa or flash_attention_2. docs/long_sequences.md."""
    max_steps: Optional[int] = None
    """Optimizer steps to run; null runs train.epochs over the data."""
    epochs: float = 1.0
    """Passes over the data when max_steps is null."""
    stop_at_step: Optional[int] = None
    """Save a checkpoint and exit with code 75 after this optimizer step, schedule unchanged (time-sliced jobs); run
    again to go on."""
    lr: float = 5e-5
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.0
    """Final learning rate of the cosine schedule as a fraction of lr."""
    warmup_ratio: float = 0.1
    """Fraction of the steps spent in linear warmup."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """bf16, fp16, fp32 or auto (bf16 on accelerators that support it, fp32 on CPU)."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """A non-finite loss on any rank: stop (save the last good state, exit 3) or skip (the step changes no weight;
    counted as skipped_steps)."""
    max_skipped_steps: int = 10
    """nonfinite=skip: stop as with nonfinite=stop once this many steps were skipped in one session."""
    comm_timeout_s: int = 1800
    """Seconds a collective may wait for a silent peer before the rank fails (a dead peer whose connection closes
    fails it at once)."""
    lock_stale_s: int = 600
    """A run directory's lock (run.lock) whose heartbeat is older than this is taken over from its dead holder; rank 0
    renews it every lock_stale_s/10 seconds."""


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Save a sharded checkpoint (tag step-<N>) every N optimizer steps; 0 saves only at the end and on a signal."""
    keep: int = 2
    """Keep the newest N complete checkpoints; the one `latest` names is never deleted."""
    resume: str = "auto"
    """auto (the latest complete checkpoint in output_dir, or a fresh start), none, or a checkpoint directory path."""
    save_final: bool = True
    """Save a checkpoint when training ends (export.hf=true saves it anyway: the export is converted from it)."""
    verify: Literal["hash", "size", "off"] = "hash"
    """What a resume (and dft-convert) checks of a checkpoint first: hash (every file's content against the xxh3
    hashes recorded at save time), size (file sizes and shard count only) or off."""


@dataclass
class ExportConfig:
    hf: bool = False
    """Write a Hugging Face directory (safetensors, config, tokenizer) to output_dir/hf at the end of training."""
    dtype: Optional[Literal["bf16", "fp16", "fp32"]] = None
    """dtype of the exported weights: bf16, fp16 or fp32; null keeps the training precision."""


@dataclass
class EvalConfig:
    every_steps: int = 0
    """Evaluate every N optimizer steps during training (0: never); accuracy goes to eval.jsonl and TensorBoard."""
    benchmark: str = "synthetic"
    """What to evaluate on, as for dft-eval: NAME or NAME=PATH (synthetic, math500=FILE, ...)."""
    limit: int = 32
    """Problems per evaluation, split across ranks."""
    max_new_tokens: int = 256
    """Generated tokens per problem."""
    prompt: Literal["chat", "boxed", "plain"] = "chat"
    """Prompt style as for dft-eval: chat (the tokenizer's chat template, as training data is rendered by default),
    boxed or plain."""
    temperature: float = 0.0
    """0 is greedy decoding (a curve free of sampling noise); > 0 samples with a fixed seed."""
    loss_every: int = 0
    """Held-out loss, NLL and mean token probability (data.eval_source or data.eval_fraction) every N optimizer steps,
    sharded over ranks, logged as eval/*; 0 never."""


@dataclass
class LoggingConfig:
    every_steps: int = 1
    """Log metrics every N optimizer steps."""
    tensorboard: bool = True
    """Write TensorBoard events to output_dir/tensorboard (rank 0)."""
    report_to: str = "none"
    """More trackers, comma-separated: wandb, mlflow (tensorboard is logging.tensorboard). Rank 0 only; nothing is
    imported unless named. W&B honours WANDB_MODE, and logs offline to output_dir/wandb when it is unset and no API
    key is configured; MLflow writes to MLFLOW_TRACKING_URI, else a file store in output_dir/mlruns."""
    project: str = "dft_ds"
    """W&B project and MLflow experiment name (logging.report_to)."""
    run_name: Optional[str] = None
    """Run name shown by the trackers; null is the last part of train.output_dir."""
    progress_bar: bool = True
    """Show a progress bar with loss and tokens/s (rank 0). Off, or when stdout is not a terminal (a Slurm log), one
    plain line is printed every logging.every_steps steps instead."""
    plot: bool = True
    """Write training_curves.png (loss, NLL, mean token probability against step) to output_dir at the end of a run."""
    hist_every: int = 50
    """Write a histogram of target-token probabilities (20 bins on [0, 1], the logging window's tokens) at the first
    log on or after every N steps; 0 never."""


@dataclass
class DeepSpeedSection:
    config: str = "zero3"
    """DeepSpeed template: zero2, zero3, zero3_offload (from ds_configs/) or a path to a JSON file; "auto" fields are
    filled from this config. A JSON without an optimizer block gets AdamW from train.*; its scheduler block is not
    used (train.lr, train.warmup_ratio and cosine decay set the schedule); bf16/fp16 blocks must agree with
    train.precision."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)


PRESETS: dict[str, dict[str, str]] = {
    # NuminaMath-CoT, the paper's training set: {"problem", "solution", "messages", "source"}.
    "numina_cot": {"format": "prompt_response", "prompt_field": "problem", "response_field": "solution"},
}
PresetName = Literal[tuple(PRESETS)]

# The embedded default trains a randomly initialised tiny Llama, not a pretrained model: it needs a
# larger learning rate, and pure DFT collapses from a uniform prior (every p is ~1/V, so every
# token's weight is ~0 and the frequent tokens win; seen: NLL 5.6 -> 11.3 in 80 steps). The
# published remedy, a probability floor, keeps it learning. Applied only while model.name_or_path
# is "synthetic", under anything set in a file or on the command line; a real model never sees it.
SYNTHETIC_PROFILE: dict[str, dict[str, Any]] = {
    "train": {"lr": 1e-3, "epochs": 2.0, "warmup_ratio": 0.05},
    "loss": {"prob_floor": 0.1},
}

# The names HF Trainer, TRL, LLaMA-Factory and DeepSpeed users type, and what they mean here. An
# unknown key is looked up here by its bare name first (in any section, or none), then by spelling.
KNOWN_AS: dict[str, str] = {
    "learning_rate": "train.lr",
    "bf16": "train.precision (train.precision=bf16)",
    "fp16": "train.precision (train.precision=fp16)",
    "tf32": "train.precision (auto uses bf16 where the hardware has it)",
    "cutoff_len": "data.max_length",
    "max_seq_length": "data.max_length",
    "max_seq_len": "data.max_length",
    "max_length": "data.max_length",
    "model_max_length": "data.max_length",
    "save_steps": "checkpoint.every_steps",
    "save_total_limit": "checkpoint.keep",
    "resume_from_checkpoint": "checkpoint.resume",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "per_device_train_batch_size": "train.micro_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "micro_batch_size": "train.micro_batch_size",
    "train_batch_size": "train.global_batch_size",
    "batch_size": "train.micro_batch_size (per rank) or train.global_batch_size (all ranks)",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "num_train_epochs": "train.epochs",
    "epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "warmup_ratio": "train.warmup_ratio",
    "warmup_steps": "train.warmup_ratio (warmup is a fraction of the steps)",
    "lr_scheduler_type": "train.min_lr_ratio (the schedule is warmup then cosine to lr x min_lr_ratio)",
    "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm",
    "seed": "train.seed",
    "output_dir": "train.output_dir",
    "logging_steps": "logging.every_steps",
    "report_to": "logging.report_to",
    "run_name": "logging.run_name",
    "eval_steps": "eval.loss_every (held-out loss) or eval.every_steps (accuracy)",
    "model_name_or_path": "model.name_or_path",
    "tokenizer_name_or_path": "model.tokenizer",
    "attn_implementation": "model.attn_implementation",
    "flash_attn": "model.attn_implementation",
    "dataset": "data.source",
    "dataset_name": "data.source",
    "dataset_text_field": "data.prompt_field and data.response_field",
    "packing": "data.packing",
    "template": "data.template",
    "max_samples": "data.max_samples",
    "deepspeed": "deepspeed.config",
    "zero_stage": "deepspeed.config (zero2, zero3 or zero3_offload)",
    "loss_type": "loss.type",
    "use_peft": "model.lora",
    "finetuning_type": "model.lora (finetuning_type=lora is model.lora=true)",
    "lora_r": "model.lora_rank",
    "lora_target": "model.lora_targets",
    "target_modules": "model.lora_targets",
    "modules_to_save": "model.lora_train_embeddings (embeddings and head, trained fully)",
}

# logging.report_to names any of these, comma-separated, or "none".
TRACKERS = ("tensorboard", "wandb", "mlflow")


def trackers(logging: "LoggingConfig") -> list[str]:
    """The trackers a run writes to, in a fixed order: logging.tensorboard, then logging.report_to."""
    named = {t.strip() for t in logging.report_to.split(",") if t.strip() and t.strip() != "none"}
    if logging.tensorboard:
        named.add("tensorboard")
    return [t for t in TRACKERS if t in named]


@functools.cache
def allowed_values() -> dict[str, tuple[str, ...]]:
    """Dotted key -> the values its Literal[...] annotation allows, for every field that has one."""
    out = {}
    for section, cls in _sections().items():
        for name, tp in typing.get_type_hints(cls).items():
            values = _literal_values(tp)
            if values:
                out[f"{section}.{name}"] = values
    return out


def _literal_values(tp: Any) -> tuple[str, ...]:
    args = typing.get_args(tp)
    if args and type(None) in args:
        tp = next(a for a in args if a is not type(None))
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else ()


# --------------------------------------------------------------------------------------------
# Field docs


def _attribute_docstrings(cls: type) -> dict[str, str]:
    """The string literal written under each field of a dataclass (PEP 257 attribute docstrings)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(Config)}


def describe_fields() -> list[tuple[str, str, Any, str]]:
    """(dotted key, type name, default, docstring) for every field, in declaration order."""
    rows = []
    for section, cls in _sections().items():
        docs = _attribute_docstrings(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            rows.append((f"{section}.{f.name}", _type_name(hints[f.name]), f.default, docs.get(f.name, "")))
    return rows


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if args and type(None) in args:
        return f"{_type_name(next(a for a in args if a is not type(None)))} or null"
    if typing.get_origin(tp) is Literal:  # a text field with fixed values; they are listed apart
        return "str"
    return getattr(tp, "__name__", str(tp))


# --------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then `section.key=value` overrides; validated in one pass.

    World-size-dependent checks (batch arithmetic) run later in `resolve_batch`.
    """
    problems: list[str] = []
    tree: dict[str, dict[str, Any]] = {}
    if path is not None:
        _merge_file(tree, str(path), problems)
    _merge_overrides(tree, overrides, problems)
    cfg = _build(tree, problems, origin=str(path) if path else "overrides")
    # Keys that failed above keep their defaults, so the value checks can still run on the rest.
    problems.extend(_check_values(cfg))
    if problems:
        raise ConfigError(_report(problems))
    return cfg


def _report(problems: list[str]) -> str:
    head = f"invalid configuration ({len(problems)} problem{'s' if len(problems) > 1 else ''}):"
    return "\n".join([head] + [f"  - {p}" for p in problems])


def _merge_file(tree: dict, path: str, problems: list[str]) -> None:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        problems.append(f"{path}: config file not found")
        return
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        problems.append(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})")
        return
    if data is None:
        return
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a mapping of sections (model:, data:, ...), got {type(data).__name__}")
        return
    sections = _sections()
    if is_flat(data, sections):  # as LLaMA-Factory, TRL and the HF Trainer write them: what translates
        problems.append(summary(translate(data, path, sections, _known_meaning), path))
        return
    for section, values in data.items():
        if values is None:
            continue
        if not isinstance(values, dict):
            problems.append(f"{path}: section '{section}' must be a mapping of key: value")
            continue
        tree.setdefault(section, {}).update(values)


def _known_meaning(name: str) -> Optional[str]:
    """What a bare key name of another tool is called here, or None (no guess by spelling)."""
    return KNOWN_AS.get(name) or _keys_by_name().get(name)


def translate_flat_file(path: str) -> Optional[Translation]:
    """The translation of a flat YAML file (dft-train --translate), or None when its keys are all sections."""
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    if not isinstance(data, dict) or not is_flat(data, _sections()):
        return None
    return translate(data, path, _sections(), _known_meaning)


def _merge_overrides(tree: dict, overrides: list[str], problems: list[str]) -> None:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if sep and "." not in key:
            problems.append(f"override '{item}': expected section.key=value; '{key}' -> {_meaning(key)}")
            continue
        if not sep or key.count(".") != 1:
            problems.append(f"override '{item}': expected section.key=value")
            continue
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = CommandLineValue(raw)


def _build(tree: dict, problems: list[str], origin: str) -> Config:
    sections = _sections()
    built = {}
    for section, values in tree.items():
        if section not in sections:
            problems.append(f"unknown section '{section}'{_suggest(section, sections)}")
    synthetic = tree.get("model", {}).get("name_or_path", SYNTHETIC) == SYNTHETIC
    for section, cls in sections.items():
        values = dict(tree.get(section, {}))
        if synthetic:
            for name, value in SYNTHETIC_PROFILE.get(section, {}).items():
                values.setdefault(name, value)
        if section == "data":
            _apply_preset(values, problems)
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, value in values.items():
            key = f"{section}.{name}"
            if name not in names:
                problems.append(f"unknown key '{key}'{_suggest_key(section, name)}")
                continue
            ok, coerced = _coerce(value, hints[name])
            if not ok:  # on failure `coerced` is the value as read, to show what was given
                given = f"{coerced!r} ({type(coerced).__name__})"
                problems.append(f"{key}: expected {_type_name(hints[name])}, got {given}")
                continue
            kwargs[name] = coerced
        built[section] = cls(**kwargs)
    return Config(**built)


def _apply_preset(values: dict, problems: list[str]) -> None:
    preset = values.get("preset")
    if preset is None:
        return
    if preset not in PRESETS:
        return  # reported by the choices check
    for name, value in PRESETS[preset].items():
        values.setdefault(name, value)


def _keys_by_name() -> dict[str, str]:
    """Bare key name -> its dotted key (the first section that has it)."""
    keys: dict[str, str] = {}
    for key, *_ in describe_fields():
        keys.setdefault(key.split(".")[1], key)
    return keys


def _closest_key(name: str, names: list[str]) -> Optional[str]:
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return close[0] if close else None


def _meaning(name: str) -> str:
    """What a bare key name means here: from KNOWN_AS, else the key of that name or the closest by
    spelling, else that there is none."""
    if name in KNOWN_AS:
        return KNOWN_AS[name]
    keys = _keys_by_name()
    close = name if name in keys else _closest_key(name, list(keys))
    return keys[close] if close else "no such setting (dft-train --help lists them)"


def _suggest_key(section: str, name: str) -> str:
    """' (did you mean ...?)' for an unknown section.name: what people mean by that name (any
    section), else the same name in another section, else the closest spelling in this section,
    then in any."""
    if name in KNOWN_AS:
        key, _, why = KNOWN_AS[name].partition(" ")
        return f" (did you mean '{key}'{' ' + why if why else ''}?)"
    keys = _keys_by_name()
    if name in keys:
        return f" (did you mean '{keys[name]}'?)"
    own = _closest_key(name, [key.split(".")[1] for key, *_ in describe_fields() if key.startswith(section + ".")])
    if own:
        return f" (did you mean '{section}.{own}'?)"
    close = _closest_key(name, list(keys))
    return f" (did you mean '{keys[close]}'?)" if close else ""


def _suggest(name: str, valid, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


class CommandLineValue(str):
    """Text from a section.key=value override, typed only once the field's type is known.

    A text field takes it verbatim (YAML would turn 0123 into 83 and 12:30 into 750); other fields
    read it as YAML: 3 -> int, 1e-5 -> float, true -> bool, null -> None.
    """

    def parsed(self) -> Any:
        try:
            return yaml.safe_load(self) if self.strip() else ""
        except yaml.YAMLError:
            return str(self)


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    # A Literal field is text here; whether its value is one of those allowed is _check_values's concern.
    if typing.get_origin(tp) is Literal:
        tp = str
    elif typing.get_args(tp) and any(typing.get_origin(a) is Literal for a in typing.get_args(tp)):
        tp = Optional[str]
    if isinstance(value, CommandLineValue):
        text_field = tp is str or (typing.get_args(tp) and str in typing.get_args(tp))
        if text_field and value.strip() not in ("null", "~"):
            return True, str(value)
        value = value.parsed()
    args = typing.get_args(tp)
    if args and type(None) in args:
        if value is None:
            return True, None
        tp = next(a for a in args if a is not type(None))
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-5 (no dot) as text; as a float field's value it is plainly a number.
            try:
                return True, float(value)
            except ValueError:
                return False, value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        # Plain scalars from the command line arrive typed by YAML; a field that is text takes them as text.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value)
        if isinstance(value, bool):  # YAML's true/false for a text field with auto/true/false choices
            return True, str(value).lower()
        return isinstance(value, str), value
    return True, value


# --------------------------------------------------------------------------------------------
# Validation


def lora_target_names(text: str) -> list[str]:
    """model.lora_targets as a list: ["all-linear"], or the comma-separated module names."""
    return [t.strip() for t in str(text).split(",") if t.strip()]


def _check_values(cfg: Config) -> list[str]:
    problems = []
    for key, choices in allowed_values().items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None and value not in choices:
            problems.append(f"{key}: expected one of {', '.join(choices)}, got {value!r}")

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            section, name = key.split(".")
            problems.append(f"{key}: expected {what}, got {getattr(getattr(cfg, section), name)!r}")

    t, d = cfg.train, cfg.data
    need(bool(cfg.model.name_or_path), "model.name_or_path", "a model directory, hub name or 'synthetic'")
    need(not cfg.model.config_overrides.strip() or cfg.model.name_or_path == SYNTHETIC, "model.config_overrides",
         f"empty with model.name_or_path={cfg.model.name_or_path}: the overrides shape a model built from scratch "
         "(model.name_or_path=synthetic); a pretrained checkpoint's weights fix its shape")
    need(bool(d.source), "data.source", "a file, directory, hub name or 'synthetic'")
    need(d.max_length >= 8, "data.max_length", "an integer >= 8")
    need(d.max_samples is None or d.max_samples >= 1, "data.max_samples", "null or an integer >= 1")
    need(d.synthetic_size >= 1, "data.synthetic_size", "an integer >= 1")
    need(d.num_workers >= 0, "data.num_workers", "an integer >= 0 (0: one per CPU)")
    need(bool(str(d.cache_dir).strip()), "data.cache_dir", "auto, off or a directory")
    need(bool(t.output_dir), "train.output_dir", "a directory path")
    need(t.micro_batch_size >= 1, "train.micro_batch_size", "an integer >= 1")
    need(t.sequence_parallel >= 1, "train.sequence_parallel", "an integer >= 1 (1: off)")
    need(cfg.model.tiled_mlp >= 0, "model.tiled_mlp", "an integer >= 0 (tiles per MLP; 0: off)")
    need(not (cfg.model.tiled_mlp > 1 and cfg.model.lora and cfg.model.lora_dropout > 0), "model.tiled_mlp",
         f"0 with model.lora_dropout={cfg.model.lora_dropout}: the tiled MLP runs its adapters again in the backward, "
         "where dropout would draw other masks; set model.lora_dropout=0 or model.tiled_mlp=0")
    need(not cfg.model.offload_activations or cfg.model.gradient_checkpointing, "model.offload_activations",
         "false without model.gradient_checkpointing=true: without checkpointing every tensor the backward needs "
         "would go to host memory, the gathered weights of each layer among them; set model.gradient_checkpointing"
         "=true")
    need(t.gradient_accumulation_steps is None or t.gradient_accumulation_steps >= 1,
         "train.gradient_accumulation_steps", "null or an integer >= 1")
    need(t.global_batch_size is None or t.global_batch_size >= 1, "train.global_batch_size", "null or an integer >= 1")
    need(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "null or an integer >= 1")
    need(t.stop_at_step is None or t.stop_at_step >= 1, "train.stop_at_step", "null or an integer >= 1")
    need(t.epochs > 0 and math.isfinite(t.epochs), "train.epochs", "a finite number > 0")
    need(t.lr > 0 and math.isfinite(t.lr), "train.lr", "a finite number > 0")
    need(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "a number in [0, 1]")
    need(0 <= t.warmup_ratio < 1, "train.warmup_ratio", "a number in [0, 1)")
    need(t.weight_decay >= 0 and math.isfinite(t.weight_decay), "train.weight_decay", "a finite number >= 0")
    need(0 <= t.adam_beta1 < 1, "train.adam_beta1", "a number in [0, 1)")
    need(0 <= t.adam_beta2 < 1, "train.adam_beta2", "a number in [0, 1)")
    need(t.adam_eps > 0 and math.isfinite(t.adam_eps), "train.adam_eps", "a finite number > 0")
    need(t.comm_timeout_s >= 10, "train.comm_timeout_s", "an integer >= 10 (seconds)")
    need(t.lock_stale_s >= 10, "train.lock_stale_s", "an integer >= 10 (seconds)")
    need(t.max_skipped_steps >= 1, "train.max_skipped_steps", "an integer >= 1")
    need(t.max_grad_norm >= 0, "train.max_grad_norm", "a number >= 0 (0 disables clipping)")
    m = cfg.model
    need(m.lora_rank >= 1, "model.lora_rank", "an integer >= 1 (the rank of each adapter)")
    need(m.lora_alpha > 0 and math.isfinite(m.lora_alpha), "model.lora_alpha", "a finite number > 0")
    need(0 <= m.lora_dropout < 1, "model.lora_dropout", "a number in [0, 1)")
    need(bool(lora_target_names(m.lora_targets)), "model.lora_targets",
         "all-linear or comma-separated module names such as q_proj,v_proj")
    if m.lora and m.lora_train_embeddings and cfg.loss.type == "asft":
        problems.append("model.lora_train_embeddings=true with loss.type=asft: under LoRA the asft reference is the "
                        "base model with its adapters switched off, and a fully trained embedding or head has no such "
                        "switch; set model.lora_train_embeddings=false, or train without model.lora")
    lo = cfg.loss
    need(0 <= lo.prob_floor <= 1, "loss.prob_floor", "a number in [0, 1]")
    need(lo.alpha >= 0 and math.isfinite(lo.alpha), "loss.alpha", "a finite number >= 0 (0 is sft, 1 is dft)")
    need(lo.eaft_top_k >= 0 and lo.eaft_top_k != 1, "loss.eaft_top_k",
         "an integer >= 2 (the top-k entropy), or 0 (the whole vocabulary)")
    need(0 < lo.threshold < 1, "loss.threshold", "a probability in (0, 1)")
    need(lo.mix_start >= 0, "loss.mix_start", "an integer >= 0")
    need(lo.mix_end >= lo.mix_start, "loss.mix_end", f"an integer >= loss.mix_start ({lo.mix_start})")
    need(lo.kl_coef >= 0 and math.isfinite(lo.kl_coef), "loss.kl_coef", "a finite number >= 0")
    need(lo.chunk_mb >= 1, "loss.chunk_mb", "an integer >= 1")
    need(cfg.logging.hist_every >= 0, "logging.hist_every", "an integer >= 0 (0: never)")
    need(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", "an integer >= 0 (0: only at the end)")
    need(cfg.checkpoint.keep >= 1, "checkpoint.keep", "an integer >= 1")
    need(bool(cfg.checkpoint.resume), "checkpoint.resume", "auto, none or a checkpoint directory")
    need(cfg.eval.every_steps >= 0, "eval.every_steps", "an integer >= 0 (0: never)")
    need(cfg.eval.limit >= 1, "eval.limit", "an integer >= 1")
    need(cfg.eval.max_new_tokens >= 1, "eval.max_new_tokens", "an integer >= 1")
    need(cfg.eval.temperature >= 0, "eval.temperature", "a number >= 0")
    unknown = [t.strip() for t in cfg.logging.report_to.split(",")
               if t.strip() and t.strip() not in TRACKERS + ("none",)]
    need(not unknown, "logging.report_to", f"none or a comma-separated list of {', '.join(TRACKERS)}")
    need(cfg.eval.loss_every >= 0, "eval.loss_every", "an integer >= 0 (0: never)")
    need(0 <= d.eval_fraction < 1, "data.eval_fraction", "a number in [0, 1)")
    if cfg.eval.loss_every and d.eval_source is None and not d.eval_fraction:
        problems.append("eval.loss_every: held-out loss needs held-out rows: set data.eval_source (a file, directory, "
                        "hub name or 'synthetic') or data.eval_fraction (e.g. 0.05)")
    need(cfg.logging.every_steps >= 1, "logging.every_steps", "an integer >= 1")
    need(bool(cfg.deepspeed.config), "deepspeed.config", "zero2, zero3, zero3_offload or a JSON path")
    if t.micro_batch_size >= 1 and t.global_batch_size and t.gradient_accumulation_steps:
        per_rank = t.micro_batch_size * t.gradient_accumulation_steps
        if t.global_batch_size % per_rank:
            below, above = t.global_batch_size // per_rank * per_rank, (t.global_batch_size // per_rank + 1) * per_rank
            problems.append(
                f"train.global_batch_size: {t.global_batch_size} is not a multiple of micro_batch_size x "
                f"gradient_accumulation_steps = {per_rank}; the nearest valid values are "
                f"{' or '.join(str(v) for v in (below, above) if v)}, or set train.gradient_accumulation_steps=null "
                "to derive it")
    return problems


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike, extra: Optional[dict] = None) -> None:
    """Write the resolved config as YAML that `load_config` reads back to an equal Config."""
    data = to_dict(cfg)
    with open(path, "w", encoding="utf-8") as fh:
        if extra:
            fh.write("".join(f"# {k}: {v}\n" for k, v in extra.items()))
        yaml.safe_dump(data, fh, sort_keys=False)


if __name__ == "__main__":
    import sys

    sys.exit("docs/configuration.md is written by `python -m dft_ds.config_docs` (make docs)")
