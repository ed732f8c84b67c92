"""Everything DeepSpeed, behind one seam: process group, config rendering, initialize, backward/step.

The loop calls `Engine.backward/step/all_reduce_sum/barrier/is_rank0` and never touches
torch.distributed directly. No loss math lives here.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import importlib
import json
import logging
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, NoReturn, Optional

import torch

from dft_ds.config import BatchPlan, Config
from dft_ds.errors import ConfigError
from dft_ds.net import free_port

DS_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs")
TEMPLATES = ("zero2", "zero3", "zero3_offload")
# Set by init_distributed: the program must end through exit_rank.
_JOINED_PROCESS_GROUP = False


# --------------------------------------------------------------------------------------------
# DeepSpeed's messages that a user cannot act on. Its warnings about anything else are kept.

# Logged through DeepSpeed's logger ("DeepSpeed"): accelerator detection, on every import.
DEEPSPEED_LOG_NOISE = (
    re.compile(r"Setting accelerator to CPU\. If you have GPU or other accelerator, we were unable to detect it"),
    re.compile(r"Setting ds_accelerator to \w+ \((auto detect|model specified)\)"),
)
# Printed with print(): the CPU comm op (loaded, or built once, on every start) and zero_to_fp32's
# progress lines when export.hf converts the final checkpoint.
DEEPSPEED_PRINT_NOISE = (
    re.compile(r"DeepSpeed \S+ built successfully"),
    re.compile(r"Processing zero checkpoint '"),
    re.compile(r"Parsing checkpoint created by deepspeed=="),
    re.compile(r"Detected checkpoint of type zero stage"),
    re.compile(r"Reconstructed (Trainable|Frozen) fp32 state dict with"),
)


def _gpu_present() -> bool:
    """A GPU device node exists: then "unable to detect it" is news the user can act on."""
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/kfd")


class _DeepSpeedLogNoise(logging.Filter):
    def __init__(self, patterns):
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def quiet_deepspeed() -> None:
    """Filter DEEPSPEED_LOG_NOISE out of DeepSpeed's logger. Call it before deepspeed is first imported
    (transformers imports it too): the accelerator line is logged at import. Idempotent."""
    logger = logging.getLogger("DeepSpeed")  # the name deepspeed.utils.logging gives its logger
    if any(isinstance(f, _DeepSpeedLogNoise) for f in logger.filters):
        return
    patterns = DEEPSPEED_LOG_NOISE if not _gpu_present() else DEEPSPEED_LOG_NOISE[1:]
    logger.addFilter(_DeepSpeedLogNoise(patterns))


class _DropPrinted:
    """A stream that passes everything on except whole print()ed lines matching DEEPSPEED_PRINT_NOISE.

    print() writes the text and then "\n" in two calls; the "\n" after a dropped line is dropped too.
    Everything else (a tqdm bar's "\r" updates included) goes through at once, unbuffered.
    """

    def __init__(self, target):
        self._target, self._dropped = target, False

    def write(self, text: str) -> int:
        if self._dropped and text == "\n":
            self._dropped = False
            return len(text)
        self._dropped = any(p.match(text.strip()) for p in DEEPSPEED_PRINT_NOISE)
        return len(text) if self._dropped else self._target.write(text)

    def __getattr__(self, name):  # flush, isatty, fileno, encoding: the real stream's
        return getattr(self._target, name)


@contextlib.contextmanager
def deepspeed_prints_filtered(conversion: bool = False):
    """Within the block, DeepSpeed's known print() noise is dropped from stdout and stderr. With
    `conversion`, zero_to_fp32's own progress bars are off too (dft-convert shows one bar of its own)."""
    bars = contextlib.nullcontext()
    if conversion:
        import functools

        import deepspeed.utils.zero_to_fp32 as z2f

        # zero_to_fp32 imports tqdm by name: a bar per shard file and per tensor list, noise here.
        bars = _patched(z2f, "tqdm", functools.partial(z2f.tqdm, disable=True))
    with bars, contextlib.redirect_stdout(_DropPrinted(sys.stdout)), \
            contextlib.redirect_stderr(_DropPrinted(sys.stderr)):
        yield


@contextlib.contextmanager
def _patched(owner, name: str, value):
    previous = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, previous)


