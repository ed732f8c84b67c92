"""`dft-train [CONFIG.yaml] [section.key=value ...]`: one entry for every way of starting a run.

This file is the command line and `run()`, which composes the rooms: the plan (runplan.py), the
process group and engines (engine.py), the run directory (rundir.py), checkpoints (checkpoint.py)
and the loop (trainer.py).

Runs unchanged as one plain process, under `deepspeed --module dft_ds.train` (which adds
`--local_rank=N`), under `torchrun -m dft_ds.train`, and under `srun python -m dft_ds.train`.
Bad input exits with code 2 before the run directory is created, so nothing is left behind that
a later run could mistake for a good one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import textwrap

from dft_ds.config import SYNTHETIC_PROFILE, Config, describe_fields, load_config
from dft_ds.errors import (EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_OUT_OF_MEMORY, EXIT_PREEMPTED, EXIT_SAVE_FAILED,
                           NonFiniteStop, SaveFailed, UserError, report_exit_code)

EXAMPLES = """\
examples:
  dft-train                                   # the embedded default: tiny Llama, synthetic math, DFT
  dft-train configs/qwen2.5-math-1.5b_numina.yaml train.output_dir=runs/q15
  deepspeed --num_gpus 8 --module dft_ds.train CONFIG.yaml loss.type=sft train.output_dir=runs/my-sft
  torchrun --nproc-per-node 2 -m dft_ds.train train.max_steps=20
  dft-train --check CONFIG.yaml --world-size 8   # validate everything and print the plan; writes nothing
  dft-train --prepare-data data/numina-tok CONFIG.yaml  # tokenise once; then data.source=data/numina-tok
"""


class _Parser(argparse.ArgumentParser):
    """dft-train's parser: the settings reference at the end of --help is written when help is shown (it
    reads every field's docstring, about 0.2 s, which a start need not pay)."""

    def format_help(self) -> str:
        if self.epilog is None:
            self.epilog = EXAMPLES + "\nsettings (section.key: type = default):\n" + _settings_help()
        return super().format_help()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(
        prog="dft-train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a causal LM with DFT (or SFT) on DeepSpeed. Settings come from the defaults, "
                    "then CONFIG.yaml, then section.key=value overrides (later wins).")
    parser.add_argument("args", nargs="*", metavar="CONFIG.yaml | section.key=value",
                        help="an optional YAML config file first, then any number of overrides")
    # The deepspeed launcher appends --local_rank=N; torchrun and srun pass it in the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true",
                        help="validate config, data, tokenizer/model and DeepSpeed config, print the plan (samples, "
                             "tokens, steps, per-rank memory estimate) and exit 0, or 2 on bad input; writes nothing "
                             "in train.output_dir (the tokenised data goes to data.cache_dir, where the run finds it)")
    parser.add_argument("--prepare-data", metavar="DIR", default=None,
                        help="tokenise data.source as the run would (or take it from data.cache_dir) into the new "
                             "folder DIR and exit: later runs, or every run of a sweep, read it with data.source=DIR "
                             "and the same tokenizer and data settings, without tokenising")
    parser.add_argument("--translate", metavar="FLAT.yaml", default=None,
                        help="print a flat LLaMA-Factory, TRL or HF Trainer YAML (model_name_or_path:, use_dft_loss:, "
                             "deepspeed: ds_z3_config.json, ...) as a dft_ds config with sections, and what has no "
                             "equivalent as comments at its end; save it with `> dft.yaml` (docs/configuration.md)")
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="with --check: the number of ranks to plan for (default: $WORLD_SIZE or 1)")
    # Options and overrides may come in any order: `--check CONFIG --world-size 8 key=value`.
    ns = parser.parse_intermixed_args(argv)
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
    if ns.translate:
        return translate(ns.translate)
    if ns.check:
        return check(ns)
    if ns.prepare_data:
        return prepare_data(ns)
    try:
        try:
            rc = run(load_config(ns.config, ns.overrides))
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
        report_exit_code(rc, message)
        return rc
    finally:
        from dft_ds.procgroup import shutdown_distributed

        shutdown_distributed()


