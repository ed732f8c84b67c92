"""Samples over data.max_length are named (file:line, the first few) with what was done to them, and
transformers' own "indexing errors" warning, which judges by the tokenizer's model_max_length, stays out
of the log."""

from __future__ import annotations

import json
import logging

import pytest

from dft_ds import synthetic, tokenised
from dft_ds.config import DataConfig


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(synthetic.ensure_assets())


def write(tmp_path, lengths):
    """One row per length: a prompt of about `n` tokens, then a short response."""
    rows = [{"prompt": "Count: " + " ".join(str(i % 10) for i in range(n)), "response": "Done, all counted."}
            for n in lengths]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def prepare(tmp_path, tok, path, **settings):
    cfg = DataConfig(source=str(path), cache_dir=str(tmp_path / "cache"), max_length=64, **settings)
    return tokenised.prepare(cfg, tok, 0, say=lambda _: None)


def test_rows_over_max_length_are_named_with_what_was_done(tmp_path, tok):
    # rows 2-8 are over 64 tokens: 2 and 3 keep their target inside the cut, the rest lose it
    path = write(tmp_path, [5, 24, 26, 200, 5, 300, 400, 500, 600])
    report = prepare(tmp_path, tok, path).report
    assert report.truncated == 2 and report.truncated_away == 5 and report.dropped_no_target == 5
    assert report.summary().endswith("truncated 2, dropped 0 over max_length and 5 with no target left (5 of them "
                                     "cut before their target by truncation)")
    assert report.warnings == [
        f"data: 7 of 9 samples are longer than data.max_length=64 tokens and were truncated to it "
        f"(data.overlong=truncate); 5 of them lost every target to the cut and were dropped: {path}:2, {path}:3, "
        f"{path}:4, {path}:6, {path}:7, and 2 more; raise data.max_length to keep them whole"]


def test_dropped_rows_are_named_too_and_a_later_start_reads_the_same_warning(tmp_path, tok):
    path = write(tmp_path, [5, 200, 5])
    first = prepare(tmp_path, tok, path, overlong="drop")
    again = prepare(tmp_path, tok, path, overlong="drop")
    assert again.hit and again.report.warnings == first.report.warnings == [
        f"data: 1 of 3 samples are longer than data.max_length=64 tokens and were dropped (data.overlong=drop): "
        f"{path}:2; raise data.max_length to keep them whole"]


def test_no_indexing_errors_warning_from_the_tokenizer(tmp_path, tok, caplog):
    """A tokenizer whose fast backend pads is called through the wrapper, which warned about every text
    over model_max_length although data.max_length decides."""
    import copy

    slow_path = copy.deepcopy(tok)
    slow_path.model_max_length = 32
    slow_path._tokenizer.enable_padding()  # the Encoder then goes through the wrapper
    path = write(tmp_path, [5, 40, 5])
    with caplog.at_level(logging.WARNING):
        tokens = prepare(tmp_path, slow_path, path)
    assert tokens.report.truncated == 0 and tokens.report.samples == 3
    assert not [r for r in caplog.records if "indexing errors" in r.getMessage()], caplog.text
