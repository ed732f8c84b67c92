"""A LoRA run's adapter (model.lora) outside training: merged into its base for dft-convert, written
as a peft adapter directory (`dft-convert --adapter-only`), and loaded back for dft-eval.

A LoRA checkpoint holds only the trainable tensors (saved with exclude_frozen_parameters), under the
names of the in-place injected model: `<module>.lora_A.default.weight`, `<module>.lora_B.default.weight`
and, with model.lora_train_embeddings, the full input embeddings and LM head. Its dft_state.json
"lora" entry names the base directory that holds the frozen rest.

The merge is peft's: W' = W + (B @ A) * alpha / r, computed in fp32 one layer at a time while the
shards are written (the base is read lazily from its safetensors files).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from dft_ds.errors import ModelError, UserError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LORA_A = ".lora_A.default.weight"
LORA_B = ".lora_B.default.weight"
PEFT_PREFIX = "base_model.model."  # what peft puts before the plain model's names
# Files of a model directory that an adapter directory leaves out (it is not a model by itself).
MODEL_ONLY_FILES = ("config.json", "generation_config.json")
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


@dataclass(frozen=True)
class LoraSpec:
    """The "lora" entry of a checkpoint's dft_state.json (see RunPlan.lora_record)."""

    rank: int
    alpha: float
    dropout: float
    targets: list[str]
    train_embeddings: bool
    base: str

    @classmethod
    def from_state(cls, entry: Mapping[str, Any], where: Path) -> "LoraSpec":
        try:
            return cls(int(entry["rank"]), float(entry["alpha"]), float(entry.get("dropout", 0.0)),
                       list(entry["targets"]), bool(entry.get("train_embeddings", False)), str(entry["base"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{where}: the 'lora' entry is incomplete ({type(exc).__name__}: {exc})") from None

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def peft_config(self, base: str, embedding_modules: list[str] = (), tied: bool = False):
        """peft's LoraConfig of this adapter; trained embeddings become modules_to_save (kept tied
        when the model ties its head to its input embeddings)."""
        from peft import LoraConfig

        extra = {"modules_to_save": list(embedding_modules), "ensure_weight_tying": tied} if embedding_modules else {}
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self.targets,
                          bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base, **extra)


# --------------------------------------------------------------------------------------------
# The base


def resolve_base(recorded: str, override: Optional[str], state_file: Path) -> str:
    """The base model directory: --base, else the one the checkpoint records. A hub name is taken
    from the local cache (or downloaded when online)."""
    path = override or recorded
    source = "--base" if override else f"{state_file} ('lora' entry)"
    fix = ("restore the base model there, or pass --base DIR naming a copy of the same base model "
           "(the frozen weights the adapter was trained on)")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"{source}: the LoRA base {path} is not a Hugging Face model directory (no config.json); "
                            f"{fix}")
        return path
    from dft_ds.hub import looks_like_hub_name, offline_requested

    if os.path.isabs(path) or not looks_like_hub_name(path):
        raise UserError(f"{source}: the LoRA base directory {path} does not exist; {fix}")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, local_files_only=offline_requested(),
                                 allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as exc:  # noqa: BLE001  (any hub failure means the same to the user)
        raise UserError(f"{source}: the LoRA base {path} is neither a directory nor in the Hugging Face cache "
                        f"({type(exc).__name__}); {fix}") from None


class Lazy:
    """A tensor read or computed when `.contiguous()` is called; `.shape` and `.dtype` known before."""

    def __init__(self, shape, dtype: torch.dtype, load: Callable[[], torch.Tensor]):
        self.shape, self.dtype, self._load = tuple(shape), dtype, load

    def contiguous(self) -> torch.Tensor:
        return self._load().contiguous()


def base_tensors(base: str) -> dict[str, Any]:
    """name -> lazy tensor of the base's safetensors files (or, without any, of the loaded model)."""
    from safetensors import safe_open

    files = sorted(Path(base).glob("*.safetensors"))
    out: dict[str, Any] = {}
    for file in files:
        handle = safe_open(str(file), "pt")
        for name in handle.keys():
            piece = handle.get_slice(name)
            dtype = SAFETENSORS_DTYPES.get(piece.get_dtype())
            if dtype is None:
                out[name] = handle.get_tensor(name)  # an integer or bool buffer: small, read now
            else:
                out[name] = Lazy(piece.get_shape(), dtype, lambda h=handle, n=name: h.get_tensor(n))
    if files:
        return out
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    except (OSError, ValueError) as exc:
        raise UserError(f"{base}: cannot load the LoRA base ({type(exc).__name__}: {exc})") from None
    return dict(model.state_dict())


def split_checkpoint(tensors: Mapping[str, Any], where: Path) -> tuple[dict[str, tuple[Any, Any]], dict[str, Any]]:
    """({adapted module: (A, B)}, {name: tensor} of the fully trained ones: embeddings and head)."""
    pairs, full = {}, {}
    for name, tensor in tensors.items():
        if name.endswith(LORA_A):
            module = name[: -len(LORA_A)]
            if module + LORA_B not in tensors:
                raise UserError(f"{where}: the checkpoint has {name} but not {module + LORA_B}")
            pairs[module] = (tensor, tensors[module + LORA_B])
        elif ".lora_" not in name:
            full[name] = tensor
    if not pairs:
        raise UserError(f"{where}: the checkpoint records model.lora but holds no lora_A/lora_B tensors")
    return pairs, full


def merged_tensors(base: Mapping[str, Any], tensors: Mapping[str, Any], spec: LoraSpec, where: Path) -> dict[str, Any]:
    """The plain model's state dict: the base, each adapted weight merged, trained embeddings replaced.
    Every value is lazy: a merged weight is computed when its shard is written."""
    pairs, full = split_checkpoint(tensors, where)
    out = dict(base)
    for module, (a, b) in pairs.items():
        name = module + ".weight"
        if name not in base:
            raise UserError(f"{where}: the adapter of {module} has no weight {name} in the base {spec.base}; "
                            "is it the base this run trained on?")
        w = base[name]

        def merge(w=w, a=a, b=b) -> torch.Tensor:  # peft's merge: W + (B @ A) * scaling, here in fp32
            return w.contiguous().float() + (b.contiguous().float() @ a.contiguous().float()) * spec.scaling

        out[name] = Lazy(w.shape, torch.float32, merge)
    out.update(full)  # an alias of a tied head (same object) is dropped later by dedupe_aliases
    return out


# --------------------------------------------------------------------------------------------
# The adapter as a peft directory


def embedding_modules(model) -> tuple[list[str], bool]:
    """(short module names of the input embeddings and the head, whether they are tied)."""
    inp, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = [n for n, m in model.named_modules() if m is inp or m is head]
    return sorted({n.rsplit(".", 1)[-1] for n in names}), inp.weight is head.weight


def meta_base_model(hf_config: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from dft_ds.model import plain_model_init

    with torch.device("meta"), plain_model_init():
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf_config))


