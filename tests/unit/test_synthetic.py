"""The embedded default: synthetic data is correct and split cleanly, the tokenizer behaves like
Llama's and is reproducible, the asset cache is reused, and the tiny model fits the tokenizer."""

from __future__ import annotations

import ast
import operator
import re
import shutil
import statistics
from fractions import Fraction
from pathlib import Path

import pytest

from dft_ds import synthetic
from dft_ds.synthetic import (
    build_tokenizer,
    ensure_assets,
    generate_examples,
    load_split,
    tiny_model_config,
)

# ---------------------------------------------------------------- an independent solver

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_PURE = re.compile(r"^[\d\s+\-*/().]+$")


def _evaluate(expression: str, x: Fraction | None = None) -> Fraction:
    """Exact value of an arithmetic expression (integers, + - * /, unary minus, variable X)."""

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        if isinstance(node, ast.Name) and node.id == "X" and x is not None:
            return x
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        raise ValueError(f"not arithmetic: {expression!r}")

    return walk(ast.parse(expression, mode="eval"))


def _numbers(text: str) -> list[int]:
    return [int(number) for number in re.findall(r"\d+", text)]


def _solve_from_prompt(prompt: str) -> Fraction:
    """Recompute the answer from the prompt alone, one rule per problem kind."""
    if prompt.startswith("Solve for x: "):
        left, right = prompt.removeprefix("Solve for x: ").split(" = ")
        # Each side is linear, c x + d: d is its value at 0 and c its rise from 0 to 1.
        sides = [re.sub(r"(\d+)x", r"\1*X", side) for side in (left, right)]
        (c_left, d_left), (c_right, d_right) = [
            (_evaluate(side, Fraction(1)) - _evaluate(side, Fraction(0)), _evaluate(side, Fraction(0)))
            for side in sides
        ]
        return (d_right - d_left) / (c_left - c_right)
    if prompt.startswith("Calculate "):
        return _evaluate(prompt.removeprefix("Calculate ").rstrip("."))
    if "per hour" in prompt:
        legs = re.findall(r"(\d+) \w+ per hour for (\d+) hours", prompt)
        return Fraction(sum(int(speed) * int(hours) for speed, hours in legs))
    if "shares" in prompt:
        batches, size = map(int, re.search(r" (\d+) \w+ of (\d+) ", prompt).groups())
        kept = re.search(r"keeps (\d+) for later", prompt)
        friends = int(re.search(r"among (\d+) friends", prompt).group(1))
        return Fraction(batches * size - (int(kept.group(1)) if kept else 0), friends)
    count = Fraction(int(re.search(r" has (\d+) ", prompt).group(1)))
    for sentence in prompt.split(". ")[1:]:
        if bought := re.search(r"buys (\d+) \w+ of (\d+) ", sentence):
            count += int(bought.group(1)) * int(bought.group(2))
        elif given := re.search(r"gives (\d+) \w+ to ", sentence):
            count -= int(given.group(1))
        elif received := re.search(r"gives \w+ (\d+) more ", sentence):
            count += int(received.group(1))
    return count


def _check_steps(example: dict[str, str]) -> None:
    """Every "a = b = c" chain in the solution holds, and the last one lands on the answer."""
    *steps, last = example["response"].split("\n")
    assert last.endswith(f"\\boxed{{{example['answer']}}}"), last
    assert steps, example
    known = set(_numbers(example["prompt"]))
    final_value = None
    for step in steps:
        pieces = [piece.strip() for piece in step.rsplit(":", 1)[-1].split("=")]
        values = [_evaluate(piece) for piece in pieces if _PURE.match(piece)]
        assert values, step
        assert len(set(values)) == 1, f"inconsistent step {step!r}"
        # The inputs of a step come from the prompt or from earlier results, not from nowhere.
        first_pure = next(piece for piece in pieces if _PURE.match(piece))
        assert set(_numbers(first_pure)) <= known, f"unexplained number in {step!r}"
        known.update(_numbers(step))
        final_value = values[-1]
    assert final_value == Fraction(int(example["answer"]))


# ---------------------------------------------------------------- data


