#!/usr/bin/env bash
# The main job at a small built-in default: the whole GSA pipeline on one 2-core CPU machine, end to end, ending
# with one picture of what GSA does ($OUT/report/summary.png).
#   1. collect a small non-curated dataset: walker and cheetah exploration data, scripted noisy Meta-World episodes
#      of reach, drawer-open and button-press (EPISODES each), no rewards
#   2. pre-train one world model on all of it (size xs)
#   3. index the first frames of every offline episode (Faiss), and show what the task retrieves
#   4. fine-tune mw-drawer-open as GSA and, with the same budget, as DreamerV3 from scratch (--no-pretrain), side
#      by side, one thread each
#   5. report.py: eval curves, tables and summary.png (retrieved episodes, every training episode with the prior's
#      warm-up and guidance windows, eval return and success against random actions and the paper, the
#      pre-trained model's open-loop prediction, and a caption with the numbers)
# Why mw-drawer-open: the data holds the skill (scripted drawer-open episodes), so retrieval and the prior have
# something to give. In results/learner the prior cloned from the 20 retrieved drawer-open episodes drove its
# warm-up episodes to 613 on average and reached the drawer in 36% of them. (The walker data holds no standing
# or walking, see results/coverage, so walker tasks cannot show GSA's effect yet.)
# K = EPISODES: one DMControl embodiment's episodes, and one Meta-World task's, so that D_r can be exactly the
# drawer-open episodes (retrieval keeps only the task's action dim, 4: sawyer).
# Guidance: --guidance-schedule scaled, p from 1 to 0 over the first two thirds of the run on Meta-World (the
# paper's schedule spans 150k frames; at 20k frames it would stay near 1 throughout). At xs the first 5000 frames
# (25 episodes) are the warm-up, driven whole by the prior.
#
# Time at the default on a 2-core CPU with nothing else running, measured from a fresh clone (commit afe6a48): 43.8
# min plus 67 s of setup.sh (collect 1.9, pre-train 9.0, index 0.1, fine-tune 32.7 (GSA; scratch 26.4), report 0.1;
# results/demo/20k).
# Measured at FINETUNE_FRAMES=10000 from a fresh clone (2026-11-30, commit b653848, 2-core AMD EPYC with
# AVX512-BF16, so fine-tuning in bf16): 30.1 min, plus 70 s of setup.sh:
#   collect    2.2 min  reward-free explorers for walker and cheetah (20k steps each, one per worker), then 20k
#                       DMControl + 6k Meta-World agent steps with 2 workers
#   pre-train  9.3 min  2000 updates (2 threads), plus open-loop evaluations
#   index      0.1 min  encode 100 first frames, build, query
#   fine-tune 18.4 min  both variants at once, 1 thread each (GSA 18.4, scratch 12.2): 50 Meta-World episodes of
#                       100 agent steps; updates start after 10 episodes (within the 25-episode warm-up), then one
#                       per 8 agent steps: 500 updates, plus env steps, 5 evaluations of 10 episodes and GSA's BC
#                       prior. At 20k frames each run does 1125 updates: GSA ~33 min.
#   report     0.1 min
# At 10k frames neither RL policy had learned the task (eval 156 GSA, 254 scratch, random actions 261; the prior's
# warm-up episodes 1092); results/learner's GSA run first reached the drawer at 12k-16k frames, hence 20k.
# Outputs under $OUT (default runs/demo): report/summary.png, report/curves-<task>.png, report/report.md,
# finetune/<variant>/videos/eval-*.mp4, logs/finetune-<variant>.log, index/query-<task>.png, ...
# Every knob is an environment variable, e.g. `FINETUNE_FRAMES=10000 bash demo.sh`; `DRY_RUN=1 bash demo.sh`
# prints the commands without running anything.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
export MUJOCO_GL=${MUJOCO_GL:-egl}
OUT=${OUT:-runs/demo}
TASK=${TASK:-mw-drawer-open}
EMBODIMENTS=${EMBODIMENTS:-walker,cheetah,sawyer}
MW_TASKS=${MW_TASKS:-reach,drawer-open,button-press}  # must include the task's own for GSA to have the skill
EPISODES=${EPISODES:-20}                     # per DMControl embodiment and per Meta-World task
EXPLORER_STEPS=${EXPLORER_STEPS:-20000}
WORKERS=${WORKERS:-2}                        # collection processes
SIZE=${SIZE:-xs}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-2000}
FINETUNE_FRAMES=${FINETUNE_FRAMES:-20000}
EVAL_EVERY=${EVAL_EVERY:-2000}               # env frames between evaluations (10 episodes each at xs)
TRAIN_RATIO=${TRAIN_RATIO:-64}               # one update per 8 agent steps: half the xs preset's 128, to stay in an hour
GUIDANCE_SCHEDULE=${GUIDANCE_SCHEDULE:-scaled}
SEED=${SEED:-0}
K=${K:-$EPISODES}                            # retrieved episodes: one embodiment's (one Meta-World task's) worth
VARIANTS=${VARIANTS:-"gsa no-pretrain"}      # run side by side, one thread each: gsa, no-pretrain, pretrain-only
DRY_RUN=${DRY_RUN:-0}
start=$(date +%s)
stamp() { echo "[demo $(( $(date +%s) - start ))s] $*"; }
# run CMD...: run it, or with DRY_RUN=1 print it (shell-quoted, one line) instead.
run() { if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi; }

