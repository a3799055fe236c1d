#!/usr/bin/env bash
# Issue 11, GSA after the learner fixes: mw-drawer-open at 20k env frames, seed 0, at the xs preset. The data,
# pre-training and retrieval settings are those of results/cpu_scale (walker, cheetah and 10 Meta-World tasks;
# xs pre-training for 3000 steps; k = 20), so the run compares with the failure recorded there.
# One single-threaded lane: collect -> pre-train -> index -> fine-tune. Every step resumes or skips finished
# work, so re-running the script continues after an interruption. Run directories live outside the checkout.
#   bash results/learner/run_gsa.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
EXP=${EXP:-$HOME/experiments/gsa}
SEED=${SEED:-0}
FRAMES=${FRAMES:-20000}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-3000}
TASK=${TASK:-mw-drawer-open}
mkdir -p "$EXP"
if [ ! -f "$EXP/index/index.faiss" ]; then  # the index is built last: once it exists, so do data and model
  echo "[$(date +%T)] collect -> $EXP/data"
  $PY collect_offline.py --out-dir "$EXP/data" --embodiments walker,cheetah,sawyer --episodes-per-embodiment 60 \
      --mw-tasks reach,drawer-open,drawer-close,button-press,door-open,window-open,push,plate-slide,faucet-open,handle-press \
      --mw-episodes-per-task 20 --explorer-steps 20000 --seed 0 --num-workers 1 >> "$EXP/collect.log" 2>&1
  echo "[$(date +%T)] pre-train -> $EXP/pretrain"
  resume=""; [ -f "$EXP/pretrain/wm.pt" ] && resume="--resume"
  $PY pretrain_wm.py --data-dir "$EXP/data" --out-dir "$EXP/pretrain" --embodiments walker,cheetah,sawyer --size xs \
      --steps "$PRETRAIN_STEPS" --seed 0 --threads 1 $resume >> "$EXP/pretrain.log" 2>&1
  echo "[$(date +%T)] index -> $EXP/index"
  $PY retrieval.py build --checkpoint "$EXP/pretrain/wm.pt" --data-dir "$EXP/data" --out-dir "$EXP/index" \
      >> "$EXP/index.log" 2>&1
fi
out="$EXP/finetune/$TASK-gsa-s$SEED"
resume=""; [ -f "$out/ckpt.pt" ] && resume="--resume"
echo "[$(date +%T)] fine-tune -> $out"
$PY finetune_gsa.py --task "$TASK" --checkpoint "$EXP/pretrain/wm.pt" --index-dir "$EXP/index" --data-dir "$EXP/data" \
    --out-dir "$out" --size xs --env-steps "$FRAMES" --eval-every 2000 --eval-episodes 10 --k 20 --seed "$SEED" \
    --threads 1 $resume >> "$EXP/$TASK-gsa-s$SEED.log" 2>&1
echo "[$(date +%T)] done"
