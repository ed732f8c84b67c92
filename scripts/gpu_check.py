"""`make gpu-check`: what only a GPU can show, in one command and one table (about 8 minutes on one
H100/H200-class GPU).

    .venv/bin/python scripts/gpu_check.py [--steps 20] [--max-length 4096] [--micro-batch 4] [--out runs/gpu-check]

1. the CUDA-marked tests (pytest -m gpu);
2. the fused head in bf16 against an fp64 reference (N=4096, H=1536, V=151936): loss and gradients;
3. tokens/s and MFU of a model shaped like Qwen2.5-1.5B (its config, random weights) in bf16 with
   ZeRO-3, the fused head, packing and gradient checkpointing, next to the same run on full logits;
   MFU = (6 x parameters in matmuls + 12 x layers x hidden x row length) x tokens/s / peak bf16
   FLOP/s (989 TFLOP/s dense for H100/H200), against the 45% the project holds itself to;
4. peak GPU memory of the fused run against dft-plan's estimate for it (`dft-train --check`);
5. `dft-eval --backend vllm` on the fused run's conversion, when the vLLM environment exists.

On a machine without CUDA it exits 2 at once and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "A100": 312e12}
QWEN25_15B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                  head_dim=128, intermediate_size=8960, max_position_embeddings=32768)
rows: list[tuple[str, str, str]] = []


def row(what: str, figure: str, verdict: str = "") -> None:
    rows.append((what, figure, verdict))
    print(f"  {what}: {figure} {verdict}", flush=True)


def cuda_tests() -> None:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"], cwd=REPO,
                          capture_output=True, text=True)
    summary = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    row("CUDA-marked tests", f"{summary} ({time.perf_counter() - t0:.0f} s)", "ok" if proc.returncode == 0 else "FAIL")


def fused_bf16() -> None:
    import torch

    from dft_ds.loss import IGNORE_INDEX, compute_loss, fused_linear_loss, token_weight

    g = torch.Generator(device="cuda").manual_seed(0)
    n, h, v = 4096, 1536, 151936
    hidden = torch.randn(n, h, device="cuda", generator=g)
    weight = torch.randn(v, h, device="cuda", generator=g) * 0.02
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    labels[::5] = IGNORE_INDEX
    weighting = token_weight("dft")

    def run(dtype, fused):
        x = hidden.to(dtype).requires_grad_(True)
        w = weight.to(dtype).requires_grad_(True)
        parts = fused_linear_loss(x, w, labels, weighting) if fused else compute_loss(weighting, x @ w.T, labels,
                                                                                          num_tokens=None)
        parts.loss.backward()
        return parts.loss.double(), x.grad.double(), w.grad.double()

    ref = run(torch.float64, False)
    got = run(torch.bfloat16, True)
    rel = [float((a - b).norm() / b.norm()) for a, b in zip(got, ref)]
    ok = rel[0] < 1e-2 and rel[1] < 2e-2 and rel[2] < 2e-2
    row("fused head bf16 vs fp64 (loss, d hidden, d weight: relative error)", ", ".join(f"{r:.1e}" for r in rel),
        "ok" if ok else "FAIL")


def build_model(out: str) -> str:
    import torch

    from dft_ds import families

    if os.path.isdir(out):
        return out
    fam = families.family("qwen2")
    tok = families.build_tokenizer(fam)
    config = families.model_config(fam, tok, **QWEN25_15B)
    import transformers

    with torch.device("cuda"):
        model = transformers.Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def train(model: str, out: str, fused: bool, args) -> tuple[float, float, list[str]]:
    """(median tokens/s after 3 warm-up steps, rank 0's peak GiB allocated, the overrides it ran with) of one
    run. Each run is a process of its own: DeepSpeed caches its process groups per process, so a second
    run in the same process would meet the first one's destroyed groups. Only the fused run saves (12 GiB
    of ZeRO-3 state at this size) and converts; the full-logits run is measured only."""
    overrides = [f"model.name_or_path={model}", f"train.output_dir={out}", f"train.max_steps={args.steps}",
                 f"data.max_length={args.max_length}", f"train.micro_batch_size={args.micro_batch}",
                 f"train.global_batch_size={args.micro_batch}", "data.synthetic_size=4000", "data.packing=true",
                 "model.gradient_checkpointing=true", "deepspeed.config=zero3", "train.precision=bf16",
                 f"loss.fused={'true' if fused else 'false'}", f"checkpoint.save_final={'true' if fused else 'false'}",
                 "logging.progress_bar=false",
                 "logging.tensorboard=false", "export.hf=true" if fused else "export.hf=false"]
    rc = subprocess.run([sys.executable, "-m", "dft_ds.train", *overrides], cwd=REPO).returncode
    if rc != 0:
        raise SystemExit(f"gpu-check: dft-train exited {rc} ({'fused' if fused else 'full logits'})")
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][3:] or [records[-1]["tokens_per_s"]]
    return statistics.median(speeds), max(r.get("peak_memory_gib") or 0.0 for r in records), overrides


def matmul_flops_per_token(model: str, seq: int) -> tuple[float, int]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for name, p in m.named_parameters() if "embed_tokens" not in name and p.dim() == 2)
    if config.tie_word_embeddings:
        n += config.vocab_size * config.hidden_size  # the head matmul uses the tied weight
    total = sum(p.numel() for p in m.parameters())
    return 6 * n + 12 * config.num_hidden_layers * config.hidden_size * seq, total


def plan_estimate(overrides: list[str]) -> float | None:
    proc = subprocess.run([sys.executable, "-m", "dft_ds.train", "--check", *overrides, "train.output_dir=/tmp/gpu-check-plan"],
                          cwd=REPO, capture_output=True, text=True)
    found = re.search(r"memory per rank \(rough\): ([0-9.]+) GiB", proc.stdout)
    return float(found.group(1)) if found else None


def vllm_eval(hf_dir: str, out: str) -> None:
    bin_dir = os.path.join(REPO, ".venv-vllm", "bin")
    if not os.path.exists(os.path.join(bin_dir, "dft-eval")):
        row("dft-eval --backend vllm", "skipped: no .venv-vllm (make venv-vllm)", "n/a")
        return
    proc = subprocess.run([os.path.join(bin_dir, "dft-eval"), "--model", hf_dir, "--benchmark", "synthetic", "--limit",
                           "32", "--samples", "16", "--max-new-tokens", "256", "--backend", "vllm", "--no-progress",
                           "--out", out], capture_output=True, text=True)
    if proc.returncode != 0:
        row("dft-eval --backend vllm", f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}", "FAIL")
        return
    rt = json.load(open(os.path.join(out, "results.json"), encoding="utf-8"))["runtime"]
    row("dft-eval --backend vllm (32 problems x 16)", f"start-up {rt['startup_seconds']:.0f} s, "
        f"{rt['samples_per_second']:.1f} samples/s", "ok")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--no-tests", action="store_true", help="skip step 1, the CUDA-marked tests")
    parser.add_argument("--out", default=os.path.join(REPO, "runs", f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}"))
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: error: no CUDA device is visible (torch.cuda.is_available() is False); run it on a GPU "
              "node, in the environment whose torch is the CUDA build", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    name = torch.cuda.get_device_name()
    peak = next((f for key, f in PEAK_BF16.items() if key in name), None)
    print(f"gpu-check on {name}", flush=True)
    if not args.no_tests:
        cuda_tests()
    fused_bf16()
    model = build_model(os.path.join(args.out, "qwen2.5-1.5b-shape"))
    per_token, n_params = matmul_flops_per_token(model, args.max_length)
    results = {}
    for fused in (True, False):
        tag = "fused" if fused else "full"
        results[tag] = train(model, os.path.join(args.out, tag), fused, args)
    for tag, (speed, gib, _) in results.items():
        mfu = per_token * speed / peak if peak else None
        row(f"Qwen2.5-1.5B shape ({n_params / 1e9:.2f}B), bf16 ZeRO-3, packing, checkpointing, {tag}",
            f"{speed:,.0f} tokens/s, MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}, peak {gib:.1f} GiB",
            "" if mfu is None else ("meets 45%" if mfu >= 0.45 else "below 45%"))
    estimate = plan_estimate(results["fused"][2])
    measured = results["fused"][1]
    row("peak memory, fused run: measured vs dft-plan estimate",
        f"{measured:.1f} GiB vs {estimate if estimate is not None else 'n/a'} GiB",
        "" if estimate is None else f"ratio {measured / estimate:.2f}")
    vllm_eval(os.path.join(args.out, "fused", "hf"), os.path.join(args.out, "eval-vllm"))
    print(f"\n| check on {name} | figure | verdict |\n|---|---|---|")
    for what, figure, verdict in rows:
        print(f"| {what} | {figure} | {verdict} |")
    return 1 if any(v == "FAIL" for _, _, v in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
