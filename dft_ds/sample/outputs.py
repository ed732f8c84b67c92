"""The output directory of dft-sample, and the two commands that read one back: merge and filter.

    samples.jsonl   every problem with its K graded samples (prompt, seed, text, answer, verdict, finished)
    train.jsonl     the kept samples as dft-train rows: `messages` (chat-templated prompts) or
                    prompt/response, each tagged in `dft_sample` with problem, sample, seed, model, verdict
    rejected.jsonl  the samples that are not correct, in the same layout
    problems.jsonl  per problem: K, correct, cut at max_new_tokens, grader timeouts, kept, why dropped
    selection.json  settings, shard, policy, counts, the sha256 of samples.jsonl, runtime
    summary.md      the counts for people

The directory is written under a hidden name beside --out and renamed into place (eval.report's
write_dir): an interrupted run leaves nothing half written, and a non-empty --out is never touched.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from dft_ds.data import SAMPLE_SELECTION
from dft_ds.errors import UserError
from dft_ds.eval.report import _check_coverage, check_out_dir, write_dir
from dft_ds.sample.run import FORMAT
from dft_ds.sample.select import Policy, Selection, select

SAMPLES, TRAIN, REJECTED, PROBLEMS = "samples.jsonl", "train.jsonl", "rejected.jsonl", "problems.jsonl"
SUMMARY = "summary.md"
SELECTION = SAMPLE_SELECTION  # named in data.py, which points a training set that kept nothing to it


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_outputs(out: str | os.PathLike, settings: dict, records: list[dict], policy: Policy,
                  shard: tuple[int, int] | None, runtime: dict) -> dict:
    """Select and write everything; returns selection.json's content."""
    chosen = select(records, policy, settings["model"])
    samples_text = _jsonl(records)
    selection = {"format": FORMAT, "settings": settings, "shard": list(shard) if shard else None,
                 "policy": policy.to_dict(), "policy_text": policy.describe(), "counts": chosen.counts,
                 "samples_sha256": hashlib.sha256(samples_text.encode("utf-8")).hexdigest(), "runtime": runtime}

    def write(staging: Path) -> None:
        (staging / SAMPLES).write_text(samples_text, encoding="utf-8")
        (staging / TRAIN).write_text(_jsonl(chosen.kept), encoding="utf-8")
        (staging / REJECTED).write_text(_jsonl(chosen.rejected), encoding="utf-8")
        (staging / PROBLEMS).write_text(_jsonl(chosen.problems), encoding="utf-8")
        (staging / SUMMARY).write_text(summary_markdown(selection, chosen), encoding="utf-8")
        (staging / SELECTION).write_text(json.dumps(selection, indent=2) + "\n", encoding="utf-8")

    write_dir(out, write)
    return selection


