"""Data layouts people already have (data.format=auto and each named format): NuminaMath-CoT,
TRL prompt/completion in both forms, Alpaca, ShareGPT and chat messages. Each is read through the
real `datasets` JSON loader and the real chat template of a tiny Qwen-style tokenizer; the checks
decode the target tokens, so a layout that trains on the wrong text fails."""

from __future__ import annotations

import json

import pytest

from dft_ds import families
from dft_ds.config import DataConfig, load_config
from dft_ds.data import IGNORE_INDEX, load_raw, resolve_layout
from dft_ds.tokenised import tokenize_dataset
from dft_ds.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def tok():
    return families.build_tokenizer(families.FAMILIES["qwen2"])


@pytest.fixture(autouse=True)
def _private_datasets_cache(monkeypatch, tmp_path_factory):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_cache")))


def write(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def read(tmp_path, tok, rows, **data):
    cfg = DataConfig(source=write(tmp_path, rows), **data)
    ids, labels, report = tokenize_dataset(load_raw(cfg, 0), cfg, tok)
    return ids, labels, report


def targets(tok, ids, labels) -> str:
    """The text of the target tokens (labels are shifted: labels[t] is token t+1)."""
    return tok.decode([lab for lab in labels if lab != IGNORE_INDEX])


def inputs(tok, ids) -> str:
    return tok.decode(ids)


NUMINA = {"problem": "What is 2+3?", "solution": "2+3 = 5. The answer is 5.",
          "messages": [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}],
          "source": "synthetic"}


def test_numina_cot_is_detected_as_problem_solution_and_its_other_fields_are_named(tmp_path, tok):
    ids, labels, report = read(tmp_path, tok, [NUMINA])
    assert "NuminaMath-CoT (problem/solution)" in report.layout and "detected" in report.layout
    assert report.layout in report.summary()
    assert report.layout.endswith("detected from the fields problem, solution")
    assert targets(tok, ids[0], labels[0]) == "2+3 = 5. The answer is 5.<|im_end|>"
    assert "What is 2+3?" in inputs(tok, ids[0])
    assert report.warnings == ["data: fields messages, source of " + str(tmp_path / "d.jsonl")
                               + " are not used by the layout NuminaMath-CoT (problem/solution)"]


def test_numina_messages_alone_use_the_messages_layout(tmp_path, tok):
    ids, labels, report = read(tmp_path, tok, [{"messages": NUMINA["messages"]}])
    assert report.layout.startswith("layout messages (messages)")
    assert targets(tok, ids[0], labels[0]) == "5<|im_end|>"
    assert report.warnings == []


def test_trl_prompt_completion_plain_strings(tmp_path, tok):
    ids, labels, report = read(tmp_path, tok, [{"prompt": "Say hi.", "completion": "Hi there."}])
    assert "TRL prompt/completion" in report.layout
    assert targets(tok, ids[0], labels[0]) == "Hi there.<|im_end|>"


def test_trl_prompt_completion_plain_template_ends_with_eos(tmp_path, tok):
    ids, labels, _ = read(tmp_path, tok, [{"prompt": "Say hi.", "completion": "Hi there."}], template="plain")
    assert targets(tok, ids[0], labels[0]) == "Hi there." + tok.eos_token
    assert inputs(tok, ids[0]).startswith("Say hi.\nHi there.")


def test_trl_conversational_trains_only_the_completion_turns(tmp_path, tok):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "One?"},
              {"role": "assistant", "content": "EARLIER"}, {"role": "user", "content": "Two?"}]
    completion = [{"role": "assistant", "content": "Two."}]
    ids, labels, report = read(tmp_path, tok, [{"prompt": prompt, "completion": completion}])
    assert "TRL prompt/completion" in report.layout
    assert targets(tok, ids[0], labels[0]) == "Two.<|im_end|>"
    text = inputs(tok, ids[0])
    assert "EARLIER" in text and "Be brief." in text


def test_trl_conversational_needs_a_chat_template(tmp_path, tok):
    rows = [{"prompt": [{"role": "user", "content": "One?"}], "completion": [{"role": "assistant", "content": "1"}]}]
    with pytest.raises(DataError, match=r"d.jsonl:1: conversational prompt/completion rows need the chat template"):
        read(tmp_path, tok, rows, template="plain")


def test_trl_mixed_forms_in_one_row_are_refused(tmp_path, tok):
    rows = [{"prompt": "One?", "completion": [{"role": "assistant", "content": "1"}]}]
    with pytest.raises(DataError, match=r"fields 'prompt' \(str\) and 'completion' \(list\) must both be text or both be lists"):
        read(tmp_path, tok, rows)


def test_alpaca_joins_instruction_and_input_with_a_blank_line(tmp_path, tok):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Name a colour.", "input": "", "output": "Blue"}]
    ids, labels, report = read(tmp_path, tok, rows)
    assert "Alpaca (instruction/input/output)" in report.layout
    assert report.warnings == []
    assert "<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>" in inputs(tok, ids[0])
    assert targets(tok, ids[0], labels[0]) == "5<|im_end|>"
    assert "<|im_start|>user\nName a colour.<|im_end|>" in inputs(tok, ids[1])


