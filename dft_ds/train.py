"""`dft-train [CONFIG.yaml] [section.key=value ...]`: one entry for every way of starting a run.

Runs unchanged as one plain process, under `deepspeed --module dft_ds.train` (which adds
`--local_rank=N`), under `torchrun -m dft_ds.train`, and under `srun python -m dft_ds.train`.
Bad input exits with code 2 before the run directory is created, so nothing is left behind that
a later run could mistake for a good one.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import textwrap
from dataclasses import dataclass
from typing import Any

from dft_ds.config import (SYNTHETIC_PROFILE, BatchPlan, Config, describe_fields, load_config, resolve_batch,
                           save_config, to_dict)
from dft_ds.errors import (EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_OUT_OF_MEMORY, EXIT_PREEMPTED, EXIT_SAVE_FAILED,
                           NonFiniteStop, SaveFailed, UserError)

EXAMPLES = """\
examples:
  dft-train                                   # the embedded default: tiny Llama, synthetic math, DFT
  dft-train configs/qwen2.5-math-1.5b_numina.yaml train.output_dir=runs/q15
  deepspeed --num_gpus 8 --module dft_ds.train CONFIG.yaml loss.type=sft
  torchrun --nproc-per-node 2 -m dft_ds.train train.max_steps=20
  dft-train --check CONFIG.yaml --world-size 8   # validate everything and print the plan; writes nothing
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dft-train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a causal LM with DFT (or SFT) on DeepSpeed. Settings come from the defaults, "
                    "then CONFIG.yaml, then section.key=value overrides (later wins).",
        epilog=EXAMPLES + "\nsettings (section.key: type = default):\n" + _settings_help())
    parser.add_argument("args", nargs="*", metavar="CONFIG.yaml | section.key=value",
                        help="an optional YAML config file first, then any number of overrides")
    # The deepspeed launcher appends --local_rank=N; torchrun and srun pass it in the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true",
                        help="validate config, data, tokenizer/model and DeepSpeed config, print the plan (samples, "
                             "tokens, steps, per-rank memory estimate) and exit 0, or 2 on bad input; writes nothing")
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="with --check: the number of ranks to plan for (default: $WORLD_SIZE or 1)")
    ns = parser.parse_args(argv)
    ns.config, ns.overrides = None, []
    for i, item in enumerate(ns.args):
        if "=" in item:
            ns.overrides.append(item)
        elif i == 0:
            ns.config = item
        else:
            parser.error(f"'{item}' is not a section.key=value override (only the first argument may be a config file)")
    return ns


def _settings_help() -> str:
    profile = ", ".join(f"{sec}.{k}={v}" for sec, vals in SYNTHETIC_PROFILE.items() for k, v in vals.items())
    lines = [f"  (with model.name_or_path=synthetic, the embedded default also sets {profile}"
             " unless you set them)"]
    for key, type_name, default, doc in describe_fields():
        lines.append(f"  {key}: {type_name} = {default!r}")
        lines.extend(textwrap.wrap(doc, width=96, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)

    if ns.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(ns.local_rank))
    if ns.check:
        from dft_ds.doctor import check

        try:
            check(load_config(ns.config, ns.overrides), ns.world_size or int(os.environ.get("WORLD_SIZE", "1")))
        except UserError as exc:
            print(f"dft-train: error: {exc}", file=sys.stderr, flush=True)
            return EXIT_BAD_INPUT
        return 0
    try:
        try:
            cfg = load_config(ns.config, ns.overrides)
            rc = run(cfg)
            message = {EXIT_NONFINITE: "stopped on a non-finite loss or gradient",
                       EXIT_OUT_OF_MEMORY: "out of memory in a training step"}.get(
                rc, "stopped on request after saving a checkpoint")
        except UserError as exc:
            print(f"dft-train: error: {exc}", file=sys.stderr, flush=True)
            rc, message = EXIT_BAD_INPUT, f"bad input: {exc}"
        except SaveFailed as exc:
            print(f"dft-train: error: {exc}", file=sys.stderr, flush=True)
            rc, message = EXIT_SAVE_FAILED, str(exc)
        # torchrun reports every failed rank as 1; this note lets dft-launch pass on 75 or 2 instead.
        from dft_ds.launch import report_exit_code

        report_exit_code(rc, message)
        return rc
    finally:
        from dft_ds.engine import shutdown_distributed

        shutdown_distributed()


def check_output_dir(cfg: Config) -> None:
    """A new directory, or one of our own runs to resume; never someone else's files."""
    path = cfg.train.output_dir
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"train.output_dir: '{path}' exists and is not a directory")
    if not os.path.isdir(path) or not os.listdir(path):
        return
    if cfg.checkpoint.resume == "none":
        raise UserError(f"train.output_dir: '{path}' already holds files and checkpoint.resume=none starts "
                        "from scratch; choose a new directory (runs are never overwritten)")
    if not os.path.isfile(os.path.join(path, "config.yaml")):
        raise UserError(f"train.output_dir: '{path}' already holds files that are not a dft_ds run; "
                        "choose a new directory (runs are never overwritten)")


def check_run_fingerprints(path: str, current: dict[str, str]) -> None:
    """The run directory belongs to the run with these model, tokenizer and data, or is new."""
    recorded = os.path.join(path, "fingerprints.json")
    if not os.path.isfile(recorded):
        return
    with open(recorded, encoding="utf-8") as fh:
        saved = json.load(fh)
    changed = [k for k in current if saved.get(k) != current[k]]
    if changed:
        raise UserError(f"train.output_dir: '{path}' belongs to a run with a different {', '.join(changed)}; "
                        "choose a new directory")


@dataclass
class Run:
    """Everything a run needs, built and validated before the run directory is written to."""

    cfg: Config
    dist: Any
    plan: BatchPlan
    tokenizer: Any
    model_config: Any
    data: Any
    sampler: Any
    engine: Any
    total_steps: int
    precision: str
    ds_config: dict
    fingerprints: dict
    resume: Any
    warnings: list
    fused: bool = False
    reference: Any = None


def build_run(cfg: Config) -> Run:
    """Process group, data, model, engine and resumed state; raises UserError on bad input before
    writing anything."""
    from dft_ds import checkpoint as ckpt
    from dft_ds import engine as eng
    from dft_ds import model as mdl
    from dft_ds.data import StepSampler, build_train_data

    # Every rank checks before the rendezvous; rank 0 writes into the directory only after it.
    check_output_dir(cfg)
    dist = eng.init_distributed(cfg.train.comm_timeout_s)
    warnings_ = []
    resume = ckpt.find_resume(cfg.checkpoint.resume, os.path.join(cfg.train.output_dir, "checkpoints"),
                              warnings_.append)
    train_cfg = cfg.train
    if resume is not None and train_cfg.global_batch_size is None:
        # Keep the saved global batch, so a resume on another world size continues with the same samples.
        train_cfg = dataclasses.replace(train_cfg, global_batch_size=resume.state["global_batch_size"],
                                        gradient_accumulation_steps=None)
    plan = resolve_batch(train_cfg, dist.world_size)
    tokenizer = mdl.load_tokenizer(cfg.model)
    model_config = mdl.load_model_config(cfg.model, tokenizer)
    data = build_train_data(cfg.data, tokenizer, cfg.train.seed)
    prints = ckpt.fingerprints(model_config, tokenizer, data.rows)
    if resume is not None:
        ckpt.check_compatible(resume, prints, to_dict(cfg), warnings_.append)
    check_run_fingerprints(cfg.train.output_dir, prints)
    sampler = StepSampler(len(data.rows), plan, dist.rank, cfg.train.seed)
    total_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * sampler.steps_per_epoch)
    precision = eng.resolve_precision(cfg.train.precision)
    on_cpu = eng.device().type == "cpu"
    ds_config = eng.render_ds_config(cfg, plan, precision, model_config.hidden_size, on_cpu)
    load_tag = None
    if resume is not None:
        load_tag = resume.tag
        if resume.state["world_size"] != dist.world_size:
            warnings_.append(f"resume: world size {resume.state['world_size']} -> {dist.world_size}; "
                             "loading through DeepSpeed's universal checkpoint format")
            load_tag = ckpt.ensure_universal(resume, dist.is_rank0, lambda: eng.barrier(dist.world_size))
            ds_config["checkpoint"] = {"load_universal": True}

    model, keepalive = mdl.build_model(cfg.model, model_config, ds_config, eng.torch_dtype(precision), cfg.train.seed)
    fused = choose_fused_head(cfg, model, warnings_.append)
    if fused:
        mdl.attach_head_loss(model)
    engine = eng.Engine(model, ds_config, dist, total_steps, cfg)
    del keepalive
    reference = None
    if cfg.loss.type == "asft" and cfg.loss.kl_coef > 0:
        # The frozen starting model: the pretrained weights (or the same seeded init), never a checkpoint.
        ref_config = eng.reference_ds_config(ds_config)
        ref_model, keepalive = mdl.build_model(dataclasses.replace(cfg.model, gradient_checkpointing=False),
                                               model_config, ref_config, eng.torch_dtype(precision), cfg.train.seed)
        if fused:
            mdl.attach_head_loss(ref_model)
        reference = eng.ReferenceEngine(ref_model, ref_config)
        del keepalive
    if resume is not None:
        engine.load_checkpoint(resume.root, load_tag)
        sampler.load_state_dict(resume.state["sampler"])
        ckpt.load_rng(resume, dist.rank)
        if resume.state["config"]["train"]["lr"] != cfg.train.lr:
            engine.set_peak_lr(cfg.train.lr)
    return Run(cfg, dist, plan, tokenizer, model_config, data, sampler, engine, total_steps, precision, ds_config,
               prints, resume, warnings_, fused, reference)


