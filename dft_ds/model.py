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


def build_model(cfg: ModelConfig, config, ds_config: dict[str, Any], dtype: torch.dtype, seed: int):
    """Instantiate (and load, for pretrained models) under ZeRO-3 init when the stage is 3.

    Returns (model, keepalive): keep `keepalive` referenced until deepspeed.initialize is done;
    transformers only holds a weak reference to the DeepSpeed config that drives zero.Init.
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    keepalive = HfDeepSpeedConfig(ds_config)
    # Same seed on every rank: random init is identical before zero.Init partitions it.
    torch.manual_seed(seed)
    kwargs = dict(dtype=dtype, attn_implementation=cfg.attn_implementation)
    if cfg.name_or_path == SYNTHETIC:
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, config=config,
                                                     trust_remote_code=cfg.trust_remote_code, **kwargs)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, keepalive
