"""Metrics over a correctness table: one row per problem, one boolean per sample.

Average@K  mean over problems of (correct samples / K): the expected accuracy of one sample at the
           evaluation temperature, with K samples to cut its variance (the DFT paper's Average@16).
pass@k     the unbiased estimator of Chen et al. (2021), "Evaluating Large Language Models Trained on
           Code": with n samples of which c are correct, pass@k = 1 - C(n-c, k) / C(n, k), averaged
           over problems. At k = n (the reported pass@K) it is exactly "any of the K samples is
           correct"; at k = 1 it equals Average@K. results.json also lists pass@k for every power
           of two below K, which the estimator gives without drawing more samples.
Across benchmarks: the unweighted mean of the per-benchmark numbers (each benchmark counts once,
as in the paper's "Avg." column), next to the total number of problems.
"""

from __future__ import annotations

from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # 1 - prod_{i=n-c+1}^{n} (1 - k/i): the ratio of binomials without big integers.
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def k_values(samples: int) -> list[int]:
    """1, 2, 4, ... below `samples`, then `samples` itself."""
    ks, k = [], 1
    while k < samples:
        ks.append(k)
        k *= 2
    return ks + [samples]


def benchmark_metrics(correct: Sequence[Sequence[bool]]) -> dict:
    """{problems, samples, avg_at_k, pass_at_k, pass_at: {k: value}} for one benchmark.

    Every problem must have the same number of samples K. No problems (an empty shard): the
    rates are None.
    """
    problems = len(correct)
    if problems == 0:
        return {"problems": 0, "samples": None, "avg_at_k": None, "pass_at_k": None, "pass_at": {}}
    counts = {len(row) for row in correct}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"every problem needs the same positive number of samples, found {sorted(counts)}")
    samples = counts.pop()
    hits = [sum(bool(x) for x in row) for row in correct]
    pass_at = {k: sum(pass_at_k(samples, c, k) for c in hits) / problems for k in k_values(samples)}
    return {
        "problems": problems,
        "samples": samples,
        "avg_at_k": sum(c / samples for c in hits) / problems,
        "pass_at_k": pass_at[samples],
        "pass_at": {str(k): v for k, v in pass_at.items()},
    }


def mean_metrics(per_benchmark: dict[str, dict]) -> dict:
    """Unweighted mean of avg_at_k and pass_at_k over the benchmarks that have problems."""
    scored = [m for m in per_benchmark.values() if m["problems"]]
    mean = {"benchmarks": len(scored), "problems": sum(m["problems"] for m in per_benchmark.values())}
    for key in ("avg_at_k", "pass_at_k"):
        mean[key] = sum(m[key] for m in scored) / len(scored) if scored else None
    return mean
