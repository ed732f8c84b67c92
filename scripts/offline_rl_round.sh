#!/bin/bash
# scripts/offline_rl_round.sh: one round of offline RL with DFT (docs/offline_rl.md).
#
#   scripts/offline_rl_round.sh ROUND PREV_MODEL [options]
#   scripts/offline_rl_round.sh 1 runs/base/hf                          # round 1 from a converted model
#   BASE=runs/base/hf scripts/offline_rl_round.sh 2 runs/offline-rl/round-1/hf-dft --max-per-problem 2
#   DRY_RUN=1 scripts/offline_rl_round.sh 1 runs/base/hf                # print the commands only
#
# Round R, all of it under $ROOT/round-R/:
#   1. dft-sample: K samples per problem from PREV_MODEL (round R-1's model), graded  -> samples/
#   2. the selection: the correct samples kept (selection flags passed through)      -> samples/train.jsonl
#   3. dft-train twice on samples/train.jsonl at equal compute (the same steps, global batch, lr,
#      seed and extra settings): DFT (loss.type=dft) -> dft/, RFT (loss.type=sft) -> rft/. Both start
#      from BASE, as the paper does, or from PREV_MODEL with --from-previous.
#   4. dft-convert both                                                              -> hf-dft/, hf-rft/
#   5. dft-eval PREV_MODEL, hf-dft and hf-rft                      -> eval-prev/, eval-dft/, eval-rft/
#      and dft-eval compare of the three                                              -> eval-compare/
# A round directory that exists is never touched: the script exits 2 naming it (remove it, or
# pick another ROOT, to run the round again). Each command is printed before it runs and appended
# to round-R/commands.log. A failing step stops the round with its exit code.
#
# Options:
#   --benchmark NAME[=PATH]   what to sample on, repeatable (default synthetic-train: the embedded
#                             default's training problems)
#   --from-previous           train both from PREV_MODEL instead of BASE
#   --max-per-problem M, --drop-all-correct, --drop-all-wrong, --dedup, --keep-unfinished
#                             dft-sample's selection flags, passed through
#
# Knobs (environment):
#   ROOT            where the rounds go (default runs/offline-rl)
#   BASE            the model both runs train from (default: PREV_MODEL in round 1; required in a
#                   later round unless --from-previous)
#   SAMPLES         samples per problem, K (default 8)
#   TEMPERATURE     sampling temperature (default 1.0)
#   MAX_NEW_TOKENS  tokens per sample and per evaluation answer (default: the commands' own, 2048)
#   PROMPT          boxed, chat or plain, for sampling and evaluation alike (default: theirs, boxed)
#   BACKEND         hf or vllm, for sampling and evaluation (default hf)
#   SEED            the sampling seed and train.seed (default 42)
#   SAMPLE_ARGS     more dft-sample flags, blank-separated, no quoting understood (e.g. "--limit 200")
#   NPROC           training processes (default 2)
#   LAUNCH          the training command before the overrides, split on blanks (default
#                   ".venv/bin/deepspeed --log_level warning --num_gpus $NPROC --module dft_ds.train",
#                   as `make run`)
#   STEPS           train.max_steps of both runs (default 200)
#   GLOBAL_BATCH    train.global_batch_size of both runs (default 16)
#   LR              train.lr of both runs (default 5e-5)
#   EXTRA_TRAIN     more dft-train overrides for both runs, blank-separated (e.g. "data.max_length=1024")
#   EVAL_BENCHMARKS blank-separated NAME[=PATH] to evaluate on (default synthetic)
#   EVAL_SAMPLES    samples per problem in evaluation (default 16: Average@16)
#   EVAL_ARGS       more dft-eval flags, blank-separated
#   PYTHON          the python that runs dft-sample, dft-convert and dft-eval (default .venv/bin/python)
#   DRY_RUN=1       print the commands, run nothing, create nothing
#
# Run it from the checkout's root (the default paths are relative to it; make offline-rl-round does).
# Exit codes: 0 done, 2 bad input (usage, an existing round directory), else the failing step's.

set -eu

log() { printf '[offline_rl_round] %s\n' "$*"; }
fail() { log "error: $*"; exit 2; }
usage() { sed -n '4,6p' "$0" | sed 's/^# *//'; fail "$*"; }

[ $# -ge 2 ] || usage "expected ROUND PREV_MODEL [options]"
round=$1 prev=${2%/}
shift 2
case $round in '' | *[!0-9]* | 0*) fail "ROUND=$round: expected a round number, 1 or more" ;; esac

benchmarks=() select_args=() from_previous=0
while [ $# -gt 0 ]; do
    case $1 in
        --benchmark) [ $# -ge 2 ] || fail "--benchmark needs NAME[=PATH]"; benchmarks+=("$2"); shift ;;
        --benchmark=*) benchmarks+=("${1#--benchmark=}") ;;
        --from-previous) from_previous=1 ;;
        --max-per-problem) [ $# -ge 2 ] || fail "--max-per-problem needs M"; select_args+=("$1" "$2"); shift ;;
        --max-per-problem=*) select_args+=("$1") ;;
        --drop-all-correct | --drop-all-wrong | --dedup | --keep-unfinished) select_args+=("$1") ;;
        *) fail "unknown option $1 (see the header of $0)" ;;
    esac
    shift
