#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine: system libraries for headless MuJoCo rendering (EGL via Mesa,
# software; OSMesa as a fallback) and a virtual environment .venv with the pinned Python packages.
# Safe to run again: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")"
if command -v apt-get >/dev/null && ! ldconfig -p | grep -q libOpenGL.so.0; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends libegl1 libopengl0 libgl1-mesa-dri libosmesa6 >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
echo "setup.sh: ready (.venv)"
