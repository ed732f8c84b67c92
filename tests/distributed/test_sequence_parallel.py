"""train.sequence_parallel: N ranks sharing each row give the gradient of one rank holding it whole.

Real DeepSpeed ZeRO-3 engines on gloo, one optimizer step of the real trainer (grad_probe.py) on the
same global batch, the full gradient read at the accumulation boundary. Rows are packed: several
documents to a row, documents cut by the slice boundary, and a row length that N does not divide.
The steps compared run in three launches of grad_probe.py (1, 2 and 4 ranks, several probes each).
"""

import os
import subprocess
import sys

import pytest
import torch

from dft_ds.errors import EXIT_PREEMPTED
from tests.distributed.helpers import QUICK, clean_env, free_port, read_metrics, run_probes

COMMON = ["data.synthetic_size=96", "data.packing=true", "data.max_length=203", "train.micro_batch_size=1",
          "train.global_batch_size=2", "train.max_grad_norm=0", "loss.prob_floor=0", "logging.tensorboard=false",
          "model.attn_implementation=sdpa"]


def probe_args(tmp_path, name: str, sp: int, *extra: str) -> list[str]:
    return [f"train.output_dir={tmp_path / name}", f"train.sequence_parallel={sp}", *COMMON, *extra]


ACCUM2 = "train.gradient_accumulation_steps=2"


@pytest.fixture(scope="module")
def steps(tmp_path_factory, family_dir) -> dict:
    """{name: probe result}: every step the tests compare, in three launches (1, 2 and 4 ranks); one
    1-rank baseline serves the N = 2 runs and the tiled MLP alike."""
    tmp = tmp_path_factory.mktemp("sp")
    gemma = [f"model.name_or_path={family_dir('gemma3')}", "loss.type=sft", ACCUM2]  # random init: dft weights ~1/V
    tiled = [ACCUM2, "model.tiled_mlp=3", "model.offload_activations=true", "model.gradient_checkpointing=true"]
    mixed = ["loss.type=dft", "train.global_batch_size=4", "model.gradient_checkpointing=true"]
    one = run_probes(tmp, 1, {"n1-dft": probe_args(tmp, "n1-dft", 1, "loss.type=dft", ACCUM2),
                              "n1-sft": probe_args(tmp, "n1-sft", 1, "loss.type=sft", ACCUM2),
                              "g1": probe_args(tmp, "g1", 1, *gemma)})
    two = run_probes(tmp, 2, {"n2-dft": probe_args(tmp, "n2-dft", 2, "loss.type=dft", ACCUM2),
                              "n2-sft": probe_args(tmp, "n2-sft", 2, "loss.type=sft", ACCUM2),
                              "tiled": probe_args(tmp, "tiled", 2, *tiled),
                              "g2": probe_args(tmp, "g2", 2, *gemma)})
    four = run_probes(tmp, 4, {"dp4": probe_args(tmp, "dp4", 1, *mixed), "dp2sp2": probe_args(tmp, "dp2sp2", 2, *mixed)})
    return {**one, **two, **four}


def assert_same_step(got: dict, want: dict) -> None:
    assert got["targets"] == want["targets"] > 0            # no target lost or counted twice at a slice boundary
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["grads"].keys() == want["grads"].keys()
    norm = torch.sqrt(sum((g ** 2).sum() for g in want["grads"].values()))
    assert norm > 1e-3
    for name, g in want["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["dft", "sft"])
def test_two_ranks_sharing_rows_equal_one_rank(steps, loss):
    assert_same_step(steps[f"n2-{loss}"], steps[f"n1-{loss}"])


@pytest.mark.slow
def test_two_by_two_equals_four_data_parallel_ranks(steps):
    """4 ranks as 2 data-parallel x 2 sequence-parallel against 4 x 1; checkpointed layers run again in
    the backward (inside the exchange) on both sides."""
    assert_same_step(steps["dp2sp2"], steps["dp4"])


@pytest.mark.slow
def test_the_probes_of_a_launch_are_separate_steps(steps):
    """Several probes share a launch: each is its own step (DFT's loss is not SFT's, the 1-rank ones included)."""
    for n in ("n1", "n2"):
        assert steps[f"{n}-dft"]["targets"] == steps[f"{n}-sft"]["targets"]
        assert steps[f"{n}-dft"]["loss"] < 0.1 * steps[f"{n}-sft"]["loss"]
    assert steps["n1-dft"]["world_size"] == 1 and steps["n2-dft"]["world_size"] == 2 and steps["dp4"]["world_size"] == 4


# ---------------------------------------------------------------- real runs: train, log, convert, resume


def train(tmp_path, out, ranks: int, *extra) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", f"--master-port={free_port()}",
           "-m", "dft_ds.train", *QUICK, f"train.output_dir={out}", "train.max_steps=6", "train.global_batch_size=4",
           "data.packing=true", "logging.tensorboard=false", *extra]
    log = tmp_path / f"{os.path.basename(out)}-{len(os.listdir(tmp_path))}.log"
    with open(log, "w") as fh:  # a file, not a pipe: an unread pipe can block a rank mid-collective
        rc = subprocess.run(cmd, env=clean_env(tmp_path), stdout=fh, stderr=subprocess.STDOUT, timeout=600).returncode
    return rc, log.read_text()


