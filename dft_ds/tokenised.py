"""Tokenised data: every sample tokenised once, into Arrow columns that every rank memory-maps.

The configured source is tokenised by `datasets.map` (batched, data.num_workers processes) into a
folder under data.cache_dir whose name is a digest of everything that decides a token: the source
(path, size and modification time of each file; a hub dataset's fingerprint), the tokenizer (its
whole definition and chat template), the data settings that shape a sample (layout, fields,
template, max_length, overlong) and the code that encodes rows. A later start with the same inputs
finds the folder and reads it; a changed file, tokenizer or setting gives another digest, so a stale
set is never read. One process prepares a set while the others wait on a file lock beside it (on
one node, or across nodes where the cache folder is shared), then every rank maps the same files,
whose pages the OS shares.

A set keeps every sample, each with its status (kept, truncated, dropped over max_length, dropped
with no target); rows are documents packed by index (`Rows`), so packing, held-out splits and
sampling never copy tokens.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from dft_ds import data as dd
from dft_ds.config import SYNTHETIC, DataConfig
from dft_ds.errors import DataError
from dft_ds.loss import IGNORE_INDEX

CACHE_FORMAT = 1  # what a cached set holds; the encoding code itself is part of the key too
MANIFEST = "manifest.json"
# Settings that never change a token (packing and held-out splits work on documents already tokenised).
NOT_IN_KEY = ("packing", "packing_method", "eval_source", "eval_split", "eval_fraction", "cache_dir", "num_workers",
              "source", "split", "synthetic_size")
CODE_FILES = ("data.py", "tokenised.py", "synthetic.py")
PROGRESS_EVERY_S = 10.0


@dataclass
class DataReport:
    """Counts reported to the user after tokenisation."""

    samples: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_target: int = 0
    truncated_away: int = 0  # of dropped_no_target: over data.max_length, every target past the cut
    rows: int = 0
    target_tokens: int = 0
    tokens: int = 0
    layout: str = ""
    heldout: int = 0        # samples set aside by data.eval_fraction
    warnings: list = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        layout = f"{self.layout}; " if self.layout else ""
        held = f" ({self.heldout} held out by data.eval_fraction)" if self.heldout else ""
        away = f" ({self.truncated_away} of them cut before their target by truncation)" if self.truncated_away else ""
        return (f"{layout}{self.samples} samples{held} -> {self.rows} rows, {self.tokens} tokens "
                f"({self.target_tokens} targets); truncated {self.truncated}, dropped {self.dropped_overlong} over max_length and "
                f"{self.dropped_no_target} with no target left{away}")


# --------------------------------------------------------------------------------------------
# A tokenised set


class TokenisedSet:
    """Every sample of a source as ids and shifted labels (int32 Arrow lists), its status and its number
    of targets; read through numpy views of the Arrow buffers (no copy). `table` is a pyarrow Table (or
    a datasets.Dataset, whose table is taken)."""

    def __init__(self, table, report: DataReport, path: Optional[Path] = None, hit: bool = False):
        table = getattr(table, "data", table)  # a datasets.Dataset's table
        self.table, self.report, self.path, self.hit = table, report, path, hit
        self._ids = [_list_view(c) for c in table.column("input_ids").chunks]
        self._labels = [_list_view(c) for c in table.column("labels").chunks]
        sizes = [len(offsets) - 1 for offsets, _ in self._ids]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.status = _column(table, "status").astype(np.int8, copy=False)
        self.targets = _column(table, "targets").astype(np.int64)
        self.lengths = (np.concatenate([np.diff(offsets) for offsets, _ in self._ids]) if sizes
                        else np.zeros(0, dtype=np.int32))

    def __len__(self) -> int:
        return len(self.status)

    def kept(self) -> np.ndarray:
        """Indices of the samples that train (kept whole or truncated), in source order."""
        return np.flatnonzero(self.status <= dd.TRUNCATED)

    def doc(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        chunk = int(np.searchsorted(self._starts, index, side="right")) - 1
        j = index - int(self._starts[chunk])
        (offsets, ids), (loffsets, labels) = self._ids[chunk], self._labels[chunk]
        return ids[int(offsets[j]):int(offsets[j + 1])], labels[int(loffsets[j]):int(loffsets[j + 1])]


def from_lists(ids: list[list[int]], labels: list[list[int]]) -> TokenisedSet:
    """A set of already tokenised documents, all kept (for tests and tools that build rows themselves)."""
    import datasets

    dataset = datasets.Dataset.from_dict(
        {"input_ids": ids, "labels": labels, "status": [dd.KEPT] * len(ids),
         "targets": [sum(lab != IGNORE_INDEX for lab in labs) for labs in labels]},
        features=features())
    return TokenisedSet(dataset, DataReport(samples=len(ids)))


def features():
    import datasets

    return datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                              "labels": datasets.Sequence(datasets.Value("int32")),
                              "status": datasets.Value("int8"), "targets": datasets.Value("int32")})


def _list_view(chunk) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of an Arrow list array, both views of its buffers (no copy); the offsets index
    `values` even for a slice."""
    return _view(chunk.offsets), _view(chunk.values)


