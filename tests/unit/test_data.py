"""Data: prompt masking, chat conversations, loading every supported source with the real
`datasets` library, errors that name file/line/field, the over-length policy, packing (and that
attention never crosses packed documents, checked on a real tiny Llama), and the step sampler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dft_ds import data, synthetic
from dft_ds.batch import BatchSplit
from dft_ds.config import DataConfig, load_config
from dft_ds.data import (
    IGNORE_INDEX,
    RawData,
    StepSampler,
    collate,
    load_raw,
    sample_segments,
    shift_labels,
    tokenize_sample,
)
from dft_ds.tokenised import build_rows, build_train_data, from_lists, tokenize_dataset
from dft_ds.errors import DataError

# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(synthetic.ensure_assets())


@pytest.fixture(scope="session")
def datasets_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf_datasets_cache"))


@pytest.fixture(autouse=True)
def _private_datasets_cache(monkeypatch, datasets_cache):
    """`load_dataset` caches under ~/.cache/huggingface unless told otherwise; keep tests out of it."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", datasets_cache)


def write_jsonl(path: Path, rows: list, blank_after: tuple[int, ...] = ()) -> Path:
    """One JSON value per line; a blank line after each row index in `blank_after`."""
    lines = []
    for i, row in enumerate(rows):
        lines.append(row if isinstance(row, str) else json.dumps(row))
        if i in blank_after:
            lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def examples(n: int, seed: int = 0) -> list[dict[str, str]]:
    return [{"prompt": e["prompt"], "response": e["response"]} for e in synthetic.generate_examples(n, seed)]


def targets_of(ids: list[int], targets: list[bool]) -> list[int]:
    return [i for i, t in zip(ids, targets) if t]


def target_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Contiguous runs of target token ids, read back from SHIFTED labels."""
    runs, current = [], []
    for lab in labels:
        if lab == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(lab)
    if current:
        runs.append(current)
    return runs


def full_length(tok, prompt: str, response: str) -> int:
    """Independent count for the plain template: BOS + tokens of prompt\\nresponse + EOS."""
    return len(tok(prompt + "\n" + response)["input_ids"]) + 1


# ---------------------------------------------------------------- prompt masking


PAIRS = [
    {"prompt": "What is 2+3?", "response": "2 + 3 = 5\nThe answer is \\boxed{5}"},
    *examples(6, seed=3),
]


@pytest.mark.parametrize("template", ["plain", "chat"])
@pytest.mark.parametrize("row", PAIRS, ids=[f"row{i}" for i in range(len(PAIRS))])
def test_prompt_response_targets_are_exactly_the_response_and_eos(tok, template, row):
    cfg = DataConfig(template=template)
    chat = data.use_chat_template(cfg, tok)
    assert chat == (template == "chat")
    segments = sample_segments(row, cfg, tok, chat, "test:1")
    # A chat template writes the reply's end itself; plain text gets the EOS appended.
    ids, targets = tokenize_sample(segments, tok, chat_rendered=chat, add_eos=not chat)
    assert len(ids) == len(targets)

    target_ids = targets_of(ids, targets)
    assert tok.decode(target_ids, skip_special_tokens=False) == row["response"] + tok.eos_token
    assert target_ids[-1] == tok.eos_token_id and ids[-1] == tok.eos_token_id
    # Targets form one contiguous tail: no prompt token is a target.
    first = targets.index(True)
    assert all(targets[first:]) and not any(targets[:first])
    prompt_text = tok.decode(ids[:first], skip_special_tokens=True)
    if template == "plain":
        assert prompt_text == row["prompt"] + "\n"
    else:
        assert prompt_text == f"<|user|>\n{row['prompt']}\n<|assistant|>\n"
    # BOS opens the sample and is never a target.
    assert ids[0] == tok.bos_token_id and targets[0] is False
    assert ids.count(tok.bos_token_id) == 1


def test_shift_labels_puts_the_next_target_token_at_each_position(tok):
    row = PAIRS[0]
    cfg = DataConfig(template="plain")
    ids, targets = tokenize_sample(sample_segments(row, cfg, tok, False, "t"), tok, False, True)
    labels = shift_labels(ids, targets)
    assert len(labels) == len(ids)
    assert labels[-1] == IGNORE_INDEX
    for t in range(len(ids) - 1):
        assert labels[t] == (ids[t + 1] if targets[t + 1] else IGNORE_INDEX)
    assert tok.bos_token_id not in labels
    # The position before the first response token predicts it; every earlier one predicts nothing.
    first = targets.index(True)
    assert labels[first - 1] == ids[first]
    assert set(labels[: first - 1]) == {IGNORE_INDEX}
    # The labels, read back, spell the response and EOS.
    kept = [lab for lab in labels if lab != IGNORE_INDEX]
    assert tok.decode(kept, skip_special_tokens=False) == row["response"] + tok.eos_token


def test_shift_labels_small_case():
    assert shift_labels([1, 10, 11, 12, 2], [False, False, True, True, True]) == [-100, 11, 12, 2, -100]
    assert shift_labels([1, 10], [False, True]) == [10, -100]


def test_build_train_data_labels_match_the_file(tok, tmp_path):
    rows = PAIRS[:4]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    for template in ("plain", "chat"):
        td = build_train_data(DataConfig(source=str(path), template=template, packing=False), tok, seed=0)
        assert len(td.rows) == len(rows)
        for row, docs in zip(rows, td.rows.docs):
            ((ids, labels),) = docs
            (run,) = target_runs(ids, labels)
            assert tok.decode(run, skip_special_tokens=False) == row["response"] + tok.eos_token
        assert td.report.target_tokens == sum(
            sum(lab != IGNORE_INDEX for lab in labels) for ((_, labels),) in td.rows.docs)
        assert td.pad_id == tok.pad_token_id


# ---------------------------------------------------------------- chat messages

CONVERSATION = [
    {"role": "system", "content": "Be concise."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "2 + 3 = 5"},
    {"role": "user", "content": "And 4 * 2?"},
    {"role": "assistant", "content": "4 * 2 = 8\nThe answer is \\boxed{8}"},
]


def test_messages_only_assistant_replies_and_their_eos_are_targets(tok, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    cfg = DataConfig(source=str(path), format="messages")
    raw = load_raw(cfg, seed=0)
    ids_list, labels_list, report = tokenize_dataset(raw, cfg, tok)
    ((ids, labels),) = zip(ids_list, labels_list)
    # The ids are the template's rendering of the whole conversation (one BOS, EOS after each reply).
    assert tok.decode(ids, skip_special_tokens=False) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert ids.count(tok.bos_token_id) == 1 and ids.count(tok.eos_token_id) == 2
    runs = target_runs(ids, labels)
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert [tok.decode(r, skip_special_tokens=False) for r in runs] == [r + tok.eos_token for r in replies]
    assert report.samples == 1 and report.truncated == report.dropped_no_target == 0
    assert sum(len(r) for r in runs) == sum(lab != IGNORE_INDEX for lab in labels)


def test_messages_segments_mark_only_assistant_content(tok):
    segments = sample_segments({"messages": CONVERSATION}, DataConfig(format="messages"), tok, True, "t")
    assert [text for text, target in segments if target] == ["2 + 3 = 5</s>", CONVERSATION[4]["content"] + "</s>"]
    assert "".join(text for text, _ in segments) == tok.apply_chat_template(CONVERSATION, tokenize=False)


def test_messages_leading_assistant_turn_header_is_not_a_target(tok):
    convo = [{"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "4"}]
    segments = sample_segments({"messages": convo}, DataConfig(format="messages"), tok, True, "t")
    assert [text for text, target in segments if target] == ["Hello there</s>", "4</s>"]


def test_messages_without_assistant_turn_is_an_error(tok, tmp_path):
    rows = [{"messages": CONVERSATION},
            {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "hello"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(DataError, match=r"chat\.jsonl:2: .*no non-empty assistant turn"):
        build_train_data(DataConfig(source=str(path), format="messages"), tok, seed=0)


def test_messages_malformed_message_names_the_row(tok, tmp_path):
    bad = [{"role": "user", "content": "hello"}, {"role": "assistant"}]  # no content
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, {"messages": CONVERSATION},
                                                 {"messages": bad}], blank_after=(0,))
    with pytest.raises(DataError, match=r"chat\.jsonl:4: message 1 must be an object with string 'role' and 'content'"):
        build_train_data(DataConfig(source=str(path), format="messages"), tok, seed=0)


def test_messages_field_not_a_list_names_row_and_field(tok, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": "just text"}])
    with pytest.raises(DataError, match=r"chat\.jsonl:1: field 'messages' must be list, got str"):
        build_train_data(DataConfig(source=str(path), format="messages"), tok, seed=0)


# ---------------------------------------------------------------- loading sources


ROWS = examples(12, seed=1)


def _responses(td, tok) -> list[str]:
    out = []
    for row in td.rows.docs:
        for ids, labels in row:
            (run,) = target_runs(ids, labels)
            out.append(tok.decode(run[:-1], skip_special_tokens=False))
    return out


def _load(tok, source, **kw):
    cfg = DataConfig(source=str(source), template="plain", **kw)
    return build_train_data(cfg, tok, seed=0)


def test_load_jsonl(tok, tmp_path):
    td = _load(tok, write_jsonl(tmp_path / "d.jsonl", ROWS, blank_after=(3,)))
    assert _responses(td, tok) == [r["response"] for r in ROWS]
    assert td.report.samples == len(ROWS)


def test_load_json_list(tok, tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    assert _responses(_load(tok, path), tok) == [r["response"] for r in ROWS]


def test_load_parquet(tok, tmp_path):
    import datasets

    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    assert _responses(_load(tok, path), tok) == [r["response"] for r in ROWS]


def test_load_saved_dataset_directory(tok, tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    assert _responses(_load(tok, tmp_path / "saved"), tok) == [r["response"] for r in ROWS]


def test_load_saved_dataset_dict_selects_the_split(tok, tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:5]),
                               "test": datasets.Dataset.from_list(ROWS[5:8])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert _responses(_load(tok, tmp_path / "dd"), tok) == [r["response"] for r in ROWS[:5]]
    assert _responses(_load(tok, tmp_path / "dd", split="test"), tok) == [r["response"] for r in ROWS[5:8]]
    with pytest.raises(DataError) as info:
        _load(tok, tmp_path / "dd", split="validation")
    msg = str(info.value)
    assert str(tmp_path / "dd") in msg and "'validation'" in msg and "train" in msg and "test" in msg


def test_load_gzipped_json_lines(tok, tmp_path):
    import gzip

    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in ROWS))
    assert _responses(_load(tok, path), tok) == [r["response"] for r in ROWS]


def test_load_csv(tok, tmp_path):
    import datasets

    path = tmp_path / "d.csv"
    datasets.Dataset.from_list(ROWS).to_csv(str(path), index=False)
    assert _responses(_load(tok, path), tok) == [r["response"] for r in ROWS]


def test_load_a_directory_of_shards_takes_the_split_by_name(tok, tmp_path):
    """A hub snapshot on disk: data/train-0000x-of-00002.parquet beside data/test-...; hidden folders skipped."""
    import datasets

    data = tmp_path / "snap" / "data"
    data.mkdir(parents=True)
    datasets.Dataset.from_list(ROWS[:4]).to_parquet(str(data / "train-00000-of-00002.parquet"))
    datasets.Dataset.from_list(ROWS[4:9]).to_parquet(str(data / "train-00001-of-00002.parquet"))
    datasets.Dataset.from_list(ROWS[9:]).to_parquet(str(data / "test-00000-of-00001.parquet"))
    (tmp_path / "snap" / ".cache").mkdir()
    (tmp_path / "snap" / ".cache" / "x.parquet").write_text("not parquet")
    assert _responses(_load(tok, tmp_path / "snap"), tok) == [r["response"] for r in ROWS[:9]]
    assert _responses(_load(tok, tmp_path / "snap", split="test"), tok) == [r["response"] for r in ROWS[9:]]


def test_load_a_glob_of_json_lines_names_the_file_and_line_of_a_bad_row(tok, tmp_path):
    write_jsonl(tmp_path / "part-1.jsonl", ROWS[:6])
    write_jsonl(tmp_path / "part-2.jsonl", ROWS[6:])
    assert _responses(_load(tok, tmp_path / "part-*.jsonl"), tok) == [r["response"] for r in ROWS]
    bad = [dict(r) for r in ROWS[6:]]
    bad[2]["response"] = ""
    write_jsonl(tmp_path / "part-2.jsonl", bad)
    with pytest.raises(DataError, match=r"part-2\.jsonl:3: field 'response' is empty"):
        _load(tok, tmp_path / "part-*.jsonl")
    wrong = [dict(r) for r in ROWS[6:]]
    wrong[1]["response"] = 5
    write_jsonl(tmp_path / "part-2.jsonl", wrong)
    with pytest.raises(DataError, match=r"part-2\.jsonl:2: field 'response' must be str"):
        _load(tok, tmp_path / "part-*.jsonl")


def test_mixed_file_types_and_empty_patterns_are_named(tok, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "b.csv").write_text("prompt,response\na,b\n")
    with pytest.raises(DataError, match=r"mixes file types \(\.csv, \.jsonl\)"):
        _load(tok, tmp_path)
    with pytest.raises(DataError, match="matches no file"):
        _load(tok, tmp_path / "nothing-*.parquet")
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(DataError, match=r"unsupported type \(\.txt\).*expected a \.jsonl"):
        _load(tok, tmp_path / "*")


def test_directory_that_is_not_a_saved_dataset(tok, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a dataset saved with datasets.save_to_disk"):
        _load(tok, tmp_path / "empty")


def test_max_samples_keeps_the_first_rows(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    td = _load(tok, path, max_samples=5)
    assert td.report.samples == 5
    assert _responses(td, tok) == [r["response"] for r in ROWS[:5]]
    assert len(load_raw(DataConfig(source=str(path), max_samples=100), 0).dataset) == len(ROWS)


def test_numina_cot_preset_reads_problem_and_solution(tok, tmp_path):
    rows = [{"problem": r["prompt"], "solution": r["response"], "source": "synthetic",
             "messages": [{"role": "user", "content": r["prompt"]}]} for r in ROWS[:4]]
    path = write_jsonl(tmp_path / "numina.jsonl", rows)
    cfg = load_config(None, ["data.preset=numina_cot", f"data.source={path}", "data.template=plain"])
    assert (cfg.data.prompt_field, cfg.data.response_field, cfg.data.format) == ("problem", "solution",
                                                                                 "prompt_response")
    td = build_train_data(cfg.data, tok, seed=0)
    assert _responses(td, tok) == [r["solution"] for r in rows]
    # The prompt side is the problem text.
    ((ids, labels),) = td.rows.docs[0][:1]
    first_target = next(t for t, lab in enumerate(labels) if lab != IGNORE_INDEX) + 1
    assert tok.decode(ids[:first_target], skip_special_tokens=True) == rows[0]["problem"] + "\n"


def test_numina_cot_preset_on_plain_prompt_response_file_names_missing_field(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:2])
    cfg = load_config(None, ["data.preset=numina_cot", f"data.source={path}"])
    with pytest.raises(DataError, match=r"d\.jsonl:1: missing field 'problem'"):
        build_train_data(cfg.data, tok, seed=0)


# ---------------------------------------------------------------- bad input


def test_malformed_json_line_names_file_and_line(tok, tmp_path):
    path = tmp_path / "file.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"prompt": "x", "response": \n' + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(DataError) as info:
        _load(tok, path)
    assert "file.jsonl:3" in str(info.value) and "not valid JSON" in str(info.value)


def test_jsonl_line_that_is_not_an_object(tok, tmp_path):
    path = write_jsonl(tmp_path / "file.jsonl", [ROWS[0], "[1, 2]"])
    with pytest.raises(DataError, match=r"file\.jsonl:2: expected a JSON object per line, got list"):
        _load(tok, path)


def test_broken_json_document_names_file_and_line(tok, tmp_path):
    path = tmp_path / "doc.json"
    path.write_text('[\n  {"prompt": "a", "response": "b"},\n  {"prompt": "c" "response": "d"}\n]\n')
    with pytest.raises(DataError) as info:
        _load(tok, path)
    assert f"{path}:3" in str(info.value) and "not valid JSON" in str(info.value)


def test_missing_field_names_field_and_line(tok, tmp_path):
    rows = [ROWS[0], ROWS[1], {"prompt": "no answer here"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows, blank_after=(0,))
    with pytest.raises(DataError) as info:
        _load(tok, path)
    msg = str(info.value)
    assert f"{path}:4" in msg and "missing field 'response'" in msg


def test_wrong_field_type_names_field_and_line(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1?", "response": 2}, {"prompt": "2+2?", "response": 4}])
    with pytest.raises(DataError) as info:
        _load(tok, path)
    msg = str(info.value)
    assert f"{path}:1" in msg and "field 'response' must be str or a list of messages, got int" in msg


def test_wrong_field_type_in_json_list_names_row(tok, tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([ROWS[0], {"prompt": "2+2?", "response": 4}]))
    with pytest.raises(DataError) as info:
        _load(tok, path)
    msg = str(info.value)
    assert str(path) in msg and "row 1" in msg and "field 'response' must be str" in msg


def test_wrong_field_type_in_one_row_of_many_names_field_and_line(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], ROWS[1], {"prompt": "2+2?", "response": 4}])
    with pytest.raises(DataError) as info:
        _load(tok, path)
    msg = str(info.value)
    assert f"{path}:3" in msg and "field 'response' must be str or a list of messages, got int" in msg


def test_wrong_field_type_in_jsonl_with_blank_line_names_field_and_line(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], ROWS[1], {"prompt": "2+2?", "response": 4}],
                       blank_after=(0,))
    with pytest.raises(DataError) as info:
        _load(tok, path)
    msg = str(info.value)
    assert f"{path}:4" in msg and "response" in msg


@pytest.mark.parametrize("response", ["", "   \n"])
def test_empty_response_names_field_and_line(tok, tmp_path, response):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"prompt": "p", "response": response}])
    with pytest.raises(DataError) as info:
        _load(tok, path)
    msg = str(info.value)
    assert f"{path}:2" in msg and "field 'response' is empty" in msg


def test_everything_filtered_out_is_an_error(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:3])
    with pytest.raises(DataError) as info:
        _load(tok, path, max_length=8, overlong="drop")
    msg = str(info.value)
    assert str(path) in msg and "no samples left" in msg and "dropped 3 over max_length" in msg


@pytest.mark.parametrize("source", ["/nonexistent/dir/train.jsonl", "no_such_file.parquet", "./no_such_dir"])
def test_nonexistent_source_is_an_error(tok, tmp_path, source, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        _load(tok, source)


def test_unsupported_file_type(tok, tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("prompt,response\na,b\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt' \(expected a \.jsonl, \.json, \.jsonl\.gz"):
        _load(tok, path)


def test_empty_jsonl_is_an_error(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="holds no samples"):
        _load(tok, path)


# ---------------------------------------------------------------- over-length policy


def _length_rows(tok):
    rows = examples(30, seed=7)
    lengths = [full_length(tok, r["prompt"], r["response"]) for r in rows]
    ordered = sorted(set(lengths))
    max_length = ordered[len(ordered) // 2]
    longest_prompt = max(len(tok(r["prompt"] + "\n")["input_ids"]) for r in rows)
    assert longest_prompt + 1 < max_length  # every sample keeps a target after truncation
    long = [n > max_length for n in lengths]
    assert 0 < sum(long) < len(rows)
    return rows, lengths, long, max_length


def test_truncate_counts_and_cuts_long_samples_to_max_length(tok, tmp_path):
    rows, lengths, long, max_length = _length_rows(tok)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    full = build_train_data(DataConfig(source=str(path), template="plain", max_length=10_000, packing=False),
                            tok, seed=0)
    td = build_train_data(DataConfig(source=str(path), template="plain", max_length=max_length,
                                     overlong="truncate", packing=False), tok, seed=0)
    assert td.report.truncated == sum(long)
    assert td.report.dropped_overlong == 0 and td.report.dropped_no_target == 0
    assert len(td.rows) == len(rows)
    for n, is_long, (cut,), (whole,) in zip(lengths, long, td.rows.docs, full.rows.docs):
        assert len(whole[0]) == n
        if is_long:
            assert len(cut[0]) == max_length
            assert cut[0] == whole[0][:max_length] and cut[1] == whole[1][:max_length]
            assert cut[1][-1] == whole[0][max_length]  # the last kept position still predicts the next token
        else:
            assert cut == whole


def test_drop_removes_long_samples_and_counts_them(tok, tmp_path):
    rows, lengths, long, max_length = _length_rows(tok)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    td = build_train_data(DataConfig(source=str(path), template="plain", max_length=max_length,
                                     overlong="drop", packing=False), tok, seed=0)
    assert td.report.dropped_overlong == sum(long) and td.report.truncated == 0
    assert _responses(td, tok) == [r["response"] for r, is_long in zip(rows, long) if not is_long]
    assert all(len(ids) <= max_length for ((ids, _),) in td.rows.docs)


def test_prompt_longer_than_max_length_is_dropped_as_no_target(tok, tmp_path):
    rows = [ROWS[0], {"prompt": " ".join(["word"] * 80), "response": "short"}, ROWS[1]]
    max_length = max(full_length(tok, r["prompt"], r["response"]) for r in (ROWS[0], ROWS[1]))
    assert len(tok(rows[1]["prompt"])["input_ids"]) > max_length
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    td = build_train_data(DataConfig(source=str(path), template="plain", max_length=max_length,
                                     overlong="truncate", packing=False), tok, seed=0)
    assert td.report.dropped_no_target == 1
    assert _responses(td, tok) == [ROWS[0]["response"], ROWS[1]["response"]]


# ---------------------------------------------------------------- packing and collate


def _docs(lengths: list[int], start: int = 10):
    ids = [[1] + [start + i + j for j in range(n - 1)] for i, n in enumerate(lengths)]
    labels = [shift_labels(d, [False] + [True] * (len(d) - 1)) for d in ids]
    return ids, labels


def test_build_rows_packs_in_order_without_exceeding_max_length():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 33, (60,), generator=gen).tolist()
    ids, labels = _docs(lengths)
    rows = build_rows(from_lists(ids, labels), None, max_length=32, packing=True)
    assert all(sum(len(d) for d, _ in row) <= 32 for row in rows.docs)
    flat = [doc for row in rows.docs for doc in row]
    assert flat == list(zip(ids, labels))  # every document exactly once, in order
    # Greedy: the first document of each row would not have fitted into the row before it.
    for prev, row in zip(rows.docs, rows.docs[1:]):
        assert sum(len(d) for d, _ in prev) + len(row[0][0]) > 32
    assert len(rows) < len(lengths)


def test_build_rows_without_packing_is_one_document_per_row():
    ids, labels = _docs([5, 3, 7])
    rows = build_rows(from_lists(ids, labels), None, max_length=32, packing=False)
    assert rows.docs == [[(i, lab)] for i, lab in zip(ids, labels)]


def test_collate_restarts_positions_and_pads():
    ids, labels = _docs([3, 4, 2, 5])
    rows = [[(ids[0], labels[0]), (ids[1], labels[1])], [(ids[2], labels[2])], [(ids[3], labels[3])]]
    batch = collate(rows, pad_id=3)
    assert batch["input_ids"].shape == (3, 7) and batch["input_ids"].dtype == torch.long
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 0, 1]]
    assert batch["input_ids"][0].tolist() == ids[0] + ids[1]
    assert batch["input_ids"][1].tolist() == ids[2] + [3] * 5
    assert batch["labels"][1].tolist() == labels[2] + [IGNORE_INDEX] * 5
    assert batch["labels"][2].tolist() == labels[3] + [IGNORE_INDEX] * 2
    assert batch["labels"][0].tolist() == labels[0] + labels[1]
    # The last position of each document predicts nothing: no document predicts the next one's BOS.
    assert batch["labels"][0, 2].item() == IGNORE_INDEX


def test_train_data_batch_counts_real_tokens(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:6])
    td = build_train_data(DataConfig(source=str(path), template="plain", max_length=400, packing=True), tok, seed=0)
    assert sum(len(row) for row in td.rows.docs) == 6 and len(td.rows) < 6
    batch = td.batch(list(range(len(td.rows))))
    assert batch["n_tokens"] == td.report.tokens == sum(len(d) for row in td.rows.docs for d, _ in row)
    assert batch["n_tokens"] == int((batch["input_ids"] != td.pad_id).sum())
    assert td.report.rows == len(td.rows)


# ---------------------------------------------------------------- packing isolation on a real model


@pytest.fixture(scope="module")
def models(tok):
    from transformers import AutoModelForCausalLM

    built = {}
    for impl in ("sdpa", "eager"):
        torch.manual_seed(1234)
        model = AutoModelForCausalLM.from_config(
            synthetic.tiny_model_config(len(tok), num_hidden_layers=2), attn_implementation=impl)
        built[impl] = model.float().eval()
    return built


def _forward(model, input_ids, position_ids):
    # As Engine.forward: input_ids and position_ids, no attention_mask, no cache. (With a cache,
    # which eval mode would create by default, transformers skips the packed-sequence detection.)
    with torch.no_grad():
        return model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def _alone(model, ids):
    return _forward(model, torch.tensor([ids]), torch.arange(len(ids))[None])[0]


@pytest.fixture(scope="module")
def three_docs(tok):
    rows = [{"prompt": "What is 2+3?", "response": "5"}, *examples(2, seed=11)]
    import datasets

    cfg = DataConfig(template="plain", max_length=1000)
    raw = RawData(datasets.Dataset.from_list(rows), "mem")
    ids, labels, _ = tokenize_dataset(raw, cfg, tok)
    assert len({len(i) for i in ids}) == 3
    return ids, labels


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_documents_do_not_see_each_other(models, three_docs, impl):
    model = models[impl]
    assert model.config._attn_implementation == impl
    ids, labels = three_docs
    rows = build_rows(from_lists(ids, labels), None, max_length=sum(map(len, ids)), packing=True)
    assert len(rows) == 1 and len(rows.docs[0]) == 3
    batch = collate(rows.docs, pad_id=3)
    packed = _forward(model, batch["input_ids"], batch["position_ids"])[0]
    offset = 0
    for doc in ids:
        alone = _alone(model, doc)
        diff = (packed[offset:offset + len(doc)] - alone).abs().max().item()
        assert diff < 1e-4, f"document at {offset} differs by {diff}"
        offset += len(doc)

    # Negative control: without position restarts the 2nd document attends to the 1st.
    continuous = _forward(model, batch["input_ids"], torch.arange(batch["input_ids"].shape[1])[None])[0]
    n0, n1 = len(ids[0]), len(ids[1])
    diff = (continuous[n0:n0 + n1] - _alone(model, ids[1])).abs().max().item()
    assert diff > 1e-3


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_padded_batch_of_rows_matches_each_row_alone(models, three_docs, impl):
    model = models[impl]
    ids, labels = three_docs
    rows = build_rows(from_lists(ids[1:], labels[1:]), None, max_length=1000, packing=False)
    batch = collate(rows.docs, pad_id=3)
    assert batch["input_ids"].shape[0] == 2 and len(ids[1]) != len(ids[2])
    logits = _forward(model, batch["input_ids"], batch["position_ids"])
    for b, doc in enumerate(ids[1:]):
        diff = (logits[b, :len(doc)] - _alone(model, doc)).abs().max().item()
        assert diff < 1e-4


# ---------------------------------------------------------------- StepSampler


def _step_indices(num_rows: int, plan: BatchSplit, seed: int, step: int) -> list[list[list[int]]]:
    """Per rank, the micro-batches of `step`."""
    return [StepSampler(num_rows, plan, rank, seed).indices_for_step(step) for rank in range(plan.world_size)]


def test_sampler_is_deterministic_per_seed():
    plan = BatchSplit(2, 2, 1)
    a = [StepSampler(40, plan, 0, seed=5).indices_for_step(s) for s in range(6)]
    b = [StepSampler(40, plan, 0, seed=5).indices_for_step(s) for s in range(6)]
    c = [StepSampler(40, plan, 0, seed=6).indices_for_step(s) for s in range(6)]
    assert a == b
    assert a != c
    assert all(len(step) == 2 and all(len(mb) == 2 for mb in step) for step in a)


def test_sampler_uses_each_row_at_most_once_per_epoch():
    plan = BatchSplit(micro_batch_size=2, gradient_accumulation_steps=1, world_size=2)
    sampler = StepSampler(23, plan, 0, seed=0)
    assert sampler.steps_per_epoch == 5
    seen = []
    for step in range(sampler.steps_per_epoch):
        for rank in _step_indices(23, plan, 0, step):
            for mb in rank:
                seen += mb
    assert len(seen) == 20 and len(set(seen)) == 20 and set(seen) <= set(range(23))


@pytest.mark.parametrize("step", [0, 1, 4, 7])
def test_step_set_does_not_depend_on_the_split(step):
    plans = [BatchSplit(1, 4, 1), BatchSplit(1, 2, 2), BatchSplit(1, 1, 4), BatchSplit(2, 1, 2)]
    sets = []
    for plan in plans:
        assert plan.global_batch_size == 4
        per_rank = _step_indices(18, plan, 3, step)
        assert len(per_rank) == plan.world_size
        assert all(len(r) == plan.gradient_accumulation_steps for r in per_rank)
        assert all(len(mb) == plan.micro_batch_size for r in per_rank for mb in r)
        flat = [i for r in per_rank for mb in r for i in mb]
        assert len(flat) == 4 == len(set(flat))
        sets.append(set(flat))
    assert all(s == sets[0] for s in sets)
    # ... and neighbouring steps take other rows.
    assert set(i for r in _step_indices(18, plans[0], 3, step + 1) for mb in r for i in mb) != sets[0]


def test_sampler_resume_continues_with_the_same_indices():
    plan = BatchSplit(1, 2, 2)
    first = StepSampler(30, plan, 1, seed=9)
    it = iter(first)
    for _ in range(5):
        next(it)
    state = first.state_dict()
    assert state["step"] == 5
    resumed = StepSampler(30, plan, 1, seed=9)
    resumed.load_state_dict(state)
    rest = iter(resumed)
    for _ in range(12):  # crosses the epoch boundary (7 steps per epoch)
        assert next(rest) == next(it)


def test_sampler_resume_on_another_world_size_keeps_the_step_set():
    old = StepSampler(30, BatchSplit(1, 4, 1), 0, seed=9)
    it = iter(old)
    for _ in range(3):
        next(it)
    expected = {i for mb in next(it) for i in mb}
    new_plan = BatchSplit(1, 2, 2)
    got = set()
    for rank in range(2):
        s = StepSampler(30, new_plan, rank, seed=9)
        s.load_state_dict({**old.state_dict(), "step": 3})
        got |= {i for mb in next(iter(s)) for i in mb}
    assert got == expected


def test_sampler_state_from_another_global_batch_or_seed_is_rejected():
    state = StepSampler(30, BatchSplit(1, 4, 1), 0, seed=9).state_dict()
    with pytest.raises(DataError, match="global batch"):
        StepSampler(30, BatchSplit(1, 2, 1), 0, seed=9).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        StepSampler(30, BatchSplit(1, 4, 1), 0, seed=10).load_state_dict(state)


def test_fewer_rows_than_one_global_batch_is_an_error():
    with pytest.raises(DataError, match="3 rows, fewer than one global batch of 4"):
        StepSampler(3, BatchSplit(1, 2, 2), 0, seed=0)
    assert StepSampler(4, BatchSplit(1, 2, 2), 0, seed=0).steps_per_epoch == 1


def test_epochs_reshuffle():
    plan = BatchSplit(2, 1, 1)
    sampler = StepSampler(10, plan, 0, seed=0)
    order = [i for s in range(10) for mb in sampler.indices_for_step(s) for i in mb]
    epoch0, epoch1 = order[:10], order[10:]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))
    assert epoch0 != epoch1


# ---------------------------------------------------------------- train.sequence_parallel: slices of a row


def test_shard_rows_pads_slices_and_keeps_every_target():
    from dft_ds.data import collate, shard_rows
    from dft_ds.loss import IGNORE_INDEX

    # Two rows of packed documents (labels already shifted: the last token of a document has none).
    rows = [[([1, 2, 3, 4, 5], [2, 3, 4, 5, IGNORE_INDEX]), ([6, 7, 8], [7, 8, IGNORE_INDEX])],
            [([9, 10, 11, 12, 13, 14, 15], [IGNORE_INDEX, IGNORE_INDEX, 12, 13, 14, 15, IGNORE_INDEX])]]
    batch = collate(rows, pad_id=0)
    batch["n_tokens"] = 15
    assert batch["input_ids"].shape[1] == 8
    for parts in (1, 2, 3):
        slices = [shard_rows(batch, r, parts, pad_id=0) for r in range(parts)]
        width = slices[0]["input_ids"].shape[1]
        assert all(s["input_ids"].shape[1] == width for s in slices) and width * parts >= 8
        whole = {k: torch.cat([s[k] for s in slices], dim=1) for k in ("input_ids", "labels", "position_ids")}
        # The slices are the row, padded at its end by a document of its own with no target.
        for k in whole:
            assert torch.equal(whole[k][:, :8], batch[k]), k
        assert (whole["labels"][:, 8:] == IGNORE_INDEX).all() and (whole["input_ids"][:, 8:] == 0).all()
        if whole["position_ids"].shape[1] > 8:
            assert (whole["position_ids"][:, 8] == 0).all()
        # Every target once, the token counted once (on slice 0).
        assert sum(int((s["labels"] != IGNORE_INDEX).sum()) for s in slices) == int((batch["labels"] != IGNORE_INDEX).sum())
        assert [s["n_tokens"] for s in slices] == [15] + [0] * (parts - 1)
    # A document cut by the boundary keeps its target across it: slice 0 of 2 ends with token 4, whose label is 5.
    first = shard_rows(batch, 0, 2, pad_id=0)
    assert first["input_ids"][0].tolist() == [1, 2, 3, 4] and first["labels"][0].tolist() == [2, 3, 4, 5]
