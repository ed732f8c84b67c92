"""`dft-convert CHECKPOINT_DIR OUT_DIR`: ZeRO shards -> a Hugging Face model directory.

CHECKPOINT_DIR is a run directory (its checkpoints/ is used), <run>/checkpoints (the tag in its
`latest` file, or --tag) or one tag directory.

Reads a checkpoint written by the trainer (any ZeRO stage and world size), streams its fp32 master
weights one tensor at a time through DeepSpeed's `zero_to_fp32` (lazy mode), casts them to the
output dtype and writes `model*.safetensors` shards (plus an index when there are several),
config.json, generation_config.json and the tokenizer files: a directory that
`AutoModelForCausalLM.from_pretrained` and vLLM load as is.

A LoRA checkpoint (model.lora) holds only the trainable tensors: by default they are merged into
the base its dft_state.json names (or --base) and the same Hugging Face directory is written;
--adapter-only writes a peft adapter directory instead (dft_ds/adapter.py does both).

It needs no GPU and no process group, so it runs on a login node. The output is built in a hidden
sibling directory and renamed into place at the end: a failed (or, with --verify, a mismatching)
conversion never leaves a half-written OUT_DIR. Only convert checkpoints you trust: DeepSpeed's
reader unpickles its own model-state files (`torch.load(weights_only=False)`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch

from dft_ds.checkpoint import LATEST, STATE_FILE, CheckpointRef, open_checkpoint
from dft_ds.errors import EXIT_BAD_INPUT, UserError
from dft_ds.model import plain_model_init
from dft_ds.rundir import CHECKPOINTS

EXIT_VERIFY_FAILED = 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The names transformers writes in config.json ("dtype" in 5.x, "torch_dtype" before).
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DEFAULT_MAX_SHARD_SIZE = "2GB"
SIZE_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
WEIGHTS_PATTERN = "model{suffix}.safetensors"  # model.safetensors or model-00001-of-00003.safetensors
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# |logits of the converted model - logits of the checkpoint's weights| on the probe batch. Both
# sides run the same fp32 forward on identical weights (the reference is rounded to the output dtype
# first), so any difference is a conversion bug; 1e-5 leaves room for nothing but kernel noise.
VERIFY_ATOL = 1e-5
# Separately, rounding fp32 master weights to 16 bits moves the logits. The bound is relative to
# the largest reference logit: bf16 keeps 8 significant bits (unit roundoff u = 2^-8 = 0.39%), fp16
# keeps 11 (u = 2^-11 = 0.049%); the measured relative logit error was 1-3 u (docs/checkpoints.md).
# 16 u (bf16 6.25%, fp16 0.78%) leaves a wide margin for deeper models and still fails a cast that
# really changes the model. (NaN or inf from an fp16 overflow fail the exact check above as well.)
CAST_RTOL = {torch.bfloat16: 16 * 2.0**-8, torch.float16: 16 * 2.0**-11}
# LoRA: W + (B @ A) * s in one weight vs W x + s * B (A x) in two, both in fp32; only the order of
# the fp32 sums differs. Relative to the largest logit, as CAST_RTOL.
MERGE_RTOL = 1e-4
PROBE_SHAPE = (2, 64)
PROBE_SEED = 1234


class VerificationFailed(RuntimeError):
    """--verify found logits that differ beyond the tolerance: the conversion is not trusted."""


# --------------------------------------------------------------------------------------------
# Planning: which tensors, in which dtype, in which file


@dataclass(frozen=True)
class TensorSpec:
    """Shape and output dtype of one tensor: enough to plan shards without materialising anything."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * self.dtype.itemsize


@dataclass
class ShardLayout:
    specs: dict[str, TensorSpec]
    filename_to_tensors: dict[str, list[str]]
    dropped_aliases: dict[str, str] = field(default_factory=dict)  # tied name -> the name written

    @property
    def total_size(self) -> int:
        return sum(spec.nbytes for spec in self.specs.values())

    @property
    def is_sharded(self) -> bool:
        return len(self.filename_to_tensors) > 1


