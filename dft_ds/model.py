"""Model and tokenizer: any Hugging Face causal LM, or the embedded tiny Llama.

Under ZeRO-3 the model is built while an `HfDeepSpeedConfig` is alive, so transformers creates it
inside `deepspeed.zero.Init`: each rank only ever holds its own shard, never the full weights.
"""

from __future__ import annotations

from typing import Any

import torch

from dft_ds.config import SYNTHETIC, ModelConfig
from dft_ds.errors import ModelError


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path = cfg.tokenizer or cfg.name_or_path
    if path == SYNTHETIC:
        from dft_ds import synthetic

        path = synthetic.ensure_assets()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:
        raise ModelError(f"model.tokenizer: cannot load a tokenizer from '{path}' ({type(exc).__name__}: {exc})") from None
    if tokenizer.eos_token_id is None:
        raise ModelError(f"model.tokenizer: '{path}' has no EOS token; responses need one to learn where to stop")
    return tokenizer


def load_model_config(cfg: ModelConfig, tokenizer):
    """The model's config, checked against the tokenizer before any weights are touched."""
    from transformers import AutoConfig

    if cfg.name_or_path == SYNTHETIC:
        from dft_ds import synthetic

        config = synthetic.tiny_model_config(len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    else:
        try:
            config = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
        except ValueError as exc:
            if "trust_remote_code" in str(exc):
                raise ModelError(f"model.name_or_path: '{cfg.name_or_path}' needs its own code to run; "
                                 "set model.trust_remote_code=true only if you trust its source") from None
            raise ModelError(f"model.name_or_path: cannot read a config from '{cfg.name_or_path}' ({exc})") from None
        except OSError as exc:
            raise ModelError(f"model.name_or_path: cannot read a config from '{cfg.name_or_path}' ({exc})") from None
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ModelError(f"model.tokenizer: the tokenizer has {len(tokenizer)} tokens but the model's embeddings "
                         f"hold {vocab} (model.name_or_path={cfg.name_or_path}); ids beyond {vocab - 1} would "
                         "index past the embedding table")
    return config


ATTENTION = ("auto", "eager", "sdpa", "flash_attention_2", "flex_attention")
# How each kernel keeps packed documents apart. Rows carry no attention_mask, only position_ids that
# restart at 0 for every document: flash-attention reads the restarts as variable-length sequences;
# for the others transformers builds a block-diagonal causal mask from the same restarts.
PACKED_ISOLATION = {"flash_attention_2": "variable-length sequences from position ids",
                    "sdpa": "a block mask from position ids", "eager": "a block mask from position ids",
                    "flex_attention": "a block mask from position ids"}


def _model_class(config):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        return None  # a model with its own code (trust_remote_code): its class is not known here


def supported_attention(config) -> list[str]:
    """The attention kernels this model's class supports (eager always), or [] when unknown."""
    cls = _model_class(config)
    if cls is None:
        return []
    out = ["eager"]
    if getattr(cls, "_supports_sdpa", False):
        out.append("sdpa")
    if getattr(cls, "_supports_flash_attn", False):
        out.append("flash_attention_2")
    if getattr(cls, "_supports_flex_attn", False):
        out.append("flex_attention")
    return out


def _flash_attn_usable(on_cuda: bool) -> bool:
    if not on_cuda:
        return False
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def choose_attention(requested: str, config, on_cuda: bool) -> str:
    """model.attn_implementation: `auto` picks, among the kernels the model supports, flash-attention
    (on CUDA, when installed), else sdpa, else eager (Gemma 2: sdpa cannot softcap attention scores).
    An explicit choice the model or machine cannot run is refused (ModelError, exit 2)."""
    supported = supported_attention(config)
    name = type(config).__name__
    if requested == "auto":
        if not supported:
            return "sdpa"
        if "flash_attention_2" in supported and _flash_attn_usable(on_cuda):
            return "flash_attention_2"
        return "sdpa" if "sdpa" in supported else "eager"
    if supported and requested not in supported:
        raise ModelError(f"model.attn_implementation={requested}: this model ({name}) supports "
                         f"{', '.join(supported)}; set one of them, or auto")
    if requested == "flash_attention_2" and not _flash_attn_usable(on_cuda):
        raise ModelError("model.attn_implementation=flash_attention_2 needs a CUDA device and the flash_attn "
                         "package; set model.attn_implementation=auto to use sdpa or eager here")
    return requested


def build_model(cfg: ModelConfig, config, ds_config: dict[str, Any], dtype: torch.dtype, seed: int,
                attention: str = "sdpa"):
    """Instantiate (and load, for pretrained models) under ZeRO-3 init when the stage is 3.

    Returns (model, keepalive): keep `keepalive` referenced until deepspeed.initialize is done;
    transformers only holds a weak reference to the DeepSpeed config that drives zero.Init.
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    keepalive = HfDeepSpeedConfig(ds_config)
    # Same seed on every rank: random init is identical before zero.Init partitions it.
    torch.manual_seed(seed)
    kwargs = dict(dtype=dtype, attn_implementation=attention)
    if cfg.name_or_path == SYNTHETIC:
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, config=config,
                                                     trust_remote_code=cfg.trust_remote_code, **kwargs)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, keepalive


def save_hf_meta(model, tokenizer, directory: str) -> None:
    """What dft-convert needs beside a checkpoint's shards: the model's config (set up for inference),
    its generation config and the tokenizer."""
    import copy
    import os

    os.makedirs(directory, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.use_cache = True  # off for training only; inference (and vLLM) wants it
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


# Config attributes of models whose logits are not plain `last_hidden_state @ head.weight.T`
# (scaling after the head); the fused head would silently compute a different loss. Final-logit
# softcapping (Gemma 2) is computed inside the fused head instead (see head_softcap).
LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier_scale",
                    "logit_softcapping")


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def head_softcap(config) -> float | None:
    """The cap of `logits = cap * tanh(z / cap)` after the head (Gemma 2's final_logit_softcapping), or None."""
    value = getattr(_text_config(config), "final_logit_softcapping", None)
    return float(value) if value else None


def fused_head_problem(model, trust_remote_code: bool = False) -> str | None:
    """Why the fused head + loss cannot stand in for this model's logits, or None when it can."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return f"its output layer is {type(head).__name__}, not a linear layer"
    if head.bias is not None:
        return "its LM head has a bias"
    config = _text_config(model.config)
    for name in LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 0, 1, 1.0, False):
            return f"its config sets {name}={value} (the logits are transformed after the head)"
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        return "it does not expose its decoder (get_decoder())"
    if trust_remote_code:
        return "it runs its own code (model.trust_remote_code), whose forward may transform the logits"
    return None


def attach_head_loss(model) -> None:
    """Let `model(..., head_loss=fn)` return fn(last_hidden_state, head.weight, softcap) instead of
    logits, where softcap is the model's final-logit cap or None (see head_softcap).

    The model's own forward is unchanged without `head_loss` (generation, evaluation, export). The
    call still goes through the DeepSpeed engine's forward, so ZeRO-3's hooks run; the head weight
    (tied or not) is registered with ZeRO-3 as used by the whole model's forward, so it is gathered
    for the call and its gradient, computed inside fn, is reduced like any other.
    """
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    original = model.forward
    softcap = head_softcap(model.config)

    def forward(*args, head_loss=None, **kwargs):
        if head_loss is None:
            return original(*args, **kwargs)
        return head_loss(decoder(*args, **kwargs).last_hidden_state, head.weight, softcap)

    model.forward = forward
    if hasattr(head.weight, "ds_id"):  # a ZeRO-3 partitioned parameter
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        register_external_parameter(model, head.weight)