done
[ ${#benchmarks[@]} -gt 0 ] || benchmarks=(synthetic-train)

ROOT=${ROOT:-runs/offline-rl}
ROOT=${ROOT%/}
NPROC=${NPROC:-2}
DRY_RUN=${DRY_RUN:-0}
PYTHON=${PYTHON:-.venv/bin/python}
if [ "$from_previous" = 1 ]; then
    init=$prev
elif [ -n "${BASE:-}" ]; then
    init=${BASE%/}
elif [ "$round" = 1 ]; then
    init=$prev  # round 1 samples from the base itself
else
    fail "round $round trains from the base: set BASE (the model round 1 sampled from), or pass --from-previous"
fi

dir=$ROOT/round-$round
# Never overwrite a round: its samples, runs and evaluations belong together.
if [ -e "$dir" ]; then fail "$dir exists: round $round was run (or started) there; remove it or set ROOT"; fi
if [ "$DRY_RUN" != 1 ]; then
    mkdir -p "$ROOT"
    mkdir "$dir"  # fails if a second round-$round started meanwhile
fi

run() {  # run ARGS...: print (and log), then run unless DRY_RUN=1
    local shown
    printf -v shown ' %q' "$@"
    printf '+%s\n' "$shown"
    if [ "$DRY_RUN" = 1 ]; then return 0; fi
    printf '%s\n' "${shown# }" >> "$dir/commands.log"
    "$@"
}

words() {  # words NAME STRING: split STRING on blanks into the array NAME (empty stays empty)
    read -r -a "$1" <<< "$2"
}

# 1-2. Sample from the previous round's model and select.
sample=("$PYTHON" -m dft_ds.sample --model "$prev" --samples "${SAMPLES:-8}" --temperature "${TEMPERATURE:-1.0}"
        --seed "${SEED:-42}" --backend "${BACKEND:-hf}" --out "$dir/samples" --no-progress)
for b in "${benchmarks[@]}"; do sample+=(--benchmark "$b"); done
if [ -n "${MAX_NEW_TOKENS:-}" ]; then sample+=(--max-new-tokens "$MAX_NEW_TOKENS"); fi
if [ -n "${PROMPT:-}" ]; then sample+=(--prompt "$PROMPT"); fi
words extra "${SAMPLE_ARGS:-}"
sample+=(${select_args[@]+"${select_args[@]}"} ${extra[@]+"${extra[@]}"})
run "${sample[@]}"

# 3. DFT and RFT on the same kept samples at equal compute: only loss.type and the run directory differ.
words launch "${LAUNCH:-.venv/bin/deepspeed --log_level warning --num_gpus $NPROC --module dft_ds.train}"
words extra "${EXTRA_TRAIN:-}"
shared=("model.name_or_path=$init" "data.source=$dir/samples/train.jsonl" "train.max_steps=${STEPS:-200}"
        "train.global_batch_size=${GLOBAL_BATCH:-16}" "train.lr=${LR:-5e-5}" "train.seed=${SEED:-42}"
        ${extra[@]+"${extra[@]}"})
run "${launch[@]}" "${shared[@]}" loss.type=dft "train.output_dir=$dir/dft"
run "${launch[@]}" "${shared[@]}" loss.type=sft "train.output_dir=$dir/rft"

# 4. Hugging Face directories of both.
run "$PYTHON" -m dft_ds.convert "$dir/dft" "$dir/hf-dft" --no-progress
run "$PYTHON" -m dft_ds.convert "$dir/rft" "$dir/hf-rft" --no-progress

# 5. Evaluate the previous model and both, with the same settings, and compare.
evaluate=(--samples "${EVAL_SAMPLES:-16}" --temperature "${TEMPERATURE:-1.0}" --backend "${BACKEND:-hf}" --no-progress)
words eval_benchmarks "${EVAL_BENCHMARKS:-synthetic}"
for b in ${eval_benchmarks[@]+"${eval_benchmarks[@]}"}; do evaluate+=(--benchmark "$b"); done
if [ -n "${MAX_NEW_TOKENS:-}" ]; then evaluate+=(--max-new-tokens "$MAX_NEW_TOKENS"); fi
if [ -n "${PROMPT:-}" ]; then evaluate+=(--prompt "$PROMPT"); fi
words extra "${EVAL_ARGS:-}"
evaluate+=(${extra[@]+"${extra[@]}"})
run "$PYTHON" -m dft_ds.eval --model "$prev" --out "$dir/eval-prev" "${evaluate[@]}"
run "$PYTHON" -m dft_ds.eval --model "$dir/hf-dft" --out "$dir/eval-dft" "${evaluate[@]}"
run "$PYTHON" -m dft_ds.eval --model "$dir/hf-rft" --out "$dir/eval-rft" "${evaluate[@]}"
run "$PYTHON" -m dft_ds.eval compare "$dir/eval-prev" "$dir/eval-dft" "$dir/eval-rft" \
    --labels "round-$((round - 1)),dft-$round,rft-$round" --out "$dir/eval-compare"

if [ "$DRY_RUN" = 1 ]; then log "DRY_RUN=1: nothing was run, $dir was not created"; exit 0; fi
log "round $round done: $dir (samples/, dft/, rft/, hf-dft/, hf-rft/, eval-*/; eval-compare/compare.md)"
