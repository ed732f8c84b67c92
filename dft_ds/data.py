"""Data: load with `datasets`, render and tokenise with prompt masking, pack, and sample per rank.

A sample becomes token ids plus SHIFTED labels: `labels[t]` is the token that position t must
predict, or -100 where there is no target (prompt, padding, the last token of a document).
Shifting per document, before packing, means no position is ever asked to predict the first
token of the next document.

Rows in a batch are a concatenation of documents; `position_ids` restart at 0 for every
document (padding is one more document), and the attention mask is left to the model to build
from those restarts (transformers detects packed rows from position_ids when attention_mask is
None), so attention never crosses documents. One code path serves packed and unpacked rows.

This module knows nothing about the loss.
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from dft_ds.config import SYNTHETIC, BatchPlan, DataConfig
from dft_ds.errors import DataError
from dft_ds.loss import IGNORE_INDEX

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


# --------------------------------------------------------------------------------------------
# Loading


@dataclass
class RawData:
    """Rows to tokenise, where they came from, and (for JSON lines) the file line of each row."""

    dataset: Any
    origin: str
    line_of_row: Optional[list[int]] = None

    def where(self, index: int) -> str:
        if self.line_of_row is not None and index < len(self.line_of_row):
            return f"{self.origin}:{self.line_of_row[index]}"
        return f"{self.origin}: row {index}"


def load_raw(cfg: DataConfig, seed: int) -> RawData:
    """The configured source as a `datasets.Dataset`, first `max_samples` rows only."""
    import datasets

    source = cfg.source
    lines = None
    if source == SYNTHETIC:
        from dft_ds import synthetic

        ds, origin = synthetic.load_split("train", cfg.synthetic_size, seed), "synthetic:train"
    elif os.path.isfile(source):
        ext = os.path.splitext(source)[1].lower()
        if ext not in FILE_BUILDERS:
            raise DataError(f"{source}: unsupported file type '{ext}' (expected .jsonl, .json or .parquet)")
        if ext in (".jsonl", ".json"):
            lines = check_json_file(source, expected_fields(cfg))
        ds = _load_quietly(lambda: datasets.load_dataset(FILE_BUILDERS[ext], data_files=source, split="train"),
                           source)
        origin = source
    elif os.path.isdir(source):
        ds, origin = _load_saved(source, cfg.split), source
    elif os.path.exists(source) or source.startswith((".", "/", "~")) or source.endswith(tuple(FILE_BUILDERS)):
        raise DataError(f"data.source: '{source}' does not exist (expected a file, a saved dataset directory, "
                        "a hub dataset name or 'synthetic')")
    else:
        ds = _load_quietly(lambda: datasets.load_dataset(source, split=cfg.split), f"hub dataset '{source}'")
        origin = f"{source}[{cfg.split}]"
    if cfg.max_samples is not None and len(ds) > cfg.max_samples:
        ds = ds.select(range(cfg.max_samples))
    return RawData(ds, origin, lines)


def expected_fields(cfg: DataConfig) -> dict[str, type]:
    if cfg.format == "messages":
        return {cfg.messages_field: list}
    return {cfg.prompt_field: str, cfg.response_field: str}


def check_json_file(path: str, fields: Optional[dict[str, type]] = None) -> Optional[list[int]]:
    """Parse a .json/.jsonl file up front so a broken line or field is reported as file:line.

    Checking field types here matters: a column of mixed types makes the Arrow reader fail with a
    message that names neither the line nor the field. Returns the line number of each row for
    JSON lines, None for a single JSON document.
    """
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if path.endswith(".json"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # "Extra data" means it is JSON lines with a .json name
                raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        else:
            if not isinstance(doc, (list, dict)):
                raise DataError(f"{path}: expected a list of objects, got {type(doc).__name__}")
            return None
    lines = []
    for number, row in json_lines(path, text):
        for name, kind in (fields or {}).items():
            _field(row, name, kind, f"{path}:{number}")
        lines.append(number)
    if not lines:
        raise DataError(f"{path}: the file holds no samples")
    return lines


def json_lines(path: str, text: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a broken line is reported as file:line."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
        yield number, row


def _load_saved(path: str, split: str):
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError:
        raise DataError(f"{path}: not a dataset saved with datasets.save_to_disk "
                        "(expected dataset_info.json / dataset_dict.json)") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split '{split}' (data.split); available: {', '.join(ds)}")
        ds = ds[split]
    return ds


def _load_quietly(load, what: str):
    try:
        return load()
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs the message, not the stack
        raise DataError(f"{what}: could not be loaded ({type(exc).__name__}: {exc})") from None


# --------------------------------------------------------------------------------------------
# Rendering and tokenisation


def use_chat_template(cfg: DataConfig, tokenizer) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if cfg.template == "chat" and not has_template:
        raise DataError("data.template: 'chat' needs a tokenizer with a chat_template; this tokenizer has none "
                        "(use data.template=plain)")
    return cfg.template == "chat" or (cfg.template == "auto" and has_template)


def sample_segments(row: dict, cfg: DataConfig, tokenizer, chat: bool, where: str) -> list[tuple[str, bool]]:
    """A sample as (text, is_target) pieces, in order. The EOS after a response is added at tokenisation."""
    if cfg.format == "messages":
        return _chat_segments(_field(row, cfg.messages_field, list, where), tokenizer, where)
    prompt = _field(row, cfg.prompt_field, str, where)
    response = _field(row, cfg.response_field, str, where)
    if not response.strip():
        raise DataError(f"{where}: field '{cfg.response_field}' is empty (a response needs text to learn from)")
    if chat:
        # The template renders the reply too, so its end-of-turn marker (not a bare EOS) is the target end.
        return _chat_segments([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                              tokenizer, where)
    return [(prompt + "\n", False), (response, True)]


def _field(row: dict, name: str, kind: type, where: str):
    if name not in row or row[name] is None:
        raise DataError(f"{where}: missing field '{name}' (fields present: {', '.join(k for k in row if row[k] is not None)})")
    value = row[name]
    if not isinstance(value, kind):
        raise DataError(f"{where}: field '{name}' must be {kind.__name__}, got {type(value).__name__}")
    return value


def _chat_segments(messages: list, tokenizer, where: str) -> list[tuple[str, bool]]:
    """Render a conversation turn by turn; the text each assistant turn adds is the target."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: data.format=messages needs a tokenizer with a chat_template")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise DataError(f"{where}: message {i} must be an object with string 'role' and 'content'")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise DataError(f"{where}: the conversation has no non-empty assistant turn to learn from")
    segments, done = [], ""
    specials = _special_strings(tokenizer)
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant":
            # The generation prompt (e.g. "<|assistant|>\n") belongs to the prompt, even before a first turn.
            done = _append(segments, done, _render(tokenizer, messages[:i], where, generation=True), False, where)
        after = _render(tokenizer, messages[: i + 1], where)
        if msg["role"] != "assistant":
            done = _append(segments, done, after, False, where)
            continue
        # The target is the reply up to its end-of-turn marker; what a template writes after the
        # marker (the newline between turns in ChatML and Gemma) is not part of the reply.
        added = after[len(done):] if after.startswith(done) else ""
        end = _turn_end(added, specials)
        done = _append(segments, done, done + added[:end], True, where)
        done = _append(segments, done, after, False, where)
    return segments


