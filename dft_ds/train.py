"""`dft-train [CONFIG.yaml] [section.key=value ...]`: one entry for every way of starting a run.

Runs unchanged as one plain process, under `deepspeed --module dft_ds.train` (which adds
`--local_rank=N`), under `torchrun -m dft_ds.train`, and under `srun python -m dft_ds.train`.
Bad input exits with code 2 before the run directory is created, so nothing is left behind that
a later run could mistake for a good one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
from dataclasses import dataclass
from typing import Any

from dft_ds.config import SYNTHETIC_PROFILE, BatchPlan, Config, describe_fields, load_config, resolve_batch, save_config
from dft_ds.errors import EXIT_BAD_INPUT, UserError

EXAMPLES = """\
examples:
  dft-train                                   # the embedded default: tiny Llama, synthetic math, DFT
  dft-train configs/qwen2.5-math-1.5b_numina.yaml train.output_dir=runs/q15
  deepspeed --num_gpus 8 --module dft_ds.train CONFIG.yaml loss.type=sft
  torchrun --nproc-per-node 2 -m dft_ds.train train.max_steps=20
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
    try:
        cfg = load_config(ns.config, ns.overrides)
        return run(cfg)
    except UserError as exc:
        print(f"dft-train: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    finally:
        from dft_ds.engine import shutdown_distributed

        shutdown_distributed()


def check_output_dir(path: str) -> None:
    if os.path.isdir(path) and os.listdir(path):
        raise UserError(f"train.output_dir: '{path}' already holds files; choose a new directory "
                        "(runs are never overwritten)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"train.output_dir: '{path}' exists and is not a directory")


@dataclass
class Run:
    """Everything a run needs, built and validated before the run directory exists."""

    cfg: Config
    dist: Any
    plan: BatchPlan
    data: Any
    sampler: Any
    engine: Any
    total_steps: int
    precision: str
    ds_config: dict


def build_run(cfg: Config) -> Run:
    """Process group, data, model and engine; raises UserError on bad input before writing anything."""
    from dft_ds import engine as eng
    from dft_ds import model as mdl
    from dft_ds.data import StepSampler, build_train_data

    # Every rank checks before the rendezvous; rank 0 creates the directory only after it.
    check_output_dir(cfg.train.output_dir)
    dist = eng.init_distributed()
    plan = resolve_batch(cfg.train, dist.world_size)
    tokenizer = mdl.load_tokenizer(cfg.model)
    model_config = mdl.load_model_config(cfg.model, tokenizer)
    data = build_train_data(cfg.data, tokenizer, cfg.train.seed)
    sampler = StepSampler(len(data.rows), plan, dist.rank, cfg.train.seed)
    total_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * sampler.steps_per_epoch)
    precision = eng.resolve_precision(cfg.train.precision)
    on_cpu = eng.device().type == "cpu"
    ds_config = eng.render_ds_config(cfg, plan, precision, model_config.hidden_size, on_cpu)
    model, keepalive = mdl.build_model(cfg.model, model_config, ds_config, eng.torch_dtype(precision), cfg.train.seed)
    engine = eng.Engine(model, ds_config, dist, total_steps, cfg)
    del keepalive
    return Run(cfg, dist, plan, data, sampler, engine, total_steps, precision, ds_config)


def start_run_dir(run: Run):
    """Rank 0 creates the run directory and its logger; other ranks get a null logger."""
    from dft_ds.metrics import MetricsLogger, NullMetrics

    cfg, out = run.cfg, run.cfg.train.output_dir
    if not run.dist.is_rank0:
        return NullMetrics()
    os.makedirs(out, exist_ok=True)
    save_config(cfg, os.path.join(out, "config.yaml"),
                extra={"world_size": run.dist.world_size, "precision": run.precision})
    with open(os.path.join(out, "ds_config.json"), "w", encoding="utf-8") as fh:
        json.dump(run.ds_config, fh, indent=2)
    return MetricsLogger(out, cfg.logging.tensorboard, cfg.logging.progress_bar, run.total_steps)


def run(cfg: Config) -> int:
    from dft_ds.engine import zero_stage
    from dft_ds.trainer import Trainer

    r = build_run(cfg)
    metrics = start_run_dir(r)
    plan, out = r.plan, cfg.train.output_dir
    metrics.print(f"data: {r.data.report.summary()}")
    metrics.print(f"batch: micro {plan.micro_batch_size} x accumulation {plan.gradient_accumulation_steps} x "
                  f"world {plan.world_size} = global {plan.global_batch_size}; {r.total_steps} steps; "
                  f"loss {cfg.loss.type}; precision {r.precision}; zero stage {zero_stage(r.ds_config)}")
    r.engine.barrier()

    trainer = Trainer(r.engine, r.data, r.sampler, cfg.loss, r.total_steps, cfg.logging.every_steps, metrics)
    summary = trainer.train()
    if cfg.checkpoint.save_final:
        r.engine.save_checkpoint(os.path.join(out, "checkpoints"), "final",
                                 {"global_step": summary.steps, "sampler": r.sampler.state_dict()})
    metrics.close()
    if r.dist.is_rank0:
        write_summary(summary, out, r.dist.world_size)
    r.engine.barrier()
    return 0


def write_summary(summary, out: str, world_size: int) -> None:
    result = {"steps": summary.steps, "seconds": round(summary.seconds, 3), "tokens": summary.tokens,
              "tokens_per_s": round(summary.tokens_per_s, 1), "first_loss": summary.first_loss,
              "last_loss": summary.last_loss, "world_size": world_size, "output_dir": os.path.abspath(out)}
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    print(f"done: {summary.steps} steps in {summary.seconds:.1f} s, {summary.tokens_per_s:.0f} tokens/s, "
          f"loss {summary.first_loss:.4f} -> {summary.last_loss:.4f}; results in {os.path.abspath(out)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
