"""vLLM as a real client, on its CPU build (the environment `make venv-vllm` creates):
- every family's dft-convert output gives the same greedy tokens in vLLM as in transformers;
- seeded sampling in vLLM reproduces, request by request;
- `dft-eval --backend vllm` at temperature 0 writes the same results table and completions as
  `--backend hf`, and two seeded runs at temperature 1 write the same samples;
- `dft-sample --backend vllm` at temperature 0 writes the same samples, verdicts, kept and rejected
  rows and counts as `--backend hf`;
- start-up failures (no vLLM, too little memory, a head size without a kernel) exit 2 with one message.

vLLM runs in its own environment because it pins its own torch and transformers; these tests start
that environment's python and dft-eval as subprocesses.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from dft_ds import families
from tests.distributed.helpers import REPO, clean_env

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

NAMES = list(families.FAMILIES)
MAX_TOKENS = 24
SEEDS = [11, 12, 13]


@pytest.fixture(scope="session")
def vllm_bin():
    """The bin/ of the vLLM environment: $DFT_DS_VLLM_ENV, else .venv-vllm beside the repository."""
    root = os.environ.get("DFT_DS_VLLM_ENV") or os.path.join(REPO, ".venv-vllm")
    python = os.path.join(root, "bin", "python")
    if not os.path.exists(python):
        pytest.fail(f"no vLLM environment at {root}: run `make venv-vllm` (make test does), or set DFT_DS_VLLM_ENV")
    return os.path.join(root, "bin")


def vllm_env(tmp_path) -> dict:
    env = clean_env(tmp_path)
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.pop("PYTHONPATH", None)
    return env


def prompts_for(tokenizer) -> list[list[int]]:
    from dft_ds import synthetic

    rows = synthetic.generate_examples(len(SEEDS), seed=7, split="test")
    return [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for r in rows]


@pytest.fixture(scope="module")
def vllm_runs(tmp_path_factory, converted_family, vllm_bin):
    """One vLLM process over every family's converted directory: greedy and seeded token ids."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("vllm")
    requests = {}
    for name in NAMES:
        tok = AutoTokenizer.from_pretrained(converted_family(name))
        requests[name] = prompts_for(tok)
    spec = {"prompts": requests, "max_tokens": MAX_TOKENS, "seeds": SEEDS}
    (out / "requests.json").write_text(json.dumps(spec))
    cmd = [os.path.join(vllm_bin, "python"), os.path.join(REPO, "tests", "vllm", "vllm_generate.py"),
           str(out / "requests.json"), str(out), *[f"{n}={converted_family(n)}" for n in NAMES]]
    with open(out / "log.txt", "w") as log:
        rc = subprocess.run(cmd, env=vllm_env(out), stdout=log, stderr=subprocess.STDOUT, timeout=1200).returncode
    assert rc == 0, (out / "log.txt").read_text()[-5000:]
    return out, requests


