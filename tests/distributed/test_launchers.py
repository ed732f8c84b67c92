"""2-process ZeRO-3 training on gloo through the real launchers: deepspeed, torchrun, srun-style env.

Each run trains the embedded default briefly and must leave a complete run directory: the
resolved config, metrics.jsonl with finite, falling NLL, TensorBoard events, a sharded checkpoint
and a summary.
"""

import glob
import json
import math
import os
import sys

import pytest
import yaml

from tests.distributed.helpers import BIN, QUICK, SMALL, clean_env, free_port, read_metrics, run

STEPS = 14


def check_run_dir(out, world_size: int, loss_type: str = "dft") -> list[dict]:
    cfg_text = open(os.path.join(out, "config.yaml"), encoding="utf-8").read()
    assert f"# world_size: {world_size}" in cfg_text
    resolved = yaml.safe_load(cfg_text)
    assert resolved["loss"]["type"] == loss_type and resolved["train"]["output_dir"] == str(out)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        for key in ("loss", "nll", "mean_token_prob", "lr", "grad_norm", "tokens", "tokens_per_s"):
            assert r[key] is not None and math.isfinite(r[key]), (key, r)
    # The model learns: NLL over the last steps is well below the first steps'.
    first = sum(r["nll"] for r in rows[:3]) / 3
    last = sum(r["nll"] for r in rows[-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert rows[-1]["mean_token_prob"] > rows[0]["mean_token_prob"]
    # warmup then cosine: the peak is in the middle, the last rate is below it
    lrs = [r["lr"] for r in rows]
    assert max(lrs) > lrs[0] and lrs[-1] < max(lrs)
    events = glob.glob(os.path.join(out, "tensorboard", "events.out.tfevents.*"))
    assert len(events) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(events[0])
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/nll", "train/mean_token_prob", "train/lr", "train/grad_norm",
            "perf/tokens_per_s"} <= tags
    assert [e.value for e in acc.Scalars("train/nll")] == pytest.approx([r["nll"] for r in rows], rel=1e-5)
    shards = glob.glob(os.path.join(out, "checkpoints", f"step-{STEPS}", "*model_states.pt"))
    assert len(shards) == world_size
    summary = json.load(open(os.path.join(out, "summary.json"), encoding="utf-8"))
    assert summary["run"]["steps"] == STEPS and summary["world_size"] == world_size
    assert summary["run"]["last_loss"] == pytest.approx(rows[-1]["loss"])
    assert summary["run"]["tokens"] == summary["session"]["tokens"] == sum(r["tokens"] for r in rows)
    return rows


def overrides(out, loss_type="dft") -> list[str]:
    return QUICK + SMALL + [f"train.output_dir={out}", f"train.max_steps={STEPS}", f"loss.type={loss_type}",
                    "train.warmup_ratio=0.2"]


@pytest.mark.slow
def test_deepspeed_launcher_two_ranks(tmp_path):
    out = tmp_path / "run"
    port = free_port()
    cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
           "--module", "dft_ds.train"] + overrides(out)
    proc = run(cmd + ["export.hf=true"], clean_env(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_run_dir(out, world_size=2)
    assert "done: 14 steps" in proc.stdout
    # DeepSpeed's CPU all-reduce maps a 69 MB /dev/shm file per rank under this launcher (LOCAL_SIZE
    # equals the world size) and never removes it; the ranks remove theirs once all have mapped them.
    assert glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*") == []
    # export.hf: the final weights as a Hugging Face directory, equal to the checkpoint's.
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    AutoTokenizer.from_pretrained(out / "hf")
    saved = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=f"step-{STEPS}")
    exported = model.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(exported[name], tensor), name


@pytest.mark.slow
def test_torchrun_two_ranks_sft(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "dft_ds.train"] + overrides(out, "sft")
    proc = run(cmd, clean_env(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = check_run_dir(out, world_size=2, loss_type="sft")
    # For SFT the logged loss is the NLL itself.
    assert all(r["loss"] == pytest.approx(r["nll"]) for r in rows)


@pytest.mark.slow
def test_srun_style_environment_two_ranks(tmp_path):
    """Two plain processes that only have SLURM_* variables, as `srun python -m dft_ds.train` gives them."""
    import subprocess

    out, port = tmp_path / "run", free_port()
    procs, logs = [], [tmp_path / f"rank{rank}.log" for rank in range(2)]
    for rank in range(2):
        env = clean_env(tmp_path)
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        # Output to files, not pipes: an unread pipe that fills up would block a rank mid-collective.
        with open(logs[rank], "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", "dft_ds.train"] + overrides(out), env=env,
                                          stdout=log, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        p.wait(timeout=600)
    outputs = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    check_run_dir(out, world_size=2)
    # Rank 0 speaks, rank 1 stays quiet.
    assert "done:" in outputs[0] and "done:" not in outputs[1]
