"""Tool-use data: OpenAI's tool_calls/tool turns and LLaMA-Factory's ShareGPT function_call/observation
turns, read through the real `datasets` library and rendered by chat templates that take tools (the
Qwen2.5 and Llama 3.1 formats of dft_ds.families). The model must see the row's tool schemas, learn
its calls and answers, and never be trained on a tool's result."""

from __future__ import annotations

import json

import pytest

from dft_ds import families
from dft_ds.config import DataConfig
from dft_ds.data import IGNORE_INDEX, load_raw
from dft_ds.errors import DataError
from dft_ds.tokenised import tokenize_dataset

WEATHER = {"name": "get_weather", "description": "The weather in a city now",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CLOCK = {"name": "get_time", "description": "The time in a time zone",
         "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}

# OpenAI's layout: arguments as a string of JSON, content null beside tool_calls, a `tools` list.
OPENAI_ROW = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
        {"role": "assistant", "content": "It is 18C and sunny in Paris."},
    ],
    "tools": [{"type": "function", "function": WEATHER}],
}
# A second row whose call has other argument names: Arrow gives both rows the union, filled with null.
OTHER_ROW = {
    "messages": [
        {"role": "user", "content": "Time in Tokyo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": {"zone": "Asia/Tokyo"}}}]},
        {"role": "tool", "tool_call_id": "call_2", "content": "09:00"},
        {"role": "assistant", "content": "It is nine in the morning."},
    ],
    "tools": [{"type": "function", "function": CLOCK}],
}
# LLaMA-Factory's ShareGPT layout: tools as a string of JSON, a system column, function_call and
# observation turns.
LLAMA_FACTORY_ROW = {
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "18C and sunny"},
        {"from": "gpt", "value": "It is 18C and sunny in Paris."},
    ],
    "system": "Answer briefly.",
    "tools": json.dumps([WEATHER]),
}


@pytest.fixture(scope="module")
def tokenizers():
    built = {}

    def get(name):
        if name not in built:
            built[name] = families.build_tokenizer(families.family(name))
        return built[name]

    return get


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def encode(path, tok, **cfg):
    raw = load_raw(DataConfig(source=path, **cfg), seed=0)
    ids, labels, _ = tokenize_dataset(raw, DataConfig(source=path, **cfg), tok)
    return ids, labels


def target_spans(tok, labels) -> list[str]:
    spans, run = [], []
    for label in list(labels) + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            run.append(label)
        elif run:
            spans.append(tok.decode(run))
            run = []
    return spans


QWEN_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
LLAMA_CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'


@pytest.mark.parametrize("family,call,end", [("qwen2", QWEN_CALL, "<|im_end|>"), ("llama3", LLAMA_CALL, "<|eot_id|>")])
def test_openai_tool_rows_train_on_calls_and_answers_and_see_the_schema(tmp_path, tokenizers, family, call, end):
    tok = tokenizers(family)
    ids, labels = encode(write_jsonl(tmp_path / "tools.jsonl", [OPENAI_ROW, OTHER_ROW]), tok)
    assert target_spans(tok, labels[0]) == [call, "It is 18C and sunny in Paris." + end]
    text = tok.decode(ids[0])
    # the schema is in the prompt, the tool's result is context, and the other row's argument names
    # (which Arrow adds to this row as nulls) are not
    assert json.dumps(WEATHER["parameters"]) in text and "18C and sunny" in text
    assert "zone" not in text and "null" not in text
    assert target_spans(tok, labels[1])[0].startswith(call.split("get_weather")[0] + "get_time")


@pytest.mark.parametrize("family,call", [("qwen2", QWEN_CALL), ("llama3", LLAMA_CALL)])
def test_llama_factory_sharegpt_tool_rows_read_like_openai_rows(tmp_path, tokenizers, family, call):
    tok = tokenizers(family)
    ids, labels = encode(write_jsonl(tmp_path / "lf.jsonl", [LLAMA_FACTORY_ROW]), tok)
    assert target_spans(tok, labels[0])[0] == call
    text = tok.decode(ids[0])
    assert "Answer briefly." in text and '"name": "get_weather", "description"' in text
    # the same conversation written in OpenAI's layout (with the system turn) gives the same tokens
    openai = dict(OPENAI_ROW, messages=[{"role": "system", "content": "Answer briefly."}] + OPENAI_ROW["messages"])
    same_ids, same_labels = encode(write_jsonl(tmp_path / "oa.jsonl", [openai]), tok)
    assert (same_ids[0], same_labels[0]) == (ids[0], labels[0])


