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
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from dft_ds.batch import BatchSplit
from dft_ds.config import SYNTHETIC, DataConfig
from dft_ds.errors import DataError
from dft_ds.hub import looks_like_hub_name
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


def load_raw(cfg: DataConfig, seed: int, synthetic_split: str = "train") -> RawData:
    """The configured source as a `datasets.Dataset`, first `max_samples` rows only."""
    import datasets

    source = cfg.source
    lines = None
    if source == SYNTHETIC:
        from dft_ds import synthetic

        size = cfg.synthetic_size if synthetic_split == "train" else max(32, cfg.synthetic_size // 10)
        # The answer column is for grading; training reads prompt and response only.
        ds = synthetic.load_split(synthetic_split, size, seed).remove_columns(["answer"])
        origin = f"synthetic:{synthetic_split}"
    elif os.path.isfile(source):
        ext = os.path.splitext(source)[1].lower()
        if ext not in FILE_BUILDERS:
            raise DataError(f"{source}: unsupported file type '{ext}' (expected .jsonl, .json or .parquet)")
        if ext in (".jsonl", ".json"):
            lines = check_json_file(source, lambda row, where: resolve_layout(cfg, row, where).fields)
        ds = _load_quietly(lambda: datasets.load_dataset(FILE_BUILDERS[ext], data_files=source, split="train"),
                           source)
        origin = source
    elif os.path.isdir(source):
        ds, origin = _load_saved(source, cfg.split), source
    elif os.path.exists(source) or not looks_like_hub_name(source):
        raise DataError(f"data.source: '{source}' does not exist (expected a file, a saved dataset directory, "
                        "a hub dataset name such as owner/name, or 'synthetic')")
    else:
        ds = _load_quietly(lambda: datasets.load_dataset(source, split=cfg.split), f"hub dataset '{source}'")
        origin = f"{source}[{cfg.split}]"
    if cfg.max_samples is not None and len(ds) > cfg.max_samples:
        ds = ds.select(range(cfg.max_samples))
    return RawData(ds, origin, lines)


def check_json_file(path: str, fields=None) -> Optional[list[int]]:
    """Parse a .json/.jsonl file up front so a broken line or field is reported as file:line.

    Checking field types here matters: a column of mixed types makes the Arrow reader fail with a
    message that names neither the line nor the field. `fields` maps each needed field to its type,
    or is a function of the first row and its place that returns that map (the detected layout).
    Returns the line number of each row for JSON lines, None for a single JSON document.
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
        if callable(fields):
            fields = fields(row, f"{path}:{number}")
        for name, kind in (fields or {}).items():
            _field(row, name, kind, f"{path}:{number}")
        lines.append(number)
    if not lines:
        raise DataError(f"{path}: the file holds no samples{_sample_selection_note(path)}")
    return lines


# The file dft-sample writes beside the training set it selected (dft_ds/sample/outputs.py), and the
# field of each row that says where the row came from; dft-train reads neither for training.
SAMPLE_SELECTION = "selection.json"
PROVENANCE_FIELD = "dft_sample"


def _sample_selection_note(path: str) -> str:
    """For a dft-sample training set that kept nothing: its counts, and what to change."""
    selection = os.path.join(os.path.dirname(os.path.abspath(path)), SAMPLE_SELECTION)
    try:
        with open(selection, encoding="utf-8") as fh:
            c = json.load(fh)["counts"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return (f" (dft-sample kept none: {c['correct']} of {c['samples']} samples of {c['problems']} problems were "
            f"correct, and the selection in {selection} kept {c['kept']}); sample more answers per problem "
            "(--samples), from a stronger model, or with a looser selection (dft-sample filter)")


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
    import datasets

    # Its progress bars write carriage returns into Slurm logs, for files that load in a second.
    was_on = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return load()
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs the message, not the stack
        raise DataError(f"{what}: could not be loaded ({type(exc).__name__}: {exc})") from None
    finally:
        if was_on:
            datasets.enable_progress_bars()


# --------------------------------------------------------------------------------------------
# Rendering and tokenisation


def use_chat_template(cfg: DataConfig, tokenizer) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if cfg.template == "chat" and not has_template:
        raise DataError("data.template: 'chat' needs a tokenizer with a chat_template; this tokenizer has none "
                        "(use data.template=plain)")
    return cfg.template == "chat" or (cfg.template == "auto" and has_template)


# --------------------------------------------------------------------------------------------
# Layouts: which fields of a row hold the prompt, the response or the conversation

TEXT_OR_TURNS = (str, list)  # a plain string, or TRL's conversational form (a list of messages)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
ALPACA_FIELDS = ("instruction", "input", "output", "system", "history")


@dataclass(frozen=True)
class Layout:
    """How rows are read: the format, the fields it takes (with their types), and how it was chosen."""

    name: str                   # what the user is told, e.g. "NuminaMath-CoT (problem/solution)"
    format: str                 # prompt_response, messages, alpaca or sharegpt
    fields: dict                # field -> type (or tuple of types) every row must have
    optional: tuple = ()        # fields read when present
    detected: bool = False
    prompt_field: str = ""
    response_field: str = ""
    messages_field: str = ""

    def uses(self) -> set[str]:
        return set(self.fields) | set(self.optional)

    def line(self, row: dict) -> str:
        """What the user is told, naming the fields of `row` (the first) that the layout reads."""
        how = "detected from the fields" if self.detected else f"set by data.format={self.format}, fields"
        read = sorted(k for k in self.uses() if row.get(k) is not None)
        return f"layout {self.name}, {how} {', '.join(read)}"


def _pair(name: str, prompt: str, response: str, detected: bool) -> Layout:
    return Layout(name, "prompt_response", {prompt: TEXT_OR_TURNS, response: TEXT_OR_TURNS}, detected=detected,
                  prompt_field=prompt, response_field=response)


def _messages(field: str, detected: bool) -> Layout:
    return Layout(f"messages ({field})", "messages", {field: list}, detected=detected, messages_field=field)


def _sharegpt(field: str, detected: bool) -> Layout:
    return Layout(f"ShareGPT ({field}: from/value)", "sharegpt", {field: list}, detected=detected,
                  messages_field=field)


ALPACA = Layout("Alpaca (instruction/input/output)", "alpaca", {"instruction": str, "output": str},
                optional=("input", "system", "history"))


def _pair_name(cfg: DataConfig) -> str:
    fields = (cfg.prompt_field, cfg.response_field)
    return "prompt/response" if fields == ("prompt", "response") else f"prompt/response as {'/'.join(fields)}"


def resolve_layout(cfg: DataConfig, row: dict, where: str) -> Layout:
    """The layout data.format names, or with data.format=auto the first that the row's fields match:
    the configured prompt/response fields, TRL's prompt/completion, NuminaMath-CoT's problem/solution,
    the configured messages field, Alpaca's instruction/output, ShareGPT's conversations."""
    sharegpt_field = cfg.messages_field if cfg.messages_field != "messages" else "conversations"
    if cfg.format == "prompt_response":
        return _pair(_pair_name(cfg), cfg.prompt_field, cfg.response_field, False)
    if cfg.format == "messages":
        return _messages(cfg.messages_field, False)
    if cfg.format == "alpaca":
        return ALPACA
    if cfg.format == "sharegpt":
        return _sharegpt(sharegpt_field, False)
    present = {k for k, v in row.items() if v is not None}
    candidates = [
        (_pair(_pair_name(cfg), cfg.prompt_field, cfg.response_field, True), {cfg.prompt_field, cfg.response_field}),
        (_pair("TRL prompt/completion", "prompt", "completion", True), {"prompt", "completion"}),
        (_pair("NuminaMath-CoT (problem/solution)", "problem", "solution", True), {"problem", "solution"}),
        (_messages(cfg.messages_field, True), {cfg.messages_field}),
        (dataclasses.replace(ALPACA, detected=True), {"instruction", "output"}),
        (_sharegpt(sharegpt_field, True), {sharegpt_field}),
    ]
    for layout, needs in candidates:
        if needs <= present:
            return layout
    raise DataError(
        f"{where}: data.format=auto cannot tell the layout from the fields ({', '.join(sorted(present)) or 'none'}); "
        "expected prompt/response, prompt/completion, problem/solution, messages, instruction/output (Alpaca) or "
        "conversations (ShareGPT). Set data.format and the field names, e.g. data.format=prompt_response "
        "data.prompt_field=question data.response_field=answer (docs/data.md)")


def unused_fields(layout: Layout, row: dict) -> list[str]:
    return sorted(k for k, v in row.items() if v is not None and k not in layout.uses() and k != PROVENANCE_FIELD)


def sample_segments(row: dict, cfg: DataConfig, tokenizer, chat: bool, where: str,
                    layout: Optional[Layout] = None) -> list[tuple[str, bool]]:
    """A sample as (text, is_target) pieces, in order. The EOS after a plain response is added at
    tokenisation."""
    layout = layout or resolve_layout(cfg, row, where)
    if layout.format == "messages":
        return _chat_segments(_field(row, layout.messages_field, list, where), tokenizer, where)
    if layout.format == "sharegpt":
        return _chat_segments(_sharegpt_messages(_field(row, layout.messages_field, list, where), where),
                              tokenizer, where)
    if layout.format == "alpaca":
        context, prompt, response = _alpaca_parts(row, where)
        response_name = "output"
    else:
        context = []
        prompt = _field(row, layout.prompt_field, TEXT_OR_TURNS, where)
        response = _field(row, layout.response_field, TEXT_OR_TURNS, where)
        response_name = layout.response_field
        if isinstance(prompt, list) or isinstance(response, list):
            return _conversational_pair(prompt, response, layout, tokenizer, where)
    if not response.strip():
        raise DataError(f"{where}: field '{response_name}' is empty (a response needs text to learn from)")
    if chat:
        # The template renders the reply too, so its end-of-turn marker (not a bare EOS) is the target end.
        messages = context + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return _chat_segments(messages, tokenizer, where, first_target=len(messages) - 1)
    if any(m["role"] != "system" for m in context):
        raise DataError(f"{where}: field 'history' (earlier turns) needs a chat template to be rendered; set "
                        "data.template=chat with a tokenizer that has one, or remove the field")
    system = "".join(m["content"] + "\n\n" for m in context)
    return [(system + prompt + "\n", False), (response, True)]


def _field(row: dict, name: str, kind, where: str):
    if name not in row or row[name] is None:
        raise DataError(f"{where}: missing field '{name}' (fields present: {', '.join(k for k in row if row[k] is not None)})")
    value = row[name]
    if not isinstance(value, kind):
        expected = "str or a list of messages" if kind == TEXT_OR_TURNS else kind.__name__
        raise DataError(f"{where}: field '{name}' must be {expected}, got {type(value).__name__}")
    return value


def _alpaca_parts(row: dict, where: str) -> tuple[list[dict], str, str]:
    """(earlier turns, prompt, response) of an Alpaca row. The prompt is the instruction, then the
    input after a blank line when there is one, as Alpaca's own prompt sets them apart."""
    instruction = _field(row, "instruction", str, where)
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise DataError(f"{where}: field 'input' must be str, got {type(extra).__name__}")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    context = []
    system = row.get("system")
    if isinstance(system, str) and system.strip():
        context.append({"role": "system", "content": system})
    for i, turn in enumerate(row.get("history") or []):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise DataError(f"{where}: field 'history' item {i} must be a [user, assistant] pair of strings")
        context += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    return context, prompt, _field(row, "output", str, where)


def _sharegpt_messages(turns: list, where: str) -> list[dict]:
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: conversation turn {i} must be an object with string 'from' and 'value'")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise DataError(f"{where}: conversation turn {i} has the role '{turn['from']}'; ShareGPT rows may use "
                            f"{', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _is_turn_list(row: dict, layout: Layout) -> bool:
    return layout.format == "prompt_response" and isinstance(row.get(layout.prompt_field), list)


def _conversational_pair(prompt, response, layout: Layout, tokenizer, where: str) -> list[tuple[str, bool]]:
    """TRL's conversational prompt/completion: two lists of messages; only the completion's assistant
    turns are targets."""
    if not (isinstance(prompt, list) and isinstance(response, list)):
        raise DataError(f"{where}: fields '{layout.prompt_field}' ({type(prompt).__name__}) and "
                        f"'{layout.response_field}' ({type(response).__name__}) must both be text or both be lists "
                        "of messages (TRL's conversational form)")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in response):
        raise DataError(f"{where}: field '{layout.response_field}' has no assistant turn to learn from")
    return _chat_segments(prompt + response, tokenizer, where, first_target=len(prompt))