def test_generate_examples_is_a_function_of_seed_and_split():
    first = generate_examples(50, seed=3)
    assert first == generate_examples(50, seed=3)
    assert first[:20] == generate_examples(20, seed=3)  # growing n only appends
    assert first != generate_examples(50, seed=4)
    assert first != generate_examples(50, seed=3, split="test")
    assert all(set(example) == {"prompt", "response", "answer"} for example in first)


def test_train_and_test_never_share_a_prompt():
    train = [example["prompt"] for example in generate_examples(3000, seed=0, split="train")]
    test = [example["prompt"] for example in generate_examples(600, seed=0, split="test")]
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    assert not set(train) & set(test)
    # The split is by prompt hash, so it also holds across seeds.
    assert not set(train) & {example["prompt"] for example in generate_examples(600, seed=1, split="test")}


@pytest.mark.parametrize("split", ["train", "test", "ood"])
def test_answers_are_right_and_steps_hold(split):
    examples = generate_examples(400, seed=7, split=split)
    for example in examples:
        assert re.fullmatch(r"\d+", example["answer"]), example
        assert _solve_from_prompt(example["prompt"]) == int(example["answer"]), example
        _check_steps(example)
    openings = {example["prompt"].split()[0] for example in examples}
    assert {"Solve", "Calculate", "A"} <= openings  # equations, arithmetic and travel all occur
    assert any("shares" in example["prompt"] for example in examples)
    assert any("have now?" in example["prompt"] for example in examples)


def test_checker_rejects_a_wrong_answer():
    example = dict(generate_examples(1, seed=0)[0])
    wrong = str(int(example["answer"]) + 1)
    example["response"] = example["response"].replace(f"= {example['answer']}\n", f"= {wrong}\n")
    with pytest.raises(AssertionError):
        _check_steps(example)
    assert _solve_from_prompt(example["prompt"]) != int(wrong)


def test_ood_is_harder_than_train():
    train, ood = generate_examples(500, seed=0), generate_examples(500, seed=0, split="ood")
    mean_number = lambda rows: statistics.mean(n for row in rows for n in _numbers(row["prompt"]))  # noqa: E731
    mean_steps = lambda rows: statistics.mean(row["response"].count("\n") for row in rows)  # noqa: E731
    assert mean_number(ood) > 5 * mean_number(train)
    assert mean_steps(ood) > mean_steps(train) + 1


def test_train_responses_are_short():
    lengths = [len(example["response"]) for example in generate_examples(1000, seed=0)]
    assert 40 <= min(lengths) and max(lengths) <= 200
    assert 60 <= statistics.mean(lengths) <= 150


def test_bad_split_is_rejected():
    with pytest.raises(ValueError, match="split"):
        generate_examples(1, seed=0, split="validation")


def test_load_split_matches_generate_examples():
    dataset = load_split("test", 30, seed=2)
    assert dataset.column_names == ["prompt", "response", "answer"]
    assert len(dataset) == 30
    assert dataset.to_list() == generate_examples(30, seed=2, split="test")


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    return ensure_assets(tmp_path_factory.mktemp("cache"), seed=0)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _sample_texts() -> list[str]:
    rows = generate_examples(100, seed=5) + generate_examples(100, seed=5, split="ood")
    return [f"{row['prompt']}\n{row['response']}" for row in rows]


def test_ensure_assets_builds_under_the_versioned_name(tokenizer_dir):
    path = Path(tokenizer_dir)
    assert path.name == "synthetic-tokenizer-v1-seed0"
    assert (path / "tokenizer.json").is_file() and (path / "tokenizer_config.json").is_file()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_special_tokens(tokenizer):
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    assert (tokenizer.pad_token, tokenizer.unk_token) == ("<pad>", "<unk>")
    ids = [tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert ids == [0, 1, 2, 3]  # tiny_model_config's defaults rely on these
    assert len(tokenizer) == 512


def test_encoding_starts_with_bos_and_appends_no_eos(tokenizer):
    for text in _sample_texts()[:20]:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.eos_token_id not in ids and tokenizer.pad_token_id not in ids
    batch = tokenizer(["1 + 2", "Solve for x: 3x = 9"], padding=True)["input_ids"]
    assert tokenizer.pad_token_id in batch[0] and tokenizer.pad_token_id not in batch[1]


def test_round_trip_without_unknowns(tokenizer):
    texts = [*_sample_texts(), "Unseen: héllo wörld 😀\ttab  two spaces {[]} ~ 1,234.5%"]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids[1:]) == text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_digits_are_single_tokens(tokenizer):
    tokens = tokenizer.tokenize("Calculate 407886 + 12 * 3093.")
    digit_tokens = [token.lstrip("▁") for token in tokens if any(ch.isdigit() for ch in token)]
    assert "".join(digit_tokens) == "407886123093"
    assert all(len(token) == 1 for token in digit_tokens)


