"""Checkpoints: sharded save (atomic `latest`, rotation), exact resume, resume on a new world size.

Layout under `<output_dir>/checkpoints/`:

    latest                   the tag to resume from; written last, atomically, after every rank's shards
    step-<N>/                DeepSpeed's shards (model, optimizer, scheduler) for optimizer step N
    step-<N>/rng/rank<R>.pt  each rank's RNG states (python, numpy, torch, accelerator)
    step-<N>/dft_state.json  step, sampler position, world size, fingerprints, resolved config;
                             written after all shards, so its presence marks a complete checkpoint
    step-<N>/hf_config/      config.json, generation_config.json and tokenizer files, for dft-convert
    step-<N>_universal/      DeepSpeed's universal format, made once when the world size changes

The run directory is expected on a file system every rank sees (as on clusters).
This module does not parse config files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from dft_ds.errors import SaveFailed, UserError

log = logging.getLogger(__name__)

LATEST = "latest"
STATE_FILE = "dft_state.json"
HF_META = "hf_config"
TAG_RE = re.compile(r"^step-(\d+)$")


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
# Fingerprints: what must not change between a checkpoint and the run that resumes it


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def fingerprints(model_config, tokenizer, rows) -> dict[str, str]:
    """Model architecture, tokenizer vocabulary and template, and the tokenised training rows."""
    model = _digest(model_config.to_json_string(use_diff=False))
    vocab = sorted(tokenizer.get_vocab().items())
    tok = _digest(json.dumps(vocab), str(tokenizer.all_special_tokens), str(getattr(tokenizer, "chat_template", "")))
    h = hashlib.sha256()
    for row in rows.docs:
        for ids, labels in row:
            h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
            h.update(torch.tensor(labels, dtype=torch.int64).numpy().tobytes())
        h.update(b"|")
    return {"model": model, "tokenizer": tok, "data": h.hexdigest()[:16]}


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


def fault_here(point: str, step: int) -> bool:
    """Tests inject faults at named points: DFT_DS_FAULT=<point>:<step>[:<rank>] (rank 0 by default)."""
    spec = os.environ.get("DFT_DS_FAULT", "")
    if not spec:
        return False
    name, at_step, *rank = spec.split(":")
    return name == point and int(at_step) == step and int(os.environ.get("RANK", "0")) == int(rank[0] if rank else 0)


def inject_fault(point: str, step: int) -> None:
    """SIGKILL this process at a named point (see fault_here)."""
    if fault_here(point, step):
        os.kill(os.getpid(), signal.SIGKILL)


def file_manifest(tag_dir: str) -> dict[str, int]:
    """Size of every file of a checkpoint (relative paths), recorded in its state file when it is complete."""
    sizes = {}
    for dirpath, _, names in os.walk(tag_dir):
        for name in names:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, tag_dir)
            if rel != STATE_FILE:
                sizes[rel] = os.path.getsize(path)
    return dict(sorted(sizes.items()))


def find_damage(tag_dir: str, state: dict[str, Any]) -> Optional[str]:
    """What is wrong with a complete checkpoint's files (missing, truncated, grown), or None.

    Sizes only: a torn or truncated write is caught without reading gigabytes of shards. Checkpoints
    written before the manifest existed have none and are taken as they are.
    """
    for rel, size in state.get("files", {}).items():
        path = os.path.join(tag_dir, rel)
        if not os.path.isfile(path):
            return f"{path} is missing"
        actual = os.path.getsize(path)
        if actual != size:
            return f"{path} is {actual} bytes, but {size} were written"
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
    """Saves `step-<N>` checkpoints; every rank calls save(), rank 0 finishes it."""

    def __init__(self, root: str, keep: int, engine, write_hf_meta: Callable[[str], None]):
        self.root, self.keep, self.engine, self.write_hf_meta = root, keep, engine, write_hf_meta

    def save(self, step: int, state: dict[str, Any]) -> str:
        tag = tag_for(step)
        tag_dir = os.path.join(self.root, tag)
        if self.engine.is_rank0 and os.path.isdir(tag_dir):
            # A leftover of a save that died half way (it has no state file, or `latest` would name it).
            shutil.rmtree(tag_dir)
        self.engine.barrier()
        try:
            self.engine.save_checkpoint(self.root, tag)
            os.makedirs(os.path.join(tag_dir, "rng"), exist_ok=True)
            torch.save(rng_state(), os.path.join(tag_dir, "rng", f"rank{self.engine.dist.rank}.pt"))
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
                state = {**state, "files": file_manifest(tag_dir)}
                write_atomic(os.path.join(tag_dir, STATE_FILE), json.dumps(state, indent=2))
            except OSError as exc:
                raise SaveFailed(f"writing checkpoint {tag_dir} failed: {_os_reason(exc)}{_space_note(self.root)}; "
                                 f"{self._latest_text()}") from None
            write_atomic(os.path.join(self.root, LATEST), tag + "\n")
            self.rotate(tag)
        self.engine.barrier()
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
# Resuming


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


def read_state(tag_dir: str) -> dict[str, Any]:
    with open(os.path.join(tag_dir, STATE_FILE), encoding="utf-8") as fh:
        return json.load(fh)


def find_resume(setting: str, run_checkpoints: str, warn: Callable[[str], None] = log.warning) -> Optional[CheckpointRef]:
    """The checkpoint to resume from: `auto` looks in this run, a path names one; None starts fresh.

    `auto` (or a checkpoints/ directory) skips a `latest` that is incomplete or damaged for the newest
    intact checkpoint before it, and says so through `warn`; a named checkpoint that is damaged is refused.
    """
    if setting == "none":
        return None
    if setting == "auto":
        return _latest_intact(run_checkpoints, warn)
    path = os.path.abspath(setting)
    if os.path.isfile(os.path.join(path, LATEST)):
        point = _latest_intact(path, warn)
        if point is None:
            raise CheckpointError(f"checkpoint.resume: '{setting}' holds no complete checkpoint")
        return point
    if not is_complete(path):
        raise CheckpointError(f"checkpoint.resume: '{setting}' is not a complete checkpoint "
                              f"(expected a directory with {STATE_FILE}, or a checkpoints/ directory with '{LATEST}')")
    state = read_state(path)
    damage = find_damage(path, state)
    if damage:
        root, tag = os.path.dirname(path), os.path.basename(path)
        older = [name for step, name in _complete_tags(root) if name != tag and not find_damage(
            os.path.join(root, name), read_state(os.path.join(root, name)))]
        hint = f"; the newest intact one beside it is {os.path.join(root, older[-1])}" if older else ""
        raise CheckpointError(f"checkpoint.resume: {path} is damaged: {damage}{hint}")
    return CheckpointRef(os.path.dirname(path), os.path.basename(path), state)


def _complete_tags(root: str) -> list[tuple[int, str]]:
    return sorted((int(m.group(1)), name) for name in os.listdir(root)
                  if (m := TAG_RE.match(name)) and is_complete(os.path.join(root, name)))


def _latest_intact(root: str, warn: Callable[[str], None]) -> Optional[CheckpointRef]:
    latest_file = os.path.join(root, LATEST)
    if not os.path.isfile(latest_file):
        return None
    with open(latest_file, encoding="utf-8") as fh:
        latest = fh.read().strip()
    latest_match = TAG_RE.match(latest)
    latest_step = int(latest_match.group(1)) if latest_match else None
    candidates = [name for step, name in _complete_tags(root) if latest_step is None or step <= latest_step]
    if latest not in candidates:
        # `latest` is written last, so this means the files were damaged or removed afterwards.
        warn(f"{os.path.join(root, latest)} is incomplete (no {STATE_FILE}); looking for an older checkpoint")
    for name in reversed(candidates):
        tag_dir = os.path.join(root, name)
        state = read_state(tag_dir)
        damage = find_damage(tag_dir, state)
        if damage is None:
            if name != latest:
                warn(f"resuming from {tag_dir} instead of '{LATEST}' ({latest})")
            return CheckpointRef(root, name, state)
        warn(f"{tag_dir} is damaged, skipped: {damage}")
    raise CheckpointError(f"{os.path.join(root, latest)}: '{LATEST}' names it but it is incomplete or damaged, and "
                          "no older intact checkpoint exists; use checkpoint.resume=none with a new train.output_dir")


def check_compatible(point: CheckpointRef, current: dict[str, str], config: dict[str, Any], warn) -> None:
    """Refuse a resume whose model, tokenizer or data changed; warn about other changed settings."""
    saved = point.state["fingerprints"]
    changed = [k for k in ("model", "tokenizer", "data") if saved.get(k) != current.get(k)]
    if changed:
        raise CheckpointError(
            f"{point.tag_dir}: cannot resume: the {', '.join(changed)} differ from the checkpoint's "
            f"(fingerprints {', '.join(f'{k} {saved.get(k)} -> {current.get(k)}' for k in changed)}); "
            "resume only with the same model, tokenizer and data, or start a new train.output_dir")
    old = point.state.get("config", {})
    for section, values in config.items():
        for key, value in values.items():
            before = old.get(section, {}).get(key, value)
            if before != value and section != "checkpoint":
                warn(f"resume: {section}.{key} changed from {before!r} to {value!r}")


def ensure_universal(point: CheckpointRef, is_rank0: bool, barrier: Callable[[], None]) -> str:
    """Convert to DeepSpeed's universal format once (cached beside the original); returns its tag."""
    tag = f"{point.tag}_universal"
    out = os.path.join(point.root, tag)
    done = os.path.join(out, ".complete")
    if is_rank0 and not os.path.exists(done):
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", point.tag_dir,
               "--output_folder", out, "--num_extract_workers", "1", "--num_merge_workers", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"converting {point.tag_dir} to the universal format failed:\n{proc.stderr[-3000:]}")
        write_atomic(done, "")
    barrier()
    return tag


def load_rng(point: CheckpointRef, rank: int) -> None:
    path = os.path.join(point.tag_dir, "rng", f"rank{rank}.pt")
    if os.path.isfile(path):  # a rank that did not exist in the saved world keeps its seeded state
        set_rng_state(torch.load(path, weights_only=True))
