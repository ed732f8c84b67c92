"""What a real run logs, read back: a plain process of dft_ds.train with logging.report_to=wandb,mlflow
(both offline), stopped at step 2 and resumed to step 4 with an evaluation at every step and export.hf.

stdout is a pipe here, as in a Slurm log: plain lines, no bar, no carriage return. W&B and MLflow hold
what metrics.jsonl holds and the resumed session continues the same runs; tokens/s counts training
time only and summary.json reports evaluation apart; training_curves.png appears with logging.plot;
DeepSpeed's unactionable lines are gone and ours remain. A missing tracker library exits 2 first.
"""

import json
import re
import subprocess
import sys

import pytest
import yaml

from dft_ds import train
from dft_ds.metrics import PLOT_FILE, TRACKERS_FILE
from tests.distributed.helpers import clean_env, read_metrics
from tests.tracker_files import mlflow_client, mlflow_history, wandb_history, wandb_run_info, wandb_runs

SETTINGS = ["data.synthetic_size=300", "data.max_length=192", "train.micro_batch_size=2", "train.max_steps=4",
            "logging.report_to=wandb,mlflow", "logging.hist_every=2"]
# Lines DeepSpeed prints or logs that a user cannot act on (accelerator detection on CPU, the CPU comm
# op on every start, zero_to_fp32's progress during export.hf).
NOISE = ["Setting accelerator to CPU", "built successfully", "Processing zero checkpoint",
         "Parsing checkpoint created by", "Detected checkpoint of type", "Reconstructed Trainable fp32",
         "Loading checkpoint shards", "Gathering sharded weights"]


