"""The run directory (`train.output_dir`): whether it is new or ours, what rank 0 writes into it at
a start, and what it writes at the end. Its files and sub-folders are named here, except the
logger's own (metrics.jsonl, eval.jsonl, tensorboard/, trackers.json, wandb/, mlruns/,
training_curves.png), which metrics.py names.

    config.yaml           the resolved config of the latest segment, headed by world size and precision
    config_history.jsonl  one line per start that trained: step, world size, batch, what changed
    ds_config.json        the rendered DeepSpeed config
    fingerprints.json     model, tokenizer and data hashes; a start with other ones is refused
    metrics.jsonl         one line per logged step (trimmed back to the checkpoint on a resume)
    eval.jsonl            with eval.every_steps: one line per evaluation
    heldout.jsonl         with eval.loss_every: one line per held-out loss
    tensorboard/          the same figures as TensorBoard events
    trackers.json         with logging.report_to: the W&B and MLflow run ids a resume continues
    wandb/, mlruns/       with logging.report_to: W&B's offline run, MLflow's file store
    training_curves.png   with logging.plot: loss, NLL and mean token probability against the step
    checkpoints/          see dft_ds/checkpoint.py
    hf/                   with export.hf: the final weights as a Hugging Face directory
    summary.json          the whole run's figures, written when it finishes

How checkpoints are sharded is not this module's business.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from typing import Any

from dft_ds.checkpoint import write_atomic
from dft_ds.config import Config, save_config, to_dict
from dft_ds.errors import UserError, counted
from dft_ds.metrics import EVAL_FILE, HELDOUT_FILE, METRICS_FILE  # metrics.py names the files its logger writes

CHECKPOINTS = "checkpoints"
CONFIG_FILE = "config.yaml"
HISTORY_FILE = "config_history.jsonl"
DS_CONFIG_FILE = "ds_config.json"
FINGERPRINTS_FILE = "fingerprints.json"
SUMMARY_FILE = "summary.json"
HF_EXPORT = "hf"


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS)


def check_output_dir(cfg: Config) -> None:
    """A new directory, or one of our own runs to resume; never someone else's files."""
    path = cfg.train.output_dir
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"train.output_dir: '{path}' exists and is not a directory")
    if not is_started(path):
        return
    if cfg.checkpoint.resume == "none":
        raise UserError(f"train.output_dir: '{path}' already holds files and checkpoint.resume=none starts "
                        "from scratch; choose a new directory (runs are never overwritten)")
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        raise UserError(f"train.output_dir: '{path}' already holds files that are not a dft_ds run; "
                        "choose a new directory (runs are never overwritten)")


def is_started(path: str) -> bool:
    return os.path.isdir(path) and bool(os.listdir(path))


# --------------------------------------------------------------------------------------------
# Fingerprints: what must not change between a run directory (or a checkpoint) and a start in it


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def fingerprints(model_config, tokenizer, rows) -> dict[str, str]:
    """Model architecture, tokenizer vocabulary and template, and the tokenised training rows."""
    import numpy as np

    model = _digest(model_config.to_json_string(use_diff=False))
    vocab = sorted(tokenizer.get_vocab().items())
    tok = _digest(json.dumps(vocab), str(tokenizer.all_special_tokens), str(getattr(tokenizer, "chat_template", "")))
    h = hashlib.sha256()
    for row in rows.docs:
        for ids, labels in row:
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
            h.update(np.asarray(labels, dtype=np.int64).tobytes())
        h.update(b"|")
    return {"model": model, "tokenizer": tok, "data": h.hexdigest()[:16]}


def check_run_fingerprints(path: str, current: dict[str, str]) -> None:
    """The run directory belongs to the run with these model, tokenizer and data, or is new."""
    recorded = os.path.join(path, FINGERPRINTS_FILE)
    if not os.path.isfile(recorded):
        return
    with open(recorded, encoding="utf-8") as fh:
        saved = json.load(fh)
    changed = [k for k in current if saved.get(k) != current[k]]
    if changed:
        raise UserError(f"train.output_dir: '{path}' belongs to a run with a different {', '.join(changed)}; "
                        "choose a new directory")


# --------------------------------------------------------------------------------------------
# Writing