_NUMPY_OF = {"int8": np.int8, "int32": np.int32, "int64": np.int64}


def _view(array) -> np.ndarray:
    """A numpy view of a null-free Arrow integer array's data buffer. (pyarrow's own to_numpy imports
    pandas on first use, about 0.6 s of CPU at every start.)"""
    values = np.frombuffer(array.buffers()[1], dtype=_NUMPY_OF[str(array.type)])
    return values[array.offset:array.offset + len(array)]


def _column(table, name: str) -> np.ndarray:
    column = table.column(name)
    chunks = [_view(chunk) for chunk in column.chunks]
    if not chunks:
        return np.zeros(0, dtype=_NUMPY_OF[str(column.type)])
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


# --------------------------------------------------------------------------------------------
# Rows


@dataclass
class Rows:
    """Training rows: row r is the documents order[bounds[r]:bounds[r + 1]] of a tokenised set, each
    an (ids, labels) pair of arrays, together at most max_length tokens when packed."""

    source: TokenisedSet
    order: np.ndarray
    bounds: np.ndarray

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, r: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return [self.source.doc(int(i)) for i in self.order[self.bounds[r]:self.bounds[r + 1]]]

    def doc_count(self, r: int) -> int:
        return int(self.bounds[r + 1] - self.bounds[r])

    def digest(self) -> str:
        """sha256 over every row's documents (ids, then labels, as int64 bytes; b"|" after each row): the
        run's data fingerprint. Computed once per layout of rows and kept beside a cached set."""
        layout = hashlib.sha256(self.order.astype(np.int64).tobytes() + b"/" + self.bounds.astype(np.int64).tobytes())
        kept = self.source.path / "digests" / layout.hexdigest()[:24] if self.source.path is not None else None
        if kept is not None and kept.is_file():
            return kept.read_text().strip()
        h = hashlib.sha256()
        for r in range(len(self)):
            for ids, labels in self[r]:
                h.update(ids.astype(np.int64).tobytes())
                h.update(labels.astype(np.int64).tobytes())
            h.update(b"|")
        digest = h.hexdigest()
        if kept is not None:
            with contextlib.suppress(OSError):  # a read-only cache still trains
                kept.parent.mkdir(exist_ok=True)
                staging = kept.with_name(f"{kept.name}.{os.getpid()}")
                staging.write_text(digest + "\n")
                os.replace(staging, kept)
        return digest

    @property
    def docs(self) -> list[list[tuple[list[int], list[int]]]]:
        """Every row as (ids, labels) lists of Python ints: for inspection and tests, it copies everything."""
        return [[(ids.tolist(), labels.tolist()) for ids, labels in self[r]] for r in range(len(self))]


