"""Sequence parallelism on this machine: per-rank peak memory and tokens/s against row length, at
N = 1 and N = 2 (train.sequence_parallel), and N = 2 with the tiled MLP.

    .venv/bin/python benchmarks/sequence_parallel_bench.py [--lengths 2048,4096,8192] [--long 16384]
        [--steps 2] [--model-size small|100m] [--out DIR] [--report DIR]

Every cell is a real 2-rank `dft_ds.train` run (under benchmarks/activation_peak.py): ZeRO-3, fp32,
fused head, gradient checkpointing, sdpa, one row per rank-group per step. Each row is one long
document of exactly the row length (a generated worked solution, truncated): the long reasoning
trace that sequence parallelism is for, on the same attention kernel at N = 1 and 2 (causal, no
mask). At N = 1 the two ranks each hold a whole row (global batch 2 rows); at N = 2 they share one
row (global batch 1), so each holds half its tokens. The weights, gradients and optimizer states
are the same in both (ZeRO-3 over 2 ranks), so the difference in peak memory is the activations'.

Per cell, two memory figures and a speed:
- "activation peak": the most bytes a training micro-batch holds at once (everything allocated since
  its forward began), from PyTorch's CPU allocator under the profiler (benchmarks/activation_peak.py),
  the largest over ranks, in the first micro-batch (see `activation_mib` for why not the later ones).
  It is what a GPU's max_memory_allocated would show over the weights, and it does not depend on
  the machine's load.
- the peak RSS of the largest rank, and that minus the same configuration's at rows of 128 tokens.
  glibc keeps freed blocks, more when gloo's threads free them, so RSS overstates what N = 2 needs.
- the training tokens/s of the last step (the first includes set-up).
One unmeasured warm-up run goes first. `--long` lengths run only at N = 2: they show how long a row
the same per-rank memory holds when it is shared, and the script interpolates the row length at
which N = 2's activation peak reaches N = 1's at its longest row. The contenders of one length run
one after another.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.common import free_port, run_peak_rss  # noqa: E402

CONTENDERS = {
    "N=1": ["train.sequence_parallel=1", "train.global_batch_size=2"],
    "N=2": ["train.sequence_parallel=2", "train.global_batch_size=1"],
    "N=2, tiled MLP x4": ["train.sequence_parallel=2", "train.global_batch_size=1", "model.tiled_mlp=4"],
}
SIZES = {"small": dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1408, heads=8),
         "100m": dict(hidden_size=768, num_hidden_layers=12, intermediate_size=2048, heads=12)}


def build_model(work: str, size: str) -> tuple[str, int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dft_ds import synthetic

    shape = dict(SIZES[size])
    heads = shape.pop("heads")
    tok = AutoTokenizer.from_pretrained(synthetic.ensure_assets())
    config = synthetic.tiny_model_config(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id)
    for key, value in shape.items():
        setattr(config, key, value)
    config.num_attention_heads = config.num_key_value_heads = heads
    config.head_dim = config.hidden_size // heads
    config.max_position_embeddings = 32768
    torch.manual_seed(0)
    path = os.path.join(work, f"llama-{size}")
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, sum(p.numel() for p in model.parameters())


def long_documents(work: str, model: str, length: int, count: int = 8) -> str:
    """A JSON-lines file of `count` samples, each longer than `length` tokens: a short prompt and a long
    worked solution of numbered additions (different per sample)."""
    from transformers import AutoTokenizer

    path = os.path.join(work, f"long-{length}.jsonl")
    if os.path.exists(path):
        return path
    tok = AutoTokenizer.from_pretrained(model)
    with open(path, "w", encoding="utf-8") as fh:
        for k in range(count):
            lines, total, i = [], 0, 0
            while total < length + 64:
                line = f"Step {i}: {k + i} + {2 * i + 1} = {3 * i + k + 1}."
                lines.append(line)
                total += len(tok(line + "\n", add_special_tokens=False)["input_ids"])
                i += 1
            fh.write(json.dumps({"prompt": f"Add the numbers of problem {k}, one step at a time.",
                                 "response": "\n".join(lines)}) + "\n")
    return path


def run_dir(work: str, contender: str, length: int) -> str:
    """A cell's run directory; its profiler files are that path + "-alloc.rank<R>.json"."""
    return os.path.join(work, f"{list(CONTENDERS).index(contender)}-{length}")


def cell(model: str, data: str, length: int, contender: str, steps: int, out: str) -> dict:
    prefix = out + "-alloc"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           os.path.join(REPO, "benchmarks", "activation_peak.py"), prefix,
           f"train.output_dir={out}", f"model.name_or_path={model}",
           f"data.max_length={length}", "data.packing=false", f"data.source={data}", "data.overlong=truncate",
           "train.micro_batch_size=1", "train.gradient_accumulation_steps=1", f"train.max_steps={steps}",
           "train.precision=fp32", "model.gradient_checkpointing=true", "model.attn_implementation=sdpa",
           "logging.progress_bar=false", "logging.tensorboard=false", "logging.plot=false",
           "checkpoint.save_final=false", *CONTENDERS[contender]]
    proc, rss = run_peak_rss(cmd)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")]
    return {"rss_mib": rss / 2**20, **activation_mib(prefix), "tokens_per_s": rows[-1]["tokens_per_s"]}


