"""scripts/offline_rl_round.sh under DRY_RUN=1: the commands of one round, in order, with DFT and RFT
at equal compute, and the refusal of a round that exists. Only bash; the real round is tests/e2e's."""

import os
import shlex
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "scripts", "offline_rl_round.sh")
KNOBS = ("ROOT", "BASE", "SAMPLES", "TEMPERATURE", "MAX_NEW_TOKENS", "PROMPT", "BACKEND", "SEED", "SAMPLE_ARGS",
         "NPROC", "LAUNCH", "STEPS", "GLOBAL_BATCH", "LR", "EXTRA_TRAIN", "EVAL_BENCHMARKS", "EVAL_SAMPLES",
         "EVAL_ARGS", "PYTHON", "DRY_RUN")


def run_round(tmp_path, *args, dry_run=True, **knobs):
    env = {k: v for k, v in os.environ.items() if k not in KNOBS}
    env.update(ROOT=str(tmp_path / "rounds"), HF_HUB_OFFLINE="1", **knobs)
    if dry_run:
        env["DRY_RUN"] = "1"
    return subprocess.run(["bash", SCRIPT, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)


def commands(proc):
    """The printed commands, as argument lists."""
    return [shlex.split(line[1:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]


def step(cmd):
    """What a command does: sample, train-dft, train-rft, convert, eval, compare."""
    if "dft_ds.train" in cmd:
        return "train-" + next(a for a in cmd if a.startswith("loss.type=")).split("=", 1)[1]
    module = cmd[cmd.index("-m") + 1]
    return {"dft_ds.sample": "sample", "dft_ds.convert": "convert"}.get(module) or (
        "compare" if cmd[cmd.index("-m") + 2] == "compare" else "eval")


def overrides(cmd):
    return dict(a.split("=", 1) for a in cmd[cmd.index("dft_ds.train") + 1:])


def test_a_round_prints_every_step_in_order(tmp_path):
    proc = run_round(tmp_path, "1", "runs/base/hf/")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    cmds = commands(proc)
    assert [step(c) for c in cmds] == ["sample", "train-dft", "train-sft", "convert", "convert",
                                       "eval", "eval", "eval", "compare"]
    d = str(tmp_path / "rounds" / "round-1")
    sample = cmds[0]
    assert sample[:3] == [".venv/bin/python", "-m", "dft_ds.sample"]
    assert sample[sample.index("--model") + 1] == "runs/base/hf"
    assert sample[sample.index("--samples") + 1] == "8"
    assert sample[sample.index("--out") + 1] == f"{d}/samples"
    assert sample[sample.index("--benchmark") + 1] == "synthetic-train"
    assert all("--shard" not in c for c in cmds)  # one process samples everything; shards are sample.sbatch's
    assert cmds[1][:7] == [".venv/bin/deepspeed", "--log_level", "warning", "--num_gpus", "2", "--module",
                           "dft_ds.train"]
    dft, rft = overrides(cmds[1]), overrides(cmds[2])
    assert dft["data.source"] == rft["data.source"] == f"{d}/samples/train.jsonl"
    assert dft["model.name_or_path"] == rft["model.name_or_path"] == "runs/base/hf"  # round 1: PREV is the base
    assert (dft["train.output_dir"], rft["train.output_dir"]) == (f"{d}/dft", f"{d}/rft")
    assert cmds[3][-3:] == [f"{d}/dft", f"{d}/hf-dft", "--no-progress"]
    assert cmds[4][-3:] == [f"{d}/rft", f"{d}/hf-rft", "--no-progress"]
    models = [c[c.index("--model") + 1] for c in cmds[5:8]]
    assert models == ["runs/base/hf", f"{d}/hf-dft", f"{d}/hf-rft"]
    assert [c[c.index("--out") + 1] for c in cmds[5:8]] == [f"{d}/eval-prev", f"{d}/eval-dft", f"{d}/eval-rft"]
    assert cmds[8][3:] == ["compare", f"{d}/eval-prev", f"{d}/eval-dft", f"{d}/eval-rft",
                           "--labels", "round-0,dft-1,rft-1", "--out", f"{d}/eval-compare"]
    assert not (tmp_path / "rounds").exists()  # a dry run creates nothing


def test_dft_and_rft_differ_only_in_the_loss_and_the_run_directory(tmp_path):
    proc = run_round(tmp_path, "1", "m", STEPS="37", GLOBAL_BATCH="24", LR="2e-5", SEED="7", NPROC="4",
                     EXTRA_TRAIN="data.max_length=1024  train.warmup_ratio=0.05")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    cmds = commands(proc)
    dft, rft = overrides(cmds[1]), overrides(cmds[2])
    assert (dft.pop("loss.type"), rft.pop("loss.type")) == ("dft", "sft")
    assert dft.pop("train.output_dir") != rft.pop("train.output_dir")
    assert dft == rft
    assert {k: dft[k] for k in ("train.max_steps", "train.global_batch_size", "train.lr", "train.seed",
                                "data.max_length", "train.warmup_ratio")} == {
        "train.max_steps": "37", "train.global_batch_size": "24", "train.lr": "2e-5", "train.seed": "7",
        "data.max_length": "1024", "train.warmup_ratio": "0.05"}
    assert cmds[1][:cmds[1].index("dft_ds.train")] == cmds[2][:cmds[2].index("dft_ds.train")]
    assert cmds[1][cmds[1].index("--num_gpus") + 1] == "4"


def test_selection_flags_and_knobs_reach_dft_sample(tmp_path):
    proc = run_round(tmp_path, "1", "m", "--benchmark", "train=data/t.jsonl", "--benchmark=synthetic-train",
                     "--max-per-problem", "2", "--drop-all-correct", "--drop-all-wrong", "--dedup", "--keep-unfinished",
                     SAMPLES="4", TEMPERATURE="0.8", MAX_NEW_TOKENS="512", PROMPT="chat", BACKEND="vllm",
                     SAMPLE_ARGS="--limit 10", EVAL_BENCHMARKS="math500=m.jsonl synthetic", EVAL_SAMPLES="2")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    cmds = commands(proc)
    sample = cmds[0]
    assert sample[3:] == ["--model", "m", "--samples", "4", "--temperature", "0.8", "--seed", "42", "--backend", "vllm",
                          "--out", str(tmp_path / "rounds" / "round-1" / "samples"), "--no-progress",
                          "--benchmark", "train=data/t.jsonl", "--benchmark", "synthetic-train",
                          "--max-new-tokens", "512", "--prompt", "chat", "--max-per-problem", "2",
                          "--drop-all-correct", "--drop-all-wrong", "--dedup", "--keep-unfinished", "--limit", "10"]
    assert len(cmds) == 9 and [step(ev) for ev in cmds[5:8]] == ["eval"] * 3
    for ev in cmds[5:8]:  # evaluation prompts and generates as sampling did
        assert ev[ev.index("--prompt") + 1] == "chat" and ev[ev.index("--max-new-tokens") + 1] == "512"
        assert ev[ev.index("--samples") + 1] == "2" and ev[ev.index("--backend") + 1] == "vllm"
        assert [ev[i + 1] for i, a in enumerate(ev) if a == "--benchmark"] == ["math500=m.jsonl", "synthetic"]
    assert all("--drop-all-correct" not in c for c in cmds[1:])


def test_later_rounds_train_from_the_base_or_from_the_previous_model(tmp_path):
    prev = "runs/offline-rl/round-1/hf-dft"
    proc = run_round(tmp_path, "2", prev)
    assert proc.returncode == 2 and "set BASE" in proc.stdout and not commands(proc)
    proc = run_round(tmp_path, "2", prev, BASE="runs/base/hf")
    cmds = commands(proc)
    assert cmds[0][cmds[0].index("--model") + 1] == prev
    assert overrides(cmds[1])["model.name_or_path"] == overrides(cmds[2])["model.name_or_path"] == "runs/base/hf"
    assert cmds[8][cmds[8].index("--labels") + 1] == "round-1,dft-2,rft-2"
    proc = run_round(tmp_path, "2", prev, "--from-previous", BASE="runs/base/hf")
    cmds = commands(proc)
    assert overrides(cmds[1])["model.name_or_path"] == overrides(cmds[2])["model.name_or_path"] == prev


def test_an_existing_round_is_refused_with_exit_2(tmp_path):
    existing = tmp_path / "rounds" / "round-3"
    (existing / "samples").mkdir(parents=True)
    for dry_run in (True, False):
        proc = run_round(tmp_path, "3", "m", "--from-previous", dry_run=dry_run)
        assert proc.returncode == 2 and str(existing) in proc.stdout and "exists" in proc.stdout
        assert not commands(proc)
    assert os.listdir(existing) == ["samples"]


@pytest.mark.parametrize("args,message", [((), "expected ROUND PREV_MODEL"), (("1",), "expected ROUND PREV_MODEL"),
                                          (("0", "m"), "ROUND=0"), (("x", "m"), "ROUND=x"),
                                          (("1", "m", "--bogus"), "unknown option --bogus"),
                                          (("1", "m", "--max-per-problem"), "--max-per-problem needs M")])
def test_bad_usage_exits_2(tmp_path, args, message):
    proc = run_round(tmp_path, *args)
    assert proc.returncode == 2 and message in proc.stdout and not commands(proc)


def test_a_real_round_stops_at_the_first_failing_step_and_logs_what_ran(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/bash\nexit 3\n")
    fake.chmod(0o755)
    proc = run_round(tmp_path, "1", "m", dry_run=False, PYTHON=str(fake))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert [step(c) for c in commands(proc)] == ["sample"]
    log = (tmp_path / "rounds" / "round-1" / "commands.log").read_text().splitlines()
    assert len(log) == 1 and shlex.split(log[0])[:3] == [str(fake), "-m", "dft_ds.sample"]
