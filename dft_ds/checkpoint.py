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
from typing import Any, Callable, Optional

import torch

from dft_ds.errors import UserError

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


def inject_fault(point: str, step: int) -> None:
    """Tests kill a process at a named point: DFT_DS_FAULT=<point>:<step>[:<rank>] (rank 0 by default)."""
    spec = os.environ.get("DFT_DS_FAULT", "")
    if not spec:
        return
    name, at_step, *rank = spec.split(":")
    if name == point and int(at_step) == step and int(os.environ.get("RANK", "0")) == int(rank[0] if rank else 0):
        os.kill(os.getpid(), signal.SIGKILL)


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
        self.engine.save_checkpoint(self.root, tag)
        os.makedirs(os.path.join(tag_dir, "rng"), exist_ok=True)
        torch.save(rng_state(), os.path.join(tag_dir, "rng", f"rank{self.engine.dist.rank}.pt"))
        inject_fault("kill_after_shards", step)
        # Sync point: every rank's shards are on disk before the checkpoint is declared complete.
        self.engine.barrier()
        if self.engine.is_rank0:
            self.write_hf_meta(os.path.join(tag_dir, HF_META))
            write_atomic(os.path.join(tag_dir, STATE_FILE), json.dumps(state, indent=2))
            write_atomic(os.path.join(self.root, LATEST), tag + "\n")
            self.rotate(tag)
        self.engine.barrier()
        return tag_dir

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


@dataclass
class ResumePoint:
    root: str
    tag: str
    state: dict[str, Any]

    @property
    def tag_dir(self) -> str:
        return os.path.join(self.root, self.tag)


def read_state(tag_dir: str) -> dict[str, Any]:
    with open(os.path.join(tag_dir, STATE_FILE), encoding="utf-8") as fh:
        return json.load(fh)


def find_resume(setting: str, run_checkpoints: str) -> Optional[ResumePoint]:
    """The checkpoint to resume from: `auto` looks in this run, a path names one; None starts fresh."""
    if setting == "none":
        return None
    if setting == "auto":
        return _latest_complete(run_checkpoints)
    path = os.path.abspath(setting)
    if os.path.isfile(os.path.join(path, LATEST)):
        point = _latest_complete(path)
        if point is None:
            raise CheckpointError(f"checkpoint.resume: '{setting}' holds no complete checkpoint")
        return point
    if not is_complete(path):
        raise CheckpointError(f"checkpoint.resume: '{setting}' is not a complete checkpoint "
                              f"(expected a directory with {STATE_FILE}, or a checkpoints/ directory with '{LATEST}')")
    return ResumePoint(os.path.dirname(path), os.path.basename(path), read_state(path))


def _latest_complete(root: str) -> Optional[ResumePoint]:
    latest_file = os.path.join(root, LATEST)
    if not os.path.isfile(latest_file):
        return None
    with open(latest_file, encoding="utf-8") as fh:
        tag = fh.read().strip()
    tag_dir = os.path.join(root, tag)
    if is_complete(tag_dir):
        return ResumePoint(root, tag, read_state(tag_dir))
    # `latest` is written last, so this means the files were damaged or removed afterwards.
    older = sorted((int(m.group(1)), name) for name in os.listdir(root)
                   if (m := TAG_RE.match(name)) and is_complete(os.path.join(root, name)))
    if not older:
        raise CheckpointError(f"{tag_dir}: '{LATEST}' names it but it is incomplete, and no other complete "
                              "checkpoint exists; use checkpoint.resume=none with a new train.output_dir")
    log.warning("%s is incomplete; resuming from %s instead", tag_dir, older[-1][1])
    tag = older[-1][1]
    return ResumePoint(root, tag, read_state(os.path.join(root, tag)))


def check_compatible(point: ResumePoint, current: dict[str, str], config: dict[str, Any], warn) -> None:
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


def ensure_universal(point: ResumePoint, is_rank0: bool, barrier: Callable[[], None]) -> str:
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


def load_rng(point: ResumePoint, rank: int) -> None:
    path = os.path.join(point.tag_dir, "rng", f"rank{rank}.pt")
    if os.path.isfile(path):  # a rank that did not exist in the saved world keeps its seeded state
        set_rng_state(torch.load(path, weights_only=True))
