"""logging.report_to=wandb,mlflow against the real libraries, offline: what MetricsLogger sends is read
back from W&B's offline transaction log and from MLflow's file store, and equals metrics.jsonl; a resumed
logger continues the same runs; WANDB_MODE and MLFLOW_TRACKING_URI are honoured."""

import json

import pytest

from dft_ds.metrics import TB_TAGS, TRACKERS_FILE, MetricsLogger, wandb_key_configured
from tests.tracker_files import mlflow_client, mlflow_history, wandb_history, wandb_run_info, wandb_runs

pytest.importorskip("wandb")
pytest.importorskip("mlflow")

CONFIG = {"train": {"lr": 1e-3, "max_steps": 4}, "loss": {"type": "dft", "prob_floor": None}}


def record(step: int, hist: bool = False) -> dict:
    values = {"loss": 0.5 / step, "nll": 5.0 / step, "mean_token_prob": 0.1 * step, "low_prob_share": 0.9 / step,
              "lr": 1e-3 * step, "grad_norm": 2.0 + step, "tokens": 100 * step, "target_tokens": 40 * step,
              "tokens_per_s": 1000.0 + step, "samples_per_s": 10.0 + step, "epoch": 0.25 * step,
              "elapsed_s": 2.0 * step, "peak_memory_gib": 0.5 + step, "mean_weight": 0.2 / step,
              "zero_weight_share": 0.05 * step}
    if hist:
        values["prob_hist"] = [step, 0, 3] + [0] * 15 + [2, 7]
    return values


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No W&B key anywhere, no WANDB_MODE, no MLFLOW_TRACKING_URI; W&B's own settings kept in tmp_path."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "MLFLOW_TRACKING_URI", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")  # W&B's own banner; our one line is printed anyway
    yield
    import wandb

    wandb.teardown()  # W&B keeps settings read from the environment per process: start afresh


def open_logger(run, total=3, **kw):
    return MetricsLogger(str(run), total, trackers=["tensorboard", "wandb", "mlflow"], config=CONFIG,
                         project="dft-unit", run_name="unit-run", **kw)


def rows_of(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_wandb_and_mlflow_hold_what_metrics_jsonl_holds(tmp_path, offline, capsys):
    run = tmp_path / "run"
    run.mkdir()
    logger = open_logger(run)
    for step in (1, 2, 3):
        logger.log(step, record(step, hist=step == 2))
    logger.log_eval(3, {"benchmark": "synthetic", "accuracy": 0.25, "problems": 8, "seconds": 0.5})
    logger.close()
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "wandb" in line] == [
        f"wandb: no API key (WANDB_API_KEY or ~/.netrc) and WANDB_MODE unset: logging offline to {run}/wandb; "
        "`wandb sync` uploads it later"]
    rows = rows_of(run)
    ids = json.loads((run / TRACKERS_FILE).read_text())

    # W&B: one offline run in output_dir/wandb, with the same figures under the same tags.
    (wb_dir,) = wandb_runs(run)
    info = wandb_run_info(wb_dir)
    assert (info["id"], info["project"], info["name"]) == (ids["wandb"]["id"], "dft-unit", "unit-run")
    assert info["config"]["train"] == CONFIG["train"] and info["config"]["loss"] == CONFIG["loss"]
    history = wandb_history(wb_dir)
    assert sorted(history) == [1, 2, 3]
    tags = {key: tag for key, tag in TB_TAGS.items() if key in rows[0]}
    assert len(tags) == len(TB_TAGS) - 2  # all but kl_ref (loss.type=asft only) and mean_entropy (eaft only)
    for row in rows:
        for key, tag in tags.items():
            assert history[row["step"]][tag] == pytest.approx(row[key]), (tag, row["step"])
    assert history[3]["eval/synthetic/accuracy"] == 0.25
    hist = history[2]["train/target_prob"]
    assert hist["_type"] == "histogram" and hist["values"] == rows[1]["prob_hist"] and len(hist["bins"]) == 21

    # MLflow: a file store in output_dir/mlruns; the config as params; the same figures per step.
    client = mlflow_client(run)
    mlrun = client.get_run(ids["mlflow"]["run_id"])
    assert ids["mlflow"]["tracking_uri"] == (run / "mlruns").resolve().as_uri()
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "unit-run"
    assert client.get_experiment(mlrun.info.experiment_id).name == "dft-unit"
    assert mlrun.data.params == {"train.lr": "0.001", "train.max_steps": "4", "loss.type": "dft",
                                 "loss.prob_floor": "None"}
    for key, tag in tags.items():
        assert mlflow_history(client, mlrun.info.run_id, tag) == [(r["step"], pytest.approx(r[key])) for r in rows]
    assert mlflow_history(client, mlrun.info.run_id, "eval/synthetic/accuracy") == [(3, 0.25)]


def test_a_resumed_logger_continues_the_same_wandb_and_mlflow_runs(tmp_path, offline):
    run = tmp_path / "run"
    run.mkdir()
    first = open_logger(run, total=4)
    for step in (1, 2):
        first.log(step, record(step))
    first.close("stopped")  # preempted after a checkpoint at step 2
    ids = json.loads((run / TRACKERS_FILE).read_text())
    client = mlflow_client(run)
    assert client.get_run(ids["mlflow"]["run_id"]).info.status == "KILLED"

    second = open_logger(run, total=4, start_step=2)
    for step in (3, 4):
        second.log(step, record(step))
    second.close()
    assert json.loads((run / TRACKERS_FILE).read_text()) == ids
    # W&B offline: one directory per session, both of the same run id (wandb sync joins them).
    segments = wandb_runs(run)
    assert [wandb_run_info(d)["id"] for d in segments] == [ids["wandb"]["id"]] * 2
    assert sorted(wandb_history(segments[0])) == [1, 2] and sorted(wandb_history(segments[1])) == [3, 4]
    mlrun = client.get_run(ids["mlflow"]["run_id"])
    assert mlrun.info.status == "FINISHED"
    assert [s for s, _ in mlflow_history(client, mlrun.info.run_id, "train/loss")] == [1, 2, 3, 4]
    assert len(client.search_runs([mlrun.info.experiment_id])) == 1


def test_wandb_mode_and_mlflow_tracking_uri_are_honoured(tmp_path, offline, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)  # a key, but WANDB_MODE=offline wins
    elsewhere = (tmp_path / "store").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    run = tmp_path / "run"
    run.mkdir()
    logger = open_logger(run, total=1)
    logger.log(1, record(1))
    logger.close()
    assert "no API key" not in capsys.readouterr().out
    assert len(wandb_runs(run)) == 1
    ids = json.loads((run / TRACKERS_FILE).read_text())
    assert ids["mlflow"]["tracking_uri"] == elsewhere
    assert not (run / "mlruns").exists() and (tmp_path / "store").is_dir()


def test_a_wandb_key_is_found_in_the_environment_or_netrc(tmp_path):
    netrc = tmp_path / "netrc"
    assert not wandb_key_configured({"NETRC": str(netrc)})
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert wandb_key_configured({"NETRC": str(netrc)})
    assert not wandb_key_configured({"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.example.org"})
    assert wandb_key_configured({"NETRC": str(tmp_path / "none"), "WANDB_API_KEY": "k" * 40})
