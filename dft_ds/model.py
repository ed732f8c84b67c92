"""Model and tokenizer: any Hugging Face causal LM, or the embedded tiny Llama.

Under ZeRO-3 the model is built while an `HfDeepSpeedConfig` is alive, so transformers creates it
inside `deepspeed.zero.Init`: each rank only ever holds its own shard, never the full weights.
"""

from __future__ import annotations

import contextlib
import difflib
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


SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "max_position_embeddings", "tie_word_embeddings")


def config_overrides(text: str) -> dict[str, Any]:
    """model.config_overrides as {field: value}: "a=1,b=x" pairs, each value read as YAML, each key a
    field the embedded default's (Llama) config has. Raises ModelError naming the pair at fault."""
    import yaml
    from transformers import LlamaConfig

    known = LlamaConfig().to_dict()
    out: dict[str, Any] = {}
    for pair in (p.strip() for p in str(text).split(",")):
        if not pair:
            continue
        key, sep, value = (part.strip() for part in pair.partition("="))
        if not sep or not key:
            raise ModelError(f"model.config_overrides: '{pair}' is not key=value (expected e.g. "
                             "hidden_size=64,num_hidden_layers=2)")
        if key not in known or key == "vocab_size":
            if key == "vocab_size":
                hint = "the vocabulary is the tokenizer's"
            else:
                close = difflib.get_close_matches(key, list(known), n=1)
                hint = (f"did you mean {close[0]}? " if close else "") + f"the shape's fields: {', '.join(SHAPE_FIELDS)}"
            raise ModelError(f"model.config_overrides: '{key}' is not a field of the model config that can be set "
                             f"({hint})")
        try:
            parsed = yaml.safe_load(value) if value else None
        except yaml.YAMLError:
            parsed = value
        default = known[key]
        if isinstance(default, float) and isinstance(parsed, str):
            with contextlib.suppress(ValueError):  # YAML 1.1 reads 1e-6 (no dot) as text
                parsed = float(parsed)
        number = (int, float) if isinstance(default, float) else (int,)
        if default is not None and (isinstance(default, bool) != isinstance(parsed, bool) or (
                isinstance(default, (int, float)) and not isinstance(parsed, number))):
            kind = type(default).__name__
            raise ModelError(f"model.config_overrides: {key}={value} is not {'an' if kind == 'int' else 'a'} {kind} "
                             f"(the default is {default!r})")
        if key in SHAPE_FIELDS and isinstance(parsed, int) and not isinstance(parsed, bool) and parsed < 1:
            raise ModelError(f"model.config_overrides: {key}={value}: expected an integer >= 1")
        out[key] = float(parsed) if isinstance(default, float) and not isinstance(parsed, bool) else parsed
    return out


def synthetic_config(cfg: ModelConfig, tokenizer):
    """The embedded default's config, shaped by model.config_overrides; a shape that does not add up is
    a ModelError naming the setting."""
    from dft_ds import synthetic

    overrides = config_overrides(cfg.config_overrides)
    try:
        config = synthetic.tiny_model_config(len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                             **overrides)
    except Exception as exc:  # transformers validates its configs (heads against hidden size), its own error types
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise ModelError(f"model.config_overrides: {cfg.config_overrides}: {cause}") from None
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if heads < 1 or kv < 1 or heads % kv:
        raise ModelError(f"model.config_overrides: num_attention_heads={heads} must be a multiple of "
                         f"num_key_value_heads={kv} (each key/value head serves a whole group of query heads)")
    return config


def load_model_config(cfg: ModelConfig, tokenizer):
    """The model's config, checked against the tokenizer before any weights are touched."""
    from transformers import AutoConfig

    if cfg.name_or_path == SYNTHETIC:
        config = synthetic_config(cfg, tokenizer)
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


