"""The training loop: train() -> train_step() -> forward_loss() + backward. Short, split by verb.

Loss normalisation happens here: before a step's first backward, the target tokens of all its
micro-batches on all ranks are counted (one all-reduce), and every micro-batch loss is divided by
that count. The gradient of a global batch then does not depend on how it is split.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from dft_ds.data import StepSampler, shard_rows
from dft_ds.errors import NonFiniteStop
from dft_ds.faults import fault_here, inject_fault, limit_memory, nan_gradient, pace_step
from dft_ds.loss import (HIST_BINS, IGNORE_INDEX, FusedHead, LossParts, Reference, TokenWeight, compute_loss,
                         token_weight)
from dft_ds.metrics import peak_memory_gib


@dataclass
class StepSums:
    """Detached local sums over one optimizer step, all-reduced only when logged."""

    loss: float = 0.0
    nll: float = 0.0
    prob: float = 0.0
    targets: int = 0
    tokens: int = 0
    low_prob: int = 0
    kl: float = 0.0
    skipped: int = 0
    samples: int = 0  # training samples (documents; with data.packing several share a row)
    weight: float = 0.0  # sum of the detached token weights
    zero_weight: int = 0  # target tokens at weight 0
    entropy: float = 0.0  # eaft: sum of the normalised entropies
    hist: list[float] = field(default_factory=lambda: [0.0] * HIST_BINS)

    @classmethod
    def from_parts(cls, parts: LossParts, tokens: int, samples: int = 0) -> "StepSums":
        return cls(loss=float(parts.loss_sum), nll=float(parts.nll_sum), prob=float(parts.prob_sum),
                   targets=parts.tokens, tokens=tokens, low_prob=parts.low_prob, kl=parts.kl_sum,
                   samples=samples, weight=parts.weight_sum, zero_weight=parts.zero_weight,
                   entropy=parts.entropy_sum, hist=parts.hist.tolist())

    def add(self, other: "StepSums") -> None:
        self.loss += other.loss
        self.nll += other.nll
        self.prob += other.prob
        self.targets += other.targets
        self.tokens += other.tokens
        self.low_prob += other.low_prob
        self.kl += other.kl
        self.skipped += other.skipped
        self.samples += other.samples
        self.weight += other.weight
        self.zero_weight += other.zero_weight
        self.entropy += other.entropy
        self.hist = [a + b for a, b in zip(self.hist, other.hist)]

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.loss, self.nll, self.prob, self.targets, self.tokens, self.low_prob, self.kl,
                             self.skipped, self.samples, self.weight, self.zero_weight, self.entropy, *self.hist],
                            dtype=torch.float64)


@dataclass
class Summary:
    """This session's figures (a resumed run's later segment counts from `start_step`)."""

    start_step: int = 0
    steps: int = 0  # the step reached: the run's, not this session's count
    tokens: int = 0
    seconds: float = 0.0  # training only: the loop's wall time less evaluation and checkpoint saves
    eval_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    wall_seconds: float = 0.0  # this session's loop, all of it
    preempted: bool = False
    history: list[dict] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class LoopClock:
    """The loop's wall time, split: evaluation and checkpoint saves are paused out of the training time,
    so tokens/s counts training only (an evaluation inside a logging window would otherwise show as a
    slow window)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.paused = {"eval": 0.0, "checkpoint": 0.0}

    @contextlib.contextmanager
    def pause(self, what: str):
        began = time.perf_counter()
        try:
            yield
        finally:
            self.paused[what] += time.perf_counter() - began

    def wall(self) -> float:
        return time.perf_counter() - self.start

    def training(self) -> float:
        return self.wall() - sum(self.paused.values())


def timed(evaluate: Callable[[int], dict]) -> Callable[[int], dict]:
    """The evaluator, its result with the seconds it took (eval.jsonl and the eval line show them)."""

    def run(step: int) -> dict:
        began = time.perf_counter()
        result = evaluate(step)
        return {**result, "seconds": round(time.perf_counter() - began, 3)}

    return run