def parse_size(text: str) -> int:
    """'2GB', '500MB', '100KB', '1TB' or a plain number of bytes (decimal units, as Hugging Face uses)."""
    value = text.strip().upper()
    for unit in sorted(SIZE_UNITS, key=len, reverse=True):
        if value.endswith(unit) and value[: -len(unit)].strip():
            number, multiplier = value[: -len(unit)].strip(), SIZE_UNITS[unit]
            break
    else:
        number, multiplier = value, 1
    try:
        size = int(float(number) * multiplier)
    except ValueError:
        raise ValueError(f"'{text}' is not a size like 2GB, 500MB or 1000000") from None
    if size <= 0:
        raise ValueError(f"'{text}' must be a positive size")
    return size


def output_dtype(tensor_dtype: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    """Floating tensors take the output dtype; integer and bool buffers keep theirs."""
    return dtype if tensor_dtype.is_floating_point else tensor_dtype


def dedupe_aliases(tensors: Mapping[str, Any], keep: Iterable[str] = ()) -> tuple[list[str], dict[str, str]]:
    """Names to write once each, and {dropped alias: kept name} for tied weights.

    DeepSpeed returns a tied weight (lm_head.weight = model.embed_tokens.weight) as one object under
    both names. safetensors refuses aliases and transformers re-ties on load, so only one name is
    written: one listed in `keep` (what the model class expects), else the first seen (the one
    DeepSpeed owns, which is also the one transformers keeps).
    """
    keep = set(keep)
    groups: dict[int, list[str]] = {}
    for name, tensor in tensors.items():
        groups.setdefault(id(tensor), []).append(name)
    names, dropped = [], {}
    for group in groups.values():
        kept = next((n for n in group if n in keep), group[0])
        names.append(kept)
        dropped.update({n: kept for n in group if n != kept})
    order = {name: i for i, name in enumerate(tensors)}
    return sorted(names, key=order.__getitem__), dropped


def plan_conversion(tensors: Mapping[str, Any], dtype: torch.dtype, max_shard_bytes: int,
                    keep: Iterable[str] = ()) -> ShardLayout:
    """Shard assignment in state-dict order, at most `max_shard_bytes` per file (a bigger tensor gets its own)."""
    from huggingface_hub import split_state_dict_into_shards_factory

    names, dropped = dedupe_aliases(tensors, keep)
    specs = {n: TensorSpec(tuple(tensors[n].shape), output_dtype(tensors[n].dtype, dtype)) for n in names}
    # Hugging Face's own splitter, so file names and the packing rule match save_pretrained's.
    split = split_state_dict_into_shards_factory(specs, get_storage_size=lambda spec: spec.nbytes,
                                                 filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_shard_bytes)
    return ShardLayout(specs, split.filename_to_tensors, dropped)


def index_json(plan: ShardLayout) -> dict[str, Any]:
    """The content of model.safetensors.index.json, as transformers' save_pretrained writes it."""
    weight_map = {name: filename for filename, names in plan.filename_to_tensors.items() for name in names}
    total_parameters = sum(spec.nbytes // spec.dtype.itemsize for spec in plan.specs.values())
    return {"metadata": {"total_parameters": total_parameters, "total_size": plan.total_size},
            "weight_map": dict(sorted(weight_map.items()))}


# --------------------------------------------------------------------------------------------
# Reading and writing


def load_lazy_state_dict(ref: CheckpointRef) -> dict[str, Any]:
    """name -> lazy tensor (`.shape`, `.dtype`, `.contiguous()` materialises it), fp32 master weights.

    Under ZeRO-3 each value gathers its slices from the (memory-mapped) optimizer shards only when
    asked. Under ZeRO-1/2 DeepSpeed concatenates the flat partitions up front, so the fp32 model is
    held once in memory.
    """
    # DeepSpeed prints (on import too) to stdout; keep stdout for our own summary.
    with contextlib.redirect_stdout(sys.stderr):
        from dft_ds.deepspeed_setup import import_deepspeed

        import_deepspeed()
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(ref.root), tag=ref.tag, lazy_mode=True)
        except (FileNotFoundError, ValueError, EOFError, RuntimeError, KeyError) as exc:
            raise UserError(f"{ref.path}: cannot read the ZeRO shards ({type(exc).__name__}: {exc})") from None


def materialize(tensor: Any, dtype: torch.dtype) -> torch.Tensor:
    """One tensor in the output dtype, owning exactly its own storage (safetensors refuses shared views)."""
    out = tensor.contiguous()
    out = out.to(output_dtype(out.dtype, dtype))
    if out.untyped_storage().nbytes() != out.numel() * out.element_size():
        out = out.clone()  # a view into a larger flat buffer (ZeRO-1/2, or ZeRO-3 padding)
    return out


def write_weights(tensors: Mapping[str, Any], plan: ShardLayout, out_dir: Path, dtype: torch.dtype,
                  progress: bool = True) -> None:
    """Write shard by shard; at most one shard's tensors are held at a time."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    with tqdm(total=len(plan.specs), unit="tensor", desc="dft-convert", disable=not progress) as bar:
        for filename, names in plan.filename_to_tensors.items():
            shard = {}
            for name in names:
                shard[name] = materialize(tensors[name], dtype)
                bar.update(1)
            save_file(shard, str(out_dir / filename), metadata={"format": "pt"})
            del shard  # the memory peak is one shard: drop it before building the next
            _fsync(out_dir / filename)
    if plan.is_sharded:
        _write_json(out_dir / INDEX_FILE, index_json(plan))


def write_hf_files(hf_config: Path, out_dir: Path, dtype: torch.dtype, architectures: Optional[list[str]]) -> None:
    """config.json (dtype set, inference defaults), generation_config.json and the tokenizer files."""
    for item in sorted(hf_config.iterdir()):
        if item.name == CONFIG_FILE:
            continue
        if item.is_dir():
            shutil.copytree(item, out_dir / item.name)
        else:
            shutil.copy2(item, out_dir / item.name)
    config = json.loads((hf_config / CONFIG_FILE).read_text(encoding="utf-8"))
    # transformers 5 reads "dtype"; transformers 4.x and vLLM read "torch_dtype". Write both.
    config["dtype"] = config["torch_dtype"] = DTYPE_NAMES[dtype]
    # The trainer turns the KV cache off (it only slows training); generation wants it on.
    if config.get("use_cache") is False:
        config["use_cache"] = True
    # config.save_pretrained without a model omits "architectures"; vLLM picks the class from it.
    if not config.get("architectures") and architectures:
        config["architectures"] = architectures
    _write_json(out_dir / CONFIG_FILE, config)
    if not (out_dir / GENERATION_CONFIG_FILE).exists():
        _write_generation_config(hf_config, out_dir)


def _write_generation_config(hf_config: Path, out_dir: Path) -> None:
    """bos/eos/pad ids from the model config, as save_pretrained does for a model that generates."""
    from transformers import AutoConfig, GenerationConfig

    GenerationConfig.from_model_config(AutoConfig.from_pretrained(hf_config)).save_pretrained(out_dir)


def _write_json(path: Path, content: Any) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# What the model class expects


@dataclass
class ModelKeys:
    """State-dict names and shapes the model class in hf_config expects, and its tied names."""

    shapes: dict[str, tuple[int, ...]]
    tied: dict[str, str]  # target -> source, e.g. lm_head.weight -> model.embed_tokens.weight
    architectures: list[str]


def expected_keys(hf_config: Path) -> Optional[ModelKeys]:
    """Build the model on the meta device (no memory, no init) to read its names; None if it cannot be built."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(hf_config)
        with torch.device("meta"), plain_model_init():
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # custom code, an unknown model type: convert anyway, unchecked
        print(f"dft-convert: warning: cannot build the model class of {hf_config / CONFIG_FILE} "
              f"({type(exc).__name__}: {exc}); tensor names are not checked", file=sys.stderr)
        return None
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in tied}
    return ModelKeys(shapes, tied, [type(model).__name__])


