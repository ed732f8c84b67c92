"""The run directory (`train.output_dir`): whether it is new or ours, what rank 0 writes into it at
a start, and what it writes at the end. Its files and sub-folders are named here, except the
logger's own (metrics.jsonl, eval.jsonl, tensorboard/, trackers.json, wandb/, mlruns/,
training_curves.png), which metrics.py names.

    run.lock              while a run trains: its holder (host, pid, Slurm job, start, heartbeat)
    config.yaml           the resolved config of the latest segment, headed by world size and precision
    config_history.jsonl  one line per start that trained: step, world size, batch, what changed
    ds_config.json        the rendered DeepSpeed config
    fingerprints.json     model, tokenizer and data hashes; a start with other ones is refused
    data_provenance.json  with a dft-sample training set: the file, its sha256, and the sampling and
                          selection that made it (from the selection.json beside it)
    metrics.jsonl         one line per logged step (trimmed back to the checkpoint on a resume)
    eval.jsonl            with eval.every_steps: one line per evaluation
    heldout.jsonl         with eval.loss_every: one line per held-out loss
    tensorboard/          the same figures as TensorBoard events
    trackers.json         with logging.report_to: the W&B and MLflow run ids a resume continues
    wandb/, mlruns/       with logging.report_to: W&B's offline run, MLflow's file store
    training_curves.png   with logging.plot: loss, NLL and mean token probability against the step
    checkpoints/          see dft_ds/checkpoint.py
    hf/                   with export.hf: the final weights as a Hugging Face directory
    summary.json          the whole run's figures, written when it finishes

How checkpoints are sharded is not this module's business.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable, Optional

from dft_ds.checkpoint import write_atomic
from dft_ds.config import Config, save_config, to_dict
from dft_ds.errors import UserError, counted
from dft_ds.metrics import (EVAL_FILE, HELDOUT_FILE, METRICS_FILE, TENSORBOARD,  # metrics.py names the files its logger writes
                            significant, truncate_tensorboard)

CHECKPOINTS = "checkpoints"
CONFIG_FILE = "config.yaml"
HISTORY_FILE = "config_history.jsonl"
DS_CONFIG_FILE = "ds_config.json"
FINGERPRINTS_FILE = "fingerprints.json"
SUMMARY_FILE = "summary.json"
PROVENANCE_FILE = "data_provenance.json"
HF_EXPORT = "hf"
LOCK_FILE = "run.lock"

log = logging.getLogger(__name__)


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS)


def check_output_dir(cfg: Config) -> None:
    """A new directory, or one of our own runs to resume; never someone else's files."""
    path = cfg.train.output_dir
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"train.output_dir: '{path}' exists and is not a directory")
    if not is_started(path):
        return
    if cfg.checkpoint.resume == "none":
        raise UserError(f"train.output_dir: '{path}' already holds files and checkpoint.resume=none starts "
                        "from scratch; choose a new directory (runs are never overwritten)")
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        raise UserError(f"train.output_dir: '{path}' already holds files that are not a dft_ds run; "
                        "choose a new directory (runs are never overwritten)")


def is_started(path: str) -> bool:
    """Whether the directory holds anything but a run lock (a start that died before writing leaves one)."""
    return os.path.isdir(path) and any(not name.startswith(LOCK_FILE) for name in os.listdir(path))


# --------------------------------------------------------------------------------------------
# One run per directory: run.lock
#
# The lock is a file created with O_CREAT|O_EXCL, which is atomic on local disks and on the network
# file systems clusters use (NFSv3 and later, Lustre, GPFS, BeeGFS), where flock/fcntl locks are
# often not shared between nodes or not supported. It holds JSON: host, pid, Slurm job id, start
# time, a token, and a heartbeat that rank 0 renews every lock_stale_s/10 seconds (by writing a new
# file and renaming it over the lock, so a reader never sees half of one). A lock is stale when its
# holder is on this host and its pid is gone, or when its heartbeat is older than lock_stale_s (a
# holder on another node that died); a stale lock is renamed away (only one taker's rename can
# succeed) and taken over with a warning.


class RunLocked(UserError):
    """The run directory is held by another live run (exit code 2)."""


def lock_text(info: dict[str, Any]) -> str:
    started = datetime.datetime.fromtimestamp(info.get("started", 0)).astimezone().isoformat(timespec="seconds")
    job = f", Slurm job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
    return f"host {info.get('host')} pid {info.get('pid')}{job}, started {started}"


