"""`dft-eval`: evaluate a model directory; `dft-eval merge`: combine shards; `dft-eval compare`: runs side by side.

Exit codes: 0 done; 2 bad input (the message names the flag, file, line or field); other non-zero
for runtime failures.
"""

from __future__ import annotations

import argparse
import sys

from dft_ds.errors import EXIT_BAD_INPUT, UserError

EXAMPLES = """\
examples:
  dft-eval --model runs/dft/hf --benchmark synthetic --samples 4 --out evals/dft-synthetic
  dft-eval --model runs/dft/hf --benchmark math500=data/math500.jsonl --benchmark aime24=data/aime24.jsonl \\
           --samples 16 --temperature 1.0 --max-new-tokens 4096 --out evals/dft
  dft-eval --model M --benchmark mine=data/mine.parquet --field problem=question --field answer=label --out O
  dft-eval --model M --benchmark math500=F --shard 0/4 --out evals/x/shard-0   # then: dft-eval merge ...
  dft-eval --model runs/lora/adapter --benchmark synthetic --out evals/lora   # base from adapter_config.json
  dft-eval --model runs/lora/adapter --base /models/base --benchmark synthetic --out evals/lora2
  dft-eval merge evals/x/shard-* --out evals/x/all
  dft-eval compare evals/base evals/sft evals/dft --labels base,sft,dft --out evals/compare

benchmarks: math500, minerva_math, olympiadbench, aime24, amc23 (NAME=FILE, published layouts),
  synthetic, synthetic-ood (built in, no file), or any NAME=FILE with --field mappings.
"""


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None


EVAL_DESCRIPTION = ("Generate K samples per problem with a Hugging Face model directory, grade them, and write "
                    "samples.jsonl, results.json, results.md and results.png. Subcommands: "
                    "'dft-eval merge SHARD_DIR ... --out DIR', 'dft-eval compare RUN ... [--labels a,b] [--out DIR]'.")


