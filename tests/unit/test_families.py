"""The model families users fine-tune (dft_ds.families), on one process: their tokenizers, the label
masks their chat templates give, the attention kernel each runs with packed rows kept apart, and the
fused head (softcapping included) against each model's own logits.

The 2-rank ZeRO-3 training equality, conversion and resume per family are in
tests/distributed/test_families.py."""

from __future__ import annotations

import json
import os

import datasets
import pytest
import torch

from dft_ds import families
from dft_ds.config import DataConfig
from dft_ds.data import RawData, collate
from dft_ds.tokenised import build_rows, from_lists, tokenize_dataset
from dft_ds.errors import DataError, ModelError
from dft_ds.loss import IGNORE_INDEX, FusedHead, compute_loss, token_weight
from dft_ds.model import accept_head, choose_attention, head_softcap

pytestmark = pytest.mark.families

NAMES = list(families.FAMILIES)


@pytest.fixture(scope="module")
def tokenizers(family_dir):
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(family_dir(name)) for name in NAMES}


def _model(path, attention):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention).eval()


def _tokenize(tok, rows, **cfg):
    cfg = DataConfig(max_length=4096, **cfg)
    ids, labels, _ = tokenize_dataset(RawData(datasets.Dataset.from_list(rows), "mem"), cfg, tok)
    return ids, labels


def _target_spans(tok, labels) -> list[str]:
    """The text of each run of consecutive targets, as the model is trained to write it."""
    spans, run = [], []
    for lab in labels + [IGNORE_INDEX]:
        if lab != IGNORE_INDEX:
            run.append(lab)
        elif run:
            spans.append(tok.decode(run, skip_special_tokens=False))
            run = []
    return spans


# ---------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("name", NAMES)
def test_tokenizer_is_a_byte_level_bpe_sized_like_the_family(name, family_dir, tokenizers):
    fam, tok = families.family(name), tokenizers[name]
    path = family_dir(name)
    spec = json.load(open(os.path.join(path, "tokenizer.json"), encoding="utf-8"))
    assert spec["model"]["type"] == "BPE" and len(spec["model"]["merges"]) >= 3000
    config = json.load(open(os.path.join(path, "config.json"), encoding="utf-8"))
    assert config["vocab_size"] == fam.vocab_rows >= 32000 > len(tok)
    assert config["architectures"] == [fam.architecture]
    assert bool(config.get("tie_word_embeddings")) == fam.tied
    for token in fam.special:  # the family's special tokens, each one id
        assert tok.convert_tokens_to_ids(token) == fam.special.index(token)
    assert tok.eos_token == fam.eos and tok.chat_template == fam.template
    text = "Straße, naïve café: 12 + 7 = 19 ✓ 😀\n\tend"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # byte-level: any text


# ---------------------------------------------------------------- label masks

CONVERSATION = [
    {"role": "system", "content": "Solve step by step."},
    {"role": "user", "content": "Ana has 3 bags of 4 apples. How many apples?"},
    {"role": "assistant", "content": "3 * 4 = 12\nThe answer is \\boxed{12}"},
    {"role": "user", "content": "And with one more bag?"},
    {"role": "assistant", "content": "12 + 4 = 16. \\boxed{16}"},
]


@pytest.mark.parametrize("name", NAMES)
def test_messages_targets_are_each_reply_and_its_end_of_turn(name, tokenizers):
    fam, tok = families.family(name), tokenizers[name]
    messages = CONVERSATION if fam.system_turns else CONVERSATION[1:]
    _, labels = _tokenize(tok, [{"messages": messages}], format="messages")
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert _target_spans(tok, labels[0]) == [reply + fam.eos for reply in replies]


@pytest.mark.parametrize("name", NAMES)
def test_prompt_response_targets_are_the_response_and_its_end_of_turn(name, tokenizers):
    fam, tok = families.family(name), tokenizers[name]
    row = {"prompt": "What is 2 + 5?", "response": "2 + 5 = 7. \\boxed{7}"}
    _, labels = _tokenize(tok, [row])  # template auto: the family's chat template
    assert _target_spans(tok, labels[0]) == [row["response"] + fam.eos]
    _, plain = _tokenize(tok, [row], template="plain")
    assert _target_spans(tok, plain[0]) == [row["response"] + tok.eos_token]