def cli() -> None:
    """The program (`dft-train`, `python -m dft_ds.train`): main(), then the rank ends through exit_rank."""
    from dft_ds.procgroup import exit_rank

    try:
        code = main()
    except Exception:  # noqa: BLE001  (a traceback and 1, as Python's own exit would give)
        import traceback

        traceback.print_exc()
        code = 1
    exit_rank(code)


def translate(path: str) -> int:
    """`--translate`: a flat config printed with sections; what has no equivalent, as comments and on stderr."""
    from dft_ds.config import translate_flat_file
    from dft_ds.translate import render

    try:
        translation = translate_flat_file(path)
    except OSError as exc:
        print(f"dft-train: error: {path}: {exc.strerror}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # yaml's errors
        print(f"dft-train: error: {path}: not valid YAML ({exc})", file=sys.stderr)
        return EXIT_BAD_INPUT
    if translation is None:
        print(f"dft-train: error: {path}: nothing to translate (a mapping whose keys are all dft_ds sections: model:, "
              "data:, ...; give it to dft-train as it is)", file=sys.stderr)
        return EXIT_BAD_INPUT
    sys.stdout.write(render(translation, path))
    print(f"dft-train: translated {len(translation.done)} settings of {path}"
          + (f"; {len(translation.left_out)} {'has' if len(translation.left_out) == 1 else 'have'} no equivalent "
             "here (listed at the end):" if translation.left_out else ""), file=sys.stderr)
    for line in translation.left_out:
        print(f"  {line}", file=sys.stderr)
    return 0


def world_size_from_env() -> int:
    from dft_ds.procgroup import map_launcher_env

    map_launcher_env()
    return int(os.environ["WORLD_SIZE"])


def check(ns: argparse.Namespace) -> int:
    """`--check`: the plan the run would build, printed; nothing written, no process group."""
    from dft_ds.config import trackers
    from dft_ds.deepspeed_setup import quiet_deepspeed
    from dft_ds.metrics import require_trackers

    quiet_deepspeed()
    from dft_ds.runplan import build_plan

    try:
        cfg = load_config(ns.config, ns.overrides)
        require_trackers(trackers(cfg.logging))
        plan = build_plan(cfg, ns.world_size or int(os.environ.get("WORLD_SIZE", "1")))
    except UserError as exc:
        print(f"dft-train: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    print(plan.check_report(), flush=True)
    return 0


def prepare_data(ns: argparse.Namespace) -> int:
    """`--prepare-data DIR`: the training set's tokens in DIR (see tokenised.save_set); no process group.
    Started by a launcher on several ranks, rank 0 does it and the others exit 0 at once."""
    from pathlib import Path

    if os.environ.get("RANK", "0") != "0":
        return 0

    from dft_ds.model import load_tokenizer
    from dft_ds.tokenised import save_set

    try:
        cfg = load_config(ns.config, ns.overrides)
        save_set(cfg.data, load_tokenizer(cfg.model), cfg.train.seed, Path(ns.prepare_data).expanduser())
    except UserError as exc:
        print(f"dft-train: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    return 0


def run(cfg: Config) -> int:
    from dft_ds.deepspeed_setup import import_deepspeed, quiet_deepspeed

    quiet_deepspeed()  # before deepspeed is first imported (by transformers too): it logs at import
    from dft_ds import procgroup

    import_deepspeed()  # first, and without the MLflow import it would make (about 1 s a rank)
    from dft_ds.config import trackers
    from dft_ds.metrics import require_trackers
    from dft_ds.runplan import build_plan
    from dft_ds.trainer import StopSignal

    stop = StopSignal().install()  # early, so a signal during set-up is not fatal
    require_trackers(trackers(cfg.logging))  # a missing W&B/MLflow exits 2 before anything is written
    plan = build_plan(cfg, world_size_from_env())  # every rank checks, before the rendezvous
    if plan.complete:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"dft-train: {plan.complete_message()}", flush=True)
        return 0
    dist = procgroup.init_distributed(cfg.train.comm_timeout_s)
    lock = take_run_lock(plan, dist)
    try:
        if procgroup.any_rank(lock is not None and lock.waited, dist.world_size):
            # A predecessor held the directory while this start planned (a requeued attempt still saving):
            # plan again, so the resume takes the checkpoint it finished.
            plan = build_plan(cfg, dist.world_size)
            if plan.complete:
                if dist.is_rank0:
                    print(f"dft-train: {plan.complete_message()}", flush=True)
                return 0
        return train_locked(plan, dist, stop)
    finally:
        if lock is not None:
            lock.release()


def take_run_lock(plan, dist):
    """Rank 0 takes the run directory's lock before anything in it changes; when a live run holds it,
    every rank exits 2 (rundir.RunLock). A requeued attempt of the same Slurm job waits a while for
    its predecessor to finish saving, but never longer than the peers' collective can wait."""
    from dft_ds import rundir
    from dft_ds.procgroup import any_rank

    t = plan.cfg.train
    lock, refused = None, None
    if dist.is_rank0:
        wait_s = min(1.2 * t.lock_stale_s, 0.8 * t.comm_timeout_s)
        try:
            lock = rundir.RunLock.acquire(t.output_dir, t.lock_stale_s, lambda m: print(f"warning: {m}", flush=True),
                                          wait_s=wait_s)
        except rundir.RunLocked as exc:
            refused = str(exc)
    if any_rank(refused is not None, dist.world_size):
        if lock is not None:
            lock.release()
        raise rundir.RunLocked(refused or f"train.output_dir: '{t.output_dir}' is locked by a live run "
                                          "(rank 0's message names the holder)")
    return lock


def train_locked(plan, dist, stop) -> int:
    """The run, with the run directory's lock held (see run)."""
    from dft_ds import checkpoint as ckpt
    from dft_ds import rundir
    from dft_ds.memory import is_out_of_memory, out_of_memory_advice
    from dft_ds.trainer import LoopHooks, Trainer

    cfg = plan.cfg
    dist, engine, reference, sampler = build_session(plan, dist)
    if dist.is_rank0:  # only now, with every input checked and the lock held, does the run directory change
        rundir.start(plan)
    metrics = rundir.open_metrics(plan, dist.is_rank0)
    for message in plan.warnings:
        metrics.print(f"warning: {message}")
    if plan.resume is not None:
        metrics.print(f"resumed from {plan.resume.tag_dir} at step {sampler.step}")
    metrics.print(f"data: {plan.data.report.summary()}")
    if plan.heldout is not None:
        metrics.print(f"held-out: {plan.heldout_line()}")
    metrics.print(f"{plan.batch_line()}; {plan.loss_line()}")
    engine.barrier()

    root = rundir.checkpoints_dir(cfg.train.output_dir)
    saver = ckpt.Checkpointer.for_run(root, plan, engine, sampler, warn=lambda m: metrics.print(f"warning: {m}"))
    hooks = LoopHooks(save=saver.save, evaluate=build_evaluator(plan, engine), stop=stop)
    trainer = Trainer(plan, engine, sampler, metrics, reference, hooks)
    try:
        summary = trainer.train()
    except NonFiniteStop as exc:
        return stop_nonfinite(exc, sampler.step, saver, root, engine, metrics, stop)
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        advice = out_of_memory_advice(exc, sampler.step + 1, cfg, plan.zero_stage, plan.fused)
        metrics.close("failed")
        print(f"dft-train: error: {advice}", file=sys.stderr, flush=True)
        return EXIT_OUT_OF_MEMORY
    if summary.preempted or cfg.checkpoint.save_final or cfg.export.hf:  # export.hf converts the final checkpoint
        started = time.perf_counter()
        saver.save(summary.steps)
        saved = time.perf_counter() - started  # this session's saves, the final one included
        summary.checkpoint_seconds += saved
        summary.wall_seconds += saved
    metrics.close("stopped" if summary.preempted else "finished")
    stop.uninstall()
    if summary.preempted:
        metrics.print(f"stopped at step {summary.steps} (signal or train.stop_at_step); checkpoint saved, "
                      f"exit code {EXIT_PREEMPTED}: run again to resume")
        engine.barrier()
        return EXIT_PREEMPTED
    if cfg.export.hf:
        export_hf(plan, engine, root, ckpt.tag_for(summary.steps))
    if dist.is_rank0:
        rundir.write_summary(summary, cfg.train.output_dir, dist.world_size)
    engine.barrier()
    return 0


def build_session(plan, dist=None):
    """(dist, engine, reference, sampler) of a plan: the process group (joined here unless `dist` is
    given), the engines, and the resumed state restored (weights, optimizer, schedule, sampler
    position, RNG)."""
    from dft_ds import checkpoint as ckpt
    from dft_ds.engine import build_engines
    from dft_ds.procgroup import init_distributed

    if dist is None:
        dist = init_distributed(plan.cfg.train.comm_timeout_s)
    if dist.world_size != plan.world_size:
        raise RuntimeError(f"planned for {plan.world_size} ranks, but the process group has {dist.world_size}")
    engine, reference = build_engines(plan, dist)
    sampler = plan.sampler(dist.rank)
    if plan.resume is not None:
        ckpt.restore(plan.resume, engine, sampler, universal=plan.load_universal, peak_lr=plan.cfg.train.lr,
                     verify=plan.cfg.checkpoint.verify)
    return dist, engine, reference, sampler


def stop_nonfinite(exc: NonFiniteStop, step: int, saver, root: str, engine, metrics, stop) -> int:
    """Save the last good state (when the current one is) and exit EXIT_NONFINITE, saying where it is."""
    from dft_ds.checkpoint import find_resume

    if exc.save:
        saver.save(step)
    metrics.close("failed")
    stop.uninstall()
    engine.barrier()
    latest = find_resume("auto", root, lambda _m: None, "size") if os.path.isdir(root) else None
    where = f"the last good state is {latest.tag_dir} (step {latest.step})" if latest else \
        "no checkpoint holds a good state"
    if engine.is_rank0:
        print(f"dft-train: error: {exc}; {where}. Look at the data of that step, lower train.lr, or set "
              "train.nonfinite=skip to step over isolated bad batches.", file=sys.stderr, flush=True)
    return EXIT_NONFINITE


def build_evaluator(plan, engine):
    """`eval.every_steps`: the in-training evaluator, sharded over the ranks (see dft_ds/eval/during.py)."""
    if not plan.cfg.eval.every_steps:
        return None
    from dft_ds.eval.during import TrainingEvaluator

    dist = engine.dist
    return TrainingEvaluator(plan.cfg.eval, plan.tokenizer, engine.module, dist.rank, dist.world_size,
                             engine.device, engine.all_reduce_sum, synced=dist.world_size > 1 and plan.zero_stage == 3)


def export_hf(plan, engine, root: str, tag: str) -> None:
    """`export.hf`: rank 0 converts the final checkpoint with the same code as dft-convert."""
    from dft_ds import rundir
    from dft_ds.convert import convert_checkpoint
    from dft_ds.deepspeed_setup import deepspeed_prints_filtered
    from dft_ds.metrics import stdout_is_terminal

    if engine.is_rank0:
        with deepspeed_prints_filtered(conversion=True):  # zero_to_fp32's chatter; dft-convert's lines stay
            convert_checkpoint(os.path.join(root, tag), os.path.join(plan.cfg.train.output_dir, rundir.HF_EXPORT),
                               dtype=plan.cfg.export.dtype, overwrite=True, progress=stdout_is_terminal())
    engine.barrier()


if __name__ == "__main__":
    cli()