def adapter_state(tensors: Mapping[str, Any], spec: LoraSpec, hf_config: Path, base: str, where: Path):
    """(peft LoraConfig, {peft name: lazy tensor}) of the checkpoint's adapter, named by peft itself:
    the checkpoint's tensors put into a peft model built on the meta device, then peft's
    get_peft_model_state_dict picks and renames what PeftModel.from_pretrained reads."""
    from peft import get_peft_model, get_peft_model_state_dict

    pairs, full = split_checkpoint(tensors, where)
    model = meta_base_model(hf_config)
    modules, tied = embedding_modules(model) if spec.train_embeddings else ([], False)
    config = spec.peft_config(base, modules, tied)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on meta tensors and deprecated flags
        peft_model = get_peft_model(model, config)
    # A fresh config to write: peft rewrote the one it was given (base_model_name_or_path = the meta
    # model's hf_config/, modules_to_save with tied names resolved), and from_pretrained redoes that itself.
    config = spec.peft_config(base, modules, tied)
    state: dict[str, Any] = {}
    for module, (a, b) in pairs.items():
        state[PEFT_PREFIX + module + LORA_A] = a
        state[PEFT_PREFIX + module + LORA_B] = b
    if spec.train_embeddings:
        inp, head = model.get_input_embeddings(), model.get_output_embeddings()
        for name, m in model.named_modules():
            if m is inp or m is head:
                weight = full.get(f"{name}.weight")
                if weight is None and tied:  # DeepSpeed recorded the tied weight under the other name
                    weight = next(iter(full.values()), None)
                if weight is None:
                    raise UserError(f"{where}: model.lora_train_embeddings is set but the checkpoint lacks {name}.weight")
                state[f"{PEFT_PREFIX}{name}.modules_to_save.default.weight"] = weight
    known = set(peft_model.state_dict())
    unknown = sorted(set(state) - known)
    if unknown:
        raise UserError(f"{where}: peft cannot place {', '.join(unknown[:3])} in its model of {hf_config}; "
                        "convert without --adapter-only to get the merged model")
    return config, get_peft_model_state_dict(peft_model, state_dict=state)


