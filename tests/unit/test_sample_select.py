"""dft-sample's selection on hand-made graded samples: each policy keeps exactly the samples the
grader accepted and the policy allows; the kept rows round-trip through dft-train's data loader
(prompt masked, completion the target); merge names a missing or duplicated shard; a grader
timeout is a verdict of its own, counted incorrect."""

import json

import pytest

from dft_ds import synthetic
from dft_ds.config import DataConfig
from dft_ds.data import PROVENANCE_FIELD
from dft_ds.tokenised import build_datasets
from dft_ds.errors import DataError, UserError
from dft_ds.loss import IGNORE_INDEX
from dft_ds.rundir import data_provenance
from dft_ds.sample import outputs, run
from dft_ds.sample.select import Policy, select

MODEL = "/models/base"


def gen(k, verdict, text=None, finished=True):
    return {"sample": k, "seed": 1000 + k, "text": text or f"answer {k}", "extracted": "7" if verdict != "no_answer"
            else None, "verdict": verdict, "correct": verdict == "correct", "finished": finished, "tokens": 5}


def record(index, gens, bench="toy"):
    return {"benchmark": bench, "index": index, "id": f"p{index}", "problem": f"What is {index} + 7?", "gold": "7",
            "prompt": f"<|user|>What is {index} + 7?", "messages": [{"role": "user", "content": f"What is {index} + 7?"}],
            "prompt_text": None, "generations": gens, "correct": sum(g["correct"] for g in gens)}


def records():
    return [
        record(0, [gen(0, "correct"), gen(1, "wrong"), gen(2, "correct", "same"), gen(3, "correct", "same")]),
        record(1, [gen(0, "correct"), gen(1, "correct"), gen(2, "correct"), gen(3, "correct")]),  # 4 of 4
        record(2, [gen(0, "wrong"), gen(1, "no_answer"), gen(2, "timeout"), gen(3, "wrong", finished=False)]),  # 0 of 4
        record(3, [gen(0, "correct", finished=False), gen(1, "correct"), gen(2, "wrong"), gen(3, "correct")]),
    ]


def kept_ids(selection):
    return [(r[PROVENANCE_FIELD]["index"], r[PROVENANCE_FIELD]["sample"]) for r in selection.kept]


@pytest.mark.parametrize("policy, expected", [
    (Policy(), [(0, 0), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3), (3, 1), (3, 3)]),
    (Policy(keep_unfinished=True), [(0, 0), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3), (3, 0), (3, 1), (3, 3)]),
    (Policy(max_per_problem=1), [(0, 0), (1, 0), (3, 1)]),
    (Policy(drop_all_correct=True), [(0, 0), (0, 2), (0, 3), (3, 1), (3, 3)]),
    (Policy(dedup=True), [(0, 0), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3), (3, 1), (3, 3)]),
    (Policy(max_per_problem=2, dedup=True, drop_all_correct=True), [(0, 0), (0, 2), (3, 1), (3, 3)]),
])
def test_each_policy_keeps_exactly_the_accepted_samples_it_allows(policy, expected):
    chosen = select(records(), policy, MODEL)
    assert kept_ids(chosen) == expected
    assert all(r[PROVENANCE_FIELD]["verdict"] == "correct" for r in chosen.kept)
    c = chosen.counts
    assert c["samples"] == 16 and c["correct"] == 10 and c["kept"] == len(expected)
    assert c["problems_all_correct"] == 1 and c["problems_all_wrong"] == 1 and c["timeouts"] == 1 and c["cut"] == 2


def test_incorrect_samples_go_to_rejected_and_all_wrong_problems_can_be_dropped():
    chosen = select(records(), Policy(), MODEL)
    rejected = [(r[PROVENANCE_FIELD]["index"], r[PROVENANCE_FIELD]["sample"], r[PROVENANCE_FIELD]["verdict"])
                for r in chosen.rejected]
    assert rejected == [(0, 1, "wrong"), (2, 0, "wrong"), (2, 1, "no_answer"), (2, 2, "timeout"), (2, 3, "wrong"),
                        (3, 2, "wrong")]
    dropped = select(records(), Policy(drop_all_wrong=True), MODEL)
    assert [r[PROVENANCE_FIELD]["index"] for r in dropped.rejected] == [0, 3]
    line = next(p for p in dropped.problems if p["index"] == 2)
    assert line == {"benchmark": "toy", "index": 2, "id": "p2", "k": 4, "correct": 0, "cut": 1, "timeouts": 1,
                    "kept": 0, "dropped": "all wrong"}


def test_a_row_carries_the_prompt_as_sampled_and_its_provenance():
    row = select(records(), Policy(), MODEL).kept[0]
    assert row["messages"] == [{"role": "user", "content": "What is 0 + 7?"}, {"role": "assistant", "content": "answer 0"}]
    assert row[PROVENANCE_FIELD] == {"benchmark": "toy", "index": 0, "id": "p0", "sample": 0, "seed": 1000,
                                     "model": MODEL, "verdict": "correct", "extracted": "7", "gold": "7"}
    plain = record(0, [gen(0, "correct", "so \\boxed{7}")])
    plain.update(messages=None, prompt_text="What is 0 + 7?")
    assert select([plain], Policy(), MODEL).kept[0]["prompt"] == "What is 0 + 7?"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(synthetic.ensure_assets())