def _chat_segments(messages: list, tokenizer, where: str, first_target: int = 0) -> list[tuple[str, bool]]:
    """Render a conversation turn by turn; the text each assistant turn from `first_target` on adds
    is the target (earlier assistant turns are context)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: a conversation needs a tokenizer with a chat_template (set model.tokenizer to "
                        "one that has it)")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
            raise DataError(f"{where}: message {i} must be an object with string 'role' and 'content'")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages[first_target:]):
        raise DataError(f"{where}: the conversation has no non-empty assistant turn to learn from")
    segments, done = [], ""
    specials = _special_strings(tokenizer)
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant" and i >= first_target:
            # The generation prompt (e.g. "<|assistant|>\n") belongs to the prompt, even before a first turn.
            done = _append(segments, done, _render(tokenizer, messages[:i], where, generation=True), False, where)
        after = _render(tokenizer, messages[: i + 1], where)
        if msg["role"] != "assistant" or i < first_target:
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
    layout: str = ""
    heldout: int = 0        # samples set aside by data.eval_fraction
    warnings: list = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        layout = f"{self.layout}; " if self.layout else ""
        held = f" ({self.heldout} held out by data.eval_fraction)" if self.heldout else ""
        return (f"{layout}{self.samples} samples{held} -> {self.rows} rows, {self.tokens} tokens ({self.target_tokens} targets); "
                f"truncated {self.truncated}, dropped {self.dropped_overlong} over max_length and "
                f"{self.dropped_no_target} with no target left")


def tokenize_dataset(raw: RawData, cfg: DataConfig, tokenizer) -> tuple[list[list[int]], list[list[int]], DataReport]:
    """Tokenise every sample; apply the over-length policy; fail on any malformed row. The layout is
    resolved once, from the first row, and every row must then have its fields."""
    chat = use_chat_template(cfg, tokenizer)
    report = DataReport(samples=len(raw.dataset))
    if not len(raw.dataset):
        raise DataError(f"{raw.origin}: the source holds no samples")
    first = raw.dataset[0]
    layout = resolve_layout(cfg, first, raw.where(0))
    report.layout = layout.line(first)
    unused = unused_fields(layout, first)
    if unused:
        report.warnings.append(f"data: field{'s' if len(unused) > 1 else ''} {', '.join(unused)} of {raw.origin} "
                               f"{'are' if len(unused) > 1 else 'is'} not used by the layout {layout.name}")
    # Conversations are rendered by the chat template, which writes its own special tokens and ends
    # each reply itself; a plain prompt/response gets the tokenizer's special tokens and an EOS.
    conversational = layout.format in ("messages", "sharegpt")
    all_ids, all_labels = [], []
    for index, row in enumerate(raw.dataset):
        where = raw.where(index)
        segments = sample_segments(row, cfg, tokenizer, chat, where, layout)
        rendered = chat or conversational or _is_turn_list(row, layout)
        if rendered and not chat and not conversational:
            raise DataError(f"{where}: conversational prompt/completion rows need the chat template; "
                            "set data.template=auto or chat with a tokenizer that has one")
        ids, targets = tokenize_sample(segments, tokenizer, rendered, add_eos=not rendered)
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


def shard_rows(batch: dict[str, torch.Tensor], rank: int, parts: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Sequence parallelism (train.sequence_parallel = parts): this rank's contiguous slice of every row.

    Rows are first padded to a multiple of `parts` with a padding document of their own (positions from
    0, no targets), as collate pads. Labels are already shifted (labels[i] is the target of token i),
    so a document cut at a slice boundary loses no target: the token before the cut keeps the first
    token after it as its label. `n_tokens` (real tokens, for throughput) stays with slice 0 and is 0
    on the others, so a sum over the ranks counts each token once. Position ids keep their values:
    gathered again inside attention, they say where every document starts.
    """
    if parts == 1:
        return batch
    out = {k: v for k, v in batch.items() if not isinstance(v, torch.Tensor)}
    width = batch["input_ids"].shape[1]
    pad = -width % parts
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX}
    for key in ("input_ids", "labels", "position_ids"):
        value = batch[key]
        if pad:
            extra = (torch.arange(pad, dtype=value.dtype).expand(value.shape[0], pad) if key == "position_ids"
                     else torch.full((value.shape[0], pad), fill[key], dtype=value.dtype))
            value = torch.cat([value, extra], dim=1)
        out[key] = value.chunk(parts, dim=1)[rank].contiguous()
    if "n_tokens" in batch:
        # Throughput counts the row's real tokens once per group: on its first slice.
        out["n_tokens"] = batch["n_tokens"] if rank == 0 else 0
    return out


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

    def __init__(self, num_rows: int, plan: BatchSplit, rank: int, seed: int):
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
    return build_datasets(cfg, tokenizer, seed)[0]


