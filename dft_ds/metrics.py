"""Rank 0 speaks: metrics.jsonl, TensorBoard and a progress bar; other ranks get null objects.

Nothing here computes a value the loop needs.
"""

from __future__ import annotations

import json
import os
from typing import Any

# The files a logger writes in the run directory.
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
TENSORBOARD = "tensorboard"
# Keys of metrics.jsonl -> TensorBoard tags (namespaced).
TB_TAGS = {
    "loss": "train/loss",
    "nll": "train/nll",
    "mean_token_prob": "train/mean_token_prob",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "low_prob_share": "train/low_prob_share",
    "kl_ref": "train/kl_ref",
    "tokens_per_s": "perf/tokens_per_s",
}


class MetricsLogger:
    """Appends one JSON object per logged step and mirrors the main figures to TensorBoard."""

    def __init__(self, output_dir: str, tensorboard: bool, progress_bar: bool, total_steps: int,
                 purge_step: int | None = None):
        self._dir = output_dir
        self._jsonl = open(os.path.join(output_dir, METRICS_FILE), "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events a previous session wrote past the step this one resumes from.
            self._tb = SummaryWriter(os.path.join(output_dir, TENSORBOARD), purge_step=purge_step)
        # The bar is opened at the first step, so the set-up lines print above it, not through it.
        self._bar, self._want_bar, self._total = None, progress_bar, total_steps

    def log(self, step: int, values: dict[str, Any]) -> None:
        record = {"step": step, **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, tag in TB_TAGS.items():
                if values.get(key) is not None:
                    self._tb.add_scalar(tag, values[key], step)
            if values.get("prob_hist"):
                self._add_histogram("train/target_prob", values["prob_hist"], step)
        if self._bar is not None:
            if values.get("loss") is not None:
                self._bar.set_postfix(loss=f"{values['loss']:.4f}", nll=f"{values['nll']:.3f}",
                                      tok_s=f"{values['tokens_per_s']:.0f}", refresh=False)

    def _add_histogram(self, tag: str, counts: list[int], step: int) -> None:
        """Counts of equal bins on [0, 1]; sums are taken at bin centres (TensorBoard wants them)."""
        width = 1.0 / len(counts)
        centres = [(i + 0.5) * width for i in range(len(counts))]
        total = sum(counts)
        if not total:
            return
        self._tb.add_histogram_raw(tag, min=0.0, max=1.0, num=total,
                                   sum=sum(c * x for c, x in zip(counts, centres)),
                                   sum_squares=sum(c * x * x for c, x in zip(counts, centres)),
                                   bucket_limits=[(i + 1) * width for i in range(len(counts))],
                                   bucket_counts=counts, global_step=step)

    def log_eval(self, step: int, values: dict[str, Any]) -> None:
        """Evaluation results go to eval.jsonl (metrics.jsonl stays one row per training step)."""
        with open(os.path.join(self._dir, EVAL_FILE), "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")
        if self._tb is not None:
            self._tb.add_scalar(f"eval/{values['benchmark']}/accuracy", values["accuracy"], step)
        self.print(f"eval at step {step}: {values['benchmark']} accuracy {values['accuracy']:.3f} "
                   f"({values['problems']} problems)")

    def advance(self, steps: int = 1) -> None:
        if self._want_bar and self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self._total, desc="train", dynamic_ncols=True)
        if self._bar is not None:
            self._bar.update(steps)

    def print(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._jsonl.close()


class NullMetrics:
    """What ranks other than 0 hold: every call does nothing."""

    def log(self, step: int, values: dict[str, Any]) -> None:
        pass

    def log_eval(self, step: int, values: dict[str, Any]) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass

    def print(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass
