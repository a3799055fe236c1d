#!/usr/bin/env bash
# The CPU-scale experiment of README "Results" (issue 6): GSA against DreamerV3 from scratch (--no-pretrain)
# and against pre-training alone (--no-rehearsal --no-guidance), same env-frame budget for all, on
# walker-walk and mw-drawer-open. Everything runs at size xs on one 2-core machine, as two lanes of
# single-threaded processes (OMP_NUM_THREADS=1, --threads 1), so no process fights another for a core.
#
#   lane A: collect -> pre-train -> index -> the GSA runs
#   lane B: the --no-pretrain runs (they need no data) -> the pretrain-only runs (wait for the index)
#
# Retrieval: k = 20 (the paper's 500 is more than this dataset's episodes of any one action dim, which would
# make D_r "every episode of the same action dim"; 20 is the number of episodes per Meta-World task here).
#
# --pay-back-warmup: the experiment ran before fine-tuning's train-ratio count moved to DreamerV3's (counted from
# the end of the warm-up); this flag kept the count it ran with (the warm-up's updates in one burst).
#
# This experiment belongs to the code of commit 1cfb2eb: the learner fixes of issue 11 (results/learner)
# changed the actor's distribution, the critic's target, the update timing and the BC prior, and removed
# --pay-back-warmup. To rerun it: git worktree add ../gsa-1cfb2eb 1cfb2eb && bash ../gsa-1cfb2eb/results/cpu_scale/run.sh
#
# Every step resumes: a re-run skips finished work and continues killed runs.
# Knobs: SEEDS, TASKS, FRAMES, K, OUT, DATA, LANES ("a b", or one lane to run it alone).
# After it ends: python report.py --runs $OUT/finetune/*/ --out results/cpu_scale --paper-reference
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
export MUJOCO_GL=${MUJOCO_GL:-egl} OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
OUT=${OUT:-runs/cpu_scale}
DATA=${DATA:-data/cpu_scale}
SEEDS=${SEEDS:-0}
FRAMES=${FRAMES:-12000}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-3000}
K=${K:-20}
LANES=${LANES:-"a b"}
TASKS=${TASKS:-"walker-walk mw-drawer-open"}
if ! grep -q "pay_back_warmup" finetune_gsa.py; then
  echo "results/cpu_scale/run.sh reruns the experiment of commit 1cfb2eb; this checkout's learner differs." >&2
  echo "Run it from that commit: git worktree add ../gsa-1cfb2eb 1cfb2eb && bash ../gsa-1cfb2eb/results/cpu_scale/run.sh" >&2
  exit 2
fi
mkdir -p "$OUT/logs"

finetune() {  # finetune <task> <variant> <seed>
  local task=$1 variant=$2 seed=$3 flags=()
  case $variant in
    gsa) flags=(--k "$K") ;;
    pretrain-only) flags=(--no-rehearsal --no-guidance) ;;
    no-pretrain) flags=(--no-pretrain) ;;
  esac
  local dir="$OUT/finetune/$task-$variant-s$seed"
  local resume=(); [ -f "$dir/ckpt.pt" ] && resume=(--resume)
  echo "[$(date +%T)] finetune $task $variant seed $seed -> $dir"
  $PY finetune_gsa.py --task "$task" --checkpoint "$OUT/pretrain/wm.pt" --index-dir "$OUT/index" \
      --data-dir "$DATA" --out-dir "$dir" --size xs --env-steps "$FRAMES" --eval-every 2000 --eval-episodes 5 \
      --seed "$seed" --threads 1 --pay-back-warmup "${flags[@]}" "${resume[@]}" >> "$OUT/logs/$task-$variant-s$seed.log" 2>&1
}

lane_a() {
  if [ ! -f "$OUT/index/index.faiss" ]; then  # the index is built last: once it exists, so do data and model
    prepare
  fi
  for seed in $SEEDS; do
    for task in $TASKS; do finetune "$task" gsa "$seed"; done
  done
}

prepare() {
  echo "[$(date +%T)] collect -> $DATA"
  $PY collect_offline.py --out-dir "$DATA" --embodiments walker,cheetah,sawyer --episodes-per-embodiment 60 \
      --mw-tasks reach,drawer-open,drawer-close,button-press,door-open,window-open,push,plate-slide,faucet-open,handle-press \
      --mw-episodes-per-task 20 --explorer-steps 20000 --seed 0 >> "$OUT/logs/collect.log" 2>&1
  echo "[$(date +%T)] pre-train -> $OUT/pretrain"
  local resume=(); [ -f "$OUT/pretrain/wm.pt" ] && resume=(--resume)
  $PY pretrain_wm.py --data-dir "$DATA" --out-dir "$OUT/pretrain" --embodiments walker,cheetah,sawyer --size xs \
      --steps "$PRETRAIN_STEPS" --seed 0 --threads 1 "${resume[@]}" >> "$OUT/logs/pretrain.log" 2>&1
  echo "[$(date +%T)] index -> $OUT/index"
  [ -f "$OUT/index/index.faiss" ] || $PY retrieval.py build --checkpoint "$OUT/pretrain/wm.pt" --data-dir "$DATA" \
      --out-dir "$OUT/index" >> "$OUT/logs/index.log" 2>&1
}

lane_b() {
  for seed in $SEEDS; do
    for task in $TASKS; do finetune "$task" no-pretrain "$seed"; done
    while [ ! -f "$OUT/index/index.faiss" ]; do
      [ -f "$OUT/logs/lane_a.failed" ] && { echo "lane A failed; see $OUT/logs"; return 1; }
      sleep 30
    done
    for task in $TASKS; do finetune "$task" pretrain-only "$seed"; done
  done
}

rm -f "$OUT/logs/lane_a.failed"
status=0
if [[ " $LANES " == *" a "* ]]; then
  lane_a >> "$OUT/logs/lane_a.log" 2>&1 &
  a=$!
fi
if [[ " $LANES " == *" b "* ]]; then
  lane_b >> "$OUT/logs/lane_b.log" 2>&1 &
  b=$!
fi
if [ -n "${a:-}" ]; then wait "$a" || { status=$?; touch "$OUT/logs/lane_a.failed"; }; fi
if [ -n "${b:-}" ]; then wait "$b" || status=$?; fi
echo "[$(date +%T)] lanes done (exit $status); logs in $OUT/logs"
exit $status
