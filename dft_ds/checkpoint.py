"""Checkpoints, every write and every read: sharded save (atomic `latest`, rotation), the checks
that a checkpoint is complete and intact, finding the one to resume from, restoring it (on the same
or a new world size), and opening one for dft-convert.

Layout under `<output_dir>/checkpoints/`:

    latest                   the tag to resume from; written last, atomically, after every rank's shards
    step-<N>/                DeepSpeed's shards (model, optimizer, scheduler) for optimizer step N
    step-<N>/rng/rank<R>.pt  each rank's RNG states (python, numpy, torch, accelerator)
    step-<N>/dft_state.json  step, sampler position, world size, fingerprints, resolved config, the size
                             and xxh3-128 content hash of every other file, and a hash of itself;
                             written after all shards, so its presence marks a complete checkpoint
    step-<N>/hf_config/      config.json, generation_config.json and tokenizer files, for dft-convert
    step-<N>_universal/      DeepSpeed's universal format, made once when the world size changes

The run directory is expected on a file system every rank sees (as on clusters).
This module does not parse config files.

Integrity (checkpoint.verify): each rank hashes the shards it wrote right after writing them, while
they are still in the page cache; rank 0 hashes the rest and records every file's size and hash in
the state file, which carries a hash of its own content too. A resume or dft-convert checks sizes
(`size`), or sizes and then every byte (`hash`, the default), before anything is unpickled.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import xxhash

from dft_ds.config import Config, to_dict
from dft_ds.errors import SaveFailed, UserError
from dft_ds.faults import inject_fault

log = logging.getLogger(__name__)

LATEST = "latest"
STATE_FILE = "dft_state.json"
HF_META = "hf_config"
TAG_RE = re.compile(r"^step-(\d+)$")
HASH = "xxh3_128"
HASH_DIR = "hashes"  # each rank's hashes of its own shards, merged into the state file and removed
VERIFY = ("hash", "size", "off")
# The files one rank writes: its ZeRO shards (model under ZeRO-3, optimizer) and its RNG states.
RANK_FILE_RE = re.compile(r"(?:^|/)(?:\w*zero_pp_rank_(\d+)_\w*\.pt|rng/rank(\d+)\.pt)$")


class CheckpointError(UserError):
    """A checkpoint cannot be used for this run (exit code 2): damaged, missing or of another run."""


def tag_for(step: int) -> str:
    return f"step-{step}"


def is_complete(tag_dir: str) -> bool:
    return os.path.isfile(os.path.join(tag_dir, STATE_FILE))


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# RNG


def rng_state() -> dict[str, Any]:
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------------------------
# Saving


def file_hash(path: str | os.PathLike) -> str:
    """xxh3-128 of a file's bytes, read in 16 MiB blocks (14 GB/s from memory on one core here)."""
    h = xxhash.xxh3_128()
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def rank_of(rel: str) -> Optional[int]:
    """The rank that writes a checkpoint file (its ZeRO shards and RNG states), or None for rank 0's others."""
    m = RANK_FILE_RE.search(rel)
    return None if m is None else int(m.group(1) or m.group(2))