def test_chat_template(tokenizer):
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Solve for x: 2x = 4"},
        {"role": "assistant", "content": "x = 2"},
        {"role": "user", "content": "And 3x = 9?"},
    ]
    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<s><|system|>\nBe brief.\n<|user|>\nSolve for x: 2x = 4\n"
        "<|assistant|>\nx = 2</s><|user|>\nAnd 3x = 9?\n<|assistant|>\n"
    )
    assert not tokenizer.apply_chat_template(chat, tokenize=False).endswith("<|assistant|>\n")
    # Only the assistant's words and its eos are marked as generated (what SFT trains on).
    encoded = tokenizer.apply_chat_template(
        chat[:3], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "x = 2</s>"
    with pytest.raises(Exception, match="unknown role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_build_is_deterministic(tokenizer_dir, tokenizer, tmp_path):
    from transformers import AutoTokenizer

    again = build_tokenizer(tmp_path / "again", seed=0)
    assert (Path(again) / "tokenizer.json").read_bytes() == (Path(tokenizer_dir) / "tokenizer.json").read_bytes()
    rebuilt = AutoTokenizer.from_pretrained(again)
    for text in _sample_texts()[::10]:
        assert rebuilt(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_existing_directory_is_reused(tokenizer_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(tokenizer_dir, cache / "synthetic-tokenizer-v1-seed0")
    marker = cache / "synthetic-tokenizer-v1-seed0" / "tokenizer.json"
    before = marker.stat().st_mtime_ns

    def must_not_build(*args, **kwargs):
        raise AssertionError("rebuilt an existing tokenizer")

    monkeypatch.setattr(synthetic, "_write_tokenizer", must_not_build)
    monkeypatch.setenv("DFT_DS_CACHE", str(cache))
    assert ensure_assets() == str(cache / "synthetic-tokenizer-v1-seed0")
    assert ensure_assets(cache) == str(cache / "synthetic-tokenizer-v1-seed0")
    assert marker.stat().st_mtime_ns == before


def test_losing_a_build_race_uses_the_winners_directory(tokenizer_dir, tmp_path, monkeypatch):
    out = tmp_path / "tok"

    def build_while_another_process_wins(directory, seed, vocab_size):
        shutil.copytree(tokenizer_dir, out)  # the other process renames its build into place
        (directory / "tokenizer.json").write_text("{}")  # ours is never used

    monkeypatch.setattr(synthetic, "_write_tokenizer", build_while_another_process_wins)
    assert build_tokenizer(out) == str(out)
    assert (out / "tokenizer.json").read_bytes() == (Path(tokenizer_dir) / "tokenizer.json").read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]  # our staging dir is gone


# ---------------------------------------------------------------- tiny model


def test_tiny_model_fits_the_tokenizer(tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    config = tiny_model_config(len(tokenizer))
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (256, 4, 4)
    assert (config.num_key_value_heads, config.intermediate_size) == (4, 688)
    assert (config.max_position_embeddings, config.rms_norm_eps, config.tie_word_embeddings) == (1024, 1e-5, False)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, LlamaForCausalLM)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.get_output_embeddings().out_features == len(tokenizer)
    layer = 4 * 256 * 256 + 3 * 256 * 688 + 2 * 256  # attention, MLP, two norms
    assert sum(p.numel() for p in model.parameters()) == 4 * layer + 2 * 512 * 256 + 256
    batch = tokenizer(_sample_texts()[:2], padding=True, return_tensors="pt")
    logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, len(tokenizer))


def test_tiny_model_config_overrides():
    config = tiny_model_config(100, num_hidden_layers=2, eos_token_id=7, hidden_size=64)
    assert (config.vocab_size, config.num_hidden_layers, config.eos_token_id, config.hidden_size) == (100, 2, 7, 64)
    assert config.intermediate_size == 688
