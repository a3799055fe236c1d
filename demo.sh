#!/usr/bin/env bash
# The main job at a small built-in default: the whole GSA pipeline on one CPU machine, end to end.
#   1. collect a small non-curated dataset (walker + cheetah exploration data, a few Meta-World tasks)
#   2. pre-train one world model on all of it (size xs)
#   3. index the first frames of every offline episode (Faiss)
#   4. fine-tune GSA on walker-walk (rehearsal + execution guidance) and, with the same budget, DreamerV3
#      from scratch (--no-pretrain)
#   5. draw the learning curves (report.py) and keep the eval videos
# Outputs under $OUT (default runs/demo): report/curves-walker-walk.png, finetune/*/videos/eval-*.mp4, ...
# Every knob is an environment variable, e.g. `PRETRAIN_STEPS=500 FINETUNE_FRAMES=10000 bash demo.sh`.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
export MUJOCO_GL=${MUJOCO_GL:-egl}
OUT=${OUT:-runs/demo}
TASK=${TASK:-walker-walk}
EMBODIMENTS=${EMBODIMENTS:-walker,cheetah,sawyer}
MW_TASKS=${MW_TASKS:-reach,drawer-open,button-press}
EPISODES=${EPISODES:-20}
EXPLORER_STEPS=${EXPLORER_STEPS:-20000}
SIZE=${SIZE:-xs}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-2000}
FINETUNE_FRAMES=${FINETUNE_FRAMES:-10000}
SEED=${SEED:-0}
K=${K:-$EPISODES}  # retrieved episodes: at most one embodiment's worth, so D_r does not mix walker and cheetah
VARIANTS=${VARIANTS:-"gsa no-pretrain"}
start=$(date +%s)
stamp() { echo "[demo $(( $(date +%s) - start ))s] $*"; }

stamp "1/5 collect -> $OUT/data"
$PY collect_offline.py --out-dir "$OUT/data" --embodiments "$EMBODIMENTS" --mw-tasks "$MW_TASKS" \
    --episodes-per-embodiment "$EPISODES" --explorer-steps "$EXPLORER_STEPS" --seed "$SEED"

stamp "2/5 pre-train the world model -> $OUT/pretrain"
resume=(); [ -f "$OUT/pretrain/wm.pt" ] && resume=(--resume)
$PY pretrain_wm.py --data-dir "$OUT/data" --out-dir "$OUT/pretrain" --embodiments "$EMBODIMENTS" \
    --size "$SIZE" --steps "$PRETRAIN_STEPS" --seed "$SEED" "${resume[@]}"

stamp "3/5 build the retrieval index -> $OUT/index"
[ -f "$OUT/index/index.faiss" ] || $PY retrieval.py build --checkpoint "$OUT/pretrain/wm.pt" \
    --data-dir "$OUT/data" --out-dir "$OUT/index"
$PY retrieval.py query --index-dir "$OUT/index" --task "$TASK" --k "$K" --checkpoint "$OUT/pretrain/wm.pt"

for variant in $VARIANTS; do
  stamp "4/5 fine-tune $TASK ($variant) -> $OUT/finetune/$variant"
  flags=(); [ "$variant" = no-pretrain ] && flags=(--no-pretrain)
  resume=(); [ -f "$OUT/finetune/$variant/ckpt.pt" ] && resume=(--resume)
  $PY finetune_gsa.py --task "$TASK" --checkpoint "$OUT/pretrain/wm.pt" --index-dir "$OUT/index" \
      --data-dir "$OUT/data" --out-dir "$OUT/finetune/$variant" --size "$SIZE" \
      --env-steps "$FINETUNE_FRAMES" --k "$K" --seed "$SEED" "${flags[@]}" "${resume[@]}"
done

stamp "5/5 report -> $OUT/report"
$PY report.py --runs "$OUT"/finetune/*/ --out "$OUT/report"
stamp "done. Open $OUT/report/*.png and $OUT/finetune/*/videos/"
