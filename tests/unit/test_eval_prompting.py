"""Prompt styles on the synthetic tokenizer (which has a chat template with a system role), on
templates that reject or drop a system message, and on a tokenizer without a template."""

from __future__ import annotations

import copy

import pytest

from dft_ds import synthetic
from dft_ds.errors import UserError
from dft_ds.eval.prompting import BOXED_INSTRUCTION, build_prompter, end_of_turn_ids

PROBLEM = "Calculate 3 + 4 * 2."
# A template in the Gemma style: system messages are an error.
NO_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
             "{% endif %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>"
             "{% endif %}")
# A template that silently drops anything but user and assistant turns.
DROPS_SYSTEM = ("{% for m in messages %}{% if m['role'] != 'system' %}<{{ m['role'] }}>{{ m['content'] }}\n{% endif %}"
                "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(synthetic.ensure_assets())


def with_template(tok, template):
    other = copy.deepcopy(tok)
    other.chat_template = template
    return other


def test_boxed_puts_the_instruction_in_the_system_message(tok):
    prompter = build_prompter(tok, "boxed")
    assert prompter.role == "system" and prompter.templated
    assert prompter.render(PROBLEM) == f"<s><|system|>\n{BOXED_INSTRUCTION}\n<|user|>\n{PROBLEM}\n<|assistant|>\n"
    assert BOXED_INSTRUCTION == "Please reason step by step, and put your final answer within \\boxed{}."


def test_chat_is_the_problem_alone_as_the_user_turn(tok):
    prompter = build_prompter(tok, "chat")
    assert prompter.role is None
    text = prompter.render(PROBLEM)
    assert text == f"<s><|user|>\n{PROBLEM}\n<|assistant|>\n"
    # The same text training renders for the prompt (data.py uses the template with a generation prompt).
    assert text == tok.apply_chat_template([{"role": "user", "content": PROBLEM}], tokenize=False,
                                           add_generation_prompt=True)


def test_templated_prompts_get_no_second_bos(tok):
    for style in ("boxed", "chat"):
        prompter = build_prompter(tok, style)
        ids = prompter.encode(prompter.render(PROBLEM))
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_plain_is_the_problem_and_a_newline_with_the_tokenizers_bos(tok):
    prompter = build_prompter(tok, "plain")
    assert not prompter.templated and prompter.role is None
    text = prompter.render(PROBLEM)
    assert text == PROBLEM + "\n"
    ids = prompter.encode(text)
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("template", [NO_SYSTEM, DROPS_SYSTEM])
def test_boxed_falls_back_to_the_user_message_when_the_template_has_no_system_role(tok, template):
    prompter = build_prompter(with_template(tok, template), "boxed")
    assert prompter.role == "user"
    assert prompter.render(PROBLEM) == f"<user>{PROBLEM}\n{BOXED_INSTRUCTION}\n<assistant>"


def test_without_a_chat_template(tok):
    bare = with_template(tok, None)
    boxed = build_prompter(bare, "boxed")
    assert not boxed.templated and boxed.role is None
    assert boxed.render(PROBLEM) == f"{PROBLEM}\n{BOXED_INSTRUCTION}\n"
    assert boxed.encode(boxed.render(PROBLEM))[0] == tok.bos_token_id
    with pytest.raises(UserError, match="no chat template; use --prompt boxed or plain"):
        build_prompter(bare, "chat")
    with pytest.raises(UserError, match="expected one of boxed, chat, plain"):
        build_prompter(tok, "fancy")


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_generation_also_stops_at_the_templates_end_of_turn_token(tok):
    # The synthetic template ends a reply with EOS itself.
    assert end_of_turn_ids(tok) == [tok.eos_token_id]
    # A Qwen-style template ends it with <|im_end|>, a special token that is not the EOS.
    qwen = with_template(tok, CHATML)
    qwen.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    im_end = qwen.convert_tokens_to_ids("<|im_end|>")
    assert im_end != qwen.eos_token_id and end_of_turn_ids(qwen) == [im_end]
    assert build_prompter(qwen, "chat").stop_ids() == [im_end] and build_prompter(qwen, "plain").stop_ids() == []
    # Plain-text turn ends, or a template that cannot render an assistant turn: nothing to add.
    assert end_of_turn_ids(with_template(tok, DROPS_SYSTEM)) == []
    assert end_of_turn_ids(with_template(tok, "{{ raise_exception('no') }}")) == []