def _special_strings(tokenizer) -> list[str]:
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False):
            found.add(str(token))
    return sorted((t for t in found if t), key=len, reverse=True)


def _turn_end(added: str, specials: list[str]) -> int:
    """Where an assistant turn's text ends: after its last special token when only whitespace follows
    it, else at the end of the text."""
    best = -1
    for token in specials:
        at = added.rfind(token)
        if at >= 0:
            best = max(best, at + len(token))
    if best < 0 or added[best:].strip():
        return len(added)
    return best


def _render(tokenizer, messages: list, where: str, generation: bool = False) -> str:
    """The chat template's text, or a DataError naming the row (e.g. a template that refuses a role)."""
    try:
        if generation:
            return _generation_prompt(tokenizer, messages)
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # jinja's TemplateError, or raise_exception() inside the template
        roles = ", ".join(m["role"] for m in messages)
        raise DataError(f"{where}: the tokenizer's chat template refuses this conversation ({exc}; roles: {roles}); "
                        "fix the data, or set model.tokenizer to a tokenizer whose template accepts it") from None


def _generation_prompt(tokenizer, history: list) -> str:
    if history:
        return tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    # transformers refuses to render an empty conversation: render a first assistant turn holding a
    # marker and keep what comes before it (the BOS and the turn header).
    marker = "\x00dft-ds-turn\x00"
    rendered = tokenizer.apply_chat_template([{"role": "assistant", "content": marker}], tokenize=False)
    return rendered.split(marker)[0] if marker in rendered else ""


