"""Benchmark readers: the published layouts, field mappings, the built-in synthetic splits, errors
that name file:line, and shard slicing."""

from __future__ import annotations

import json

import pytest

from dft_ds import synthetic
from dft_ds.errors import DataError, UserError
from dft_ds.eval.benchmarks import (
    GENERIC,
    LAYOUTS,
    BenchmarkSpec,
    answer_text,
    layout_for,
    load_benchmark,
    parse_benchmark_arg,
    parse_field_args,
    parse_shard,
    read_problems,
    shard_indices,
)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def load(name, path, **kw):
    return load_benchmark(BenchmarkSpec(name, str(path)), **kw)


# ---------------------------------------------------------------- published layouts


def test_math500_layout(tmp_path):
    f = write_jsonl(tmp_path / "math500.jsonl", [
        {"problem": "What is $1+1$?", "solution": "... \\boxed{2}", "answer": "2", "subject": "Algebra",
         "level": 1, "unique_id": "test/algebra/1.json"},
        {"problem": "Simplify $\\frac{2}{4}$.", "answer": "\\frac{1}{2}", "unique_id": "test/algebra/2.json"},
    ])
    bench = load("math500", f)
    assert bench.total == 2 and bench.source == f
    p0, p1 = bench.problems
    assert (p0.benchmark, p0.index, p0.id, p0.problem, p0.gold) == (
        "math500", 0, "test/algebra/1.json", "What is $1+1$?", "2")
    assert p1.gold == "\\frac{1}{2}" and p1.index == 1


def test_minerva_answer_comes_from_the_solution_box(tmp_path):
    f = write_jsonl(tmp_path / "minerva.jsonl", [
        {"problem": "Find the speed.", "solution": "We get $v = \\boxed{3 \\times 10^{8}}$ m/s.", "type": "Physics",
         "idx": 0},
        {"problem": "Nested?", "solution": "First \\boxed{1}, finally \\boxed{\\frac{1}{2}}.", "idx": 7},
    ])
    golds = [(p.id, p.gold) for p in load("minerva_math", f).problems]
    assert golds == [("0", "3 \\times 10^{8}"), ("7", "\\frac{1}{2}")]


def test_minerva_without_a_box_names_the_line(tmp_path):
    f = write_jsonl(tmp_path / "minerva.jsonl", [
        {"problem": "a", "solution": "\\boxed{1}"}, {"problem": "b", "solution": "no box here"}])
    with pytest.raises(DataError, match=r"minerva\.jsonl:2: no \\boxed\{\.\.\.\} answer in field 'solution'"):
        load("minerva_math", f)


def test_olympiadbench_lists_are_joined_and_dollars_dropped(tmp_path):
    f = write_jsonl(tmp_path / "ob.jsonl", [
        {"id": 1606, "question": "Find x.", "solution": ["x = 5"], "final_answer": ["$5$"],
         "is_multiple_answer": False, "unit": None, "answer_type": "Numerical"},
        {"id": 1607, "question": "Find all x.", "final_answer": ["$-1$", "$\\frac{1}{2}$"], "is_multiple_answer": True},
    ])
    assert [(p.id, p.problem, p.gold) for p in load("olympiadbench", f).problems] == [
        ("1606", "Find x.", "5"), ("1607", "Find all x.", "-1, \\frac{1}{2}")]


def test_aime24_numbers_and_both_capitalisations(tmp_path):
    lower = write_jsonl(tmp_path / "a.jsonl", [{"id": 60, "problem": "P1", "answer": 204, "url": "u", "year": 2024}])
    upper = write_jsonl(tmp_path / "b.jsonl", [{"ID": "2024-I-1", "Problem": "P1", "Solution": "s", "Answer": 204}])
    assert [(p.id, p.gold) for p in load("aime24", lower).problems] == [("60", "204")]
    assert [(p.id, p.gold) for p in load("aime24", upper).problems] == [("2024-I-1", "204")]


def test_amc23_floats_lose_their_point_zero(tmp_path):
    f = write_jsonl(tmp_path / "amc.jsonl", [
        {"id": 0, "question": "Q0", "answer": 27.0}, {"id": 1, "question": "Q1", "answer": 0.5},
        {"id": 2, "problem": "Q2", "answer": "36"}])
    assert [p.gold for p in load("amc23", f).problems] == ["27", "0.5", "36"]
    assert [p.problem for p in load("amc23", f).problems] == ["Q0", "Q1", "Q2"]