# --------------------------------------------------------------------------------------------
# Process group


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def map_launcher_env(env: dict[str, str] = os.environ) -> None:
    """Give torch.distributed its RANK/WORLD_SIZE/LOCAL_RANK however the process was started.

    deepspeed and torchrun set them; srun sets SLURM_*; a plain process sets nothing and becomes a
    world of one on a free loopback port.
    """
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "RANK" not in env:
        env.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    env.setdefault("LOCAL_RANK", "0")


@contextlib.contextmanager
def _absent(*modules: str):
    """Within the block, importing any of `modules` not yet imported raises ImportError (DeepSpeed
    treats each as optional); afterwards they import as usual."""
    hidden = [m for m in modules if m not in sys.modules]
    for m in hidden:
        sys.modules[m] = None
    try:
        yield
    finally:
        for m in hidden:
            if m in sys.modules and sys.modules[m] is None:
                del sys.modules[m]


def import_deepspeed():
    """`import deepspeed`, without the MLflow import its autotuner makes on the way (deepspeed/__init__
    imports deepspeed.autotuning, which imports mlflow where it is installed, as with the trackers
    extra): about 1 s of every rank's start, for a module only DeepSpeed's autotuner (never run
    here) uses. A run that logs to MLflow imports it afterwards as usual."""
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    with _absent("mlflow"):
        import deepspeed
    return deepspeed


def import_muon_eager(ds_config: dict) -> None:
    """Import DeepSpeed's Muon optimizer with its kernels left uncompiled, unless the run uses Muon.

    DeepSpeed's ZeRO optimizers import that module on construction whatever the optimizer is, and
    it decorates its kernels with torch.compile at import, which loads torch's compiler stack:
    about 2 s of every rank's start, on any device, for kernels only Muon runs."""
    optimizer = str((ds_config.get("optimizer") or {}).get("type", ""))
    if "deepspeed.runtime.zero.muon.muon_optimizer" in sys.modules or "muon" in optimizer.lower():
        return
    from deepspeed.runtime import compiler

    with _patched(compiler, "compile", lambda: compiler.dummy_decorator):
        importlib.import_module("deepspeed.runtime.zero.muon.muon_optimizer")


def init_distributed(timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group on the accelerator's backend (NCCL on CUDA, gloo or ccl on CPU)."""
    deepspeed = import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    # DeepSpeed 0.19 calls torch collectives that torch 2.13 deprecates, once per bucket per step.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+`? is deprecated")
    quiet_deepspeed()
    map_launcher_env()
    local_rank = int(os.environ["LOCAL_RANK"])
    accel = get_accelerator()
    if accel.device_name() != "cpu":
        accel.set_device(local_rank)
    global _JOINED_PROCESS_GROUP
    _JOINED_PROCESS_GROUP = True
    with deepspeed_prints_filtered():  # the CPU comm op announces itself on every start
        deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), auto_mpi_discovery=False,
                                   verbose=False, timeout=timedelta(seconds=timeout_s))
    return DistInfo(int(os.environ["RANK"]), local_rank, int(os.environ["WORLD_SIZE"]))


def shutdown_distributed() -> None:
    """Leave the process group. A program that joined one ends through `exit_rank`, not a plain return."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_rank(code: int) -> NoReturn:
    """End a program that has used a process group with `code`, without the interpreter's teardown.

    A gloo worker thread drops each finished collective a moment after the caller has seen it
    finish. Where that drop frees a tensor whose Python object was let go meanwhile, the thread
    needs the GIL. Once the interpreter is finalizing, CPython ends such a thread with
    pthread_exit, and its unwind through the work's (noexcept) destructor calls std::terminate:
    the rank aborts with rc -6, "terminate called without an active exception", after a run
    that finished. A barrier and destroy_process_group before exit only narrow the window. A core
    dump of such an abort shows ~AsyncAllgatherWork -> decref_pyobject -> take_gil -> pthread_exit
    -> std::terminate on a gloo `runLoop` thread; tests/distributed/exit_race.py provokes it.

    So: non-daemon threads are joined and the atexit handlers run (logging, trackers), as at a
    normal exit, while the interpreter is whole; then the streams are flushed and the process
    ends at once. A process that never joined a process group exits the ordinary way.
    """
    import atexit
    import threading

    import torch.distributed as dist

    if not (_JOINED_PROCESS_GROUP or (dist.is_available() and dist.is_initialized())):
        sys.exit(code)
    shutdown_distributed()
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def barrier(world_size: int) -> None:
    import deepspeed.comm as dist

    if world_size > 1:
        dist.barrier()


def any_rank(flag: bool, world_size: int) -> bool:
    """Whether `flag` is true on any rank (one all-reduce); every rank learns the same answer."""
    if world_size == 1:
        return flag
    import deepspeed.comm as dist

    value = torch.tensor([1.0 if flag else 0.0], device=device())
    dist.all_reduce(value)
    return bool(value.item() > 0)


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(accel.device_name(int(os.environ.get("LOCAL_RANK", "0"))))


def resolve_precision(setting: str) -> str:
    """auto = bf16 where the accelerator has it natively, fp16 on older GPUs, fp32 on CPU.

    A CPU without native bf16 was seen to run a ZeRO-3 step of a 3.7M-parameter Llama about 8x
    slower in bf16 than in fp32 (139 s against 18 s for 30 steps on 2 ranks).
    """
    if setting != "auto":
        return setting
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() == "cpu":
        return "fp32"
    return "bf16" if accel.is_bf16_supported() else "fp16"


def torch_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


# --------------------------------------------------------------------------------------------
# DeepSpeed config


def load_template(name_or_path: str) -> dict[str, Any]:
    path = os.path.join(DS_CONFIG_DIR, f"{name_or_path}.json") if name_or_path in TEMPLATES else name_or_path
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"deepspeed.config: '{name_or_path}' is neither a template ({', '.join(TEMPLATES)}) "
                          "nor an existing JSON file") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: DeepSpeed config is not valid JSON ({exc.msg})") from None


def render_ds_config(cfg: Config, plan: BatchPlan, precision: str, hidden_size: int, on_cpu: bool,
                     load_universal: bool = False) -> dict[str, Any]:
    """The template with every "auto" filled from the run config; explicit values must agree with it.

    `load_universal`: the run resumes on another world size, from DeepSpeed's universal format.
    """
    ds = copy.deepcopy(load_template(cfg.deepspeed.config))
    t = cfg.train
    values = {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "gradient_clipping": t.max_grad_norm,
        "bf16.enabled": precision == "bf16",
        "fp16.enabled": precision == "fp16",
        "optimizer.params.lr": t.lr,
        "optimizer.params.betas": [t.adam_beta1, t.adam_beta2],
        "optimizer.params.eps": t.adam_eps,
        "optimizer.params.weight_decay": t.weight_decay,
        # Bucket sizes scale with the hidden size (the rule of thumb transformers uses too).
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
    }
    must_match = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    problems = []
    for key, value in values.items():
        node, leaf = _node(ds, key)
        if node is None or leaf not in node:
            continue
        if node[leaf] == "auto":
            node[leaf] = value
        elif key in must_match and node[leaf] != value:
            problems.append(f"{cfg.deepspeed.config}: '{key}' is {node[leaf]} but the run config gives {value}; "
                            "set it to \"auto\" or change train.*")
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    problems += [f"{cfg.deepspeed.config}: no run-config value for \"auto\" at '{k}'" for k in leftover]
    if problems:
        raise ConfigError("invalid DeepSpeed config:\n" + "\n".join(f"  - {p}" for p in problems))
    optimizer = ds.get("optimizer", {})
    offloaded = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
    if on_cpu and not offloaded and optimizer.get("type", "").lower() in ("adam", "adamw"):
        # FusedAdam is a CUDA kernel; on CPU use torch's AdamW (offload uses DeepSpeedCPUAdam instead).
        optimizer.setdefault("params", {})["torch_adam"] = True
    ds.setdefault("steps_per_print", 2**31 - 1)  # our own logging replaces DeepSpeed's
    if load_universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    return ds


def _node(tree: dict, dotted: str):
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.get(p)
        if not isinstance(tree, dict):
            return None, leaf
    return tree, leaf


def _walk(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


# --------------------------------------------------------------------------------------------
# Schedule


def cosine_with_warmup(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then cosine."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------
# Engine


def rows_end_to_end(attention: str, batch_rows: int) -> bool:
    """Whether a micro-batch runs as one row of its rows laid end to end.

    flash_attention_2 reads documents from position-id restarts only in a batch of one row (at more
    rows transformers runs each row as one causal sequence, across its documents). Laid end to end,
    each row starts at position 0, so the rows stay apart as well. Under sequence parallelism the
    exchange does this itself, over the whole rows."""
    return attention == "flash_attention_2" and batch_rows > 1 and _SP_STATE["active"] is None


def _forward(ds, device, batch: dict[str, torch.Tensor], head_loss=None):
    kwargs = {} if head_loss is None else {"head_loss": head_loss}
    # No attention_mask: the model builds a block-diagonal causal mask from position_ids restarts.
    input_ids, positions = batch["input_ids"], batch["position_ids"]
    rows, width = input_ids.shape
    flat = rows_end_to_end(getattr(ds.module.config, "_attn_implementation", None), rows)
    if flat:
        input_ids, positions = input_ids.reshape(1, -1), positions.reshape(1, -1)
        if head_loss is not None:
            kwargs["head_loss"] = lambda hidden, *rest: head_loss(hidden.view(rows, width, -1), *rest)
    out = ds(input_ids=input_ids.to(device, non_blocking=True),
             position_ids=positions.to(device, non_blocking=True), use_cache=False, **kwargs)
    if flat and head_loss is None:
        out.logits = out.logits.view(rows, width, -1)
    return out


def reference_ds_config(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The training config for a frozen model: no optimizer or scheduler; ZeRO-3 keeps sharding the
    parameters (one more copy of the weights / world size per rank, no gradients or optimizer
    states); under ZeRO-1/2, which shard only training state, every rank holds it whole (stage 0)."""
    ref = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
    zero = dict(ref.get("zero_optimization", {}))
    zero.pop("offload_optimizer", None)
    if zero.get("stage", 0) != 3:
        zero = {"stage": 0}
    ref["zero_optimization"] = zero
    return ref


class ReferenceEngine:
    """asft's frozen starting model, run forward only, on the same batches as the policy."""

    def __init__(self, model, ds_config: dict[str, Any]):
        import deepspeed

        model.requires_grad_(False)
        self.ds, *_ = deepspeed.initialize(model=model, config=ds_config)
        self.ds.eval()
        self.device = self.ds.device
        self.head = model.get_output_embeddings().weight

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor], hidden: bool):
        """Last hidden states (the fused path gathers the head itself) or full logits."""
        if hidden:
            return _forward(self.ds, self.device, batch, head_loss=lambda h, _w, _cap: h)
        return _forward(self.ds, self.device, batch).logits

    def gathered_head(self):
        """Context manager giving the full head weight (a collective under ZeRO-3: every rank enters)."""
        if hasattr(self.head, "ds_id"):
            import deepspeed

            @contextlib.contextmanager
            def gathered():
                with deepspeed.zero.GatheredParameters([self.head], modifier_rank=None):
                    yield self.head
            return gathered()
        return contextlib.nullcontext(self.head)


class AdapterOffReference:
    """asft's reference under model.lora: the policy model itself with its adapters switched off, which
    is exactly the frozen base it started from. No second copy of the weights; one more forward."""

    shares_head = True  # the head is frozen under LoRA (lora_train_embeddings with asft is refused)

    def __init__(self, engine: "Engine"):
        self.engine = engine

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor], hidden: bool):
        from dft_ds.model import adapters_off

        with adapters_off(self.engine.module):
            if hidden:
                return self.engine.forward(batch, head_loss=lambda h, _w, _cap: h)
            return self.engine.forward(batch).logits


def arch_list_for_deepspeed(env: dict[str, str] = os.environ) -> Optional[str]:
    """TORCH_CUDA_ARCH_LIST rewritten so that DeepSpeed's JIT op builder can read it, or None when it can already.

    DeepSpeed 0.19 parses each entry as dotted integers (it strips only "+PTX"), so the
    architecture-specific suffixes that PyTorch and CUDA 12+ images use ("9.0a", "10.0f") stop the
    build of FusedAdam with "invalid literal for int()". This was met on an H200 image whose list is
    "9.0a". The ops it JIT-builds (Adam, Lion) use no arch-specific instruction, so "9.0" builds them
    as well.
    """
    value = env.get("TORCH_CUDA_ARCH_LIST", "")
    entries = [e for e in re.split(r"[;\s]+", value) if e]
    fixed = [re.sub(r"^(\d+\.\d+)[a-z]+", r"\1", e) for e in entries]
    if fixed == entries:
        return None
    return ";".join(dict.fromkeys(fixed))


class Engine:
    """A DeepSpeed engine with the few verbs the loop needs.

    With `frozen` parameters (model.lora), checkpoints hold only the trainable ones and their
    optimizer state; the frozen base is rebuilt from its source on resume.
    """

    def __init__(self, model, ds_config: dict, dist: DistInfo, total_steps: int, cfg: Config,
                 frozen: bool = False):
        import deepspeed

        warmup = int(cfg.train.warmup_ratio * total_steps)

        def schedule(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: cosine_with_warmup(s, total_steps, warmup, cfg.train.min_lr_ratio))

        arch = arch_list_for_deepspeed()
        if arch is not None:
            if dist.rank == 0:
                print(f"dft-train: note: TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']!r} read as {arch!r} "
                      "for DeepSpeed's op builds, which cannot parse architecture suffixes", file=sys.stderr)
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        import_muon_eager(ds_config)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds_config, lr_scheduler=schedule)
        self.dist = dist
        self.device = self.ds.device
        self.frozen = frozen
        self.sp = SequenceGroup(1, 0, dist.rank)  # train.sequence_parallel: set by build_engines
        self.offload_activations = cfg.model.offload_activations

    @property
    def is_rank0(self) -> bool:
        return self.dist.is_rank0

    @property
    def module(self):
        """The model DeepSpeed wraps (sharded under ZeRO-3): for generation and for its config."""
        return self.ds.module

    def forward(self, batch: dict[str, torch.Tensor], head_loss=None):
        """The model's output, or with `head_loss` (see model.attach_head_loss) whatever it returns."""
        return _forward(self.ds, self.device, batch, head_loss)

    def offloaded_activations(self):
        """model.offload_activations: the tensors this block's forward saves for the backward wait in
        host memory (pinned on CUDA) until the backward needs them. On CPU they are there already."""
        if not self.offload_activations or self.device.type == "cpu":
            return contextlib.nullcontext()
        return torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda")

    def sequence_parallel(self):
        """The block in which attention runs Ulysses over this rank's group (a no-op at N = 1)."""
        return sequence_parallel_active(self.sp)

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is already divided by the target tokens of the whole optimizer step on all ranks.
        # DeepSpeed averages gradients over data-parallel ranks, so multiply by the world size to
        # keep a sum, and do not let it divide again by the accumulation steps (scale_wrt_gas).
        self.ds.backward(loss * self.dist.world_size, scale_wrt_gas=False)

    def step(self) -> None:
        """Called after every micro-batch; DeepSpeed steps the optimizer at accumulation boundaries."""
        self.ds.step()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        import deepspeed.comm as dist

        out = values.to(self.device).clone()
        if self.dist.world_size > 1:
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.cpu()

    def barrier(self) -> None:
        barrier(self.dist.world_size)

    def load_checkpoint(self, directory: str, tag: str) -> None:
        path, _ = self.ds.load_checkpoint(directory, tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True, load_module_strict=not self.frozen)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint at {os.path.join(directory, tag)}")

    def null_backward(self) -> None:
        """A backward that adds exactly zero to every gradient, through a real forward of one 8-token row.

        DeepSpeed (ZeRO-3 in particular) expects a backward for every micro-step before its optimizer
        step; this stands in for a micro-batch whose loss was not finite.
        """
        ids = torch.zeros((1, 8), dtype=torch.long, device=self.device)
        pos = torch.arange(8, device=self.device).unsqueeze(0)
        logits = self.ds(input_ids=ids, position_ids=pos, use_cache=False).logits
        self.ds.backward(logits.float().sum() * 0.0, scale_wrt_gas=False)

    def zero_lr_for_this_step(self) -> None:
        """The optimizer step about to run changes no weight (AdamW's update and decay scale with lr);
        the scheduler sets the next step's rate as usual."""
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0

    def set_peak_lr(self, lr: float) -> None:
        """After a resume with a new peak: rescale the restored schedule to it from the current step on."""
        sched = self.scheduler
        sched.base_lrs = [lr for _ in sched.base_lrs]
        for group, factor in zip(self.optimizer.param_groups, sched.lr_lambdas):
            group["lr"] = lr * factor(sched.last_epoch)

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    @property
    def grad_norm(self) -> Optional[float]:
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def save_checkpoint(self, directory: str, tag: str) -> None:
        # save_latest=False: dft_ds writes `latest` itself, atomically, once every rank has finished.
        self.ds.save_checkpoint(directory, tag=tag, save_latest=False, exclude_frozen_parameters=self.frozen)

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        """No dropout (held-out loss); train() turns it back on."""
        self.ds.eval()


# --------------------------------------------------------------------------------------------
# Building the engines of a run


# ---------------------------------------------------------------- sequence parallelism (train.sequence_parallel)
# Ulysses: the N ranks of a group each hold a contiguous slice of the same rows. Inside attention an
# all-to-all turns [heads, my slice] into [my heads, the whole row], the kernel runs on whole rows
# for H/N heads, and a second all-to-all turns it back. Everything else (embeddings, MLPs, norms, the
# fused head and loss) is per token and runs on the slice. DeepSpeed sees every rank as data-parallel:
# each rank's loss is its slice's weighted token losses over the step's target count on all ranks,
# so the mean over ranks of the gradients is the gradient of the whole step, whatever N is.


@dataclass(frozen=True)
class SequenceGroup:
    size: int              # N, train.sequence_parallel
    rank: int              # this rank's slice: rank % N
    data_rank: int         # the data-parallel rank: rank // N (it picks the rows)
    group: Any = None      # the process group of the N ranks; None when N == 1


def sequence_group(dist: DistInfo, size: int) -> SequenceGroup:
    """Groups of `size` consecutive ranks (one node's GPUs first, where the exchange is fastest).
    Every rank creates every group, in the same order, as torch.distributed requires."""
    if size == 1:
        return SequenceGroup(1, 0, dist.rank)
    import torch.distributed as tdist

    mine = None
    for start in range(0, dist.world_size, size):
        group = tdist.new_group(list(range(start, start + size)))
        if start <= dist.rank < start + size:
            mine = group
    return SequenceGroup(size, dist.rank % size, dist.rank // size, mine)


class _AllToAll(torch.autograd.Function):
    """Split `x` into N parts along `scatter`, send part j to rank j of the group, and concatenate what
    arrives along `gather`. Its gradient is the same exchange the other way round."""

    @staticmethod
    def forward(ctx, x, scatter: int, gather: int, group):
        import torch.distributed as tdist

        ctx.dims, ctx.group = (scatter, gather), group
        n = tdist.get_world_size(group)
        send = torch.stack(x.chunk(n, dim=scatter)).contiguous()
        recv = torch.empty_like(send)
        tdist.all_to_all_single(recv, send, group=group)
        return torch.cat(recv.unbind(0), dim=gather)

    @staticmethod
    def backward(ctx, grad):
        scatter, gather = ctx.dims
        return _AllToAll.apply(grad.contiguous(), gather, scatter, ctx.group), None, None, None


class _KvGroups:
    """The attention module as the kernel sees it, with another `num_key_value_groups` (key/value heads
    replicated for a group larger than their count)."""

    def __init__(self, module, groups: int):
        self._module, self.num_key_value_groups = module, groups

    def __getattr__(self, name):
        return getattr(self._module, name)


# The SequenceGroup while a training micro-batch runs, and that micro-batch's gathered positions.
_SP_STATE: dict[str, Any] = {"active": None, "positions": None}


@contextlib.contextmanager
def sequence_parallel_active(sp: SequenceGroup):
    """Attention exchanges across the group inside this block (a training micro-batch's forward and
    backward, where checkpointed layers are recomputed); outside it, evaluation and generation run
    the plain kernel on whatever they are given."""
    if sp.size == 1:
        yield
        return
    before, _SP_STATE["active"] = _SP_STATE["active"], sp
    try:
        yield
    finally:
        _SP_STATE["active"] = before
        _SP_STATE["positions"] = None  # the cached gather and spans of the block's micro-batch


def document_mask(position_ids: torch.Tensor, window: Optional[int] = None) -> torch.Tensor:
    """[B, 1, S, S] bool: causal, only within the document (a document starts where its position is 0),
    and with a sliding `window` only the last `window` positions (the query's own included)."""
    doc = (position_ids == 0).cumsum(dim=1)
    s = position_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=position_ids.device).tril()
    if window:
        causal = causal.triu(-(int(window) - 1))
    return (doc[:, :, None] == doc[:, None, :]).logical_and_(causal)[:, None]


