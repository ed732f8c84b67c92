"""For each model family directory: one optimizer step of the real trainer on the fused head and one
on full logits, under 2-rank ZeRO-3, saving (rank 0) both losses and full gradients; then, from the
full-logits engine after its step, the logits of one batch and a checkpoint for dft-convert.

Started by tests/distributed/test_families.py:
  python -m torch.distributed.run --nproc-per-node 2 family_probe.py OUT_DIR NAME=MODEL_DIR ... -- [overrides]
Each family writes OUT_DIR/NAME.pt and OUT_DIR/NAME-run/ (a run directory whose checkpoint is at step 1).
"""

import gc
import os
import sys

import torch
from grad_probe import probe_step  # this directory is on sys.path: the probe runs as a script

from dft_ds import checkpoint as ckpt
from dft_ds import rundir
from dft_ds.procgroup import exit_rank, shutdown_distributed


def one_step(overrides: list[str], keep):
    """(result, dist) of step 1: loss, target count, gradients and the plan's lines; `keep(plan, engine,
    sampler)` runs after the step and its return value is result["extra"]."""
    result, plan, dist, engine, sampler = probe_step(overrides)
    totals = result.pop("totals")
    sampler.step += 1
    result.update(loss=totals[0] / totals[3], targets=totals[3], lines=[plan.batch_line(), plan.loss_line()],
                  extra=keep(plan, engine, sampler) if keep else None)
    engine.barrier()
    del engine
    gc.collect()
    return result, dist


def logits_and_checkpoint(plan, engine, sampler):
    """Logits of the first micro-batch of step 2 from the engine's model, and a checkpoint at step 1."""
    engine.ds.eval()
    batch = plan.data.batch(sampler.indices_for_step(1)[0])
    with torch.no_grad():
        logits = engine.forward(batch).logits.detach().float().cpu()
    if engine.is_rank0:
        rundir.start(plan)
    engine.barrier()
    saver = ckpt.Checkpointer(rundir.checkpoints_dir(plan.cfg.train.output_dir), engine, sampler,
                              plan.checkpoint_record(), plan.tokenizer, keep=2)
    saver.save(1)
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "logits": logits}


def main(out_dir: str, families: list[str], overrides: list[str]) -> None:
    for spec in families:
        name, path = spec.split("=", 1)
        common = [f"model.name_or_path={path}", *overrides]
        fused, _ = one_step(common + ["loss.fused=true", f"train.output_dir={out_dir}/{name}-fused"], None)
        full, dist = one_step(common + ["loss.fused=false", f"train.output_dir={out_dir}/{name}-run"],
                              logits_and_checkpoint)
        if dist.is_rank0:
            torch.save({"fused": fused, "full": full, "world_size": dist.world_size}, os.path.join(out_dir, f"{name}.pt"))


if __name__ == "__main__":
    args = sys.argv[1:]
    split = args.index("--") if "--" in args else len(args)
    try:
        main(args[0], args[1:split], args[split + 1:])
    finally:
        shutdown_distributed()
    exit_rank(0)  # not a plain return: see procgroup.exit_rank
