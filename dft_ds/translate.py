"""A flat config as LLaMA-Factory, TRL and the HF Trainer write it (`model_name_or_path: ...`,
`use_dft_loss: true`, `deepspeed: ds_z3_config.json`), translated into dft_ds's sections.

What has one clear meaning here is translated; what has none is listed with the reason, never
guessed. `dft-train --translate FLAT.yaml` prints the sectioned file; a flat file given to dft-train
is refused with what the translation would keep and leave out.
"""

from __future__ import annotations

import json
import os
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import yaml


@dataclass
class Translation:
    tree: dict[str, dict[str, Any]] = field(default_factory=dict)  # section -> key -> value
    done: list[str] = field(default_factory=list)                  # "their_key: value -> section.key=value"
    left_out: list[str] = field(default_factory=list)              # "their_key: value (why)"
    needless: list[str] = field(default_factory=list)              # keys whose value dft_ds does anyway
    keys: int = 0                                                   # keys outside dft_ds's sections

    def set(self, their: str, value: Any, key: str, ours: Any, how: str = "") -> None:
        section, name = key.split(".")
        self.tree.setdefault(section, {})[name] = ours
        self.done.append(f"{their}: {_show(value)} -> {key}={_show(ours)}{f' ({how})' if how else ''}")

    def leave(self, their: str, value: Any, why: str) -> None:
        self.left_out.append(f"{their}: {_show(value)} ({why})")


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _flat_key(key, value, sections) -> bool:
    """A key outside dft_ds's sections. `deepspeed: ds_z3_config.json` counts (the Trainer's key has a
    section's name); another section with a plain value is a mistake in a dft_ds config, reported as such."""
    return key not in sections or (key == "deepspeed" and isinstance(value, str))


def is_flat(data: dict, sections) -> bool:
    """Whether a YAML mapping holds keys outside dft_ds's sections (_flat_key)."""
    return any(_flat_key(k, v, sections) for k, v in data.items())


# their key -> our key, where the value carries over as it is
SAME = {
    "model_name_or_path": "model.name_or_path", "tokenizer_name_or_path": "model.tokenizer",
    "trust_remote_code": "model.trust_remote_code", "gradient_checkpointing": "model.gradient_checkpointing",
    "lora_rank": "model.lora_rank", "lora_r": "model.lora_rank", "lora_alpha": "model.lora_alpha",
    "lora_dropout": "model.lora_dropout",
    "dataset_name": "data.source", "dataset_train_split": "data.split", "cutoff_len": "data.max_length",
    "max_seq_length": "data.max_length", "max_length": "data.max_length", "max_samples": "data.max_samples",
    "preprocessing_num_workers": "data.num_workers", "dataset_num_proc": "data.num_workers",
    "packing": "data.packing", "neat_packing": "data.packing",
    "output_dir": "train.output_dir", "seed": "train.seed", "per_device_train_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps", "num_train_epochs": "train.epochs",
    "warmup_ratio": "train.warmup_ratio", "weight_decay": "train.weight_decay", "max_grad_norm": "train.max_grad_norm",
    "adam_beta1": "train.adam_beta1", "adam_beta2": "train.adam_beta2", "adam_epsilon": "train.adam_eps",
    "ddp_timeout": "train.comm_timeout_s",
    "save_steps": "checkpoint.every_steps", "save_total_limit": "checkpoint.keep",
    "logging_steps": "logging.every_steps", "run_name": "logging.run_name", "plot_loss": "logging.plot",
}
# keys whose usual values say what dft_ds does anyway (None: any value)
NOTHING_TO_DO = {
    "do_train": (True,), "overwrite_cache": None, "overwrite_output_dir": None, "tf32": None,
    "optim": ("adamw_torch", "adamw_torch_fused", "adamw_hf"), "save_strategy": ("steps",),
    "logging_strategy": ("steps",), "completion_only_loss": (True, None), "assistant_only_loss": (True,),
    "remove_unused_columns": None, "dataloader_num_workers": None, "dataloader_pin_memory": None,
    "ddp_find_unused_parameters": None, "save_only_model": (False,), "torch_dtype": None, "dtype": None,
    "use_fast_tokenizer": (True,), "dataset_dir": None, "do_eval": None,
}
LOSS_FLAGS = {"use_dft_loss": "dft", "use_eaft_loss": "eaft", "use_asft_loss": "asft"}
TRL_LOSS = {"dft": "dft", "nll": "sft"}
ATTENTION = {"fa2": "flash_attention_2", "flash_attention_2": "flash_attention_2", "sdpa": "sdpa",
             "disabled": "eager", "eager": "eager", "auto": "auto", "flex_attention": "flex_attention"}