def test_gemma2_template_refuses_a_system_turn_with_the_row_named(tokenizers):
    with pytest.raises(DataError, match=r"^mem: row 0: ") as err:
        _tokenize(tokenizers["gemma2"], [{"messages": CONVERSATION}], format="messages")
    assert "System role not supported" in str(err.value) and "roles: system" in str(err.value)


# ---------------------------------------------------------------- attention, packed rows


def test_attention_choice_per_model(family_dir):
    from transformers import AutoConfig

    gemma2 = AutoConfig.from_pretrained(family_dir("gemma2"))
    qwen2 = AutoConfig.from_pretrained(family_dir("qwen2"))
    assert choose_attention("auto", gemma2, on_cuda=False) == "eager"  # sdpa cannot softcap scores
    assert choose_attention("auto", qwen2, on_cuda=False) == "sdpa"
    assert choose_attention("eager", qwen2, on_cuda=False) == "eager"
    with pytest.raises(ModelError, match="model.attn_implementation=sdpa: this model .Gemma2Config. supports eager"):
        choose_attention("sdpa", gemma2, on_cuda=False)
    with pytest.raises(ModelError, match="needs a CUDA device and the flash_attn package"):
        choose_attention("flash_attention_2", qwen2, on_cuda=False)


def _docs(tok, n=3):
    from dft_ds import synthetic

    rows = synthetic.generate_examples(n, seed=5, split="ood")  # long enough to cross the 32-token sliding window
    return _tokenize(tok, rows)


@pytest.mark.parametrize("name", NAMES)
def test_packed_documents_stay_apart_with_the_chosen_kernel(name, family_dir, tokenizers):
    from transformers import AutoConfig

    path = family_dir(name)
    attention = choose_attention("auto", AutoConfig.from_pretrained(path), on_cuda=False)
    model = _model(path, attention)
    ids, labels = _docs(tokenizers[name])
    assert min(map(len, ids)) > 40
    rows = build_rows(from_lists(ids, labels), None, max_length=sum(map(len, ids)), packing=True)
    batch = collate(rows.docs, pad_id=tokenizers[name].pad_token_id)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        offset = 0
        for doc in ids:
            alone = model(input_ids=torch.tensor([doc]), position_ids=torch.arange(len(doc))[None],
                          use_cache=False).logits[0]
            diff = (packed[offset:offset + len(doc)] - alone).abs().max().item()
            assert diff < 1e-4, f"{name} ({attention}): document at {offset} differs by {diff}"
            offset += len(doc)


# ---------------------------------------------------------------- the fused head on each model


@pytest.mark.parametrize("name", NAMES)
def test_fused_head_equals_the_models_own_logits(name, family_dir, tokenizers):
    """The fused loss on the decoder's hidden states equals the loss on the model's logits (Gemma 2's
    softcapping included), with the same gradient for every parameter."""
    path = family_dir(name)
    ids, labels = _docs(tokenizers[name], n=2)
    rows = build_rows(from_lists(ids, labels), None, max_length=sum(map(len, ids)), packing=True)
    batch = collate(rows.docs, pad_id=tokenizers[name].pad_token_id)
    inputs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    weighting = token_weight("dft")
    results = []
    for fused in (False, True):
        model = _model(path, "eager")
        if fused:
            accept_head(model)
            parts = model(**inputs, head=FusedHead(batch["labels"], weighting, chunk_budget=17 * 4 * model.get_output_embeddings().weight.shape[0]))
        else:
            parts = compute_loss(weighting, model(**inputs).logits, batch["labels"], num_tokens=None)
        parts.loss.backward()
        results.append((parts, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (full, full_grads), (fused, fused_grads) = results
    assert (head_softcap(_model(path, "eager").config) is not None) == (name == "gemma2")
    torch.testing.assert_close(fused.loss, full.loss, rtol=1e-5, atol=1e-7)
    assert fused.tokens == full.tokens > 0
    assert full_grads.keys() == fused_grads.keys()
    for key in full_grads:
        torch.testing.assert_close(fused_grads[key], full_grads[key], rtol=1e-4, atol=1e-7, msg=key)


def test_command_line_never_writes_into_a_directory_that_is_not_empty(tmp_path, capsys):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    assert families.main(["qwen2", str(target)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in target.iterdir()] == ["mine.txt"] and (target / "mine.txt").read_text() == "keep"
    with pytest.raises(SystemExit) as exit_info:
        families.main(["qwen9", str(tmp_path / "new")])
    assert exit_info.value.code == 2 and not (tmp_path / "new").exists()
