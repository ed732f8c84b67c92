"""Loading DeepSpeed and keeping it quiet: what a rank does before and around `import deepspeed`.

DeepSpeed's messages that a user cannot act on are filtered (its warnings about anything else are
kept); MLflow and the Muon kernels that DeepSpeed imports on the way are kept out of every start;
TORCH_CUDA_ARCH_LIST is rewritten where DeepSpeed's op builder cannot parse it.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import importlib
import logging
import os
import re
import sys
from typing import Optional

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
    own_extensions_dir()
    with _absent("mlflow"):
        import deepspeed
    read_numa_once()
    return deepspeed


# The op DeepSpeed JIT-builds on the CPU accelerator (deepspeed/ops/op_builder/cpu/comm.py, NAME).
CPU_COMM_OP = "deepspeed_shm_comm"


def own_extensions_dir(env: Optional[dict] = None) -> str:
    """This environment's folder for the ops DeepSpeed compiles at run time (TORCH_EXTENSIONS_DIR, set
    here unless the user set it), and its own ninja first on PATH.

    torch builds them into ~/.cache/torch_extensions/py311_cpu by default, one folder for every
    environment of that Python: two virtual environments (another torch, another ninja) then rebuild the
    op over each other on every start, a minute each. The environment's own folder is sys.prefix/
    torch_extensions where it can be written, else one under ~/.cache/dft_ds named after sys.prefix."""
    env = os.environ if env is None else env
    if env.get("TORCH_EXTENSIONS_DIR"):
        return env["TORCH_EXTENSIONS_DIR"]
    folder = os.path.join(sys.prefix, "torch_extensions")
    if not os.access(sys.prefix, os.W_OK) and not os.path.isdir(folder):
        import hashlib

        key = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
        folder = os.path.join(os.path.expanduser("~"), ".cache", "dft_ds", "torch_extensions",
                              f"{os.path.basename(sys.prefix.rstrip(os.sep)) or 'python'}-{key}")
    env["TORCH_EXTENSIONS_DIR"] = folder
    # the ninja that built it must build it again: another ninja hashes the build commands differently
    own_bin = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(own_bin, "ninja")) and env.get("PATH", "").split(os.pathsep)[0] != own_bin:
        env["PATH"] = own_bin + os.pathsep + env.get("PATH", "")
    return folder


def cpu_comm_op_built(env: Optional[dict] = None) -> bool:
    """Whether DeepSpeed's CPU communication op is built in this environment's folder (a start then
    loads it in a moment; otherwise the first rank compiles it, about a minute on two cores)."""
    folder = own_extensions_dir(env)  # the user's TORCH_EXTENSIONS_DIR, or this environment's
    return os.path.exists(os.path.join(folder, CPU_COMM_OP, f"{CPU_COMM_OP}.so"))


def read_numa_once() -> None:
    """DeepSpeed's CPU accelerator counts its devices (the NUMA nodes with cores) by running `numactl
    --hardware` in a new process on every device_count() call, unless LOCAL_SIZE is set (only
    DeepSpeed's own launcher sets it; it also switches on its shared-memory all-reduce). ZeRO-3 calls
    device_count() for every gradient bucket it reduces, so each micro-step of a rank started by
    torchrun, srun or by hand forked a process: about 7 ms a call on the 2-core test machine, where
    numactl is absent, more for a rank holding more memory. A machine's NUMA layout does not change
    while a run lives: it is read once per process."""
    from deepspeed.utils import numa

    if getattr(numa.get_numa_cores, "read_once", False):
        return
    read = functools.lru_cache(maxsize=1)(numa.get_numa_cores)

    def get_numa_cores() -> list[list[int]]:
        return [list(cores) for cores in read()]  # a copy each time, as the original returns a new list

    get_numa_cores.read_once = True
    numa.get_numa_cores = get_numa_cores


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


def arch_list_for_deepspeed(env: Optional[dict[str, str]] = None) -> Optional[str]:
    """TORCH_CUDA_ARCH_LIST rewritten so that DeepSpeed's JIT op builder can read it, or None when it can already.

    DeepSpeed 0.19 parses each entry as dotted integers (it strips only "+PTX"), so the
    architecture-specific suffixes that PyTorch and CUDA 12+ images use ("9.0a", "10.0f") stop the
    build of FusedAdam with "invalid literal for int()". This was met on an H200 image whose list is
    "9.0a". The ops it JIT-builds (Adam, Lion) use no arch-specific instruction, so "9.0" builds them
    as well.
    """
    env = os.environ if env is None else env
    value = env.get("TORCH_CUDA_ARCH_LIST", "")
    entries = [e for e in re.split(r"[;\s]+", value) if e]
    fixed = [re.sub(r"^(\d+\.\d+)[a-z]+", r"\1", e) for e in entries]
    if fixed == entries:
        return None
    return ";".join(dict.fromkeys(fixed))


def fix_arch_list_for_deepspeed(announce: bool) -> None:
    """Rewrite TORCH_CUDA_ARCH_LIST for DeepSpeed's op builds where it cannot parse it (see
    arch_list_for_deepspeed); `announce`: say so on stderr (rank 0)."""
    arch = arch_list_for_deepspeed()
    if arch is None:
        return
    if announce:
        print(f"dft-train: note: TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']!r} read as {arch!r} "
              "for DeepSpeed's op builds, which cannot parse architecture suffixes", file=sys.stderr)
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
