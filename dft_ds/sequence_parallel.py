"""Sequence parallelism (train.sequence_parallel), Ulysses style.

The N ranks of a group each hold a contiguous slice of the same rows. Inside attention an all-to-all
turns [heads, my slice] into [my heads, the whole row], the kernel runs on whole rows for H/N heads,
and a second all-to-all turns it back. Everything else (embeddings, MLPs, norms, the fused head and
loss) is per token and runs on the slice. DeepSpeed sees every rank as data-parallel: each rank's loss
is its slice's weighted token losses over the step's target count on all ranks, so the mean over
ranks of the gradients is the gradient of the whole step, whatever N is.

The state lives in one SequenceParallel object per engine: its group, whether a training micro-batch
is running, and that micro-batch's gathered positions. transformers finds attention kernels in a
process-wide registry, so `SequenceParallel.install` puts there a kernel bound to that object; a run
at N = 1 installs nothing, and its forward reads nothing of this module.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional

import torch

from dft_ds.procgroup import DistInfo


@dataclass(frozen=True)
class SequenceGroup:
    size: int              # N, train.sequence_parallel
    rank: int              # this rank's slice: rank % N
    data_rank: int         # the data-parallel rank: rank // N (it picks the rows)
    group: Any = None      # the process group of the N ranks; None when N == 1


def sequence_group(dist: DistInfo, size: int) -> SequenceGroup:
    """Groups of `size` consecutive ranks (one node's GPUs first, where the exchange is fastest).
    Every rank creates every group, in the same order, as torch.distributed requires."""
    if size == 1:
        return SequenceGroup(1, 0, dist.rank)
    import torch.distributed as tdist

    mine = None
    for start in range(0, dist.world_size, size):
        group = tdist.new_group(list(range(start, start + size)))
        if start <= dist.rank < start + size:
            mine = group
    return SequenceGroup(size, dist.rank % size, dist.rank // size, mine)


class SequenceParallel:
    """One engine's sequence parallelism: its group, and while a training micro-batch runs (the
    `running()` block, where checkpointed layers run again in the backward too) the exchange in
    attention. Outside the block, evaluation and generation run the plain kernel on whatever they
    are given."""

    def __init__(self, group: SequenceGroup):
        self.group = group
        self.active = False
        self._positions: Optional[tuple] = None  # (the slice's ids tensor, the whole rows', their spans)

    @property
    def size(self) -> int:
        return self.group.size

    @contextlib.contextmanager
    def running(self):
        if self.group.size == 1:
            yield
            return
        before, self.active = self.active, True
        try:
            yield
        finally:
            self.active = before
            self._positions = None  # the cached gather and spans of the block's micro-batch

    def gathered_positions(self, local: torch.Tensor):
        """(the whole rows' position ids, each row's documents as (start, end) spans) for this slice's ids.

        Every layer gets the same position-id tensor, so one all-gather per micro-batch serves them all
        (and the layers run again in the backward): the result is kept, with a strong reference to the
        tensor it was made for, until the training block ends or the next micro-batch comes.
        """
        import torch.distributed as tdist

        cache = self._positions
        if cache is None or cache[0] is not local:
            gathered = [torch.empty_like(local) for _ in range(self.group.size)]
            tdist.all_gather(gathered, local.contiguous(), group=self.group.group)
            positions = torch.cat(gathered, dim=1)
            cache = self._positions = (local, positions, document_spans(positions))
        return cache[1], cache[2]

    def install(self, attention: str) -> None:
        """Put into transformers' registries, for `attention` (sdpa or flash_attention_2), a kernel that
        runs Ulysses over this group while `running()`, and a mask builder that builds no mask then.
        A second engine in the same process takes the kernel over."""
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        for registry, wrap in ((ALL_ATTENTION_FUNCTIONS, _UlyssesAttention), (ALL_MASK_ATTENTION_FUNCTIONS, _NoMaskWhileRunning)):
            current = registry[attention]
            if isinstance(current, wrap):
                current.sequence = self
            else:
                registry[attention] = wrap(current, attention, self)


class _UlyssesAttention:
    """transformers' attention kernel with the exchange around it while its SequenceParallel runs."""

    def __init__(self, core, attention: str, sequence: SequenceParallel):
        self.core, self.attention, self.sequence = core, attention, sequence

    def __call__(self, module, query, key, value, attention_mask, *args, **kwargs):
        sp, core = self.sequence, self.core
        if not sp.active:
            return core(module, query, key, value, attention_mask, *args, **kwargs)
        n, group = sp.group.size, sp.group.group
        heads, kv_heads = query.shape[1], key.shape[1]
        kernel_module = module
        if kv_heads % n:  # fewer key/value heads than ranks (n % kv_heads == 0 was checked): replicate
            key = key.repeat_interleave(n // kv_heads, dim=1)
            value = value.repeat_interleave(n // kv_heads, dim=1)
            kernel_module = _KvGroups(module, heads // n)
        # [B, H, s, D] -> [B, H/N, S, D]
        query, key, value = (_AllToAll.apply(t, 1, 2, group) for t in (query, key, value))
        local = kwargs.get("position_ids")
        if local is None:
            raise RuntimeError("sequence parallelism needs position_ids in the attention call; this model does "
                               "not pass them (train.sequence_parallel=1 runs it)")
        positions, spans = sp.gathered_positions(local)
        if self.attention == "flash_attention_2":
            # Variable-length sequences from the position ids. transformers reads packed documents
            # from them only in a batch of one row: lay the rows end to end (each starts at 0).
            b, h, s, d = query.shape
            query, key, value = (t.transpose(0, 1).reshape(1, t.shape[1], b * s, d) for t in (query, key, value))
            out, weights = core(kernel_module, query, key, value, None, *args,
                                **{**kwargs, "position_ids": positions.reshape(1, b * s)})
            out = out.reshape(b, s, h, d)
        else:
            out, weights = _per_document(core, kernel_module, query, key, value, positions, spans, args, kwargs)
        # [B, S, H/N, D] -> [B, s, H, D]
        return _AllToAll.apply(out.contiguous(), 1, 2, group), weights


class _NoMaskWhileRunning:
    """transformers' mask builder for the kernel, building nothing while the SequenceParallel runs.

    The model builds its attention mask before the layers run, from a rank's slice of positions. A
    slice holding more than one document (or the padding document shard_rows adds) would get an
    [s x s] block mask, kept for the whole step by checkpointing, that the exchange never reads: it
    masks each document itself, over the whole row."""

    def __init__(self, build, attention: str, sequence: SequenceParallel):
        self.build, self.sequence = build, sequence

    def __call__(self, *args, **kwargs):
        return None if self.sequence.active else self.build(*args, **kwargs)


class _AllToAll(torch.autograd.Function):
    """Split `x` into N parts along `scatter`, send part j to rank j of the group, and concatenate what
    arrives along `gather`. Its gradient is the same exchange the other way round."""

    @staticmethod
    def forward(ctx, x, scatter: int, gather: int, group):
        import torch.distributed as tdist

        ctx.dims, ctx.group = (scatter, gather), group
        n = tdist.get_world_size(group)
        send = torch.stack(x.chunk(n, dim=scatter)).contiguous()
        recv = torch.empty_like(send)
        tdist.all_to_all_single(recv, send, group=group)
        return torch.cat(recv.unbind(0), dim=gather)

    @staticmethod
    def backward(ctx, grad):
        scatter, gather = ctx.dims
        return _AllToAll.apply(grad.contiguous(), gather, scatter, ctx.group), None, None, None


class _KvGroups:
    """The attention module as the kernel sees it, with another `num_key_value_groups` (key/value heads
    replicated for a group larger than their count)."""

    def __init__(self, module, groups: int):
        self._module, self.num_key_value_groups = module, groups

    def __getattr__(self, name):
        return getattr(self._module, name)


def document_mask(position_ids: torch.Tensor, window: Optional[int] = None) -> torch.Tensor:
    """[B, 1, S, S] bool: causal, only within the document (a document starts where its position is 0),
    and with a sliding `window` only the last `window` positions (the query's own included)."""
    doc = (position_ids == 0).cumsum(dim=1)
    s = position_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=position_ids.device).tril()
    if window:
        causal = causal.triu(-(int(window) - 1))
    return (doc[:, :, None] == doc[:, None, :]).logical_and_(causal)[:, None]


def document_spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Each row's documents as [start, end) spans: a document starts where its position is 0."""
    spans = []
    for row in position_ids.tolist():
        starts = [i for i, p in enumerate(row) if p == 0]
        if not starts or starts[0] != 0:
            starts.insert(0, 0)
        spans.append(list(zip(starts, starts[1:] + [len(row)])))
    return spans


def _per_document(core, module, query, key, value, positions, spans, args, kwargs):
    """sdpa one document at a time, with the kernel's own causal mask: no [row x row] mask and no scores
    across documents, so memory grows with the documents, not the row. A sliding window (Mistral,
    Gemma 3's local layers) gets a windowed mask in each document longer than it."""
    window = kwargs.get("sliding_window")
    rows, weights = [], None
    for i, row_spans in enumerate(spans):
        parts = []
        for start, end in row_spans:
            pos = positions[i:i + 1, start:end]
            mask = document_mask(pos, window) if window and end - start > window else None
            cut = (slice(i, i + 1), slice(None), slice(start, end))
            part, weights = core(module, query[cut], key[cut], value[cut], mask, *args, **{**kwargs, "position_ids": pos})
            parts.append(part)
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0), weights
