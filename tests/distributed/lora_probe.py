"""Train a LoRA run for train.max_steps with the real trainer, then save every parameter, gathered
(rank 0): `python -m torch.distributed.run --nproc-per-node 2 lora_probe.py OUT.pt [overrides...]`.

OUT.pt holds {"params": {name: fp64 tensor}, "trainable": [names], "losses": [per step]}.
"""

import sys

import deepspeed
import torch

from dft_ds.config import load_config
from dft_ds.procgroup import exit_rank, shutdown_distributed
from dft_ds.metrics import NullMetrics
from dft_ds.runplan import build_plan
from dft_ds.train import build_session, world_size_from_env
from dft_ds.trainer import Trainer


def main(out_path: str, overrides: list[str]) -> None:
    cfg = load_config(None, overrides)
    plan = build_plan(cfg, world_size_from_env())
    dist, engine, reference, sampler = build_session(plan)
    trainer = Trainer(plan, engine, sampler, NullMetrics(), reference)
    engine.train()
    losses = []
    for step in range(plan.total_steps):
        sums = trainer.train_step(sampler.indices_for_step(step))
        totals = engine.all_reduce_sum(sums.as_tensor()).tolist()
        losses.append(totals[0] / totals[3])
        sampler.step = step + 1
    params = dict(engine.module.named_parameters())
    gathered = {}
    for name, p in params.items():  # one collective per parameter under ZeRO-3, every rank alike
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None, enabled=hasattr(p, "ds_id")):
            gathered[name] = p.detach().double().cpu().clone()
    if dist.is_rank0:
        torch.save({"params": gathered, "trainable": [n for n, p in params.items() if p.requires_grad],
                    "losses": losses}, out_path)
    engine.barrier()


if __name__ == "__main__":
    try:
        main(sys.argv[1], sys.argv[2:])
    finally:
        shutdown_distributed()
    exit_rank(0)  # not a plain return: see procgroup.exit_rank
