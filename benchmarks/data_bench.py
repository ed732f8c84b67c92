"""The data path at the scale users train on: time to the first optimizer step and memory per rank,
on a first start (tokenising) and a second start (the tokenised set read from data.cache_dir).

    .venv/bin/python benchmarks/data_bench.py [--rows 50000] [--rows 860000] [--ranks 2]
        [--max-length 2048] [--baseline-repo DIR]

The data is a NuminaMath-CoT-shaped JSON lines file (problem, solution ending in a boxed answer,
messages, source; solutions of about 300-1500 tokens), generated once per row count under
--work (seeded); the tokenizer is dft_ds.families' Qwen2-style one, the model the embedded tiny
Llama with that vocabulary. Each start is `dft-launch --nproc RANKS` with train.max_steps=1.

Reported per start: seconds from launch to the `step 1/1` line, and the memory of the largest
rank: its anonymous (private) resident memory until the plan is printed (imports, tokenizer, data;
no model yet), its peak anonymous memory over the run (the training step's activations included),
and its peak resident set, which also counts the memory-mapped Arrow pages the OS shares between
ranks and keeps in its page cache.
The peer figure is the same file through `datasets.map` (batched, RANKS processes) with TRL's
prompt/completion preparation (the chat template applied to the prompt and to prompt + completion,
both tokenised, a completion mask), in the same invocation: tokenising time and peak memory of its
main process. --baseline-repo runs a first start of another checkout (e.g. a worktree of the
commit before the tokenised sets) for a before/after figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

WORDS = ("we", "have", "the", "sum", "of", "both", "sides", "so", "that", "equation", "gives", "value", "then",
         "therefore", "since", "integer", "roots", "product", "let", "be", "and", "is", "equal", "to", "which",
         "means", "square", "prime", "factor", "divisible", "by", "substituting", "into", "solving", "for", "x",
         "y", "n", "k", "function", "derivative", "at", "point", "area", "triangle", "circle", "radius", "angle")


def numina_rows(count: int, seed: int):
    rng = random.Random(seed)
    sources = ("cn_k12", "olympiads", "synthetic_math", "orca_math", "aops_forum", "amc_aime", "math")
    for i in range(count):
        problem = " ".join(rng.choice(WORDS) for _ in range(rng.randint(25, 90))).capitalize() + "?"
        # About 1.3 tokens a word and a few per number with the Qwen2-style tokenizer: 300-1500 tokens.
        parts = []
        for _ in range(rng.randint(6, 29)):
            a, b = rng.randint(2, 999), rng.randint(2, 99)
            parts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14))) + f" ${a} \\times {b} = {a * b}$.")
        answer = rng.randint(1, 10_000)
        solution = " ".join(parts) + f" The answer is $\\boxed{{{answer}}}$."
        yield {"source": rng.choice(sources), "problem": problem, "solution": solution,
               "messages": [{"role": "user", "content": problem}, {"role": "assistant", "content": solution}]}


def data_file(work: str, rows: int) -> str:
    path = os.path.join(work, f"numina-{rows}.jsonl")
    if not os.path.isfile(path):
        staging = path + ".tmp"
        with open(staging, "w", encoding="utf-8") as fh:
            for row in numina_rows(rows, seed=rows):
                fh.write(json.dumps(row) + "\n")
        os.replace(staging, path)
    return path


def tokenizer_dir(work: str) -> str:
    path = os.path.join(work, "qwen2-tokenizer")
    if not os.path.isdir(path):
        from dft_ds import families

        families.build_tokenizer(families.FAMILIES["qwen2"]).save_pretrained(path)
    return path


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("RssAnon:", "VmRSS:")):
                    key, value = line.split(":")
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def measured(cmd: list[str], env: dict, marker: str, rank_tag: str, cwd: str = REPO) -> dict:
    """Run `cmd`; seconds until a stdout line starts with `marker`, wall seconds, and the peak RssAnon and
    VmRSS of the largest process whose command line holds `rank_tag`, polled every 0.1 s."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: dict[str, float] = {}
    lines: list[str] = []

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(marker) and "first" not in seen:
                seen["first"] = time.perf_counter() - start
            if line.startswith("batch:") and "data" not in seen:
                seen["data"] = time.perf_counter() - start

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak = {"RssAnon": 0, "VmRSS": 0}
    data_peak = 0
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            children = root.children(recursive=True)
        except psutil.Error:
            children = []
        for child in children + [root]:
            if rank_tag in _cmdline(child.pid):
                status = _status(child.pid)
                for key in peak:
                    peak[key] = max(peak[key], status.get(key, 0))
                if "data" not in seen:  # until the plan is printed: imports, tokenizer and data, no model yet
                    data_peak = max(data_peak, status.get("RssAnon", 0))
        time.sleep(0.1)
    reader.join()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{''.join(lines[-30:])}")
    return {"first_step_s": seen.get("first", float("nan")), "wall_s": wall, "anon": peak["RssAnon"],
            "rss": peak["VmRSS"], "data_anon": data_peak, "log": lines}


def train_cmd(python: str, ranks: int, source: str, tok: str, max_length: int, out: str) -> list[str]:
    return [python, "-m", "dft_ds.launch", "--nproc", str(ranks), "--", f"data.source={source}",
            f"model.tokenizer={tok}", f"data.max_length={max_length}", "train.max_steps=1",
            f"train.output_dir={out}", "logging.tensorboard=false", "checkpoint.save_final=false"]


