"""Tiny random-init models of the families users fine-tune, each with a tokenizer of its own kind.

`build_family("qwen2", OUT)` writes a normal Hugging Face directory (config, safetensors weights,
tokenizer, generation config) that `model.name_or_path=OUT` trains and dft-convert, transformers
and vLLM load. The layers are tiny; what makes each family itself is kept:

| family  | class                | kept                                                          |
|---------|----------------------|---------------------------------------------------------------|
| qwen2   | Qwen2ForCausalLM     | q/k/v bias, tied embeddings (Qwen2.5-Math-1.5B), 151936 rows   |
| qwen3   | Qwen3ForCausalLM     | q/k RMS norm, tied embeddings (Qwen3-0.6B), 151936 rows        |
| llama3  | LlamaForCausalLM     | GQA, untied head, llama3 rope scaling, 128256 rows             |
| mistral | MistralForCausalLM   | GQA, untied head, [INST] template, 32768 rows                  |
| gemma2  | Gemma2ForCausalLM    | final-logit and attention softcapping, sliding layers, a        |
|         |                      | template that rejects system turns, 256000 rows                |
| gemma3  | Gemma3ForCausalLM    | q/k norm, sliding layers, system folded into the first user    |
|         |                      | turn, 262144 rows                                              |
| phi3    | Phi3ForCausalLM      | fused qkv and gate/up projections, 32064 rows                  |

Every tokenizer is a byte-level BPE trained here on the synthetic math chats (a few thousand
merges), with the family's special tokens and a chat template written from the family's published
format. Its `eos_token` is the family's end-of-turn marker, as the instruct releases ship it. The
embedding and head have the family's real row count, far more than the tokenizer's tokens, so the
loss head costs what it costs on the real model. Head size 64, which vLLM's CPU attention supports.

Command line: `python -m dft_ds.families FAMILY OUT_DIR [--seed N]`, or `--list`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BPE_VOCAB = 4096  # tokens the BPE learns (256 bytes, the special tokens, the merges)
# Words, single digits (as Qwen and Gemma split numbers: arithmetic stays learnable at this size),
# punctuation runs, newlines and spaces: the split of Qwen2's tokenizer, which transformers' Qwen2
# class reinstates on load, used for every family so a directory encodes the same wherever it loads.
PRE_TOKENIZER = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FFN = 256, 2, 4, 2, 64, 512

# ChatML as Qwen2.5 and Qwen3 write it, tool use included: the tool schemas go into the system turn,
# an assistant's calls into <tool_call> blocks, and consecutive tool results into one user turn.
CHATML = (
    "{% if tools %}{{ '<|im_start|>system\n' }}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ '# Tools\n\nYou may call these functions, given as JSON schemas:\n<tools>' }}"
    "{% for tool in tools %}{{ '\n' + tool | tojson }}{% endfor %}"
    "{{ '\n</tools>\n\nWrite each call as {\"name\": ..., \"arguments\": {...}} between <tool_call> and "
    "</tool_call>.<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and tools and loop.first %}"
    "{% elif message['role'] in ['system', 'user'] %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% set fn = call['function'] if call['function'] is defined else call %}"
    "{{ ('\n' if message['content'] or not loop.first else '') + '<tool_call>\n{\"name\": \"' + fn['name'] "
    "+ '\", \"arguments\": ' + fn['arguments'] | tojson + '}\n</tool_call>' }}"
    "{% endfor %}{{ '<|im_end|>\n' }}"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or loop.previtem['role'] != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
    "{% if loop.last or loop.nextitem['role'] != 'tool' %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 3.1's format, tool use included: the schemas go into the system turn after "Environment:
# ipython", a call is the reply's whole text as {"name", "parameters"} (one per turn), a result is an
# ipython turn.
LLAMA3 = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n\n' }}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] | trim + '\n\n' }}{% endif %}"
    "{{ 'You may call these functions; to call one, reply with only {\"name\": ..., \"parameters\": {...}}.' }}"
    "{% for tool in tools %}{{ '\n\n' + tool | tojson }}{% endfor %}{{ '<|eot_id|>' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and tools and loop.first %}"
    "{% elif message['role'] in ['tool', 'ipython'] %}"
    "{{ '<|start_header_id|>ipython<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "{% if message['tool_calls'] | length > 1 %}{{ raise_exception('one tool call per turn') }}{% endif %}"
    "{% set call = message['tool_calls'][0] %}"
    "{% set fn = call['function'] if call['function'] is defined else call %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n{\"name\": \"' + fn['name'] + '\", \"parameters\": ' "
    "+ fn['arguments'] | tojson + '}<|eot_id|>' }}"
    "{% elif message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% else %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Mistral's instruct format: a system message is folded into the first user turn.
MISTRAL = (
    "{{ bos_token }}"
    "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.first and system is not none %}{{ '[INST] ' + system + '\n\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "{% endfor %}"
)

# Gemma 2 has no system role: its template refuses one, as the published template does.
GEMMA2 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% elif message['role'] not in ['user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Gemma 3 folds a system message into the first user turn.
GEMMA3 = (
    "{{ bos_token }}"
    "{% set system = messages[0]['content'] | trim + '\n\n' if messages and messages[0]['role'] == 'system' else '' %}"
    "{% for message in messages if message['role'] != 'system' %}"
    "{% if message['role'] not in ['user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\n' + (system if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

PHI3 = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str          # the transformers class
    config_class: str
    vocab_rows: int            # embedding (and head) rows of the real model
    special: tuple[str, ...]   # special tokens, in id order from 0
    eos: str                   # end of an assistant turn
    pad: str
    template: str
    bos: str | None = None     # prepended to plain text (and written by the template)
    text_end: str | None = None  # the base model's end of document, a second stop token
    system_turns: bool = True
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings"))


_ATTN = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
             head_dim=HEAD_DIM, intermediate_size=FFN, max_position_embeddings=2048)

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("qwen2", "Qwen2ForCausalLM", "Qwen2Config", 151936,
           ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), eos="<|im_end|>", pad="<|endoftext|>",
           text_end="<|endoftext|>", template=CHATML,
           config=dict(_ATTN, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                       rms_norm_eps=1e-6)),
    Family("qwen3", "Qwen3ForCausalLM", "Qwen3Config", 151936,
           ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"), eos="<|im_end|>",
           pad="<|endoftext|>", text_end="<|endoftext|>", template=CHATML,
           config=dict(_ATTN, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                       rms_norm_eps=1e-6)),
    Family("llama3", "LlamaForCausalLM", "LlamaConfig", 128256,
           ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|finetune_right_pad_id|>"), bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>",
           text_end="<|end_of_text|>", template=LLAMA3,
           config=dict(_ATTN, tie_word_embeddings=False, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 1024})),
    Family("mistral", "MistralForCausalLM", "MistralConfig", 32768,
           ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<pad>"), bos="<s>", eos="</s>", pad="<pad>",
           template=MISTRAL, config=dict(_ATTN, tie_word_embeddings=False, sliding_window=None, rms_norm_eps=1e-5)),
    Family("gemma2", "Gemma2ForCausalLM", "Gemma2Config", 256000,
           ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"), bos="<bos>",
           eos="<end_of_turn>", pad="<pad>", text_end="<eos>", template=GEMMA2, system_turns=False,
           config=dict(_ATTN, tie_word_embeddings=True, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                       query_pre_attn_scalar=HEAD_DIM, sliding_window=32,
                       layer_types=["sliding_attention", "full_attention"], rms_norm_eps=1e-6)),
    Family("gemma3", "Gemma3ForCausalLM", "Gemma3TextConfig", 262144,
           ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"), bos="<bos>",
           eos="<end_of_turn>", pad="<pad>", text_end="<eos>", template=GEMMA3,
           config=dict(_ATTN, tie_word_embeddings=True, query_pre_attn_scalar=HEAD_DIM, sliding_window=32,
                       layer_types=["sliding_attention", "full_attention"], rms_norm_eps=1e-6)),
    Family("phi3", "Phi3ForCausalLM", "Phi3Config", 32064,
           ("<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
           eos="<|end|>", pad="<|endoftext|>", text_end="<|endoftext|>", template=PHI3,
           config=dict(_ATTN, tie_word_embeddings=False, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
)}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; expected one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def _corpus(fam: Family, seed: int) -> list[str]:
    """The tokenizer's training text: synthetic chats rendered in the family's own turn format."""
    from jinja2 import Environment

    from dft_ds import synthetic

    def refuse(message):
        raise ValueError(message)

    env = Environment()
    env.globals["raise_exception"] = refuse
    template = env.from_string(fam.template)
    examples = synthetic.generate_examples(2000, seed, "train") + synthetic.generate_examples(500, seed, "ood")
    texts = _prose(seed)
    for i, ex in enumerate(examples):
        messages = [{"role": "user", "content": ex["prompt"]}, {"role": "assistant", "content": ex["response"]}]
        if fam.system_turns and i % 10 == 0:
            messages.insert(0, {"role": "system", "content": "Solve the problem step by step."})
        texts.append(template.render(messages=messages, bos_token=fam.bos or "", eos_token=fam.eos))
    return texts


def _prose(seed: int, sentences: int = 6000) -> list[str]:
    """Seeded sentences of made-up words with a Zipf-like frequency: the math chats alone hold a few
    hundred distinct pieces, and a tokenizer of a real family's kind has thousands of merges."""
    import random

    rng = random.Random(seed)
    onsets, vowels, codas = "b c d f g h j k l m n p r s t v w z br ch cl dr gr pl sh st th tr".split(), \
        "a e i o u ai ea ou io".split(), ["", "", "n", "r", "s", "t", "l", "nd", "st", "ng"]
    words = sorted({"".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.randint(1, 3))) + rng.choice(codas)
                    for _ in range(6000)})
    rng.shuffle(words)
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    out = []
    for _ in range(sentences):
        picked = rng.choices(words, weights, k=rng.randint(4, 14))
        out.append(" ".join(picked).capitalize() + rng.choice(".?!,;:"))
    return out