def choose_fused_head(cfg: Config, model, warn) -> bool:
    """loss.fused: auto uses the fused head + loss where it computes the same loss; true insists."""
    from dft_ds import model as mdl
    from dft_ds.errors import ModelError

    if cfg.loss.fused == "false":
        return False
    problem = mdl.fused_head_problem(model, cfg.model.trust_remote_code)
    if problem is None:
        return True
    if cfg.loss.fused == "true":
        raise ModelError(f"loss.fused=true: the fused head cannot stand in for {cfg.model.name_or_path}: {problem}; "
                         "set loss.fused=auto or false")
    warn(f"loss.fused=auto: using full logits, because {problem}")
    return False


def start_run_dir(run: Run):
    """Rank 0 writes the run's files and opens its logger; other ranks get a null logger.

    On a resume, metrics.jsonl keeps only the steps up to the checkpoint (later ones are recomputed)
    and TensorBoard purges its events past that step.
    """
    from dft_ds.metrics import MetricsLogger, NullMetrics

    cfg, out = run.cfg, run.cfg.train.output_dir
    if not run.dist.is_rank0:
        return NullMetrics()
    os.makedirs(out, exist_ok=True)
    save_config(cfg, os.path.join(out, "config.yaml"),
                extra={"world_size": run.dist.world_size, "precision": run.precision})
    with open(os.path.join(out, "ds_config.json"), "w", encoding="utf-8") as fh:
        json.dump(run.ds_config, fh, indent=2)
    with open(os.path.join(out, "fingerprints.json"), "w", encoding="utf-8") as fh:
        json.dump(run.fingerprints, fh, indent=2)
    start = run.sampler.step
    truncate_metrics(os.path.join(out, "metrics.jsonl"), start)
    return MetricsLogger(out, cfg.logging.tensorboard, cfg.logging.progress_bar, run.total_steps, purge_step=start + 1)


def truncate_metrics(path: str, last_step: int) -> None:
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as fh:
        kept = [line for line in fh if line.strip() and json.loads(line)["step"] <= last_step]
    from dft_ds.checkpoint import write_atomic

    write_atomic(path, "".join(kept))


