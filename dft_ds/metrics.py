"""Rank 0 speaks: metrics.jsonl, the trackers (TensorBoard, W&B, MLflow), the progress bar or plain
log lines, and the training-curve plot; other ranks get null objects.

Nothing here computes a value the loop needs. W&B and MLflow are imported only when
logging.report_to names them; both work offline (see docs/logging.md).
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import sys
import time
from typing import Any, Callable, Iterable, Optional

from dft_ds.errors import ConfigError, counted

# The files a logger writes in the run directory.
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
HELDOUT_FILE = "heldout.jsonl"
TENSORBOARD = "tensorboard"
TRACKERS_FILE = "trackers.json"  # the W&B and MLflow run ids, so that a resume continues the same runs
WANDB_DIR = "wandb"  # W&B's offline runs and logs (W&B creates it under output_dir)
MLRUNS = "mlruns"  # MLflow's file store when MLFLOW_TRACKING_URI is unset
PLOT_FILE = "training_curves.png"
# Keys of metrics.jsonl -> tracker tags (namespaced); W&B and MLflow get the same tags as TensorBoard.
TB_TAGS = {
    "loss": "train/loss",
    "nll": "train/nll",
    "mean_token_prob": "train/mean_token_prob",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "low_prob_share": "train/low_prob_share",
    "kl_ref": "train/kl_ref",
    "mean_weight": "train/mean_weight",
    "zero_weight_share": "train/zero_weight_share",
    "mean_entropy": "train/mean_entropy",
    "epoch": "train/epoch",
    "tokens_per_s": "perf/tokens_per_s",
    "samples_per_s": "perf/samples_per_s",
    "peak_memory_gib": "perf/peak_memory_gib",
}
HIST_TAG = "train/target_prob"
# logging.report_to name -> the module it needs; all come with `pip install 'dft_ds[trackers]'`.
TRACKER_MODULES = {"wandb": "wandb", "mlflow": "mlflow"}
INSTALL_HINT = "pip install 'dft_ds[trackers]'"


def require_trackers(names: Iterable[str]) -> None:
    """Raise ConfigError (exit 2) before anything is written when a named tracker is not installed.

    Looks the modules up without importing them.
    """
    missing = [n for n in names if n in TRACKER_MODULES and importlib.util.find_spec(TRACKER_MODULES[n]) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise ConfigError(f"logging.report_to names {', '.join(missing)}, which {verb} not installed; "
                          f"install the trackers with: {INSTALL_HINT}")


def peak_memory_gib(device) -> float:
    """This process's peak memory in GiB: allocated on the accelerator, or the host RSS peak on CPU."""
    import torch

    if getattr(device, "type", "cpu") != "cpu":
        if hasattr(getattr(torch, "accelerator", None), "max_memory_allocated"):  # torch >= 2.8
            return torch.accelerator.max_memory_allocated(device) / 2**30
        return getattr(torch, device.type).max_memory_allocated(device) / 2**30  # torch.cuda, torch.xpu, ...
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux


def _run_name(output_dir: str, run_name: Optional[str]) -> str:
    return run_name or os.path.basename(os.path.normpath(os.path.abspath(output_dir)))


# --------------------------------------------------------------------------------------------
# Trackers: each takes namespaced scalars per step, a histogram, and an outcome at the end.


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, output_dir: str, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events a previous session wrote past the step this one resumes from.
        self._tb = SummaryWriter(os.path.join(output_dir, TENSORBOARD), purge_step=start_step + 1)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self._tb.add_scalar(tag, value, step)

    def histogram(self, tag: str, counts: list[int], step: int) -> None:
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

    def close(self, outcome: str) -> None:
        self._tb.close()


