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

import dataclasses
import glob
import json
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from dft_ds.batch import BatchSplit
from dft_ds.config import SYNTHETIC, DataConfig
from dft_ds.errors import DataError
from dft_ds.hub import looks_like_hub_name
from dft_ds.loss import IGNORE_INDEX

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json", ".parquet": "parquet",
                 ".csv": "csv"}
ACCEPTED = ("a .jsonl, .json, .jsonl.gz, .json.gz, .parquet or .csv file, a directory or glob of such files (one "
            "type), a directory saved by datasets.save_to_disk, a hub dataset name such as owner/name, or 'synthetic'")


def file_kind(path: str) -> str:
    """The extension that decides how a data file is read ('.jsonl.gz' counts as one), lower case."""
    name = os.path.basename(path).lower()
    for ext in sorted(FILE_BUILDERS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return os.path.splitext(name)[1]


def is_saved_dataset(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_info.json", "dataset_dict.json", "state.json"))


def source_files(cfg: DataConfig) -> Optional[list[str]]:
    """The data files a file, glob or directory of shards names, sorted; None for a saved dataset, a hub
    name or synthetic. A directory's files may be split by name (train-00000-of-00002.parquet, as a hub
    snapshot holds them): those of data.split are taken when any carry it."""
    source = cfg.source
    if source == SYNTHETIC:
        return None
    if os.path.isfile(source):
        return [source]
    if os.path.isdir(source):
        if is_saved_dataset(source):
            return None
        found = sorted(str(p) for p in Path(source).rglob("*") if p.is_file() and file_kind(str(p)) in FILE_BUILDERS
                       and not any(part.startswith(".") for part in p.relative_to(source).parts))
        if not found:
            raise DataError(f"data.source: the directory '{source}' holds no data files and is not a dataset saved "
                            f"with datasets.save_to_disk (expected {ACCEPTED})")
        split = [f for f in found if _names_split(f, source, cfg.split)]
        return _one_kind(split or found, source)
    if glob.has_magic(source):
        found = sorted(f for f in glob.glob(os.path.expanduser(source), recursive=True) if os.path.isfile(f))
        if not found:
            raise DataError(f"data.source: the pattern '{source}' matches no file")
        return _one_kind(found, source)
    return None


def _names_split(path: str, root: str, split: str) -> bool:
    rel = os.path.relpath(path, root).lower().replace(os.sep, "/")
    name = rel.rsplit("/", 1)[-1]
    return f"/{split}/" in f"/{rel}" or name.startswith((f"{split}-", f"{split}_", f"{split}."))


def _one_kind(files: list[str], source: str) -> list[str]:
    kinds = sorted({file_kind(f) for f in files})
    unsupported = [k for k in kinds if k not in FILE_BUILDERS]
    if unsupported:
        raise DataError(f"data.source: '{source}' holds files of an unsupported type ({', '.join(unsupported)}); "
                        f"expected {ACCEPTED}")
    if len({FILE_BUILDERS[k] for k in kinds}) > 1:
        raise DataError(f"data.source: '{source}' mixes file types ({', '.join(kinds)}); give one type (a glob such "
                        "as 'data/*.parquet' picks them)")
    return files


# --------------------------------------------------------------------------------------------
# Loading


@dataclass
class RawData:
    """Rows to tokenise, where they came from, and (for JSON lines) the file line of each row; with
    several files, the file of each row too (an index into `files`)."""

    dataset: Any
    origin: str
    line_of_row: Optional[Any] = None
    file_of_row: Optional[Any] = None
    files: Optional[list[str]] = None

    def where(self, index: int) -> str:
        if self.line_of_row is not None and index < len(self.line_of_row):
            name = self.files[self.file_of_row[index]] if self.file_of_row is not None else self.origin
            return f"{name}:{self.line_of_row[index]}"
        return f"{self.origin}: row {index}"


def load_raw(cfg: DataConfig, seed: int, synthetic_split: str = "train") -> RawData:
    """The configured source as a `datasets.Dataset`, first `max_samples` rows only."""
    import datasets

    source = cfg.source
    lines = file_of_row = files = None
    if source == SYNTHETIC:
        from dft_ds import synthetic

        size = cfg.synthetic_size if synthetic_split == "train" else max(32, cfg.synthetic_size // 10)
        # The answer column is for grading; training reads prompt and response only.
        ds = synthetic.load_split(synthetic_split, size, seed).remove_columns(["answer"])
        origin = f"synthetic:{synthetic_split}"
    elif source_files(cfg) is not None:
        files = source_files(cfg)
        kind = file_kind(files[0])
        if kind not in FILE_BUILDERS:
            raise DataError(f"{source}: unsupported file type '{kind}' (expected {ACCEPTED})")
        if FILE_BUILDERS[kind] == "json":
            layout = []  # resolved from the first row of the first file, then required of every file

            def fields(row, where):
                if not layout:
                    layout.append(resolve_layout(cfg, row, where).fields)
                return layout[0]

            per_file = [check_json_file(f, fields) for f in files]
            if all(p is not None for p in per_file):
                import numpy as np

                lines = np.concatenate([np.asarray(p, dtype=np.int32) for p in per_file])
                file_of_row = np.concatenate([np.full(len(p), i, dtype=np.int32) for i, p in enumerate(per_file)])
        ds = _load_quietly(lambda: datasets.load_dataset(FILE_BUILDERS[kind], data_files=files, split="train"),
                           source)
        origin = source
        if len(files) == 1:
            file_of_row, files = None, None
    elif os.path.isdir(source):
        ds, origin = _load_saved(source, cfg.split), source
    elif os.path.exists(source) or not looks_like_hub_name(source):
        raise DataError(f"data.source: '{source}' does not exist (expected {ACCEPTED})")
    else:
        ds = _load_quietly(lambda: datasets.load_dataset(source, split=cfg.split), f"hub dataset '{source}'")
        origin = f"{source}[{cfg.split}]"
    if cfg.max_samples is not None and len(ds) > cfg.max_samples:
        ds = ds.select(range(cfg.max_samples))
    return RawData(ds, origin, lines, file_of_row, files)


def check_json_file(path: str, fields=None) -> Optional[list[int]]:
    """Parse a .json/.jsonl file up front so a broken line or field is reported as file:line.

    Checking field types here matters: a column of mixed types makes the Arrow reader fail with a
    message that names neither the line nor the field. `fields` maps each needed field to its type,
    or is a function of the first row and its place that returns that map (the detected layout).
    Returns the line number of each row for JSON lines, None for a single JSON document.
    """
    if file_kind(path) in (".json", ".json.gz"):
        with _open_text(path) as fh:
            text = fh.read()
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # "Extra data" means it is JSON lines with a .json name
                raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        else:
            if not isinstance(doc, (list, dict)):
                raise DataError(f"{path}: expected a list of objects, got {type(doc).__name__}")
            return None
        del text
    with _open_text(path) as fh:  # line by line: a large file is never one string
        lines = list(_checked_rows(path, fh, fields))
    if not lines:
        raise DataError(f"{path}: the file holds no samples{_sample_selection_note(path)}")
    return lines


def _open_text(path: str):
    if path.lower().endswith(".gz"):
        import gzip

        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _checked_rows(path: str, lines, fields) -> Iterator[int]:
    for number, row in json_lines(path, lines):
        if callable(fields):
            fields = fields(row, f"{path}:{number}")
        for name, kind in (fields or {}).items():
            _field(row, name, kind, f"{path}:{number}")
        yield number


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


def json_lines(path: str, text) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a text or an open file; a broken line is reported
    as file:line."""
    for number, line in enumerate(text.splitlines() if isinstance(text, str) else text, start=1):
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
# LLaMA-Factory's tool turns: `function_call` is an assistant's call (a JSON {"name", "arguments"}, or a
# list of them), `observation` the tool's result.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "function_call": "assistant", "observation": "tool", "tool": "tool"}
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
    return Layout(name, "prompt_response", {prompt: TEXT_OR_TURNS, response: TEXT_OR_TURNS}, optional=("tools",),
                  detected=detected, prompt_field=prompt, response_field=response)


def _messages(field: str, detected: bool) -> Layout:
    return Layout(f"messages ({field})", "messages", {field: list}, optional=("tools",), detected=detected,
                  messages_field=field)


def _sharegpt(field: str, detected: bool) -> Layout:
    return Layout(f"ShareGPT ({field}: from/value)", "sharegpt", {field: list}, optional=("system", "tools"),
                  detected=detected, messages_field=field)


def _has_role_turns(row: dict, field: str) -> bool:
    """Whether `field` holds role/content messages (the messages layout under a ShareGPT name)."""
    turns = row.get(field)
    return (isinstance(turns, list) and bool(turns) and isinstance(turns[0], dict) and "from" not in turns[0]
            and isinstance(turns[0].get("role"), str))


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
        # ShareGPT's field name with OpenAI's role/content turns, as many exports write it
        (_messages(sharegpt_field, True) if _has_role_turns(row, sharegpt_field) else _sharegpt(sharegpt_field, True),
         {sharegpt_field}),
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
    tools = _row_tools(row.get("tools"), where) if "tools" in layout.optional else None
    if layout.format == "messages":
        return _chat_segments(_field(row, layout.messages_field, list, where), tokenizer, where, tools=tools)
    if layout.format == "sharegpt":
        messages = _sharegpt_messages(_field(row, layout.messages_field, list, where), layout.messages_field, where)
        system = row.get("system")
        if isinstance(system, str) and system.strip() and not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": system})
        return _chat_segments(messages, tokenizer, where, tools=tools)
    if layout.format == "alpaca":
        context, prompt, response = _alpaca_parts(row, where)
        response_name = "output"
    else:
        context = []
        prompt = _field(row, layout.prompt_field, TEXT_OR_TURNS, where)
        response = _field(row, layout.response_field, TEXT_OR_TURNS, where)
        response_name = layout.response_field
        if isinstance(prompt, list) or isinstance(response, list):
            return _conversational_pair(prompt, response, layout, tokenizer, where, tools)
    if not response.strip():
        raise DataError(f"{where}: field '{response_name}' is empty (a response needs text to learn from)")
    if chat:
        # The template renders the reply too, so its end-of-turn marker (not a bare EOS) is the target end.
        messages = context + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return _chat_segments(messages, tokenizer, where, first_target=len(messages) - 1, tools=tools)
    if tools:
        raise DataError(f"{where}: field 'tools' needs a chat template to be rendered (the model must see the tool "
                        "schemas); set data.template=chat with a tokenizer that has one, or remove the field")
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


def _sharegpt_messages(turns: list, field: str, where: str) -> list[dict]:
    messages = []
    for i, turn in enumerate(turns):
        if isinstance(turn, dict) and turn.get("from") is None and isinstance(turn.get("role"), str):
            raise DataError(f"{where}: conversation turn {i} has 'role' and 'content' (OpenAI's messages), not "
                            f"ShareGPT's 'from' and 'value'; set data.format=messages data.messages_field={field}")
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: conversation turn {i} must be an object with string 'from' and 'value'")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise DataError(f"{where}: conversation turn {i} has the role '{turn['from']}'; ShareGPT rows may use "
                            f"{', '.join(SHAREGPT_ROLES)}")
        if turn["from"] == "function_call":
            try:
                calls = json.loads(turn["value"])
            except ValueError as exc:
                raise DataError(f"{where}: conversation turn {i} (function_call) is not JSON ({exc}); expected "
                                '{"name": ..., "arguments": {...}} or a list of them') from None
            messages.append({"role": "assistant", "content": "", "tool_calls": _tool_calls(calls, where, i)})
        else:
            messages.append({"role": role, "content": turn["value"]})
    return messages


def _without_nulls(value):
    """`value` with null entries of objects removed, at every depth. An Arrow table gives every row
    the union of all rows' keys, filling the missing ones with null (a message gets `tool_calls: null`,
    a call gets the other calls' argument names); rendered, they would teach the model arguments that
    were never written. An argument written as null is dropped with them."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _row_tools(value, where: str) -> Optional[list[dict]]:
    """A row's tool schemas as the chat template takes them (OpenAI's {"type": "function", "function":
    {...}} each), from a list, one schema, or a string of JSON (LLaMA-Factory's `tools` column)."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise DataError(f"{where}: field 'tools' is a string but not JSON ({exc}); expected a list of tool "
                            "schemas, or a string holding one") from None
    tools = [value] if isinstance(value, dict) else value
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{where}: field 'tools' must be a list of tool schemas (objects), got {type(value).__name__}")
    out = []
    for i, tool in enumerate(_without_nulls(tools)):
        if isinstance(tool.get("function"), dict):
            out.append(tool)
        elif isinstance(tool.get("name"), str):  # a bare function schema: name, description, parameters
            out.append({"type": "function", "function": tool})
        else:
            raise DataError(f"{where}: field 'tools' item {i} names no function (expected {{\"name\": ..., "
                            "\"parameters\": {...}} or {\"type\": \"function\", \"function\": {...}})")
    return out or None


def _tool_calls(calls, where: str, i: int) -> list[dict]:
    """An assistant's tool calls as chat templates take them: {"type": "function", "function": {"name",
    "arguments": an object}}. OpenAI writes the arguments as a string of JSON; templates write them out
    with tojson, so a string would reach the model quoted twice."""
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list) or not calls:
        raise DataError(f"{where}: message {i}: tool calls must be a list of calls, got {type(calls).__name__}")
    out = []
    for call in calls:
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DataError(f"{where}: message {i}: a tool call must name its function: {{\"name\": ..., "
                            "\"arguments\": {...}}, or OpenAI's {\"function\": {\"name\": ..., \"arguments\": ...}}")
        args = fn.get("arguments", fn.get("parameters"))
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise DataError(f"{where}: message {i}: the arguments of the call to '{fn['name']}' are a string "
                                "but not JSON") from None
        args = {} if args is None else args
        if not isinstance(args, dict):
            raise DataError(f"{where}: message {i}: the arguments of the call to '{fn['name']}' must be an object, "
                            f"got {type(args).__name__}")
        one = {"type": "function", "function": {"name": fn["name"], "arguments": _without_nulls(args)}}
        if isinstance(call, dict) and isinstance(call.get("id"), str):
            one["id"] = call["id"]
        out.append(one)
    return out


def _chat_message(msg, i: int, where: str) -> dict:
    """One message as the chat template gets it: no null fields, tool calls in the templates' shape, a
    tool result as text."""
    if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
        raise DataError(f"{where}: message {i} must be an object with string 'role' and 'content'")
    msg = {k: v for k, v in msg.items() if v is not None}
    if msg.get("tool_calls") == []:
        del msg["tool_calls"]
    if "tool_calls" in msg:
        if msg["role"] != "assistant":
            raise DataError(f"{where}: message {i} ({msg['role']}) has tool calls; only an assistant's turn may")
        msg["tool_calls"] = _tool_calls(msg["tool_calls"], where, i)
        msg.setdefault("content", "")
    if msg["role"] == "tool" and isinstance(msg.get("content"), (dict, list)):
        msg["content"] = json.dumps(msg["content"], ensure_ascii=False)
    if not isinstance(msg.get("content"), str):
        raise DataError(f"{where}: message {i} must be an object with string 'role' and 'content'")
    return msg


def _is_turn_list(row: dict, layout: Layout) -> bool:
    return layout.format == "prompt_response" and isinstance(row.get(layout.prompt_field), list)


def _conversational_pair(prompt, response, layout: Layout, tokenizer, where: str,
                         tools: Optional[list] = None) -> list[tuple[str, bool]]:
    """TRL's conversational prompt/completion: two lists of messages; only the completion's assistant
    turns are targets."""
    if not (isinstance(prompt, list) and isinstance(response, list)):
        raise DataError(f"{where}: fields '{layout.prompt_field}' ({type(prompt).__name__}) and "
                        f"'{layout.response_field}' ({type(response).__name__}) must both be text or both be lists "
                        "of messages (TRL's conversational form)")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in response):
        raise DataError(f"{where}: field '{layout.response_field}' has no assistant turn to learn from")
    return _chat_segments(prompt + response, tokenizer, where, first_target=len(prompt), tools=tools)


def _chat_segments(messages: list, tokenizer, where: str, first_target: int = 0,
                   tools: Optional[list] = None) -> list[tuple[str, bool]]:
    """Render a conversation (with the row's tool schemas, if any); the text each assistant turn from
    `first_target` on adds is the target (earlier assistant turns, and every other turn, are context).

    A tool call is an assistant turn, so it is a target; a tool's result is context."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: a conversation needs a tokenizer with a chat_template (set model.tokenizer to "
                        "one that has it)")
    messages = [_chat_message(msg, i, where) for i, msg in enumerate(messages)]
    if not any(m["role"] == "assistant" and (m["content"].strip() or m.get("tool_calls"))
               for m in messages[first_target:]):
        raise DataError(f"{where}: the conversation has no non-empty assistant turn to learn from")
    segments, done = [], ""
    specials = _special_strings(tokenizer)
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant" or i < first_target:
            continue
        # The generation prompt (e.g. "<|assistant|>\n") belongs to the prompt, even before a first turn.
        done = _append(segments, done, _render(tokenizer, messages[:i], where, tools, generation=True), False, where)
        after = _render(tokenizer, messages[: i + 1], where, tools)
        # The target is the reply up to its end-of-turn marker; what a template writes after the
        # marker (the newline between turns in ChatML and Gemma) is not part of the reply.
        added = after[len(done):] if after.startswith(done) else ""
        done = _append(segments, done, done + added[:_turn_end(added, specials)], True, where)
    # Context turns are rendered with what follows them: a template may join consecutive tool results
    # into one turn, so a conversation cut after one of them is not a prefix of the whole.
    rendered = _render(tokenizer, messages, where, tools)
    _append(segments, done, rendered, False, where)
    if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        _check_tool_parts(tokenizer, rendered, messages, tools, where)
    return segments


def _check_tool_parts(tokenizer, rendered: str, messages: list[dict], tools: Optional[list], where: str) -> None:
    """A template without tool support renders a conversation with tools as if they were not there,
    silently: the model would learn calls to functions it never saw, or answers to results it never read."""
    missing = []
    if tools and not _renders_tools(tokenizer, messages, tools, where):
        missing.append("the row's tool schemas (field 'tools')")
    missing += [f"message {i}'s call to '{c['function']['name']}'" for i, m in enumerate(messages)
                for c in m.get("tool_calls", []) if c["function"]["name"] not in rendered]
    missing += [f"message {i} (tool result)" for i, m in enumerate(messages)
                if m["role"] == "tool" and m["content"].strip() not in rendered]
    if missing:
        raise DataError(f"{where}: the tokenizer's chat template does not render {missing[0]}"
                        f"{f' (and {len(missing) - 1} more tool parts)' if len(missing) > 1 else ''}, so the model "
                        "would train without it; set model.tokenizer to a tokenizer whose chat template takes tools "
                        "(Qwen2.5, Qwen3 and Llama 3.1 templates do), or leave tool turns out of the data")


# tokenizer -> whether its chat template writes the `tools` it is given (a property of the template,
# asked of the first row with tools, not of every row: two more renders a row cost 7% of tokenising)
_TOOL_TEMPLATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _renders_tools(tokenizer, messages: list[dict], tools: list, where: str) -> bool:
    if tokenizer not in _TOOL_TEMPLATES:
        _TOOL_TEMPLATES[tokenizer] = (_render(tokenizer, messages[:1], where, tools)
                                      != _render(tokenizer, messages[:1], where))
    return _TOOL_TEMPLATES[tokenizer]


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


def _render(tokenizer, messages: list, where: str, tools: Optional[list] = None, generation: bool = False) -> str:
    """The chat template's text, or a DataError naming the row (e.g. a template that refuses a role)."""
    extra = {"tools": tools} if tools else {}
    try:
        if generation:
            return _generation_prompt(tokenizer, messages, extra)
        return tokenizer.apply_chat_template(messages, tokenize=False, **extra)
    except Exception as exc:  # jinja's TemplateError, or raise_exception() inside the template
        roles = ", ".join(m["role"] for m in messages)
        takes_tools = " (one that takes tools, as Qwen2.5's, Qwen3's and Llama 3.1's do)" if tools or any(
            m["role"] == "tool" or m.get("tool_calls") for m in messages) else ""
        raise DataError(f"{where}: the tokenizer's chat template refuses this conversation ({exc}; roles: {roles}); "
                        f"fix the data, or set model.tokenizer to a tokenizer whose template accepts it{takes_tools}"
                        ) from None


def _generation_prompt(tokenizer, history: list, extra: dict) -> str:
    if history:
        return tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True, **extra)
    # transformers refuses to render an empty conversation: render a first assistant turn holding a
    # marker and keep what comes before it (the BOS and the turn header).
    marker = "\x00dft-ds-turn\x00"
    rendered = tokenizer.apply_chat_template([{"role": "assistant", "content": marker}], tokenize=False, **extra)
    return rendered.split(marker)[0] if marker in rendered else ""


