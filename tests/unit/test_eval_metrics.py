"""Average@K and pass@K on hand-made correctness tables; the unbiased pass@k estimator against
brute-force enumeration of k-subsets; the mean across benchmarks."""

from __future__ import annotations

import itertools
import math

import pytest

from dft_ds.eval.metrics import benchmark_metrics, k_values, mean_metrics, pass_at_k

T, F = True, False


def test_average_and_pass_at_k_on_a_hand_made_table():
    table = [
        [T, T, T, T],  # 4/4
        [T, F, F, F],  # 1/4
        [F, F, F, F],  # 0/4
        [F, T, F, T],  # 2/4
    ]
    m = benchmark_metrics(table)
    assert m["problems"] == 4 and m["samples"] == 4
    assert m["avg_at_k"] == pytest.approx((1 + 0.25 + 0 + 0.5) / 4)
    assert m["pass_at_k"] == pytest.approx(3 / 4)  # any of the 4 correct
    assert m["pass_at"]["1"] == pytest.approx(m["avg_at_k"])  # pass@1 is Average@K
    # pass@2 per problem: 1, 1 - C(3,2)/C(4,2) = 1/2, 0, 1 - C(2,2)/C(4,2) = 5/6
    assert m["pass_at"]["2"] == pytest.approx((1 + 0.5 + 0 + 5 / 6) / 4)
    assert list(m["pass_at"]) == ["1", "2", "4"]


def test_single_sample_and_all_or_nothing():
    assert benchmark_metrics([[T], [F], [T]])["avg_at_k"] == pytest.approx(2 / 3)
    assert benchmark_metrics([[T], [F], [T]])["pass_at_k"] == pytest.approx(2 / 3)
    assert benchmark_metrics([[F] * 16] * 3)["pass_at_k"] == 0.0
    assert benchmark_metrics([[T] * 16] * 3)["avg_at_k"] == 1.0


def test_empty_and_ragged_tables():
    assert benchmark_metrics([]) == {"problems": 0, "samples": None, "avg_at_k": None, "pass_at_k": None,
                                     "pass_at": {}}
    with pytest.raises(ValueError, match="same positive number of samples"):
        benchmark_metrics([[T, F], [T]])
    with pytest.raises(ValueError):
        benchmark_metrics([[]])


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_enumeration_of_subsets(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            expected = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_closed_form_and_limits():
    assert pass_at_k(16, 3, 4) == pytest.approx(1 - math.comb(13, 4) / math.comb(16, 4))
    assert pass_at_k(200, 0, 100) == 0.0 and pass_at_k(200, 101, 100) == 1.0
    for bad in [(4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_k_values():
    assert k_values(1) == [1]
    assert k_values(2) == [1, 2]
    assert k_values(16) == [1, 2, 4, 8, 16]
    assert k_values(12) == [1, 2, 4, 8, 12]


def test_mean_is_unweighted_over_benchmarks_with_problems():
    per = {"a": benchmark_metrics([[T, T]] * 10), "b": benchmark_metrics([[F, T]]), "c": benchmark_metrics([])}
    mean = mean_metrics(per)
    assert mean == {"benchmarks": 2, "problems": 11, "avg_at_k": pytest.approx(0.75), "pass_at_k": pytest.approx(1.0)}
    assert mean_metrics({"c": benchmark_metrics([])})["avg_at_k"] is None
