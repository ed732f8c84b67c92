"""Answer extraction and grading, table-driven: each row states the exact expected answer or
verdict. Then the time limit: a pathological expression returns within timeout + slack (the
worker's SIGALRM), a worker that no signal reaches is killed and replaced, and grading
works off the main thread, where math-verify's own signal guard cannot.

The tables are also the workload of benchmarks/grading_bench.py."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dft_ds.eval import grading
from dft_ds.eval.grading import KILL_SLACK_S, _Worker, extract_answer, is_equivalent, strings_equivalent

# ---------------------------------------------------------------- the tables

# (generation text, expected extracted answer)
EXTRACTION_CASES = [
    (r"So the answer is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),  # nested braces
    (r"$\boxed{\sqrt{\frac{a}{b^{2}}}}$", r"\sqrt{\frac{a}{b^{2}}}"),  # three levels
    (r"First \boxed{1}, then finally \boxed{2}.", "2"),  # the last box wins
    (r"\boxed{3} and at last \fbox{7}", "7"),  # \fbox counts as a box
    (r"hence \boxed {12}", "12"),  # a space before the brace
    (r"thus \boxed 5$.", "5"),  # no braces: the token up to $
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces do not close the box
    (r"\boxed{\boxed{4}}", "4"),
    (r"\boxed{  x = 3 }", "x = 3"),
    (r"\boxed{\text{(B)}}", r"\text{(B)}"),
    ("\\boxed{\u22125}", "\u22125"),  # unicode minus kept as written; grading handles it
    (r"The answer is $\frac{3}{4}$.", r"\frac{3}{4}"),  # no box: the phrase, $ stripped
    ("Answer: 42.", "42"),
    ("the answer is 3.5. That is all.", "3.5"),  # a decimal point is not a sentence end
    ("The answer is 1. Wait, no: the answer is 2.", "2"),  # the last phrase wins
    ("**Final answer:** 12", "12"),
    (r"The final answer is \(2\sqrt{3}\)", r"2\sqrt{3}"),
    (r"The answer is 7. Then \boxed{\frac{1}{2", "7"),  # unclosed last box: the phrase
    # issue 18: a sentence as the answer phrase gives its last $...$ or number
    ("Final Answer: The largest $n$ is 34.", "34"),
    (r"Final Answer: $\frac{1}{2}$", r"\frac{1}{2}"),  # math first: the phrase's first $...$
    (r"Final Answer: the largest value is $\frac{3}{4}$.", r"\frac{3}{4}"),
    ("Final answer: there are 1,000 ways.", "1,000"),
    ("The answer is: the total is 4 4/9 cups.", "4 4/9"),  # a mixed number is one number
    ("The answer is 10 cm.", "10 cm"),  # one word: not a sentence, kept whole
    ("The answer is infinitely many.", "infinitely many"),  # a sentence without a number: whole
    (r"Final Answer: The value is 2\sqrt{3}", r"The value is 2\sqrt{3}"),  # not the 2 of 2\sqrt{3}
    ("The answer is the pair (2, 3).", "the pair (2, 3)"),  # not the 3 of a pair
    (r"\boxed{2", None),  # unclosed, no phrase
    (r"\boxed{}", None),
    ("We are still thinking", None),
    ("", None),
]

# (pred, gold, expected verdict)
EQUIVALENCE_CASES = [
    ("1/2", r"\frac{1}{2}", True),
    ("0.5", r"\frac12", True),
    (r"\dfrac{1}{2}", "0.5", True),
    (r"\tfrac{1}{2}", "1/2", True),
    (r"$\frac{1}{2}$", "0.5", True),  # math delimiters are not part of the answer
    (r"50\%", "50", True),  # the MATH convention: % is decoration
    (r"50\%", "0.5", True),  # and math-verify also accepts the value
    ("(0,1]", r"\left(0,1\right]", True),
    ("x = 3", "3", True),
    ("3", "x=3", True),
    ("1,000", "1000", True),
    (r"1\,000", "1000", True),  # a thin space as thousands separator
    (r"30^\circ", "30", True),
    ("30\u00b0", "30", True),  # a unicode degree sign
    (r"10\text{ cm}", "10", True),
    (r"\{1,2\}", r"\{2,1\}", True),
    (r"2\sqrt{2}", r"\sqrt{8}", True),
    ("x^2+2x+1", "(x+1)^2", True),
    ("\u22122", "-2", True),
    ("3.0", "3", True),
    (r"\pi/2", r"\frac{\pi}{2}", True),
    (r"\text{B}", "B", True),
    (r"\text{ infinitely many }", "infinitely many", True),  # the normalised string comparison
    (r"\infty", r"\infty", True),
    # issue 18: a sentence period after a unit or a degree sign
    (r"5 \text{ cm}.", "5", True),
    (r"$5 \text{ cm}.$", "5", True),
    (r"90^\circ.", "90", True),
    ("90\u00b0.", "90", True),
    # issue 18: a mixed number, plain text or LaTeX, is whole + fraction
    ("4 4/9", "40/9", True),
    ("4 4/9.", "40/9", True),
    ("-4 4/9", "-40/9", True),
    (r"4\frac{4}{9}", "40/9", True),
    (r"4 \frac{4}{9}", "40/9", True),
    (r"4 \cdot 4/9", "16/9", True),  # a product is not a mixed number
    ("4 + 4/9", "40/9", True),
    ("4, 4/9", "4, 4/9", True),
    # must NOT be equal
    ("4 4/9", "44/9", False),  # issue 18: the false positive
    ("4 4/9.", "44/9", False),
    (r"4\frac{4}{9}", "44/9", False),
    (r"4 \frac{4}{9}", "44/9", False),
    ("4, 4/9", "40/9", False),  # a list is not a mixed number
    (r"5 \text{ cm}.", "6", False),
    ("1/2", "1/3", False),
    ("0.05", "0.5", False),
    ("(0,1)", "[0,1]", False),
    ("x=3", "4", False),
    ("1000", "100", False),
    ("-2", "2", False),
    (r"\sqrt{2}", "2", False),
    ("3x", "3", False),
    ("", "5", False),
    (None, "5", False),
    ("   ", "1", False),
    ("0.5", "50", False),  # 50% is 0.5, but 50 is not
    (r"\frac{2}{1}", r"\frac{1}{2}", False),
    ("12", "21", False),
    (r"\{1,2\}", r"\{1,3\}", False),
    ("x^2", "2x", False),
]


def _ids(cases) -> list[str]:
    return [f"{i:02d}:" + repr(case[:-1])[:50] for i, case in enumerate(cases)]


# ---------------------------------------------------------------- extraction


@pytest.mark.parametrize("text,expected", EXTRACTION_CASES, ids=_ids(EXTRACTION_CASES))
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_boxed_answer_with_a_sentence_period_grades_as_the_number():
    """Issue 18, end to end: a box or an answer phrase whose answer ends in "unit." or "degree."."""
    for text, gold in [
        (r"so the side is $\boxed{5 \text{ cm}.}$", "5"),
        (r"The answer is $5 \text{ cm}.$", "5"),
        (r"the angle is \boxed{90^\circ.}", "90"),
        (r"The answer is $90^\circ.$", "90"),
    ]:
        assert is_equivalent(extract_answer(text), gold), text


def test_mixed_number_answer_phrase_is_whole_plus_fraction():
    """Issue 18, end to end: "4 4/9" was read as 44/9."""
    pred = extract_answer("The answer is 4 4/9.")
    assert is_equivalent(pred, "40/9")
    assert not is_equivalent(pred, "44/9")


def test_sentence_answer_phrase_grades():
    """Issue 18, end to end: "Final Answer: The largest $n$ is 34." never graded."""
    assert is_equivalent(extract_answer("Final Answer: The largest $n$ is 34."), "34")
    assert not is_equivalent(extract_answer("Final Answer: The largest $n$ is 34."), "3")


def test_extract_answer_never_raises_on_odd_input():
    for text in [None, 3, "\\", "\\boxed", "\\boxed{", "\\boxed{\\", "}}}{{{", "answer:", "\\boxed \n"]:
        assert extract_answer(text) is None


# ---------------------------------------------------------------- equivalence


@pytest.mark.parametrize("pred,gold,expected", EQUIVALENCE_CASES, ids=_ids(EQUIVALENCE_CASES))
def test_is_equivalent(pred, gold, expected):
    assert is_equivalent(pred, gold) is expected


def test_at_least_forty_cases_and_ten_negatives():
    assert len(EXTRACTION_CASES) + len(EQUIVALENCE_CASES) >= 40
    assert sum(1 for *_, expected in EQUIVALENCE_CASES if expected is False) >= 10


def test_in_process_path_agrees_with_the_worker():
    """timeout_s=None grades in this process; the verdicts must not depend on where it runs."""
    for pred, gold, expected in EQUIVALENCE_CASES:
        assert is_equivalent(pred, gold, timeout_s=None) is expected, (pred, gold)


def test_string_comparison_alone():
    assert strings_equivalent(r"\left( 1, 2 \right).", "(1,2)")
    assert strings_equivalent(r"\text{\textbf{yes}}", "yes")
    assert not strings_equivalent("1/2", "0.5")  # no mathematics here
    assert not strings_equivalent("", "")


def test_timeout_must_be_positive():
    with pytest.raises(ValueError, match="timeout_s"):
        is_equivalent("1", "1", timeout_s=0)


# ---------------------------------------------------------------- the time limit


def test_pathological_expression_returns_within_the_limit():
    is_equivalent("1/2", "0.5")  # start the worker first: its start is not the comparison's time
    start = time.monotonic()
    assert is_equivalent(r"9^{9^{9^{9}}}", "1", timeout_s=1.0) is False
    assert time.monotonic() - start < 1.0 + KILL_SLACK_S + 0.5  # 0.5: killing, a loaded machine
    assert is_equivalent("1/2", "0.5") is True  # and the worker still answers


def test_worker_stuck_out_of_signal_reach_is_killed_and_replaced():
    """With its alarm off (as when a C extension such as gmpy2 ignores signals), the hard
    deadline kills the worker, and the next comparison gets a fresh one."""
    worker = _Worker()
    try:
        assert worker.compare("1/2", "0.5", soft_s=1.0, hard_s=30.0) is True
        start = time.monotonic()
        assert worker.compare(r"9^{9^{9^{9}}}", "1", soft_s=None, hard_s=1.0) is False
        assert time.monotonic() - start < 1.0 + 0.5
        assert worker.kills == 1
        assert worker.compare("1/2", "0.5", soft_s=1.0, hard_s=30.0) is True  # a fresh worker
    finally:
        worker.close()


def test_grading_off_the_main_thread():
    """math-verify's signal guard raises in threads; our worker does not care who calls."""
    with ThreadPoolExecutor(max_workers=3) as pool:
        verdicts = list(pool.map(lambda c: is_equivalent(c[0], c[1]), EQUIVALENCE_CASES))
    assert verdicts == [expected for *_, expected in EQUIVALENCE_CASES]


def test_without_a_worker_main_thread_uses_math_verify_and_threads_the_strings(monkeypatch):
    """Where no worker process can start: math-verify's own signal guard on the main thread;
    elsewhere only the string comparison, since nothing could stop a runaway comparison."""

    class NoWorker:
        def compare(self, *args, **kwargs):
            return None

    monkeypatch.setattr(grading, "_shared_worker", lambda: NoWorker())
    assert is_equivalent("1/2", "0.5") is True
    with ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(is_equivalent, "1/2", "0.5").result() is False
        assert pool.submit(is_equivalent, r"\left(1,2\right)", "(1,2)").result() is True
