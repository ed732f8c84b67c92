"""Outputs of an evaluation, and the two commands that read them back: merge and compare.

An output directory holds
  samples.jsonl  one line per problem, in benchmark order then problem index: benchmark, index, id,
                 problem, gold, prompt, and per sample its text, extracted answer, correct, finished
                 (stopped at EOS) and tokens
  results.json   settings (everything that decides the numbers), per-benchmark metrics, their mean,
                 the shard (null when whole) and runtime (device, timings: the only part that differs
                 between two runs of the same settings)
  results.md     the Markdown table
  results.png    a bar chart of Avg@K and pass@K per benchmark
results.json's metrics are recomputed from samples.jsonl by every writer (run and merge alike), so
the two never disagree. Directories are written beside --out under a hidden name and renamed into
place at the end: an interrupted run leaves no half-written --out, and a non-empty --out is never
touched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dft_ds.errors import UserError
from dft_ds.eval.metrics import benchmark_metrics, mean_metrics

FORMAT = "dft-eval/1"
SAMPLES_FILE, RESULTS_FILE, TABLE_FILE, PLOT_FILE = "samples.jsonl", "results.json", "results.md", "results.png"
COMPARE_JSON, COMPARE_TABLE, COMPARE_PLOT = "compare.json", "compare.md", "compare.png"


# --------------------------------------------------------------------------------------------
# Output directories


def check_out_dir(out: str | os.PathLike) -> Path:
    """--out must not exist or be an empty directory (checked before any work, and again at the end)."""
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"--out {path}: exists and is not empty; choose a new directory (nothing was written)")
    return path


def write_dir(out: str | os.PathLike, write) -> Path:
    """Call `write(staging_dir)`, then rename the staging directory to `out` (atomic on one filesystem)."""
    path = check_out_dir(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        staging.chmod(0o755)
        write(staging)
        if path.is_dir():
            path.rmdir()  # empty (checked above); rename cannot replace it on every platform
        os.rename(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


# --------------------------------------------------------------------------------------------
# A run's results


def build_results(settings: dict, records: list[dict], shard: tuple[int, int] | None, runtime: dict) -> dict:
    """results.json's content, computed from the per-problem records alone."""
    per_benchmark = {}
    for bench in settings["benchmarks"]:
        rows = [r for r in records if r["benchmark"] == bench["name"]]
        metrics = benchmark_metrics([[g["correct"] for g in r["generations"]] for r in rows])
        generations = [g for r in rows for g in r["generations"]]
        metrics["no_answer"] = sum(g["extracted"] is None for g in generations)
        metrics["truncated"] = sum(not g["finished"] for g in generations)
        per_benchmark[bench["name"]] = metrics
    return {
        "format": FORMAT,
        "settings": settings,
        "benchmarks": per_benchmark,
        "mean": mean_metrics(per_benchmark),
        "shard": None if shard is None else {"index": shard[0], "count": shard[1]},
        "runtime": runtime,
    }


def sort_records(settings: dict, records: list[dict]) -> list[dict]:
    order = {bench["name"]: i for i, bench in enumerate(settings["benchmarks"])}
    return sorted(records, key=lambda r: (order[r["benchmark"]], r["index"]))