def _append(segments: list, done: str, rendered: str, target: bool, where: str) -> str:
    if not rendered.startswith(done):
        raise DataError(f"{where}: the chat template does not render the conversation incrementally, "
                        "so assistant turns cannot be located")
    if len(rendered) > len(done):
        segments.append((rendered[len(done):], target))
    return rendered


def tokenize_sample(segments: list[tuple[str, bool]], tokenizer, chat_rendered: bool, add_eos: bool):
    """Token ids and per-token target flags for one sample.

    The whole text is tokenised at once (a piece tokenised alone can split differently from the same
    piece in context, e.g. a leading-space marker), and each token is a target when its first
    character lies in a target segment. A chat-rendered text already holds its own BOS.
    """
    text = "".join(piece for piece, _ in segments)
    enc = tokenizer(text, add_special_tokens=not chat_rendered, return_offsets_mapping=True)
    bounds, flags, pos = [], [], 0
    for piece, target in segments:
        pos += len(piece)
        bounds.append(pos)
        flags.append(target)
    ids = list(enc["input_ids"])
    targets = []
    for start, end in enc["offset_mapping"]:
        if end == start:  # special tokens added by the tokenizer (BOS) carry no text
            targets.append(False)
            continue
        targets.append(flags[bisect.bisect_right(bounds, start)] if start < pos else False)
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        targets.append(True)
    return ids, targets


def shift_labels(ids: list[int], targets: list[bool]) -> list[int]:
    """labels[t] = ids[t+1] where token t+1 is a target; the last position has nothing to predict."""
    labels = [tok if tgt else IGNORE_INDEX for tok, tgt in zip(ids[1:], targets[1:])]
    return labels + [IGNORE_INDEX]


@dataclass
class DataReport:
    """Counts reported to the user after tokenisation."""

    samples: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_target: int = 0
    rows: int = 0
    target_tokens: int = 0
    tokens: int = 0

    def summary(self) -> str:
        return (f"{self.samples} samples -> {self.rows} rows, {self.tokens} tokens ({self.target_tokens} targets); "
                f"truncated {self.truncated}, dropped {self.dropped_overlong} over max_length and "
                f"{self.dropped_no_target} with no target left")


def tokenize_dataset(raw: RawData, cfg: DataConfig, tokenizer) -> tuple[list[list[int]], list[list[int]], DataReport]:
    """Tokenise every sample; apply the over-length policy; fail on any malformed row."""
    chat = use_chat_template(cfg, tokenizer)
    is_chat_rendered = chat or cfg.format == "messages"
    add_eos = cfg.format == "prompt_response" and not chat  # a chat template ends the reply itself
    report = DataReport(samples=len(raw.dataset))
    all_ids, all_labels = [], []
    for index, row in enumerate(raw.dataset):
        where = raw.where(index)
        segments = sample_segments(row, cfg, tokenizer, chat, where)
        ids, targets = tokenize_sample(segments, tokenizer, is_chat_rendered, add_eos)
        labels = shift_labels(ids, targets)
        was_long = len(ids) > cfg.max_length
        if was_long and cfg.overlong == "drop":
            report.dropped_overlong += 1
            continue
        if was_long:
            # Truncating after shifting keeps the last kept position's target (the next token exists).
            ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
        if all(lab == IGNORE_INDEX for lab in labels):
            report.dropped_no_target += 1
            continue
        report.truncated += was_long
        all_ids.append(ids)
        all_labels.append(labels)
    if not all_ids:
        raise DataError(f"{raw.origin}: no samples left after filtering ({report.summary()}); "
                        f"check data.max_length={cfg.max_length} and data.overlong={cfg.overlong}")
    return all_ids, all_labels, report


# --------------------------------------------------------------------------------------------
# Rows: packing and batching


@dataclass
class Rows:
    """Training rows: each a list of documents' (ids, labels) pairs that fit in max_length."""

    docs: list[list[tuple[list[int], list[int]]]]

    def __len__(self) -> int:
        return len(self.docs)