def check_keys(ref: CheckpointRef, plan: ShardLayout, keys: ModelKeys) -> None:
    """The names and shapes to be written must be exactly those the model class loads."""
    written = set(plan.specs)
    missing = sorted(set(keys.shapes) - written)
    unexpected = sorted(written - set(keys.shapes))
    wrong = sorted(n for n in written & set(keys.shapes) if plan.specs[n].shape != keys.shapes[n])
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s) the model needs: {', '.join(missing[:5])}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) the model does not have: {', '.join(unexpected[:5])}"
                        + (" (tie_word_embeddings is true but the weights were trained untied?)"
                           if set(unexpected) & set(keys.tied) else ""))
    if wrong:
        problems.append("shape mismatch: " + ", ".join(
            f"{n} {list(plan.specs[n].shape)} vs {list(keys.shapes[n])}" for n in wrong[:5]))
    if problems:
        raise UserError(f"{ref.path}: the shards do not fit the model in {ref.hf_config / CONFIG_FILE}: "
                        + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# The output directory


def check_out_dir(out_dir: Path, ref: CheckpointRef, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a directory")
    out_real, ckpt_real = out_dir.resolve(), ref.path.resolve()
    if out_real == ckpt_real or out_real in ckpt_real.parents or ckpt_real in out_real.parents:
        raise UserError(f"{out_dir}: the output must lie outside the checkpoint {ref.path} (and not contain it)")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir}: not empty; choose another OUT_DIR or pass --overwrite to replace it "
                        "(nothing was written)")


