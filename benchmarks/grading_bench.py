"""Grading throughput: comparisons per second over the test table (tests/unit/test_grading.py).

Run:  .venv/bin/python benchmarks/grading_bench.py [--comparisons 1000] [--timeout-s 5]

The table's equivalence pairs are repeated to about --comparisons comparisons, in table order
(math-verify's parse cache holds 20 entries, so a cycle of ~40 pairs mostly misses it, as a real
run of distinct problems would). Three ways to grade the same pairs, same process:
  string      normalised string comparison only (the last-resort baseline)
  in-process  is_equivalent(..., timeout_s=None): math-verify here, no time limit
  worker      is_equivalent(...): math-verify in the worker process under the time limit (default)
The worker is started before the clock runs; its one-off start is printed on its own line.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dft_ds.eval.grading import is_equivalent, strings_equivalent  # noqa: E402


def load_table() -> list[tuple]:
    path = os.path.join(ROOT, "tests", "unit", "test_grading.py")
    spec = importlib.util.spec_from_file_location("_grading_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EQUIVALENCE_CASES


def timed(grade, pairs) -> tuple[float, int]:
    start = time.perf_counter()
    correct = sum(grade(pred, gold) is expected for pred, gold, expected in pairs)
    return time.perf_counter() - start, correct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comparisons", type=int, default=1000)
    parser.add_argument("--timeout-s", type=float, default=5.0)
    args = parser.parse_args()

    table = load_table()
    pairs = (table * (args.comparisons // len(table) + 1))[: args.comparisons]
    n = len(pairs)

    start = time.perf_counter()
    is_equivalent("1/2", "0.5", timeout_s=args.timeout_s)
    print(f"worker start (one-off, import sympy + math-verify): {time.perf_counter() - start:.2f} s")
    is_equivalent("1/2", "0.5", timeout_s=None)  # import math-verify here too, off the clock

    ways = {
        "string": lambda p, g: strings_equivalent(p, g),
        "in-process": lambda p, g: is_equivalent(p, g, timeout_s=None),
        "worker": lambda p, g: is_equivalent(p, g, timeout_s=args.timeout_s),
    }
    results = {name: timed(grade, pairs) for name, grade in ways.items()}
    base = n / results["string"][0]

    print(f"{n} comparisons ({len(table)} table pairs repeated), python {sys.version.split()[0]}")
    print(f"{'grader':<12}{'seconds':>9}{'comparisons/s':>15}{'string/this':>13}{'agree w/ table':>16}")
    for name, (seconds, correct) in results.items():
        rate = n / seconds
        print(f"{name:<12}{seconds:>9.3f}{rate:>15.1f}{base / rate:>12.0f}x{correct:>11}/{n}")


if __name__ == "__main__":
    main()