def checkpoint_state(run: Run, step: int) -> dict:
    from dft_ds.engine import zero_stage

    return {"global_step": step, "samples_consumed": step * run.plan.global_batch_size,
            "sampler": run.sampler.state_dict(), "world_size": run.dist.world_size,
            "global_batch_size": run.plan.global_batch_size, "zero_stage": zero_stage(run.ds_config),
            "precision": run.precision, "fingerprints": run.fingerprints, "config": to_dict(run.cfg)}


def write_hf_meta(run: Run, directory: str) -> None:
    """What dft-convert needs beside the shards: the model config and the tokenizer."""
    os.makedirs(directory, exist_ok=True)
    model = run.engine.ds.module
    config = copy.deepcopy(model.config)
    config.use_cache = True  # off for training only; inference (and vLLM) wants it
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    run.tokenizer.save_pretrained(directory)


def run(cfg: Config) -> int:
    from dft_ds.checkpoint import Checkpointer, is_complete, tag_for
    from dft_ds.engine import zero_stage
    from dft_ds.trainer import StopSignal, Trainer

    stop = StopSignal().install()  # early, so a signal during set-up is not fatal
    r = build_run(cfg)
    metrics = start_run_dir(r)
    plan, out = r.plan, cfg.train.output_dir
    for message in r.warnings:
        metrics.print(f"warning: {message}")
    if r.resume is not None:
        metrics.print(f"resumed from {r.resume.tag_dir} at step {r.sampler.step}")
    metrics.print(f"data: {r.data.report.summary()}")
    metrics.print(f"batch: micro {plan.micro_batch_size} x accumulation {plan.gradient_accumulation_steps} x "
                  f"world {plan.world_size} = global {plan.global_batch_size}; {r.total_steps} steps; "
                  f"loss {cfg.loss.type} ({'fused head' if r.fused else 'full logits'}); precision {r.precision}; zero stage {zero_stage(r.ds_config)}")
    r.engine.barrier()

    root = os.path.join(out, "checkpoints")
    saver = Checkpointer(root, cfg.checkpoint.keep, r.engine, lambda d: write_hf_meta(r, d))

    def save(step: int) -> None:
        if not is_complete(os.path.join(root, tag_for(step))):
            saver.save(step, checkpoint_state(r, step))

    trainer = Trainer(r.engine, r.data, r.sampler, cfg.loss, r.total_steps, cfg.logging.every_steps, metrics,
                      save=save, save_every=cfg.checkpoint.every_steps, stop=stop,
                      stop_at_step=cfg.train.stop_at_step, evaluate=build_evaluator(r),
                      eval_every=cfg.eval.every_steps, fused=r.fused, reference=r.reference,
                      hist_every=cfg.logging.hist_every, nonfinite=cfg.train.nonfinite,
                      max_skipped=cfg.train.max_skipped_steps)
    try:
        summary = trainer.train()
    except NonFiniteStop as exc:
        return stop_nonfinite(r, exc, save, root, metrics, stop)
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        print(f"dft-train: error: {out_of_memory_advice(r, exc)}", file=sys.stderr, flush=True)
        return EXIT_OUT_OF_MEMORY
    if summary.preempted or cfg.checkpoint.save_final:
        save(summary.steps)
    metrics.close()
    stop.uninstall()
    if summary.preempted:
        metrics.print(f"stopped at step {summary.steps} (signal or train.stop_at_step); checkpoint saved, "
                      f"exit code {EXIT_PREEMPTED}: run again to resume")
        r.engine.barrier()
        return EXIT_PREEMPTED
    if cfg.export.hf:
        export_hf(r, root, tag_for(summary.steps), cfg.export.dtype)
    if r.dist.is_rank0:
        write_summary(summary, out, r.dist.world_size)
    r.engine.barrier()
    return 0


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    text = str(exc)
    return (isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text.lower()
            or "can't allocate memory" in text)


def out_of_memory_advice(run: Run, exc: BaseException) -> str:
    """What ran out, the current shape of a step, and the settings that make it smaller."""
    from dft_ds.engine import zero_stage

    cfg, stage = run.cfg, zero_stage(run.ds_config)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"out of memory in training step {run.sampler.step + 1} ({first}). A step here is "
            f"train.micro_batch_size={cfg.train.micro_batch_size} rows x data.max_length={cfg.data.max_length} tokens, "
            f"ZeRO stage {stage}, model.gradient_checkpointing={str(cfg.model.gradient_checkpointing).lower()}, "
            f"loss head {'fused' if run.fused else 'full logits'}. To fit: lower train.micro_batch_size (keep "
            "train.global_batch_size: accumulation grows to match); lower data.max_length; set "
            "model.gradient_checkpointing=true; use deepspeed.config=zero3, or zero3_offload to keep optimizer "
            "states and parameters in host memory; keep loss.fused=auto (or lower loss.chunk_mb). "
            "The last checkpoint is untouched.")


def stop_nonfinite(run: Run, exc, save, root: str, metrics, stop) -> int:
    """Save the last good state (when the current one is) and exit EXIT_NONFINITE, saying where it is."""
    from dft_ds.checkpoint import find_resume

    step = run.sampler.step
    if exc.save:
        save(step)
    metrics.close()
    stop.uninstall()
    run.engine.barrier()
    latest = find_resume("auto", root, lambda _m: None) if os.path.isdir(root) else None
    where = f"the last good state is {latest.tag_dir} (step {latest.state['global_step']})" if latest else \
        "no checkpoint holds a good state"
    if run.dist.is_rank0:
        print(f"dft-train: error: {exc}; {where}. Look at the data of that step, lower train.lr, or set "
              "train.nonfinite=skip to step over isolated bad batches.", file=sys.stderr, flush=True)
    return EXIT_NONFINITE


def build_evaluator(run: Run):
    """`eval.every_steps`: the in-training evaluator, sharded over the ranks (see dft_ds/eval/during.py)."""
    if not run.cfg.eval.every_steps:
        return None
    from dft_ds.engine import zero_stage
    from dft_ds.eval.during import TrainingEvaluator

    return TrainingEvaluator(run.cfg.eval, run.tokenizer, run.engine.ds.module, run.dist.rank, run.dist.world_size,
                             run.engine.device, run.engine.all_reduce_sum,
                             synced=run.dist.world_size > 1 and zero_stage(run.ds_config) == 3)


def export_hf(run: Run, root: str, tag: str, dtype: str | None) -> None:
    """`export.hf`: rank 0 converts the final checkpoint with the same code as dft-convert."""
    from dft_ds.convert import convert_checkpoint

    if run.dist.is_rank0:
        convert_checkpoint(os.path.join(root, tag), os.path.join(run.cfg.train.output_dir, "hf"), dtype=dtype,
                           overwrite=True)
    run.engine.barrier()


def write_summary(summary, out: str, world_size: int) -> None:
    """summary.json over the whole run (all sessions of a resumed run) and the closing line."""
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    skipped = sum(r.get("skipped_steps", 0) for r in rows)
    rows = [r for r in rows if r.get("loss") is not None]  # windows of skipped steps only
    first, last = (rows[0]["loss"], rows[-1]["loss"]) if rows else (None, None)
    result = {"steps": summary.steps, "seconds": round(summary.seconds, 3), "tokens": summary.tokens,
              "tokens_per_s": round(summary.tokens_per_s, 1), "first_loss": first, "last_loss": last,
              "skipped_steps": skipped, "world_size": world_size, "output_dir": os.path.abspath(out)}
    from dft_ds.checkpoint import write_atomic

    write_atomic(os.path.join(out, "summary.json"), json.dumps(result, indent=2))
    losses = f"loss {first:.4f} -> {last:.4f}; " if rows else ""
    print(f"done: {summary.steps} steps in {summary.seconds:.1f} s, {summary.tokens_per_s:.0f} tokens/s, "
          f"{losses}results in {os.path.abspath(out)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
