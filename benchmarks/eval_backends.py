"""dft-eval (or dft-sample) samples/s with --backend hf against --backend vllm, on the same model and settings.

    .venv/bin/python benchmarks/eval_backends.py [--problems 8] [--samples 16] [--max-new-tokens 64]
                                                 [--rounds 2] [--hf-batch-size 32] [--vllm-env .venv-vllm]
                                                 [--tool eval|sample]

--tool sample times `dft-sample` on the training problems (synthetic-train) instead: the same
generation path, plus its grading and selection, read from selection.json's runtime.

The model is a Qwen2 of about 100M parameters (dft_ds.families, hidden 512, 8 layers, 151936
vocabulary rows) with random weights; the benchmark is the built-in synthetic test split, K samples
per problem at temperature 1.0, the boxed prompt. Each contender is the real `dft-eval` command:
hf from this environment, vllm from the vLLM environment (make venv-vllm). Both read the same
runtime fields from results.json: start-up (loading the model; for vLLM also its engine and KV
cache) and generation seconds, which exclude each other. One warm-up run each, then the contenders
alternate for --rounds rounds; the table gives medians and the ratio vllm / hf.

A random model rarely stops at EOS, so nearly every sample runs to --max-new-tokens in both backends.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SHAPE = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
             intermediate_size=1408)


def run_eval(bin_dir: str, model: str, out: str, args, backend: str, problems: int) -> dict:
    tool = ["-m", "dft_ds.eval"] if args.tool == "eval" else ["-m", "dft_ds.sample"]
    bench = "synthetic" if args.tool == "eval" else "synthetic-train"
    cmd = [os.path.join(bin_dir, "python"), *tool, "--model", model, "--out", out, "--benchmark", bench,
           "--limit", str(problems), "--samples", str(args.samples), "--temperature", "1.0",
           "--max-new-tokens", str(args.max_new_tokens), "--backend", backend, "--no-progress"]
    if backend == "hf":
        cmd += ["--batch-size", str(args.hf_batch_size)]
    else:
        cmd += ["--gpu-memory-utilization", str(args.vllm_memory)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_LOGGING_LEVEL="ERROR", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        open(out + ".stderr", "w").write(proc.stderr)
        sys.exit(f"{backend} failed ({proc.returncode}), see {out}.stderr:\n{proc.stderr[-3000:]}")
    result = "results.json" if args.tool == "eval" else "selection.json"
    runtime = json.load(open(os.path.join(out, result), encoding="utf-8"))["runtime"]
    shutil.rmtree(out)
    return runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=8)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--vllm-memory", type=float, default=0.1, help="--gpu-memory-utilization for vllm")
    parser.add_argument("--vllm-env", default=os.path.join(REPO, ".venv-vllm"))
    parser.add_argument("--tool", choices=("eval", "sample"), default="eval",
                        help="time dft-eval (default) or dft-sample")
    args = parser.parse_args()

    from dft_ds import families

    bins = {"hf": os.path.dirname(sys.executable), "vllm": os.path.join(args.vllm_env, "bin")}
    if not os.path.exists(os.path.join(bins["vllm"], "dft-eval")):
        sys.exit(f"no dft-eval in {bins['vllm']}: run `make venv-vllm` first")
    print(f"tool: dft-{args.tool}")
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as work:
        model = families.build_family("qwen2", os.path.join(work, "qwen2-100m"), **SHAPE)
        from transformers import AutoConfig, AutoModelForCausalLM

        with __import__("torch").device("meta"):
            n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).parameters())
        print(f"model: Qwen2, {n_params / 1e6:.0f}M parameters (random weights); {args.problems} "
              f"{'synthetic' if args.tool == 'eval' else 'synthetic-train'} problems x "
              f"K={args.samples} at temperature 1.0, max_new_tokens {args.max_new_tokens}; hf batch size "
              f"{args.hf_batch_size}; cpu threads {os.cpu_count()}")
        for backend in ("hf", "vllm"):  # warm-up: page cache, first-run compilation of kernels
            run_eval(bins[backend], model, os.path.join(work, f"warm-{backend}"), args, backend, 1)
        seen = {"hf": [], "vllm": []}
        for r in range(args.rounds):
            for backend in ("hf", "vllm") if r % 2 == 0 else ("vllm", "hf"):
                seen[backend].append(run_eval(bins[backend], model, os.path.join(work, f"{backend}-{r}"), args, backend,
                                              args.problems))
    med = {b: {key: statistics.median(x[key] for x in runs) for key in
               ("startup_seconds", "generate_seconds", "samples_per_second", "generated_tokens")}
           for b, runs in seen.items()}
    print("\n| backend | start-up s | generate s | samples/s | generated tokens |")
    print("|---|---:|---:|---:|---:|")
    for b in ("hf", "vllm"):
        m = med[b]
        print(f"| {b} | {m['startup_seconds']:.1f} | {m['generate_seconds']:.1f} | {m['samples_per_second']:.2f} | "
              f"{m['generated_tokens']:.0f} |")
    print(f"\nvllm / hf samples/s (start-up excluded): {med['vllm']['samples_per_second'] / med['hf']['samples_per_second']:.2f}x; "
          f"medians of {args.rounds} alternating rounds")


if __name__ == "__main__":
    main()
