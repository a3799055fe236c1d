#!/usr/bin/env bash
# Issue 12's GPU check, prepared as one command of about 8 minutes for a lent GPU machine (the `device` tool: one
# H200, a python3 with torch but without this project's environment packages, no network). It measures, into
# $OUT (default results/speed/gpu):
#   1. updates.md/.json   per-update time and peak GPU memory of pre-training and fine-tuning at `s` and `paper`, in
#                         bf16 and fp32 (benchmark.py --device cuda, 5 timed updates after 2);
#   2. compile-<size>.md  --compile off against on, side by side, fine-tuning and pre-training in bf16 (torch.compile
#                         with CUDA graphs for the two sequential loops' steps);
#   3. torchrun.log       pretrain_wm.py under torchrun on synthetic data at `s` (world size 1: one GPU; NCCL between
#                         processes needs two GPUs and stays unmeasured on such a machine).
# What the GPU machine lacks and how it is supplied:
#   - tyro and its two pure-python needs: carried as wheels in .whl/ (fetch them here once: `--fetch-wheels`);
#   - faiss, mujoco, dm_control and metaworld: only imported by finetune_gsa.py, never used by an update. Where they
#     are missing, import-only placeholder packages go on PYTHONPATH (in /tmp/gsa-placeholders), so that
#     benchmark.py can import the stage scripts; nothing here steps an environment or builds an index with them.
# Commands:
#   bash results/speed/gpu_check.sh --fetch-wheels             # here, once: writes .whl/ (ignored by git)
#   device run, carry [".whl"]:  bash results/speed/gpu_check.sh
#   GPU_CHECK_DEVICE=cpu SIZES=tiny PLACEHOLDERS=1 bash results/speed/gpu_check.sh   # rehearse it on a CPU (~2 min)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
OUT=${OUT:-results/speed/gpu}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SIZES=${SIZES:-s paper}
COMPILE_SIZE=${COMPILE_SIZE:-s}
PLACEHOLDERS=${PLACEHOLDERS:-auto}   # 1: always use the placeholder packages (the CPU rehearsal tests them)
export PYTHONUNBUFFERED=1 MUJOCO_GL=${MUJOCO_GL:-egl}
say() { echo "[gpu_check $(date +%T)] $*"; }

if [ "${1:-}" = "--fetch-wheels" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
        tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1
    exit 0
fi
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1 && ! $PY -c 'import tyro' 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
missing=$($PY -c 'import importlib.util as u
print(" ".join(m for m in ("faiss", "mujoco", "dm_control", "metaworld") if u.find_spec(m) is None))')
if [ "$PLACEHOLDERS" = 1 ] || { [ "$PLACEHOLDERS" = auto ] && [ -n "$missing" ]; }; then
    say "import-only placeholders for: ${missing:-faiss mujoco dm_control metaworld (forced)}"
    $PY - <<'EOF'
from pathlib import Path
# Each placeholder module answers any attribute with an empty class whose attributes are empty classes again (so
# that `from x import y`, `y.B` and `class A(y.B)` work at import time); it holds no behaviour.
body = ("class _Placeholder(type):\n"
        "    def __getattr__(cls, name):\n"
        "        if name.startswith('__'):\n            raise AttributeError(name)\n"
        "        return _Placeholder(name, (), {})\n\n\n"
        "def __getattr__(name):\n"
        "    if name.startswith('__'):\n        raise AttributeError(name)\n"
        "    return _Placeholder(name, (), {'__module__': __name__})\n")
root = Path("/tmp/gsa-placeholders")
for module in ("faiss", "mujoco", "dm_control", "dm_control.rl", "dm_control.rl.control", "dm_control.suite",
               "dm_control.suite.cheetah", "dm_control.suite.common", "dm_control.suite.quadruped",
               "dm_control.suite.walker", "dm_control.utils", "dm_control.utils.rewards", "metaworld",
               "metaworld.env_dict"):
    folder = root.joinpath(*module.split("."))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "__init__.py").write_text(body + ("ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE = {}\n"
                                                 if module == "metaworld.env_dict" else ""))
EOF
    export PYTHONPATH=/tmp/gsa-placeholders${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi 2>&1 || echo "no nvidia-smi"; $PY -c 'import torch; print("torch", torch.__version__, "cuda",
  torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'; } \
  | tee "$OUT/machine.txt"

say "1/3 per-update time and peak memory: pretrain + finetune x ($SIZES) x (bf16 fp32) on $DEVICE"
# shellcheck disable=SC2086  # SIZES is a list
timeout 330 $PY benchmark.py --device "$DEVICE" --stages pretrain finetune --sizes $SIZES --precision bf16 fp32 \
    --updates 5 --warmup 2 --out "$OUT/updates.md" 2>&1 | tee "$OUT/updates.log" || say "step 1 stopped (see updates.log)"

say "2/3 --compile off against on at $COMPILE_SIZE, bf16, side by side"
timeout 200 $PY benchmark.py --device "$DEVICE" --stages finetune pretrain --sizes "$COMPILE_SIZE" --precision bf16 \
    --updates 10 --warmup 3 --compare compile=0 compile=1 --out "$OUT/compile-$COMPILE_SIZE.md" 2>&1 \
    | tee "$OUT/compile.log" || say "step 2 stopped (see compile.log)"

say "3/3 torchrun pretrain_wm.py at $COMPILE_SIZE on synthetic data"
rm -rf /tmp/gsa-synthetic /tmp/gsa-torchrun
$PY -c 'import sys; sys.path.insert(0, "tests"); from test_pretrain import make_dataset, P
make_dataset(__import__("pathlib").Path("/tmp/gsa-synthetic"), episodes=16, length=100)' 2>&1 | tail -2
timeout 120 $PY -m torch.distributed.run --standalone --nproc_per_node 1 pretrain_wm.py --data-dir /tmp/gsa-synthetic \
    --out-dir /tmp/gsa-torchrun --embodiments all --size "$COMPILE_SIZE" --steps 60 --log-every 20 \
    --eval-every 1000000 --device "$DEVICE" 2>&1 | tee "$OUT/torchrun.log" || say "step 3 stopped (see torchrun.log)"
say "done: $OUT"
