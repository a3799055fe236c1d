#!/usr/bin/env bash
# Issue 11, "show that it learns": DreamerV3 from scratch (--no-pretrain) on walker-stand at the xs preset,
# 50k env frames, evaluated every 5k frames over 10 episodes. Two train ratios side by side on one seed
# (64 = one update per 8 agent steps, the xs default until session 6; 128 = one per 4, the release's rate and
# the xs default since), then more seeds.
# Each run uses 1 thread, so two runs fill a 2-core machine. Run directories live outside the checkout
# (EXP, default ~/experiments/learner); re-running this script resumes unfinished runs.
#   bash results/learner/run.sh                        # both ratios, seed 0
#   SEEDS="1" RATIOS="64" bash results/learner/run.sh  # more seeds at one ratio
#   ENTROPY=3e-4 RATIOS=64 bash results/learner/run.sh  # another actor entropy scale (run dirs get -ent<scale>)
#   BOOTSTRAP=fast CRITIC_LR=3e-4 SEEDS="0 1" RATIOS=64 bash results/learner/run.sh  # the critic's bootstrap and
#                                                        # learning rate (run dirs get -<bootstrap>-clr<lr>)
#   PRECISION=bf16 SEEDS="0 1" RATIOS=128 bash results/learner/run.sh   # bf16 autocast (run dirs get -bf16)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
EXP=${EXP:-$HOME/experiments/learner}
SEEDS=${SEEDS:-0}
RATIOS=${RATIOS:-64 128}
TASK=${TASK:-walker-stand}
FRAMES=${FRAMES:-50000}
ENTROPY=${ENTROPY:-}  # empty: the default entropy scale (1e-4)
BOOTSTRAP=${BOOTSTRAP:-}  # empty: the default --critic-bootstrap
CRITIC_LR=${CRITIC_LR:-}  # empty: the default --critic-lr
PRECISION=${PRECISION:-}  # empty: the default --precision (auto: bf16 on a CPU with AVX512-BF16 or AMX, else fp32)
mkdir -p "$EXP"
for seed in $SEEDS; do
  for ratio in $RATIOS; do
    name="$TASK-scratch-r$ratio${ENTROPY:+-ent$ENTROPY}${BOOTSTRAP:+-$BOOTSTRAP}${CRITIC_LR:+-clr$CRITIC_LR}${PRECISION:+-$PRECISION}-s$seed"
    out="$EXP/$name"
    resume=""; [ -f "$out/ckpt.pt" ] && resume="--resume"
    $PY finetune_gsa.py --task "$TASK" --no-pretrain --size xs --env-steps "$FRAMES" --seed "$seed" \
        --train-ratio "$ratio" --eval-episodes 10 --threads 1 --out-dir "$out" $resume \
        ${ENTROPY:+--entropy-scale $ENTROPY} ${BOOTSTRAP:+--critic-bootstrap $BOOTSTRAP} \
        ${CRITIC_LR:+--critic-lr $CRITIC_LR} ${PRECISION:+--precision $PRECISION} >> "$EXP/$name.log" 2>&1 &
  done
done
wait