def test_alpaca_system_and_history_are_context_not_targets(tmp_path, tok):
    rows = [{"instruction": "And 3+3?", "input": "", "output": "6", "system": "You add.",
             "history": [["2+2?", "4"]]}]
    ids, labels, _ = read(tmp_path, tok, rows)
    text = inputs(tok, ids[0])
    assert text.index("You add.") < text.index("2+2?") < text.index("4") < text.index("And 3+3?")
    assert targets(tok, ids[0], labels[0]) == "6<|im_end|>"


def test_alpaca_plain_template_keeps_the_input(tmp_path, tok):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]
    ids, labels, _ = read(tmp_path, tok, rows, template="plain")
    assert inputs(tok, ids[0]).startswith("Add the numbers.\n\n2 and 3\n5")
    with pytest.raises(DataError, match="field 'history' .* needs a chat template"):
        read(tmp_path, tok, [dict(rows[0], history=[["a", "b"]])], template="plain")


def test_alpaca_extra_field_is_warned_not_dropped_silently(tmp_path, tok):
    rows = [{"instruction": "Add.", "input": "1 and 1", "output": "2", "category": "math"}]
    _, _, report = read(tmp_path, tok, rows)
    assert len(report.warnings) == 1 and "field category" in report.warnings[0] and "is not used" in report.warnings[0]


def test_sharegpt_roles_map_to_chat_roles(tmp_path, tok):
    rows = [{"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi?"},
                               {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "Bye?"},
                               {"from": "gpt", "value": "Bye."}]}]
    ids, labels, report = read(tmp_path, tok, rows)
    assert "ShareGPT (conversations: from/value)" in report.layout
    assert "<|im_start|>system\nBe kind.<|im_end|>" in inputs(tok, ids[0])
    assert targets(tok, ids[0], labels[0]) == "Hello.<|im_end|>Bye.<|im_end|>"


def test_sharegpt_unknown_role_names_row_turn_and_roles(tmp_path, tok):
    rows = [{"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]},
            {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "bot", "value": "Hello."}]}]
    with pytest.raises(DataError, match=r"d.jsonl:2: conversation turn 1 has the role 'bot'; ShareGPT rows "
                                        r"may use human, user, gpt, assistant, system, function_call, observation, tool"):
        read(tmp_path, tok, rows)


def test_explicit_format_is_named_and_a_missing_field_is_reported_by_line(tmp_path, tok):
    rows = [{"instruction": "Add.", "output": "2"}, {"instruction": "Add."}]
    with pytest.raises(DataError, match=r"d.jsonl:2: missing field 'output'"):
        read(tmp_path, tok, rows, format="alpaca")
    _, _, report = read(tmp_path, tok, rows[:1], format="alpaca")
    assert report.layout.endswith("set by data.format=alpaca, fields instruction, output")


def test_unknown_layout_names_the_fields_and_the_settings(tmp_path, tok):
    with pytest.raises(DataError) as info:
        read(tmp_path, tok, [{"question": "2+2?", "answer": "4"}])
    msg = str(info.value)
    assert "d.jsonl:1: data.format=auto cannot tell the layout from the fields (answer, question)" in msg
    assert "data.format=prompt_response data.prompt_field=question data.response_field=answer" in msg


def test_configured_fields_win_over_detection(tmp_path, tok):
    rows = [{"question": "2+2?", "answer": "4", "prompt": "ignored", "completion": "ignored"}]
    ids, labels, report = read(tmp_path, tok, rows, prompt_field="question", response_field="answer")
    assert "prompt/response as question/answer" in report.layout
    assert targets(tok, ids[0], labels[0]) == "4<|im_end|>"


def test_detection_uses_the_first_row_and_holds_every_row_to_it(tmp_path, tok):
    rows = [{"prompt": "a", "completion": "b"}, {"problem": "c", "solution": "d"}]
    with pytest.raises(DataError, match=r"d.jsonl:2: missing field 'prompt'"):
        read(tmp_path, tok, rows)


def test_resolve_layout_order():
    cfg = DataConfig()
    assert resolve_layout(cfg, {"prompt": "a", "response": "b", "messages": []}, "w").format == "prompt_response"
    assert resolve_layout(cfg, {"messages": [], "conversations": []}, "w").format == "messages"
    assert resolve_layout(cfg, {"conversations": []}, "w").format == "sharegpt"
    assert resolve_layout(DataConfig(messages_field="turns"), {"turns": []}, "w").messages_field == "turns"


def test_format_choices_are_checked():
    with pytest.raises(ConfigError, match="data.format: expected one of auto, prompt_response, messages, alpaca, "
                                          "sharegpt, got 'trl'"):
        load_config(None, ["data.format=trl"])
