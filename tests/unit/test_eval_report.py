"""Outputs from per-problem records: results recomputed from samples, the Markdown table, the PNG,
the refusal to touch a non-empty --out, merge of shards (== the unsharded outputs, and every way a
set of shards can be wrong), and compare."""

from __future__ import annotations

import json
import random

import pytest

from dft_ds.errors import UserError
from dft_ds.eval import cli
from dft_ds.eval.benchmarks import shard_indices
from dft_ds.eval.report import (
    PLOT_FILE,
    RESULTS_FILE,
    SAMPLES_FILE,
    TABLE_FILE,
    build_results,
    compare_runs,
    load_run,
    merge_runs,
    write_run,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_settings(sizes=(("alpha", 5), ("beta", 3)), samples=3, **changes) -> dict:
    settings = {
        "model": "/models/tiny", "samples": samples, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 32,
        "seed": 0, "prompt": "boxed", "prompt_role": "system", "backend": "hf", "dtype": "auto", "limit": None,
        "grade_timeout_s": 5.0,
        "benchmarks": [{"name": n, "source": f"{n}.jsonl", "problems": p, "fingerprint": n * 8} for n, p in sizes],
    }
    settings.update(changes)
    return settings


def make_records(settings: dict, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for bench in settings["benchmarks"]:
        for index in range(bench["problems"]):
            gens = []
            for k in range(settings["samples"]):
                ok = rng.random() < 0.4
                extracted = None if rng.random() < 0.2 else ("7" if ok else "8")
                gens.append({"sample": k, "text": f"... \\boxed{{{extracted}}}", "extracted": extracted,
                             "correct": ok and extracted is not None, "finished": rng.random() < 0.8, "tokens": 9})
            records.append({"benchmark": bench["name"], "index": index, "id": str(index), "problem": f"P{index}",
                            "gold": "7", "prompt": f"P{index}\n", "generations": gens,
                            "correct": sum(g["correct"] for g in gens)})
    return records


def write_shards(tmp_path, settings, records, count, shuffle=True) -> list[str]:
    dirs = []
    for i in range(count):
        keep = {b["name"]: set(shard_indices(b["problems"], (i, count))) for b in settings["benchmarks"]}
        part = [r for r in records if r["index"] in keep[r["benchmark"]]]
        if shuffle:
            random.Random(i).shuffle(part)
        out = tmp_path / f"shard-{i}"
        write_run(out, settings, part, (i, count), {"seconds": 1.5, "device": "cpu"})
        dirs.append(str(out))
    return dirs


def strip_runtime(results: dict) -> dict:
    return {k: v for k, v in results.items() if k != "runtime"}


# ---------------------------------------------------------------- a run's outputs


def test_outputs_are_written_and_consistent(tmp_path):
    settings = make_settings()
    records = make_records(settings)
    results = write_run(tmp_path / "out", settings, records[::-1], None, {"seconds": 1.0})
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted([SAMPLES_FILE, RESULTS_FILE, TABLE_FILE, PLOT_FILE])
    assert json.loads((out / RESULTS_FILE).read_text()) == results
    assert (out / PLOT_FILE).read_bytes()[:8] == PNG_MAGIC
    lines = [json.loads(x) for x in (out / SAMPLES_FILE).read_text().splitlines()]
    assert [(r["benchmark"], r["index"]) for r in lines] == [(r["benchmark"], r["index"]) for r in records]  # sorted
    # The metrics follow from the samples alone.
    for bench in settings["benchmarks"]:
        rows = [r for r in lines if r["benchmark"] == bench["name"]]
        k = settings["samples"]
        m = results["benchmarks"][bench["name"]]
        assert m["avg_at_k"] == pytest.approx(sum(r["correct"] / k for r in rows) / len(rows))
        assert m["pass_at_k"] == pytest.approx(sum(r["correct"] > 0 for r in rows) / len(rows))
        assert m["problems"] == len(rows) == bench["problems"]
        assert m["no_answer"] == sum(g["extracted"] is None for r in rows for g in r["generations"])
    names = results["benchmarks"]
    assert results["mean"]["avg_at_k"] == pytest.approx(sum(m["avg_at_k"] for m in names.values()) / 2)
    table = (out / TABLE_FILE).read_text()
    assert "| benchmark | problems | Avg@3 | pass@3 |" in table
    assert f"| alpha | 5 | {100 * names['alpha']['avg_at_k']:.1f} | {100 * names['alpha']['pass_at_k']:.1f} |" in table
    assert "| **mean** | 8 |" in table and "instruction as system message" in table


def test_a_non_empty_out_is_refused_and_left_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not empty"):
        write_run(out, make_settings(), make_records(make_settings()), None, {})
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    write_run(empty, make_settings(), make_records(make_settings()), None, {})  # an empty directory is fine
    assert (empty / RESULTS_FILE).is_file()


def test_an_empty_shard_has_no_rates(tmp_path):
    settings = make_settings(sizes=(("alpha", 1),))
    results = build_results(settings, [], (1, 2), {})
    assert results["benchmarks"]["alpha"]["avg_at_k"] is None and results["mean"]["avg_at_k"] is None
    write_run(tmp_path / "o", settings, [], (1, 2), {})  # the table and chart cope with it
    assert "| alpha | 0 | — | — |" in (tmp_path / "o" / TABLE_FILE).read_text()


# ---------------------------------------------------------------- merge


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_merged_shards_equal_the_unsharded_run(tmp_path, count):
    settings = make_settings()
    records = make_records(settings)
    whole = write_run(tmp_path / "whole", settings, records, None, {"seconds": 3.0})
    shards = write_shards(tmp_path, settings, records, count)
    merged = merge_runs(shards[::-1], str(tmp_path / "merged"))
    assert strip_runtime(merged) == strip_runtime(whole)
    assert merged["runtime"]["seconds"] == pytest.approx(1.5 * count) and len(merged["runtime"]["shards"]) == count
    for name in (SAMPLES_FILE, TABLE_FILE):
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert (tmp_path / "merged" / PLOT_FILE).read_bytes()[:8] == PNG_MAGIC


def test_merge_refuses_missing_duplicate_or_foreign_shards(tmp_path):
    settings = make_settings()
    records = make_records(settings)
    shards = write_shards(tmp_path, settings, records, 3)
    with pytest.raises(UserError, match="merge: shard 1/3 missing"):
        merge_runs([shards[0], shards[2]], str(tmp_path / "m1"))
    with pytest.raises(UserError, match="are both shard 0/3"):
        merge_runs([shards[0], shards[0], shards[1], shards[2]], str(tmp_path / "m2"))
    other = write_run(tmp_path / "other", make_settings(temperature=0.7), records[:3], (1, 3), {})
    assert other["shard"] == {"index": 1, "count": 3}
    with pytest.raises(UserError, match=r"not the same evaluation as .*temperature: 1.0 != 0.7"):
        merge_runs([shards[0], str(tmp_path / "other"), shards[2]], str(tmp_path / "m3"))
    two = write_shards(tmp_path / "two", settings, records, 2)
    with pytest.raises(UserError, match="shard 1/2, but .* is one of 3"):
        merge_runs([shards[0], two[1]], str(tmp_path / "m4"))
    write_run(tmp_path / "whole", settings, records, None, {})
    with pytest.raises(UserError, match="not a shard"):
        merge_runs([str(tmp_path / "whole")], str(tmp_path / "m5"))
    with pytest.raises(UserError, match="no results.json"):
        merge_runs([str(tmp_path)], str(tmp_path / "m6"))
    assert not any((tmp_path / f"m{i}").exists() for i in range(1, 7))


def test_merge_checks_every_problem_is_covered_once(tmp_path):
    settings = make_settings()
    records = make_records(settings)


    def merge(parts):
        dirs = []
        for i, keep in enumerate(parts):
            out = tmp_path / f"s{len(list(tmp_path.iterdir()))}"
            write_run(out, settings, [r for r in records if (r["benchmark"], r["index"]) in keep], (i, 2), {})
            dirs.append(str(out))
        return merge_runs(dirs, str(tmp_path / "never"))

    alpha, beta = lambda *ix: {("alpha", i) for i in ix}, lambda *ix: {("beta", i) for i in ix}  # noqa: E731
    with pytest.raises(UserError, match="alpha problem 0 appears in more than one shard"):
        merge([alpha(0, 2, 4) | beta(0, 2), alpha(0, 1, 3) | beta(1)])
    with pytest.raises(UserError, match=r"beta problem 2 is in no shard \(1 of 3 missing\)"):
        merge([alpha(0, 2, 4) | beta(0), alpha(1, 3) | beta(1)])


def test_merge_cli_exit_codes(tmp_path, capsys):
    settings = make_settings()
    shards = write_shards(tmp_path, settings, make_records(settings), 2)
    assert cli.main(["merge", shards[0], "--out", str(tmp_path / "m")]) == 2
    assert "dft-eval: error: merge: shard 1/2 missing" in capsys.readouterr().err
    assert cli.main(["merge", *shards, "--out", str(tmp_path / "m")]) == 0
    assert "| **mean** | 8 |" in capsys.readouterr().out
    assert cli.main(["merge", *shards, "--out", str(tmp_path / "m")]) == 2  # now non-empty
    assert "exists and is not empty" in capsys.readouterr().err


# ---------------------------------------------------------------- compare


def test_compare_prints_side_by_side_and_writes_a_chart(tmp_path, capsys):
    base_settings = make_settings()
    runs = []
    for i, label in enumerate(("base", "sft", "dft")):
        write_run(tmp_path / label, base_settings, make_records(base_settings, seed=i), None, {})
        runs.append(str(tmp_path / label))
    assert cli.main(["compare", *runs, "--labels", "B,S,D", "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert "| benchmark | problems | B (Avg@3) | S (Avg@3) | D (Avg@3) |" in printed
    assert "| benchmark | problems | B (pass@3) | S (pass@3) | D (pass@3) |" in printed
    dft = load_run(runs[2]).results
    assert f"{100 * dft['benchmarks']['beta']['avg_at_k']:.1f} |" in printed.split("| beta |")[1].splitlines()[0]
    assert "| mean |" in printed and "note:" not in printed
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:8] == PNG_MAGIC
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["label"] for r in saved["runs"]] == ["B", "S", "D"]


def test_compare_notes_differences_and_uses_common_benchmarks_for_the_mean(tmp_path):
    a = make_settings()
    b = make_settings(sizes=(("alpha", 5),), temperature=0.6)
    write_run(tmp_path / "a", a, make_records(a), None, {})
    write_run(tmp_path / "b", b, make_records(b), None, {})
    table = compare_runs([str(tmp_path / "a"), str(tmp_path / "b")])
    assert "note: the runs differ in temperature: a=1.0, b=0.6" in table
    assert "| beta | 3 | " in table and " — |" in table.split("| beta |")[1].splitlines()[0]
    alpha_a = load_run(tmp_path / "a").results["benchmarks"]["alpha"]["avg_at_k"]
    assert f"| mean of 1 common | 5 | {100 * alpha_a:.1f} |" in table
    with pytest.raises(UserError, match="2 labels for 1 runs"):
        compare_runs([str(tmp_path / "a")], ["x", "y"])
    shard = write_shards(tmp_path / "s", a, make_records(a), 2)
    with pytest.raises(UserError, match="shard 0/2 only; merge the shards first"):
        compare_runs([shard[0]])


# ---------------------------------------------------------------- words: None, plurals, the model path in a title


def test_compare_notes_say_what_an_unset_setting_means(tmp_path):
    # a plain prompt has no instruction role: the note said `mine=None`
    mine, theirs = make_settings(prompt="plain", prompt_role=None), make_settings()
    write_run(tmp_path / "mine", mine, make_records(mine), None, {})
    write_run(tmp_path / "theirs", theirs, make_records(theirs), None, {})
    table = compare_runs([str(tmp_path / "mine"), str(tmp_path / "theirs")])
    assert ("- note: the runs differ in prompt_role: mine=none (no chat template, or not --prompt boxed), "
            "theirs=system") in table
    assert "None" not in table
    old = load_run(tmp_path / "theirs").results
    del old["settings"]["prompt_role"]  # a results.json from before a setting existed
    (tmp_path / "theirs" / RESULTS_FILE).write_text(json.dumps(old))
    table = compare_runs([str(tmp_path / "mine"), str(tmp_path / "theirs")])
    assert ("- note: the runs differ in prompt_role: mine=none (no chat template, or not --prompt boxed), "
            "theirs=not recorded") in table


def test_one_sample_and_one_shard_are_singular(tmp_path, capsys):
    settings = make_settings(samples=1)
    records = make_records(settings)
    shard = write_shards(tmp_path, settings, records, 1)
    assert cli.main(["merge", *shard, "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "K=1 sample at temperature" in out and "mean accuracy of the 1 sample per problem" in out
    assert f"dft-eval merge: wrote {tmp_path / 'm'}/ from 1 shard\n" in out  # was "1 samples", "1 shards"
    write_run(tmp_path / "three", make_settings(), make_records(make_settings()), None, {})
    assert "K=3 samples at temperature" in (tmp_path / "three" / TABLE_FILE).read_text()


@pytest.mark.parametrize("model, title", [
    ("/models/tiny", "dft-eval: /models/tiny"),  # was "models/tiny"
    ("tiny", "dft-eval: tiny"),                  # was "/tiny"
    ("runs/dft/hf", "dft-eval: runs/dft/hf"),
    ("/scratch/group/someone/experiments/2026-12/qwen2.5-math-1.5b/hf", "dft-eval: …/qwen2.5-math-1.5b/hf"),
])
def test_the_chart_title_keeps_the_model_path_as_given(tmp_path, model, title):
    from PIL import Image

    settings = make_settings(model=model)
    write_run(tmp_path / "run", settings, make_records(settings), None, {})
    with Image.open(tmp_path / "run" / PLOT_FILE) as png:
        assert png.text["Title"] == title  # the title drawn, also written into the PNG
