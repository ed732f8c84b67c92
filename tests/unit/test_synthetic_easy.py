"""The easy synthetic family of issue 18 (easy-train / easy-test / easy-ood, retention-train /
retention): answers right, splits deterministic and disjoint, the retention skill absent from the
fine-tuning data, the built-in benchmarks wired, and the original splits unchanged bit for bit."""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import sys
from pathlib import Path

import pytest

from dft_ds import synthetic
from dft_ds.eval.benchmarks import BenchmarkSpec, load_benchmark
from dft_ds.synthetic import generate_examples

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import replicate  # noqa: E402

EASY = ("easy-train", "easy-test", "easy-ood", "retention-train", "retention")

# sha256 of json.dumps(generate_examples(200, seed, split), sort_keys=True), computed from the module
# as it was before the easy family existed (git show 7633cf6:dft_ds/synthetic.py, imported from a
# temporary directory). The embedded default and many tests rely on these splits bit for bit.
ORIGINAL = {
    (0, "train"): "b57dbad30f755b0d58e4e8629ec3f51bbcfc326e6a58244780e7b9f59523930d",
    (0, "test"): "1162723b8b413a39adb78212aedb0445d03b316ba5bfba733ddc0e7767fc6afe",
    (0, "ood"): "62f92e68ccca8b453387618b91f9f2368b4a09c98e7534f468c26f469685acc3",
    (1001, "train"): "6520c70a5f06d1eed29e2fd351333745b2e6ee3652cfda328d0ba2e502b0d4c6",
    (2002, "train"): "d769397a132dc3a3188089a718762fb2aea797650357e5090b6d25cc6c5ffcae",
}


def _digest(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode("utf-8")).hexdigest()


@pytest.mark.parametrize("seed, split", sorted(ORIGINAL))
def test_the_original_splits_are_unchanged(seed, split):
    assert _digest(generate_examples(200, seed, split)) == ORIGINAL[(seed, split)]


# ---------------------------------------------------------------- an independent solver

_CALC = re.compile(r"Calculate (\d+(?: [+-] \d+)+)\.")
_PRODUCT = re.compile(r"Calculate (\d) \* (\d)\.")
_BUYS = re.compile(r"(\w+) buys (\d) (\w+) of (\d) (\w+)\. How many (\w+) does (\w+) buy\?")
_HAS = re.compile(r"(\w+) has (\d+) (\w+)")
_GETS = re.compile(r"(\w+) gives (\w+) (\d+) more (\w+)")
_GIVES = re.compile(r"(\w+) gives (\d+) (\w+) to (\w+)")
_ASK = re.compile(r"How many (\w+) does (\w+) have now\?")


def _solve(prompt: str) -> tuple[int, int]:
    """(answer, number of operations) from the prompt alone; AssertionError on an unknown form."""
    if match := _CALC.fullmatch(prompt):
        tokens = match.group(1).split()
        value = int(tokens[0])
        for op, number in zip(tokens[1::2], tokens[2::2]):
            value = value + int(number) if op == "+" else value - int(number)
        return value, len(tokens) // 2
    if match := _PRODUCT.fullmatch(prompt):
        return int(match.group(1)) * int(match.group(2)), 1
    if match := _BUYS.fullmatch(prompt):
        name, a, _, b, item, asked, who = match.groups()
        assert (item, who) == (asked, name), prompt
        return int(a) * int(b), 1
    first, *events, question = prompt.removesuffix("?").split(". ")
    owner, count, item = _HAS.fullmatch(first).groups()
    value = int(count)
    for event in events:
        if got := _GETS.fullmatch(event):
            assert got.group(2) == owner and got.group(4) == item, prompt
            value += int(got.group(3))
        else:
            gave = _GIVES.fullmatch(event)
            assert gave is not None and gave.group(1) == owner and gave.group(3) == item, prompt
            value -= int(gave.group(2))
    assert _ASK.fullmatch(question + "?").groups() == (item, owner), prompt
    return value, len(events)