def build_tokenizer(fam: Family, seed: int = 0):
    """A byte-level BPE with the family's special tokens (ids 0..), template and stop token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRE_TOKENIZER), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=list(fam.special), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_corpus(fam, seed), trainer=trainer)
    if fam.bos is not None:  # plain text gets the BOS the family's base tokenizer prepends
        bos_id = bpe.token_to_id(fam.bos)
        bpe.post_processor = processors.TemplateProcessing(single=f"{fam.bos} $A", pair=f"{fam.bos} $A $B",
                                                           special_tokens=[(fam.bos, bos_id)])
    else:
        bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=fam.bos, eos_token=fam.eos, pad_token=fam.pad,
                                   unk_token=None, chat_template=fam.template, model_max_length=2048)


def model_config(fam: Family, tokenizer, **overrides):
    """The family's transformers config: tiny layers, the real vocabulary rows, the tokenizer's special ids."""
    import transformers

    fields = dict(fam.config, vocab_size=fam.vocab_rows,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    fields.update(overrides)
    config = getattr(transformers, fam.config_class)(**fields)
    config.architectures = [fam.architecture]
    return config


def stop_token_ids(fam: Family, tokenizer) -> list[int]:
    """End of turn first, then the base model's end of text: generation stops at either."""
    ids = [tokenizer.convert_tokens_to_ids(fam.eos)]
    if fam.text_end is not None and fam.text_end != fam.eos:
        ids.append(tokenizer.convert_tokens_to_ids(fam.text_end))
    return ids


