"""One evaluation: benchmarks -> prompts -> generations -> grades -> an output directory.

Every input is checked (the output directory, the benchmark files, the model directory) before
the model is loaded, so bad input fails in seconds with exit code 2 and writes nothing.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

from dft_ds.errors import ModelError, UserError
from dft_ds.eval.benchmarks import Benchmark, BenchmarkSpec, load_benchmark
from dft_ds.eval.generate import Completion, Request, Sampling, build_backend, request_seed
from dft_ds.eval.prompting import build_prompter
from dft_ds.eval.report import check_out_dir, write_run


@dataclass(frozen=True)
class EvalOptions:
    model: str
    benchmarks: list[BenchmarkSpec]
    out: str
    samples: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 2048
    batch_size: int = 16
    seed: int = 0
    prompt: str = "boxed"
    backend: str = "hf"
    dtype: str = "auto"
    shard: tuple[int, int] | None = None
    fields: dict | None = None
    limit: int | None = None
    grade_timeout_s: float = 5.0
    progress: bool = True
    gpu_memory_utilization: float | None = None  # vllm: share of GPU (on CPU: host) memory; None = 0.9 / 0.3
    base: str | None = None  # an adapter --model: its base model (None: adapter_config.json's base_model_name_or_path)


def check_options(opts: EvalOptions) -> None:
    problems = []
    if opts.samples < 1:
        problems.append(f"--samples {opts.samples}: must be >= 1")
    if opts.temperature < 0:
        problems.append(f"--temperature {opts.temperature}: must be >= 0 (0 is greedy decoding)")
    if not 0 < opts.top_p <= 1:
        problems.append(f"--top-p {opts.top_p}: must be in (0, 1]")
    if opts.gpu_memory_utilization is not None and not 0 < opts.gpu_memory_utilization <= 1:
        problems.append(f"--gpu-memory-utilization {opts.gpu_memory_utilization}: must be in (0, 1]")
    if opts.max_new_tokens < 1:
        problems.append(f"--max-new-tokens {opts.max_new_tokens}: must be >= 1")
    if opts.batch_size < 1:
        problems.append(f"--batch-size {opts.batch_size}: must be >= 1")
    if opts.limit is not None and opts.limit < 1:
        problems.append(f"--limit {opts.limit}: must be >= 1")
    if opts.grade_timeout_s <= 0:
        problems.append(f"--grade-timeout {opts.grade_timeout_s}: must be > 0 seconds")
    names = [spec.name for spec in opts.benchmarks]
    if not names:
        problems.append("--benchmark: give at least one (e.g. --benchmark synthetic or --benchmark math500=FILE)")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"--benchmark: {', '.join(duplicates)} given more than once")
    from dft_ds.adapter import is_adapter_dir

    adapter = is_adapter_dir(opts.model)
    if not adapter and not os.path.isfile(os.path.join(opts.model, "config.json")):
        problems.append(f"--model {opts.model}: not a Hugging Face model directory (no config.json) nor a peft "
                        "adapter directory (no adapter_config.json); dft-convert makes one from a checkpoint")
    if opts.base is not None and not adapter:
        problems.append(f"--base {opts.base}: only for an adapter --model (a directory with adapter_config.json); "
                        f"{opts.model} is a whole model")
    if problems:
        raise UserError("; ".join(problems))


def evaluate(opts: EvalOptions) -> dict:
    """Run the evaluation described by `opts` and write its outputs; returns results.json's content."""
    started = time.perf_counter()
    check_out_dir(opts.out)
    check_options(opts)
    benchmarks = [load_benchmark(spec, opts.fields, opts.limit, opts.shard) for spec in opts.benchmarks]
    from dft_ds.adapter import adapter_base, is_adapter_dir

    base = adapter_base(opts.model, opts.base) if is_adapter_dir(opts.model) else None  # a LoRA adapter's base
    tokenizer = load_tokenizer(opts.model if has_tokenizer(opts.model) else base)
    prompter = build_prompter(tokenizer, opts.prompt)
    if opts.temperature == 0 and opts.samples > 1:
        print(f"dft-eval: note: temperature 0 is greedy decoding; the {opts.samples} samples will be identical",
              file=sys.stderr)
    backend = build_backend(opts.backend, opts.model, tokenizer, dtype=opts.dtype, batch_size=opts.batch_size,
                            progress=opts.progress, memory_utilization=opts.gpu_memory_utilization, base=base)
    prompts, requests = {}, []
    for bench in benchmarks:
        for p in bench.problems:
            text = prompter.render(p.problem)
            prompts[(bench.name, p.index)] = text
            ids = prompter.encode(text)
            requests += [Request(ids, request_seed(opts.seed, bench.name, p.index, k)) for k in range(opts.samples)]
    sampling = Sampling(opts.temperature, opts.top_p, opts.max_new_tokens, tuple(prompter.stop_ids()))
    t0 = time.perf_counter()
    completions = backend.generate(requests, sampling) if requests else []
    generate_s = time.perf_counter() - t0 - (backend.startup_s if opts.backend == "vllm" else 0.0)  # vLLM starts lazily
    t0 = time.perf_counter()
    records = grade(benchmarks, prompts, completions, opts)
    grade_s = time.perf_counter() - t0
    num_problems = sum(len(b.problems) for b in benchmarks)
    runtime = {
        "device": backend.device_name, "dtype": str(backend.dtype).replace("torch.", ""),
        "startup_seconds": round(backend.startup_s, 3),
        "generate_seconds": round(generate_s, 3), "grade_seconds": round(grade_s, 3),
        "samples_per_second": round(len(completions) / generate_s, 4) if generate_s > 0 else None,
        "problems_per_second": round(num_problems / generate_s, 4) if generate_s > 0 else None,
        "generated_tokens": sum(c.num_tokens for c in completions),
    }
    settings = {
        "model": os.path.abspath(opts.model),
        **({"base": os.path.abspath(base)} if base is not None else {}),
        "benchmarks": [b.describe() for b in benchmarks],
        "samples": opts.samples, "temperature": opts.temperature, "top_p": opts.top_p,
        "max_new_tokens": opts.max_new_tokens, "seed": opts.seed,
        "prompt": opts.prompt, "prompt_role": prompter.role, "backend": opts.backend, "dtype": opts.dtype,
        "limit": opts.limit, "grade_timeout_s": opts.grade_timeout_s,
    }
    runtime["seconds"] = round(time.perf_counter() - started, 3)
    return write_run(opts.out, settings, records, opts.shard, runtime)


