#!/usr/bin/env bash
# Issue 13's experiment: does GSA beat learning from scratch at 50k env frames on this CPU? One script reruns it
# all: collect -> pre-train -> index -> sweep.py (GSA, scratch, naive fine-tuning; 3 seeds) -> report.py.
#
# Variants, all at the same preset and budget (sweep.py's names):
#   gsa      pre-trained world model + experience rehearsal + execution guidance
#   scratch  DreamerV3 from scratch (--no-pretrain)
#   naive    pre-trained world model, naive fine-tuning (--no-rehearsal --no-guidance)
# Task: mw-drawer-open (primary; the data holds scripted, noisy drawer-open episodes). walker-stand (issue 13's
# second task) needs exploration data with more time up than the default 20k-step explorer gives
# (results/coverage: 500k steps get the torso above 1.0 m in a fifth of the steps); run it as its own experiment,
# with its own EXP and RESULTS so that the two reports stay apart:
#   EXP=~/experiments/evidence-walker RESULTS=results/evidence-walker TASKS=walker-stand EXPLORER_STEPS=500000 \
#     bash results/evidence/run.sh
# (copying ~/experiments/coverage/walker-500k/_explorer/walker-stage*.pt into $EXP/data/_explorer/ first skips
# retraining the walker explorer: same seed, same steps, same snapshots.)
#
# Data (the same as results/learner/run_gsa.sh, so ~/experiments/gsa/data can be copied in to skip collection):
# walker and cheetah exploration episodes (60 each) and 20 scripted noisy episodes of each of 10 Meta-World
# tasks, no rewards. K = 20: one Meta-World task's episodes; retrieval keeps only the task's action dim (4,
# sawyer), so D_r can be exactly the drawer-open episodes; each run's retrieval.json records its make-up.
# Guidance: --guidance-schedule scaled (p from 1 to 0 over the first two thirds of a Meta-World run, a third on
# DMControl; the paper's schedule spans 150k frames).
# Pre-training: PRETRAIN_STEPS updates at xs (the held-out open-loop error against repeating the last frame, per
# embodiment, is in $EXP/pretrain/metrics.jsonl and pretrain.log).
#
# Cost, estimated from the learner runs (not yet measured end to end): a 50k-frame run at xs (train ratio 128) is
# about 2 h on 1 thread in bf16 (walker-stand: 122 min; --precision auto's choice on a CPU with AVX512-BF16 or
# AMX), about 3 h in fp32; 9 runs on 2 cores, 2 at a time: about 9 h in bf16, plus pre-training.
# Everything lives under EXP (default ~/experiments/evidence), outside the checkout. Re-running the script skips
# finished work and resumes the rest (sweep.py: runs evaluated at FRAMES are finished, others get --resume), so
# the same command continues after an interruption.
#   bash results/evidence/run.sh
#   DRY_RUN=1 bash results/evidence/run.sh         # print the commands and each run's state, run nothing
#   RUN_ARGS="--precision fp32" bash results/evidence/run.sh     # a learner setting for all runs
#   PARTIAL=1 bash results/evidence/run.sh          # while (or after) runs are going: report on the runs so far and
#                                                   # copy their small files here, starting nothing; the report
#                                                   # compares every run at the budget all of them have reached
#                                                   # (report.py --common-budget; COMMON_BUDGET=0: each run's latest
#                                                   # evaluation, unequal budgets flagged)
# At the end it copies each run's small files (args.json, metrics/train/episodes .jsonl, retrieval.json) into
# $RESULTS/runs/<run>/ and the report into $RESULTS/report/ (RESULTS: results/evidence), for committing.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export MUJOCO_GL=${MUJOCO_GL:-egl} OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
EXP=${EXP:-$HOME/experiments/evidence}
TASKS=${TASKS:-mw-drawer-open}
VARIANTS=${VARIANTS:-gsa scratch naive}
SEEDS=${SEEDS:-0 1 2}
FRAMES=${FRAMES:-50000}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-6000}
K=${K:-20}
EXPLORER_STEPS=${EXPLORER_STEPS:-20000}  # agent steps of each DMControl exploration agent (collect_offline.py)
RESULTS=${RESULTS:-results/evidence}     # where the small run files and the report are copied, for committing
WORKERS=${WORKERS:-2}
RUN_ARGS=${RUN_ARGS:-}           # more finetune_gsa.py flags for every run (the learner's settings)
DRY_RUN=${DRY_RUN:-0}
PARTIAL=${PARTIAL:-0}
COMMON_BUDGET=${COMMON_BUDGET:-1}
say() { echo "[evidence $(date +%T)] $*"; }
run() { if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi; }

