"""Sampling and grading: benchmarks -> prompts -> K completions per problem -> graded records.

It is dft-eval's path (the same benchmarks, prompt styles, backends and per-request seeds), so a
sample's text depends only on the model, the problem, the sample index and --seed: not on the
batch size, the backend's batching or the shard. Grading records why a sample is not correct
(wrong, no answer, or a grader timeout, which counts as incorrect).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

from dft_ds.eval.generate import Completion, Request, Sampling, build_backend, request_seed
from dft_ds.eval.run import EvalOptions, check_options, has_tokenizer, load_tokenizer

FORMAT = "dft-sample/1"


@dataclass(frozen=True)
class SampleOptions(EvalOptions):
    """dft-eval's options (samples = K per problem); the selection policy is separate (select.Policy)."""


def sample(opts: SampleOptions) -> tuple[dict, list[dict], dict]:
    """(settings, records, runtime) of one sampling run; raises UserError on bad input before loading."""
    from dft_ds.adapter import adapter_base, is_adapter_dir
    from dft_ds.eval.benchmarks import load_benchmark
    from dft_ds.eval.prompting import build_prompter

    started = time.perf_counter()
    check_options(opts)
    benchmarks = [load_benchmark(spec, opts.fields, opts.limit, opts.shard) for spec in opts.benchmarks]
    base = adapter_base(opts.model, opts.base) if is_adapter_dir(opts.model) else None
    tokenizer = load_tokenizer(opts.model if has_tokenizer(opts.model) else base)
    prompter = build_prompter(tokenizer, opts.prompt)
    if opts.temperature == 0 and opts.samples > 1:
        print(f"dft-sample: note: temperature 0 is greedy decoding; the {opts.samples} samples of a problem will be "
              "identical (--dedup keeps one)", file=sys.stderr)
    backend = build_backend(opts.backend, opts.model, tokenizer, dtype=opts.dtype, batch_size=opts.batch_size,
                            progress=opts.progress, memory_utilization=opts.gpu_memory_utilization, base=base)
    records, requests = [], []
    for bench in benchmarks:
        for p in bench.problems:
            text = prompter.render(p.problem)
            seeds = [request_seed(opts.seed, bench.name, p.index, k) for k in range(opts.samples)]
            records.append({"benchmark": bench.name, "index": p.index, "id": p.id, "problem": p.problem,
                            "gold": p.gold, "prompt": text,
                            "messages": prompter.messages(p.problem) if prompter.templated else None,
                            "prompt_text": None if prompter.templated else prompter.plain_prompt(p.problem),
                            "seeds": seeds})
            ids = prompter.encode(text)
            requests += [Request(ids, s) for s in seeds]
    sampling = Sampling(opts.temperature, opts.top_p, opts.max_new_tokens, tuple(prompter.stop_ids()))
    t0 = time.perf_counter()
    completions = backend.generate(requests, sampling) if requests else []
    generate_s = time.perf_counter() - t0 - (backend.startup_s if opts.backend == "vllm" else 0.0)
    t0 = time.perf_counter()
    grade(records, completions, opts.grade_timeout_s, opts.progress)
    grade_s = time.perf_counter() - t0
    settings = {
        "format": FORMAT, "model": os.path.abspath(opts.model),
        **({"base": os.path.abspath(base)} if base is not None else {}),
        "benchmarks": [b.describe() for b in benchmarks],
        "samples": opts.samples, "temperature": opts.temperature, "top_p": opts.top_p,
        "max_new_tokens": opts.max_new_tokens, "seed": opts.seed, "prompt": opts.prompt,
        "prompt_role": prompter.role, "templated": prompter.templated, "backend": opts.backend, "dtype": opts.dtype,
        "limit": opts.limit, "grade_timeout_s": opts.grade_timeout_s,
    }
    runtime = {
        "device": backend.device_name, "dtype": str(backend.dtype).replace("torch.", ""),
        "startup_seconds": round(backend.startup_s, 3), "generate_seconds": round(generate_s, 3),
        "grade_seconds": round(grade_s, 3),
        "samples_per_second": round(len(completions) / generate_s, 4) if generate_s > 0 else None,
        "generated_tokens": sum(c.num_tokens for c in completions),
        "seconds": round(time.perf_counter() - started, 3),
    }
    return settings, records, runtime


def grade(records: list[dict], completions: list[Completion], timeout_s: float, progress: bool = True) -> None:
    """Attach the graded generations to each record (in place). Identical (answer, gold) pairs are
    compared once; a comparison that runs out of time is the verdict `timeout` (not correct)."""
    from tqdm import tqdm

    from dft_ds.eval.grading import extract_answer, is_equivalent, timeouts_so_far

    verdicts: dict[tuple[str, str], str] = {}
    it = iter(completions)
    bar = tqdm(total=len(completions), desc="grade", unit="sample", disable=not progress, file=sys.stderr)
    for record in records:
        generations = []
        for k, seed in enumerate(record.pop("seeds")):
            c = next(it)
            extracted = extract_answer(c.text)
            if extracted is None:
                verdict = "no_answer"
            else:
                key = (extracted, record["gold"])
                if key not in verdicts:
                    before = timeouts_so_far()
                    ok = is_equivalent(extracted, record["gold"], timeout_s=timeout_s)
                    verdicts[key] = "correct" if ok else ("timeout" if timeouts_so_far() > before else "wrong")
                verdict = verdicts[key]
            generations.append({"sample": k, "seed": seed, "text": c.text, "extracted": extracted,
                                "verdict": verdict, "correct": verdict == "correct", "finished": c.finished,
                                "tokens": c.num_tokens})
            bar.update(1)
        record["generations"] = generations
        record["correct"] = sum(g["correct"] for g in generations)
    bar.close()