@contextlib.contextmanager
def staging_dir(out_dir: Path):
    """A hidden sibling of out_dir to build in; removed unless it was published."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a model directory is meant to be shared
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished directory into place; an old OUT_DIR (with --overwrite) is removed after."""
    for item in staging.iterdir():  # safetensors creates its files private (0600)
        if item.is_file():
            item.chmod(0o666 & ~_umask())
    old = None
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise UserError(f"{out_dir}: became non-empty during the conversion; nothing was replaced")
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.rename(out_dir, old)
    os.rename(staging, out_dir)  # also replaces an empty directory
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync(out_dir.parent)


# --------------------------------------------------------------------------------------------
# Verification


@dataclass
class VerifyReport:
    max_abs_diff: float  # converted vs the checkpoint's weights rounded to the output dtype
    cast_abs_diff: float  # converted vs the checkpoint's fp32 weights (0 for fp32 output)
    max_abs_logit: float
    cast_tolerance: float
    merge_abs_diff: Optional[float] = None  # LoRA: the checkpoint's weights vs base + adapter unmerged (fp32)
    merge_tolerance: float = 0.0

    @property
    def ok(self) -> bool:
        merge_ok = self.merge_abs_diff is None or self.merge_abs_diff <= self.merge_tolerance
        return self.max_abs_diff <= VERIFY_ATOL and self.cast_abs_diff <= self.cast_tolerance and merge_ok

    def describe(self) -> str:
        text = f"verify: max |logit diff| {self.max_abs_diff:.3g} (tolerance {VERIFY_ATOL:g})"
        if self.cast_tolerance > 0:
            text += (f"; vs the fp32 weights {self.cast_abs_diff:.3g} from rounding "
                     f"(tolerance {self.cast_tolerance:.3g} = {self.cast_tolerance / max(self.max_abs_logit, 1.0):.3g}"
                     f" x max |logit| {self.max_abs_logit:.3g})")
        if self.merge_abs_diff is not None:
            text += (f"; LoRA merged vs base + adapter {self.merge_abs_diff:.3g} (tolerance {self.merge_tolerance:.3g} = "
                     f"{MERGE_RTOL:g} x max |logit|)")
        return text


def probe_batch(vocab_size: int) -> torch.Tensor:
    """Fixed random token ids: every model has ids, not every checkpoint a tokenizer."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randint(0, vocab_size, PROBE_SHAPE, generator=generator)


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


def verify(out_dir: Path, tensors: Mapping[str, Any], hf_config: Path, dtype: torch.dtype,
           lora_reference=None) -> VerifyReport:
    """Logits of OUT_DIR loaded by from_pretrained vs a model holding the checkpoint's weights directly.

    Holds two fp32 models at once (about twice the fp32 model size in memory). For a LoRA
    checkpoint, `tensors` are the merged weights, and `lora_reference()` builds the unmerged model
    (base + adapter, as training computed it) that the merged weights must match.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(hf_config)
    ids = probe_batch(config.vocab_size)
    with plain_model_init():
        converted = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
        got = _logits(converted, ids)
        del converted
        reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    load_into(reference, tensors)
    fp32_logits = _logits(reference, ids)
    cast_diff, tolerance = 0.0, 0.0
    if dtype != torch.float32:
        cast_diff = float((got - fp32_logits).abs().max())
        tolerance = CAST_RTOL[dtype] * max(float(fp32_logits.abs().max()), 1.0)
        with torch.no_grad():
            for value in reference.state_dict().values():
                if value.is_floating_point():
                    value.copy_(value.to(dtype))  # the same rounding the conversion applied
        expected = _logits(reference, ids)
    else:
        expected = fp32_logits
    report = VerifyReport(float((got - expected).abs().max()), cast_diff, float(fp32_logits.abs().max()), tolerance)
    if lora_reference is not None:
        del reference
        unmerged = _logits(lora_reference(), ids)
        report.merge_abs_diff = float((fp32_logits - unmerged).abs().max())
        report.merge_tolerance = MERGE_RTOL * max(float(unmerged.abs().max()), 1.0)
    return report