TRACKERS = {"tensorboard", "wandb", "mlflow"}


def translate(data: dict, path: str, sections, meaning: Callable[[str], Optional[str]] = lambda _: None
              ) -> Translation:
    """The sectioned tree of a flat (or partly flat) mapping read from `path`. `meaning` tells what a bare
    key name is called here (config's table of names from other tools), or None."""
    t = Translation()
    flat = {k: v for k, v in data.items() if _flat_key(k, v, sections)}
    for section, values in data.items():  # sections already written as dft_ds's are kept
        if section in flat or values is None:
            continue
        if isinstance(values, dict):
            t.tree.setdefault(section, {}).update(values)
        else:
            t.leave(section, values, f"section '{section}' must be a mapping of key: value")
    t.keys = len(flat)
    for their, value in flat.items():
        if value is None:  # `resume_from_checkpoint: null`: the key's default, wherever it is read
            t.needless.append(their)
            continue
        handler = HANDLERS.get(their)
        if handler is not None:
            before = len(t.done) + len(t.left_out)
            handler(t, their, value, flat, path)
            if len(t.done) + len(t.left_out) == before:  # e.g. stage: sft, bf16: false
                t.needless.append(their)
        elif their in SAME:
            t.set(their, value, SAME[their], _number(value))
        elif their in NOTHING_TO_DO and (NOTHING_TO_DO[their] is None or value in NOTHING_TO_DO[their]):
            t.needless.append(their)
        else:
            t.leave(their, value, _why_not(str(their), meaning))
    return t


# keys with no equivalent, and what a user should know instead
NO_EQUIVALENT = {
    "eos_token": "each target ends with the chat template's own end-of-turn token",
    "push_to_hub": "upload the directory dft-convert writes",
    "hub_model_id": "upload the directory dft-convert writes",
    "enable_liger_kernel": "no Liger kernels; the loss head is fused by dft_ds itself (loss.fused)",
    "use_liger_kernel": "no Liger kernels; the loss head is fused by dft_ds itself (loss.fused)",
    "quantization_bit": "no quantized training",
    "per_device_eval_batch_size": "the held-out loss uses train.micro_batch_size",
    "dataset_text_field": "set data.format and the field names (docs/data.md)",
}


def _why_not(name: str, meaning: Callable[[str], Optional[str]]) -> str:
    if name in NO_EQUIVALENT:
        return f"no equivalent in dft_ds: {NO_EQUIVALENT[name]}"
    ours = meaning(name)
    return f"not translated; here it is {ours}" if ours else "no equivalent in dft_ds"


