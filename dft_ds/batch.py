"""The batch arithmetic: micro batch x accumulation x data-parallel ranks = global batch, the only
place it is computed, including a resumed global batch split anew over another world size."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from dft_ds.config import TrainConfig
from dft_ds.errors import ConfigError


@dataclass(frozen=True)
class BatchSplit:
    """micro x accumulation x data-parallel world = global: the only place this is computed."""

    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    note: str = field(default="", compare=False)  # how a resumed global batch was split, when it was

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.world_size


def _batch_error(message: str) -> ConfigError:
    return ConfigError(f"invalid configuration:\n  - {message}")


def resolve_batch(train: TrainConfig, world_size: int, saved_global: Optional[int] = None) -> BatchSplit:
    """The batch plan over the data-parallel ranks: the world size / train.sequence_parallel."""
    n = train.sequence_parallel
    if n < 1 or world_size % n:
        raise _batch_error(f"train.sequence_parallel: {n} does not divide the world size {world_size}; use a divisor of "
                           f"{world_size} (1 turns sequence parallelism off), or start a multiple of {n} ranks")
    ranks = "" if n == 1 else f"data-parallel ranks {world_size // n} (world {world_size} / train.sequence_parallel {n})"
    return _resolve_data_parallel(train, world_size // n, saved_global, ranks)


def _resolve_data_parallel(train: TrainConfig, world_size: int, saved_global: Optional[int] = None,
                           ranks: str = "") -> BatchSplit:
    """Fill in whichever of accumulation / global batch is null, or check that they agree.

    `saved_global`: the global batch of the checkpoint a run resumes from. Unless train.global_batch_size
    is set, the resumed run keeps it (so it continues with the same samples per step on any world
    size) and splits it over this world: the largest micro batch up to train.micro_batch_size that
    divides each rank's share, and the accumulation that makes up the rest.
    """
    micro, accum, total = train.micro_batch_size, train.gradient_accumulation_steps, train.global_batch_size
    per_step = micro * world_size
    if total is None and saved_global is not None:
        return _split_saved_batch(train, world_size, saved_global)
    if total is None:
        return BatchSplit(micro, accum or 1, world_size)
    if total % per_step:
        raise _batch_error(f"train.global_batch_size: {total} is not divisible by micro_batch_size {micro} x "
                           f"{ranks or f'world size {world_size}'} = {per_step}; {_nearest_batches(total, micro, world_size)}")
    derived = total // per_step
    if accum is not None and accum != derived:
        raise _batch_error(f"train.gradient_accumulation_steps: {accum} x micro_batch_size {micro} x "
                           f"{ranks or f'world size {world_size}'} = {accum * per_step}, but train.global_batch_size is {total}; set "
                           f"train.gradient_accumulation_steps={derived} (or null, which derives it), or "
                           f"train.global_batch_size={accum * per_step}")
    return BatchSplit(micro, derived, world_size)


def _nearest_batches(total: int, micro: int, world_size: int) -> str:
    """The valid settings nearest to a global batch that micro x world does not divide."""
    per_step = micro * world_size
    below, above = total // per_step * per_step, (total // per_step + 1) * per_step
    near = f"train.global_batch_size={above}" if not below else \
        f"train.global_batch_size={below} or {above}"
    text = f"the nearest valid values are {near} (multiples of {per_step})"
    if total % world_size == 0:
        share = total // world_size
        micros = [m for m in range(1, min(share, 2 * micro) + 1) if share % m == 0]
        closest = sorted(micros, key=lambda m: (abs(m - micro), -m))[:3]
        text += (f", or keep {total} with train.micro_batch_size={' or '.join(str(m) for m in sorted(closest))} "
                 f"(a micro batch must divide each rank's share of {share} rows)")
    return text


def _split_saved_batch(train: TrainConfig, world_size: int, saved: int) -> BatchSplit:
    micro, accum = train.micro_batch_size, train.gradient_accumulation_steps
    if accum is not None and micro * accum * world_size == saved:
        return BatchSplit(micro, accum, world_size)
    if saved % world_size:
        raise _batch_error(
            f"train.global_batch_size: the checkpoint was trained with a global batch of {saved} rows, which "
            f"{world_size} ranks cannot share evenly; resume on a number of ranks that divides {saved}, or set "
            "train.global_batch_size to change the batch from here on")
    share = saved // world_size
    fit = max(m for m in range(1, min(micro, share) + 1) if share % m == 0)
    plan = BatchSplit(fit, share // fit, world_size)
    fresh = micro * (accum or 1) * world_size
    if plan.global_batch_size == fresh and fit == micro:
        return plan
    changed = f"micro batch {fit} (train.micro_batch_size is {micro})" if fit != micro else f"micro batch {fit}"
    note = (f"resume keeps the checkpoint's global batch of {saved} rows: {changed} x accumulation "
            f"{plan.gradient_accumulation_steps} x world {world_size}")
    return BatchSplit(fit, plan.gradient_accumulation_steps, world_size, note)