@pytest.mark.parametrize("value, text", [
    (27, "27"), (27.0, "27"), (-3.0, "-3"), (0.25, "0.25"), ("  $\\sqrt{2}$ ", "\\sqrt{2}"), ("$$", None),
    (["3", 5], "3, 5"), (True, None), (None, None), ("", None), ([], None), (float("nan"), None), ({"a": 1}, None)])
def test_answer_text(value, text):
    assert answer_text(value) == text


# ---------------------------------------------------------------- file formats


def test_json_array_and_parquet_read_like_jsonl(tmp_path):
    rows = [{"problem": f"P{i}", "answer": i} for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    jsonl = load("math500", write_jsonl(tmp_path / "a.jsonl", rows)).problems
    assert load("math500", tmp_path / "a.json").problems == jsonl
    assert load("math500", tmp_path / "a.parquet").problems == jsonl


def test_json_array_errors_name_the_line_of_the_object(tmp_path):
    rows = [{"problem": "P0", "answer": 1}, {"question": "wrong field", "answer": 2}]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.json:6: no problem field \(expected 'problem'; the row has "
                                        r"'question', 'answer'\)"):
        load("math500", tmp_path / "a.json")


def test_malformed_line_is_reported_with_its_number(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text('{"problem": "a", "answer": "1"}\n\n{"problem": "b", "answer": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"m\.jsonl:3: not valid JSON"):
        load("math500", f)


@pytest.mark.parametrize("row, message", [
    ({"problem": "", "answer": "1"}, r"field 'problem' must be a non-empty string"),
    ({"problem": 3, "answer": "1"}, r"field 'problem' must be a non-empty string, got int 3"),
    ({"problem": "p", "answer": {"x": 1}}, r"field 'answer' must be a non-empty string, a number or a list"),
    ({"problem": "p"}, r"no answer field \(expected 'answer'; the row has 'problem'\); map it with --field"),
    ([1, 2], r"expected a JSON object per line, got list"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, row, message):
    f = write_jsonl(tmp_path / "b.jsonl", [{"problem": "ok", "answer": "1"}, row])
    with pytest.raises(DataError, match=r"b\.jsonl:2: " + message):
        load("math500", f)


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load("math500", tmp_path / "absent.jsonl")
    (tmp_path / "x.csv").write_text("problem,answer\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"unsupported file type; expected one of \.jsonl, \.json, \.parquet"):
        load("math500", tmp_path / "x.csv")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no problems"):
        load("math500", tmp_path / "empty.jsonl")
    (tmp_path / "doc.json").write_text('{\n"problem": "a"\n}\n', encoding="utf-8")
    with pytest.raises(DataError, match="expected a JSON array of objects or one JSON object per line"):
        load("math500", tmp_path / "doc.json")
    (tmp_path / "bad.parquet").write_text("not parquet", encoding="utf-8")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load("math500", tmp_path / "bad.parquet")


def test_a_published_benchmark_without_a_path_says_which_file_to_provide():
    with pytest.raises(UserError, match=r"--benchmark aime24: no file given\. dft-eval downloads nothing: pass "
                                        r"aime24=PATH .*AIME 2024"):
        load_benchmark(BenchmarkSpec("aime24"))
    with pytest.raises(UserError, match=r"unknown benchmark with no file\. Known names: math500, .*synthetic-ood"):
        load_benchmark(BenchmarkSpec("gsm8k"))


# ---------------------------------------------------------------- field mapping and custom files


def test_custom_file_with_the_generic_layout(tmp_path):
    f = write_jsonl(tmp_path / "mine.jsonl", [{"question": "Q", "final_answer": 4, "idx": "q1"},
                                             {"input": "R", "output": "so \\boxed{5}"}])
    assert [(p.benchmark, p.id, p.problem, p.gold) for p in load("mine", f).problems] == [
        ("mine", "q1", "Q", "4"), ("mine", "1", "R", "5")]


def test_field_mapping_global_and_per_benchmark(tmp_path):
    f = write_jsonl(tmp_path / "odd.jsonl", [{"text": "Q", "label": 7, "sol": "\\boxed{8}", "key": "k0"}])
    fields = parse_field_args(["problem=text", "answer=label", "id=key"])
    assert [(p.id, p.problem, p.gold) for p in load("odd", f, fields=fields).problems] == [("k0", "Q", "7")]
    # A named mapping wins over the global one, for that benchmark only; solution replaces answer.
    fields = parse_field_args(["problem=text", "answer=label", "odd:solution=sol"])
    assert load("odd", f, fields=fields).problems[0].gold == "8"
    assert layout_for("other", fields).answer == ("label",)
    # The published layouts accept overrides too.
    assert layout_for("math500", parse_field_args(["problem=q"])).problem == ("q",)
    assert layout_for("nope", {}) == GENERIC and layout_for("amc23", {}) == LAYOUTS["amc23"]


def test_mapped_field_missing_names_the_mapping(tmp_path):
    f = write_jsonl(tmp_path / "odd.jsonl", [{"text": "Q", "label": 7}])
    with pytest.raises(DataError, match=r"odd\.jsonl:1: no answer field \(expected 'gold'; the row has 'text', "
                                        r"'label'\)"):
        load("odd", f, fields=parse_field_args(["problem=text", "answer=gold"]))


@pytest.mark.parametrize("bad", ["problem", "problem=", "question=q", ":answer=a", "x:y=z"])
def test_bad_field_arguments(bad):
    with pytest.raises(UserError, match="expected \\[BENCHMARK:\\]ROLE=KEY"):
        parse_field_args([bad])


def test_benchmark_argument_parsing():
    assert parse_benchmark_arg("synthetic") == BenchmarkSpec("synthetic", None)
    assert parse_benchmark_arg("math500=data/a=b.jsonl") == BenchmarkSpec("math500", "data/a=b.jsonl")
    for bad in ("=x.jsonl", "a b=x", "math500="):
        with pytest.raises(UserError):
            parse_benchmark_arg(bad)


# ---------------------------------------------------------------- built-in synthetic and --limit


def test_synthetic_is_the_test_split_and_needs_no_path():
    bench = load_benchmark(BenchmarkSpec("synthetic"), limit=5)
    expected = synthetic.generate_examples(5, 0, "test")
    assert [(p.problem, p.gold) for p in bench.problems] == [(e["prompt"], e["answer"]) for e in expected]
    ood = load_benchmark(BenchmarkSpec("synthetic-ood"), limit=3)
    assert [p.problem for p in ood.problems] == [e["prompt"] for e in synthetic.generate_examples(3, 0, "ood")]
    with pytest.raises(UserError, match="built in and takes no path"):
        load_benchmark(BenchmarkSpec("synthetic", "x.jsonl"))


def test_limit_keeps_the_first_problems_and_the_fingerprint_follows_content(tmp_path):
    rows = [{"problem": f"P{i}", "answer": i} for i in range(5)]
    f = write_jsonl(tmp_path / "a.jsonl", rows)
    assert [p.problem for p in load("math500", f, limit=2).problems] == ["P0", "P1"]
    assert load("math500", f, limit=2).fingerprint != load("math500", f).fingerprint
    assert load("math500", f).fingerprint == load("math500", f).fingerprint
    rows[4]["answer"] = 99
    assert load("math500", write_jsonl(tmp_path / "b.jsonl", rows)).fingerprint != load("math500", f).fingerprint
    # A bad row past the limit is never read.
    (tmp_path / "c.jsonl").write_text(json.dumps(rows[0]) + "\n{broken\n", encoding="utf-8")
    assert len(read_problems(str(tmp_path / "c.jsonl"), "c", GENERIC, limit=1)) == 1


# ---------------------------------------------------------------- shards


@pytest.mark.parametrize("total", [0, 1, 7, 10, 503])
@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_shards_are_disjoint_and_cover_every_problem(total, count):
    slices = [shard_indices(total, (i, count)) for i in range(count)]
    flat = [i for s in slices for i in s]
    assert sorted(flat) == list(range(total)) == shard_indices(total, None)
    assert len(flat) == len(set(flat))
    assert max(map(len, slices)) - min(map(len, slices)) <= 1  # balanced
    assert slices == [shard_indices(total, (i, count)) for i in range(count)]  # deterministic


def test_load_benchmark_shard_keeps_global_indices_and_whole_fingerprint(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"problem": f"P{i}", "answer": i} for i in range(5)])
    whole = load("math500", f)
    parts = [load("math500", f, shard=(i, 2)) for i in range(2)]
    assert [p.index for p in parts[0].problems] == [0, 2, 4] and [p.index for p in parts[1].problems] == [1, 3]
    assert all(p.total == 5 and p.fingerprint == whole.fingerprint for p in parts)
    assert sorted([*parts[0].problems, *parts[1].problems], key=lambda p: p.index) == whole.problems


@pytest.mark.parametrize("text, shard", [("0/4", (0, 4)), (" 3 / 4 ", (3, 4)), ("0/1", (0, 1))])
def test_parse_shard(text, shard):
    assert parse_shard(text) == shard


@pytest.mark.parametrize("bad", ["4/4", "1", "-1/2", "a/b", "0/0", "1/2/3"])
def test_parse_shard_rejects(bad):
    with pytest.raises(UserError, match="expected i/n with 0 <= i < n"):
        parse_shard(bad)