def wandb_key_configured(env=os.environ) -> bool:
    """An API key in WANDB_API_KEY or in ~/.netrc (or $NETRC) for the W&B host."""
    if env.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(env.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(env.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def new_wandb_id() -> str:
    """Eight characters of [a-z0-9], the form of W&B's own run ids."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class WandbTracker:
    """A W&B run in output_dir/wandb; the id in trackers.json resumes the same run."""

    name = "wandb"

    def __init__(self, output_dir: str, project: str, run_name: str, config: dict, saved: dict, say: Callable):
        import wandb

        # WANDB_MODE (offline, online, disabled) is passed on as read now: W&B reads the environment once per process.
        mode = os.environ.get("WANDB_MODE") or None
        if mode is None and not wandb_key_configured():
            mode = "offline"
            say(f"wandb: no API key (WANDB_API_KEY or ~/.netrc) and WANDB_MODE unset: logging offline to "
                f"{os.path.join(os.path.abspath(output_dir), WANDB_DIR)}; `wandb sync` uploads it later")
        self.state = {"id": saved.get("id") or new_wandb_id()}
        self._wandb = wandb
        # Offline, W&B's closing summary repeats what the run printed; its start lines say where the run is.
        settings = wandb.Settings(quiet=True) if mode == "offline" else None
        self.run = wandb.init(project=project, name=run_name, dir=output_dir, id=self.state["id"], resume="allow",
                              mode=mode, settings=settings)
        self.run.config.update(config, allow_val_change=True)  # a resume may change some settings
        # A resumed online run drops steps below its last one (with a warning each): skip them ourselves.
        self._floor = self.run.step if self.run.resumed else 0

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if step >= self._floor:
            self.run.log(values, step=step)

    def histogram(self, tag: str, counts: list[int], step: int) -> None:
        if step >= self._floor:
            edges = [i / len(counts) for i in range(len(counts) + 1)]
            self.run.log({tag: self._wandb.Histogram(np_histogram=(counts, edges))}, step=step)

    def close(self, outcome: str) -> None:
        if outcome == "stopped":
            self.run.mark_preempting()
        self.run.finish(exit_code=1 if outcome == "failed" else 0)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class MlflowTracker:
    """An MLflow run at MLFLOW_TRACKING_URI, else a file store in output_dir/mlruns; the run id in
    trackers.json resumes the same run. The config's fields are the run's params."""

    name = "mlflow"
    STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}

    def __init__(self, output_dir: str, project: str, run_name: str, config: dict, saved: dict, say: Callable):
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or _file_uri(os.path.join(output_dir, MLRUNS))
        if uri.startswith("file:"):
            # MLflow 3 refuses its file store (in maintenance mode) unless this is set; a database store
            # needs the full mlflow package, whose pins would downgrade this environment's pyarrow.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client, self._error, self._say = MlflowClient(tracking_uri=uri), MlflowException, say
        run = None
        if saved.get("run_id") and saved.get("tracking_uri") == uri:
            try:
                run = self.client.get_run(saved["run_id"])
                self.client.update_run(run.info.run_id, status="RUNNING")
            except MlflowException:
                run = None  # deleted, or another store: a new run
        if run is None:
            experiment = self.client.get_experiment_by_name(project)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
            run = self.client.create_run(experiment_id, run_name=run_name)
        self.run_id = run.info.run_id
        self.state = {"run_id": self.run_id, "tracking_uri": uri}
        # Params cannot change in MLflow: a resume adds new keys only (config_history.jsonl has the changes).
        params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items() if k not in run.data.params]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, float(v), now, step) for tag, v in values.items()]
        try:
            self.client.log_batch(self.run_id, metrics=metrics)
        except (self._error, OSError) as exc:  # a tracker must not stop a training run
            self._say(f"warning: mlflow: step {step} not logged ({exc}); metrics.jsonl has it")

    def histogram(self, tag: str, counts: list[int], step: int) -> None:
        pass  # MLflow has no histograms; metrics.jsonl and TensorBoard keep them

    def close(self, outcome: str) -> None:
        self.client.set_terminated(self.run_id, status=self.STATUS.get(outcome, "FINISHED"))


def _file_uri(path: str) -> str:
    from pathlib import Path

    return Path(path).resolve().as_uri()


def open_trackers(names: Iterable[str], output_dir: str, start_step: int, config: dict, project: str,
                  run_name: str, say: Callable) -> list:
    """The trackers named (config.trackers order); W&B/MLflow run ids are kept in trackers.json."""
    path = os.path.join(output_dir, TRACKERS_FILE)
    saved = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            saved = json.load(fh)
    opened = []
    for name in names:
        if name == "tensorboard":
            opened.append(TensorBoardTracker(output_dir, start_step))
        elif name in ("wandb", "mlflow"):
            cls = WandbTracker if name == "wandb" else MlflowTracker
            opened.append(cls(output_dir, project, run_name, config, saved.get(name, {}), say))
            saved[name] = opened[-1].state
    if any(hasattr(t, "state") for t in opened):
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(saved, fh, indent=2)
    return opened


def truncate_tensorboard(folder: str, last_step: int) -> None:
    """Drop what earlier sessions wrote to TensorBoard past `last_step`, the step a run resumes from.

    The new session's writer hides those events with a purge marker, but only TensorBoard's own loader
    honours it: the event files still hold the steps a crashed session logged after its last checkpoint,
    which the resumed session logs again, so other readers (tbparse, pandas exports) saw them twice."""
    import glob

    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        records = list(RawEventFileLoader(path).Load())
        kept = [r for r in records if Event.FromString(r).step <= last_step]
        if len(kept) == len(records):
            continue
        part = f"{path}.part"
        with open(part, "wb") as fh:
            writer = RecordWriter(fh)
            for record in kept:
                writer.write(record)
            writer.flush()
        os.replace(part, path)


# --------------------------------------------------------------------------------------------
# Plain lines, the plot


def format_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


def significant(value: float, digits: int = 4) -> str:
    """`value` to `digits` significant figures: a DFT loss moving from 8e-5 to 1.2e-4 reads
    `8.000e-05 -> 0.0001200`, where four decimals printed `0.0001 -> 0.0001`."""
    text = format(value, f"#.{digits}g")
    return text if "e" in text else text.rstrip(".")


def progress_line(step: int, total: int, values: dict, start_step: int = 0) -> str:
    """`step 20/212: loss 0.5123, nll 5.123, lr 0.0005, 4,282 tokens/s, eta 0:03:12` (null: n/a); the
    loss and NLL to four significant figures."""

    def num(key, fmt):
        if values.get(key) is None:
            return "n/a"
        return significant(values[key]) if fmt == "sig" else format(values[key], fmt)

    line = (f"step {step}/{total}: loss {num('loss', 'sig')}, nll {num('nll', 'sig')}, lr {num('lr', '.3g')}, "
            f"{num('tokens_per_s', ',.0f')} tokens/s")
    elapsed, done = values.get("elapsed_s"), step - start_step
    if elapsed is not None and done > 0:
        line += f", eta {format_duration(elapsed / done * (total - step))}"
    return line


def curves_figure(rows: list[dict], title: str):
    """Loss, NLL and mean target-token probability against the step, one panel each."""
    from matplotlib.figure import Figure  # the Agg canvas: no display, no pyplot state
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(12, 4), layout="constrained")
    panels = (("loss", "loss"), ("nll", "NLL"), ("mean_token_prob", "mean token probability"))
    for ax, (key, label) in zip(fig.subplots(1, 3), panels):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), linewidth=1.2)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    # The full path, so a plot copied elsewhere still says which run it is; '$' would start mathtext.
    fig.suptitle(title.replace("$", r"\$"), fontsize=9)
    return fig


def write_curves(output_dir: str) -> Optional[str]:
    """output_dir/training_curves.png from metrics.jsonl (every segment of a resumed run), or None without rows."""
    path = os.path.join(output_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    if not rows:
        return None
    out = os.path.join(output_dir, PLOT_FILE)
    curves_figure(rows, os.path.abspath(output_dir)).savefig(out, dpi=100)
    return out


# --------------------------------------------------------------------------------------------
# The loggers


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty() and sys.stderr.isatty()  # tqdm draws on stderr; our lines go to stdout


class MetricsLogger:
    """Appends one JSON object per logged step and sends the namespaced figures to every tracker.

    With a progress bar (logging.progress_bar, and a terminal) the figures go to the bar; otherwise
    each logged step prints one plain line (progress_line), with no carriage returns.
    """

    def __init__(self, output_dir: str, total_steps: int, *, trackers: Iterable[str] = (),
                 progress_bar: bool = False, plot: bool = False, start_step: int = 0, config: Optional[dict] = None,
                 project: str = "dft_ds", run_name: Optional[str] = None):
        self._dir, self._total, self._start, self._plot = output_dir, total_steps, start_step, plot
        # The bar is opened at the first step, so the set-up lines print above it, not through it.
        self._bar, self._want_bar = None, progress_bar and stdout_is_terminal()
        self._trackers = open_trackers(trackers, output_dir, start_step, config or {}, project,
                                       _run_name(output_dir, run_name), self.print)
        self._jsonl = open(os.path.join(output_dir, METRICS_FILE), "a", encoding="utf-8")

    def log(self, step: int, values: dict[str, Any]) -> None:
        record = {"step": step, **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        self.log_scalars(step, {tag: values[key] for key, tag in TB_TAGS.items() if values.get(key) is not None})
        if values.get("prob_hist"):
            for tracker in self._trackers:
                tracker.histogram(HIST_TAG, values["prob_hist"], step)
        if self._bar is not None:
            if values.get("loss") is not None:
                self._bar.set_postfix(loss=significant(values["loss"]), nll=significant(values["nll"]),
                                      tok_s=f"{values['tokens_per_s']:.0f}", refresh=False)
        else:
            self.print(progress_line(step, self._total, values, self._start))

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        """Namespaced figures (train/*, perf/*, eval/*) to every tracker."""
        for tracker in self._trackers:
            tracker.scalars(step, values)

    def log_eval(self, step: int, values: dict[str, Any]) -> None:
        """Evaluation results go to eval.jsonl (metrics.jsonl stays one row per training step)."""
        with open(os.path.join(self._dir, EVAL_FILE), "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")
        self.log_scalars(step, {f"eval/{values['benchmark']}/accuracy": values["accuracy"]})
        took = f", {values['seconds']:.1f} s" if values.get("seconds") is not None else ""
        self.print(f"eval at step {step}: {values['benchmark']} accuracy {values['accuracy']:.3f} "
                   f"({counted(values['problems'], 'problem')}{took})")

    def log_heldout(self, step: int, values: dict[str, Any]) -> None:
        """Held-out loss (eval.loss_every) goes to heldout.jsonl and to the trackers as eval/*."""
        with open(os.path.join(self._dir, HELDOUT_FILE), "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")
        self.log_scalars(step, {f"eval/{key}": values[key] for key in ("loss", "nll", "mean_token_prob")
                                if values.get(key) is not None})
        if values.get("loss") is not None:
            self.print(f"held-out at step {step}: loss {significant(values['loss'])}, nll {significant(values['nll'])}, mean token "
                       f"prob {values['mean_token_prob']:.4f} ({values['rows']} rows, {values['seconds']:.1f} s)")

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

    def close(self, outcome: str = "finished") -> None:
        """outcome: finished, stopped (a checkpoint to resume from) or failed; the trackers record it."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        for tracker in self._trackers:
            tracker.close(outcome)
        self._jsonl.close()
        if self._plot:
            write_curves(self._dir)


class NullMetrics:
    """What ranks other than 0 hold: every call does nothing."""

    def log(self, step: int, values: dict[str, Any]) -> None:
        pass

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def log_eval(self, step: int, values: dict[str, Any]) -> None:
        pass

    def log_heldout(self, step: int, values: dict[str, Any]) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass

    def print(self, message: str) -> None:
        pass

    def close(self, outcome: str = "finished") -> None:
        pass