def read_lock(path: str) -> Optional[dict[str, Any]]:
    """The holder recorded in a run directory's lock, or None when there is none (or it cannot be read:
    a heartbeat rename in progress, or a file that is not a lock, which then counts as stale)."""
    try:
        with open(os.path.join(path, LOCK_FILE), encoding="utf-8") as fh:
            info = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


# The tokens of the locks this process holds (RunLock.acquire adds, release removes).
_HELD_HERE: set[str] = set()


def held_here(info: dict[str, Any]) -> bool:
    """Whether a lock is one this process holds (a run reads its own lock when it builds its plan)."""
    return info.get("token") in _HELD_HERE


def stale_reason(info: dict[str, Any], stale_s: float, now: Optional[float] = None) -> Optional[str]:
    """Why a lock's holder is taken to be dead, or None while it may be alive. A holder with this
    process's pid whose lock this process does not hold is a process that died and whose pid was given
    again (containers and Slurm steps number their processes from the same start), or a run in this
    process that ended without releasing it."""
    now = time.time() if now is None else now
    if not info or not isinstance(info.get("heartbeat"), (int, float)):
        return "the lock file cannot be read as a lock"
    if info.get("host") == socket.gethostname() and info.get("pid") == os.getpid() and not held_here(info):
        return f"pid {info['pid']} is this start's own (the process that held the lock is gone)"
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) and not _pid_alive(info["pid"]):
        return f"no process {info['pid']} runs on this host"
    age = now - info["heartbeat"]
    if age > stale_s:
        return f"its heartbeat is {age:.0f} s old (train.lock_stale_s={stale_s:g})"
    return None


