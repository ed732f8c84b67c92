"""`dft-sample`: sample K answers per problem, grade them, keep the correct ones as a training set;
`dft-sample merge`: combine --shard runs; `dft-sample filter`: select again under another policy.

Exit codes: 0 done; 2 bad input (the message names the flag, file, line or shard).
"""

from __future__ import annotations

import argparse
import sys

from dft_ds.errors import EXIT_BAD_INPUT, UserError

EXAMPLES = """\
examples:
  dft-sample --model runs/base/hf --benchmark synthetic-train --samples 8 --prompt chat --out samples/r1
  dft-sample --model /models/Qwen2.5-Math-1.5B --benchmark train=data/numina_subset.jsonl --samples 4 \\
             --max-new-tokens 2048 --max-per-problem 2 --drop-all-correct --dedup --backend vllm --out samples/r1
  dft-sample --model M --benchmark train=F --samples 8 --shard 0/4 --out samples/r1.shards/shard-0-of-4
  dft-sample merge samples/r1.shards/shard-*-of-4 --out samples/r1
  dft-sample filter samples/r1 --max-per-problem 1 --out samples/r1-one-each
  dft-train data.source=samples/r1/train.jsonl loss.type=dft train.output_dir=runs/r1-dft

outputs in --out: samples.jsonl (every sample, graded), train.jsonl (the kept samples, a dft-train
data file), rejected.jsonl (the incorrect ones), problems.jsonl (per problem), selection.json, summary.md.
"""
DESCRIPTION = ("Offline RL, the sampling step: generate K samples per problem with a model directory (dft-eval's "
               "benchmarks, prompts, backends and per-request seeds), grade each with dft-eval's grader, and write "
               "the correct ones as a dft-train data file, tagged with problem, sample, seed, model and verdict. "
               "Subcommands: 'dft-sample merge SHARD_DIR ... --out DIR', 'dft-sample filter DIR --out DIR'. "
               "docs/offline_rl.md.")


def add_policy_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("selection (which correct samples go to train.jsonl; default: every finished one)")
    g.add_argument("--max-per-problem", type=int, default=None, metavar="M",
                   help="keep at most M correct samples per problem, lowest sample index first")
    g.add_argument("--drop-all-correct", action="store_true", default=None,
                   help="drop problems every sample solved (K of K): nothing left to learn there")
    g.add_argument("--drop-all-wrong", action="store_true", default=None,
                   help="drop problems no sample solved (0 of K) from rejected.jsonl and the counts")
    g.add_argument("--dedup", action="store_true", default=None,
                   help="keep one of identical completions of a problem")
    g.add_argument("--keep-unfinished", action="store_true", default=None,
                   help="also keep correct samples cut at --max-new-tokens (by default they are not kept: "
                        "they would teach the model not to stop)")


def policy_from(ns: argparse.Namespace):
    """The policy the flags name, or None when no selection flag was given."""
    from dft_ds.sample.select import Policy

    given = {k: getattr(ns, k) for k in ("max_per_problem", "drop_all_correct", "drop_all_wrong", "dedup",
                                         "keep_unfinished") if getattr(ns, k) is not None}
    if "max_per_problem" in given and given["max_per_problem"] < 1:
        raise UserError(f"--max-per-problem {given['max_per_problem']}: must be >= 1")
    return Policy(**given) if given else None


def sample_parser() -> argparse.ArgumentParser:
    from dft_ds.eval.cli import eval_parser

    p = eval_parser("dft-sample", DESCRIPTION, EXAMPLES, samples=8)
    add_policy_args(p)
    return p


def merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dft-sample merge",
        description="Combine the --shard i/n output directories of one sampling run into the outputs of the unsharded "
                    "run, selected again (with the shards' policy, or the one the selection flags give). Names a "
                    "missing or duplicated shard.")
    p.add_argument("shards", nargs="+", metavar="SHARD_DIR")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory; must not exist or be empty")
    add_policy_args(p)
    return p


def filter_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dft-sample filter",
        description="Select again from a sampling run's samples.jsonl under another policy, without sampling again.")
    p.add_argument("samples_dir", metavar="SAMPLE_DIR")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory; must not exist or be empty")
    add_policy_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in ("merge", "filter") else "sample"
    try:
        if command == "merge":
            return _merge(merge_parser().parse_args(argv[1:]))
        if command == "filter":
            return _filter(filter_parser().parse_args(argv[1:]))
        return _sample(sample_parser().parse_args(argv))
    except UserError as exc:
        print(f"dft-sample: error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


def _report(selection: dict, out: str) -> None:
    c = selection["counts"]
    print(f"dft-sample: {c['problems']} problems, {c['samples']} samples, {c['correct']} correct; kept "
          f"{c['kept']} ({selection['policy_text']}), rejected {c['rejected']}, cut at max tokens {c['cut']}, "
          f"grader timeouts {c['timeouts']}; wrote {out}/ (train.jsonl, rejected.jsonl, samples.jsonl, "
          "problems.jsonl, selection.json, summary.md)", flush=True)
    if c["kept"] == 0:
        print(f"dft-sample: warning: no sample was kept, so {out}/train.jsonl is empty and dft-train refuses it; "
              "sample more (--samples), from a stronger model, or relax the selection", file=sys.stderr, flush=True)


def _sample(ns: argparse.Namespace) -> int:
    from dft_ds.eval.benchmarks import parse_benchmark_arg, parse_field_args, parse_shard
    from dft_ds.eval.report import check_out_dir
    from dft_ds.sample.outputs import write_outputs
    from dft_ds.sample.run import SampleOptions, sample
    from dft_ds.sample.select import Policy

    policy = policy_from(ns) or Policy()
    check_out_dir(ns.out)
    shard = parse_shard(ns.shard) if ns.shard is not None else None
    opts = SampleOptions(
        model=ns.model, benchmarks=[parse_benchmark_arg(b) for b in ns.benchmark], out=ns.out,
        samples=ns.samples, temperature=ns.temperature, top_p=ns.top_p, max_new_tokens=ns.max_new_tokens,
        batch_size=ns.batch_size, seed=ns.seed, prompt=ns.prompt, backend=ns.backend, dtype=ns.dtype,
        shard=shard, fields=parse_field_args(ns.field), limit=ns.limit, grade_timeout_s=ns.grade_timeout,
        progress=ns.progress, gpu_memory_utilization=ns.gpu_memory_utilization, base=ns.base)
    settings, records, runtime = sample(opts)
    _report(write_outputs(ns.out, settings, records, policy, shard, runtime), ns.out)
    return 0


def _merge(ns: argparse.Namespace) -> int:
    from dft_ds.sample.outputs import merge_runs

    _report(merge_runs(ns.shards, ns.out, policy_from(ns)), ns.out)
    return 0


def _filter(ns: argparse.Namespace) -> int:
    from dft_ds.sample.outputs import filter_run
    from dft_ds.sample.select import Policy

    _report(filter_run(ns.samples_dir, ns.out, policy_from(ns) or Policy()), ns.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