# --------------------------------------------------------------------------------------------
# References for --verify, and loading for dft-eval


def write_adapter(out_dir: Path, config, weights: Mapping[str, torch.Tensor], hf_config: Path) -> int:
    """A peft adapter directory: adapter_config.json, adapter_model.safetensors (the given tensors, as they are) and
    the run's tokenizer and chat-template files; returns the bytes of weights written."""
    from safetensors.torch import save_file

    save_file(dict(weights), str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config.save_pretrained(str(out_dir))
    for item in sorted(hf_config.iterdir()):
        if item.name in MODEL_ONLY_FILES:
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, out_dir / item.name)
    return sum(t.numel() * t.element_size() for t in weights.values())


def unmerged_model(base: str, tensors: Mapping[str, Any], spec: LoraSpec, round_to: Optional[torch.dtype] = None):
    """The model as training computed it, in fp32: the base with peft's adapters injected in place
    (as model.apply_lora does) and the checkpoint's trained tensors loaded; nothing merged."""
    from peft import inject_adapter_in_model
    from transformers import AutoModelForCausalLM

    from dft_ds.model import plain_model_init

    with plain_model_init():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inject_adapter_in_model(spec.peft_config(base), model)
    own = model.state_dict()
    with torch.no_grad():
        for name, tensor in tensors.items():
            value = tensor.contiguous()
            if round_to is not None and value.is_floating_point():
                value = value.to(round_to)
            if name in own:  # a tied head's alias is the same parameter as the embeddings
                own[name].copy_(value.float())
    return model.eval()


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def adapter_base(adapter_dir: str, override: Optional[str]) -> str:
    """--base, else base_model_name_or_path of adapter_config.json; must be a model directory."""
    config_file = os.path.join(adapter_dir, ADAPTER_CONFIG)
    try:
        config = json.loads(Path(config_file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{config_file}: cannot read it ({type(exc).__name__}: {exc})") from None
    base = override or config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{config_file}: names no base_model_name_or_path; pass --base DIR")
    if not os.path.isfile(os.path.join(base, "config.json")):
        where = "--base" if override else f"{config_file} (base_model_name_or_path)"
        raise UserError(f"{where}: the adapter's base {base} is not a Hugging Face model directory (no config.json); "
                        "pass --base DIR naming the base model the adapter was trained on, or evaluate the merged "
                        "model (dft-convert without --adapter-only)")
    return base


def adapter_config(adapter_dir: str) -> dict[str, Any]:
    return json.loads(Path(adapter_dir, ADAPTER_CONFIG).read_text(encoding="utf-8"))


def load_merged(base: str, adapter_dir: str, dtype: torch.dtype):
    """The base with the peft adapter loaded and merged in memory (dft-eval's hf backend)."""
    from transformers import AutoModelForCausalLM

    try:
        from peft import PeftModel
    except ImportError:
        raise ModelError(f"--model {adapter_dir}: an adapter directory needs peft: pip install 'dft_ds[lora]'") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"--model {adapter_dir} on --base {base}: cannot load the adapter "
                         f"({type(exc).__name__}: {exc})") from None