def test_kept_rows_round_trip_through_the_data_loader_prompt_masked_completion_target(tmp_path, tok, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    settings = {"model": MODEL, "benchmarks": [{"name": "toy"}], "samples": 4, "temperature": 1.0, "top_p": 1.0,
                "max_new_tokens": 64, "seed": 0, "prompt": "chat", "backend": "hf"}
    outputs.write_outputs(tmp_path / "s", settings, records(), Policy(max_per_problem=1), None, {"seconds": 1.0})
    train = tmp_path / "s" / outputs.TRAIN
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    cfg = DataConfig(source=str(train), packing=False)
    data, _ = build_datasets(cfg, tok, 0)
    assert len(data.rows) == len(rows) == 3
    assert "not used" not in " ".join(data.report.warnings)  # the provenance field is known, not a stray field
    for row, packed in zip(rows, data.rows.docs):
        (ids, labels), = packed
        target = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
        first = next(n for n, label in enumerate(labels) if label != IGNORE_INDEX)
        completion = row["messages"][-1]["content"]
        assert completion in tok.decode(target)  # the kept completion is what is learned
        assert row["messages"][0]["content"] in tok.decode(ids[:first])  # the prompt comes first, all masked
        assert completion not in tok.decode(ids[:first])
    provenance = data_provenance(str(train))
    assert provenance["model"] == MODEL and provenance["counts"]["kept"] == 3
    assert provenance["policy"]["max_per_problem"] == 1 and len(provenance["data_sha256"]) == 64


def test_an_empty_kept_set_stops_dft_train_naming_the_selection(tmp_path, tok):
    settings = {"model": MODEL, "benchmarks": [{"name": "toy"}], "samples": 4, "temperature": 1.0, "top_p": 1.0,
                "max_new_tokens": 64, "seed": 0, "prompt": "chat", "backend": "hf"}
    outputs.write_outputs(tmp_path / "s", settings, [records()[2]], Policy(), None, {"seconds": 1.0})
    with pytest.raises(DataError, match=r"train.jsonl: the file holds no samples \(dft-sample kept none: 0 of 4 "
                                        r"samples of 1 problems were correct"):
        build_datasets(DataConfig(source=str(tmp_path / "s" / outputs.TRAIN)), tok, 0)


def shard_dirs(tmp_path, indices, n=3):
    settings = {"model": MODEL, "benchmarks": [{"name": "toy", "problems": 4}], "samples": 4, "temperature": 1.0,
                "top_p": 1.0, "max_new_tokens": 64, "seed": 0, "prompt": "chat", "backend": "hf"}
    all_records = records()
    paths = []
    for i in indices:
        path = tmp_path / f"shard-{i}-{len(paths)}"
        mine = [r for r in all_records if r["index"] % n == i]
        outputs.write_outputs(path, settings, mine, Policy(), (i, n), {"seconds": 1.0})
        paths.append(str(path))
    return paths


def test_merge_equals_the_whole_and_names_missing_or_duplicated_shards(tmp_path):
    merged = outputs.merge_runs(shard_dirs(tmp_path, [2, 0, 1]), str(tmp_path / "merged"))
    whole = select(records(), Policy(), MODEL)
    assert merged["counts"] == whole.counts
    assert (tmp_path / "merged" / outputs.TRAIN).read_text() == "".join(json.dumps(r) + "\n" for r in whole.kept)
    with pytest.raises(UserError, match=r"shard 1/3 missing \(got 2 of 3\); nothing was written"):
        outputs.merge_runs(shard_dirs(tmp_path / "a", [0, 2]), str(tmp_path / "m2"))
    with pytest.raises(UserError, match=r"shard 0/3 given twice: .*shard-0-0 and .*shard-0-1"):
        outputs.merge_runs(shard_dirs(tmp_path / "b", [0, 0, 1, 2]), str(tmp_path / "m3"))
    assert not (tmp_path / "m2").exists() and not (tmp_path / "m3").exists()


def test_filter_selects_again_and_refuses_an_edited_samples_file(tmp_path):
    (path,) = shard_dirs(tmp_path, [0], n=1)
    again = outputs.filter_run(path, str(tmp_path / "one"), Policy(max_per_problem=1))
    assert again["counts"]["kept"] == 3 and again["policy"]["max_per_problem"] == 1
    samples = tmp_path / "shard-0-0" / outputs.SAMPLES
    samples.write_text(samples.read_text().replace('"correct": 0', '"correct": 4'))
    with pytest.raises(UserError, match="samples.jsonl: changed since it was written"):
        outputs.filter_run(path, str(tmp_path / "two"), Policy())


def test_a_grader_timeout_is_its_own_verdict_and_counts_as_incorrect(monkeypatch):
    from dft_ds.eval import grading
    from dft_ds.eval.generate import Completion

    calls = {"n": 0, "timeouts": 0}

    def fake_equivalent(pred, gold, *, timeout_s):
        calls["n"] += 1
        if pred == "10^{10^{10}}":
            calls["timeouts"] += 1  # what the worker does when a comparison runs out of time
            return False
        return pred == gold

    monkeypatch.setattr(grading, "is_equivalent", fake_equivalent)
    monkeypatch.setattr(grading, "timeouts_so_far", lambda: calls["timeouts"])
    recs = [{"benchmark": "toy", "index": 0, "id": "p0", "problem": "?", "gold": "7", "messages": None,
             "prompt_text": "?", "seeds": [1, 2, 3, 4]}]
    texts = ["\\boxed{7}", "\\boxed{10^{10^{10}}}", "\\boxed{8}", "no answer here"]
    run.grade(recs, [Completion(t, 3, True) for t in texts], timeout_s=0.5, progress=False)
    assert [g["verdict"] for g in recs[0]["generations"]] == ["correct", "timeout", "wrong", "no_answer"]
    assert recs[0]["correct"] == 1 and [g["seed"] for g in recs[0]["generations"]] == [1, 2, 3, 4]
    assert select(recs, Policy(), MODEL).counts["timeouts"] == 1
