"""Checkpoint save and load time and size, for the tiny default and a ~100M-parameter Llama.

Figures: see docs/checkpoints.md. Run on 2 ranks (ZeRO-3 on gloo here, NCCL on GPUs):
    .venv/bin/python -m torch.distributed.run --nproc-per-node 2 benchmarks/checkpoint_bench.py

For each model: dft_ds's sharded save (model + optimizer + scheduler + RNG + metadata, atomic
`latest`) and its load, against a baseline in the same process: rank 0 writing a plain
torch.save of a state dict holding the same number of fp32 parameters (model weights only).
Then checkpoint.verify's cost: hashing MB/s against save MB/s, and resume time with each setting.
"""

import os
import shutil
import tempfile
import time

import torch

from dft_ds import synthetic
from dft_ds.checkpoint import Checkpointer, tag_for
from dft_ds.config import load_config
from dft_ds.procgroup import exit_rank, shutdown_distributed
from dft_ds.rundir import checkpoints_dir
from dft_ds.runplan import build_plan
from dft_ds.train import build_session, world_size_from_env

MODELS = {
    "tiny (3.4M)": {},
    "llama-100M": dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=12,
                       intermediate_size=2048, vocab_size=32000),
}


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def make_model_dir(root: str, overrides: dict) -> str:
    """A Hugging Face directory (random weights) so the run loads it like a user's model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.join(root, "model")
    tok = AutoTokenizer.from_pretrained(synthetic.ensure_assets())
    torch.manual_seed(0)
    overrides = dict(overrides)
    vocab = overrides.pop("vocab_size", len(tok))  # a larger embedding than the tokenizer is allowed
    model = AutoModelForCausalLM.from_config(synthetic.tiny_model_config(vocab, **overrides))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def bench(name: str, overrides: dict, root: str) -> None:
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    model_arg = "synthetic"
    if overrides:
        if rank == 0:
            make_model_dir(root, overrides)
        dist.barrier()
        model_arg = os.path.join(root, "model")
    out = os.path.join(root, "run")
    cfg = load_config(None, [f"model.name_or_path={model_arg}", f"train.output_dir={out}", "data.synthetic_size=200",
                             "data.max_length=128", "train.micro_batch_size=1", "logging.progress_bar=false"])
    plan = build_plan(cfg, world_size_from_env())
    _, engine, _, sampler = build_session(plan)
    params = sum(p.ds_numel for p in engine.module.parameters())
    # One real step first, so the optimizer's moments exist and are part of what is saved.
    from dft_ds.metrics import NullMetrics
    from dft_ds.trainer import Trainer

    trainer = Trainer(plan, engine, sampler, NullMetrics())
    trainer.total_steps = 1
    trainer.train()
    saver = Checkpointer(checkpoints_dir(out), engine, sampler, plan.checkpoint_record(), plan.tokenizer, keep=2)
    engine.barrier()
    t0 = time.perf_counter()
    tag_dir = saver.save(1)
    save_s = time.perf_counter() - t0
    size = dir_size(tag_dir)
    t0 = time.perf_counter()
    engine.load_checkpoint(checkpoints_dir(out), tag_for(1))
    engine.barrier()
    load_s = time.perf_counter() - t0
    VERIFY_ROWS.append(verify_figures(name, engine, out, tag_dir, size, save_s))
    if rank == 0:
        plain = {f"w{i}": torch.randn(n) for i, n in enumerate(_chunks(params))}
        path = os.path.join(root, "plain.pt")
        t0 = time.perf_counter()
        torch.save(plain, path)
        base_s = time.perf_counter() - t0
        base_size = os.path.getsize(path)
        t0 = time.perf_counter()
        torch.load(path, weights_only=True)
        base_load = time.perf_counter() - t0
        print(f"| {name} | {params / 1e6:.1f}M | {size / 2**20:.1f} MiB | {save_s:.2f} s | {load_s:.2f} s | "
              f"{base_size / 2**20:.1f} MiB | {base_s:.2f} s | {base_load:.2f} s | "
              f"{size / base_size:.2f}x | {save_s / base_s:.2f}x |", flush=True)
    engine.barrier()


VERIFY_ROWS: list[str] = []


def verify_figures(name: str, engine, out: str, tag_dir: str, size: int, save_s: float) -> str:
    """checkpoint.verify: xxh3 hashing speed against the save's, and a resume's check + load with each
    setting (every rank checks, as in a real resume). Alternated, 3 rounds, medians; warm page cache."""
    import statistics

    from dft_ds.checkpoint import file_hash, file_manifest, find_resume

    t0 = time.perf_counter()
    for rel in file_manifest(tag_dir):
        file_hash(os.path.join(tag_dir, rel))
    hash_s = time.perf_counter() - t0
    times = {v: [] for v in ("off", "size", "hash")}
    for _ in range(3):
        for verify in times:
            engine.barrier()
            t0 = time.perf_counter()
            point = find_resume("auto", checkpoints_dir(out), lambda _m: None, verify)
            engine.load_checkpoint(checkpoints_dir(out), point.tag)
            engine.barrier()
            times[verify].append(time.perf_counter() - t0)
    med = {v: statistics.median(t) for v, t in times.items()}
    mib = size / 2**20
    return (f"| {name} | {mib:.1f} MiB | {mib / save_s:.0f} MiB/s | {mib / hash_s:.0f} MiB/s | "
            f"{med['off']:.2f} s | {med['size']:.2f} s | {med['hash']:.2f} s | {med['hash'] / med['off']:.2f}x |")


def _chunks(n: int, size: int = 1 << 22):
    while n > 0:
        yield min(n, size)
        n -= size


def main() -> None:
    world = os.environ.get("WORLD_SIZE", "1")
    if os.environ.get("RANK", "0") == "0":
        print(f"checkpoint save/load, {world} ranks, fp32, ZeRO-3 ({'GPU' if torch.cuda.is_available() else 'CPU'})")
        print("| model | params | dft_ds size | save | load | plain torch.save size | save | load | size ratio | save ratio |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    import torch.distributed as dist

    for name, overrides in MODELS.items():
        root = os.path.join(tempfile.gettempdir(), f"dft-ckpt-bench-{name.split()[0]}")
        if os.environ.get("RANK", "0") == "0":
            shutil.rmtree(root, ignore_errors=True)
            os.makedirs(root)
        if dist.is_initialized():
            dist.barrier()
        bench(name, overrides, root)
        if dist.is_initialized():
            dist.barrier()
        if os.environ.get("RANK", "0") == "0":
            shutil.rmtree(root, ignore_errors=True)
    if os.environ.get("RANK", "0") == "0":
        print("\ncheckpoint.verify: save (with each rank hashing its shards) against hashing the whole checkpoint on "
              "one core, and a resume (check + load on every rank) with verify=off, size and hash")
        print("| model | checkpoint | save | xxh3 hash | resume, off | size | hash | hash/off |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(VERIFY_ROWS), flush=True)


if __name__ == "__main__":
    try:
        main()
    finally:
        shutdown_distributed()
    exit_rank(0)  # not a plain return: see procgroup.exit_rank
