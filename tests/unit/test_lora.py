"""model.lora, one process: target resolution, config checks, adapters switched off, the fused head
on a frozen head, the memory model, and what --check and dft-plan print."""

import os
import subprocess
import sys

import pytest
import torch

from dft_ds import synthetic
from dft_ds.config import ModelConfig, load_config
from dft_ds.errors import ConfigError, ModelError
from dft_ds.loss import compute_loss, fused_linear_loss, token_weight
from dft_ds.memory import estimate_memory, meta_model
from dft_ds.model import adapters_off, apply_lora, lora_parameter_count, lora_targets
from tests.distributed.helpers import asset_cache

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ALL = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def tiny_config(**kw):
    return synthetic.tiny_model_config(512, num_hidden_layers=2, **kw)


def test_targets_resolve_against_the_model():
    model = meta_model(tiny_config())
    assert lora_targets(model, "all-linear") == ALL
    assert lora_targets(model, "q_proj, v_proj") == ["q_proj", "v_proj"]
    assert lora_targets(model, "self_attn.q_proj") == ["q_proj"]  # a longer suffix, same layers
    h, i = model.config.hidden_size, model.config.intermediate_size
    kv = model.config.num_key_value_heads * (h // model.config.num_attention_heads)
    assert lora_parameter_count(model, ["q_proj", "up_proj"], 4) == 2 * 4 * ((h + h) + (h + i))
    assert lora_parameter_count(model, ["k_proj"], 8) == 2 * 8 * (h + kv)


def test_unknown_target_lists_the_models_linear_layers():
    model = meta_model(tiny_config())
    with pytest.raises(ModelError) as err:
        lora_targets(model, "q_proj,query_key_value")
    text = str(err.value)
    assert "model.lora_targets: query_key_value is not a linear layer of LlamaForCausalLM" in text
    assert ", ".join(ALL) in text
    with pytest.raises(ModelError, match="the LM head is never adapted"):
        lora_targets(model, "lm_head")


@pytest.mark.parametrize("overrides,key,expected", [
    (["model.lora_rank=0"], "model.lora_rank", "an integer >= 1"),
    (["model.lora_alpha=0"], "model.lora_alpha", "a finite number > 0"),
    (["model.lora_dropout=1"], "model.lora_dropout", "a number in [0, 1)"),
    (["model.lora_targets= , "], "model.lora_targets", "all-linear or comma-separated"),
])
def test_bad_lora_values_are_named(overrides, key, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.lora=true", *overrides])
    assert f"{key}: expected {expected}" in str(err.value)


def test_asft_with_trained_embeddings_is_refused_with_the_reason():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.lora=true", "model.lora_train_embeddings=true", "loss.type=asft"])
    assert "base model with its adapters switched off" in str(err.value)
    load_config(None, ["model.lora=true", "loss.type=asft"])  # adapters only: the base is the reference


def lora_model(**cfg):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config())
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, ModelConfig(lora=True, lora_rank=4, **cfg), seed=5)
    return model, base


def test_apply_lora_freezes_the_base_and_starts_as_the_base():
    from transformers import AutoModelForCausalLM

    model, base = lora_model()
    ids = torch.randint(4, 512, (2, 16))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    plain = AutoModelForCausalLM.from_config(tiny_config())  # the base as a model of its own, no adapters
    plain.load_state_dict(base)
    torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)  # B = 0
    model2, _ = lora_model()
    for (n, a), (_, b) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(a, b), n  # the adapters' init is seeded: every rank builds the same


def test_adapters_off_is_the_base_and_leaves_requires_grad_alone():
    from transformers import AutoModelForCausalLM

    model, base = lora_model()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)
    plain = AutoModelForCausalLM.from_config(tiny_config())
    plain.load_state_dict(base)
    ids = torch.randint(4, 512, (2, 16))
    expected = plain(input_ids=ids).logits
    adapted = model(input_ids=ids).logits
    assert (adapted - expected).abs().max() > 1e-3
    flags = [p.requires_grad for p in model.parameters()]
    with adapters_off(model):
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-6, atol=1e-6)
        assert [p.requires_grad for p in model.parameters()] == flags
    torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=0, atol=0)


