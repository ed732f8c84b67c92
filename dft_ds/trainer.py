"""The training loop: train() -> train_step() -> forward_backward(). Short, split by verb.

Loss normalisation happens here: before a step's first backward, the target tokens of all its
micro-batches on all ranks are counted (one all-reduce), and every micro-batch loss is divided by
that count. The gradient of a global batch then does not depend on how it is split.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from dft_ds.config import LossConfig
from dft_ds.data import IGNORE_INDEX, StepSampler, TrainData
from dft_ds.loss import compute_loss
from dft_ds.metrics import NullMetrics  # noqa: F401  (re-exported for callers that log nothing)


@dataclass
class StepSums:
    """Detached local sums over one optimizer step, all-reduced only when logged."""

    loss: float = 0.0
    nll: float = 0.0
    prob: float = 0.0
    targets: int = 0
    tokens: int = 0

    def add(self, other: "StepSums") -> None:
        self.loss += other.loss
        self.nll += other.nll
        self.prob += other.prob
        self.targets += other.targets
        self.tokens += other.tokens

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.loss, self.nll, self.prob, self.targets, self.tokens], dtype=torch.float64)


@dataclass
class Summary:
    steps: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    tokens: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class Trainer:
    def __init__(self, engine, data: TrainData, sampler: StepSampler, loss: LossConfig, total_steps: int,
                 log_every: int, metrics):
        self.engine, self.data, self.sampler = engine, data, sampler
        self.loss, self.total_steps, self.log_every, self.metrics = loss, total_steps, log_every, metrics

    def train(self) -> Summary:
        self.engine.train()
        summary, window = Summary(), StepSums()
        start = window_start = time.perf_counter()
        while self.sampler.step < self.total_steps:
            step = self.sampler.step
            lr = self.engine.lr  # the rate this step uses; the scheduler advances inside the step
            window.add(self.train_step(self.sampler.indices_for_step(step)))
            self.sampler.step = step + 1
            self.metrics.advance()
            if self.sampler.step % self.log_every == 0 or self.sampler.step == self.total_steps:
                now = time.perf_counter()
                record = self.maybe_log(self.sampler.step, window, now - window_start, lr)
                summary.history.append(record)
                window, window_start = StepSums(), now
        summary.seconds = time.perf_counter() - start
        summary.steps = self.sampler.step
        if summary.history:
            summary.first_loss, summary.last_loss = summary.history[0]["loss"], summary.history[-1]["loss"]
            summary.tokens = sum(r["tokens"] for r in summary.history)
        return summary

    def train_step(self, micro_indices: list[list[int]]) -> StepSums:
        batches = [self.data.batch(idx) for idx in micro_indices]
        local_targets = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
        # Sync point: every rank learns the step's total target count before its first backward.
        num_tokens = self.engine.all_reduce_sum(torch.tensor([local_targets], dtype=torch.float64))[0]
        sums = StepSums()
        for batch in batches:
            sums.add(self.forward_backward(batch, num_tokens))
            self.engine.step()
        return sums

    def forward_backward(self, batch: dict, num_tokens: torch.Tensor) -> StepSums:
        tokens = batch.pop("n_tokens")
        logits = self.engine.forward(batch).logits
        labels = batch["labels"].to(logits.device)
        parts = compute_loss(self.loss.type, logits, labels, num_tokens=num_tokens.to(logits.device),
                             prob_floor=self.loss.prob_floor)
        self.engine.backward(parts.loss)
        return StepSums(float(parts.loss_sum), float(parts.nll_sum), float(parts.prob_sum), parts.tokens, tokens)

    def maybe_log(self, step: int, window: StepSums, seconds: float, lr: float) -> dict:
        """Reduce the window's sums over ranks (all ranks take part) and hand them to rank 0's logger."""
        loss, nll, prob, targets, tokens = self.engine.all_reduce_sum(window.as_tensor()).tolist()
        targets = max(targets, 1.0)
        record = {
            "loss": loss / targets,
            "nll": nll / targets,
            "mean_token_prob": prob / targets,
            "lr": lr,
            "grad_norm": self.engine.grad_norm,
            "tokens": int(tokens),
            "target_tokens": int(targets),
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        }
        self.metrics.log(step, record)
        return record