def verify_adapter(out_dir: Path, base: str, tensors: Mapping[str, Any], spec, dtype: torch.dtype) -> VerifyReport:
    """--adapter-only: base + OUT_DIR through PeftModel.from_pretrained vs base + the checkpoint's
    adapter injected directly (rounded to the output dtype as written)."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    from dft_ds.adapter import unmerged_model

    ids = probe_batch(AutoConfig.from_pretrained(base).vocab_size)
    with plain_model_init():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    got = _logits(PeftModel.from_pretrained(model, str(out_dir)).eval(), ids)
    del model
    expected = _logits(unmerged_model(base, tensors, spec, round_to=dtype), ids)
    return VerifyReport(float((got - expected).abs().max()), 0.0, float(expected.abs().max()), 0.0)


def load_into(model, tensors: Mapping[str, Any]) -> None:
    """load_state_dict one tensor at a time (never the whole fp32 dict at once); every name must be used."""
    remaining = set(model.state_dict())
    for name, tensor in tensors.items():
        result = model.load_state_dict({name: tensor.contiguous()}, strict=False)
        if result.unexpected_keys:
            raise VerificationFailed(f"verify: the model built from the config has no tensor '{name}'")
        remaining.discard(name)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    if remaining - tied:
        raise VerificationFailed(f"verify: the checkpoint lacks {sorted(remaining - tied)[:5]}")


# --------------------------------------------------------------------------------------------
# The whole conversion


@dataclass
class Result:
    out_dir: Path
    ref: CheckpointRef
    dtype: torch.dtype
    plan: ShardLayout
    seconds: float
    verify: Optional[VerifyReport] = None

    def describe(self) -> str:
        files = len(self.plan.filename_to_tensors)
        mb = self.plan.total_size / 1e6
        rate = mb / max(self.seconds, 1e-9)
        return (f"wrote {self.out_dir}: {len(self.plan.specs)} tensors, {mb:.1f} MB of {DTYPE_NAMES[self.dtype]} "
                f"in {files} file{'s' if files > 1 else ''}, {self.seconds:.1f} s ({rate:.0f} MB/s)")


def choose_dtype(requested: Optional[str], ref: CheckpointRef) -> torch.dtype:
    """--dtype, else the precision the run trained in (its master weights are fp32 either way)."""
    if requested is not None:
        return DTYPES[requested]
    precision = ref.state.get("precision")
    if precision not in DTYPES:
        raise UserError(f"{ref.path / STATE_FILE}: 'precision' is {precision!r}, not one of "
                        f"{', '.join(DTYPES)}; pass --dtype")
    return DTYPES[precision]


def checkpoints_of(path: str | os.PathLike) -> Optional[Path]:
    """<run>/checkpoints when `path` is a run directory (it holds checkpoints/ and is no checkpoint
    itself): the directory users have at hand after training, one level above the one that holds `latest`."""
    given = Path(path)
    inner = given / CHECKPOINTS
    if inner.is_dir() and not (given / LATEST).exists() and not (given / STATE_FILE).exists():
        return inner
    return None


def convert_checkpoint(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, *, tag: Optional[str] = None,
                       dtype: Optional[str] = None, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                       overwrite: bool = False, verify_logits: bool = False, progress: bool = True,
                       adapter_only: bool = False, base: Optional[str] = None, checkpoint_verify: str = "hash",
                       log=print) -> Result:
    """ZeRO checkpoint -> Hugging Face directory. Raises UserError on bad input, VerificationFailed on a mismatch.

    A LoRA checkpoint (model.lora) is merged into its base, or with `adapter_only` written as a peft
    adapter directory; `base` replaces the base directory the checkpoint records.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    inner = checkpoints_of(checkpoint_dir)
    ref = open_checkpoint(inner or checkpoint_dir, tag, checkpoint_verify)
    if inner is not None:
        chosen = f"--tag {tag}" if tag is not None else f"the latest, named in {inner / LATEST}"
        log(f"dft-convert: {checkpoint_dir} is a run directory: converting {ref.path} ({chosen})")
    lora = lora_spec(ref, adapter_only, base)
    check_out_dir(out, ref, overwrite)
    out_dtype = choose_dtype(dtype, ref)
    max_bytes = max_shard_size if isinstance(max_shard_size, int) else parse_size(max_shard_size)
    world = ref.state["world_size"]
    base_dir = None
    if lora is not None:
        from dft_ds.adapter import resolve_base

        base_dir = resolve_base(lora.base, base, ref.path / STATE_FILE)
    what = ("" if lora is None else
            f", LoRA r={lora.rank} on base {base_dir}{' (the adapter only)' if adapter_only else ' (merged)'}")
    log(f"dft-convert: {ref.path} (step {ref.state.get('global_step', '?')}, ZeRO-{ref.state['zero_stage']}, "
        f"{world} {'rank' if world == 1 else 'ranks'}, trained in {ref.state.get('precision', '?')}{what}) -> {out} as "
        f"{DTYPE_NAMES[out_dtype]}")
    if adapter_only:
        return _write_adapter_only(ref, out, lora, base_dir, out_dtype, overwrite, verify_logits, log, start)

    keys = expected_keys(ref.hf_config)
    tensors = load_lazy_state_dict(ref)
    reference = None
    if lora is not None:
        from dft_ds.adapter import base_tensors, merged_tensors, unmerged_model

        trained = tensors
        tensors = merged_tensors(base_tensors(base_dir), trained, lora, ref.path)
        reference = lambda: unmerged_model(base_dir, trained, lora)  # noqa: E731
    plan = plan_conversion(tensors, out_dtype, max_bytes, keep=keys.shapes if keys else ())
    if keys is not None:
        check_keys(ref, plan, keys)
    with staging_dir(out) as staging:
        write_weights(tensors, plan, staging, out_dtype, progress)
        write_hf_files(ref.hf_config, staging, out_dtype, keys.architectures if keys else None)
        report = None
        if verify_logits:
            report = verify(staging, tensors, ref.hf_config, out_dtype, lora_reference=reference)
            log(report.describe())
            if not report.ok:
                raise VerificationFailed(f"{report.describe()}; {out} was not written")
        publish(staging, out, overwrite)
    return Result(out, ref, out_dtype, plan, time.perf_counter() - start, report)


