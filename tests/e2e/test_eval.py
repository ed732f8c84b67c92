"""dft-eval end to end, as users run it (`python -m dft_ds.eval` in a subprocess), on a tiny Llama.

The model is programmed rather than trained, so that grading has something to find: attention and
MLP outputs are zeroed, which leaves a bigram model (the next token depends only on the current
one), and its head makes the last prompt token start "The answer is \\boxed{12}</s>" with each
token of the chain very likely but not certain. At temperature 1 some samples follow the chain (a
correct answer where the gold is 12), others wander off: accuracy strictly between 0 and 1, which
makes "results.json follows from samples.jsonl" and "shards == unsharded" non-trivial checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dft_ds import synthetic
from dft_ds.eval.metrics import benchmark_metrics
from tests.distributed.helpers import REPO, clean_env

pytestmark = pytest.mark.slow

ANSWER = "The answer is \\boxed{12}"
STRENGTH = 9.0  # logit of the programmed next token; the other ~500 sit near 0
COMMON = ["--benchmark", "synthetic", "--samples", "2", "--limit", "6", "--max-new-tokens", "32"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def build_answering_model(out_dir, tok, starts: set[int]) -> list[int]:
    """Save a bigram Llama that answers ANSWER after any token in `starts`; returns the chain."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(synthetic.tiny_model_config(len(tok), num_hidden_layers=2)).eval()
    chain = tok(ANSWER, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(set(chain)) == len(chain) and not starts & set(chain), "the chain must be a path of distinct tokens"
    with torch.no_grad():
        for layer in model.model.layers:  # the residual stream is then the current token's embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        hidden = model.model.norm(model.model.embed_tokens.weight)  # what the head sees after each token
        head = torch.zeros_like(model.lm_head.weight)
        pairs = [(s, chain[0]) for s in sorted(starts)] + list(zip(chain, chain[1:]))
        for a, b in pairs:
            head[b] += STRENGTH * hidden[a] / hidden[a].dot(hidden[a])
        model.lm_head.weight.copy_(head)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return chain


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_env")
    environment = clean_env(tmp)
    # Tiny matrices: one thread; spinning OpenMP threads on a shared 2-core machine cost 10x here.
    environment["OMP_NUM_THREADS"] = "1"
    return environment


@pytest.fixture(scope="module")
def setup(tmp_path_factory, env):
    """{model, math500, tmp}: the answering model and a MATH-500-layout file whose golds alternate 12, 13."""
    from transformers import AutoTokenizer

    from dft_ds.eval.prompting import build_prompter

    tmp = tmp_path_factory.mktemp("eval")
    tok = AutoTokenizer.from_pretrained(synthetic.ensure_assets(env["DFT_DS_CACHE"]))
    rows = [{"problem": f"What is {i} + {12 - i + (i % 2)}?", "solution": "...", "answer": str(12 + i % 2),
             "subject": "Prealgebra", "level": 1, "unique_id": f"test/prealgebra/{i}.json"} for i in range(8)]
    math500 = tmp / "math500.jsonl"
    math500.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    prompter = build_prompter(tok, "boxed")
    problems = [r["problem"] for r in rows] + [e["prompt"] for e in synthetic.generate_examples(6, 0, "test")]
    starts = {prompter.encode(prompter.render(p))[-1] for p in problems}
    build_answering_model(tmp / "model", tok, starts)
    return {"model": str(tmp / "model"), "math500": str(math500), "tmp": tmp}


def dft_eval(env, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dft_ds.eval", *map(str, args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def evaluate(env, setup, out, *extra) -> subprocess.CompletedProcess:
    proc = dft_eval(env, "--model", setup["model"], *COMMON, "--benchmark", f"math500={setup['math500']}",
                    "--out", out, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def read_samples(out) -> list[dict]:
    with open(os.path.join(out, "samples.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def read_results(out) -> dict:
    with open(os.path.join(out, "results.json"), encoding="utf-8") as fh:
        return json.load(fh)


def without(results: dict, *keys: str) -> dict:
    return {k: v for k, v in results.items() if k not in keys}


@pytest.fixture(scope="module")
def run_a(setup, env):
    out = setup["tmp"] / "run-a"
    proc = evaluate(env, setup, out)
    return {"out": out, "stdout": proc.stdout}


def test_outputs_exist_and_are_consistent(run_a, setup):
    out = run_a["out"]
    assert sorted(os.listdir(out)) == ["results.json", "results.md", "results.png", "samples.jsonl"]
    assert (out / "results.png").read_bytes()[:8] == PNG_MAGIC
    samples, results = read_samples(out), read_results(out)
    assert [(s["benchmark"], s["index"]) for s in samples] == [
        ("synthetic", i) for i in range(6)] + [("math500", i) for i in range(6)]
    assert all(len(s["generations"]) == 2 for s in samples)
    assert samples[6]["id"] == "test/prealgebra/0.json" and samples[7]["gold"] == "13"
    # The boxed prompt, through the synthetic chat template with the instruction as system message.
    assert samples[0]["prompt"].startswith("<s><|system|>\nPlease reason step by step")
    # results.json follows from samples.jsonl.
    for name in ("synthetic", "math500"):
        table = [[g["correct"] for g in s["generations"]] for s in samples if s["benchmark"] == name]
        expected = benchmark_metrics(table)
        got = results["benchmarks"][name]
        for key in ("problems", "samples", "avg_at_k", "pass_at_k", "pass_at"):
            assert got[key] == pytest.approx(expected[key]), (name, key)
    # Grading found what the programmed model says: correct exactly where it answered 12 and the gold is 12.
    math = [g | {"gold": s["gold"]} for s in samples if s["benchmark"] == "math500" for g in s["generations"]]
    assert all(g["correct"] == (g["extracted"] == "12" and g["gold"] == "12") for g in math)
    assert 0 < results["benchmarks"]["math500"]["avg_at_k"] < 0.5  # only half the golds are 12, and sampling wanders
    assert any(g["extracted"] == "12" and g["gold"] == "13" for g in math)  # a wrong answer is graded wrong
    assert results["mean"]["avg_at_k"] == pytest.approx(
        (results["benchmarks"]["synthetic"]["avg_at_k"] + results["benchmarks"]["math500"]["avg_at_k"]) / 2)
    assert results["settings"]["prompt_role"] == "system" and results["shard"] is None
    assert results["runtime"]["device"] == "cpu" and results["runtime"]["dtype"] == "float32"
    assert "| math500 | 6 |" in (out / "results.md").read_text() and "| math500 | 6 |" in run_a["stdout"]


def test_same_seed_same_samples(run_a, setup, env):
    # (That another seed gives other samples is checked in tests/unit/test_eval_generate.py.)
    again = setup["tmp"] / "run-again"
    evaluate(env, setup, again)
    assert (again / "samples.jsonl").read_bytes() == (run_a["out"] / "samples.jsonl").read_bytes()
    assert without(read_results(again), "runtime") == without(read_results(run_a["out"]), "runtime")


def test_shards_merged_equal_the_unsharded_run(run_a, setup, env):
    tmp = setup["tmp"]
    shards = [tmp / "sbatch.shards" / f"shard-{i}-of-2" for i in range(2)]  # slurm/eval.sbatch's layout
    for i, shard in enumerate(shards):
        evaluate(env, setup, shard, "--shard", f"{i}/2", "--batch-size", "3")
    shard0 = read_samples(shards[0])
    assert {s["index"] for s in shard0} == {0, 2, 4} and read_results(shards[0])["shard"] == {"index": 0, "count": 2}
    proc = dft_eval(env, "merge", shards[1], shards[0], "--out", tmp / "merged")
    assert proc.returncode == 0, proc.stderr
    key = lambda s: (s["benchmark"], s["index"])  # noqa: E731
    assert sorted(read_samples(tmp / "merged"), key=key) == sorted(read_samples(run_a["out"]), key=key)
    assert without(read_results(tmp / "merged"), "runtime") == without(read_results(run_a["out"]), "runtime")
    assert (tmp / "merged" / "results.png").read_bytes()[:8] == PNG_MAGIC
    # The dependent merge job of slurm/eval.sbatch, run as Slurm would (MODE=merge), gives the same.
    proc = sbatch_script({**env, "MODE": "merge", "SHARD_COUNT": "2", "OUT": str(tmp / "sbatch")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp / "sbatch" / "samples.jsonl").read_bytes() == (tmp / "merged" / "samples.jsonl").read_bytes()
    # compare reads both back: identical columns.
    proc = dft_eval(env, "compare", run_a["out"], tmp / "merged", "--labels", "whole,merged", "--out", tmp / "cmp")
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| math500 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == cells[3] and (tmp / "cmp" / "compare.png").read_bytes()[:8] == PNG_MAGIC


def sbatch_script(env: dict) -> subprocess.CompletedProcess:
    """slurm/eval.sbatch run by bash with the environment Slurm would give it (no Slurm needed)."""
    return subprocess.run(["bash", os.path.join(REPO, "slurm", "eval.sbatch")], env={**env, "REPO": REPO},
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_sbatch_array_tasks_run_their_shard_and_task_0_submits_the_merge(tmp_path, env):
    base = {**env, "MODEL": "runs/x/hf", "OUT": str(tmp_path / "ev"), "SAMPLES": "4", "DRY_RUN": "1",
            "BENCHMARKS": "math500=data/m.jsonl synthetic", "EXTRA_ARGS": "--limit 10 --prompt chat",
            "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0",
            "SLURM_ARRAY_TASK_MAX": "3"}
    for task in range(4):
        proc = sbatch_script({**base, "SLURM_ARRAY_TASK_ID": str(task)})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        command = proc.stdout.splitlines()[-1]
        assert f"-m dft_ds.eval --model runs/x/hf --shard {task}/4 --out {tmp_path}/ev.shards/shard-{task}-of-4 " \
               "--samples 4 --temperature 1.0 --backend hf --no-progress --benchmark math500=data/m.jsonl " \
               "--benchmark synthetic --limit 10 --prompt chat" in command
        submits = [line for line in proc.stdout.splitlines() if ": sbatch " in line]
        if task == 0:  # the merge, after every task of this array succeeded, once
            assert len(submits) == 1 and "--dependency=afterok:4242 --array=0" in submits[0]
            assert "MODE=merge\\,SHARD_COUNT=4" in submits[0] and submits[0].endswith("slurm/eval.sbatch")
        else:
            assert submits == []
    assert not (tmp_path / "ev.shards").exists()  # a dry run creates nothing
    for broken, message in [({"SLURM_ARRAY_TASK_ID": "0", "MODEL": ""}, "set MODEL"),
                            ({}, "not an array task"),
                            ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "1"}, "must be 0..n-1")]:
        proc = sbatch_script({**base, **broken})
        assert proc.returncode == 2 and message in proc.stdout, proc.stdout


def test_malformed_benchmark_file_exits_2_with_file_and_line(setup, env):
    bad = setup["tmp"] / "bad.jsonl"
    bad.write_text('{"problem": "a", "answer": "1"}\n{"problem": "b", "answer": "2"\n', encoding="utf-8")
    out = setup["tmp"] / "never"
    proc = dft_eval(env, "--model", setup["model"], "--benchmark", f"math500={bad}", "--out", out)
    assert proc.returncode == 2
    assert f"{bad}:2: not valid JSON" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_bad_input_exits_2_before_loading_anything(setup, env):
    out = setup["tmp"] / "never"
    proc = dft_eval(env, "--model", setup["model"], "--benchmark", "minerva_math", "--out", out)
    assert proc.returncode == 2 and "no file given" in proc.stderr and "minerva_math=PATH" in proc.stderr
    proc = dft_eval(env, "--model", setup["tmp"], "--benchmark", "synthetic", "--out", out)
    assert proc.returncode == 2 and "not a Hugging Face model directory" in proc.stderr
    proc = dft_eval(env, "--model", setup["model"], "--benchmark", "synthetic", "--shard", "2/2", "--out", out)
    assert proc.returncode == 2 and "expected i/n" in proc.stderr
    assert not out.exists()


def test_existing_non_empty_out_exits_2_untouched(setup, env):
    out = setup["tmp"] / "occupied"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    proc = dft_eval(env, "--model", setup["model"], *COMMON, "--out", out)
    assert proc.returncode == 2 and "exists and is not empty" in proc.stderr
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_hf_backend_on_gpu_picks_bf16_and_reproduces(setup, env, tmp_path):
    env = {**env, "OMP_NUM_THREADS": "4"}
    for name in ("a", "b"):
        evaluate(env, setup, tmp_path / name)
    runtime = read_results(tmp_path / "a")["runtime"]
    assert runtime["device"] != "cpu"
    assert runtime["dtype"] == ("bfloat16" if torch.cuda.is_bf16_supported() else "float32")
    assert (tmp_path / "a" / "samples.jsonl").read_bytes() == (tmp_path / "b" / "samples.jsonl").read_bytes()


@pytest.mark.gpu
def test_vllm_backend(setup, env, tmp_path):
    pytest.importorskip("vllm")
    evaluate(env, setup, tmp_path / "v", "--backend", "vllm")
    results = read_results(tmp_path / "v")
    assert results["settings"]["backend"] == "vllm" and results["benchmarks"]["math500"]["problems"] == 6