def _check_steps(example: dict) -> None:
    """Each step is one operation 'a op b = c' that holds and chains from the previous result."""
    *steps, last = example["response"].split("\n")
    assert last == f"The answer is \\boxed{{{example['answer']}}}", last
    previous = None
    for step in steps:
        a, op, b, eq, c = step.split()
        assert eq == "=" and op in "+-*", step
        assert int(c) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op], step
        assert previous is None or int(a) == previous, f"step {step!r} does not start from {previous}"
        previous = int(c)
    assert previous == int(example["answer"])


@pytest.mark.parametrize("split", EASY)
def test_answers_are_right_and_steps_are_single_operations(split):
    for example in generate_examples(400, seed=7, split=split):
        answer, operations = _solve(example["prompt"])
        assert example["answer"] == str(answer) and answer >= 0, example
        assert len(example["response"].split("\n")) == operations + 1, example  # one line per operation
        _check_steps(example)


def test_the_checkers_reject_a_wrong_answer():
    example = dict(generate_examples(1, seed=0, split="easy-test")[0])
    wrong = int(example["answer"]) + 1
    assert _solve(example["prompt"])[0] != wrong
    example["response"] = example["response"].replace(f"= {example['answer']}\n", f"= {wrong}\n")
    with pytest.raises(AssertionError):
        _check_steps(example)


@pytest.mark.parametrize("split", EASY)
def test_splits_are_deterministic_and_prefix_stable(split):
    first = generate_examples(60, seed=3, split=split)
    assert first == generate_examples(60, seed=3, split=split)
    assert first[:20] == generate_examples(20, seed=3, split=split)
    assert first != generate_examples(60, seed=4, split=split)
    assert len({example["prompt"] for example in first}) == 60


@pytest.mark.parametrize("train, test", [("easy-train", "easy-test"), ("retention-train", "retention"),
                                         ("easy-train", "easy-ood")])
def test_held_out_splits_never_share_a_prompt_with_training(train, test):
    train_prompts = {e["prompt"] for seed in (0, 1001, 2002) for e in generate_examples(2000, seed, train)}
    assert not train_prompts & {e["prompt"] for e in generate_examples(500, 0, test)}


def test_both_kinds_occur_and_in_domain_is_one_to_three_operations():
    examples = generate_examples(500, seed=0, split="easy-test")
    operations = [_solve(e["prompt"])[1] for e in examples]
    assert set(operations) == {1, 2, 3}
    assert any(e["prompt"].startswith("Calculate") for e in examples)
    assert any(e["prompt"].endswith("have now?") for e in examples)
    # Single digits only, in the prompt and as every operand of a step.
    assert all(int(n) <= 9 for e in examples for n in re.findall(r"\d+", e["prompt"]))


def test_ood_needs_more_steps_and_larger_values():
    train, ood = generate_examples(500, 0, "easy-train"), generate_examples(500, 0, "easy-ood")
    steps = lambda rows: [_solve(e["prompt"])[1] for e in rows]  # noqa: E731
    assert min(steps(ood)) > max(steps(train))
    largest = lambda rows: statistics.mean(max(map(int, re.findall(r"\d+", e["response"]))) for e in rows)  # noqa: E731
    assert largest(ood) > largest(train) + 5


def test_retention_is_absent_from_the_fine_tuning_split_and_present_in_pretraining(tmp_path):
    task = replicate.TASKS["easy"]
    assert task.finetune == "easy-train" and "synthetic-retention" in task.benchmarks
    _, fine = replicate.write_data(str(tmp_path), 400, 3000, task)
    rows = [json.loads(line) for line in open(fine, encoding="utf-8")]
    assert len(rows) == 3000
    text = "".join(row["prompt"] + row["response"] for row in rows)
    assert "*" not in text and " buys " not in text  # no product, bare or told
    pretrain = replicate.pretrain_examples(400, task)
    assert len(pretrain) == 400
    products = sum(" * " in e["response"] and len(e["response"].split("\n")) == 2 for e in pretrain)
    easy = sum(bool(re.fullmatch(r"(\d+ [+-] \d+ = \d+\n)+The answer is \\boxed\{\d+\}", e["response"]))
               for e in pretrain)
    shares = dict(task.pretrain)
    # At least each split's share (a bare original-family product also counts as one).
    assert products >= round(400 * shares["retention-train"]) > 0 and easy >= round(400 * shares["easy-train"]) > 0
    # Interleaved: the first hundred rows already hold retention rows.
    assert any(" buys " in e["prompt"] and " has " not in e["prompt"] for e in pretrain[:100])


