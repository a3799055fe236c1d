#!/usr/bin/env bash
# Task adaptation (paper Sec. 4.2): one quadruped agent learns a sequence of tasks, each task starting from the
# previous task's run (finetune_gsa.py --init-from: world model and actor carried over, reward head and critics
# fresh, the earlier tasks' online episodes added to the offline episodes that retrieval and rehearsal draw from).
# The world model is pre-trained on quadruped data only. For comparison, each task is also learned from scratch
# (DreamerV3, --no-pretrain), and optionally by GSA from the pre-trained model without the earlier tasks.
#
# Variants (VARIANTS):
#   adapt    GSA, task i --init-from task i-1 (the sequence)       -> $EXP/adapt/<task>-s<seed>
#   scratch  DreamerV3 from scratch, each task on its own          -> $EXP/scratch/<task>-s<seed>
#   gsa      GSA from the pre-trained model, each task on its own  -> $EXP/gsa/<task>-s<seed>
#   packnet  the paper's baseline: DreamerV3 + PackNet on the actor -> $EXP/packnet/<task>-s<seed>
#            (--no-pretrain --packnet, task i --init-from task i-1: world model and actor carried over, the
#            actor's weights packed task by task, critic fresh; task i of N keeps 1/(N-i+1) of the weights left
#            free, so that every task gets an equal share. The paper does not say which world model its PackNet
#            agent had; this one learns it along the sequence without offline data)
# The variants run side by side (one thread each); within a variant the tasks run in order. Everything lives
# under EXP (default ~/experiments/adaptation), outside the checkout; re-running the script resumes unfinished
# runs and skips finished ones (a run is finished once it has evaluated at FRAMES).
#
# CPU-sized (the default; about 6-8 h on 2 cores, estimated, not measured): 20 offline quadruped episodes, a
# size-xs world model pre-trained for 2000 updates, three tasks of 20k frames each.
#   bash results/adaptation/run.sh
#   TASKS="quadruped-stand quadruped-walk" FRAMES=10000 bash results/adaptation/run.sh
#   VARIANTS="adapt scratch packnet" bash results/adaptation/run.sh     # with the PackNet baseline (+50% time)
# A smoke test of the script itself (minutes): tiny sizes, short episodes:
#   EXP=/tmp/adapt-smoke EPISODES=2 EXPLORER_STEPS=300 COLLECT_ARGS="--explorer-stages 1" SIZE=tiny \
#     PRETRAIN_STEPS=6 K=10 FRAMES=80 FINETUNE_ARGS="--max-episode-steps 20 --no-video" bash results/adaptation/run.sh
#
# The paper's setting on GPUs: all six tasks in the paper's order, 300k env steps per task. The paper pre-trains
# "a small world model" on the Ant (quadruped) domain only and gives no size; size s and 200k updates below are
# this repository's choice, as is 2000 quadruped episodes (a fifth of the paper's 10k DMControl episodes):
#   EPISODES=2000 EXPLORER_STEPS=500000 WORKERS=16 SIZE=s PRETRAIN_STEPS=200000 K=500 FRAMES=300000 \
#     GUIDANCE=paper THREADS= VARIANTS="adapt packnet scratch" TASKS="quadruped-stand quadruped-walk \
#     quadruped-run quadruped-jump quadruped-roll quadruped-roll-fast" bash results/adaptation/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
export MUJOCO_GL=${MUJOCO_GL:-egl}
EXP=${EXP:-$HOME/experiments/adaptation}
TASKS=${TASKS:-quadruped-stand quadruped-walk quadruped-run}  # the paper's order continues: jump, roll, roll-fast
FRAMES=${FRAMES:-20000}           # env frames per task (the paper: 300k)
VARIANTS=${VARIANTS:-adapt scratch}
SEED=${SEED:-0}
EPISODES=${EPISODES:-20}          # offline quadruped episodes
EXPLORER_STEPS=${EXPLORER_STEPS:-20000}
WORKERS=${WORKERS:-2}
SIZE=${SIZE:-xs}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-2000}
K=${K:-100}                       # retrieved episodes (offline + earlier tasks' online ones)
GUIDANCE=${GUIDANCE:-scaled}      # guidance schedule: scaled (over a third of FRAMES) for short runs, paper = 50k
THREADS=${THREADS-1}              # torch threads per run; empty: torch's choice
COLLECT_ARGS=${COLLECT_ARGS:-}    # more collect_offline.py flags
FINETUNE_ARGS=${FINETUNE_ARGS:-}  # more finetune_gsa.py flags for every run
mkdir -p "$EXP/logs"
threads=(); [ -n "$THREADS" ] && threads=(--threads "$THREADS")
stamp() { echo "[adaptation $(date +%H:%M:%S)] $*"; }

