"""Prompting: a problem -> the text the model continues, in one of three styles.

boxed  The Qwen2.5-Math chain-of-thought prompt (the style the DFT paper evaluates with): the
       instruction BOXED_INSTRUCTION as the SYSTEM message and the problem as the user message,
       rendered through the model's chat template with the generation prompt. The system role is
       Qwen2.5-Math's own evaluation choice ("qwen25-math-cot"); a template that rejects or drops a
       system message gets the instruction appended to the user message instead ("user" role).
       Without a chat template: "{problem}\\n{instruction}\\n".
chat   The problem alone as the user message through the chat template (what a model trained on
       plain problem -> solution chats, like the embedded default, saw in training). Needs a
       template.
plain  "{problem}\\n", no template.

Templated text already holds the special tokens the template adds (a BOS, role markers), so it is
tokenised without adding more; plain text gets the tokenizer's usual special tokens (its BOS).
With a template, generation also stops at the template's end-of-turn token (end_of_turn_ids).
"""

from __future__ import annotations

from dataclasses import dataclass

from dft_ds.errors import UserError

STYLES = ("boxed", "chat", "plain")
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
_PROBE = "What is 1 + 1?"


@dataclass(frozen=True)
class Prompter:
    """Renders and encodes prompts for one tokenizer in one style."""

    tokenizer: object
    style: str
    role: str | None  # where the boxed instruction goes: "system", "user", or None (no template / not boxed)

    @property
    def templated(self) -> bool:
        return self.style != "plain" and has_chat_template(self.tokenizer)

    def render(self, problem: str) -> str:
        if not self.templated:
            return self.plain_prompt(problem) + "\n"
        return apply_template(self.tokenizer, self.messages(problem))

    def messages(self, problem: str) -> list[dict]:
        """The chat messages a templated prompt renders (the reply is to follow them)."""
        if self.style == "chat":
            return [{"role": "user", "content": problem}]
        if self.role == "system":
            return [{"role": "system", "content": BOXED_INSTRUCTION}, {"role": "user", "content": problem}]
        return [{"role": "user", "content": f"{problem}\n{BOXED_INSTRUCTION}"}]

    def plain_prompt(self, problem: str) -> str:
        """An untemplated prompt without its closing newline (which a plain training row adds back)."""
        return problem if self.style == "plain" else f"{problem}\n{BOXED_INSTRUCTION}"

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=not self.templated, verbose=False)["input_ids"]
        return list(ids)

    def stop_ids(self) -> list[int]:
        """Tokens that end a reply besides EOS: the template's end-of-turn token, when templated."""
        return end_of_turn_ids(self.tokenizer) if self.templated else []


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def apply_template(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special token a chat template puts right after an assistant reply, e.g. Qwen's <|im_end|>.

    A base model's EOS is often not that token (Qwen2.5-Math-1.5B stops at <|endoftext|>), and a
    reply that runs past its end of turn goes on to invent the next turn, whose \\boxed{} would then
    be graded. Empty when the template puts no special token there.
    """
    marker = "dft-eval-reply-marker"
    messages = [{"role": "user", "content": _PROBE}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template without an assistant role, or a template bug: nothing to add
        return []
    if marker not in text:
        return []
    ids = tokenizer(text.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    special |= {i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special}
    return [ids[0]] if ids and ids[0] in special else []


def build_prompter(tokenizer, style: str) -> Prompter:
    """Check the style against the tokenizer once, and fix where the boxed instruction goes."""
    if style not in STYLES:
        raise UserError(f"--prompt {style}: expected one of {', '.join(STYLES)}")
    if style == "plain":
        return Prompter(tokenizer, style, None)
    if not has_chat_template(tokenizer):
        if style == "chat":
            raise UserError("--prompt chat: the model's tokenizer has no chat template; use --prompt boxed or plain")
        return Prompter(tokenizer, style, None)
    if style == "chat":
        return Prompter(tokenizer, style, None)
    return Prompter(tokenizer, style, "system" if _keeps_system_message(tokenizer) else "user")


def _keeps_system_message(tokenizer) -> bool:
    """Whether the template renders a system message (some raise on it, some drop it silently)."""
    messages = [{"role": "system", "content": BOXED_INSTRUCTION}, {"role": "user", "content": _PROBE}]
    try:
        text = apply_template(tokenizer, messages)
    except Exception:  # jinja's TemplateError from raise_exception, or a template bug
        return False
    return BOXED_INSTRUCTION in text
