#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine: system libraries for headless MuJoCo rendering (EGL via Mesa,
# software; OSMesa as a fallback) and a virtual environment .venv with the pinned Python packages.
# Safe to run again: it skips what is already there.
#   bash setup.sh                      # as pinned in requirements.txt (CI runs this)
#   bash setup.sh --gpu                # first the CUDA build of requirements.txt's torch version, from
#                                      # PyTorch's CUDA wheel index (cu130, the CUDA of torch's own Linux wheels)
#   bash setup.sh --gpu --cuda cu128   # another CUDA version of that index (for an older driver)
#   bash setup.sh --dry-run [--gpu]    # print the commands instead of running them
set -euo pipefail
cd "$(dirname "$0")"
die() { echo "setup.sh: error: $*" >&2; exit 2; }
GPU=0 CUDA="" DRY=0
while [ $# -gt 0 ]; do
  case $1 in
    --gpu) GPU=1 ;;
    --cuda) [ $# -ge 2 ] || die "--cuda needs a value, e.g. --cuda cu128"; CUDA=$2; shift ;;
    --cuda=*) CUDA=${1#--cuda=} ;;
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,9p' "$0" | cut -c3-; exit 0 ;;
    *) die "unknown argument '$1' (bash setup.sh --help)" ;;
  esac
  shift
done
if [ -n "$CUDA" ] && [ $GPU = 0 ]; then die "--cuda goes with --gpu"; fi
CUDA=${CUDA:-cu130}
[[ $CUDA =~ ^cu[0-9]{3}$ ]] || die "--cuda must name one of PyTorch's CUDA wheel indexes, e.g. cu128 or cu130; got '$CUDA'"
TORCH=$(sed -n 's/^torch==\([0-9][0-9.]*\).*/\1/p' requirements.txt)
[ -n "$TORCH" ] || die "requirements.txt pins no torch==<version>"
TORCH_INDEX="https://download.pytorch.org/whl/$CUDA"

exec 3>&1  # --dry-run prints here, past any redirection of the command it shows
run() { if [ $DRY = 1 ]; then echo "+ $*" >&3; else "$@"; fi; }
if command -v apt-get >/dev/null && ! ldconfig -p | grep -q libOpenGL.so.0; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  run $SUDO apt-get update -qq
  run $SUDO apt-get install -y -qq --no-install-recommends libegl1 libopengl0 libgl1-mesa-dri libosmesa6 >/dev/null
fi
[ -x .venv/bin/python ] || run python3 -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if [ $GPU = 1 ]; then
  # The local version (+cu130) makes pip replace a CPU build already in .venv; requirements.txt's torch==<version>
  # then counts as installed, so the next line keeps the CUDA build.
  run "${PIP[@]}" "torch==$TORCH+$CUDA" --index-url "$TORCH_INDEX"
fi
run "${PIP[@]}" -r requirements.txt
if [ $GPU = 1 ] && [ $DRY = 0 ]; then
  .venv/bin/python -c "import torch; assert torch.version.cuda, 'torch ' + torch.__version__ + ' is not a CUDA build'; \
print(f'setup.sh: torch {torch.__version__}, CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()}')"
fi
[ $DRY = 1 ] || echo "setup.sh: ready (.venv)"