def test_the_default_task_writes_what_replicate_always_wrote(tmp_path):
    pre, fine = replicate.write_data(str(tmp_path), 30, 20)
    pre_rows = [json.loads(line) for line in open(pre, encoding="utf-8")]
    expected = [synthetic._render_chat(e["prompt"], e["response"]) for e in generate_examples(30, 1001, "train")]
    assert [row["response"] for row in pre_rows] == expected
    fine_rows = [json.loads(line) for line in open(fine, encoding="utf-8")]
    assert [row["prompt"] for row in fine_rows] == [e["prompt"] for e in generate_examples(20, 2002, "train")]


# ---------------------------------------------------------------- the built-in benchmarks


@pytest.mark.parametrize("name, split", [("synthetic-easy", "easy-test"), ("synthetic-easy-ood", "easy-ood"),
                                         ("synthetic-easy-train", "easy-train"), ("synthetic-retention", "retention")])
def test_builtin_benchmarks_are_the_data_seed_0_splits(name, split):
    bench = load_benchmark(BenchmarkSpec(name), limit=7)
    expected = generate_examples(7, 0, split)
    assert [(p.problem, p.gold) for p in bench.problems] == [(e["prompt"], e["answer"]) for e in expected]
    assert bench.total == 7 and split in bench.source


# ---------------------------------------------------------------- replicate.py's --losses


def test_losses_map_to_their_overrides(monkeypatch):
    assert replicate.parse_losses("sft,dft") == ["sft", "dft"]
    for bad in ("sft,nope", "sft,sft", ""):
        with pytest.raises(SystemExit):
            replicate.parse_losses(bad)
    # sft and dft keep the overrides replicate always passed.
    assert replicate.loss_overrides(None, "sft", []) == ["loss.type=sft", "loss.prob_floor=0"]
    assert replicate.loss_overrides(None, "dft", []) == ["loss.type=dft", "loss.prob_floor=0"]
    assert replicate.loss_overrides(None, "dft-floor", []) == ["loss.type=dft", "loss.prob_floor=0.1"]
    assert replicate.loss_overrides(None, "eaft", []) == ["loss.type=eaft"]
    assert replicate.loss_overrides(None, "asft", []) == ["loss.type=asft"]
    asked = []
    monkeypatch.setattr(replicate, "planned_steps", lambda args, overrides: asked.append(overrides) or 61)
    assert replicate.loss_overrides(None, "mix", ["x=1"]) == ["loss.type=mix", "loss.mix_end=30"]
    assert asked == [["x=1", "loss.type=mix"]]  # the plan is of the mix run itself
    assert replicate.models_for(["sft", "dft"]) == replicate.MODELS


def test_markdown_has_one_column_per_benchmark():
    cell = {"mean": 30.0, "sd": 1.0, "per_seed": [30.0], "answered_mean": 99.0, "answered_per_seed": [99.0]}
    benchmarks = list(replicate.TASKS["easy"].benchmarks)
    summary = {"avg_at_k": {m: {b: cell for b in benchmarks} for m in ("base", "sft", "mix")},
               "benchmarks": benchmarks, "k": 4, "problems": 100, "seeds": [1],
               "final_training_metrics": {}, "minutes": 1.0}
    text = replicate.markdown(summary, replicate.models_for(["sft", "mix"]))
    assert "| model | in-domain (synthetic-easy) | out-of-domain (synthetic-easy-ood) | retention (synthetic-retention) |" in text
    assert "| mix (SFT to DFT by half the steps) | 30.0 ± 1.0 [30.0] | 30.0 ± 1.0 [30.0] | 30.0 ± 1.0 [30.0] |" in text
    assert "| model | in-domain | out-of-domain | retention |" in text
