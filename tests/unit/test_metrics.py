"""metrics.py: what rank 0 writes to metrics.jsonl is what TensorBoard holds, read back with
TensorBoard's own event reader; a resumed logger hides the events past its step; other ranks write nothing;
plain lines without a bar; the training-curve plot; a missing tracker named before anything is written.
(W&B and MLflow against their real libraries: test_trackers.py.)"""

import json
import os
import subprocess
import sys

import pytest

from dft_ds.errors import ConfigError
from dft_ds.metrics import (PLOT_FILE, TB_TAGS, MetricsLogger, NullMetrics, curves_figure, peak_memory_gib,
                            progress_line, require_trackers)


def record(step: int, hist: bool = False) -> dict:
    values = {"loss": 0.5 / step, "nll": 5.0 / step, "mean_token_prob": 0.1 * step, "low_prob_share": 0.9 / step,
              "lr": 1e-3 * step, "grad_norm": 2.0 + step, "tokens": 100 * step, "target_tokens": 40 * step,
              "tokens_per_s": 1000.0 + step, "kl_ref": 0.01 * step, "samples_per_s": 10.0 + step,
              "epoch": 0.25 * step, "elapsed_s": 2.0 * step, "peak_memory_gib": 0.5 + step,
              "mean_weight": 0.2 / step, "zero_weight_share": 0.05 * step, "mean_entropy": 0.3 / step}
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
    logger = MetricsLogger(str(tmp_path), 3, trackers=["tensorboard"])
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
    logger = MetricsLogger(str(tmp_path), 2, trackers=["tensorboard"])
    logger.log(1, {**record(1), "loss": None, "nll": None})  # a window of skipped steps only
    logger.log(2, record(2))
    logger.close()
    assert read_jsonl(tmp_path)[0]["loss"] is None
    assert [e.step for e in read_events(tmp_path).Scalars("train/loss")] == [2]


def test_a_resumed_logger_purges_the_events_past_its_checkpoint(tmp_path):
    first = MetricsLogger(str(tmp_path), 4, trackers=["tensorboard"])
    for step in (1, 2, 3, 4):
        first.log(step, record(step))
    first.close()
    # Resumed from a checkpoint at step 2: steps 3 and 4 are recomputed, their old events must go.
    second = MetricsLogger(str(tmp_path), 4, trackers=["tensorboard"], start_step=2)
    for step in (3, 4):
        second.log(step, {**record(step), "loss": 9.0 + step})
    second.close()
    losses = [(e.step, e.value) for e in read_events(tmp_path).Scalars("train/loss")]
    assert losses == [(1, pytest.approx(0.5)), (2, pytest.approx(0.25)), (3, 12.0), (4, 13.0)]


def test_null_metrics_write_nothing(tmp_path, capsys):
    null = NullMetrics()
    null.log(1, record(1, hist=True))
    null.log_eval(1, {"benchmark": "synthetic", "accuracy": 1.0, "problems": 1})
    null.log_scalars(1, {"eval/x/loss": 1.0})
    null.print("not shown")
    null.advance()
    null.close("finished")
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr().out == ""


def test_without_a_terminal_each_logged_step_is_one_plain_line(tmp_path, capsys):
    # progress_bar=True, but pytest's captured stdout is not a terminal (as in a Slurm log): no bar.
    logger = MetricsLogger(str(tmp_path), 4, progress_bar=True, start_step=0)
    logger.print("data: before the first step")
    for step in (2, 4):
        logger.advance(2)
        logger.log(step, record(step))
    logger.log_eval(4, {"benchmark": "synthetic", "accuracy": 0.5, "problems": 8, "seconds": 1.25})
    logger.close()
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines == ["data: before the first step",
                     "step 2/4: loss 0.2500, nll 2.500, lr 0.002, 1,002 tokens/s, eta 0:00:04",
                     "step 4/4: loss 0.1250, nll 1.250, lr 0.004, 1,004 tokens/s, eta 0:00:00",
                     "eval at step 4: synthetic accuracy 0.500 (8 problems, 1.2 s)"]
    assert "\r" not in captured.out + captured.err
    assert not (tmp_path / "tensorboard").exists()  # no tracker named, none opened