# How each kernel keeps packed documents apart. Rows carry no attention_mask, only position_ids that
# restart at 0 for every document: flash-attention reads the restarts as variable-length sequences
# (in one row: engine._forward lays a micro-batch's rows end to end);
# for the others transformers builds a block-diagonal causal mask from the same restarts.
PACKED_ISOLATION = {"flash_attention_2": "variable-length sequences from position ids, rows laid end to end",
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


class _TiledMLP(torch.autograd.Function):
    """y = mlp(x), computed over `tiles` slices of the tokens and never stored: the backward runs the
    MLP again one slice at a time and back-propagates through it at once, so the [tokens x
    intermediate] activations of one slice are all that exist. Exactly `tiles` calls each way,
    however many tokens a rank holds (some slices may be empty), so ZeRO-3's parameter gathers stay
    in step across ranks. A parameter's gradient is reported to ZeRO (ds_grad_is_ready) only after
    the last slice has added to it."""

    @staticmethod
    def forward(ctx, x, mlp, forward, tiles):
        ctx.mlp, ctx.forward, ctx.tiles = mlp, forward, tiles
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat([forward(part) for part in x.tensor_split(tiles, dim=-2)], dim=-2)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        rows = x.detach().reshape(-1, x.shape[-1])
        grad = grad.reshape(-1, grad.shape[-1])
        grad_x = torch.zeros_like(rows)
        params = [p for p in ctx.mlp.parameters() if p.requires_grad]
        start = 0
        parts = rows.tensor_split(ctx.tiles, dim=0)
        for i, part in enumerate(parts):
            for p in params:
                p.ds_grad_is_ready = i == len(parts) - 1
            part = part.detach().requires_grad_(x.requires_grad)
            with torch.enable_grad():
                out = ctx.forward(part)
            stop = start + part.shape[0]
            torch.autograd.backward(out, grad[start:stop])
            if part.grad is not None:
                grad_x[start:stop] = part.grad
            start = stop
        for p in params:
            p.ds_grad_is_ready = True
        return grad_x.view_as(x), None, None, None


def mlp_modules(model) -> list:
    """The `mlp` of every decoder layer (what model.tiled_mlp wraps); [] for a model without them."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None) or []
    return [layer.mlp for layer in layers if getattr(layer, "mlp", None) is not None]


class TiledForward:
    """The forward an MLP gets from apply_tiled_mlp: the module's own forward, run by _TiledMLP over
    `tiled_mlp_tiles` slices of the tokens."""

    tiled_mlp_tiles = 1

    def forward(self, x):
        if not x.requires_grad and torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            # The first layer's MLP under LoRA with frozen embeddings: x needs no gradient but the
            # weights do, and an autograd function's output requires one only through its inputs.
            # (Passing the weights as inputs breaks ZeRO-3, whose partitioned weights are empty.)
            x = x.detach().requires_grad_(True)
        return _TiledMLP.apply(x, self, super().forward, self.tiled_mlp_tiles)


def apply_tiled_mlp(model, tiles: int) -> int:
    """model.tiled_mlp: put TiledForward in front of every decoder layer's `mlp` class; returns how many.
    The MLP must map each token on its own (every family of families.py does)."""
    if tiles < 2:
        return 0
    mlps = mlp_modules(model)
    for mlp in mlps:
        _put_in_front(mlp, TiledForward)
        mlp.tiled_mlp_tiles = tiles
    return len(mlps)


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _put_in_front(module, mixin: type) -> None:
    """Make `module` an instance of a subclass of (mixin, its class): the mixin's forward runs first and
    reaches the class's own through super(). The subclass keeps the class's name and module
    (config.architectures, exports and vLLM see the family's class), and the parameters keep theirs
    (a wrapper module would rename every one in checkpoints and exports)."""
    cls = type(module)
    if issubclass(cls, mixin):
        return
    if (mixin, cls) not in _SUBCLASSES:
        _SUBCLASSES[mixin, cls] = type(cls.__name__, (mixin, cls),
                                       {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
    module.__class__ = _SUBCLASSES[mixin, cls]


class HeadForward:
    """The forward a model gets from accept_head: `model(..., head=h)` returns h(last_hidden_state,
    head_weight, softcap) instead of logits, the one way the fused loss reaches the model
    (loss.FusedHead says what a head does; softcap is the model's final-logit cap or None, see
    head_softcap). Without `head`, the model's own forward runs (generation, evaluation, export)."""

    def forward(self, *args, head=None, **kwargs):
        if head is None:
            return super().forward(*args, **kwargs)
        hidden = self.get_decoder()(*args, **kwargs).last_hidden_state
        return head(hidden, self.get_output_embeddings().weight, head_softcap(self.config))


def accept_head(model) -> None:
    """Put HeadForward in front of the model's class (_put_in_front), so that its forward takes a `head`.

    The call still goes through the DeepSpeed engine's forward, so ZeRO-3's hooks run; the head
    weight (tied or not) is registered with ZeRO-3 as used by the whole model's forward, so it is
    gathered for the call and its gradient, computed inside the head, is reduced like any other.
    """
    _put_in_front(model, HeadForward)
    output = model.get_output_embeddings()
    if hasattr(output.weight, "ds_id"):  # a ZeRO-3 partitioned parameter
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        register_external_parameter(model, output.weight)


# --------------------------------------------------------------------------------------------
# LoRA (model.lora): peft's adapters injected into the model in place, so the engine, the fused
# head and the checkpoint code see the same Hugging Face model class with a few more parameters.

ALL_LINEAR = "all-linear"
BASE_DIR = "base"  # output_dir/base/: the random-init base of a synthetic LoRA run, written once


def _linear_layers(model) -> list[str]:
    """Names of every linear layer except the LM head: the decoder's (and nothing a head projects)."""
    head = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def lora_targets(model, targets: str) -> list[str]:
    """model.lora_targets resolved against the model (meta-built is enough): the short names peft is
    given (q_proj, ...), each matching at least one linear layer. An unknown name is a ModelError
    that lists the names the model has."""
    from dft_ds.config import lora_target_names

    layers = _linear_layers(model)
    names = lora_target_names(targets)
    short = sorted({n.rsplit(".", 1)[-1] for n in layers})
    if names == [ALL_LINEAR]:
        chosen = layers
    else:
        missing = [t for t in names if not any(_matches(n, t) for n in layers)]
        if missing:
            head = model.get_output_embeddings()
            note = ("; the LM head is never adapted (model.lora_train_embeddings=true trains it fully)"
                    if any(_matches(n, t) for t in missing for n, m in model.named_modules() if m is head) else "")
            raise ModelError(f"model.lora_targets: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                             f"a linear layer of {type(model).__name__}; its linear layers are named "
                             f"{', '.join(short)} (or set all-linear){note}")
        chosen = [n for n in layers if any(_matches(n, t) for t in names)]
    # Short names where they select exactly the chosen layers (they read well in adapter_config.json).
    wanted = sorted({n.rsplit(".", 1)[-1] for n in chosen})
    if sorted(n for n in layers if any(_matches(n, t) for t in wanted)) == sorted(chosen):
        return wanted
    return sorted(chosen)


def lora_parameter_count(model, targets: list[str], rank: int) -> int:
    """Adapter parameters: r x (in + out) for every adapted linear layer."""
    head = model.get_output_embeddings()
    return sum(rank * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not head and any(_matches(n, t) for t in targets))


def embedding_parameters(model) -> list[torch.nn.Parameter]:
    """The input embeddings and the LM head weight (one parameter when tied)."""
    out = []
    for p in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        if all(p is not q for q in out):
            out.append(p)
    return out


def peft_lora_config(cfg: ModelConfig, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")


def apply_lora(model, cfg: ModelConfig, seed: int) -> list[str]:
    """Freeze the model and inject adapters in place (returns the resolved targets). The adapters'
    init is seeded alike on every rank; B starts at zero, so the model's outputs are unchanged."""
    try:
        from peft import inject_adapter_in_model
    except ImportError:
        raise ModelError("model.lora=true needs peft: pip install 'dft_ds[lora]' (peft>=0.17)") from None
    targets = lora_targets(model, cfg.lora_targets)
    model.requires_grad_(False)
    torch.manual_seed(seed + 1)
    inject_adapter_in_model(peft_lora_config(cfg, targets), model)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    if cfg.lora_train_embeddings:
        for p in embedding_parameters(model):
            p.requires_grad_(True)
    return targets


@contextlib.contextmanager
def adapters_off(model):
    """Within the block the model computes as its base: every LoRA layer skips its adapter. (peft's
    own switch also flips requires_grad on the adapters, which the optimizer must not see change.)"""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m._disable_adapters = b


def save_base(model, tokenizer, directory: str, is_rank0: bool) -> None:
    """Write the (frozen) base weights as a Hugging Face directory, atomically, before adapters go in.
    Under ZeRO-3 every rank must call it: the shards are gathered for the write."""
    import os
    import shutil

    params = list(model.parameters())
    gathered = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with gathered:
        if is_rank0:
            staging = directory + ".partial"
            shutil.rmtree(staging, ignore_errors=True)
            state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
            from transformers.utils import logging as hf_logging

            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # "Writing model shards" for one small file is noise
            try:
                model.save_pretrained(staging, state_dict=state, safe_serialization=True)
            finally:
                if bars:
                    hf_logging.enable_progress_bar()
            save_hf_meta(model, tokenizer, staging)
            os.replace(staging, directory)


@contextlib.contextmanager
def plain_model_init():
    """Build models whole, even in a training process (export.hf) whose HfDeepSpeedConfig is alive.

    transformers would otherwise build them under ZeRO-3 init, partitioned with collectives that
    only this rank joins: a hang.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved
