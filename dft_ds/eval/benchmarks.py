"""Benchmarks: local files (or the built-in synthetic splits) -> problems with gold answers.

Nothing is downloaded. A published benchmark is named with the file that holds it,
`--benchmark math500=data/math500/test.jsonl`; its layout (which field is the problem, which the
answer) is known by name. Any other name with a path is a custom benchmark read through the
generic layout below, or through `--field` mappings. The built-in synthetic splits (`synthetic`,
`synthetic-ood`, `synthetic-easy`, `synthetic-easy-ood`, `synthetic-retention`, ...) need no path.

Files: JSON lines (.jsonl, or .json holding JSON lines), a JSON array of objects (.json) and
Parquet (.parquet). Every problem is checked when the file is read, and a bad one is reported as
`file:line` (or `file: row N` for Parquet) with what was expected, before any model is loaded.

A problem's `index` is its position in the file (after --limit): it is what --shard splits and
what seeds the sampling, so every shard layout sees the same problems with the same seeds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from dft_ds.data import json_lines
from dft_ds.errors import DataError, UserError

SUFFIXES = (".jsonl", ".json", ".parquet")
ROLES = ("problem", "answer", "solution", "id")  # what --field can map
# The built-in synthetic benchmarks: the embedded default's held-out splits, and (synthetic-train)
# the first problems of its training split, which dft-sample samples answers for. The data seed is
# fixed (not --seed), so changing the sampling seed never changes the problems.
BUILTIN_SPLITS = {"synthetic": "test", "synthetic-ood": "ood", "synthetic-train": "train",
                  # The easy family of issue 18's miniature (synthetic.py): in domain, more steps, and the
                  # retention skill (single-digit products) that its fine-tuning data leaves out.
                  "synthetic-easy": "easy-test", "synthetic-easy-ood": "easy-ood",
                  "synthetic-easy-train": "easy-train", "synthetic-retention": "retention"}
SYNTHETIC_SIZE = 500
SYNTHETIC_DATA_SEED = 0
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Problem:
    benchmark: str
    index: int  # position in the benchmark: the key of shards, seeds and merges
    id: str  # the file's own id when it has one, else str(index)
    problem: str
    gold: str


@dataclass(frozen=True)
class Layout:
    """Where a file keeps each field: candidate keys, the first one present in a row wins.

    The gold answer is `answer` when present, else the last \\boxed{} of `solution`.
    """

    problem: tuple[str, ...]
    answer: tuple[str, ...] = ()
    solution: tuple[str, ...] = ()
    id: tuple[str, ...] = ()
    origin: str = ""  # where the published file comes from (for the missing-path message)


LAYOUTS: dict[str, Layout] = {
    "math500": Layout(
        problem=("problem",), answer=("answer",), id=("unique_id", "id"),
        origin="MATH-500 test split as JSON lines (HuggingFaceH4/MATH-500 test.jsonl: problem, answer)"),
    "minerva_math": Layout(
        problem=("problem",), solution=("solution",), id=("idx", "id"),
        origin="Minerva Math (MATH-style OCW problems, e.g. minerva_math/test.jsonl of the Qwen2.5-Math "
               "evaluation data: problem, solution with the answer in \\boxed{})"),
    "olympiadbench": Layout(
        problem=("question",), answer=("final_answer",), id=("id",),
        origin="OlympiadBench (e.g. olympiadbench/test.jsonl of the Qwen2.5-Math evaluation data: question, "
               "final_answer as a list of strings)"),
    "aime24": Layout(
        problem=("problem", "Problem"), answer=("answer", "Answer"), id=("id", "ID"),
        origin="AIME 2024 (e.g. aime24/test.jsonl of the Qwen2.5-Math evaluation data, or Maxwell-Jia/AIME_2024: "
               "problem/Problem, answer/Answer)"),
    "amc23": Layout(
        problem=("question", "problem"), answer=("answer",), id=("id",),
        origin="AMC 2023 (e.g. amc23/test.jsonl of the Qwen2.5-Math evaluation data: question, answer as a number)"),
}
# Any other name with a path.
GENERIC = Layout(
    problem=("problem", "question", "Problem", "Question", "prompt", "input"),
    answer=("answer", "Answer", "final_answer", "gold", "target"),
    solution=("solution", "response", "output"),
    id=("id", "ID", "idx", "unique_id"),
)


@dataclass(frozen=True)
class BenchmarkSpec:
    """One --benchmark argument: NAME or NAME=PATH."""

    name: str
    path: str | None = None


@dataclass(frozen=True)
class Benchmark:
    name: str
    source: str  # the file, or a description of the built-in split
    problems: list[Problem]  # this shard's problems
    total: int  # problems in the benchmark (after --limit), before any --shard
    fingerprint: str  # of all `total` problems: shards of one evaluation must agree on it

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "problems": self.total, "fingerprint": self.fingerprint}


def fingerprint(problems: list[Problem]) -> str:
    """sha256 of the problems and gold answers, in order."""
    digest = hashlib.sha256()
    for p in problems:
        digest.update(json.dumps([p.index, p.id, p.problem, p.gold]).encode("utf-8"))
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Command-line values


def parse_benchmark_arg(text: str) -> BenchmarkSpec:
    name, sep, path = text.partition("=")
    name = name.strip()
    if not _NAME_RE.match(name):
        raise UserError(f"--benchmark {text}: expected NAME or NAME=PATH with NAME made of letters, digits, '_', "
                        "'-' and '.'")
    if sep and not path.strip():
        raise UserError(f"--benchmark {text}: the path after '=' is empty")
    return BenchmarkSpec(name, path.strip() if sep else None)


def parse_field_args(items: list[str]) -> dict[str | None, dict[str, str]]:
    """`--field [BENCH:]ROLE=KEY` values -> {bench or None (every file): {role: key}}."""
    mapping: dict[str | None, dict[str, str]] = {}
    for item in items:
        target, sep, key = item.partition("=")
        bench, colon, role = target.rpartition(":")
        role, key = role.strip(), key.strip()
        if not sep or not key or role not in ROLES or (colon and not bench):
            raise UserError(f"--field {item}: expected [BENCHMARK:]ROLE=KEY with ROLE one of {', '.join(ROLES)}")
        mapping.setdefault(bench or None, {})[role] = key
    return mapping


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise UserError(f"--shard {text}: expected i/n with 0 <= i < n, e.g. 0/4")
    return int(match.group(1)), int(match.group(2))


def shard_indices(total: int, shard: tuple[int, int] | None) -> list[int]:
    """The problem indices of shard (i, n): every n-th problem from i.

    Strided rather than contiguous, so a file sorted by difficulty (or length) spreads evenly over
    the shards and no array task is left with all the long generations.
    """
    if shard is None:
        return list(range(total))
    i, n = shard
    return list(range(i, total, n))


# --------------------------------------------------------------------------------------------
# Loading


def layout_for(name: str, fields: dict[str | None, dict[str, str]]) -> Layout:
    """The layout of benchmark `name` with --field mappings applied (named ones win over global)."""
    layout = LAYOUTS.get(name, GENERIC)
    for overrides in (fields.get(None, {}), fields.get(name, {})):
        changes = {role: (key,) for role, key in overrides.items()}
        # Mapping the answer means "the answer is here" (not "or in the solution"), and vice versa.
        if "answer" in overrides and "solution" not in overrides:
            changes["solution"] = ()
        if "solution" in overrides and "answer" not in overrides:
            changes["answer"] = ()
        layout = replace(layout, **changes)
    return layout


def load_benchmark(spec: BenchmarkSpec, fields: dict[str | None, dict[str, str]] | None = None,
                   limit: int | None = None, shard: tuple[int, int] | None = None) -> Benchmark:
    """Read one benchmark: all its problems (first `limit`), then the slice of `shard`."""
    fields = fields or {}
    if spec.name in BUILTIN_SPLITS:
        if spec.path is not None:
            raise UserError(f"--benchmark {spec.name}={spec.path}: '{spec.name}' is built in and takes no path "
                            "(give a custom benchmark another name)")
        problems, source = _synthetic_problems(spec.name, limit), (
            f"built-in: synthetic {BUILTIN_SPLITS[spec.name]} split (data seed {SYNTHETIC_DATA_SEED})")
    else:
        if spec.path is None:
            raise UserError(_missing_path_message(spec.name))
        problems, source = read_problems(spec.path, spec.name, layout_for(spec.name, fields), limit), spec.path
    keep = set(shard_indices(len(problems), shard))
    return Benchmark(spec.name, source, [p for p in problems if p.index in keep], len(problems), fingerprint(problems))


def _missing_path_message(name: str) -> str:
    if name in LAYOUTS:
        return (f"--benchmark {name}: no file given. dft-eval downloads nothing: pass {name}=PATH with PATH a local "
                f".jsonl/.json/.parquet file of {LAYOUTS[name].origin}")
    known = ", ".join([*LAYOUTS, *BUILTIN_SPLITS])
    return (f"--benchmark {name}: unknown benchmark with no file. Known names: {known}; any other name needs a "
            f"file: {name}=PATH (fields problem/question and answer, or --field ROLE=KEY)")


def _synthetic_problems(name: str, limit: int | None) -> list[Problem]:
    from dft_ds import synthetic

    split = BUILTIN_SPLITS[name]
    count = SYNTHETIC_SIZE if limit is None else min(limit, SYNTHETIC_SIZE)
    examples = synthetic.generate_examples(count, SYNTHETIC_DATA_SEED, split)  # prefix-stable in count
    return [Problem(name, i, f"{split}-{i}", ex["prompt"], ex["answer"]) for i, ex in enumerate(examples)]


def read_problems(path: str, name: str, layout: Layout, limit: int | None = None) -> list[Problem]:
    """Every row of `path` (first `limit`) as a Problem; DataError with file:line on a bad row."""
    problems: list[Problem] = []
    rows = iter_rows(path)
    while limit is None or len(problems) < limit:  # rows past the limit are never parsed
        item = next(rows, None)
        if item is None:
            break
        where, row = item
        problems.append(_problem_from_row(row, name, len(problems), layout, where))
    if not problems:
        raise DataError(f"{path}: the file holds no problems")
    return problems


def iter_rows(path: str) -> Iterator[tuple[str, dict]]:
    """(where, row) for each object in a .jsonl/.json/.parquet file; `where` is 'file:line'."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    suffix = next((s for s in SUFFIXES if path.endswith(s)), None)
    if suffix is None:
        raise DataError(f"{path}: unsupported file type; expected one of {', '.join(SUFFIXES)}")
    if suffix == ".parquet":
        yield from _parquet_rows(path)
        return
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if suffix == ".json" and text.lstrip().startswith("["):
        yield from _json_array_rows(path, text)
        return
    if suffix == ".json" and text.strip().count("\n") > 0 and _is_one_document(text):
        raise DataError(f"{path}: expected a JSON array of objects or one JSON object per line, got one "
                        "multi-line JSON document")
    yield from _json_lines_rows(path, text)