def test_progress_line_of_a_resumed_session_and_of_a_window_without_targets():
    # Resumed at step 100 of 300: 50 steps in 25 s -> 150 steps left take 75 s.
    values = {"loss": None, "nll": None, "lr": 1e-5, "tokens_per_s": 4282.4, "elapsed_s": 25.0}
    assert progress_line(150, 300, values, start_step=100) == \
        "step 150/300: loss n/a, nll n/a, lr 1e-05, 4,282 tokens/s, eta 0:01:15"
    assert progress_line(1, 3, {"loss": 0.5}) == "step 1/3: loss 0.5000, nll n/a, lr n/a, n/a tokens/s"


def test_the_plot_is_a_png_of_every_logged_step_titled_with_the_full_path(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    logger = MetricsLogger(str(run), 3, plot=True)
    for step in (1, 2, 3):
        logger.log(step, record(step))
    logger.close()
    png = run / PLOT_FILE
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(png).shape
    assert width > height > 100
    fig = curves_figure(read_jsonl(run), str(run))
    assert fig.get_suptitle() == str(run) and str(run).startswith("/")  # absolute, leading '/' kept
    assert [ax.get_title() for ax in fig.axes] == ["loss", "NLL", "mean token probability"]
    assert list(fig.axes[1].lines[0].get_ydata()) == [r["nll"] for r in read_jsonl(run)]


def test_no_plot_when_logging_plot_is_off(tmp_path):
    logger = MetricsLogger(str(tmp_path), 1, plot=False)
    logger.log(1, record(1))
    logger.close()
    assert not (tmp_path / PLOT_FILE).exists()


def test_a_missing_tracker_is_named_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec then reports it missing
    with pytest.raises(ConfigError, match=r"logging.report_to names wandb, which is not installed; .*"
                                          r"pip install 'dft_ds\[trackers\]'"):
        require_trackers(["tensorboard", "wandb"])
    require_trackers(["tensorboard"])  # TensorBoard is a dependency: nothing to check


def test_nothing_of_wandb_or_mlflow_is_imported_unless_named(tmp_path):
    code = ("import sys; from dft_ds.metrics import MetricsLogger, require_trackers; "
            f"require_trackers(['tensorboard']); lg = MetricsLogger({str(tmp_path)!r}, 1, trackers=['tensorboard']); "
            "lg.log(1, {'loss': 1.0}); lg.close(); print(sorted(m for m in ('wandb', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "[]"


def test_peak_memory_on_cpu_is_the_host_rss_peak():
    import torch

    peak = peak_memory_gib(torch.device("cpu"))
    assert 0.01 < peak < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def test_peak_memory_on_cpu_rises_by_what_was_touched():
    """A fresh process touches 512 MiB: its peak rises by that much, in GiB (a wrong unit is off by 1024).

    Linux carries a parent's peak RSS over into a child it starts (here, this test process's GiB):
    the measuring process is started by a shell that forks it, so that it starts from the shell's."""
    code = ("import torch; from dft_ds.metrics import peak_memory_gib; cpu = torch.device('cpu'); "
            "before = peak_memory_gib(cpu); block = bytearray(512 * 2**20); block[::4096] = b'x' * (len(block) // 4096); "
            "print(before, peak_memory_gib(cpu))")
    out = subprocess.run(["sh", "-c", '"$0" -c "$1"; exit $?', sys.executable, code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    before, after = map(float, out.stdout.split())
    assert 0.45 < after - before < 0.75, (before, after)


@pytest.mark.gpu
def test_peak_memory_on_an_accelerator_is_its_max_allocated():
    """A real allocation on the GPU: the peak holds it, and stays after it is freed (a peak, not the current)."""
    import torch

    device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    block = torch.empty(768 * 2**20, dtype=torch.uint8, device=device)
    peak = peak_memory_gib(device)
    assert peak == pytest.approx((base + block.numel()) / 2**30, abs=0.05)
    del block
    torch.cuda.synchronize(device)
    assert peak_memory_gib(device) == peak and torch.cuda.memory_allocated(device) == base


def test_a_small_dft_loss_prints_its_significant_figures():
    """DFT's loss is small once the model is confident: 8e-5 and 1.2e-4 printed as 0.0001 -> 0.0001."""
    from dft_ds.metrics import significant

    assert (significant(8e-5), significant(1.2e-4), significant(0.51234), significant(12.3456), significant(1234.0)) \
        == ("8.000e-05", "0.0001200", "0.5123", "12.35", "1234")
    line = progress_line(2, 4, {"loss": 1.2e-4, "nll": 0.0123456, "lr": 1e-5, "tokens_per_s": 10.0})
    assert line == "step 2/4: loss 0.0001200, nll 0.01235, lr 1e-05, 10 tokens/s"
