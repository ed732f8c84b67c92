"""The precision and the DeepSpeed config of a run: a template (or the user's JSON) with every
"auto" filled from the run config, and the config of a frozen reference model."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch

from dft_ds.batch import BatchSplit
from dft_ds.config import Config
from dft_ds.errors import ConfigError

DS_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs")
TEMPLATES = ("zero2", "zero3", "zero3_offload")


def resolve_precision(setting: str) -> str:
    """auto = bf16 where the accelerator has it natively, fp16 on older GPUs, fp32 on CPU.

    A CPU without native bf16 was seen to run a ZeRO-3 step of a 3.7M-parameter Llama about 8x
    slower in bf16 than in fp32 (139 s against 18 s for 30 steps on 2 ranks).
    """
    if setting != "auto":
        return setting
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() == "cpu":
        return "fp32"
    return "bf16" if accel.is_bf16_supported() else "fp16"


def torch_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def load_template(name_or_path: str) -> dict[str, Any]:
    path = os.path.join(DS_CONFIG_DIR, f"{name_or_path}.json") if name_or_path in TEMPLATES else name_or_path
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"deepspeed.config: '{name_or_path}' is neither a template ({', '.join(TEMPLATES)}) "
                          "nor an existing JSON file") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: DeepSpeed config is not valid JSON ({exc.msg})") from None


def render_ds_config(cfg: Config, plan: BatchSplit, precision: str, hidden_size: int, on_cpu: bool,
                     load_universal: bool = False, warn=None) -> dict[str, Any]:
    """The template with every "auto" filled from the run config; explicit values must agree with it.

    A user's JSON without an optimizer block (LLaMA-Factory's and most Hugging Face examples leave it to
    the trainer) gets AdamW from train.*, as the templates have; a scheduler block is set aside, since
    the run's schedule is train.lr with train.warmup_ratio and cosine decay (`warn` says so).
    `load_universal`: the run resumes on another world size, from DeepSpeed's universal format.
    """
    ds = copy.deepcopy(load_template(cfg.deepspeed.config))
    t = cfg.train
    if "optimizer" not in ds:
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                       "weight_decay": "auto"}}
    scheduler = ds.pop("scheduler", None)
    if scheduler is not None and warn is not None:
        warn(f"deepspeed.config: the scheduler block of {cfg.deepspeed.config} ({scheduler.get('type', '?')}) is not "
             f"used; the learning rate follows train.lr={t.lr:g} with train.warmup_ratio={t.warmup_ratio:g} and "
             "cosine decay")
    values = {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "gradient_clipping": t.max_grad_norm,
        "bf16.enabled": precision == "bf16",
        "fp16.enabled": precision == "fp16",
        "optimizer.params.lr": t.lr,
        "optimizer.params.betas": [t.adam_beta1, t.adam_beta2],
        "optimizer.params.eps": t.adam_eps,
        "optimizer.params.weight_decay": t.weight_decay,
        # Bucket sizes scale with the hidden size (the rule of thumb transformers uses too).
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
    }
    must_match = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    problems = []
    for key, value in values.items():
        node, leaf = _node(ds, key)
        if node is None or leaf not in node:
            continue
        if node[leaf] == "auto":
            node[leaf] = value
        elif key in must_match and node[leaf] != value:
            problems.append(f"{cfg.deepspeed.config}: '{key}' is {node[leaf]} but the run config gives {value}; "
                            "set it to \"auto\" or change train.*")
    for kind in ("bf16", "fp16"):
        enabled = (ds.get(kind) or {}).get("enabled") if isinstance(ds.get(kind), dict) else None
        if enabled is not None and enabled != "auto" and bool(enabled) != (precision == kind):
            problems.append(f"{cfg.deepspeed.config}: '{kind}.enabled' is {str(enabled).lower()} but train.precision "
                            f"is {precision}; set it to \"auto\", or set train.precision="
                            f"{kind if enabled else 'the precision you want'}")
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    problems += [f"{cfg.deepspeed.config}: no run-config value for \"auto\" at '{k}'" for k in leftover]
    if problems:
        raise ConfigError("invalid DeepSpeed config:\n" + "\n".join(f"  - {p}" for p in problems))
    optimizer = ds.get("optimizer", {})
    offloaded = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
    if on_cpu and not offloaded and optimizer.get("type", "").lower() in ("adam", "adamw"):
        # FusedAdam is a CUDA kernel; on CPU use torch's AdamW (offload uses DeepSpeedCPUAdam instead).
        optimizer.setdefault("params", {})["torch_adam"] = True
    ds.setdefault("steps_per_print", 2**31 - 1)  # our own logging replaces DeepSpeed's
    if load_universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    return ds


def _node(tree: dict, dotted: str):
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.get(p)
        if not isinstance(tree, dict):
            return None, leaf
    return tree, leaf


def _walk(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def reference_ds_config(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The training config for a frozen model: no optimizer or scheduler; ZeRO-3 keeps sharding the
    parameters (one more copy of the weights / world size per rank, no gradients or optimizer
    states); under ZeRO-1/2, which shard only training state, every rank holds it whole (stage 0)."""
    ref = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
    zero = dict(ref.get("zero_optimization", {}))
    zero.pop("offload_optimizer", None)
    if zero.get("stage", 0) != 3:
        zero = {"stage": 0}
    ref["zero_optimization"] = zero
    return ref