PEER = r"""
import sys, time, datasets
from transformers import AutoTokenizer
path, tok_dir, procs, max_length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(tok_dir)
datasets.disable_progress_bars()
start = time.perf_counter()
ds = datasets.load_dataset("json", data_files=path, split="train")
ds = ds.map(lambda r: {"prompt": [{"role": "user", "content": r["problem"]}],
                       "completion": [{"role": "assistant", "content": r["solution"]}]},
            remove_columns=ds.column_names, num_proc=procs)

def tokenize(batch):
    out = {"input_ids": [], "completion_mask": []}
    for prompt, completion in zip(batch["prompt"], batch["completion"]):
        p = tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
        pc = tok.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
        out["input_ids"].append(pc[:max_length])
        out["completion_mask"].append(([0] * len(p) + [1] * (len(pc) - len(p)))[:max_length])
    return out

ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names, num_proc=procs)
print("PEER-DONE", len(ds), time.perf_counter() - start, flush=True)
"""


def packing_lines(cache: str, max_length: int) -> list[str]:
    """Rows and padding (the share of row slots of max_length tokens that hold no token) of each packing method,
    from the tokenised set the first start wrote, and the time each took."""
    from pathlib import Path

    from dft_ds import tokenised

    (folder,) = [p for p in Path(cache).iterdir() if p.is_dir()]
    tokens = tokenised._read(folder)
    lines = []
    for method in ("greedy", "best_fit"):
        start = time.perf_counter()
        rows = tokenised.build_rows(tokens, None, max_length, True, method)
        seconds = time.perf_counter() - start
        used = int(tokens.lengths[rows.order].sum())
        lines.append(f"packing_method={method}: {len(rows):,} rows, padding {1 - used / (len(rows) * max_length):.1%} "
                     f"of the row slots, packed in {seconds:.2f} s")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, action="append", help="row counts (repeatable; default 50000)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "dft_ds-data-bench"))
    ap.add_argument("--baseline-repo", help="another checkout whose first start runs as the baseline")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--compare-max-rows", type=int, default=100_000,
                    help="run the baseline and the peer only up to this many rows (the baseline holds every row as "
                         "Python lists in every rank: tens of GB at 860k)")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    tok = tokenizer_dir(args.work)
    python = sys.executable
    results = []
    for rows in args.rows or [50000]:
        source = data_file(args.work, rows)
        size_mb = os.path.getsize(source) / 1e6
        cache = os.path.join(args.work, f"cache-{rows}")
        shutil.rmtree(cache, ignore_errors=True)
        env = dict(os.environ, DFT_DS_CACHE=cache, PYTHONPATH=REPO)
        figures = {}
        if args.baseline_repo and rows <= args.compare_max_rows:
            out = os.path.join(args.work, "run-baseline")
            shutil.rmtree(out, ignore_errors=True)
            base_env = dict(env, PYTHONPATH=os.path.abspath(args.baseline_repo),
                            DFT_DS_CACHE=os.path.join(args.work, "cache-baseline"))
            figures["baseline first start"] = measured(train_cmd(python, args.ranks, source, tok, args.max_length, out),
                                                       base_env, "step 1/1", "dft_ds.train",
                                                       cwd=os.path.abspath(args.baseline_repo))
        for name in ("first start", "second start"):
            out = os.path.join(args.work, f"run-{rows}-{name.split()[0]}")
            shutil.rmtree(out, ignore_errors=True)
            figures[name] = measured(train_cmd(python, args.ranks, source, tok, args.max_length, out), env,
                                     "step 1/1", "dft_ds.train")
        if not args.no_peer and rows <= args.compare_max_rows:
            # A fresh datasets cache: a first start (datasets would otherwise find the map's earlier output).
            peer_env = dict(env, HF_DATASETS_CACHE=os.path.join(args.work, f"hf-cache-{rows}"))
            shutil.rmtree(peer_env["HF_DATASETS_CACHE"], ignore_errors=True)
            peer = measured([python, "-c", PEER, source, tok, str(args.ranks), str(args.max_length)], peer_env,
                            "PEER-DONE", "PEER-DONE")
            done = [line for line in peer["log"] if line.startswith("PEER-DONE")]
            peer["first_step_s"] = float(done[-1].split()[2]) if done else float("nan")
            figures["peer: datasets.map, TRL-style preparation (tokenising only)"] = peer
        data_lines = [line.strip() for line in figures["first start"]["log"] if line.startswith("data: ")]
        data_lines += packing_lines(os.path.join(cache, "data"), args.max_length)
        results.append((rows, size_mb, figures, data_lines))
    print(f"\n# data path: {args.ranks} ranks, max_length {args.max_length}, {os.cpu_count()} CPUs\n")
    print("| rows | file | start | to first step (s) | wall (s) | anon / rank before the model (MB) | "
          "peak anon / rank (MB) | peak RSS / rank (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for rows, size_mb, figures, _ in results:
        for name, f in figures.items():
            print(f"| {rows:,} | {size_mb:,.0f} MB | {name} | {f['first_step_s']:.1f} | {f['wall_s']:.1f} | "
                  f"{f['data_anon'] / 1e6:.0f} | {f['anon'] / 1e6:.0f} | {f['rss'] / 1e6:.0f} |")
    for rows, _, figures, data_lines in results:
        first, second = figures["first start"], figures["second start"]
        print(f"\n{rows:,} rows: second start / first start, to the first step: "
              f"{second['first_step_s'] / first['first_step_s']:.2f}x")
        if "baseline first start" in figures:
            base = figures["baseline first start"]
            print(f"{rows:,} rows: first start / baseline: {first['first_step_s'] / base['first_step_s']:.2f}x time, "
                  f"{first['anon'] / max(base['anon'], 1):.2f}x anon memory; second start / baseline: "
                  f"{second['first_step_s'] / base['first_step_s']:.2f}x time")
        print("\n".join(f"  {line}" for line in data_lines))


if __name__ == "__main__":
    main()