class RunLock:
    """Rank 0's hold on a run directory while it trains; `release()` (or process exit) gives it up."""

    def __init__(self, path: str, info: dict[str, Any], interval_s: float, waited: bool = False):
        # waited: the directory may have changed since the start looked at it (a predecessor held the lock)
        self.path, self.info, self.file, self.waited = path, info, os.path.join(path, LOCK_FILE), waited
        self._stop = threading.Event()
        _HELD_HERE.add(info["token"])
        self._thread = threading.Thread(target=self._beat, args=(interval_s,), name="dft-run-lock", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, path: str, stale_s: float, warn: Callable[[str], None] = log.warning,
                wait_s: float = 0.0, poll_s: float = 1.0) -> "RunLock":
        """Take the lock of run directory `path` (created if needed), or raise RunLocked naming the holder.

        A holder of the same Slurm job (a requeued attempt whose predecessor is still saving) is waited
        for, up to `wait_s` seconds, before the start gives up; any other live holder is refused at once.
        """
        os.makedirs(path, exist_ok=True)
        job = os.environ.get("SLURM_JOB_ID")
        info = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": job, "started": time.time(),
                "token": uuid.uuid4().hex}
        deadline, waited = time.monotonic() + wait_s, False
        while True:
            info["heartbeat"] = time.time()
            if _create_exclusive(os.path.join(path, LOCK_FILE), json.dumps(info)):
                return cls(path, info, max(1.0, stale_s / 10), waited)
            holder = read_lock(path)
            if holder is None:
                continue  # released between our attempt and the read
            reason = stale_reason(holder, stale_s)
            if reason is not None:
                if _take_away(path, holder):
                    waited = True
                    warn(f"{os.path.join(path, LOCK_FILE)}: taking over a stale lock ({lock_text(holder)}): {reason}")
                continue
            same_job = job is not None and holder.get("slurm_job_id") == job
            if same_job and time.monotonic() < deadline:
                if not waited:
                    warn(f"{path} is still held by an earlier attempt of Slurm job {job} ({lock_text(holder)}); "
                         f"waiting up to {wait_s:.0f} s for it to finish")
                    waited = True
                time.sleep(poll_s)
                continue
            why = (f"an earlier attempt of this Slurm job still holds it after {wait_s:.0f} s" if same_job else
                   "another run is training in it")
            raise RunLocked(f"train.output_dir: '{path}' is locked by a live run ({lock_text(holder)}): {why}. "
                            f"Wait for it to finish, stop it, or choose another train.output_dir; a lock left by a "
                            f"dead run is taken over once its heartbeat is older than train.lock_stale_s={stale_s:g} "
                            f"(delete {os.path.join(path, LOCK_FILE)} by hand only when you are sure no run holds it)")

    def _beat(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            current = read_lock(self.path)
            if not current or current.get("token") != self.info["token"]:
                log.warning("%s was taken away from this run (by hand or by another start)", self.file)
                return
            self.info["heartbeat"] = time.time()
            try:
                write_atomic(self.file, json.dumps(self.info))
            except OSError:
                pass  # a full disk: the next beat tries again; the lock goes stale only after lock_stale_s

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still this run's."""
        self._stop.set()
        _HELD_HERE.discard(self.info["token"])
        self._thread.join(timeout=5)
        current = read_lock(self.path)
        if current and current.get("token") == self.info["token"]:
            try:
                os.remove(self.file)
            except FileNotFoundError:
                pass


def _create_exclusive(path: str, text: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def _take_away(path: str, holder: dict[str, Any]) -> bool:
    """Rename a stale lock out of the way; False when another start took or renewed it first."""
    lock = os.path.join(path, LOCK_FILE)
    aside = f"{lock}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return False
    try:
        with open(aside, encoding="utf-8") as fh:
            moved = json.load(fh)
    except (OSError, ValueError):
        moved = {}
    if holder and (moved.get("token"), moved.get("heartbeat")) != (holder.get("token"), holder.get("heartbeat")):
        # Between our read and the rename the holder renewed it (a live run after all) or another start
        # took it: put it back if nothing was created meanwhile.
        try:
            os.link(aside, lock)
        except FileExistsError:
            pass
        os.remove(aside)
        return False
    os.remove(aside)
    return True


# --------------------------------------------------------------------------------------------
# Fingerprints: what must not change between a run directory (or a checkpoint) and a start in it


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
    return {"model": model, "tokenizer": tok, "data": rows.digest()[:16]}


def check_run_fingerprints(path: str, current: dict[str, str]) -> None:
    """The run directory belongs to the run with these model, tokenizer and data, or is new."""
    recorded = os.path.join(path, FINGERPRINTS_FILE)
    if not os.path.isfile(recorded):
        return
    with open(recorded, encoding="utf-8") as fh:
        saved = json.load(fh)
    changed = [k for k in current if saved.get(k) != current[k]]
    if changed:
        raise UserError(f"train.output_dir: '{path}' belongs to a run with a different {', '.join(changed)}; "
                        "choose a new directory")


# --------------------------------------------------------------------------------------------
# Writing


def start(plan) -> None:
    """Rank 0, once training is about to begin: the run's files, with one more line of history.

    On a resume, metrics.jsonl keeps only the steps up to the checkpoint (later ones are recomputed).
    """
    cfg, out = plan.cfg, plan.cfg.train.output_dir
    os.makedirs(out, exist_ok=True)
    save_config(cfg, os.path.join(out, CONFIG_FILE), extra={"world_size": plan.world_size, "precision": plan.precision})
    with open(os.path.join(out, DS_CONFIG_FILE), "w", encoding="utf-8") as fh:
        json.dump(plan.ds_config, fh, indent=2)
    with open(os.path.join(out, FINGERPRINTS_FILE), "w", encoding="utf-8") as fh:
        json.dump(plan.fingerprints, fh, indent=2)
    provenance = data_provenance(cfg.data.source)
    if provenance is not None:
        write_atomic(os.path.join(out, PROVENANCE_FILE), json.dumps(provenance, indent=2))
    b = plan.batch
    segment = {"started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "from_step": plan.start_step, "steps": plan.total_steps, "world_size": plan.world_size,
               "precision": plan.precision, "micro_batch_size": b.micro_batch_size,
               "gradient_accumulation_steps": b.gradient_accumulation_steps, "global_batch_size": b.global_batch_size,
               "resumed_from": plan.resume.tag_dir if plan.resume is not None else None, "changed": plan.changed,
               "config": to_dict(cfg)}
    with open(os.path.join(out, HISTORY_FILE), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(segment) + "\n")
    for name in (METRICS_FILE, EVAL_FILE, HELDOUT_FILE):  # what a previous session logged past the checkpoint
        truncate_metrics(os.path.join(out, name), plan.start_step)
    if os.path.isdir(os.path.join(out, TENSORBOARD)):
        truncate_tensorboard(os.path.join(out, TENSORBOARD), plan.start_step)


def data_provenance(source: str) -> dict[str, Any] | None:
    """Where a dft-sample training set came from: the data file, its sha256, and the model, sampling
    settings and selection policy recorded in the selection.json beside it; None for other data."""
    from dft_ds.data import SAMPLE_SELECTION

    selection_path = os.path.join(os.path.dirname(os.path.abspath(source)), SAMPLE_SELECTION)
    if not (os.path.isfile(source) and os.path.isfile(selection_path)):
        return None
    try:
        with open(selection_path, encoding="utf-8") as fh:
            selection = json.load(fh)
    except (OSError, ValueError):
        return None
    if not (isinstance(selection, dict) and str(selection.get("format", "")).startswith("dft-sample/")):
        return None
    h = hashlib.sha256()
    with open(source, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return {"data": os.path.abspath(source), "data_sha256": h.hexdigest(), "selection_file": selection_path,
            "model": selection.get("settings", {}).get("model"), "settings": selection.get("settings"),
            "policy": selection.get("policy"), "policy_text": selection.get("policy_text"),
            "counts": selection.get("counts"), "samples_sha256": selection.get("samples_sha256")}


def truncate_metrics(path: str, last_step: int) -> None:
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as fh:
        kept = [line for line in fh if line.strip() and json.loads(line)["step"] <= last_step]
    write_atomic(path, "".join(kept))


def open_metrics(plan, is_rank0: bool):
    """Rank 0's logger (metrics.jsonl; TensorBoard past the resumed step purged; W&B/MLflow resumed by the
    ids in trackers.json; the bar or plain lines; the plot at the end); a null one elsewhere."""
    from dft_ds.config import trackers
    from dft_ds.metrics import MetricsLogger, NullMetrics

    if not is_rank0:
        return NullMetrics()
    cfg = plan.cfg
    lg = cfg.logging
    return MetricsLogger(cfg.train.output_dir, plan.total_steps, trackers=trackers(lg), progress_bar=lg.progress_bar,
                         plot=lg.plot, start_step=plan.start_step, config=to_dict(cfg), project=lg.project,
                         run_name=lg.run_name)


def write_summary(summary, out: str, world_size: int) -> dict[str, Any]:
    """summary.json and the closing line. `run` counts every segment of the run (a resumed run's
    included), from metrics.jsonl; `session` counts the session that finished, from `start_step`.

    The session's `seconds` and `tokens_per_s` are training only; evaluation and checkpoint saves (the
    final save included) are `eval_seconds` and `checkpoint_seconds`, and `wall_seconds` is all three.
    """
    with open(os.path.join(out, METRICS_FILE), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    skipped = sum(r.get("skipped_steps", 0) for r in rows)
    run_tokens = sum(r.get("tokens") or 0 for r in rows)
    rows = [r for r in rows if r.get("loss") is not None]  # windows of skipped steps only
    first, last = (rows[0]["loss"], rows[-1]["loss"]) if rows else (None, None)
    result = {
        "run": {"steps": summary.steps, "tokens": run_tokens, "first_loss": first, "last_loss": last,
                "skipped_steps": skipped},
        "session": {"start_step": summary.start_step, "steps": summary.steps - summary.start_step,
                    "tokens": summary.tokens, "seconds": round(summary.seconds, 3),
                    "tokens_per_s": round(summary.tokens_per_s, 1), "eval_seconds": round(summary.eval_seconds, 3),
                    "checkpoint_seconds": round(summary.checkpoint_seconds, 3),
                    "wall_seconds": round(summary.wall_seconds, 3)},
        "world_size": world_size, "output_dir": os.path.abspath(out)}
    write_atomic(os.path.join(out, SUMMARY_FILE), json.dumps(result, indent=2))
    losses = f"loss {significant(first)} -> {significant(last)}; " if rows else ""
    evals = f" (+ {summary.eval_seconds:.1f} s evaluation)" if summary.eval_seconds >= 0.05 else ""
    done = counted(summary.steps, "step") if not summary.start_step else \
        f"step {summary.steps} ({counted(summary.steps - summary.start_step, 'step')} this session)"
    print(f"done: {done} in {summary.seconds:.1f} s{evals}, {summary.tokens_per_s:.0f} tokens/s, "
          f"{losses}results in {os.path.abspath(out)}", flush=True)
    return result