def build_rows(ids: list[list[int]], labels: list[list[int]], max_length: int, packing: bool) -> Rows:
    """One document per row, or greedy in-order packing of documents into rows of max_length."""
    if not packing:
        return Rows([[(i, lab)] for i, lab in zip(ids, labels)])
    rows, current, used = [], [], 0
    for doc_ids, doc_labels in zip(ids, labels):
        if current and used + len(doc_ids) > max_length:
            rows.append(current)
            current, used = [], 0
        current.append((doc_ids, doc_labels))
        used += len(doc_ids)
    if current:
        rows.append(current)
    return Rows(rows)


def collate(rows: list[list[tuple[list[int], list[int]]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenate each row's documents, restart positions per document, pad to the longest row.

    Padding is a document of its own (positions from 0, no targets), so it never sees the real tokens
    and they never see it.
    """
    width = max(sum(len(d) for d, _ in row) for row in rows)
    input_ids, labels, positions = [], [], []
    for row in rows:
        r_ids, r_lab, r_pos = [], [], []
        for doc_ids, doc_labels in row:
            r_ids += doc_ids
            r_lab += doc_labels
            r_pos += range(len(doc_ids))
        pad = width - len(r_ids)
        input_ids.append(r_ids + [pad_id] * pad)
        labels.append(r_lab + [IGNORE_INDEX] * pad)
        positions.append(r_pos + list(range(pad)))
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": torch.tensor(positions, dtype=torch.long),
    }


# --------------------------------------------------------------------------------------------
# Sampling


class StepSampler:
    """Deterministic, resumable assignment of rows to (optimizer step, rank, micro-batch).

    Each epoch is a seeded permutation of the rows; optimizer step k of the epoch takes the k-th
    slice of global_batch_size rows; rank r takes its contiguous share and splits it into
    micro-batches. The set of rows in a step depends only on (seed, step, global batch), never on
    how it is split into ranks and micro-batches, so a resume on another world size continues with
    the same samples. The position is one integer: the next optimizer step. An incomplete last
    global batch of an epoch is dropped.
    """

    def __init__(self, num_rows: int, plan: BatchPlan, rank: int, seed: int):
        self.num_rows, self.plan, self.rank, self.seed = num_rows, plan, rank, seed
        self.steps_per_epoch = num_rows // plan.global_batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"the data gives {num_rows} rows, fewer than one global batch of "
                            f"{plan.global_batch_size} (train.global_batch_size)")
        self.step = 0
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.num_rows, generator=gen), epoch
        return self._perm

    def indices_for_step(self, step: int) -> list[list[int]]:
        """This rank's micro-batches (lists of row indices) for optimizer step `step`."""
        epoch, k = divmod(step, self.steps_per_epoch)
        plan = self.plan
        share = plan.micro_batch_size * plan.gradient_accumulation_steps
        start = k * plan.global_batch_size + self.rank * share
        mine = self._permutation(epoch)[start:start + share].tolist()
        m = plan.micro_batch_size
        return [mine[i:i + m] for i in range(0, share, m)]

    def __iter__(self) -> Iterator[list[list[int]]]:
        while True:
            batch = self.indices_for_step(self.step)
            self.step += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "seed": self.seed, "global_batch_size": self.plan.global_batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["global_batch_size"] != self.plan.global_batch_size or state["seed"] != self.seed:
            raise DataError(f"sampler state was saved with seed {state['seed']} and global batch "
                            f"{state['global_batch_size']}; this run has {self.seed} and {self.plan.global_batch_size}")
        self.step = state["step"]


@dataclass
class TrainData:
    rows: Rows
    report: DataReport
    pad_id: int

    def batch(self, indices: list[int]) -> dict:
        """Model inputs for these rows, plus `n_tokens`: the real (unpadded) tokens, for throughput."""
        rows = [self.rows.docs[i] for i in indices]
        batch = collate(rows, self.pad_id)
        batch["n_tokens"] = sum(len(ids) for row in rows for ids, _ in row)
        return batch


def build_train_data(cfg: DataConfig, tokenizer, seed: int) -> TrainData:
    raw = load_raw(cfg, seed)
    ids, labels, report = tokenize_dataset(raw, cfg, tokenizer)
    rows = build_rows(ids, labels, cfg.max_length, cfg.packing)
    report.rows = len(rows)
    report.tokens = sum(len(i) for i in ids)
    report.target_tokens = sum(sum(lab != IGNORE_INDEX for lab in labs) for labs in labels)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise DataError("the tokenizer has neither a pad token nor an EOS token to pad with")
    return TrainData(rows, report, pad_id)