def start(out, env, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dft_ds.train", *SETTINGS, f"train.output_dir={out}", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def segments(tmp_path_factory):
    """(run directory, first session, resumed session) of the run described above."""
    tmp = tmp_path_factory.mktemp("logging")
    env = clean_env(tmp)
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    env.update(NETRC=str(tmp / "no-netrc"), WANDB_CONFIG_DIR=str(tmp / "wandb-config"),
               WANDB_CACHE_DIR=str(tmp / "wandb-cache"), WANDB_DATA_DIR=str(tmp / "wandb-data"))
    out = tmp / "run"
    first = start(out, env, "train.stop_at_step=2", "logging.plot=false")
    assert first.returncode == 75, first.stdout[-2000:] + first.stderr[-3000:]
    assert not (out / PLOT_FILE).exists()  # logging.plot=false: no plot, even at a stop
    second = start(out, env, "eval.every_steps=1", "eval.limit=2", "eval.max_new_tokens=8", "export.hf=true")
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    return out, first, second


@pytest.mark.slow
def test_plain_lines_without_a_terminal_and_no_deepspeed_noise(segments):
    out, first, second = segments
    for proc in (first, second):
        assert "\r" not in proc.stdout + proc.stderr  # no bar, no carriage-return updates
        for noise in NOISE:
            assert noise not in proc.stdout + proc.stderr, noise
        assert re.search(r"^data: .* samples -> \d+ rows", proc.stdout, re.M)
        assert re.search(r"^batch: micro 2 x accumulation \d+ x world 1 = global", proc.stdout, re.M)
    sig = r"\d[\d.]*(?:e[+-]\d+)?"  # four significant figures
    step_line = r"^step {}/4: loss " + sig + ", nll " + sig + r", lr [\d.e-]+, [\d,]+ tokens/s, eta \d+:\d\d:\d\d$"
    for proc, steps in ((first, (1, 2)), (second, (3, 4))):
        lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
        assert len(lines) == 2 and all(re.match(step_line.format(s), line) for s, line in zip(steps, lines)), lines
    assert re.search(r"^eval at step 3: synthetic accuracy \d\.\d{3} \(2 problems, \d+\.\d s\)$", second.stdout, re.M)
    assert re.search(r"^dft-convert: .*checkpoints/step-4 .* -> .*/hf as float32$", second.stdout, re.M)
    assert re.search(r"^done: step 4 \(2 steps this session\) in [\d.]+ s \(\+ [\d.]+ s evaluation\), \d+ tokens/s", second.stdout, re.M)
    # One line says W&B logs offline (no key, no WANDB_MODE); the rest of W&B's chatter is its own.
    assert f"logging offline to {out}/wandb" in first.stdout


@pytest.mark.slow
def test_tokens_per_s_counts_training_time_only_and_evaluation_is_reported_apart(segments):
    out, _, second = segments
    everything = json.loads((out / "summary.json").read_text())
    summary = everything["session"]  # the second session: steps 3 and 4
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert everything["run"]["steps"] == 4 and (summary["start_step"], summary["steps"]) == (2, 2)
    assert everything["run"]["tokens"] == sum(r["tokens"] for r in rows)
    assert summary["tokens"] == sum(r["tokens"] for r in rows if r["step"] > 2) < everything["run"]["tokens"]
    assert everything["run"]["last_loss"] == rows[-1]["loss"] and everything["run"]["first_loss"] == rows[0]["loss"]
    assert summary["eval_seconds"] > 0 and summary["checkpoint_seconds"] > 0, summary  # the final save counts
    # tokens / training seconds, allowing for summary.json's rounding (seconds to 3 decimals, rates to 1).
    low, high = (summary["tokens"] / (summary["seconds"] + d) for d in (0.0005, -0.0005))
    assert low - 0.05 <= summary["tokens_per_s"] <= high + 0.05, summary
    assert summary["tokens_per_s"] > summary["tokens"] / summary["wall_seconds"], summary
    parts = summary["seconds"] + summary["eval_seconds"] + summary["checkpoint_seconds"]
    assert parts == pytest.approx(summary["wall_seconds"], abs=0.01), summary
    assert summary["seconds"] < summary["wall_seconds"], summary
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [3, 4] and all(e["seconds"] > 0 for e in evals)
    # Each evaluation's own time is inside eval_seconds (which also holds the logging); 3-decimal rounding.
    assert sum(e["seconds"] for e in evals) <= summary["eval_seconds"] + 0.002, (evals, summary)


@pytest.mark.slow
def test_metrics_jsonl_rows_carry_samples_epoch_elapsed_and_peak_memory(segments):
    out, _, second = segments
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    steps_per_epoch = int(re.search(r"(\d+) steps per epoch", second.stdout).group(1))
    for r in rows:
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > r["samples_per_s"]
        assert r["epoch"] == pytest.approx(r["step"] / steps_per_epoch, abs=1e-4)
        assert r["peak_memory_gib"] > 0.05  # the host RSS peak on CPU
    # elapsed_s: wall seconds since the session's loop began, growing within a session.
    assert 0 < rows[0]["elapsed_s"] < rows[1]["elapsed_s"] and 0 < rows[2]["elapsed_s"] < rows[3]["elapsed_s"]
    png = (out / PLOT_FILE).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000


@pytest.mark.slow
def test_wandb_and_mlflow_hold_the_run_and_the_resume_continues_the_same_runs(segments):
    out, _, _ = segments
    rows = {r["step"]: r for r in read_metrics(out)}
    ids = json.loads((out / TRACKERS_FILE).read_text())
    config = yaml.safe_load((out / "config.yaml").read_text())

    first, second = wandb_runs(out)  # one offline directory per session, one run id
    assert wandb_run_info(first)["id"] == wandb_run_info(second)["id"] == ids["wandb"]["id"]
    info = wandb_run_info(second)
    assert (info["project"], info["name"]) == ("dft_ds", "run")
    assert info["config"]["loss"] == config["loss"] and info["config"]["train"]["max_steps"] == 4
    history = {**wandb_history(first), **wandb_history(second)}
    assert sorted(history) == [1, 2, 3, 4]
    for step, row in rows.items():
        for key, tag in (("loss", "train/loss"), ("nll", "train/nll"), ("tokens_per_s", "perf/tokens_per_s"),
                         ("samples_per_s", "perf/samples_per_s"), ("peak_memory_gib", "perf/peak_memory_gib")):
            assert history[step][tag] == pytest.approx(row[key]), (step, tag)
    assert "eval/synthetic/accuracy" in history[3] and "eval/synthetic/accuracy" in history[4]
    assert history[2]["train/target_prob"]["values"] == rows[2]["prob_hist"]

    client = mlflow_client(out)
    run = client.get_run(ids["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and len(client.search_runs([run.info.experiment_id])) == 1
    assert run.data.params["loss.type"] == config["loss"]["type"] and run.data.params["train.max_steps"] == "4"
    for key, tag in (("loss", "train/loss"), ("mean_token_prob", "train/mean_token_prob"), ("lr", "train/lr")):
        assert mlflow_history(client, run.info.run_id, tag) == [(s, pytest.approx(r[key])) for s, r in rows.items()]
    assert [s for s, _ in mlflow_history(client, run.info.run_id, "eval/synthetic/accuracy")] == [3, 4]


def test_a_missing_tracker_library_exits_2_before_the_run_directory_exists(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed: find_spec reports None
    out = tmp_path / "run"
    assert train.main([f"train.output_dir={out}", "logging.report_to=mlflow"]) == 2
    err = capsys.readouterr().err
    assert "dft-train: error: logging.report_to names mlflow, which is not installed" in err
    assert "pip install 'dft_ds[trackers]'" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow
def test_a_crash_and_resume_log_each_step_once_and_no_lock_of_its_own(tmp_path):
    """Killed in step 4 after the checkpoint at step 2, then resumed: step 3 was in TensorBoard's first
    event file and is logged again by the resumed session; the resumed start was warned that the run
    was locked by itself (the plan read the lock it had just taken)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.distributed.helpers import SMALL

    out, env = tmp_path / "run", clean_env(tmp_path)
    extra = [*SMALL, "train.max_steps=5", "checkpoint.every_steps=2", "logging.report_to=none", "logging.plot=false"]
    crashed = start(out, {**env, "DFT_DS_FAULT": "kill_in_step:4"}, *extra)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    resumed = start(out, env, *extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "taking over a stale lock" in resumed.stdout and "locked by a live run" not in resumed.stdout
    steps = []
    for path in sorted((out / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path))
        acc.Reload()
        steps += [e.step for e in acc.Scalars("train/loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5], steps
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]