def build_family(name: str, out_dir: str | os.PathLike, seed: int = 0, **config_overrides) -> str:
    """Write a random-init model of family `name` with its tokenizer to `out_dir` (a new directory)."""
    import torch
    import transformers

    fam = family(name)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; families never overwrite a directory")
    tokenizer = build_tokenizer(fam, seed)
    config = model_config(fam, tokenizer, **config_overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, fam.architecture)(config)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_token_ids(fam, tokenizer),
        pad_token_id=tokenizer.pad_token_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dft_ds.families",
                                     description="Write a tiny random-init model of a real family, with a "
                                                 "locally trained tokenizer of its kind, as a Hugging Face directory.")
    parser.add_argument("family", nargs="?", help=f"one of {', '.join(FAMILIES)}")
    parser.add_argument("out_dir", nargs="?", help="a new directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the tokenizer corpus (0)")
    parser.add_argument("--list", action="store_true", help="list the families and exit")
    ns = parser.parse_args(argv)
    if ns.list:
        for fam in FAMILIES.values():
            print(f"{fam.name:8} {fam.architecture:20} vocabulary rows {fam.vocab_rows}"
                  f"{', tied' if fam.tied else ''}")
        return 0
    if not ns.family or not ns.out_dir:
        parser.error("give FAMILY and OUT_DIR (or --list)")
    if ns.family not in FAMILIES:
        parser.error(f"unknown family {ns.family!r}; expected one of {', '.join(FAMILIES)}")
    try:
        path = build_family(ns.family, ns.out_dir, ns.seed)
    except FileExistsError as exc:
        print(f"families: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