def _is_one_document(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _json_lines_rows(path: str, text: str) -> Iterator[tuple[str, dict]]:
    for number, row in json_lines(path, text):
        yield f"{path}:{number}", row


def _json_array_rows(path: str, text: str) -> Iterator[tuple[str, dict]]:
    """Objects of a JSON array, each with the line it starts on (raw_decode walks the array)."""
    try:
        json.loads(text)  # syntax errors first, with json's own line and column
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        pos = _skip_space(text, pos)
        if text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        row, pos = decoder.raw_decode(text, pos)
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line}: expected an object in the array, got {type(row).__name__}")
        yield f"{path}:{line}", row
        pos = _skip_space(text, pos)
        if text[pos] == ",":
            pos += 1


def _skip_space(text: str, pos: int) -> int:
    while text[pos] in " \t\r\n":
        pos += 1
    return pos


def _parquet_rows(path: str) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types; the user needs the message
        raise DataError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    for number, row in enumerate(rows, start=1):
        yield f"{path}: row {number}", row


def _problem_from_row(row: dict, name: str, index: int, layout: Layout, where: str) -> Problem:
    problem_key = _first_key(row, layout.problem)
    if problem_key is None:
        raise DataError(f"{where}: no problem field (expected {_keys_text(layout.problem)}; the row has "
                        f"{_keys_text(tuple(row))}); map it with --field problem=KEY")
    problem = row[problem_key]
    if not isinstance(problem, str) or not problem.strip():
        raise DataError(f"{where}: field '{problem_key}' must be a non-empty string, got {_short(problem)}")
    gold = _gold(row, layout, where)
    id_key = _first_key(row, layout.id)
    ident = str(row[id_key]) if id_key is not None and row[id_key] is not None else str(index)
    return Problem(name, index, ident, problem, gold)