def build_datasets(cfg: DataConfig, tokenizer, seed: int) -> tuple[TrainData, Optional[TrainData]]:
    """The training rows, and the held-out rows of data.eval_source or data.eval_fraction (or None).

    A held-out fraction is taken from data.source's tokenised samples by a seeded draw, before
    packing, so no held-out sample shares a row with a training one."""
    raw = load_raw(cfg, seed)
    ids, labels, report = tokenize_dataset(raw, cfg, tokenizer)
    heldout = None
    if cfg.eval_source is not None:
        eval_cfg = dataclasses.replace(cfg, source=cfg.eval_source, split=cfg.eval_split, max_samples=None)
        e_ids, e_labels, e_report = tokenize_dataset(load_raw(eval_cfg, seed, synthetic_split="test"), eval_cfg,
                                                     tokenizer)
        heldout = _as_rows(e_ids, e_labels, e_report, cfg, tokenizer)
    elif cfg.eval_fraction:
        count = max(1, round(cfg.eval_fraction * len(ids)))
        if count >= len(ids):
            raise DataError(f"data.eval_fraction={cfg.eval_fraction} of {len(ids)} samples leaves none to train on; "
                            "lower it, or give held-out rows in data.eval_source")
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 7)
        held = set(torch.randperm(len(ids), generator=gen)[:count].tolist())
        e_report = DataReport(samples=count)
        heldout = _as_rows([ids[i] for i in sorted(held)], [labels[i] for i in sorted(held)], e_report, cfg,
                           tokenizer)
        keep = [i for i in range(len(ids)) if i not in held]
        ids, labels = [ids[i] for i in keep], [labels[i] for i in keep]
        report.heldout = count
    return _as_rows(ids, labels, report, cfg, tokenizer), heldout


def _as_rows(ids: list[list[int]], labels: list[list[int]], report: DataReport, cfg: DataConfig,
             tokenizer) -> TrainData:
    rows = build_rows(ids, labels, cfg.max_length, cfg.packing)
    report.rows = len(rows)
    report.tokens = sum(len(i) for i in ids)
    report.target_tokens = sum(sum(lab != IGNORE_INDEX for lab in labs) for labs in labels)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise DataError("the tokenizer has neither a pad token nor an EOS token to pad with")
    return TrainData(rows, report, pad_id)