def test_train_embeddings_trains_them_fully():
    model, _ = lora_model(lora_train_embeddings=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= trainable


@pytest.mark.parametrize("kind", ["dft", "sft"])
def test_fused_head_on_a_frozen_head(kind):
    """No gradient reaches a frozen head weight; the hidden states get the same gradient as on logits."""
    torch.manual_seed(1)
    n, h, v = 37, 16, 50
    hidden = torch.randn(1, n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64) * 0.3  # requires_grad False: frozen
    labels = torch.randint(0, v, (1, n))
    labels[0, :5] = -100
    targets = (labels[:, 1:] != -100).sum()
    w = token_weight(kind, prob_floor=0.0)
    fused = fused_linear_loss(hidden, weight, labels, w, num_tokens=targets, chunk_budget=7 * v * 8)
    fused.loss.backward()
    assert weight.grad is None
    g_fused = hidden.grad.clone()
    hidden.grad = None
    ref = compute_loss(w, hidden @ weight.T, labels, num_tokens=targets)
    ref.loss.backward()
    torch.testing.assert_close(fused.loss, ref.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_fused, hidden.grad, rtol=1e-9, atol=1e-12)
    assert g_fused.abs().max() > 0


def test_memory_counts_only_trainable_state():
    class Cfg:
        hidden_size, num_hidden_layers, vocab_size = 4096, 32, 128256

    psi, adapters = 8_030_000_000, 41_943_040
    full = estimate_memory(psi, Cfg, 3, 8, "bf16", 2048, True, True, 128, False)
    lora = estimate_memory(psi + adapters, Cfg, 3, 8, "bf16", 2048, True, True, 128, False, n_trainable=adapters,
                           head_trains=False)
    assert lora.params == pytest.approx(2 * (psi + adapters) / 8)
    assert lora.grads == pytest.approx(2 * adapters / 8) and lora.optimizer == pytest.approx(12 * adapters / 8)
    assert full.optimizer / lora.optimizer == pytest.approx(psi / adapters)
    assert full.loss_head - lora.loss_head == pytest.approx(4 * 128256 * 4096)  # no fp32 head gradient


def run_cli(tmp_path, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DFT_DS_CACHE": asset_cache(tmp_path)}
    return subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_check_reports_lora_and_its_smaller_memory(tmp_path, dft_train):
    out = f"train.output_dir={tmp_path / 'run'}"
    full = dft_train("--check", "--world-size", "2", out)
    lora = dft_train("--check", "--world-size", "2", out, "model.lora=true", "model.lora_rank=8")
    assert full.returncode == lora.returncode == 0, lora.stderr
    assert "LoRA r=8 alpha=32 on " + ",".join(ALL) in lora.stdout
    assert not (tmp_path / "run").exists()

    def optimizer_gib(text):
        return float(text.split("optimizer ")[1].split()[0])
    assert optimizer_gib(lora.stdout) < optimizer_gib(full.stdout) / 5 or optimizer_gib(full.stdout) < 0.01
    bad = dft_train("--check", out, "model.lora=true", "model.lora_targets=qkv")
    assert bad.returncode == 2 and "qkv is not a linear layer" in bad.stderr and "q_proj" in bad.stderr


def test_plan_with_lora_rank(tmp_path):
    full = run_cli(tmp_path, "-m", "dft_ds.plan", "--model", "llama-3.1-8b", "--gpus-per-node", "1")
    lora = run_cli(tmp_path, "-m", "dft_ds.plan", "--model", "llama-3.1-8b", "--gpus-per-node", "1",
                   "--lora-rank", "16")
    assert full.returncode == lora.returncode == 0, lora.stderr
    assert "41.94M in LoRA adapters" in lora.stdout  # 16 x (in + out) over 7 layer kinds x 32 layers

    def zero2_optimizer(text):
        row = next(line for line in text.splitlines() if line.startswith("| ZeRO-2 | on | fused"))
        return float(row.split("|")[6])
    assert zero2_optimizer(lora.stdout) < zero2_optimizer(full.stdout) / 50
    bad = run_cli(tmp_path, "-m", "dft_ds.plan", "--model", "llama-3.1-8b", "--lora-rank", "16",
                  "--lora-targets", "wq")
    assert bad.returncode == 2 and "--lora-targets" in bad.stderr and "q_proj" in bad.stderr