def write_run(out: str | os.PathLike, settings: dict, records: list[dict], shard: tuple[int, int] | None,
              runtime: dict) -> dict:
    """Write all four outputs to `out`; returns the results."""
    records = sort_records(settings, records)
    results = build_results(settings, records, shard, runtime)

    def write(staging: Path) -> None:
        with open(staging / SAMPLES_FILE, "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        (staging / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        (staging / TABLE_FILE).write_text(results_markdown(results), encoding="utf-8")
        plot_results(results, staging / PLOT_FILE)

    write_dir(out, write)
    return results


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def counted(n: int, noun: str) -> str:
    """'1 sample', '3 samples': K may be 1, and a merge may have one shard."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def describe_settings(settings: dict) -> str:
    prompt = settings["prompt"] + (f" (instruction as {settings['prompt_role']} message)"
                                   if settings.get("prompt_role") else "")
    return (f"model `{settings['model']}`; prompt {prompt}; K={counted(settings['samples'], 'sample')} at temperature "
            f"{settings['temperature']}, top-p {settings['top_p']}, at most {settings['max_new_tokens']} new tokens; "
            f"seed {settings['seed']}; backend {settings['backend']}")


def results_markdown(results: dict) -> str:
    settings, k = results["settings"], results["settings"]["samples"]
    shard = results["shard"]
    lines = ["# dft-eval results", "", describe_settings(settings) + ".",
             *([f"Shard {shard['index']}/{shard['count']} only (merge the shards for the full table)."]
               if shard else []), "",
             f"| benchmark | problems | Avg@{k} | pass@{k} | no answer | cut at max tokens |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, m in results["benchmarks"].items():
        lines.append(f"| {name} | {m['problems']} | {_pct(m['avg_at_k'])} | {_pct(m['pass_at_k'])} | "
                     f"{m['no_answer']} | {m['truncated']} |")
    mean = results["mean"]
    lines.append(f"| **mean** | {mean['problems']} | {_pct(mean['avg_at_k'])} | {_pct(mean['pass_at_k'])} | | |")
    lines += ["", f"Accuracy in %. Avg@{k}: mean accuracy of the {counted(k, 'sample')} per problem; pass@{k}: "
              "share of problems with at least one correct sample; mean: unweighted over benchmarks. 'no answer' and "
              "'cut at max tokens' count samples.", ""]
    return "\n".join(lines)


def plot_results(results: dict, path: Path) -> None:
    names = [*results["benchmarks"], "mean"]
    rows = [*results["benchmarks"].values(), results["mean"]]
    k = results["settings"]["samples"]
    series = {f"Avg@{k}": [m["avg_at_k"] for m in rows], f"pass@{k}": [m["pass_at_k"] for m in rows]}
    _bar_chart(path, names, series, title=f"dft-eval: {short_path(results['settings']['model'])}")


def short_path(path: str, limit: int = 48) -> str:
    """The model path as given when it fits a chart title, else its last two parts after '…/'.

    (The title was parent.name/name: '/models/tiny' lost its leading '/', and 'tiny' became '/tiny'.)
    """
    parts = Path(path).parts
    if len(path) <= limit or len(parts) <= 2:
        return path
    return "…/" + "/".join(parts[-2:])


def _bar_chart(path: Path, groups: list[str], series: dict[str, list[float | None]], title: str) -> None:
    """Grouped bars (one group per benchmark, one bar per series), accuracy in %; Agg backend."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(groups) * (0.5 + 0.25 * len(series)) + 1.5), 3.6))
    for s, (label, values) in enumerate(series.items()):
        xs = [g + (s - (len(series) - 1) / 2) * width for g in range(len(groups))]
        heights = [0.0 if v is None else 100 * v for v in values]
        bars = ax.bar(xs, heights, width, label=label)
        ax.bar_label(bars, labels=[_pct(v) for v in values], fontsize=6 if len(series) > 2 else 7, padding=1)
    crowded = len(groups) > 4
    ax.set_xticks(range(len(groups)), groups, rotation=20 if crowded else 0, ha="right" if crowded else "center")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 112)  # room for the labels above 100%
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Title": title})  # the PNG says what it shows, also unopened
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Reading runs back


@dataclass
class Run:
    path: Path
    results: dict
    records: list[dict] | None = None