def eval_parser(prog: str = "dft-eval", description: str = EVAL_DESCRIPTION, epilog: str = EXAMPLES,
                samples: int = 16) -> argparse.ArgumentParser:
    """dft-eval's options; dft-sample builds on the same ones (same prompts, backends and seeds)."""
    from dft_ds.eval.generate import BACKENDS, DTYPES
    from dft_ds.eval.prompting import STYLES

    p = argparse.ArgumentParser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog,
                                description=description)
    p.add_argument("--model", required=True, metavar="HF_DIR",
                   help="a Hugging Face model directory (dft-convert output), or a peft LoRA adapter directory "
                        "(dft-convert --adapter-only) evaluated on its base")
    p.add_argument("--base", default=None, metavar="DIR",
                   help="with an adapter --model: the base model directory (default: base_model_name_or_path "
                        "in its adapter_config.json)")
    p.add_argument("--benchmark", action="append", default=[], metavar="NAME[=PATH]", required=True,
                   help="a benchmark to run; repeat for several")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory; must not exist or be empty")
    p.add_argument("--samples", type=_int, default=samples, metavar="K",
                   help=f"samples per problem (default {samples}" + (f": Average@{samples})" if prog == "dft-eval" else ")"))
    p.add_argument("--temperature", type=_float, default=1.0, metavar="T", help="sampling temperature; 0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=_float, default=1.0, metavar="P", help="nucleus sampling threshold (default 1.0: off)")
    p.add_argument("--max-new-tokens", type=_int, default=2048, metavar="N",
                   help="tokens per generation (default 2048)")
    p.add_argument("--batch-size", type=_int, default=16, metavar="B",
                   help="rows per generate call, hf backend (default 16; vLLM batches by itself)")
    p.add_argument("--seed", type=_int, default=0, metavar="S", help="sampling seed (default 0); the problems do not depend on it")
    p.add_argument("--prompt", choices=STYLES, default="boxed",
                   help="boxed: Qwen2.5-Math step-by-step + \\boxed{} instruction via the chat template (default); "
                        "chat: the problem as the user message; plain: the problem and a newline, no template")
    p.add_argument("--backend", choices=BACKENDS, default="hf",
                   help="hf (CPU or GPU) or vllm (GPU or CPU, in an environment with vLLM: make venv-vllm)")
    p.add_argument("--gpu-memory-utilization", type=_float, default=None, metavar="F",
                   help="vllm: share of GPU memory (on CPU: of host memory) vLLM takes for weights and KV cache "
                        "(default 0.9 on GPU, 0.3 on CPU)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="model dtype; auto = bf16 on GPUs that support it, else fp32 (default)")
    p.add_argument("--shard", default=None, metavar="i/n",
                   help="evaluate every n-th problem from i; merge the n shards")
    p.add_argument("--field", action="append", default=[], metavar="[BENCH:]ROLE=KEY",
                   help="read ROLE (problem, answer, solution, id) from field KEY of the benchmark files "
                        "(all of them, or BENCH's only)")
    p.add_argument("--limit", type=_int, default=None, metavar="N", help="first N problems of each benchmark")
    p.add_argument("--grade-timeout", type=_float, default=5.0, metavar="S",
                   help="seconds allowed per answer comparison (default 5)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dft-eval merge",
        description="Combine the --shard i/n output directories of one evaluation into the outputs of the unsharded "
                    "run. Checks that all come from the same model and settings and cover every problem once.")
    p.add_argument("shards", nargs="+", metavar="SHARD_DIR")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory; must not exist or be empty")
    return p


def compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dft-eval compare",
        description="Print Avg@K and pass@K of several runs side by side; with --out also write compare.md, "
                    "compare.json and a grouped bar chart compare.png.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--labels", default=None, help="comma-separated column labels, e.g. base,sft,dft "
                                                  "(default: the directory names)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write the table and chart here (must not exist or be empty)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in ("merge", "compare") else "eval"
    try:
        if command == "merge":
            ns = merge_parser().parse_args(argv[1:])
            return _merge(ns)
        if command == "compare":
            ns = compare_parser().parse_args(argv[1:])
            return _compare(ns)
        return _eval(eval_parser().parse_args(argv))
    except UserError as exc:
        print(f"dft-eval: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


def _eval(ns: argparse.Namespace) -> int:
    from dft_ds.eval.benchmarks import parse_benchmark_arg, parse_field_args, parse_shard
    from dft_ds.eval.report import RESULTS_FILE, results_markdown
    from dft_ds.eval.run import EvalOptions, evaluate

    opts = EvalOptions(
        model=ns.model, benchmarks=[parse_benchmark_arg(b) for b in ns.benchmark], out=ns.out,
        samples=ns.samples, temperature=ns.temperature, top_p=ns.top_p, max_new_tokens=ns.max_new_tokens,
        batch_size=ns.batch_size, seed=ns.seed, prompt=ns.prompt, backend=ns.backend, dtype=ns.dtype,
        shard=parse_shard(ns.shard) if ns.shard is not None else None, fields=parse_field_args(ns.field),
        limit=ns.limit, grade_timeout_s=ns.grade_timeout, progress=ns.progress,
        gpu_memory_utilization=ns.gpu_memory_utilization, base=ns.base)
    results = evaluate(opts)
    print(results_markdown(results), flush=True)
    print(f"dft-eval: wrote {ns.out}/ ({RESULTS_FILE}, samples.jsonl, results.md, results.png)", flush=True)
    return 0


def _merge(ns: argparse.Namespace) -> int:
    from dft_ds.eval.report import counted, merge_runs, results_markdown

    results = merge_runs(ns.shards, ns.out)
    print(results_markdown(results), flush=True)
    print(f"dft-eval merge: wrote {ns.out}/ from {counted(len(ns.shards), 'shard')}", flush=True)
    return 0


def _compare(ns: argparse.Namespace) -> int:
    from dft_ds.eval.report import compare_runs

    labels = [label.strip() for label in ns.labels.split(",")] if ns.labels else None
    print(compare_runs(ns.runs, labels, ns.out), flush=True)
    if ns.out:
        print(f"dft-eval compare: wrote {ns.out}/ (compare.md, compare.json, compare.png)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