stamp "1/5 collect -> $OUT/data"
run $PY collect_offline.py --out-dir "$OUT/data" --embodiments "$EMBODIMENTS" --mw-tasks "$MW_TASKS" \
    --episodes-per-embodiment "$EPISODES" --explorer-steps "$EXPLORER_STEPS" --num-workers "$WORKERS" \
    --seed "$SEED"

stamp "2/5 pre-train the world model -> $OUT/pretrain"
resume=(); [ -f "$OUT/pretrain/wm.pt" ] && resume=(--resume)
run $PY pretrain_wm.py --data-dir "$OUT/data" --out-dir "$OUT/pretrain" --embodiments "$EMBODIMENTS" \
    --size "$SIZE" --steps "$PRETRAIN_STEPS" --seed "$SEED" "${resume[@]}"

stamp "3/5 build the retrieval index -> $OUT/index"
[ -f "$OUT/index/index.faiss" ] || run $PY retrieval.py build --checkpoint "$OUT/pretrain/wm.pt" \
    --data-dir "$OUT/data" --out-dir "$OUT/index"
run $PY retrieval.py query --index-dir "$OUT/index" --task "$TASK" --k "$K" --checkpoint "$OUT/pretrain/wm.pt"

stamp "4/5 fine-tune $TASK ($VARIANTS) side by side, 1 thread each -> $OUT/finetune/<variant>, logs in $OUT/logs"
[ "$DRY_RUN" = 1 ] || mkdir -p "$OUT/logs"
pids=(); names=()
for variant in $VARIANTS; do
  case "$variant" in
    gsa) flags=(--guidance-schedule "$GUIDANCE_SCHEDULE") ;;
    no-pretrain) flags=(--no-pretrain) ;;
    pretrain-only) flags=(--no-rehearsal --no-guidance) ;;
    *) echo "demo.sh: unknown variant '$variant' in VARIANTS (gsa, no-pretrain, pretrain-only)" >&2; exit 2 ;;
  esac
  resume=(); [ -f "$OUT/finetune/$variant/ckpt.pt" ] && resume=(--resume)
  cmd=($PY finetune_gsa.py --task "$TASK" --checkpoint "$OUT/pretrain/wm.pt" --index-dir "$OUT/index"
       --data-dir "$OUT/data" --out-dir "$OUT/finetune/$variant" --size "$SIZE" --env-steps "$FINETUNE_FRAMES"
       --eval-every "$EVAL_EVERY" --train-ratio "$TRAIN_RATIO" --k "$K" --seed "$SEED" --threads 1 "${flags[@]}"
       "${resume[@]}")
  if [ "$DRY_RUN" = 1 ]; then
    run "${cmd[@]}"
  else
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "${cmd[@]}" > "$OUT/logs/finetune-$variant.log" 2>&1 &
    pids+=($!); names+=("$variant")
    stamp "  $variant started (pid $!): tail -f $OUT/logs/finetune-$variant.log"
  fi
done
failed=0
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then
    stamp "  ${names[$i]} done: $(grep '\[eval\]' "$OUT/logs/finetune-${names[$i]}.log" | tail -1)"
  else
    echo "demo.sh: fine-tuning ${names[$i]} failed; see $OUT/logs/finetune-${names[$i]}.log" >&2; failed=1
  fi
done
[ "$failed" = 0 ] || exit 1

stamp "5/5 report -> $OUT/report"
runs=(); for variant in $VARIANTS; do runs+=("$OUT/finetune/$variant"); done
summary=()  # the summary page compares GSA with learning from scratch: it needs both
[[ " $VARIANTS " == *" gsa "* && " $VARIANTS " == *" no-pretrain "* ]] && summary=(--summary)
run $PY report.py --runs "${runs[@]}" --out "$OUT/report" --paper-reference "${summary[@]}"
stamp "done. The picture: $OUT/report/summary.png (also report.md, curves-$TASK.png, $OUT/finetune/*/videos/)"