def best_fit_order(lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing: (positions into `lengths` in row order, row boundaries). Documents go longest
    first (ties in their order), each into the open row with the least room that still holds it, else
    a new row; rows come out in the order they were opened. Deterministic."""
    by_length = np.argsort(-lengths, kind="stable")
    rooms: dict[int, collections.deque] = {}  # room left -> rows with that room, oldest first
    room_values: list[int] = []        # the distinct rooms that some row has, sorted
    members: list[list[int]] = []
    for position in by_length.tolist():
        n = int(lengths[position])
        at = bisect.bisect_left(room_values, n)
        if at < len(room_values):
            room = room_values[at]
            row = rooms[room].popleft()
            if not rooms[room]:
                del rooms[room]
                room_values.pop(at)
        else:
            row, room = len(members), max_length
            members.append([])
        members[row].append(position)
        left = room - n
        if left > 0:
            if left not in rooms:
                rooms[left] = collections.deque()
                bisect.insort(room_values, left)
            rooms[left].append(row)
    order = np.fromiter((p for row in members for p in row), dtype=np.int64, count=len(lengths))
    bounds = np.concatenate([[0], np.cumsum([len(row) for row in members], dtype=np.int64)])
    return order, bounds


def pack_bounds(lengths: np.ndarray, max_length: int, packing: bool) -> np.ndarray:
    """Row boundaries over documents in order: one document per row, or greedy in-order packing into
    rows of at most max_length tokens."""
    if not packing:
        return np.arange(len(lengths) + 1, dtype=np.int64)
    bounds, used = [0], 0
    for i, n in enumerate(lengths.tolist()):
        if i > bounds[-1] and used + n > max_length:
            bounds.append(i)
            used = 0
        used += n
    bounds.append(len(lengths))
    return np.asarray(bounds, dtype=np.int64)


def build_rows(source: TokenisedSet, order: Optional[np.ndarray], max_length: int, packing: bool,
               method: str = "greedy") -> Rows:
    """Rows of the documents `order` (all kept ones, in order, when None), packed by `method`
    (data.packing_method) or one to a row."""
    order = source.kept() if order is None else order
    if packing and method == "best_fit":
        positions, bounds = best_fit_order(source.lengths[order], max_length)
        return Rows(source, order[positions], bounds)
    return Rows(source, order, pack_bounds(source.lengths[order], max_length, packing))


def tokenize_dataset(raw: dd.RawData, cfg: DataConfig, tokenizer) -> tuple[list[list[int]], list[list[int]],
                                                                            DataReport]:
    """The kept samples of `raw` as (ids, labels) lists and the report, tokenised in memory: for tests and
    tools that look at a few samples; training goes through prepare()."""
    dataset, report = tokenise(raw, cfg, tokenizer, None, lambda _: None)
    tokens = TokenisedSet(dataset, report)
    docs = [tokens.doc(int(i)) for i in tokens.kept()]
    return [d[0].tolist() for d in docs], [d[1].tolist() for d in docs], report


@dataclass
class TrainData:
    rows: Rows
    report: DataReport
    pad_id: int

    def batch(self, indices: list[int]) -> dict:
        """Model inputs for these rows, plus `n_tokens`: the real (unpadded) tokens, for throughput."""
        rows = [self.rows[i] for i in indices]
        batch = dd.collate(rows, self.pad_id)
        batch["n_tokens"] = sum(len(ids) for row in rows for ids, _ in row)
        return batch


# --------------------------------------------------------------------------------------------
# Preparing a set: the cache, the lock, datasets.map


def cache_root(cfg: DataConfig) -> Optional[Path]:
    """data.cache_dir: auto is $DFT_DS_CACHE/data (else ~/.cache/dft_ds/data); off is no cache."""
    if cfg.cache_dir == "off":
        return None
    if cfg.cache_dir == "auto":
        from dft_ds.synthetic import default_cache_dir

        return default_cache_dir() / "data"
    return Path(cfg.cache_dir).expanduser()


def key_parts(cfg: DataConfig, tokenizer, seed: int, synthetic_split: str, raw=None) -> dict:
    """Everything that decides a token of this set (see the module docstring)."""
    return {
        "format": CACHE_FORMAT,
        "code": _code_digest(),
        "source": _source_identity(cfg, seed, synthetic_split, raw),
        "data": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_KEY},
        "tokenizer": tokenizer_digest(tokenizer),
    }


def cache_key(cfg: DataConfig, tokenizer, seed: int, synthetic_split: str, raw=None) -> str:
    """The name of this set's folder: a digest of key_parts."""
    return _key_of(key_parts(cfg, tokenizer, seed, synthetic_split, raw))


def _key_of(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = backend.to_str()
    else:  # a slow tokenizer: its vocabulary is what can be read
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
    h = hashlib.sha256(definition.encode())
    h.update(type(tokenizer).__name__.encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(str(getattr(tokenizer, "chat_template", "") or "").encode())
    for name in ("add_bos_token", "add_eos_token"):
        h.update(f"{name}={getattr(tokenizer, name, None)}".encode())
    return h.hexdigest()[:16]


def _code_digest() -> str:
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in CODE_FILES:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def _source_identity(cfg: DataConfig, seed: int, synthetic_split: str, raw) -> dict:
    if cfg.source == SYNTHETIC:
        return {"synthetic": synthetic_split, "size": cfg.synthetic_size, "seed": seed, "max_samples": cfg.max_samples}
    out: dict[str, Any] = {"max_samples": cfg.max_samples, "split": cfg.split}
    files = dd.source_files(cfg)
    if files is not None:
        out["files"] = [_file_identity(Path(f)) for f in files]
    elif os.path.isdir(cfg.source):  # a saved dataset: every file of it
        out["files"] = [_file_identity(p) for p in sorted(Path(cfg.source).rglob("*")) if p.is_file()]
    else:  # a hub dataset, already loaded: its fingerprint names its files and version
        out["hub"] = [cfg.source, getattr(raw.dataset, "_fingerprint", None) if raw is not None else None]
    return out


def _file_identity(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def is_hub_source(cfg: DataConfig) -> bool:
    return cfg.source != SYNTHETIC and not os.path.exists(cfg.source) and not glob.has_magic(cfg.source)


def is_tokenised_set(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def prepare(cfg: DataConfig, tokenizer, seed: int, synthetic_split: str = "train", say=None) -> TokenisedSet:
    """The tokenised set of cfg's source: a set saved with `dft-train --prepare-data`, read from the cache,
    or tokenised (and cached) now."""
    say = say or _say
    if os.path.isdir(cfg.source) and is_tokenised_set(cfg.source):
        return read_saved(cfg, tokenizer, say)
    root = cache_root(cfg)
    raw = dd.load_raw(cfg, seed, synthetic_split) if is_hub_source(cfg) or root is None else None
    if root is None:
        dataset, report = tokenise(raw, cfg, tokenizer, None, say)
        return TokenisedSet(dataset, report)
    parts = key_parts(cfg, tokenizer, seed, synthetic_split, raw)
    key = _key_of(parts)
    final = root / key
    found = _read(final)
    if found is not None:
        if _first_rank():
            say(f"data: read the tokenised set {final} ({found.report.samples} samples)")
        return found
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f"{key}.lock", say):
        found = _read(final)
        if found is not None:  # another process prepared it while this one waited
            if _first_rank():
                say(f"data: read the tokenised set {final}, prepared by another process ({found.report.samples} "
                    "samples)")
            return found
        staging = root / f"{key}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            raw = raw or dd.load_raw(cfg, seed, synthetic_split)
            dataset, report = tokenise(raw, cfg, tokenizer, staging, say)
            files = [os.path.basename(f["filename"]) for f in dataset.cache_files]
            prepared_by = {"rank": os.environ.get("RANK"), "pid": os.getpid(), "host": os.uname().nodename}
            manifest = {"format": CACHE_FORMAT, "files": files, "report": dataclasses.asdict(report),
                        "origin": raw.origin, "key": parts, "prepared_by": prepared_by}
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
            del dataset
            if final.exists():  # left by a process killed while it was renaming: never complete, never read
                shutil.rmtree(final)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    written = _read(final, hit=False)
    say(f"data: wrote the tokenised set {final}")
    return written


def read_saved(cfg: DataConfig, tokenizer, say) -> TokenisedSet:
    """data.source names a tokenised set: it is read as it is, when it was made with this tokenizer and
    these data settings (anything else would train on other tokens than the config says)."""
    path = Path(cfg.source)
    manifest = json.loads((path / MANIFEST).read_text())
    saved = manifest.get("key") or {}
    if manifest.get("format") != CACHE_FORMAT:
        raise DataError(f"data.source: {path} is a tokenised set of another format ({manifest.get('format')}, this "
                        f"dft_ds reads {CACHE_FORMAT}); prepare it again (dft-train --prepare-data)")
    problems = []
    if saved.get("tokenizer") != tokenizer_digest(tokenizer):
        problems.append("it was tokenised with another tokenizer than model.tokenizer / model.name_or_path names")
    now = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_KEY}
    for name, value in sorted(now.items()):
        was = saved.get("data", {}).get(name)
        if name not in ("max_samples",) and json.dumps(was, default=str) != json.dumps(value, default=str):
            problems.append(f"it was made with data.{name}={was}, this run has data.{name}={value}")
    if problems:
        raise DataError(f"data.source: {path} is a tokenised set that does not match this run: " + "; ".join(problems)
                        + ". Set the run's settings as the set's, or prepare the set again with dft-train "
                        "--prepare-data")
    found = _read(path)
    if _first_rank():
        say(f"data: read the tokenised set {path} ({found.report.samples} samples, from {manifest.get('origin')})")
    return found


def save_set(cfg: DataConfig, tokenizer, seed: int, out: Path, say=None) -> TokenisedSet:
    """`dft-train --prepare-data OUT`: the run's training set tokenised (or taken from the cache) and
    written to OUT, a folder that data.source=OUT reads without tokenising. Files are hard-linked from
    the cache where they can be."""
    say = say or _say
    if out.exists() and any(out.iterdir()):
        raise DataError(f"--prepare-data: {out} exists and is not empty; name a new folder")
    if cfg.cache_dir == "off":  # prepare into a cache of its own beside OUT, then move it in
        cfg = dataclasses.replace(cfg, cache_dir=str(out.parent / f".{out.name}.cache"))
    tokens = prepare(cfg, tokenizer, seed, say=say)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(tokens.path, staging, copy_function=link, ignore=shutil.ignore_patterns("digests"))
    if out.exists():
        out.rmdir()
    os.replace(staging, out)
    if cfg.cache_dir.endswith(f".{out.name}.cache"):
        shutil.rmtree(cfg.cache_dir, ignore_errors=True)
    say(f"data: saved the tokenised set in {out}; data.source={out} reads it")
    return tokens


def _read(path: Path, hit: bool = True) -> Optional[TokenisedSet]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    # pyarrow alone reads the memory-mapped Arrow stream files datasets.map wrote: a start that finds its
    # set cached does not import datasets (about 0.6 s of CPU a rank, with pandas).
    import pyarrow as pa

    parts = [pa.ipc.open_stream(pa.memory_map(str(path / name))).read_all() for name in manifest["files"]]
    table = parts[0] if len(parts) == 1 else pa.concat_tables(parts)
    return TokenisedSet(table, DataReport(**manifest["report"]), path, hit=hit)


@contextlib.contextmanager
def _locked(path: Path, say):
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if _first_rank():
                say(f"data: waiting for another process to prepare the tokenised set ({path})")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _first_rank() -> bool:
    """Rank 0 (or a run without ranks) reports reads of a set; any rank reports the work it does."""
    return os.environ.get("RANK", "0") == "0"


def default_workers(samples: int) -> int:
    """data.num_workers=0: one process per CPU this process may use, one per 2,000 samples at most
    (starting a process costs about a second)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, samples // 2000))


def tokenise(raw: dd.RawData, cfg: DataConfig, tokenizer, out_dir: Optional[Path], say) -> tuple[Any, DataReport]:
    """Every sample of `raw` through dd.Encoder by datasets.map; the layout is resolved once, from the
    first row, and every row must then have its fields. Fails on any malformed row (file:line)."""
    import datasets

    chat = dd.use_chat_template(cfg, tokenizer)
    report = DataReport(samples=len(raw.dataset))
    if not len(raw.dataset):
        raise DataError(f"{raw.origin}: the source holds no samples")
    first = raw.dataset[0]
    layout = dd.resolve_layout(cfg, first, raw.where(0))
    report.layout = layout.line(first)
    unused = dd.unused_fields(layout, first)
    if unused:
        report.warnings.append(f"data: field{'s' if len(unused) > 1 else ''} {', '.join(unused)} of {raw.origin} "
                               f"{'are' if len(unused) > 1 else 'is'} not used by the layout {layout.name}")
    workers = cfg.num_workers or default_workers(len(raw.dataset))
    workers = min(workers, len(raw.dataset))
    columns = features()
    encode = _EncodeBatch(dd.Encoder(cfg, tokenizer, chat, layout), dataclasses.replace(raw, dataset=None),
                          len(raw.dataset), workers)
    say(f"data: tokenising {len(raw.dataset):,} samples of {raw.origin} with {workers} process"
        f"{'es' if workers > 1 else ''}")
    kwargs = ({"cache_file_name": str(out_dir / "tokens.arrow")} if out_dir is not None else {"keep_in_memory": True})
    was_on = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # their carriage returns garble Slurm logs; _EncodeBatch prints lines
    start = time.perf_counter()
    try:
        dataset = raw.dataset.map(encode, batched=True, batch_size=256, with_indices=True, with_rank=workers > 1,
                                  num_proc=workers if workers > 1 else None, remove_columns=raw.dataset.column_names,
                                  features=columns, load_from_cache_file=False, new_fingerprint=_random_name(),
                                  **kwargs)
    finally:
        if was_on:
            datasets.enable_progress_bars()
    seconds = time.perf_counter() - start
    status = _column(dataset.data, "status")
    report.truncated = int((status == dd.TRUNCATED).sum())
    report.dropped_overlong = int((status == dd.OVERLONG).sum())
    report.truncated_away = int((status == dd.TRUNCATED_AWAY).sum())
    report.dropped_no_target = int((status == dd.NO_TARGET).sum()) + report.truncated_away
    say(f"data: tokenised {len(status):,} samples in {seconds:.1f} s ({len(status) / max(seconds, 1e-9):,.0f} "
        "samples/s)")
    report.warnings += _over_max_length(status, raw, cfg)
    if not (status <= dd.TRUNCATED).any():
        raise DataError(f"{raw.origin}: no samples left after filtering ({report.summary()}); "
                        f"check data.max_length={cfg.max_length} and data.overlong={cfg.overlong}")
    return dataset, report


OVERLONG_NAMED = 5  # rows over data.max_length named in the warning


def _over_max_length(status: np.ndarray, raw: dd.RawData, cfg: DataConfig) -> list[str]:
    """A warning naming the first rows over data.max_length (file:line), and what was done with them."""
    over = np.flatnonzero(np.isin(status, (dd.TRUNCATED, dd.OVERLONG, dd.TRUNCATED_AWAY)))
    if not len(over):
        return []
    away = int((status == dd.TRUNCATED_AWAY).sum())
    done = "dropped (data.overlong=drop)" if cfg.overlong == "drop" else \
        "truncated to it (data.overlong=truncate)" + (f"; {away:,} of them lost every target to the cut and were "
                                                      "dropped" if away else "")
    named = ", ".join(raw.where(int(i)) for i in over[:OVERLONG_NAMED])
    more = f", and {len(over) - OVERLONG_NAMED:,} more" if len(over) > OVERLONG_NAMED else ""
    return [f"data: {len(over):,} of {len(status):,} samples are longer than data.max_length={cfg.max_length} "
            f"tokens and were {done}: {named}{more}; raise data.max_length to keep them whole"]


def _random_name() -> str:
    return os.urandom(8).hex()


class _EncodeBatch:
    """datasets.map's function: a batch of rows to the four columns, with a progress line every
    PROGRESS_EVERY_S seconds from the first worker (its share times the workers, as an estimate)."""

    def __init__(self, encoder: dd.Encoder, raw: dd.RawData, total: int, workers: int):
        self.encoder, self.raw, self.total, self.workers = encoder, raw, total, workers
        self._done, self._start, self._last = 0, None, None

    def __call__(self, batch: dict, indices: list[int], rank: Optional[int] = None) -> dict:
        names = list(batch)
        rows = [{k: batch[k][j] for k in names} for j in range(len(indices))]
        encoded = self.encoder(rows, [self.raw.where(i) for i in indices])
        if not rank:
            self._progress(len(indices))
        return {"input_ids": [e[0] for e in encoded], "labels": [e[1] for e in encoded],
                "status": [e[2] for e in encoded],
                "targets": [int((e[1] != IGNORE_INDEX).sum()) for e in encoded]}

    def _progress(self, n: int) -> None:
        now = time.perf_counter()
        if self._start is None:
            self._start = self._last = now
        self._done += n
        if now - self._last < PROGRESS_EVERY_S:
            return
        self._last = now
        done = min(self.total, self._done * self.workers)
        rate = done / max(now - self._start, 1e-9)
        eta = (self.total - done) / max(rate, 1e-9)
        _say(f"data: tokenised {done:,} of {self.total:,} samples ({100 * done / self.total:.0f}%), "
             f"{rate:,.0f} samples/s, eta {time.strftime('%H:%M:%S', time.gmtime(eta))}")


# --------------------------------------------------------------------------------------------
# Training and held-out data


def build_train_data(cfg: DataConfig, tokenizer, seed: int) -> TrainData:
    return build_datasets(cfg, tokenizer, seed)[0]


def build_datasets(cfg: DataConfig, tokenizer, seed: int, say=None) -> tuple[TrainData, Optional[TrainData]]:
    """The training rows, and the held-out rows of data.eval_source or data.eval_fraction (or None).

    A held-out fraction is taken from data.source's tokenised samples by a seeded draw, before
    packing, so no held-out sample shares a row with a training one."""
    tokens = prepare(cfg, tokenizer, seed, say=say)
    report = dataclasses.replace(tokens.report, warnings=list(tokens.report.warnings))
    kept = tokens.kept()
    heldout = None
    if cfg.eval_source is not None:
        eval_cfg = dataclasses.replace(cfg, source=cfg.eval_source, split=cfg.eval_split, max_samples=None)
        e_tokens = prepare(eval_cfg, tokenizer, seed, synthetic_split="test", say=say)
        heldout = _as_rows(e_tokens, e_tokens.kept(), dataclasses.replace(e_tokens.report), cfg, tokenizer)
    elif cfg.eval_fraction:
        count = max(1, round(cfg.eval_fraction * len(kept)))
        if count >= len(kept):
            raise DataError(f"data.eval_fraction={cfg.eval_fraction} of {len(kept)} samples leaves none to train on; "
                            "lower it, or give held-out rows in data.eval_source")
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 7)
        held = np.zeros(len(kept), dtype=bool)
        held[torch.randperm(len(kept), generator=gen)[:count].numpy()] = True
        heldout = _as_rows(tokens, kept[held], DataReport(samples=count), cfg, tokenizer)
        kept = kept[~held]
        report.heldout = count
    return _as_rows(tokens, kept, report, cfg, tokenizer), heldout


def _as_rows(tokens: TokenisedSet, order: np.ndarray, report: DataReport, cfg: DataConfig, tokenizer) -> TrainData:
    rows = build_rows(tokens, order, cfg.max_length, cfg.packing, cfg.packing_method)
    report.rows = len(rows)
    report.tokens = int(tokens.lengths[order].sum())
    report.target_tokens = int(tokens.targets[order].sum())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise DataError("the tokenizer has neither a pad token nor an EOS token to pad with")
    return TrainData(rows, report, pad_id)