def start(plan) -> None:
    """Rank 0, once training is about to begin: the run's files, with one more line of history.

    On a resume, metrics.jsonl keeps only the steps up to the checkpoint (later ones are recomputed).
    """
    cfg, out = plan.cfg, plan.cfg.train.output_dir
    os.makedirs(out, exist_ok=True)
    save_config(cfg, os.path.join(out, CONFIG_FILE), extra={"world_size": plan.world_size, "precision": plan.precision})
    with open(os.path.join(out, DS_CONFIG_FILE), "w", encoding="utf-8") as fh:
        json.dump(plan.ds_config, fh, indent=2)
    with open(os.path.join(out, FINGERPRINTS_FILE), "w", encoding="utf-8") as fh:
        json.dump(plan.fingerprints, fh, indent=2)
    b = plan.batch
    segment = {"started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "from_step": plan.start_step, "steps": plan.total_steps, "world_size": plan.world_size,
               "precision": plan.precision, "micro_batch_size": b.micro_batch_size,
               "gradient_accumulation_steps": b.gradient_accumulation_steps, "global_batch_size": b.global_batch_size,
               "resumed_from": plan.resume.tag_dir if plan.resume is not None else None, "changed": plan.changed,
               "config": to_dict(cfg)}
    with open(os.path.join(out, HISTORY_FILE), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(segment) + "\n")
    for name in (METRICS_FILE, EVAL_FILE, HELDOUT_FILE):  # what a previous session logged past the checkpoint
        truncate_metrics(os.path.join(out, name), plan.start_step)


def truncate_metrics(path: str, last_step: int) -> None:
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as fh:
        kept = [line for line in fh if line.strip() and json.loads(line)["step"] <= last_step]
    write_atomic(path, "".join(kept))


def open_metrics(plan, is_rank0: bool):
    """Rank 0's logger (metrics.jsonl; TensorBoard past the resumed step purged; W&B/MLflow resumed by the
    ids in trackers.json; the bar or plain lines; the plot at the end); a null one elsewhere."""
    from dft_ds.config import trackers
    from dft_ds.metrics import MetricsLogger, NullMetrics

    if not is_rank0:
        return NullMetrics()
    cfg = plan.cfg
    lg = cfg.logging
    return MetricsLogger(cfg.train.output_dir, plan.total_steps, trackers=trackers(lg), progress_bar=lg.progress_bar,
                         plot=lg.plot, start_step=plan.start_step, config=to_dict(cfg), project=lg.project,
                         run_name=lg.run_name)


def write_summary(summary, out: str, world_size: int) -> dict[str, Any]:
    """summary.json over the whole run (all segments of a resumed run) and the closing line.

    `seconds` and `tokens_per_s` are this session's training only; evaluation and checkpoint saves
    inside the loop are `eval_seconds` and `checkpoint_seconds`, and `wall_seconds` is the whole loop.
    """
    with open(os.path.join(out, METRICS_FILE), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    skipped = sum(r.get("skipped_steps", 0) for r in rows)
    rows = [r for r in rows if r.get("loss") is not None]  # windows of skipped steps only
    first, last = (rows[0]["loss"], rows[-1]["loss"]) if rows else (None, None)
    result = {"steps": summary.steps, "seconds": round(summary.seconds, 3), "tokens": summary.tokens,
              "tokens_per_s": round(summary.tokens_per_s, 1), "eval_seconds": round(summary.eval_seconds, 3),
              "checkpoint_seconds": round(summary.checkpoint_seconds, 3),
              "wall_seconds": round(summary.wall_seconds, 3), "first_loss": first, "last_loss": last,
              "skipped_steps": skipped, "world_size": world_size, "output_dir": os.path.abspath(out)}
    write_atomic(os.path.join(out, SUMMARY_FILE), json.dumps(result, indent=2))
    losses = f"loss {first:.4f} -> {last:.4f}; " if rows else ""
    evals = f" (+ {summary.eval_seconds:.1f} s evaluation)" if summary.eval_seconds >= 0.05 else ""
    print(f"done: {counted(summary.steps, 'step')} in {summary.seconds:.1f} s{evals}, {summary.tokens_per_s:.0f} tokens/s, "
          f"{losses}results in {os.path.abspath(out)}", flush=True)
    return result
