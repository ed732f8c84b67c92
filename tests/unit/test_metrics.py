"""metrics.py: what rank 0 writes to metrics.jsonl is what TensorBoard holds, read back with
TensorBoard's own event reader; a resumed logger hides the events past its step; other ranks write nothing."""

import json

import pytest

from dft_ds.metrics import TB_TAGS, MetricsLogger, NullMetrics


def record(step: int, hist: bool = False) -> dict:
    values = {"loss": 0.5 / step, "nll": 5.0 / step, "mean_token_prob": 0.1 * step, "low_prob_share": 0.9 / step,
              "lr": 1e-3 * step, "grad_norm": 2.0 + step, "tokens": 100 * step, "target_tokens": 40 * step,
              "tokens_per_s": 1000.0 + step, "kl_ref": 0.01 * step}
    if hist:
        values["prob_hist"] = [step, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 7]
    return values


def read_events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def read_jsonl(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_holds_exactly_what_metrics_jsonl_holds(tmp_path):
    logger = MetricsLogger(str(tmp_path), tensorboard=True, progress_bar=False, total_steps=3)
    for step in (1, 2, 3):
        logger.log(step, record(step, hist=step == 2))
    logger.log_eval(3, {"benchmark": "synthetic", "accuracy": 0.25, "problems": 8})
    logger.close()

    rows, events = read_jsonl(tmp_path), read_events(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key, tag in TB_TAGS.items():
        scalars = events.Scalars(tag)
        assert [e.step for e in scalars] == [1, 2, 3], tag
        for event, row in zip(scalars, rows):
            assert event.value == pytest.approx(row[key], rel=1e-6), (tag, row["step"])
    hist = events.Histograms("train/target_prob")
    assert [h.step for h in hist] == [2]
    counts = rows[1]["prob_hist"]
    assert list(hist[0].histogram_value.bucket) == counts
    assert hist[0].histogram_value.num == sum(counts)
    assert list(hist[0].histogram_value.bucket_limit) == pytest.approx([(i + 1) / 20 for i in range(20)])
    assert [e.value for e in events.Scalars("eval/synthetic/accuracy")] == [0.25]
    assert json.loads((tmp_path / "eval.jsonl").read_text()) == {"step": 3, "benchmark": "synthetic",
                                                                  "accuracy": 0.25, "problems": 8}


def test_a_null_value_is_left_out_of_tensorboard_but_kept_in_jsonl(tmp_path):
    logger = MetricsLogger(str(tmp_path), tensorboard=True, progress_bar=False, total_steps=2)
    logger.log(1, {**record(1), "loss": None, "nll": None})  # a window of skipped steps only
    logger.log(2, record(2))
    logger.close()
    assert read_jsonl(tmp_path)[0]["loss"] is None
    assert [e.step for e in read_events(tmp_path).Scalars("train/loss")] == [2]


def test_a_resumed_logger_purges_the_events_past_its_checkpoint(tmp_path):
    first = MetricsLogger(str(tmp_path), tensorboard=True, progress_bar=False, total_steps=4)
    for step in (1, 2, 3, 4):
        first.log(step, record(step))
    first.close()
    # Resumed from a checkpoint at step 2: steps 3 and 4 are recomputed, their old events must go.
    second = MetricsLogger(str(tmp_path), tensorboard=True, progress_bar=False, total_steps=4, purge_step=3)
    for step in (3, 4):
        second.log(step, {**record(step), "loss": 9.0 + step})
    second.close()
    losses = [(e.step, e.value) for e in read_events(tmp_path).Scalars("train/loss")]
    assert losses == [(1, pytest.approx(0.5)), (2, pytest.approx(0.25)), (3, 12.0), (4, 13.0)]


def test_null_metrics_write_nothing(tmp_path, capsys):
    null = NullMetrics()
    null.log(1, record(1, hist=True))
    null.log_eval(1, {"benchmark": "synthetic", "accuracy": 1.0, "problems": 1})
    null.print("not shown")
    null.advance()
    null.close()
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr().out == ""
