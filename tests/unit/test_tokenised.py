"""Tokenised sets: cached by content under data.cache_dir, never read stale, prepared by one process
while the others wait, read back token for token; rows as offsets into them."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from dft_ds import families, synthetic, tokenised
from dft_ds.config import DataConfig
from dft_ds.errors import DataError


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(synthetic.ensure_assets())


@pytest.fixture(autouse=True)
def _private_datasets_cache(monkeypatch, tmp_path_factory):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_cache")))


ROWS = [{"prompt": f"What is {i} + {i}?", "response": f"It is {2 * i}. " * (1 + i % 5)} for i in range(40)]


def write(path: Path, rows=ROWS) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def prepared(cfg: DataConfig, tok, lines: list | None = None):
    said = [] if lines is None else lines
    return tokenised.prepare(cfg, tok, 0, say=said.append), said


def folders(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if p.is_dir()}


def test_a_second_start_reads_the_set_the_first_wrote(tmp_path, tok):
    cfg = DataConfig(source=write(tmp_path / "d.jsonl"), cache_dir=str(tmp_path / "cache"), template="plain")
    first, said = prepared(cfg, tok)
    assert not first.hit and any(s.startswith("data: tokenising 40 samples") for s in said)
    assert any(s.startswith("data: wrote the tokenised set") for s in said)
    allocated = pa.total_allocated_bytes()
    second, said = prepared(cfg, tok)
    # The tokens are memory-mapped from the cache folder, not copied into the process's memory.
    assert pa.total_allocated_bytes() - allocated < 1024
    assert second.hit and said == [f"data: read the tokenised set {second.path} (40 samples)"]
    assert folders(tmp_path / "cache") == {second.path.name}
    for i in range(len(first)):
        a, b = first.doc(i), second.doc(i)
        assert a[0].tolist() == b[0].tolist() and a[1].tolist() == b[1].tolist()
    assert second.report == first.report


@pytest.mark.parametrize("change", ["file", "tokenizer", "max_length", "template", "field", "overlong"])
def test_whatever_decides_a_token_gives_a_new_set(tmp_path, tok, change):
    source = tmp_path / "d.jsonl"
    cfg = DataConfig(source=write(source), cache_dir=str(tmp_path / "cache"), template="plain",
                     max_length=32 if change == "overlong" else 512)
    before, _ = prepared(cfg, tok)
    use_tok = tok
    if change == "file":
        rows = [dict(r) for r in ROWS]
        rows[3]["response"] = "Something else entirely."
        write(source, rows)
    elif change == "tokenizer":
        use_tok = families.build_tokenizer(families.FAMILIES["llama3"])
    elif change == "max_length":
        cfg = dataclasses.replace(cfg, max_length=16)
    elif change == "template":
        cfg = dataclasses.replace(cfg, template="chat")
    elif change == "field":
        write(source, [{"question": r["prompt"], "response": r["response"]} for r in ROWS])
        cfg = dataclasses.replace(cfg, prompt_field="question")
    elif change == "overlong":
        cfg = dataclasses.replace(cfg, overlong="drop")
    after, said = prepared(cfg, use_tok)
    assert not after.hit and after.path != before.path and any("tokenising" in s for s in said)
    assert len(folders(tmp_path / "cache")) == 2
    if change == "file":
        assert after.doc(3)[0].tolist() != before.doc(3)[0].tolist()


def test_a_file_rewritten_with_the_same_size_is_read_again(tmp_path, tok):
    """The key holds the modification time too: an edit that keeps the size is seen."""
    source = tmp_path / "d.jsonl"
    cfg = DataConfig(source=write(source), cache_dir=str(tmp_path / "cache"), template="plain")
    before, _ = prepared(cfg, tok)
    text = source.read_text().replace("What is 5 + 5?", "What is 5 - 5?")
    time.sleep(0.01)
    source.write_text(text)
    after, _ = prepared(cfg, tok)
    assert not after.hit and after.doc(5)[0].tolist() != before.doc(5)[0].tolist()


def test_settings_that_change_no_token_share_the_set(tmp_path, tok):
    cfg = DataConfig(source=write(tmp_path / "d.jsonl"), cache_dir=str(tmp_path / "cache"), template="plain")
    first, _ = prepared(cfg, tok)
    for other in (dict(packing=False), dict(eval_fraction=0.25), dict(num_workers=2)):
        again, _ = prepared(dataclasses.replace(cfg, **other), tok)
        assert again.hit and again.path == first.path, other


def test_cache_off_writes_nothing(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("DFT_DS_CACHE", str(tmp_path / "home"))
    cfg = DataConfig(source=write(tmp_path / "d.jsonl"), cache_dir="off", template="plain")
    tokens, said = prepared(cfg, tok)
    assert tokens.path is None and len(tokens.kept()) == 40
    assert not (tmp_path / "home").exists() and not (tmp_path / "cache").exists()
    auto, _ = prepared(dataclasses.replace(cfg, cache_dir="auto"), tok)
    assert auto.path.parent == tmp_path / "home" / "data"


def test_an_unfinished_set_is_never_read(tmp_path, tok):
    """A process killed while preparing leaves a staging folder and no set: the next start tokenises."""
    cfg = DataConfig(source=write(tmp_path / "d.jsonl"), cache_dir=str(tmp_path / "cache"), template="plain")
    key = tokenised.cache_key(cfg, tok, 0, "train")
    (tmp_path / "cache" / key).mkdir(parents=True)  # a folder without its manifest
    (tmp_path / "cache" / key / "tokens.arrow").write_bytes(b"half")
    tokens, said = prepared(cfg, tok)
    assert not tokens.hit and any("tokenising" in s for s in said) and len(tokens.kept()) == 40


def test_a_bad_row_is_named_and_leaves_no_set(tmp_path, tok):
    rows = ROWS[:10] + [{"prompt": "x", "response": ""}] + ROWS[10:]
    cfg = DataConfig(source=write(tmp_path / "d.jsonl", rows), cache_dir=str(tmp_path / "cache"), template="plain")
    with pytest.raises(DataError, match=r"d\.jsonl:11: field 'response' is empty"):
        prepared(cfg, tok)
    assert folders(tmp_path / "cache") == set()


def test_rows_pack_documents_by_index_without_copying_tokens(tmp_path, tok):
    cfg = DataConfig(source=write(tmp_path / "d.jsonl"), cache_dir=str(tmp_path / "cache"), template="plain",
                     max_length=64)
    tokens, _ = prepared(cfg, tok)
    rows = tokenised.build_rows(tokens, None, 64, packing=True)
    assert rows.order.tolist() == list(range(40))
    assert all(sum(len(d) for d, _ in rows[r]) <= 64 for r in range(len(rows)))
    assert sum(rows.doc_count(r) for r in range(len(rows))) == 40 and len(rows) < 40
    ids, _ = rows[0][0]
    assert isinstance(ids, np.ndarray) and ids.dtype == np.int32 and not ids.flags.owndata


PREPARE = """
import sys, time
from transformers import AutoTokenizer
from dft_ds import synthetic, tokenised
from dft_ds.config import DataConfig
tok = AutoTokenizer.from_pretrained(synthetic.ensure_assets())
cfg = DataConfig(source=sys.argv[1], cache_dir=sys.argv[2], template="plain")
tokens = tokenised.prepare(cfg, tok, 0)
print("kept", len(tokens.kept()), "hit", tokens.hit)
print("imported", *sorted(name for name in ("datasets", "pandas") if name in sys.modules))
"""


def test_one_of_two_processes_prepares_the_set_and_the_other_reads_it(tmp_path):
    """Two ranks started together: one takes the lock and tokenises, the other waits and reads."""
    source = write(tmp_path / "d.jsonl", ROWS * 50)
    procs = [subprocess.Popen([sys.executable, "-c", PREPARE, source, str(tmp_path / "cache")],
                              env=dict(os.environ, RANK=str(rank)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all(out.startswith("kept 2000 hit") for out, _ in outs)
    tokenising = [rank for rank, (_, err) in enumerate(outs) if "data: tokenising 2,000 samples" in err]
    assert len(tokenising) == 1, outs
    (key,) = folders(tmp_path / "cache")
    manifest = json.loads((tmp_path / "cache" / key / tokenised.MANIFEST).read_text())
    assert manifest["prepared_by"]["rank"] == str(tokenising[0])
    assert [out.split("\n")[0].split()[-1] for out, _ in outs] == \
        ["True" if r != tokenising[0] else "False" for r in (0, 1)]
    # A later start reads the set with pyarrow alone: neither datasets nor pandas is imported (each costs
    # every rank of every start a fraction of a second).
    later = subprocess.run([sys.executable, "-c", PREPARE, source, str(tmp_path / "cache")], capture_output=True,
                           text=True, timeout=300)
    assert later.returncode == 0 and later.stdout.split("\n")[:2] == ["kept 2000 hit True", "imported"], later


def test_prepare_data_writes_a_set_that_a_later_run_names_as_its_source(tmp_path, tok, monkeypatch, capsys):
    from dft_ds import train

    monkeypatch.setenv("DFT_DS_CACHE", str(tmp_path / "cache"))
    source = write(tmp_path / "d.jsonl")
    args = [f"data.source={source}", "data.template=plain", "data.max_length=64"]
    assert train.main(["--prepare-data", str(tmp_path / "saved"), *args]) == 0
    assert f"data.source={tmp_path / 'saved'} reads it" in capsys.readouterr().err
    cfg = DataConfig(source=str(tmp_path / "saved"), template="plain", max_length=64, cache_dir="off")
    saved, said = prepared(cfg, tok)
    direct, _ = prepared(DataConfig(source=source, template="plain", max_length=64, cache_dir="off"), tok)
    assert said[0].startswith(f"data: read the tokenised set {tmp_path / 'saved'} (40 samples")
    assert [saved.doc(i)[0].tolist() for i in range(40)] == [direct.doc(i)[0].tolist() for i in range(40)]
    # A run whose settings would give other tokens is refused, naming the setting.
    with pytest.raises(DataError, match=r"made with data\.max_length=64, this run has data\.max_length=128"):
        prepared(dataclasses.replace(cfg, max_length=128), tok)
    with pytest.raises(DataError, match="another tokenizer"):
        prepared(cfg, families.build_tokenizer(families.FAMILIES["llama3"]))
    # The folder is never overwritten.
    assert train.main(["--prepare-data", str(tmp_path / "saved"), *args]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_best_fit_decreasing_packs_the_longest_first_into_the_fullest_row():
    lengths = np.array([5, 4, 3, 3, 2, 1])
    order, bounds = tokenised.best_fit_order(lengths, 8)
    rows = [lengths[order[bounds[r]:bounds[r + 1]]].tolist() for r in range(len(bounds) - 1)]
    assert rows == [[5, 3], [4, 3, 1], [2]]
    assert sorted(order.tolist()) == list(range(6))
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=3000)
    order, bounds = tokenised.best_fit_order(lengths, 512)
    assert sorted(order.tolist()) == list(range(3000))
    sums = [int(lengths[order[bounds[r]:bounds[r + 1]]].sum()) for r in range(len(bounds) - 1)]
    greedy = len(tokenised.pack_bounds(lengths, 512, True)) - 1
    assert max(sums) <= 512 and len(sums) < greedy
    again = tokenised.best_fit_order(lengths, 512)
    assert again[0].tolist() == order.tolist() and again[1].tolist() == bounds.tolist()


def test_best_fit_rows_train_on_the_same_documents(tmp_path, tok):
    cfg = DataConfig(source=write(tmp_path / "d.jsonl"), cache_dir=str(tmp_path / "cache"), template="plain",
                     max_length=64)
    greedy = tokenised.build_train_data(cfg, tok, 0)
    best = tokenised.build_train_data(dataclasses.replace(cfg, packing_method="best_fit"), tok, 0)
    docs = lambda td: sorted(tuple(ids) for row in td.rows.docs for ids, _ in row)  # noqa: E731
    assert docs(best) == docs(greedy) and len(best.rows) <= len(greedy.rows)
    assert best.report.tokens == greedy.report.tokens and best.report.rows == len(best.rows)


def test_check_reads_a_glob_of_shards_and_names_a_pattern_that_matches_nothing(tmp_path, monkeypatch, capsys):
    """A pattern is a local source: --check plans it (not refused as an unknown hub name), and one that
    matches no file is named."""
    from dft_ds import train

    monkeypatch.setenv("DFT_DS_CACHE", str(tmp_path / "cache"))
    write(tmp_path / "part-1.jsonl", ROWS[:20])
    write(tmp_path / "part-2.jsonl", ROWS[20:])
    base = ["data.template=plain", "train.global_batch_size=4", f"train.output_dir={tmp_path / 'run'}"]
    assert train.main(["--check", f"data.source={tmp_path}/part-*.jsonl", *base]) == 0
    assert "40 samples" in capsys.readouterr().out
    assert train.main(["--check", f"data.source={tmp_path}/nothing-*.jsonl", *base]) == 2
    assert f"the pattern '{tmp_path}/nothing-*.jsonl' matches no file" in capsys.readouterr().err