def _gathered_positions(sp: SequenceGroup, local: torch.Tensor):
    """(the whole rows' position ids, each row's documents as (start, end) spans) for this slice's ids.

    Every layer gets the same position-id tensor, so one all-gather per micro-batch serves them all
    (and the layers run again in the backward): the result is kept, with a strong reference to the
    tensor it was made for, until the training block ends or the next micro-batch comes.
    """
    import torch.distributed as tdist

    cache = _SP_STATE.get("positions")
    if cache is None or cache[0] is not local:
        gathered = [torch.empty_like(local) for _ in range(sp.size)]
        tdist.all_gather(gathered, local.contiguous(), group=sp.group)
        positions = torch.cat(gathered, dim=1)
        cache = _SP_STATE["positions"] = (local, positions, document_spans(positions))
    return cache[1], cache[2]


def document_spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Each row's documents as [start, end) spans: a document starts where its position is 0."""
    spans = []
    for row in position_ids.tolist():
        starts = [i for i, p in enumerate(row) if p == 0]
        if not starts or starts[0] != 0:
            starts.insert(0, 0)
        spans.append(list(zip(starts, starts[1:] + [len(row)])))
    return spans


def _per_document(core, module, query, key, value, positions, spans, args, kwargs):
    """sdpa one document at a time, with the kernel's own causal mask: no [row x row] mask and no scores
    across documents, so memory grows with the documents, not the row. A sliding window (Mistral,
    Gemma 3's local layers) gets a windowed mask in each document longer than it."""
    window = kwargs.get("sliding_window")
    rows, weights = [], None
    for i, row_spans in enumerate(spans):
        parts = []
        for start, end in row_spans:
            pos = positions[i:i + 1, start:end]
            mask = document_mask(pos, window) if window and end - start > window else None
            cut = (slice(i, i + 1), slice(None), slice(start, end))
            part, weights = core(module, query[cut], key[cut], value[cut], mask, *args, **{**kwargs, "position_ids": pos})
            parts.append(part)
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0), weights