def _number(value: Any) -> Any:
    """YAML 1.1 reads 1e-5 (no dot) as a string; the Trainer's parser takes it as a number."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def _precision(t, their, value, flat, path):
    if value is True:
        t.set(their, value, "train.precision", their)


def _finetuning(t, their, value, flat, path):
    if value == "lora" or (their == "use_peft" and value is True):
        t.set(their, value, "model.lora", True)
    elif value not in ("full", False, None):
        t.leave(their, value, "dft_ds trains all weights or LoRA adapters (model.lora)")


def _lora_targets(t, their, value, flat, path):
    names = value if isinstance(value, list) else [v.strip() for v in str(value).split(",")]
    ours = "all-linear" if names in (["all"], ["all-linear"]) else ",".join(names)
    t.set(their, value, "model.lora_targets", ours)


def _loss_flag(t, their, value, flat, path):
    if value is True:
        t.set(their, value, "loss.type", LOSS_FLAGS[their])


def _loss_type(t, their, value, flat, path):
    if value in TRL_LOSS:
        t.set(their, value, "loss.type", TRL_LOSS[value])
    else:
        t.leave(their, value, "loss.type takes dft, sft, power, mix, asft, eaft, only_top_p, only_bottom_p")


def _stage(t, their, value, flat, path):
    if value != "sft":
        t.leave(their, value, "dft_ds trains supervised objectives only (loss.type); offline RL is dft-sample, "
                              "docs/offline_rl.md")


def _deepspeed(t, their, value, flat, path):
    if isinstance(value, str):
        t.set(their, value, "deepspeed.config", value, "a JSON of your own; dft_ds fills its 'auto' values")
    else:
        t.leave(their, value, "deepspeed.config takes zero2, zero3, zero3_offload or the path of a JSON file")


def _template(t, their, value, flat, path):
    t.set(their, value, "data.template", "chat",
          f"the tokenizer's own chat template; LLaMA-Factory's template '{value}' is not read")


def _attention(t, their, value, flat, path):
    if str(value) in ATTENTION:
        t.set(their, value, "model.attn_implementation", ATTENTION[str(value)])
    else:
        t.leave(their, value, "model.attn_implementation takes auto, eager, sdpa, flash_attention_2, flex_attention")


def _no_checkpointing(t, their, value, flat, path):
    if value is True:
        t.set(their, value, "model.gradient_checkpointing", False)


def _lr(t, their, value, flat, path):
    t.set(their, value, "train.lr", _number(value))


def _max_steps(t, their, value, flat, path):
    if _number(value) not in (-1, 0, None):
        t.set(their, value, "train.max_steps", _number(value))


def _warmup_steps(t, their, value, flat, path):
    steps = _number(flat.get("max_steps", -1))
    if isinstance(steps, int) and steps > 0 and _number(value):
        t.set(their, value, "train.warmup_ratio", round(_number(value) / steps, 6), f"{value} of max_steps {steps}")
    elif _number(value):
        t.leave(their, value, "warmup is a fraction of the steps here (train.warmup_ratio); the number of steps "
                              "is known only once the data is read")


def _scheduler(t, their, value, flat, path):
    if value not in ("cosine", "cosine_with_min_lr"):
        t.leave(their, value, "the schedule here is linear warmup then cosine to train.lr x train.min_lr_ratio")


def _report_to(t, their, value, flat, path):
    names = value if isinstance(value, list) else [v.strip() for v in str(value).split(",")]
    if names in (["none"], [], ["None"]):
        t.set(their, value, "logging.report_to", "none")
        t.set(their, value, "logging.tensorboard", False)
        return
    if "all" in names:
        names = sorted(TRACKERS)
    t.set(their, value, "logging.tensorboard", "tensorboard" in names)
    others = [n for n in names if n in TRACKERS - {"tensorboard"}]
    t.set(their, value, "logging.report_to", ",".join(others) or "none")
    for name in names:
        if name not in TRACKERS:
            t.leave(their, name, "trackers here are tensorboard, wandb and mlflow")


def _resume(t, their, value, flat, path):
    if value is True:
        t.set(their, value, "checkpoint.resume", "auto")
    elif isinstance(value, str):
        t.set(their, value, "checkpoint.resume", value)


def _val_size(t, their, value, flat, path):
    number = _number(value)
    if isinstance(number, float) and 0 < number < 1:
        t.set(their, value, "data.eval_fraction", number)
    elif number:
        t.leave(their, value, "a held-out share is a fraction here (data.eval_fraction)")


def _eval_steps(t, their, value, flat, path):
    if flat.get("val_size"):
        t.set(their, value, "eval.loss_every", _number(value), "held-out loss every N steps")
    else:
        t.leave(their, value, "a held-out loss needs held-out data: data.eval_fraction or data.eval_source, then "
                              "eval.loss_every")


def _eval_strategy(t, their, value, flat, path):
    if value not in ("no", "steps") or (value == "steps" and "eval_steps" not in flat):
        t.leave(their, value, "the held-out loss runs every eval.loss_every steps")


def _scheduler_kwargs(t, their, value, flat, path):
    if isinstance(value, dict) and set(value) == {"min_lr_rate"}:
        t.set(their, value, "train.min_lr_ratio", _number(value["min_lr_rate"]))
    else:
        t.leave(their, value, "the schedule here is linear warmup then cosine to train.lr x train.min_lr_ratio")


def _dataset(t, their, value, flat, path):
    """LLaMA-Factory's `dataset` names entries of dataset_info.json in `dataset_dir` (default data/):
    the entry gives the file and its layout. A name without an entry is taken as a path or hub name."""
    names = value if isinstance(value, list) else [v.strip() for v in str(value).split(",") if v.strip()]
    folder = str(flat.get("dataset_dir", "data"))
    info_path = os.path.join(folder, "dataset_info.json")
    try:
        with open(info_path, encoding="utf-8") as fh:
            info = json.load(fh)
    except (OSError, ValueError):
        info = {}
    if len(names) != 1:
        t.leave(their, value, "dft_ds reads one data.source (a file, a folder of shards or a glob); merge the "
                              "datasets into one file or folder")
        return
    entry = info.get(names[0])
    if not isinstance(entry, dict):
        t.set(their, value, "data.source", names[0],
              f"no entry '{names[0]}' in {info_path}: taken as a file, folder or hub name")
        return
    source = entry.get("file_name") and os.path.join(folder, entry["file_name"])
    source = source or entry.get("hf_hub_url") or entry.get("ms_hub_url")
    if not source:
        t.leave(their, value, f"the entry '{names[0]}' of {info_path} names no file_name or hf_hub_url")
        return
    t.set(their, value, "data.source", source, f"from {info_path}")
    columns, tags = entry.get("columns") or {}, entry.get("tags") or {}
    if entry.get("formatting") == "sharegpt":
        messages = columns.get("messages", "conversations")
        openai = tags.get("role_tag") == "role" and tags.get("content_tag") == "content"
        t.set(their, value, "data.format", "messages" if openai else "sharegpt", f"{info_path}: formatting sharegpt")
        if messages != ("messages" if openai else "conversations") or openai:
            t.set(their, value, "data.messages_field", messages, f"{info_path}: columns.messages")
    else:
        default = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                   "history": "history"}
        renamed = {k: v for k, v in columns.items() if default.get(k) != v}
        if renamed and set(columns) <= {"prompt", "response"}:
            t.set(their, value, "data.format", "prompt_response", f"{info_path}: columns")
            t.set(their, value, "data.prompt_field", columns.get("prompt", "instruction"))
            t.set(their, value, "data.response_field", columns.get("response", "output"))
            return
        t.set(their, value, "data.format", "alpaca", f"{info_path}: formatting alpaca")
        if renamed:
            t.leave(their, value, f"the alpaca columns {json.dumps(renamed)} of {info_path} are renamed; rename them "
                                  "in the file (instruction, input, output, system, history)")


HANDLERS: dict[str, Callable] = {
    "bf16": _precision, "fp16": _precision, "finetuning_type": _finetuning, "use_peft": _finetuning,
    "lora_target": _lora_targets, "lora_target_modules": _lora_targets, "target_modules": _lora_targets,
    **{k: _loss_flag for k in LOSS_FLAGS}, "loss_type": _loss_type, "stage": _stage, "deepspeed": _deepspeed,
    "template": _template, "flash_attn": _attention, "attn_implementation": _attention,
    "disable_gradient_checkpointing": _no_checkpointing, "learning_rate": _lr, "max_steps": _max_steps,
    "warmup_steps": _warmup_steps, "lr_scheduler_type": _scheduler, "report_to": _report_to,
    "resume_from_checkpoint": _resume, "val_size": _val_size, "eval_steps": _eval_steps, "dataset": _dataset,
    "eval_strategy": _eval_strategy, "evaluation_strategy": _eval_strategy, "lr_scheduler_kwargs": _scheduler_kwargs,
}


def render(t: Translation, source: str) -> str:
    """The translated config as YAML, with what was left out as comments at the end."""
    order = ["model", "data", "loss", "train", "checkpoint", "export", "eval", "logging", "deepspeed"]
    tree = {s: t.tree[s] for s in sorted(t.tree, key=lambda s: order.index(s) if s in order else len(order))}
    head = f"# dft_ds config translated from {source} (dft-train --translate)\n"
    body = yaml.safe_dump(tree, sort_keys=False, default_flow_style=False, allow_unicode=True)
    tail = ""
    if t.needless:
        tail += f"\n# Needed nothing (dft_ds does that anyway): {', '.join(t.needless)}\n"
    if t.left_out:
        tail += "\n# Not translated:\n" + "".join(f"#   {line}\n" for line in t.left_out)
    return head + body + tail


def summary(t: Translation, path: str) -> str:
    """What the translation of `path` keeps and leaves out, one key per line (for the flat-file error)."""
    lines = [f"{path}: a flat config ({t.keys} keys outside dft_ds's sections, as LLaMA-Factory, TRL and the HF "
             "Trainer write them).",
             f"    `dft-train --translate {path} > dft.yaml` writes it with sections; it translates:"]
    lines += [f"      {line}" for line in t.done] or ["      (nothing)"]
    if t.left_out:
        lines.append("    and has no equivalent for:")
        lines += [f"      {line}" for line in t.left_out]
    if t.needless:
        lines += textwrap.wrap(f"and needs nothing for (dft_ds does that anyway): {', '.join(t.needless)}", width=100,
                               initial_indent="    ", subsequent_indent="      ")
    return "\n".join(lines)