def _append(segments: list, done: str, rendered: str, target: bool, where: str) -> str:
    if not rendered.startswith(done):
        raise DataError(f"{where}: the chat template does not render the conversation incrementally, "
                        "so assistant turns cannot be located")
    if len(rendered) > len(done):
        segments.append((rendered[len(done):], target))
    return rendered


def tokenize_sample(segments: list[tuple[str, bool]], tokenizer, chat_rendered: bool, add_eos: bool):
    """Token ids and per-token target flags for one sample, as lists (Encoder does the same for a batch).

    The whole text is tokenised at once (a piece tokenised alone can split differently from the same
    piece in context, e.g. a leading-space marker), and each token is a target when its first
    character lies in a target segment. A chat-rendered text already holds its own BOS.
    """
    text = "".join(piece for piece, _ in segments)
    # verbose=False: data.max_length decides what is too long, not the tokenizer's model_max_length
    enc = tokenizer(text, add_special_tokens=not chat_rendered, return_offsets_mapping=True, verbose=False)
    ids, targets = _targets_of(np.asarray(enc["input_ids"], dtype=np.int64),
                               np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2), segments,
                               tokenizer.eos_token_id if add_eos else None)
    return ids.tolist(), targets.tolist()


# What became of a sample (the `status` column of a tokenised set).
# TRUNCATED_AWAY: over data.max_length, and truncation cut every target (the response starts past it).
KEPT, TRUNCATED, OVERLONG, NO_TARGET, TRUNCATED_AWAY = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class Encoder:
    """Turns rows into (ids, shifted labels, status): the one place a sample becomes tokens.

    Rows are rendered one by one (layouts, chat templates, file:line errors) and tokenised together,
    one batched call per kind of text, which lets a fast tokenizer use its own threads. Conversations
    are rendered by the chat template, which writes its own special tokens and ends each reply
    itself; a plain prompt/response gets the tokenizer's special tokens and an EOS."""

    cfg: DataConfig
    tokenizer: Any
    chat: bool
    layout: Layout

    def __call__(self, rows: list[dict], wheres: list[str]) -> list[tuple[list[int], list[int], int]]:
        conversational = self.layout.format in ("messages", "sharegpt")
        pieces = []
        for row, where in zip(rows, wheres):
            segments = sample_segments(row, self.cfg, self.tokenizer, self.chat, where, self.layout)
            rendered = self.chat or conversational or _is_turn_list(row, self.layout)
            if rendered and not self.chat and not conversational:
                raise DataError(f"{where}: conversational prompt/completion rows need the chat template; "
                                "set data.template=auto or chat with a tokenizer that has one")
            pieces.append((segments, rendered))
        encoded: list = [None] * len(pieces)
        eos = self.tokenizer.eos_token_id
        for rendered in (False, True):
            which = [i for i, (_, r) in enumerate(pieces) if r == rendered]
            if not which:
                continue
            texts = ["".join(piece for piece, _ in pieces[i][0]) for i in which]
            for i, (ids, offsets) in zip(which, self._encode(texts, add_special_tokens=not rendered)):
                encoded[i] = _targets_of(ids, offsets, pieces[i][0], None if rendered else eos)
        return [self._finish(ids, targets) for ids, targets in encoded]

    def _encode(self, texts: list[str], add_special_tokens: bool) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids, [n, 2] character offsets) per text. A fast tokenizer's own backend is called directly
        when the Python wrapper would do nothing more (no truncation, padding or special-token
        splitting set on the backend): the wrapper's per-token conversions cost more than the encoding."""
        backend = getattr(self.tokenizer, "_tokenizer", None)
        if (backend is not None and hasattr(backend, "encode_batch") and backend.truncation is None
                and backend.padding is None
                and getattr(backend, "encode_special_tokens", False) == bool(getattr(self.tokenizer,
                                                                                     "split_special_tokens", False))):
            out = []
            for enc in backend.encode_batch(texts, add_special_tokens=add_special_tokens):
                out.append((np.asarray(enc.ids, dtype=np.int64),
                            np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)))
            return out
        # verbose=False: transformers' "indexing errors" warning judges by the tokenizer's model_max_length;
        # data.max_length and data.overlong decide here, and the report names the rows over it.
        enc = self.tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True, verbose=False)
        return [(np.asarray(ids, dtype=np.int64), np.asarray(off, dtype=np.int64).reshape(-1, 2))
                for ids, off in zip(enc["input_ids"], enc["offset_mapping"])]

    def _finish(self, ids: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        labels[:-1] = np.where(targets[1:], ids[1:], IGNORE_INDEX)  # shift_labels, on arrays
        max_length = self.cfg.max_length
        empty = np.zeros(0, dtype=np.int64)
        if len(ids) > max_length:
            if self.cfg.overlong == "drop":
                return empty, empty, OVERLONG
            # Truncating after shifting keeps the last kept position's target (the next token exists).
            ids, labels = ids[:max_length], labels[:max_length]
            status = TRUNCATED
        else:
            status = KEPT
        if not (labels != IGNORE_INDEX).any():
            return empty, empty, NO_TARGET if status == KEPT else TRUNCATED_AWAY
        return ids, labels, status


def _targets_of(ids: np.ndarray, offsets: np.ndarray, segments: list[tuple[str, bool]],
                eos: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, target flags): a token is a target when its first character lies in a target segment;
    tokens without text (BOS and other added special tokens) never are; `eos` (a plain response's) is
    appended as a target."""
    bounds = np.cumsum([len(piece) for piece, _ in segments])
    flags = np.array([target for _, target in segments] + [False], dtype=bool)
    starts, ends = offsets[:, 0], offsets[:, 1]
    end = bounds[-1] if len(bounds) else 0
    inside = (ends != starts) & (starts < end)
    targets = np.zeros(len(ids), dtype=bool)
    targets[inside] = flags[np.searchsorted(bounds, starts[inside], side="right")]
    if eos is not None:
        ids = np.append(ids, eos)
        targets = np.append(targets, True)
    return ids, targets


def shift_labels(ids: list[int], targets: list[bool]) -> list[int]:
    """labels[t] = ids[t+1] where token t+1 is a target; the last position has nothing to predict."""
    labels = [tok if tgt else IGNORE_INDEX for tok, tgt in zip(ids[1:], targets[1:])]
    return labels + [IGNORE_INDEX]


# --------------------------------------------------------------------------------------------
# Batches


def collate(rows: list[list[tuple[Any, Any]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenate each row's documents (ids and labels as lists or arrays), restart positions per
    document, pad to the longest row.

    Padding is a document of its own (positions from 0, no targets), so it never sees the real tokens
    and they never see it.
    """
    width = max(sum(len(d) for d, _ in row) for row in rows)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    positions = np.empty((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for doc_ids, doc_labels in row:
            n = len(doc_ids)
            input_ids[r, at:at + n] = doc_ids
            labels[r, at:at + n] = doc_labels
            positions[r, at:at + n] = np.arange(n)
            at += n
        positions[r, at:] = np.arange(width - at)
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(positions)}


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