@pytest.mark.slow
def test_embedded_default_at_n2_trains_logs_converts_and_resumes_at_n1(tmp_path):
    straight = tmp_path / "straight"
    rc, log = train(tmp_path, straight, 2, "train.sequence_parallel=2", "export.hf=true")
    assert rc == 0, log[-3000:]
    assert "x data-parallel 1 (world 2 / sequence_parallel 2" in log
    rows = read_metrics(straight)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[-1]["nll"] < rows[0]["nll"]
    # Every row's documents and tokens once, though two ranks hold each row.
    assert all(r["samples_per_s"] > 0 and r["target_tokens"] > 0 for r in rows)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(straight / "hf")
    assert model.config.num_attention_heads == 4

    # The same run stopped at step 3 on N = 2 and resumed on N = 1 (2 data-parallel ranks): the same
    # global batch, the same samples per step, the same ZeRO-3 partitioning over 2 ranks.
    out = tmp_path / "resumed"
    rc, log = train(tmp_path, out, 2, "train.sequence_parallel=2", "train.stop_at_step=3")
    assert rc == EXIT_PREEMPTED or (rc == 1 and f"exitcode  : {EXIT_PREEMPTED} " in log), log[-3000:]
    rc, log = train(tmp_path, out, 2, "train.sequence_parallel=1")
    assert rc == 0, log[-3000:]
    assert "train.sequence_parallel changed from 2 to 1" in log and "universal" not in log
    got, want = read_metrics(out), rows
    assert [r["step"] for r in got] == list(range(1, 7))
    for r, q in zip(got, want):
        assert r["loss"] == pytest.approx(q["loss"], rel=2e-4) and r["nll"] == pytest.approx(q["nll"], rel=2e-4)
        assert r["target_tokens"] == q["target_tokens"] and r["tokens"] == q["tokens"]


@pytest.mark.parametrize("extra, message", [
    (["--world-size", "3", "train.sequence_parallel=2"], "train.sequence_parallel: 2 does not divide the world size 3"),
    (["--world-size", "3", "train.sequence_parallel=3"], "the model has 4 attention heads, which 3 does not divide"),
    (["--world-size", "2", "train.sequence_parallel=2", "model.attn_implementation=eager"],
     "model.attn_implementation: eager cannot run sequence parallel"),
    (["--world-size", "2", "train.sequence_parallel=2", "loss.normalize=micro_batch_mean"],
     "set loss.normalize=step with train.sequence_parallel > 1"),
])
def test_what_cannot_run_sequence_parallel_exits_2(tmp_path, dft_train, extra, message):
    proc = dft_train("--check", *extra, f"train.output_dir={tmp_path / 'run'}", "data.synthetic_size=64")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_tiled_mlp_and_offloaded_activations_keep_the_gradient(steps):
    """model.tiled_mlp (3 tiles, exactly 3 MLP calls per rank each way under ZeRO-3, whatever a rank
    holds) and model.offload_activations, with checkpointing, at N = 2: the gradient of the plain run
    (1 rank, DFT, the same baseline as the N = 2 comparison)."""
    assert_same_step(steps["tiled"], steps["n1-dft"])


@pytest.mark.slow
def test_sliding_window_layers_keep_their_window(steps):
    """Gemma 3 (tiny, window 32, local and global layers alternating; documents longer than the window):
    N = 2 on 2 ranks against 1 rank, with GQA key/value heads (replicated when fewer than N)."""
    assert_same_step(steps["g2"], steps["g1"])