def lora_spec(ref: CheckpointRef, adapter_only: bool, base: Optional[str]):
    """The checkpoint's LoRA entry (None for a full checkpoint, where --adapter-only and --base are refused)."""
    entry = ref.state.get("lora")
    if entry is None:
        for flag, given in (("--adapter-only", adapter_only), ("--base", base is not None)):
            if given:
                raise UserError(f"{flag}: {ref.path} is not a LoRA checkpoint (its {STATE_FILE} has no 'lora' entry: "
                                f"the run trained every weight); convert it without {flag}")
        return None
    from dft_ds.adapter import LoraSpec

    return LoraSpec.from_state(entry, ref.path / STATE_FILE)


def _write_adapter_only(ref: CheckpointRef, out: Path, lora, base_dir: str, dtype: torch.dtype, overwrite: bool,
                        verify_logits: bool, log, start: float) -> Result:
    from dft_ds.adapter import ADAPTER_WEIGHTS, adapter_state, write_adapter

    tensors = load_lazy_state_dict(ref)
    config, state = adapter_state(tensors, lora, ref.hf_config, base_dir, ref.path)
    specs = {n: TensorSpec(tuple(t.shape), output_dtype(t.dtype, dtype)) for n, t in state.items()}
    plan = ShardLayout(specs, {ADAPTER_WEIGHTS: list(specs)})
    with staging_dir(out) as staging:
        # clone: a tied embedding/head pair is two tensors in the adapter file
        write_adapter(staging, config, {name: materialize(t, dtype).clone() for name, t in state.items()},
                      ref.hf_config)
        report = None
        if verify_logits:
            report = verify_adapter(staging, base_dir, tensors, lora, dtype)
            log(report.describe())
            if not report.ok:
                raise VerificationFailed(f"{report.describe()}; {out} was not written")
        publish(staging, out, overwrite)
    return Result(out, ref, dtype, plan, time.perf_counter() - start, report)