def _gold(row: dict, layout: Layout, where: str) -> str:
    answer_key = _first_key(row, layout.answer)
    if answer_key is not None:
        gold = answer_text(row[answer_key])
        if gold is None:
            raise DataError(f"{where}: field '{answer_key}' must be a non-empty string, a number or a list of them, "
                            f"got {_short(row[answer_key])}")
        return gold
    solution_key = _first_key(row, layout.solution)
    if solution_key is None:
        raise DataError(f"{where}: no answer field (expected {_keys_text(layout.answer + layout.solution)}; the row "
                        f"has {_keys_text(tuple(row))}); map it with --field answer=KEY or --field solution=KEY")
    solution = row[solution_key]
    if isinstance(solution, list) and solution and all(isinstance(s, str) for s in solution):
        solution = solution[-1]
    if not isinstance(solution, str):
        raise DataError(f"{where}: field '{solution_key}' must be a string, got {_short(solution)}")
    from dft_ds.eval.grading import extract_answer

    gold = extract_answer(solution)
    if gold is None:
        raise DataError(f"{where}: no \\boxed{{...}} answer in field '{solution_key}' to grade against")
    return gold


def answer_text(value: Any) -> str | None:
    """A gold answer as a string: numbers without a spurious '.0', lists joined with ', '.

    27 -> '27', 27.0 -> '27', 0.5 -> '0.5', '$\\frac{1}{2}$' -> '\\frac{1}{2}', ['3', '5'] -> '3, 5'.
    None for anything else (or an empty answer).
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        text = value.strip()
        if len(text) >= 2 and text.startswith("$") and text.endswith("$"):
            text = text.strip("$").strip()
        return text or None
    if isinstance(value, (list, tuple)) and value:
        parts = [answer_text(v) for v in value]
        return None if any(p is None for p in parts) else ", ".join(parts)
    return None


def _first_key(row: dict, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in row and row[k] is not None), None)


def _keys_text(keys: tuple[str, ...]) -> str:
    return ", ".join(f"'{k}'" for k in keys) if keys else "no fields"


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"