def test_a_template_without_tool_support_is_refused_rather_than_silently_dropping_the_schema(tmp_path, tokenizers):
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
           "tools": [WEATHER]}
    path = write_jsonl(tmp_path / "t.jsonl", [row])
    with pytest.raises(DataError, match=r"t\.jsonl:1: the tokenizer's chat template does not render the row's tool "
                                        r"schemas \(field 'tools'\).*takes tools"):
        encode(path, tokenizers("mistral"))
    # a tool turn the template refuses names the row too
    with pytest.raises(DataError, match=r"t\.jsonl:1: the tokenizer's chat template refuses this conversation.*"
                                        r"\(one that takes tools, as Qwen2\.5's, Qwen3's and Llama 3\.1's do\)"):
        encode(write_jsonl(tmp_path / "t.jsonl", [OPENAI_ROW]), tokenizers("mistral"))


def test_tools_on_a_plain_template_are_refused(tmp_path, tokenizers):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Weather in Paris?", "response": "Sunny.", "tools": [WEATHER]}])
    with pytest.raises(DataError, match=r"p\.jsonl:1: field 'tools' needs a chat template"):
        encode(path, tokenizers("qwen2"), template="plain")
    # with the chat template, a plain prompt/response row gets its tools too
    ids, _ = encode(path, tokenizers("qwen2"))
    assert '"name": "get_weather"' in tokenizers("qwen2").decode(ids[0])


@pytest.mark.parametrize("turn,message", [
    ({"from": "function_call", "value": "get_weather(Paris)"}, r"turn 1 \(function_call\) is not JSON"),
    ({"from": "function_call", "value": json.dumps({"arguments": {}})}, r"message 1: a tool call must name its function"),
    ({"from": "function_call", "value": json.dumps({"name": "f", "arguments": "{city"})},
     r"the arguments of the call to 'f' are a string but not JSON"),
])
def test_broken_tool_turns_name_file_line_and_turn(tmp_path, tokenizers, turn, message):
    row = json.loads(json.dumps(LLAMA_FACTORY_ROW))
    row["conversations"][1] = turn
    path = write_jsonl(tmp_path / "bad.jsonl", [LLAMA_FACTORY_ROW, row])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: .*" + message):
        encode(path, tokenizers("qwen2"))


def test_tools_that_are_not_json_name_the_field(tmp_path, tokenizers):
    path = write_jsonl(tmp_path / "bad.jsonl", [dict(LLAMA_FACTORY_ROW, tools="[{name: get_weather}]")])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'tools' is a string but not JSON"):
        encode(path, tokenizers("qwen2"))


def test_role_content_turns_under_conversations_are_read_as_messages(tmp_path, tokenizers):
    """ShareGPT's field name holding OpenAI's role/content turns (many exports): read as messages when
    the layout is detected; data.format=sharegpt says which settings read it."""
    row = {"conversations": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [row])
    tok = tokenizers("qwen2")
    _, labels = encode(path, tok)
    assert target_spans(tok, labels[0]) == ["4<|im_end|>"]
    with pytest.raises(DataError, match=r"c\.jsonl:1: conversation turn 0 has 'role' and 'content'.*set "
                                        r"data\.format=messages data\.messages_field=conversations"):
        encode(path, tok, format="sharegpt")


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_a_saved_dataset_s_null_filled_union_of_fields_does_not_reach_the_model(tmp_path, tokenizers, family):
    """A dataset saved by `datasets` (or a hub parquet) stores one struct for all rows: this row gets the
    other row's argument and schema names as nulls, and `tool_calls: null` on every message."""
    import datasets

    row = json.loads(json.dumps(OPENAI_ROW))
    row["messages"][1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    saved = datasets.Dataset.from_list([row, OTHER_ROW])
    assert saved[0]["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "zone": None}
    saved.save_to_disk(str(tmp_path / "saved"))
    tok = tokenizers(family)
    ids, labels = encode(str(tmp_path / "saved"), tok)
    text = tok.decode(ids[0])
    assert "zone" not in text and "null" not in text and "None" not in text
    assert target_spans(tok, labels[0])[0] == (QWEN_CALL if family == "qwen2" else LLAMA_CALL)