# --------------------------------------------------------------------------------------------
# Command line

EXAMPLES = """\
examples:
  dft-convert runs/r1 runs/r1/hf                              # a run directory: its checkpoints/latest
  dft-convert runs/r1/checkpoints runs/r1/hf                  # the same: the checkpoint `latest` names
  dft-convert runs/r1/checkpoints/step-200 hf/step-200 --dtype bf16 --verify
  dft-convert runs/r1/checkpoints out --tag step-100 --max-shard-size 500MB --overwrite
  dft-convert runs/lora runs/lora/hf                          # model.lora: the merged model (base + adapter)
  dft-convert runs/lora runs/lora/adapter --adapter-only      # model.lora: a peft adapter directory
  dft-convert runs/lora out --base /models/Qwen2.5-0.5B       # model.lora: the base moved

A LoRA checkpoint (model.lora=true) holds only the trainable tensors; the base they adapt is the
directory its dft_state.json records ("lora": "base"), or --base.

exit codes: 0 written; 2 bad input (missing or incomplete checkpoint, non-empty OUT_DIR, a missing
LoRA base, --adapter-only on a full checkpoint); 1 --verify found a mismatch (OUT_DIR is then left untouched).
"""


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dft-convert", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Convert a dft_ds (DeepSpeed ZeRO) checkpoint into a Hugging Face model directory: "
                    "safetensors shards, config.json, generation_config.json and the tokenizer. "
                    "Needs no GPU and no process group.")
    parser.add_argument("checkpoint_dir", metavar="CHECKPOINT_DIR",
                        help="a run directory (its checkpoints/ is used, and the checkpoint taken is printed), "
                             "<run>/checkpoints (converts the tag in its 'latest' file, or --tag) or a tag directory")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the Hugging Face directory to create")
    parser.add_argument("--tag", default=None, help="checkpoint tag under CHECKPOINT_DIR (or <run>/checkpoints), "
                                                    "e.g. step-200")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weight dtype of the output (default: the precision the run trained in)")
    parser.add_argument("--max-shard-size", type=_size_arg, default=DEFAULT_MAX_SHARD_SIZE,
                        help=f"largest safetensors file, e.g. 500MB (default {DEFAULT_MAX_SHARD_SIZE}); "
                             "a single model.safetensors when everything fits")
    parser.add_argument("--verify", action="store_true",
                        help="load OUT_DIR with transformers and compare its logits on a probe batch with the "
                             "checkpoint's weights (needs about twice the fp32 model size in memory)")
    parser.add_argument("--checkpoint-verify", choices=("hash", "size", "off"), default="hash",
                        help="what is checked of the checkpoint before any shard is read, as checkpoint.verify: hash "
                             "(every file against the content hash recorded at save time; default), size or off")
    parser.add_argument("--adapter-only", action="store_true",
                        help="LoRA checkpoints: write the adapter alone as a peft directory (adapter_config.json "
                             "naming the base, adapter_model.safetensors, the tokenizer) instead of the merged model; "
                             "trained embeddings and head (model.lora_train_embeddings) go in as modules_to_save")
    parser.add_argument("--base", default=None, metavar="DIR",
                        help="LoRA checkpoints: the base model directory (default: the one the checkpoint records)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    ns = parse_args(argv)
    try:
        result = convert_checkpoint(ns.checkpoint_dir, ns.out_dir, tag=ns.tag, dtype=ns.dtype,
                                    max_shard_size=ns.max_shard_size, overwrite=ns.overwrite,
                                    verify_logits=ns.verify, progress=ns.progress,
                                    adapter_only=ns.adapter_only, base=ns.base,
                                    checkpoint_verify=ns.checkpoint_verify)
    except UserError as exc:
        print(f"dft-convert: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except VerificationFailed as exc:
        print(f"dft-convert: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_VERIFY_FAILED
    print(result.describe(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