def install_sequence_parallel(attention: str) -> None:
    """Wrap transformers' `attention` kernel (sdpa or flash_attention_2) so that, while
    sequence_parallel_active, it runs Ulysses over the group. Idempotent per process."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    core = ALL_ATTENTION_FUNCTIONS[attention]
    if getattr(core, "_dft_sequence_parallel", False):
        return

    def ulysses(module, query, key, value, attention_mask, *args, **kwargs):
        sp = _SP_STATE["active"]
        if sp is None:
            return core(module, query, key, value, attention_mask, *args, **kwargs)
        n, group = sp.size, sp.group
        heads, kv_heads = query.shape[1], key.shape[1]
        kernel_module = module
        if kv_heads % n:  # fewer key/value heads than ranks (n % kv_heads == 0 was checked): replicate
            key = key.repeat_interleave(n // kv_heads, dim=1)
            value = value.repeat_interleave(n // kv_heads, dim=1)
            kernel_module = _KvGroups(module, heads // n)
        # [B, H, s, D] -> [B, H/N, S, D]
        query, key, value = (_AllToAll.apply(t, 1, 2, group) for t in (query, key, value))
        local = kwargs.get("position_ids")
        if local is None:
            raise RuntimeError("sequence parallelism needs position_ids in the attention call; this model does "
                               "not pass them (train.sequence_parallel=1 runs it)")
        positions, spans = _gathered_positions(sp, local)
        if attention == "flash_attention_2":
            # Variable-length sequences from the position ids. transformers reads packed documents
            # from them only in a batch of one row: lay the rows end to end (each starts at 0).
            b, h, s, d = query.shape
            query, key, value = (t.transpose(0, 1).reshape(1, t.shape[1], b * s, d) for t in (query, key, value))
            out, weights = core(kernel_module, query, key, value, None, *args,
                                **{**kwargs, "position_ids": positions.reshape(1, b * s)})
            out = out.reshape(b, s, h, d)
        else:
            out, weights = _per_document(core, kernel_module, query, key, value, positions, spans, args, kwargs)
        # [B, S, H/N, D] -> [B, s, H, D]
        return _AllToAll.apply(out.contiguous(), 1, 2, group), weights

    ulysses._dft_sequence_parallel = True
    ALL_ATTENTION_FUNCTIONS[attention] = ulysses

    # The model builds its attention mask before the layers run, from a rank's slice of positions. A
    # slice holding more than one document (or the padding document shard_rows adds) would get an
    # [s x s] block mask, kept for the whole step by checkpointing, that the exchange above never reads:
    # it masks each document itself, over the whole row.
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    build_mask = ALL_MASK_ATTENTION_FUNCTIONS[attention]

    def mask_outside_sequence_parallel(*args, **kwargs):
        return None if _SP_STATE["active"] is not None else build_mask(*args, **kwargs)

    ALL_MASK_ATTENTION_FUNCTIONS[attention] = mask_outside_sequence_parallel


def build_engines(plan, dist: DistInfo) -> tuple["Engine", Optional[ReferenceEngine]]:
    """The policy engine of a RunPlan (dft_ds.runplan), and asft's frozen reference when the loss uses one.

    Both are built from the same seeded init (or the same pretrained weights): the reference is the
    starting model, never a checkpoint.
    """
    from dft_ds import model as mdl

    cfg, dtype = plan.cfg, torch_dtype(plan.precision)
    model, keepalive = mdl.build_model(cfg.model, plan.model_config, plan.ds_config, dtype, cfg.train.seed,
                                       attention=plan.attention)
    lora = cfg.model.lora
    if lora:
        base = plan.lora_base
        if base.written_here and not os.path.isdir(base.path):  # the random-init base, once per run
            mdl.save_base(model, plan.tokenizer, base.path, dist.is_rank0)
        mdl.apply_lora(model, cfg.model, cfg.train.seed)
    if plan.fused:
        mdl.attach_head_loss(model)
    if cfg.model.tiled_mlp:
        mdl.apply_tiled_mlp(model, cfg.model.tiled_mlp)
    engine = Engine(model, plan.ds_config, dist, plan.total_steps, cfg, frozen=lora)
    del keepalive
    if cfg.train.sequence_parallel > 1:
        engine.sp = sequence_group(dist, cfg.train.sequence_parallel)
        install_sequence_parallel(plan.attention)
    reference = None
    if cfg.loss.uses_reference and lora:
        reference = AdapterOffReference(engine)
    elif cfg.loss.uses_reference:
        ref_config = reference_ds_config(plan.ds_config)
        ref_model, keepalive = mdl.build_model(replace(cfg.model, gradient_checkpointing=False),
                                               plan.model_config, ref_config, dtype, cfg.train.seed,
                                               attention=plan.attention)
        if plan.fused:
            mdl.attach_head_loss(ref_model)
        reference = ReferenceEngine(ref_model, ref_config)
        del keepalive
    return engine, reference