def has_tokenizer(model_dir: str) -> bool:
    return any(os.path.isfile(os.path.join(model_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"--model {model_dir}: cannot load its tokenizer ({type(exc).__name__}: {exc})") from None


def grade(benchmarks: list[Benchmark], prompts: dict, completions: list[Completion], opts: EvalOptions) -> list[dict]:
    """One record per problem, its samples graded; identical (answer, gold) pairs are graded once."""
    from tqdm import tqdm

    from dft_ds.eval.grading import extract_answer, is_equivalent

    verdicts: dict[tuple[str, str], bool] = {}
    records, it = [], iter(completions)
    bar = tqdm(total=len(completions), desc="grade", unit="sample", disable=not opts.progress, file=sys.stderr)
    for bench in benchmarks:
        for p in bench.problems:
            generations = []
            for k in range(opts.samples):
                c = next(it)
                extracted = extract_answer(c.text)
                key = (extracted, p.gold)
                if extracted is not None and key not in verdicts:
                    verdicts[key] = is_equivalent(extracted, p.gold, timeout_s=opts.grade_timeout_s)
                generations.append({"sample": k, "text": c.text, "extracted": extracted,
                                    "correct": extracted is not None and verdicts[key],
                                    "finished": c.finished, "tokens": c.num_tokens})
                bar.update(1)
            records.append({"benchmark": bench.name, "index": p.index, "id": p.id, "problem": p.problem,
                            "gold": p.gold, "prompt": prompts[(bench.name, p.index)], "generations": generations,
                            "correct": sum(g["correct"] for g in generations)})
    bar.close()
    return records