finished() {  # finished <run dir>: it has evaluated at FRAMES
  [ -f "$1/metrics.jsonl" ] && $PY -c 'import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
sys.exit(0 if rows and max(r["env_steps"] for r in rows) >= int(sys.argv[2]) else 1)' "$1/metrics.jsonl" "$FRAMES"
}

stamp "1/3 collect quadruped episodes -> $EXP/data"
$PY collect_offline.py --out-dir "$EXP/data" --embodiments quadruped --episodes-per-embodiment "$EPISODES" \
    --explorer-steps "$EXPLORER_STEPS" --num-workers "$WORKERS" --seed "$SEED" $COLLECT_ARGS \
    >> "$EXP/logs/collect.log" 2>&1

stamp "2/3 pre-train a quadruped-only world model ($SIZE, $PRETRAIN_STEPS updates) -> $EXP/pretrain"
resume=(); [ -f "$EXP/pretrain/wm.pt" ] && resume=(--resume)
$PY pretrain_wm.py --data-dir "$EXP/data" --out-dir "$EXP/pretrain" --embodiments quadruped --size "$SIZE" \
    --steps "$PRETRAIN_STEPS" --seed "$SEED" "${threads[@]}" "${resume[@]}" >> "$EXP/logs/pretrain.log" 2>&1
[ -f "$EXP/index/index.faiss" ] || $PY retrieval.py build --checkpoint "$EXP/pretrain/wm.pt" \
    --data-dir "$EXP/data" --out-dir "$EXP/index" "${threads[@]}" >> "$EXP/logs/index.log" 2>&1

sequence() {  # sequence <variant>: the tasks in order
  local variant=$1 previous="" task out flags i=0 n
  n=$(wc -w <<< "$TASKS")
  for task in $TASKS; do
    out="$EXP/$variant/$task-s$SEED"
    flags=()
    case $variant in
      adapt) [ -n "$previous" ] && flags=(--init-from "$previous") ;;
      scratch) flags=(--no-pretrain) ;;
      gsa) ;;
      packnet) flags=(--no-pretrain --packnet --packnet-keep "$(awk -v i=$i -v n=$n 'BEGIN { printf "%.6f", 1 / (n - i) }')")
               [ -n "$previous" ] && flags+=(--init-from "$previous") ;;
      *) echo "unknown variant $variant (adapt, scratch, gsa, packnet)" >&2; return 1 ;;
    esac
    i=$((i + 1))
    if finished "$out"; then
      stamp "$variant $task: finished, skipped"
    else
      [ -f "$out/ckpt.pt" ] && flags+=(--resume)
      stamp "$variant $task ($FRAMES frames) -> $out"
      $PY finetune_gsa.py --task "$task" --checkpoint "$EXP/pretrain/wm.pt" --index-dir "$EXP/index" \
          --data-dir "$EXP/data" --out-dir "$out" --size "$SIZE" --env-steps "$FRAMES" --seed "$SEED" --k "$K" \
          --guidance-schedule "$GUIDANCE" "${threads[@]}" "${flags[@]}" $FINETUNE_ARGS \
          >> "$EXP/logs/$variant-$task.log" 2>&1 || { stamp "$variant $task failed: see $EXP/logs/$variant-$task.log"; return 1; }
    fi
    previous=$out
  done
}

stamp "3/3 the task sequence: $TASKS; variants: $VARIANTS"
pids=()
for variant in $VARIANTS; do
  sequence "$variant" & pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done

# Per task and variant: the last and the best evaluation return, into $EXP/summary.md.
$PY - "$EXP" "$FRAMES" "$SEED" $TASKS <<'EOF' | tee "$EXP/summary.md"
import json, sys
from pathlib import Path
exp, frames, seed, tasks = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
variants = [v for v in ("adapt", "gsa", "packnet", "scratch") if (exp / v).is_dir()]
print(f"| task | " + " | ".join(f"{v} last / best" for v in variants) + " |")
print("| --- |" + " --- |" * len(variants))
for task in tasks:
    cells = []
    for v in variants:
        path = exp / v / f"{task}-s{seed}" / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
        done = [r for r in rows if r["env_steps"] >= frames]
        cells.append(f"{done[-1]['eval_return']:.1f} / {max(r['eval_return'] for r in rows):.1f}" if done else
                     f"unfinished ({max((r['env_steps'] for r in rows), default=0)} frames)")
    print(f"| {task} | " + " | ".join(cells) + " |")
EOF
exit $status
