"""dft-eval generation throughput: problems per second of the Hugging Face backend by batch size.

    .venv/bin/python benchmarks/eval_bench.py [--problems 64] [--max-new-tokens 64]
                                             [--batch-sizes 1,8,32] [--threads N] [--device cpu|cuda]

The model is the embedded default's tiny Llama (synthetic.tiny_model_config: 4 layers, hidden 256,
vocab 512), randomly initialised and saved as a Hugging Face directory; the problems are the first
--problems of the built-in synthetic test split, one sample each, rendered with the boxed prompt,
sampled at temperature 1.0 with the per-row seeded sampler dft-eval uses. Every batch size runs
the same requests in the same process after one warm-up call; the table gives wall time,
problems/s, generated tokens/s and the speed-up over batch size 1. A random model stops at EOS at
random, so rows end at different lengths: a batch runs until its longest row is done, which is
part of what batching costs and is measured as such.

The last row is transformers' own sampling (`do_sample=True`, one global random stream) at the
largest batch size: the price of dft-eval's per-row generators (which make a sample independent
of its batch, so shards reproduce the unsharded run).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def build_model(workdir: str, device: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dft_ds import synthetic

    tok = AutoTokenizer.from_pretrained(synthetic.ensure_assets())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(synthetic.tiny_model_config(len(tok)))
    out = os.path.join(workdir, "model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from dft_ds.eval.benchmarks import BenchmarkSpec, load_benchmark
    from dft_ds.eval.generate import HFBackend, Request, Sampling, request_seed
    from dft_ds.eval.prompting import build_prompter

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as workdir:
        model_dir = build_model(workdir, "cpu")
        tok = AutoTokenizer.from_pretrained(model_dir)
        prompter = build_prompter(tok, "boxed")
        bench = load_benchmark(BenchmarkSpec("synthetic"), limit=args.problems)
        requests = [Request(prompter.encode(prompter.render(p.problem)), request_seed(0, "synthetic", p.index, 0))
                    for p in bench.problems]
        sampling = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens)
        backend = HFBackend(model_dir, tok, batch_size=1, progress=False)
        prompt_lens = [len(r.prompt_ids) for r in requests]
        print(f"device {backend.device_name}, dtype {backend.dtype}, torch threads {torch.get_num_threads()}, "
              f"load average {os.getloadavg()[0]:.1f}")
        print(f"{len(requests)} problems x 1 sample, prompts {min(prompt_lens)}-{max(prompt_lens)} tokens, "
              f"max_new_tokens {args.max_new_tokens}, temperature 1.0\n")
        backend.batch_size = max(sizes)
        backend.generate(requests[:2], sampling)  # warm-up: first-call allocations, kernels
        rows = []
        for size in sizes:
            backend.batch_size = size
            t0 = time.perf_counter()
            out = backend.generate(requests, sampling)
            seconds = time.perf_counter() - t0
            rows.append((f"dft-eval hf, batch {size}", seconds, sum(c.num_tokens for c in out)))
        rows.append(hf_do_sample_row(backend, requests, sampling, max(sizes)))
    base = rows[0][1]
    print(f"{'':36s} {'seconds':>8s} {'problems/s':>11s} {'gen tok/s':>10s} {'vs batch 1':>10s}")
    for name, seconds, tokens in rows:
        print(f"{name:36s} {seconds:8.2f} {len(requests) / seconds:11.2f} {tokens / seconds:10.1f} "
              f"{base / seconds:9.2f}x")
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


def hf_do_sample_row(backend, requests, sampling, size):
    """transformers' own batched sampling on the same batches, for the sampler's overhead."""
    import torch

    model, order = backend.model, sorted(range(len(requests)), key=lambda i: -len(requests[i].prompt_ids))
    torch.manual_seed(0)
    tokens, t0 = 0, time.perf_counter()
    for start in range(0, len(order), size):
        batch = [requests[i] for i in order[start:start + size]]
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), width), backend.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, r in enumerate(batch):
            ids[row, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[row, width - len(r.prompt_ids):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=sampling.max_new_tokens,
                                 do_sample=True, temperature=1.0, top_p=1.0, use_cache=True)
        tokens += sum(backend._completion(row.tolist()).num_tokens for row in out[:, width:])
    return f"transformers do_sample, batch {size}", time.perf_counter() - t0, tokens


if __name__ == "__main__":
    main()
