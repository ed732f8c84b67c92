"""dft-convert throughput and peak memory on a ~100M-parameter Llama, against DeepSpeed's converters.

    .venv/bin/python benchmarks/convert_bench.py [--workdir DIR] [--keep]

Builds the checkpoint with the real trainer (one process, ZeRO-3, fp32, one step from a random
Llama: hidden 768, 8 layers, vocab 32000, untied head, as benchmarks/checkpoint_bench.py), then
runs each converter in its own child process and reads, per child: wall time, the time of the
conversion itself (after imports), the peak RSS the kernel records (wait4's ru_maxrss, which also
counts memory-mapped file pages the process touched) and the peak anonymous RSS (RssAnon from
/proc, sampled every 5 ms: memory the process actually allocated). Rows:

    deepspeed non-lazy   get_fp32_state_dict_from_zero_checkpoint() then one safetensors save_file
                         (the whole fp32 state dict in memory: the classic way, and the baseline)
    deepspeed convert    convert_zero_checkpoint_to_fp32_state_dict(safe_serialization=True): what
                         DeepSpeed 0.19 ships; lazy inside, 5GB shards, no config or tokenizer
    dft-convert ...      dft_ds.convert.convert_checkpoint (what the CLI runs), several settings

"imports only" is a child that imports the same modules and exits: the floor under every peak.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 32000
MODEL = dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=12,
             intermediate_size=2048)
MODES = {
    # name: (child mode, extra args)
    "imports only": ("noop", {}),
    "deepspeed non-lazy": ("ds_nonlazy", {}),
    "deepspeed convert": ("ds_convert", {}),
    "dft-convert fp32": ("ours", {"dtype": "fp32"}),
    "dft-convert fp32 100MB shards": ("ours", {"dtype": "fp32", "max_shard_size": "100MB"}),
    "dft-convert bf16": ("ours", {"dtype": "bf16"}),
    "dft-convert bf16 --verify": ("ours", {"dtype": "bf16", "verify_logits": True}),
}
BASELINE = "deepspeed non-lazy"


# --------------------------------------------------------------------------------------------
# Building the checkpoint (real trainer, one process)


def build_checkpoint(workdir: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dft_ds import synthetic

    model_dir, run_dir = os.path.join(workdir, "model"), os.path.join(workdir, "run")
    tok = AutoTokenizer.from_pretrained(synthetic.ensure_assets())
    import torch

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(synthetic.tiny_model_config(VOCAB, **MODEL))
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    del model
    cmd = [sys.executable, "-m", "dft_ds.train", f"model.name_or_path={model_dir}", f"train.output_dir={run_dir}",
           "data.synthetic_size=64", "data.max_length=128", "train.micro_batch_size=1", "train.max_steps=1",
           "checkpoint.every_steps=1", "train.precision=fp32", "logging.progress_bar=false",
           "logging.tensorboard=false"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    start = time.perf_counter()
    with open(os.path.join(workdir, "train.log"), "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"training failed (rc {rc}); see {os.path.join(workdir, 'train.log')}")
    print(f"checkpoint: {params / 1e6:.1f}M parameters, built and saved in {time.perf_counter() - start:.0f} s "
          f"({dir_size(os.path.join(run_dir, 'checkpoints')) / 1e6:.0f} MB on disk)", flush=True)
    return os.path.join(run_dir, "checkpoints")


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


# --------------------------------------------------------------------------------------------
# Children


def child(mode: str, checkpoints: str, out: str, options: dict) -> None:
    """Import, then time only the conversion; print one JSON line."""
    import safetensors.torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (~90 MB; every mode pays the same imports)
    from deepspeed.utils import zero_to_fp32

    from dft_ds import convert

    tag = open(os.path.join(checkpoints, "latest")).read().strip()
    result = {}
    start = time.perf_counter()
    if mode == "ds_nonlazy":
        state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(checkpoints, tag=tag)
        os.makedirs(out)
        # safetensors refuses aliases; this model has none (untied head)
        safetensors.torch.save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    elif mode == "ds_convert":
        zero_to_fp32.convert_zero_checkpoint_to_fp32_state_dict(checkpoints, out, safe_serialization=True, tag=tag)
    elif mode == "ours":
        done = convert.convert_checkpoint(checkpoints, out, progress=False, log=lambda *a: None, **options)
        if done.verify is not None:
            result["verify"] = done.verify.describe()
    result["seconds"] = time.perf_counter() - start
    print("RESULT " + json.dumps(result), flush=True)


def measure(name: str, checkpoints: str, workdir: str) -> dict:
    mode, options = MODES[name]
    out = os.path.join(workdir, "out-" + name.replace(" ", "_").replace("-", ""))
    shutil.rmtree(out, ignore_errors=True)
    log_path = os.path.join(workdir, f"{os.path.basename(out)}.log")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, checkpoints, out, json.dumps(options)]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        anon = AnonPeak(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's
        proc.returncode = os.waitstatus_to_exitcode(status)
        anon.stop()
    wall = time.perf_counter() - start
    text = open(log_path).read()
    if proc.returncode != 0:
        sys.exit(f"{name} failed (rc {proc.returncode}):\n{text[-3000:]}")
    result = json.loads(text.split("RESULT ", 1)[1].splitlines()[0])
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors")) \
        if os.path.isdir(out) else 0
    files = len([f for f in os.listdir(out) if f.endswith(".safetensors")]) if os.path.isdir(out) else 0
    shutil.rmtree(out, ignore_errors=True)
    return {"name": name, "wall": wall, "seconds": result["seconds"], "bytes": size, "files": files,
            "maxrss": usage.ru_maxrss * 1024, "anon": anon.peak, "verify": result.get("verify")}


class AnonPeak:
    """Samples RssAnon of a process from /proc every few milliseconds until stopped."""

    def __init__(self, pid: int, every_s: float = 0.005):
        self.peak, self._pid, self._every, self._done = 0, pid, every_s, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            try:
                with open(f"/proc/{self._pid}/status") as fh:
                    for line in fh:
                        if line.startswith("RssAnon:"):
                            self.peak = max(self.peak, int(line.split()[1]) * 1024)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
            time.sleep(self._every)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


# --------------------------------------------------------------------------------------------
# Report


def summarize(runs: list[dict]) -> dict:
    """Median time over the repeats (the machine is shared); the largest peaks (they barely vary)."""
    by_time = sorted(runs, key=lambda r: r["seconds"])
    row = dict(by_time[len(by_time) // 2])
    row["maxrss"], row["anon"] = max(r["maxrss"] for r in runs), max(r["anon"] for r in runs)
    return row


def report(rows: list[dict], repeats: int) -> None:
    floor = next(r for r in rows if r["name"] == "imports only")
    base = next(r for r in rows if r["name"] == BASELINE)
    mb = 1e6
    print(f"\nimports alone (every child pays them): peak RSS {floor['maxrss'] / mb:.0f} MB, "
          f"peak anon {floor['anon'] / mb:.0f} MB, {floor['wall']:.1f} s. Median of {repeats} runs.\n")
    header = (f"{'converter':<30} {'files':>5} {'out MB':>6} {'conv s':>6} {'MB/s':>5} {'x base':>6} "
              f"{'peak RSS':>8} {'x base':>6} {'anon+':>6} {'x base':>6}")
    print(header)
    print("-" * len(header))
    base_anon = base["anon"] - floor["anon"]
    for r in rows:
        if r is floor:
            continue
        anon = r["anon"] - floor["anon"]
        rate, base_rate = r["bytes"] / r["seconds"], base["bytes"] / base["seconds"]
        print(f"{r['name']:<30} {r['files']:>5} {r['bytes'] / mb:>6.0f} {r['seconds']:>6.2f} {rate / mb:>5.0f} "
              f"{rate / base_rate:>6.2f} {r['maxrss'] / mb:>8.0f} {r['maxrss'] / base['maxrss']:>6.2f} "
              f"{anon / mb:>6.0f} {anon / base_anon:>6.2f}")
    for r in rows:
        if r["verify"]:
            print(f"\n{r['name']}: {r['verify']}")
    print("\nconv s: the conversion alone (after imports); MB/s: output MB / conv s. peak RSS (MB): the kernel's\n"
          "ru_maxrss, which also counts touched pages of the memory-mapped optimizer shards (page cache, not\n"
          "allocations). anon+ (MB): peak anonymous RSS above the imports-only child: what the conversion allocated.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="where the checkpoint goes (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir (and reuse its checkpoint)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each converter (median time reported)")
    parser.add_argument("--child", nargs=4, metavar=("MODE", "CHECKPOINTS", "OUT", "OPTIONS"), help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.child:
        mode, checkpoints, out, options = ns.child
        child(mode, checkpoints, out, json.loads(options))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    workdir = ns.workdir or tempfile.mkdtemp(prefix="convert-bench-")
    os.makedirs(workdir, exist_ok=True)
    try:
        checkpoints = os.path.join(workdir, "run", "checkpoints")
        if not os.path.isfile(os.path.join(checkpoints, "latest")):
            checkpoints = build_checkpoint(workdir)
        runs = {name: [] for name in MODES}
        for round_ in range(ns.repeats):  # rounds interleave the modes, so load from others spreads evenly
            for name in MODES:
                runs[name].append(measure(name, checkpoints, workdir))
            print(f"  round {round_ + 1}/{ns.repeats} done", flush=True)
        report([summarize(runs[name]) for name in MODES], ns.repeats)
    finally:
        if not ns.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
