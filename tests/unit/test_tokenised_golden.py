"""The tokenised data path gives, sample for sample, the tokens and labels of the per-row loop it
replaced: every layout of docs/data.md, every model family, chat and plain templates, truncation and
dropping over max_length. tests/unit/golden/tokenised.json holds a digest of each case's ids and
labels (and each error message) as that loop produced them; the cases run here through
datasets.map, in one process and in two."""

from __future__ import annotations

import functools
import hashlib
import json
import os

import pytest

from dft_ds import families, tokenised
from dft_ds.config import DataConfig
from dft_ds.errors import UserError

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "tokenised.json")
CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"},
         {"role": "assistant", "content": "It is 5."}, {"role": "user", "content": "And 4+4?"},
         {"role": "assistant", "content": "8, of course."}]
LAYOUTS = {
    "numina": ([{"problem": f"What is {i}+3? " * (1 + i % 4),
                 "solution": f"{i}+3 = {i + 3}. " * (1 + i % 7) + f"\\boxed{{{i + 3}}}",
                 "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                 "source": "s"} for i in range(30)], {}),
    "prompt_response": ([{"prompt": f"Say {i} things. ", "response": "Thing. " * (i % 9 + 1)} for i in range(20)], {}),
    "trl_pc": ([{"prompt": f"Question {i}?", "completion": f" Answer {i}."} for i in range(10)], {}),
    "trl_conv": ([{"prompt": CONVO[:2], "completion": [{"role": "assistant", "content": f"Five {i}."}]}
                  for i in range(6)], {}),
    "messages": ([{"messages": CONVO if i % 2 else CONVO[1:3]} for i in range(10)], {}),
    "alpaca": ([{"instruction": f"Add {i} and 2.", "input": "" if i % 2 else "numbers", "output": f"{i + 2}",
                 "system": "You add." if i % 3 == 0 else ""} for i in range(12)], {}),
    "alpaca_hist": ([{"instruction": "And 4+4?", "output": "8", "history": [["2+3?", "5"]]} for i in range(4)],
                    {"template": "chat"}),
    "sharegpt": ([{"conversations": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": f"hello {i}"}]}
                  for i in range(8)], {}),
    "custom_fields": ([{"question": f"Q{i}", "answer": f"A{i} " * 50} for i in range(10)],
                      {"format": "prompt_response", "prompt_field": "question", "response_field": "answer"}),
}
VARIANTS = [{}, {"template": "plain"}, {"max_length": 24, "overlong": "truncate"},
            {"max_length": 24, "overlong": "drop"}]
CHAT_ONLY = ("trl_conv", "messages", "sharegpt", "alpaca_hist")


def cases():
    for family in families.FAMILIES:
        for layout, (rows, extra) in LAYOUTS.items():
            for k, variant in enumerate(VARIANTS):
                if variant.get("template") == "plain" and layout in CHAT_ONLY:
                    continue
                yield family, layout, k, rows, {**extra, **variant}


@functools.cache
def tokenizer(family: str):
    return families.build_tokenizer(families.FAMILIES[family])


def outcome(folder, family, layout, rows, settings, workers) -> dict:
    path = folder / f"{layout}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = DataConfig(source=str(path), num_workers=workers, cache_dir=str(folder / "cache"), **settings)
    try:
        tokens = tokenised.prepare(cfg, tokenizer(family), 0, say=lambda _: None)
    except UserError as exc:
        return {"error": type(exc).__name__, "message": str(exc).replace(f"{folder}/", "")}
    docs = [tokens.doc(int(i)) for i in tokens.kept()]
    ids, labels = [d[0].tolist() for d in docs], [d[1].tolist() for d in docs]
    return {"tokens": hashlib.sha256(json.dumps([ids, labels]).encode()).hexdigest()[:16], "samples": len(ids),
            "warnings": [w.replace(f"{folder}/", "") for w in tokens.report.warnings]}


@pytest.mark.parametrize("workers", [1, 2])
def test_every_layout_and_family_gives_the_tokens_of_the_per_row_loop(tmp_path, workers):
    golden = json.load(open(GOLDEN, encoding="utf-8"))
    # Two workers take seconds to start: one family's default variants are enough there.
    chosen = [c for c in cases() if workers == 1 or (c[0] == "qwen2" and c[2] in (0, 2))]
    got = {f"{f}/{lay}/{k}": outcome(tmp_path, f, lay, rows, s, workers) for f, lay, k, rows, s in chosen}
    assert {k: golden[k] for k in got} == got
    assert workers == 2 or set(got) == set(golden)
