"""dft-sample end to end (`python -m dft_ds.sample` in a subprocess), on dft-eval's programmed tiny
Llama, which answers "The answer is \\boxed{12}" often but not always: some samples are correct
where the gold is 12, none where it is 13.

- Sampling with a fixed seed is reproducible, and independent of the batch size and of sharding.
- A 2-rank round: sample -> select -> DFT (2 ranks, from the sampled model) -> convert -> eval; the
  training run directory records which sample file and selection made its data.
- Bad input exits 2 and writes nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dft_ds import synthetic
from tests.distributed.helpers import REPO, clean_env, free_port, read_metrics
from tests.e2e.test_eval import build_answering_model

pytestmark = pytest.mark.slow

COMMON = ["--samples", "3", "--max-new-tokens", "24", "--no-progress"]


def dft_sample(env, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dft_ds.sample", *map(str, args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def texts(out) -> list[tuple]:
    rows = [json.loads(line) for line in open(out / "samples.jsonl", encoding="utf-8")]
    return [(r["benchmark"], r["index"], g["sample"], g["seed"], g["text"], g["verdict"]) for r in rows
            for g in r["generations"]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    from dft_ds.eval.prompting import build_prompter

    tmp = tmp_path_factory.mktemp("sample")
    env = clean_env(tmp)
    env["OMP_NUM_THREADS"] = "1"
    tok = AutoTokenizer.from_pretrained(synthetic.ensure_assets(env["DFT_DS_CACHE"]))
    rows = [{"problem": f"Tom has {i} pens and gets {12 - i + (i % 2)} more. How many now?", "answer": str(12 + i % 2)}
            for i in range(8)]
    problems = tmp / "problems.jsonl"
    problems.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    prompter = build_prompter(tok, "boxed")
    starts = {prompter.encode(prompter.render(r["problem"]))[-1] for r in rows}
    build_answering_model(tmp / "model", tok, starts)
    return {"env": env, "tmp": tmp, "model": tmp / "model", "bench": f"pens={problems}"}


@pytest.fixture(scope="module")
def whole(setup):
    out = setup["tmp"] / "whole"
    proc = dft_sample(setup["env"], "--model", setup["model"], "--benchmark", setup["bench"], *COMMON,
                      "--batch-size", "4", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_samples_are_graded_and_the_correct_ones_kept(whole):
    out, proc = whole
    rows = [json.loads(line) for line in open(out / "samples.jsonl")]
    kept = [json.loads(line) for line in open(out / "train.jsonl")]
    rejected = [json.loads(line) for line in open(out / "rejected.jsonl")]
    correct = [(r["index"], g["sample"]) for r in rows for g in r["generations"] if g["verdict"] == "correct"]
    assert correct and all(i % 2 == 0 for i, _ in correct)  # only where the gold is 12
    finished = {(r["index"], g["sample"]) for r in rows for g in r["generations"] if g["finished"]}
    assert [(k["dft_sample"]["index"], k["dft_sample"]["sample"]) for k in kept] == [c for c in correct if c in finished]
    assert len(rejected) == 8 * 3 - len(correct)
    selection = json.loads((out / "selection.json").read_text())
    assert selection["counts"]["kept"] == len(kept) and selection["settings"]["samples"] == 3
    problems = [json.loads(line) for line in open(out / "problems.jsonl")]
    assert [p["correct"] for p in problems] == [r["correct"] for r in rows]
    assert f"kept {len(kept)}" in proc.stdout


def test_same_seed_same_samples_whatever_the_batch_size_or_shards(setup, whole):
    env, tmp = setup["env"], setup["tmp"]
    reference = texts(whole[0])
    proc = dft_sample(env, "--model", setup["model"], "--benchmark", setup["bench"], *COMMON, "--batch-size", "1",
                      "--out", tmp / "batch1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert texts(tmp / "batch1") == reference
    for i in range(2):
        proc = dft_sample(env, "--model", setup["model"], "--benchmark", setup["bench"], *COMMON, "--shard", f"{i}/2",
                          "--out", tmp / f"shard-{i}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    proc = dft_sample(env, "merge", tmp / "shard-1", tmp / "shard-0", "--out", tmp / "merged")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert texts(tmp / "merged") == reference
    assert (tmp / "merged" / "train.jsonl").read_text() == (whole[0] / "train.jsonl").read_text()
    other = dft_sample(env, "--model", setup["model"], "--benchmark", setup["bench"], *COMMON, "--seed", "1",
                       "--out", tmp / "seed1")
    assert other.returncode == 0 and texts(tmp / "seed1") != reference  # the seed matters


def test_bad_input_exits_2_and_writes_nothing(setup, whole):
    env, tmp = setup["env"], setup["tmp"]
    proc = dft_sample(env, "--model", setup["model"], "--benchmark", setup["bench"], *COMMON, "--out", whole[0])
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr
    proc = dft_sample(env, "merge", tmp / "shard-0", "--out", tmp / "half")
    assert proc.returncode == 2 and "shard 1/2 missing" in proc.stderr and not (tmp / "half").exists()
    proc = dft_sample(env, "filter", whole[0], "--max-per-problem", "0", "--out", tmp / "zero")
    assert proc.returncode == 2 and "--max-per-problem 0: must be >= 1" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp / "zero").exists()


def test_a_two_rank_round_trains_dft_on_the_kept_samples_converts_and_evaluates(setup, whole, tmp_path):
    env = clean_env(tmp_path)
    kept = whole[0] / "train.jsonl"
    run = tmp_path / "dft"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "dft_ds.train", f"model.name_or_path={setup['model']}", f"data.source={kept}", "loss.type=dft",
           "train.max_steps=3", "train.micro_batch_size=1", "train.global_batch_size=2", "data.max_length=128",
           "logging.tensorboard=false", "logging.progress_bar=false", f"train.output_dir={run}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]
    provenance = json.loads((run / "data_provenance.json").read_text())
    selection = json.loads((whole[0] / "selection.json").read_text())
    assert provenance["data"] == str(kept) and provenance["samples_sha256"] == selection["samples_sha256"]
    assert provenance["policy"] == selection["policy"] and provenance["model"] == str(setup["model"])

    hf = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "dft_ds.convert", str(run), str(hf), "--no-progress"], env=env,
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "dft_ds.eval", "--model", str(hf), "--benchmark", setup["bench"],
                           "--samples", "2", "--max-new-tokens", "24", "--no-progress", "--out", str(tmp_path / "eval")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["settings"]["model"] == str(hf) and "pens" in results["benchmarks"]