def hf_greedy(model_dir, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding in plain transformers, full forward per token (no cache, no stopping)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("name", NAMES)
def test_greedy_tokens_match_transformers(vllm_runs, converted_family, name):
    out, requests = vllm_runs
    result = json.loads((out / f"{name}.json").read_text())
    assert "error" not in result, f"vLLM did not start {name}: {result.get('error')}"
    for prompt, got in zip(requests[name], result["greedy"], strict=True):
        assert got == hf_greedy(converted_family(name), prompt, MAX_TOKENS)


@pytest.mark.parametrize("name", NAMES)
def test_seeded_sampling_reproduces(vllm_runs, name):
    out, _ = vllm_runs
    result = json.loads((out / f"{name}.json").read_text())
    first, second = result["sampled"]
    assert first == second  # the same seeds, the same samples
    assert len({tuple(s) for s in first}) == len(SEEDS)  # and different seeds give different samples
    assert first != result["greedy"][:len(SEEDS)]


# ---------------------------------------------------------------- dft-eval under both backends

EVAL = ["--benchmark", "synthetic", "--limit", "6", "--max-new-tokens", "24", "--prompt", "chat", "--no-progress"]


def dft_eval(bin_dir, env, model, out, *extra) -> subprocess.CompletedProcess:
    cmd = [os.path.join(bin_dir, "dft-eval"), "--model", str(model), "--out", str(out), *EVAL, *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def samples(run_dir) -> list[tuple]:
    """(benchmark, problem, sample, text, extracted answer, correct, finished, tokens) of every generation."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "samples.jsonl"), encoding="utf-8")]
    return [(r["benchmark"], r["index"], g["sample"], g["text"], g["extracted"], g["correct"], g["finished"],
             g["tokens"]) for r in rows for g in r["generations"]]


def table(run_dir) -> list[str]:
    """The rows of results.md's table (the settings line above it names the backend)."""
    return [line for line in open(os.path.join(run_dir, "results.md"), encoding="utf-8") if line.startswith("|")]


def test_dft_eval_vllm_equals_hf_at_temperature_0_and_reproduces_seeded(tmp_path, converted_family, vllm_bin):
    model = converted_family("qwen2")
    env = vllm_env(tmp_path)
    hf = dft_eval(os.path.dirname(sys.executable), env, model, tmp_path / "hf", "--samples", "2", "--temperature", "0")
    assert hf.returncode == 0, hf.stderr[-3000:]
    vl = dft_eval(vllm_bin, env, model, tmp_path / "vllm", "--backend", "vllm", "--samples", "2", "--temperature", "0",
                  "--gpu-memory-utilization", "0.05")
    assert vl.returncode == 0, vl.stderr[-3000:]
    assert table(tmp_path / "vllm") == table(tmp_path / "hf")
    assert samples(tmp_path / "vllm") == samples(tmp_path / "hf")
    results = json.load(open(tmp_path / "vllm" / "results.json", encoding="utf-8"))
    assert results["settings"]["backend"] == "vllm" and results["runtime"]["startup_seconds"] > 0
    # 128 seeded requests with the longer boxed prompt: more prompt tokens than one scheduler step
    # takes, which once made vLLM's CPU build fail while splitting a prefill (generate.VLLMBackend.start).
    runs = []
    for name in ("s1", "s2"):
        proc = dft_eval(vllm_bin, env, model, tmp_path / name, "--backend", "vllm", "--samples", "16", "--limit", "8",
                        "--prompt", "boxed", "--temperature", "1", "--gpu-memory-utilization", "0.05")
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(samples(tmp_path / name))
    assert runs[0] == runs[1]
    # Seeded samples, not one greedy answer. Few are distinct as text: a random model mostly draws ids of
    # the untrained padded rows (beyond the tokenizer's 4096), which decode to nothing.
    assert len({r[3] for r in runs[0]}) > len(runs[0]) // 8


# ---------------------------------------------------------------- dft-sample under both backends


def dft_sample(bin_dir, env, model, out, *extra) -> subprocess.CompletedProcess:
    cmd = [os.path.join(bin_dir, "python"), "-m", "dft_ds.sample", "--model", str(model), "--out", str(out),
           "--benchmark", "synthetic-train", "--limit", "6", "--max-new-tokens", "24", "--prompt", "chat",
           "--no-progress", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def sample_rows(run_dir, name: str) -> list[dict]:
    with open(os.path.join(run_dir, name), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_dft_sample_vllm_keeps_what_hf_keeps_at_temperature_0(tmp_path, converted_family, vllm_bin):
    """The offline-RL sampler on vLLM: the same generations, verdicts, kept rows and counts as on hf."""
    model = converted_family("qwen2")
    env = vllm_env(tmp_path)
    hf = dft_sample(os.path.dirname(sys.executable), env, model, tmp_path / "hf", "--samples", "2",
                    "--temperature", "0", "--keep-unfinished")
    assert hf.returncode == 0, hf.stderr[-3000:]
    vl = dft_sample(vllm_bin, env, model, tmp_path / "vllm", "--backend", "vllm", "--samples", "2",
                    "--temperature", "0", "--keep-unfinished", "--gpu-memory-utilization", "0.05")
    assert vl.returncode == 0, vl.stderr[-3000:]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "dft_sample"} | (  # noqa: E731
        {"tag": {k: v for k, v in r["dft_sample"].items() if k != "model"}} if "dft_sample" in r else {}) for r in rows]
    for name in ("samples.jsonl", "problems.jsonl"):
        assert sample_rows(tmp_path / "vllm", name) == sample_rows(tmp_path / "hf", name), name
    for name in ("train.jsonl", "rejected.jsonl"):
        assert strip(sample_rows(tmp_path / "vllm", name)) == strip(sample_rows(tmp_path / "hf", name)), name
    sel = {b: json.load(open(tmp_path / b / "selection.json", encoding="utf-8")) for b in ("hf", "vllm")}
    assert sel["vllm"]["counts"] == sel["hf"]["counts"] and sel["vllm"]["counts"]["samples"] == 12
    assert "backend vllm" in (tmp_path / "vllm" / "summary.md").read_text()


# ---------------------------------------------------------------- start-up failures


def test_no_vllm_is_one_message_and_exit_2(tmp_path, converted_family):
    proc = dft_eval(os.path.dirname(sys.executable), clean_env(tmp_path), converted_family("qwen2"), tmp_path / "o",
                    "--backend", "vllm")
    assert proc.returncode == 2
    assert "--backend vllm: vllm cannot be imported" in proc.stderr and "make venv-vllm" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_too_little_memory_is_one_message_and_exit_2(tmp_path, family_dir, vllm_bin):
    proc = dft_eval(vllm_bin, vllm_env(tmp_path), family_dir("mistral"), tmp_path / "o", "--backend", "vllm",
                    "--gpu-memory-utilization", "0.0001")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dft-eval: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"dft-eval: error: --backend vllm: the weights of {family_dir('mistral')} (0.07 GiB) "
                                "do not fit in --gpu-memory-utilization (now 0.0001 of host memory"), errors[0]
    assert not os.path.exists(tmp_path / "o" / "results.json")


def test_head_size_without_a_cpu_kernel_is_one_message_and_exit_2(tmp_path, vllm_bin):
    model = families.build_family("mistral", tmp_path / "m", head_dim=16)
    proc = dft_eval(vllm_bin, vllm_env(tmp_path), model, tmp_path / "o", "--backend", "vllm")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dft-eval: error:")]
    assert errors == [f"dft-eval: error: --backend vllm: {model} has attention heads of size 16, and vLLM's CPU "
                      "attention supports 32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512; use --backend hf for "
                      "this model"], proc.stderr[-3000:]