class StopSignal:
    """SIGUSR1/SIGTERM set a flag; the loop checks it at the next step boundary (all ranks agree)."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def install(self) -> "StopSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            # A second signal means "now": launchers send SIGTERM again (or SIGKILL) when a peer died and
            # the step boundary may never come.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.requested = True

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class LoopHooks:
    """What the loop calls at its cadence points, each optional: `save(step)` (checkpoint.Checkpointer),
    `evaluate(step) -> dict` (in-training evaluation), and the stop signal it polls."""

    save: Optional[Callable[[int], Any]] = None
    evaluate: Optional[Callable[[int], dict]] = None
    stop: Optional[StopSignal] = None


class Trainer:
    """The loop of a run: built from its plan (runplan.RunPlan: data, steps, loss and cadence settings),
    its engine, sampler and metrics, asft's reference when the loss uses one, and the hooks."""

    def __init__(self, plan, engine, sampler: StepSampler, metrics, reference=None, hooks: Optional[LoopHooks] = None):
        cfg, hooks = plan.cfg, hooks or LoopHooks()
        self.engine, self.data, self.sampler, self.metrics = engine, plan.data, sampler, metrics
        self.loss, self.total_steps, self.log_every = cfg.loss, plan.total_steps, cfg.logging.every_steps
        self.fused, self.reference, self.hist_every = plan.fused, reference, cfg.logging.hist_every
        self._hist_due = self.hist_every  # the next step at or after which the histogram is written
        self.nonfinite, self.max_skipped, self.skipped = cfg.train.nonfinite, cfg.train.max_skipped_steps, 0
        self.stop_at_step = cfg.train.stop_at_step
        self.heldout, self.heldout_every, self.heldout_micro = plan.heldout, cfg.eval.loss_every, plan.batch.micro_batch_size
        self.evaluate = timed(hooks.evaluate) if hooks.evaluate is not None else None
        self.eval_every = cfg.eval.every_steps
        self.save, self.save_every, self.stop = hooks.save, cfg.checkpoint.every_steps, hooks.stop or StopSignal()

    def train(self) -> Summary:
        self.engine.train()
        summary, window, clock = Summary(start_step=self.sampler.step), StepSums(), LoopClock()
        window_start = 0.0  # training seconds at the start of the logging window
        self.metrics.advance(self.sampler.step)
        while self.sampler.step < self.total_steps:
            step = self.sampler.step
            lr = self.engine.lr  # the rate this step uses; the scheduler advances inside the step
            sums = self.train_step(self.sampler.indices_for_step(step))
            if sums is None:
                summary.preempted = True
                break
            window.add(sums)
            norm = self.engine.grad_norm
            if norm is not None and not math.isfinite(norm) and not sums.skipped:
                # The loss was finite on every rank, the gradient is not. DeepSpeed 0.19's ZeRO-2/3
                # optimizers discard such a step in every precision ("OVERFLOW! Skipping step"), but
                # not every release or stage does; this state is not saved either way.
                raise NonFiniteStop(f"non-finite gradient norm ({norm}) with a finite loss at step {step + 1}; "
                                    "this state is not saved", save=False)
            self.sampler.step = step + 1
            self.metrics.advance()
            if self.sampler.step % self.log_every == 0 or self.sampler.step == self.total_steps:
                now = clock.training()
                summary.history.append(self.maybe_log(self.sampler.step, window, now - window_start, lr,
                                                      elapsed=clock.wall()))
                window, window_start = StepSums(), now
            with clock.pause("eval"):  # evaluations run here are not training time
                self.maybe_evaluate(self.sampler.step)
            with clock.pause("checkpoint"):
                self.maybe_save(self.sampler.step)
            if self.sampler.step == self.stop_at_step and self.sampler.step < self.total_steps:
                summary.preempted = True
                break
        summary.seconds, summary.wall_seconds = clock.training(), clock.wall()
        summary.eval_seconds, summary.checkpoint_seconds = clock.paused["eval"], clock.paused["checkpoint"]
        summary.steps = self.sampler.step
        summary.tokens = sum(r["tokens"] for r in summary.history)
        return summary

    def maybe_evaluate(self, step: int) -> None:
        """All ranks take part (the model is sharded); rank 0's logger records the result."""
        if self.evaluate is not None and self.eval_every and step % self.eval_every == 0:
            self.metrics.log_eval(step, self.evaluate(step))
        if self.heldout is not None and self.heldout_every and step % self.heldout_every == 0:
            self.metrics.log_heldout(step, self.heldout_loss(step))

    def maybe_save(self, step: int) -> None:
        if self.save is not None and self.save_every and step % self.save_every == 0:
            self.save(step)

    def train_step(self, micro_indices: list[list[int]]) -> Optional[StepSums]:
        """One optimizer step, or None (nothing done) when a stop was requested on any rank."""
        pace_step()
        sp = self.engine.sp.group  # train.sequence_parallel: each rank of a group takes its slice of the same rows
        batches = [shard_rows(self.data.batch(idx), sp.rank, sp.size, self.data.pad_id) for idx in micro_indices]
        local_targets = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
        # Sync point: every rank learns the step's total target count before its first backward,
        # and whether any rank was asked to stop (one all-reduce carries both).
        counts = self.engine.all_reduce_sum(torch.tensor([local_targets, float(self.stop.requested)],
                                                         dtype=torch.float64))
        if counts[1] > 0:
            return None
        num_tokens = counts[0]
        weighting = self.weighting(self.sampler.step)
        sums = StepSums()
        limit_memory(self.sampler.step + 1)
        for i, batch in enumerate(batches):
            tokens = batch.pop("n_tokens")
            # Forward and backward (where checkpointed layers run again) exchange across the group.
            with self.engine.sequence_parallel():
                with self.engine.offloaded_activations():
                    loss, parts = self.forward_loss(batch, self.normaliser(num_tokens, batch), weighting)
                # Sync point: every rank learns whether any rank's loss is not finite, before a NaN can
                # reach the gradients (one more all-reduce of one number per micro-batch).
                bad = not bool(torch.isfinite(loss.detach()).all())
                if self.engine.all_reduce_sum(torch.tensor([float(bad)], dtype=torch.float64))[0] > 0:
                    del loss, parts
                    return self.nonfinite_loss(len(batches) - i)
                with nan_gradient(self.engine.module, self.sampler.step + 1):
                    self.engine.backward(loss)
            # A row's documents are counted once per sequence-parallel group.
            samples = self.samples_in(micro_indices[i]) if sp.rank == 0 else 0
            sums.add(StepSums.from_parts(parts, tokens, samples=samples))
            self.engine.step()
        return sums

    def normaliser(self, step_targets: torch.Tensor, batch: dict) -> torch.Tensor:
        """What a micro-batch's summed token losses are divided by (engine.backward then multiplies by
        the world size and DeepSpeed averages over ranks).

        step: the step's target tokens on all ranks, so the gradient is the mean over every target
        token of the step. micro_batch_mean: this micro-batch's own targets times the world size, so
        the gradient is the paper code's: the sum over micro-batches of each one's token mean,
        averaged over ranks.
        """
        if self.loss.normalize == "micro_batch_mean":
            mine = int((batch["labels"] != IGNORE_INDEX).sum())
            return torch.tensor(float(mine * self.engine.dist.world_size), dtype=torch.float64)
        return step_targets

    def samples_in(self, rows: list[int]) -> int:
        """Training samples (documents) in these rows: with packing a row holds several."""
        return sum(self.data.rows.doc_count(i) for i in rows)

    def nonfinite_loss(self, remaining: int) -> Optional[StepSums]:
        """train.nonfinite: stop raises NonFiniteStop; skip runs the step's optimizer update at lr 0."""
        step = self.sampler.step + 1
        if self.nonfinite == "skip" and self.skipped < self.max_skipped:
            self.skipped += 1
            self.metrics.print(f"warning: non-finite loss at step {step}: step skipped (no weight changed; "
                               f"{self.skipped} skipped so far)")
            for left in range(remaining, 0, -1):  # DeepSpeed's micro-step count reaches the boundary as usual
                self.engine.null_backward()
                if left == 1:  # the boundary: its optimizer step runs at lr 0
                    self.engine.zero_lr_for_this_step()
                self.engine.step()
            return StepSums(skipped=1)
        why = (f"more than train.max_skipped_steps={self.max_skipped} skipped" if self.nonfinite == "skip"
               else "train.nonfinite=stop")
        raise NonFiniteStop(f"non-finite loss at step {step} ({why}); nothing of step {step} was applied")

    def weighting(self, step: int) -> TokenWeight:
        lo = self.loss
        return token_weight(lo.type, step=step, prob_floor=lo.prob_floor, alpha=lo.alpha, mix_start=lo.mix_start,
                            mix_end=lo.mix_end, eaft_top_k=lo.eaft_top_k, threshold=lo.threshold,
                            threshold_base=lo.threshold_base)

    def forward_loss(self, batch: dict, num_tokens: torch.Tensor, weighting: TokenWeight):
        """(loss to back-propagate, LossParts) for one micro-batch."""
        # The reference exists only when the loss uses it (LossConfig.uses_reference).
        ref = self.reference.forward(batch, hidden=self.fused) if self.reference is not None else None
        kl_coef = self.loss.kl_coef if ref is not None else 0.0
        if self.fused:
            loss, parts = self._fused_forward(batch, num_tokens, weighting, ref, kl_coef)
        else:
            logits = self.engine.forward(batch).logits
            parts = compute_loss(weighting, logits, batch["labels"].to(logits.device),
                                 num_tokens=num_tokens.to(logits.device), ref_logits=ref, kl_coef=kl_coef)
            loss = parts.loss
        inject_fault("kill_in_step", self.sampler.step + 1)
        if fault_here("oom", self.sampler.step + 1):
            raise torch.OutOfMemoryError("injected by DFT_DS_FAULT=oom (a test of the out-of-memory path)")
        if fault_here("nan_loss", self.sampler.step + 1):
            loss = loss * float("nan")
        return loss, parts

    def _fused_forward(self, batch, num_tokens, weighting, ref_hidden, kl_coef):
        """The chunked head and loss inside the model's forward (loss.FusedHead; ZeRO-3 gathers the head)."""
        reference = Reference(ref_hidden, self.reference, kl_coef) if ref_hidden is not None else None
        head = FusedHead(batch["labels"], weighting, num_tokens=num_tokens, chunk_budget=self.loss.chunk_mb << 20,
                         reference=reference)
        parts = self.engine.forward(batch, head=head)
        return parts.loss, parts

    def maybe_log(self, step: int, window: StepSums, seconds: float, lr: float, elapsed: float = 0.0) -> dict:
        """Reduce the window's sums over ranks (all ranks take part) and hand them to rank 0's logger.

        `seconds`: the window's training time (no evaluation or checkpoint saves); `elapsed`: wall
        seconds since this session's loop began, everything included.
        """
        loss, nll, prob, targets, tokens, low, kl, skipped, samples, weight, zero_weight, entropy, *hist = \
            self.engine.all_reduce_sum(window.as_tensor()).tolist()
        skipped /= self.engine.dist.world_size  # every rank counts the same skipped step
        # A window of skipped steps only has no targets: its per-token figures are null, not 0.
        per_token = (lambda x: x / targets) if targets else (lambda x: None)
        record = {
            "loss": per_token(loss),
            "nll": per_token(nll),
            "mean_token_prob": per_token(prob),
            "low_prob_share": per_token(low),  # share of target tokens with p < loss.LOW_PROB
            "mean_weight": per_token(weight),  # the detached token weight w of -w log p
            "zero_weight_share": per_token(zero_weight),
            "lr": lr,
            "grad_norm": self.engine.grad_norm,
            "tokens": int(tokens),
            "target_tokens": int(targets),
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            "samples_per_s": samples / seconds if seconds > 0 else 0.0,
            "epoch": round(step / self.sampler.steps_per_epoch, 4),
            "elapsed_s": round(elapsed, 3),
            "peak_memory_gib": round(peak_memory_gib(self.engine.device), 4),  # rank 0's
        }
        if self.reference is not None:
            record["kl_ref"] = per_token(kl)
        if self.loss.type == "eaft":
            record["mean_entropy"] = per_token(entropy)  # normalised: H_k / ln k
        if skipped:
            record["skipped_steps"] = int(round(skipped))
        if self.hist_every and step >= self._hist_due:
            record["prob_hist"] = [int(c) for c in hist]
            self._hist_due = (step // self.hist_every + 1) * self.hist_every
        self.metrics.log(step, record)
        return record

    def heldout_loss(self, step: int) -> dict:
        """eval.loss_every: the loss (this step's weighting), NLL and mean token probability on the
        held-out rows, without gradients. Rows are dealt to ranks in turn, and every rank runs the
        same number of forwards (ZeRO-3 gathers parameters collectively): a rank out of rows runs
        one more on row 0 and counts nothing from it."""
        began = time.perf_counter()
        rows, world, rank = len(self.heldout.rows), self.engine.dist.world_size, self.engine.dist.rank
        mine = list(range(rank, rows, world))
        per_rank = -(-rows // world)
        forwards = -(-per_rank // self.heldout_micro)
        weighting = self.weighting(step)
        sums = torch.zeros(4, dtype=torch.float64)  # loss, nll, prob, targets
        self.engine.eval()
        try:
            with torch.no_grad():
                for k in range(forwards):
                    chunk = mine[k * self.heldout_micro:(k + 1) * self.heldout_micro]
                    batch = self.heldout.batch(chunk or [0])
                    batch.pop("n_tokens")
                    parts = self._heldout_parts(batch, weighting)
                    if chunk:
                        sums += torch.tensor([float(parts.loss_sum), float(parts.nll_sum), float(parts.prob_sum),
                                              parts.tokens], dtype=torch.float64)
        finally:
            self.engine.train()
        loss, nll, prob, targets = self.engine.all_reduce_sum(sums).tolist()
        per_token = (lambda x: x / targets) if targets else (lambda x: None)
        return {"loss": per_token(loss), "nll": per_token(nll), "mean_token_prob": per_token(prob),
                "rows": rows, "target_tokens": int(targets), "seconds": round(time.perf_counter() - began, 3)}

    def _heldout_parts(self, batch: dict, weighting: TokenWeight) -> LossParts:
        one = torch.ones((), dtype=torch.float64)  # the sums are read, the normalised loss is not
        if self.fused:
            _, parts = self._fused_forward(batch, one, weighting, None, 0.0)
            return parts
        logits = self.engine.forward(batch).logits
        return compute_loss(weighting, logits, batch["labels"].to(logits.device), num_tokens=one.to(logits.device))