def activation_mib(prefix: str) -> dict:
    """The largest rank's activation peak in the first micro-batch ("activation_mib") and in the later
    ones ("later_activation_mib"). From the second step on, ZeRO-3 has recorded the order in which the
    layers use their parameters and keeps the gathered parameters of the next layers ready: about the
    whole model on a model this small, at every row length and N alike. The first micro-batch's peak is
    the activations without them."""
    first, later = [], []
    for rank in range(2):
        with open(f"{prefix}.rank{rank}.json", encoding="utf-8") as fh:
            peaks = [mb["peak"] / 2**20 for mb in json.load(fh)["micro_batches"]]
        first.append(peaks[0])
        later += peaks[1:]
    return {"activation_mib": max(first), "later_activation_mib": max(later, default=None)}


def longest_row(results: list, contender: str) -> str:
    """The row length at which `contender`'s activation peak reaches N = 1's at N = 1's longest row,
    interpolated linearly between the two lengths that bracket it."""
    n1 = [(length, r["activation_mib"]) for length, c, r in results if c == "N=1" and "error" not in r]
    points = sorted((length, r["activation_mib"]) for length, c, r in results if c == contender and "error" not in r)
    if not n1:
        return ""
    length1, budget = max(n1)
    for (a, pa), (b, pb) in zip(points, points[1:]):
        if pa <= budget <= pb and pb > pa:
            reach = a + (budget - pa) / (pb - pa) * (b - a)
            return (f"{contender}: about {reach:.0f} tokens in N=1's {budget:.0f} MiB at {length1} tokens, "
                    f"{reach / length1:.2f}x")
    if points and points[-1][1] < budget:
        longest = points[-1][0]
        return (f"{contender}: more than {longest} tokens in N=1's {budget:.0f} MiB at {length1} tokens "
                f"(its longest row run, {points[-1][1]:.0f} MiB), more than {longest / length1:.2f}x")
    return f"{contender}: N=1's {budget:.0f} MiB at {length1} tokens is outside the lengths run"


def report(results: list) -> None:
    """The markdown table of (length, contender, cell) results, and the longest-row estimates."""
    print("\n| row tokens | contender | tokens per rank | activation peak MiB | / N=1's | peak RSS MiB | "
          "RSS over 128-token rows MiB | / N=1's | tokens/s |\n|---|---|---|---|---|---|---|---|---|")
    n1 = {length: r for length, c, r in results if c == "N=1" and "error" not in r}

    def ratio(r, length, key):
        base = n1.get(length, {}).get(key)
        return f"{r[key] / base:.2f}" if base and r.get(key) is not None else ""

    for length, contender, r in results:
        if "error" in r:
            print(f"| {length} | {contender} | | {r['error']} | | | | | |")
            continue
        per_rank = length if contender == "N=1" else length // 2
        added = f"{r['added_mib']:.0f}" if r.get("added_mib") is not None else ""
        print(f"| {length} | {contender} | {per_rank} | {r['activation_mib']:.0f} | "
              f"{ratio(r, length, 'activation_mib')} | {r['rss_mib']:.0f} | {added} | "
              f"{ratio(r, length, 'added_mib')} | {r['tokens_per_s']:.0f} |")
    print()
    for contender in CONTENDERS:
        if contender != "N=1":
            print("longest row, same activation memory per rank:", longest_row(results, contender))


def reread(work: str) -> list:
    """A finished run's results, with the activation figures read again from its profiler files."""
    if not os.path.exists(os.path.join(work, "results.json")):
        sys.exit(f"--report {work}: no results.json there; give the --out directory of a finished run")
    with open(os.path.join(work, "results.json"), encoding="utf-8") as fh:
        results = json.load(fh)["results"]
    for length, contender, r in results:
        if "error" not in r:
            r.update(activation_mib(run_dir(work, contender, length) + "-alloc"))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,4096,8192")
    parser.add_argument("--long", default="16384", help="lengths run at N = 2 only (comma separated; '' for none)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--model-size", choices=tuple(SIZES), default="small")
    parser.add_argument("--out", default=None, help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--report", metavar="DIR", help="print the table of a finished run's --out again, and stop")
    args = parser.parse_args()
    if args.report:
        report(reread(args.report))
        return
    work = args.out or tempfile.mkdtemp(prefix="sp-bench-")
    os.makedirs(work, exist_ok=True)
    model, n_params = build_model(work, args.model_size)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    longs = [int(x) for x in args.long.split(",") if x]
    print(f"model: Llama {args.model_size}, {n_params / 1e6:.1f}M parameters; 2 ranks, ZeRO-3, fp32, checkpointing, "
          f"sdpa, rows of one document; {args.steps} steps per cell", flush=True)
    # The first run after a fresh install peaks higher (one-time set-up): warm up once, unmeasured.
    data = {n: long_documents(work, model, n) for n in [128] + lengths + longs}
    cell(model, data[128], 128, "N=2", 1, os.path.join(work, "warm-up"))
    base = {c: cell(model, data[128], 128, c, args.steps, run_dir(work, c, 128)) for c in CONTENDERS}
    results = []
    for length in lengths + longs:
        for contender in CONTENDERS:
            if length in longs and contender == "N=1":
                continue
            r = cell(model, data[length], length, contender, args.steps, run_dir(work, contender, length))
            if "error" not in r and "error" not in base[contender]:
                r["added_mib"] = r["rss_mib"] - base[contender]["rss_mib"]
            results.append((length, contender, r))
            print(f"  {length:>6} {contender:<18} {json.dumps(r)}", flush=True)
    report(results)
    json.dump({"base": base, "results": results}, open(os.path.join(work, "results.json"), "w"), indent=1)
    print(f"\nruns and results.json: {work}")


if __name__ == "__main__":
    main()
