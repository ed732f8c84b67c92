"""Evaluation during training (`eval.every_steps`): accuracy on a small subset, sharded across ranks.

Every rank generates for its own slice of the problems (problem i goes to rank i mod world), with
the training model itself. Under ZeRO-3 each forward pass gathers parameters from all ranks, so
every rank must run the same number of passes: the slices are padded to equal length and
`generate(synced_gpus=True)` keeps finished ranks stepping until all are done. The correct counts
are then summed over ranks. Greedy decoding by default, so the curve is not sampling noise.
"""

from __future__ import annotations

import math
from typing import Callable

from dft_ds.eval.benchmarks import load_benchmark, parse_benchmark_arg
from dft_ds.eval.generate import Request, Sampling, eos_ids, generate_batch, request_seed
from dft_ds.eval.grading import extract_answer, is_equivalent
from dft_ds.eval.prompting import build_prompter


class TrainingEvaluator:
    def __init__(self, cfg, tokenizer, module, rank: int, world: int, device,
                 all_reduce_sum: Callable, synced: bool):
        bench = load_benchmark(parse_benchmark_arg(cfg.benchmark), None, cfg.limit, None)
        prompter = build_prompter(tokenizer, cfg.prompt)
        mine = bench.problems[rank::world]
        per_rank = math.ceil(len(bench.problems) / world)
        self.golds = [p.gold for p in mine] + [None] * (per_rank - len(mine))  # None: padding, not graded
        filler = (mine or bench.problems)[0]
        self.requests = [Request(prompter.encode(prompter.render(p.problem)), request_seed(0, bench.name, p.index, 0))
                         for p in mine + [filler] * (per_rank - len(mine))]
        self.sampling = Sampling(cfg.temperature, 1.0, cfg.max_new_tokens, tuple(prompter.stop_ids()))
        self.stops = eos_ids(tokenizer, getattr(module, "generation_config", None))
        self.stops += [i for i in self.sampling.stop_ids if i not in self.stops]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stops[0]
        self.tokenizer, self.module, self.device = tokenizer, module, device
        self.all_reduce_sum, self.synced = all_reduce_sum, synced
        self.name = bench.name

    def __call__(self, step: int) -> dict:
        import torch

        self.module.eval()
        try:
            completions = generate_batch(self.module, self.tokenizer, self.requests, self.sampling,
                                         pad_id=self.pad_id, stops=self.stops, device=self.device,
                                         synced_gpus=self.synced)
        finally:
            self.module.train()
        real = [(c, gold) for c, gold in zip(completions, self.golds) if gold is not None]
        correct = sum(is_equivalent(extract_answer(c.text), gold) for c, gold in real)
        tokens = sum(c.num_tokens for c, _ in real)
        correct, total, tokens = self.all_reduce_sum(
            torch.tensor([correct, len(real), tokens], dtype=torch.float64)).tolist()
        return {"benchmark": self.name, "accuracy": correct / max(total, 1.0), "problems": int(total),
                "generated_tokens": int(tokens)}