def summary_markdown(selection: dict, chosen: Selection) -> str:
    s, c = selection["settings"], selection["counts"]
    k = s["samples"]
    lines = [f"# dft-sample: {s['model']}", "",
             f"{', '.join(b['name'] for b in s['benchmarks'])}; K={k}, temperature {s['temperature']}, top-p "
             f"{s['top_p']}, max {s['max_new_tokens']} new tokens, seed {s['seed']}, prompt {s['prompt']}, "
             f"backend {s['backend']}" + (f"; shard {selection['shard'][0]}/{selection['shard'][1]}"
                                          if selection["shard"] else ""),
             f"Selection: {selection['policy_text']}.", "",
             "| | count |", "|---|---|",
             f"| problems | {c['problems']} |", f"| samples | {c['samples']} |",
             f"| correct samples | {c['correct']} |", f"| kept (train.jsonl) | {c['kept']} |",
             f"| rejected (rejected.jsonl) | {c['rejected']} |",
             f"| cut at max tokens | {c['cut']} |", f"| grader timeouts (counted incorrect) | {c['timeouts']} |",
             f"| correct but unfinished, not kept | {c['dropped_unfinished']} |",
             f"| duplicate completions, not kept | {c['dropped_duplicate']} |",
             f"| over --max-per-problem, not kept | {c['dropped_over_max']} |",
             f"| problems solved {k} of {k} | {c['problems_all_correct']} |",
             f"| problems solved 0 of {k} | {c['problems_all_wrong']} |",
             f"| problems dropped by the policy | {c['problems_dropped']} |", "",
             "| correct of K | problems |", "|---|---|"]
    histogram: dict[int, int] = {}
    for p in chosen.problems:
        histogram[p["correct"]] = histogram.get(p["correct"], 0) + 1
    lines += [f"| {n} | {histogram[n]} |" for n in sorted(histogram)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Reading back


def load_samples(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """(selection.json, the records of samples.jsonl) of a dft-sample directory."""
    path = Path(path)
    sel_path = path / SELECTION
    if not sel_path.is_file():
        raise UserError(f"{path}: not a dft-sample output directory (no {SELECTION}; an interrupted run leaves none)")
    try:
        selection = json.loads(sel_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{sel_path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if selection.get("format") != FORMAT:
        raise UserError(f"{sel_path}: format {selection.get('format')!r}, expected {FORMAT!r}")
    text = (path / SAMPLES).read_text(encoding="utf-8")
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != selection.get("samples_sha256"):
        raise UserError(f"{path / SAMPLES}: changed since it was written (its sha256 is not the one in {SELECTION})")
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    return selection, records


def filter_run(path: str, out: str, policy: Policy) -> dict:
    """Select again from a sampling run's samples.jsonl under another policy."""
    check_out_dir(out)
    selection, records = load_samples(path)
    shard = tuple(selection["shard"]) if selection["shard"] else None
    runtime = {**selection["runtime"], "filtered_from": os.path.abspath(path)}
    return write_outputs(out, selection["settings"], records, policy, shard, runtime)


def merge_runs(paths: list[str], out: str, policy: Policy | None = None) -> dict:
    """The --shard i/n directories of one sampling run -> the outputs of the unsharded run. They must
    share settings and cover every shard once; `policy` (default: theirs, which must agree) selects."""
    check_out_dir(out)
    loaded = [(p, *load_samples(p)) for p in paths]
    first_path, first, _ = loaded[0]
    problems = []
    for path, sel, _ in loaded[1:]:
        if sel["settings"] != first["settings"]:
            diffs = [k for k in sorted(set(sel["settings"]) | set(first["settings"]))
                     if sel["settings"].get(k) != first["settings"].get(k)]
            problems.append(f"{path}: other settings than {first_path} ({', '.join(diffs)})")
        if policy is None and sel["policy"] != first["policy"]:
            problems.append(f"{path}: another selection policy than {first_path}; pass the selection flags to merge "
                            "to choose one")
    shards = [tuple(sel["shard"]) if sel["shard"] else None for _, sel, _ in loaded]
    if None in shards:
        problems.append(f"{loaded[shards.index(None)][0]}: not a shard (made without --shard)")
    else:
        counts = {n for _, n in shards}
        if len(counts) > 1:
            problems.append(f"the shards split the problems in different ways ({', '.join(f'/{n}' for n in sorted(counts))})")
        else:
            n = counts.pop()
            seen: dict[int, str] = {}
            for (path, _, _), (i, _) in zip(loaded, shards):
                if i in seen:
                    problems.append(f"shard {i}/{n} given twice: {seen[i]} and {path}")
                seen.setdefault(i, path)
            missing = [f"{i}/{n}" for i in range(n) if i not in seen]
            if missing:
                problems.append(f"shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} missing "
                                f"(got {len(paths)} of {n})")
    if problems:
        raise UserError("dft-sample merge: " + "; ".join(problems) + "; nothing was written")
    _check_coverage(first["settings"], [r for _, _, recs in loaded for r in recs])
    order = {b["name"]: i for i, b in enumerate(first["settings"]["benchmarks"])}
    records = sorted((r for _, _, recs in loaded for r in recs), key=lambda r: (order[r["benchmark"]], r["index"]))
    runtime = {"merged_from": [os.path.abspath(p) for p in paths],
               "samples_per_second": None, "seconds": sum(sel["runtime"].get("seconds", 0) for _, sel, _ in loaded)}
    return write_outputs(out, first["settings"], records, policy or Policy(**first["policy"]), None, runtime)