def state_digest(state: dict[str, Any]) -> str:
    """The hash a state file records of itself: of its content without that field, keys sorted."""
    body = {k: v for k, v in state.items() if k != "state_hash"}
    return xxhash.xxh3_128(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_state(tag_dir: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write dft_state.json atomically, sealed with the hash of its own content (see state_digest)."""
    state = {**{k: v for k, v in state.items() if k != "state_hash"}, "state_hash": state_digest(state)}
    write_atomic(os.path.join(tag_dir, STATE_FILE), json.dumps(state, indent=2))


def hash_own_shards(tag_dir: str, rank: int) -> dict[str, str]:
    """Every rank, right after its save: the hashes of the files it wrote, kept in hashes/rank<R>.json.

    Only this rank's own files are opened or sized. The peers are still writing theirs, and their
    temporary files (hashes/rank<R>.json.tmp-<pid>) vanish when renamed: sizing every file, as
    file_manifest does, once failed a save with ENOENT on a 2-rank run."""
    mine = {rel: file_hash(os.path.join(tag_dir, rel)) for rel in own_files(tag_dir, rank)}
    os.makedirs(os.path.join(tag_dir, HASH_DIR), exist_ok=True)
    write_atomic(os.path.join(tag_dir, HASH_DIR, f"rank{rank}.json"), json.dumps(mine))
    return mine


def merge_hashes(tag_dir: str) -> dict[str, str]:
    """Rank 0, after every rank's save: all ranks' hashes, plus its own of the files no rank claims
    (the ZeRO-1/2 model file, hf_config/); hashes/ is removed so the manifest does not list it."""
    hashes: dict[str, str] = {}
    hash_dir = os.path.join(tag_dir, HASH_DIR)
    for name in sorted(os.listdir(hash_dir)) if os.path.isdir(hash_dir) else []:
        with open(os.path.join(hash_dir, name), encoding="utf-8") as fh:
            hashes.update(json.load(fh))
    shutil.rmtree(hash_dir, ignore_errors=True)
    for rel in file_manifest(tag_dir):
        if rel not in hashes:
            hashes[rel] = file_hash(os.path.join(tag_dir, rel))
    return dict(sorted(hashes.items()))


def _relative_files(tag_dir: str) -> Iterator[str]:
    """Every file under a checkpoint directory, as a path relative to it; nothing is opened or sized."""
    for dirpath, _, names in os.walk(tag_dir):
        for name in names:
            yield os.path.relpath(os.path.join(dirpath, name), tag_dir)


def own_files(tag_dir: str, rank: int) -> list[str]:
    """The files of a checkpoint that `rank` writes (relative paths), found by name alone."""
    return sorted(rel for rel in _relative_files(tag_dir) if rank_of(rel) == rank)


def file_manifest(tag_dir: str) -> dict[str, int]:
    """Size of every file of a checkpoint (relative paths), recorded in its state file when it is complete."""
    return {rel: os.path.getsize(os.path.join(tag_dir, rel))
            for rel in sorted(_relative_files(tag_dir)) if rel != STATE_FILE}


def expected_shard_files(zero_stage: int, world_size: int) -> list[str]:
    """Glob patterns of the files DeepSpeed writes for this stage and world size, one per rank and kind."""
    ranks = range(world_size)
    if zero_stage == 3:
        model = [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in ranks]
    else:
        model = ["mp_rank_00_model_states.pt"]
    # Optimizer shards carry a precision prefix under bf16 ("bf16_zero_pp_rank_0_...").
    optim = [f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in ranks]
    return model + optim


def find_damage(tag_dir: str | os.PathLike, state: dict[str, Any], verify: str = "hash") -> Optional[str]:
    """What is wrong with a complete checkpoint's files, or None, as far as `verify` looks.

    `size` and `hash`: the state file's content differs from the hash it was sealed with (an edit or
    a flipped bit), a file is missing, truncated or grown against the size manifest, a shard DeepSpeed
    writes for the recorded world size and stage is missing, or there are optimizer shards of another
    world size. `hash` then reads every file and compares its content hash. `off` trusts the files.
    Checkpoints written before the manifest or the hashes existed are checked as far as they record.
    """
    if verify not in VERIFY:
        raise ValueError(f"verify must be one of {VERIFY}, got {verify!r}")
    if verify == "off":
        return None
    tag_dir = str(tag_dir)
    sealed = "state_hash" in state or "hash" in state  # both are written since the hashes exist
    if sealed and state_digest(state) != state.get("state_hash"):
        return (f"{os.path.join(tag_dir, STATE_FILE)} was changed after it was written (its content no longer "
                "matches the hash it was sealed with)")
    for rel, size in state.get("files", {}).items():
        path = os.path.join(tag_dir, rel)
        if not os.path.isfile(path):
            return f"{path} is missing"
        actual = os.path.getsize(path)
        if actual != size:
            return f"{path} is {actual} bytes, but {size} were written"
    world, stage = state.get("world_size"), state.get("zero_stage")
    if isinstance(world, int) and stage in (1, 2, 3):
        missing = [p for p in expected_shard_files(stage, world) if not glob.glob(os.path.join(tag_dir, p))]
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            return (f"incomplete checkpoint, missing {shown} (expected ZeRO-{stage} shards of {world} ranks, "
                    f"as {STATE_FILE} says)")
        optim = glob.glob(os.path.join(tag_dir, "*_optim_states.pt"))
        if len(optim) != world:
            return f"holds {len(optim)} optimizer shards but {STATE_FILE} says world_size={world}"
    if verify == "hash":
        for rel, recorded in state.get("hashes", {}).items():
            path = os.path.join(tag_dir, rel)
            if file_hash(path) != recorded:
                return (f"{path} has other content than was written (its {HASH} hash differs from the one in "
                        f"{STATE_FILE}; the size is the same)")
    return None


def _os_reason(exc: BaseException) -> str:
    """The OS error behind exc ('No space left on device'), however torch or DeepSpeed wrapped it."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _space_note(path: str) -> str:
    """torch reports a full disk as a failed write position; the free space says what happened."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return ""
    full = " -- the disk is full" if free < (16 << 20) else ""
    return f" ({free / (1 << 20):.1f} MiB free on the file system of {path}{full})"


class Checkpointer:
    """Saves `step-<N>` checkpoints; every rank calls save(), rank 0 finishes it.

    `record` is what every checkpoint of the run records beside its step and sampler position:
    world size, global batch, ZeRO stage, precision, fingerprints and the resolved config (see
    RunPlan.checkpoint_record); `tokenizer` is saved with the model's config for dft-convert.
    `for_run` builds one from a run's plan.
    """

    def __init__(self, root: str, engine, sampler, record: dict[str, Any], tokenizer, keep: int = 2,
                 start_step: int = 0, warn: Callable[[str], None] = log.warning):
        self.root, self.keep, self.engine, self.tokenizer = root, keep, engine, tokenizer
        self.record, self.sampler = record, sampler
        self.start_step, self.warn, self.saved = start_step, warn, set()

    @classmethod
    def for_run(cls, root: str, plan, engine, sampler, warn: Callable[[str], None] = log.warning) -> "Checkpointer":
        """The checkpointer of a run (runplan.RunPlan): checkpoint.keep, its record, its resume step."""
        return cls(root, engine, sampler, plan.checkpoint_record(), plan.tokenizer, keep=plan.cfg.checkpoint.keep,
                   start_step=plan.start_step, warn=warn)

    def write_hf_meta(self, directory: str) -> None:
        """The model's config files and the tokenizer, beside the shards (what dft-convert reads)."""
        from dft_ds.model import save_hf_meta

        save_hf_meta(self.engine.module, self.tokenizer, directory)

    def save(self, step: int) -> str:
        """Save optimizer step `step`, unless this session saved it or resumed from it.

        A complete `step-N` past the resume point is one the resume did not take (damaged, or newer
        than `latest`): rank 0 moves it aside to `step-N.superseded[-K]`, which rotation never deletes,
        and the step is saved anew.
        """
        tag = tag_for(step)
        tag_dir = os.path.join(self.root, tag)
        if step in self.saved or (step <= self.start_step and is_complete(tag_dir)):
            return tag_dir
        state = {"global_step": step, "sampler": self.sampler.state_dict(), **self.record}
        if self.engine.is_rank0 and is_complete(tag_dir):
            aside = next(f"{tag_dir}.superseded{f'-{k}' if k else ''}" for k in range(1000)
                         if not os.path.exists(f"{tag_dir}.superseded{f'-{k}' if k else ''}"))
            os.rename(tag_dir, aside)
            self.warn(f"{tag_dir} is from an earlier attempt and was not resumed from; moved to {aside} "
                      "(kept for inspection, never deleted by rotation) and saved anew")
        elif self.engine.is_rank0 and os.path.isdir(tag_dir):
            # A leftover of a save that died half way (it has no state file, or `latest` would name it).
            shutil.rmtree(tag_dir)
        self.engine.barrier()
        try:
            self.engine.save_checkpoint(self.root, tag)
            os.makedirs(os.path.join(tag_dir, "rng"), exist_ok=True)
            torch.save(rng_state(), os.path.join(tag_dir, "rng", f"rank{self.engine.dist.rank}.pt"))
            hash_own_shards(tag_dir, self.engine.dist.rank)
        except (OSError, RuntimeError) as exc:
            # ENOSPC, EDQUOT, EACCES... (torch wraps some of them in RuntimeError). This rank stops here;
            # its peers fail at their next collective. `latest` is untouched, so it still names the last
            # complete checkpoint; the partial directory has no state file and is never resumed from.
            raise SaveFailed(f"writing checkpoint {tag_dir} failed on rank {self.engine.dist.rank}: "
                             f"{_os_reason(exc)}{_space_note(self.root)}; {self._latest_text()}") from None
        inject_fault("kill_after_shards", step)
        # Sync point: every rank's shards are on disk before the checkpoint is declared complete.
        self.engine.barrier()
        if self.engine.is_rank0:
            try:
                self.write_hf_meta(os.path.join(tag_dir, HF_META))
                hashes = merge_hashes(tag_dir)
                state = {**state, "files": file_manifest(tag_dir), "hash": HASH, "hashes": hashes}
                write_state(tag_dir, state)
            except OSError as exc:
                raise SaveFailed(f"writing checkpoint {tag_dir} failed: {_os_reason(exc)}{_space_note(self.root)}; "
                                 f"{self._latest_text()}") from None
            write_atomic(os.path.join(self.root, LATEST), tag + "\n")
            self.rotate(tag)
        self.engine.barrier()
        self.saved.add(step)
        return tag_dir

    def _latest_text(self) -> str:
        path = os.path.join(self.root, LATEST)
        if not os.path.isfile(path):
            return "no earlier checkpoint exists"
        with open(path, encoding="utf-8") as fh:
            tag = fh.read().strip()
        return f"'{LATEST}' still names {os.path.join(self.root, tag)}, which is complete and loadable"

    def rotate(self, latest: str) -> None:
        """Delete all but the newest `keep` complete checkpoints (never `latest`), and their universal copies."""
        steps = sorted((int(m.group(1)), name) for name in os.listdir(self.root) if (m := TAG_RE.match(name)))
        complete = [name for _, name in steps if is_complete(os.path.join(self.root, name))]
        keep = set(complete[-self.keep:]) | {latest}
        latest_step = int(TAG_RE.match(latest).group(1))
        for step, name in steps:
            # Incomplete directories newer than latest belong to a save in progress elsewhere: leave them.
            if name in keep or (step > latest_step and name not in complete):
                continue
            shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
            shutil.rmtree(os.path.join(self.root, f"{name}_universal"), ignore_errors=True)




# --------------------------------------------------------------------------------------------
# Reading: the one reader of resume and dft-convert


@dataclass(frozen=True)
class CheckpointRef:
    """One complete tag directory `root/tag` with its dft_state.json: what resume and dft-convert use."""

    root: str | os.PathLike
    tag: str
    state: dict[str, Any]

    @property
    def path(self) -> Path:
        return Path(self.root) / self.tag

    @property
    def tag_dir(self) -> str:
        return str(self.path)

    @property
    def hf_config(self) -> Path:
        return self.path / HF_META

    @property
    def step(self) -> int:
        return int(self.state["global_step"])

    @property
    def world_size(self) -> int:
        return int(self.state["world_size"])

    @property
    def config(self) -> dict[str, Any]:
        """The resolved run config the checkpoint was trained with (as config.to_dict gives it)."""
        return self.state.get("config", {})


def read_state(tag_dir: str | os.PathLike) -> dict[str, Any]:
    """dft_state.json of a tag directory, checked for the fields every reader needs."""
    state_file = Path(tag_dir) / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(f"{tag_dir}: incomplete checkpoint, no {STATE_FILE} (the trainer writes it after "
                              "every shard; its absence means the save was interrupted or this is not a dft_ds "
                              "checkpoint)")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{state_file}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{state_file}: cannot be read ({exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_file}: expected a JSON object")
    problems = []
    if not (isinstance(state.get("world_size"), int) and state["world_size"] >= 1):
        problems.append(f"'world_size' must be a positive integer, found {state.get('world_size')!r}")
    if state.get("zero_stage") not in (1, 2, 3):
        problems.append(f"'zero_stage' must be 1, 2 or 3 (a ZeRO checkpoint), found {state.get('zero_stage')!r}")
    if not isinstance(state.get("global_step"), int):
        problems.append(f"'global_step' must be an integer, found {state.get('global_step')!r}")
    if problems:
        raise CheckpointError(f"{state_file}: " + "; ".join(problems))
    return state


def complete_tags(root: str | os.PathLike) -> list[str]:
    """The `step-<N>` directories under root that hold a state file, oldest first (step-9 before step-10)."""
    if not os.path.isdir(root):
        return []
    steps = [(int(m.group(1)), name) for name in os.listdir(root)
             if (m := TAG_RE.match(name)) and is_complete(os.path.join(root, name))]
    return [name for _, name in sorted(steps)]


def _complete_tags_text(root: str | os.PathLike) -> str:
    tags = complete_tags(root)
    return f"complete checkpoints here: {', '.join(tags)}" if tags else f"no complete checkpoint in {root}"


def read_latest(root: str | os.PathLike) -> str:
    """The tag the `latest` file of a checkpoints/ directory names."""
    latest = Path(root) / LATEST
    if not latest.is_file():
        raise CheckpointError(f"{root}: no '{LATEST}' file, so no tag to convert; pass --tag or a tag directory "
                              f"({_complete_tags_text(root)})")
    tag = latest.read_text(encoding="utf-8").strip()
    if not tag or os.sep in tag:
        raise CheckpointError(f"{latest}: expected one tag name (like step-20), found {tag!r}")
    return tag


def _looks_like_tag_dir(path: Path) -> bool:
    return (path / STATE_FILE).exists() or (path / HF_META).is_dir() or any(path.glob("*_model_states.pt"))


def open_checkpoint(path: str | os.PathLike, tag: Optional[str] = None, verify: str = "hash") -> CheckpointRef:
    """A checkpoint to read whole (dft-convert): `path` is `<run>/checkpoints` (the tag from `tag` or
    the `latest` file) or a tag directory. Refuses an incomplete or damaged one (as far as `verify`
    looks, see find_damage), naming the file."""
    given = Path(path)
    if not given.is_dir():
        raise CheckpointError(f"{given}: no such checkpoint directory")
    if _looks_like_tag_dir(given):
        if tag is not None and tag != given.name:
            raise CheckpointError(f"--tag {tag}: '{given}' is itself the checkpoint '{given.name}'; pass its parent "
                                  "directory to choose another tag")
        root, tag = given.parent, given.name
    else:
        root = given
        tag = tag if tag is not None else read_latest(root)
        if not (root / tag).is_dir():
            raise CheckpointError(f"{root / tag}: no checkpoint with tag '{tag}' ({_complete_tags_text(root)})")
    ref = CheckpointRef(root, tag, read_state(root / tag))
    damage = find_damage(ref.path, ref.state, verify)
    if damage:
        raise CheckpointError(f"{ref.path}: {damage}" if damage.startswith(("incomplete", "holds")) else
                              f"{ref.path}: damaged checkpoint: {damage}")
    if not (ref.hf_config / "config.json").is_file():
        raise CheckpointError(f"{ref.hf_config / 'config.json'}: missing; the checkpoint carries the model's config "
                              f"in {HF_META}/ and cannot be converted without it")
    return ref


def find_resume(setting: str, run_checkpoints: str, warn: Callable[[str], None] = log.warning,
                verify: str = "hash") -> Optional[CheckpointRef]:
    """The checkpoint to resume from: `auto` looks in this run, a path names one; None starts fresh.

    `auto` (or a checkpoints/ directory) skips a `latest` that is incomplete or damaged for the newest
    intact checkpoint before it, and says so through `warn`; a named checkpoint that is damaged is refused.
    `verify` is checkpoint.verify (find_damage). Every rank checks the same files and so picks the same
    checkpoint without a collective; the ranks of one node share the page cache, so each node reads
    the checkpoint once more than the load itself does.
    """
    if setting == "none":
        return None
    if setting == "auto":
        return _latest_intact(run_checkpoints, warn, verify)
    path = os.path.abspath(setting)
    if os.path.isfile(os.path.join(path, LATEST)):
        point = _latest_intact(path, warn, verify)
        if point is None:
            raise CheckpointError(f"checkpoint.resume: '{setting}' holds no complete checkpoint")
        return point
    if not is_complete(path):
        raise CheckpointError(f"checkpoint.resume: '{setting}' is not a complete checkpoint "
                              f"(expected a directory with {STATE_FILE}, or a checkpoints/ directory with '{LATEST}')")
    root, tag = os.path.dirname(path), os.path.basename(path)
    state, damage = _state_and_damage(path, verify)
    if damage:
        older = [name for name in complete_tags(root) if name != tag and not _state_and_damage(
            os.path.join(root, name), verify)[1]]
        hint = f"; the newest intact one beside it is {os.path.join(root, older[-1])}" if older else ""
        raise CheckpointError(f"checkpoint.resume: {path} is damaged: {damage}{hint}")
    return CheckpointRef(root, tag, state)


def _state_and_damage(tag_dir: str, verify: str) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """(state, None) for an intact checkpoint, (state or None, what is wrong) otherwise."""
    try:
        state = read_state(tag_dir)
    except CheckpointError as exc:
        return None, str(exc)
    return state, find_damage(tag_dir, state, verify)


def _latest_intact(root: str, warn: Callable[[str], None], verify: str) -> Optional[CheckpointRef]:
    latest_file = os.path.join(root, LATEST)
    if not os.path.isfile(latest_file):
        return None
    with open(latest_file, encoding="utf-8") as fh:
        latest = fh.read().strip()
    latest_match = TAG_RE.match(latest)
    latest_step = int(latest_match.group(1)) if latest_match else None
    candidates = [name for name in complete_tags(root) if latest_step is None or int(name.split("-")[1]) <= latest_step]
    if latest not in candidates:
        # `latest` is written last, so this means the files were damaged or removed afterwards.
        warn(f"{os.path.join(root, latest)} is incomplete (no {STATE_FILE}); looking for an older checkpoint")
    for name in reversed(candidates):
        tag_dir = os.path.join(root, name)
        state, damage = _state_and_damage(tag_dir, verify)
        if damage is None:
            if name != latest:
                warn(f"resuming from {tag_dir} instead of '{LATEST}' ({latest})")
            return CheckpointRef(root, name, state)
        warn(f"{tag_dir} is damaged, skipped: {damage}")
    raise CheckpointError(f"{os.path.join(root, latest)}: '{LATEST}' names it but it is incomplete or damaged, and "
                          "no older intact checkpoint exists; use checkpoint.resume=none with a new train.output_dir")


def fingerprint_changes(point: CheckpointRef, current: dict[str, str]) -> list[str]:
    """How the model, tokenizer and data of this run differ from the checkpoint's, one line each."""
    saved = point.state.get("fingerprints", {})
    return [f"the {k} differ from the checkpoint's (fingerprint {saved.get(k)} -> {current.get(k)})"
            for k in ("model", "tokenizer", "data") if saved.get(k) != current.get(k)]


# --------------------------------------------------------------------------------------------
# Restoring


def restore(point: CheckpointRef, engine, sampler, *, universal: bool, peak_lr: float, verify: str = "hash") -> None:
    """Everything a resume loads, in one call on every rank: the DeepSpeed shards (through the
    universal format when the world size changed), the sampler position, this rank's RNG states,
    and a new peak learning rate when the config changed it."""
    tag = ensure_universal(point, engine.is_rank0, engine.barrier, verify) if universal else point.tag
    engine.load_checkpoint(str(point.root), tag)
    sampler.load_state_dict(point.state["sampler"])
    load_rng(point, engine.dist.rank)
    if point.config.get("train", {}).get("lr", peak_lr) != peak_lr:
        engine.set_peak_lr(peak_lr)


def ensure_universal(point: CheckpointRef, is_rank0: bool, barrier: Callable[[], None], verify: str = "hash") -> str:
    """Convert to DeepSpeed's universal format once (cached beside the original); returns its tag.

    The conversion unpickles the shards, so it runs only on a checkpoint the resume has verified. Its
    output is unpickled in turn by every rank's load: its `.complete` marker records the size and
    hash of every file, and a cached copy that fails `verify` is converted again, with a warning."""
    tag = f"{point.tag}_universal"
    out = os.path.join(point.root, tag)
    done = os.path.join(out, ".complete")
    if is_rank0:
        damage = _universal_damage(out, verify) if os.path.exists(done) else "missing"
        if damage is not None:
            if damage != "missing":
                log.warning("%s is damaged (%s); converting %s again", out, damage, point.tag_dir)
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", point.tag_dir,
                   "--output_folder", out, "--num_extract_workers", "1", "--num_merge_workers", "1"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"converting {point.tag_dir} to the universal format failed:\n{proc.stderr[-3000:]}")
            files = {rel: size for rel, size in file_manifest(out).items() if rel != ".complete"}
            hashes = {rel: file_hash(os.path.join(out, rel)) for rel in files}
            write_atomic(done, json.dumps({"files": files, "hashes": hashes}))
    barrier()
    return tag


def _universal_damage(out: str, verify: str) -> Optional[str]:
    """What is wrong with a cached universal conversion, as far as `verify` looks (markers written
    before the hashes existed are empty and trusted)."""
    try:
        with open(os.path.join(out, ".complete"), encoding="utf-8") as fh:
            text = fh.read()
        record = json.loads(text) if text.strip() else {}
    except (OSError, ValueError) as exc:
        return f"its .complete marker cannot be read ({exc})"
    return find_damage(out, record if isinstance(record, dict) else {}, verify)


def load_rng(point: CheckpointRef, rank: int) -> None:
    path = os.path.join(point.tag_dir, "rng", f"rank{rank}.pt")
    if os.path.isfile(path):  # a rank that did not exist in the saved world keeps its seeded state
        set_rng_state(torch.load(path, weights_only=True))


# Settings that change what the trained weights mean. A resume with another value would leave a run
# directory whose config.yaml describes training its checkpoints did not have, so it is refused.
# (The model, tokenizer and tokenised data are also compared by fingerprint, and the precision as
# resolved on the machine.) Every other setting only continues the run and may change with a warning.
RESUME_FIXED = ("model.name_or_path", "model.config_overrides", "model.tokenizer", "model.trust_remote_code",
                "model.lora", "model.lora_rank", "model.lora_alpha", "model.lora_targets", "model.lora_train_embeddings",
                "data.*", "loss.type",
                "loss.prob_floor", "loss.alpha", "loss.mix_start", "loss.mix_end", "loss.kl_coef", "loss.eaft_top_k",
                "loss.threshold", "loss.threshold_base", "loss.normalize", "train.seed")


def resume_changes(saved: dict[str, dict[str, Any]], cfg: Config) -> tuple[list[str], list[str]]:
    """(fixed, other): the settings that differ from a checkpoint's resolved config (config.to_dict),
    as 'key: old -> new', split into those RESUME_FIXED refuses and those a resume may change.
    Neither the checkpoint section (how to save and resume) nor train.output_dir (a run directory may
    be moved or copied) is compared."""
    fixed, other = [], []
    for section, values in to_dict(cfg).items():
        if section == "checkpoint":
            continue
        for name, value in values.items():
            before = saved.get(section, {}).get(name, value)
            if before == value:
                continue
            key = f"{section}.{name}"
            if key == "train.output_dir":
                continue
            text = f"{key} changed from {before!r} to {value!r}"
            (fixed if key in RESUME_FIXED or f"{section}.*" in RESUME_FIXED else other).append(text)
    return fixed, other