def load_run(path: str | os.PathLike, with_samples: bool = False) -> Run:
    root = Path(path)
    results_file = root / RESULTS_FILE
    if not results_file.is_file():
        raise UserError(f"{root}: no {RESULTS_FILE} (not a dft-eval output directory)")
    try:
        results = json.loads(results_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{results_file}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(results, dict) or results.get("format") != FORMAT:
        raise UserError(f"{results_file}: not a {FORMAT} results file")
    run = Run(root, results)
    if with_samples:
        samples_file, run.records = root / SAMPLES_FILE, []
        if not samples_file.is_file():
            raise UserError(f"{root}: no {SAMPLES_FILE}")
        with open(samples_file, encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                try:
                    run.records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UserError(f"{samples_file}:{number}: not valid JSON ({exc.msg})") from None
    return run


# --------------------------------------------------------------------------------------------
# merge


def merge_runs(paths: list[str], out: str) -> dict:
    """Combine the shard directories of one evaluation into the outputs of the unsharded run."""
    check_out_dir(out)
    if not paths:
        raise UserError("merge: give the shard directories to combine")
    runs = [load_run(p, with_samples=True) for p in paths]
    first = runs[0]
    for run in runs:
        if run.results["shard"] is None:
            raise UserError(f"{run.path}: not a shard (its results.json has no shard); merge combines --shard runs")
        diffs = _setting_diffs(first.results["settings"], run.results["settings"])
        if diffs:
            raise UserError(f"{run.path}: not the same evaluation as {first.path}: {'; '.join(diffs)}")
    count = first.results["shard"]["count"]
    seen: dict[int, Path] = {}
    for run in runs:
        shard = run.results["shard"]
        if shard["count"] != count:
            raise UserError(f"{run.path}: shard {shard['index']}/{shard['count']}, but {first.path} is one of {count}")
        if shard["index"] in seen:
            raise UserError(f"{run.path} and {seen[shard['index']]} are both shard {shard['index']}/{count}")
        seen[shard["index"]] = run.path
    missing = sorted(set(range(count)) - set(seen))
    if missing:
        shards = ", ".join(f"{i}/{count}" for i in missing)
        raise UserError(f"merge: {'shard' if len(missing) == 1 else 'shards'} {shards} missing")
    settings = first.results["settings"]
    records = [record for run in runs for record in run.records]
    _check_coverage(settings, records)
    runtime = {"shards": [run.results["runtime"] for run in sorted(runs, key=lambda r: r.results["shard"]["index"])]}
    runtime["seconds"] = sum(r.get("seconds", 0.0) for r in runtime["shards"])
    return write_run(out, settings, records, None, runtime)


def _setting_diffs(a: dict, b: dict) -> list[str]:
    return [f"{key}: {json.dumps(a.get(key))} != {json.dumps(b.get(key))}"
            for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def _check_coverage(settings: dict, records: list[dict]) -> None:
    """Every problem of every benchmark exactly once."""
    for bench in settings["benchmarks"]:
        indices = sorted(r["index"] for r in records if r["benchmark"] == bench["name"])
        duplicates = sorted({i for i, j in zip(indices, indices[1:]) if i == j})
        if duplicates:
            raise UserError(f"merge: {bench['name']} {_problems(duplicates)} "
                            f"{'appears' if len(duplicates) == 1 else 'appear'} in more than one shard")
        missing = sorted(set(range(bench["problems"])) - set(indices))
        if missing:
            raise UserError(f"merge: {bench['name']} {_problems(missing)} {'is' if len(missing) == 1 else 'are'} "
                            "in no shard "
                            f"({len(missing)} of {bench['problems']} missing)")
    known = {bench["name"] for bench in settings["benchmarks"]}
    strays = sorted({r["benchmark"] for r in records} - known)
    if strays:
        raise UserError(f"merge: samples of {'benchmark' if len(strays) == 1 else 'benchmarks'} {', '.join(strays)} "
                        "that the settings do not list")


def _problems(indices: list[int]) -> str:
    return f"problem {indices[0]}" if len(indices) == 1 else f"problems {indices[:10]}"


# --------------------------------------------------------------------------------------------
# compare


COMPARED_SETTINGS = ("samples", "temperature", "top_p", "max_new_tokens", "prompt", "prompt_role", "seed", "backend")


def compare_runs(paths: list[str], labels: list[str] | None = None, out: str | None = None) -> str:
    """A side-by-side table of whole runs (e.g. base, SFT, DFT); with `out`, also a grouped bar chart."""
    if out is not None:
        check_out_dir(out)
    if not paths:
        raise UserError("compare: give the run directories to compare")
    runs = [load_run(p) for p in paths]
    for run in runs:
        shard = run.results["shard"]
        if shard is not None:
            raise UserError(f"{run.path}: shard {shard['index']}/{shard['count']} only; merge the shards first")
    labels = labels or _default_labels(runs)
    if len(labels) != len(runs):
        raise UserError(f"--labels: {len(labels)} labels for {len(runs)} runs")
    table = compare_table(runs, labels)
    if out is not None:
        def write(staging: Path) -> None:
            (staging / COMPARE_TABLE).write_text(table, encoding="utf-8")
            (staging / COMPARE_JSON).write_text(json.dumps(
                {"runs": [{"label": l, "path": str(r.path.resolve()), "settings": r.results["settings"],
                           "benchmarks": r.results["benchmarks"], "mean": r.results["mean"]}
                          for l, r in zip(labels, runs)]}, indent=2) + "\n", encoding="utf-8")
            names, rows = _compare_rows(runs)
            series = {label: [row[i]["avg_at_k"] if row[i] else None for row in rows]
                      for i, label in enumerate(labels)}
            _bar_chart(staging / COMPARE_PLOT, names, series, title="dft-eval compare: Avg@K")

        write_dir(out, write)
    return table


def _default_labels(runs: list[Run]) -> list[str]:
    names = [run.path.resolve().name for run in runs]
    return names if len(set(names)) == len(names) else [str(run.path) for run in runs]


def _compare_rows(runs: list[Run]) -> tuple[list[str], list[list[dict | None]]]:
    """Benchmark names (first run's order, then new ones) + the mean row, and each run's metrics."""
    names: list[str] = []
    for run in runs:
        names += [n for n in run.results["benchmarks"] if n not in names]
    common = [n for n in names if all(n in run.results["benchmarks"] for run in runs)]
    rows = [[run.results["benchmarks"].get(n) for run in runs] for n in names]
    # The mean over the benchmarks every run has, so the column means compare like with like.
    means = [mean_metrics({n: run.results["benchmarks"][n] for n in common}) for run in runs]
    label = "mean" if common == names else f"mean of {len(common)} common"
    return names + [label], rows + [means]


_NOT_RECORDED = "not recorded"  # a results.json written before the setting existed
# What None means for a setting, in words (a note said `mine=None`).
_NONE_TEXT = {"prompt_role": "none (no chat template, or not --prompt boxed)"}


def _setting_text(key: str, value) -> str:
    if value is None:
        return _NONE_TEXT.get(key, "none")
    return str(value)


def compare_table(runs: list[Run], labels: list[str]) -> str:
    names, rows = _compare_rows(runs)
    lines = ["# dft-eval compare", ""]
    for i, (label, run) in enumerate(zip(labels, runs)):
        lines.append(f"- **{label}**: `{run.path}` — {describe_settings(run.results['settings'])}")
    notes = []
    for key in COMPARED_SETTINGS:
        values = [run.results["settings"].get(key, _NOT_RECORDED) for run in runs]
        if len(set(map(json.dumps, values))) > 1:
            notes.append(f"- note: the runs differ in {key}: "
                         + ", ".join(f"{l}={_setting_text(key, v)}" for l, v in zip(labels, values)))
    lines += notes + [""]
    for metric, title in (("avg_at_k", "Avg@K"), ("pass_at_k", "pass@K")):
        ks = [run.results["settings"]["samples"] for run in runs]
        header = [f"{label} ({title.replace('K', str(k))})" for label, k in zip(labels, ks)]
        lines += [f"| benchmark | problems | {' | '.join(header)} |", "|---|---:|" + "---:|" * len(runs)]
        for name, row in zip(names, rows):
            problems = next((m["problems"] for m in row if m), 0)
            cells = [_pct(m[metric]) if m else "—" for m in row]
            lines.append(f"| {name} | {problems} | {' | '.join(cells)} |")
        lines.append("")
    return "\n".join(lines)