copy_small_files() {  # each run's small files -> results/evidence/runs/<run>/, the report -> results/evidence/report/
    local here=$RESULTS run_dir name f
    for run_dir in "$EXP"/runs/*/; do
        name=$(basename "$run_dir"); mkdir -p "$here/runs/$name"
        for f in args.json metrics.jsonl train.jsonl episodes.jsonl retrieval.json bc.json; do
            [ -f "$run_dir/$f" ] && cp "$run_dir/$f" "$here/runs/$name/"
        done
    done
    rm -rf "$here/report" && cp -r "$EXP/report" "$here/report"
}
if [ "$PARTIAL" = 1 ]; then  # runs with at least one evaluation, at the budget all of them reached
    mapfile -t done_runs < <(for d in "$EXP"/runs/*/; do [ -s "$d/metrics.jsonl" ] && echo "$d"; done)
    [ ${#done_runs[@]} -gt 0 ] || { say "no run has evaluated yet"; exit 1; }
    common=(); [ "$COMMON_BUDGET" = 1 ] && common=(--common-budget)
    run $PY report.py --runs "${done_runs[@]}" --out-dir "$EXP/report" --paper-reference "${common[@]}"
    [ "$DRY_RUN" = 1 ] && exit 0
    copy_small_files
    say "partial report: $EXP/report/report.md (copied to $RESULTS/report)"
    exit 0
fi
mkdir -p "$EXP"
if [ ! -f "$EXP/index/index.faiss" ] || [ ! -f "$EXP/pretrain/.done-$PRETRAIN_STEPS" ]; then
    say "collect -> $EXP/data (skips the episodes already there)"
    run $PY collect_offline.py --out-dir "$EXP/data" --embodiments walker,cheetah,sawyer \
        --episodes-per-embodiment 60 --mw-episodes-per-task 20 --explorer-steps "$EXPLORER_STEPS" --seed 0 --num-workers 2 \
        --mw-tasks reach,drawer-open,drawer-close,button-press,door-open,window-open,push,plate-slide,faucet-open,handle-press
    say "pre-train -> $EXP/pretrain ($PRETRAIN_STEPS updates, 2 threads)"
    resume=""; [ -f "$EXP/pretrain/wm.pt" ] && resume="--resume"
    run $PY pretrain_wm.py --data-dir "$EXP/data" --out-dir "$EXP/pretrain" --embodiments walker,cheetah,sawyer \
        --size xs --steps "$PRETRAIN_STEPS" --seed 0 --threads 2 $resume
    say "index -> $EXP/index"
    run $PY retrieval.py build --checkpoint "$EXP/pretrain/wm.pt" --data-dir "$EXP/data" --out-dir "$EXP/index" --overwrite
    [ "$DRY_RUN" = 1 ] || touch "$EXP/pretrain/.done-$PRETRAIN_STEPS"
fi
say "fine-tune: $TASKS x ($VARIANTS) x seeds $SEEDS, $FRAMES frames, $WORKERS at a time"
dry=""; [ "$DRY_RUN" = 1 ] && dry="--dry-run"
# shellcheck disable=SC2086  # the lists are meant to split
run $PY sweep.py --out-dir "$EXP" --tasks $TASKS --variants $VARIANTS --seeds $SEEDS --size xs \
    --env-steps "$FRAMES" --workers "$WORKERS" --threads 1 --checkpoint "$EXP/pretrain/wm.pt" \
    --index-dir "$EXP/index" --data-dir "$EXP/data" \
    --finetune-args="--eval-every 5000 --eval-episodes 10 --k $K --guidance-schedule scaled $RUN_ARGS" \
    --report-args="--paper-reference" $dry
[ "$DRY_RUN" = 1 ] && exit 0
copy_small_files
say "done: $EXP/report/report.md (copied to $RESULTS/report, small run files to $RESULTS/runs)"
