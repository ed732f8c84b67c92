"""Run ONE optimizer step of the real trainer and save the full gradient it produced (rank 0).

Started by tests under torchrun with different (ranks x accumulation) splits of the same global
batch: `python -m torch.distributed.run --nproc-per-node N grad_probe.py OUT.pt [overrides...]`.
The gradient is read with DeepSpeed's safe_get_full_grad at the accumulation boundary, just
before the optimizer consumes it.

Several probes in one launch (what tests that only compare numbers use, tests/distributed/helpers.py
run_probes): `grad_probe.py --many SPEC.json`, SPEC a list of {"out": OUT.pt, "overrides": [...],
"rows": DFT_PROBE_ROWS or null}; each probe builds its own engines on the one process group.
"""

import gc
import json
import os
import sys

import torch
from deepspeed.utils import safe_get_full_grad

from dft_ds.config import load_config
from dft_ds.procgroup import exit_rank, shutdown_distributed
from dft_ds.metrics import NullMetrics
from dft_ds.runplan import build_plan
from dft_ds.train import build_session, world_size_from_env
from dft_ds.trainer import Trainer


def probe_rows(rank: int):
    """DFT_PROBE_ROWS="0,1|2": rank 0 steps on micro-batches [row 0], [row 1] and rank 1 on [row 2] (one row
    each), instead of the sampler's rows; unset: the sampler's."""
    spec = os.environ.get("DFT_PROBE_ROWS")
    if not spec:
        return None
    return [[int(i)] for i in spec.split("|")[rank].split(",")]


def probe_step(overrides: list[str]):
    """One optimizer step of the real trainer with the full gradient captured at the boundary.

    Returns (result, plan, dist, engine, sampler); result holds the gradients, the step's reduced
    logging sums (`totals`) and the plan's loss head."""
    cfg = load_config(None, overrides)
    plan = build_plan(cfg, world_size_from_env())
    dist, engine, reference, sampler = build_session(plan)
    captured = {}
    real_step = engine.step

    def step_and_capture():
        if engine.ds.is_gradient_accumulation_boundary():
            for name, param in engine.module.named_parameters():
                if not param.requires_grad:  # frozen (model.lora): no gradient, on every rank alike
                    continue
                grad = safe_get_full_grad(param)  # a collective under ZeRO-3: every rank calls it
                captured[name] = grad.detach().double().cpu().clone()
        real_step()

    engine.step = step_and_capture
    trainer = Trainer(plan, engine, sampler, NullMetrics(), reference)
    engine.train()
    sums = trainer.train_step(probe_rows(dist.rank) or sampler.indices_for_step(sampler.step))  # 0, or the resumed step
    totals = engine.all_reduce_sum(sums.as_tensor()).tolist()
    result = {"grads": captured, "totals": totals, "fused": plan.fused}
    return result, plan, dist, engine, sampler


def main(out_path: str, overrides: list[str]) -> None:
    result, plan, dist, engine, _ = probe_step(overrides)
    totals = result["totals"]
    if dist.is_rank0:
        torch.save({"grads": result["grads"], "loss": totals[0] / totals[3], "targets": totals[3], "totals": totals,
                    "kl": totals[6] / totals[3], "world_size": dist.world_size, "fused": plan.fused,
                    "accum": plan.batch.gradient_accumulation_steps}, out_path)
    engine.barrier()  # nobody tears down gloo while another rank is still in a collective


def main_many(spec_path: str) -> None:
    """Every probe of the spec in turn, each with its own DFT_PROBE_ROWS; the engines of one are let go
    before the next is built."""
    with open(spec_path, encoding="utf-8") as fh:
        probes = json.load(fh)
    for probe in probes:
        os.environ.pop("DFT_PROBE_ROWS", None)
        if probe.get("rows"):
            os.environ["DFT_PROBE_ROWS"] = probe["rows"]
        main(probe["out"], probe["overrides"])
        gc.collect()


if __name__ == "__main__":
    try:
        if sys.argv[1] == "--many":
            main_many(sys.argv[2])
        else:
            main(sys.argv[1], sys.argv[2:])
    finally:
        shutdown_distributed()
    exit_rank(0)  # not a plain return: see procgroup.exit_rank
