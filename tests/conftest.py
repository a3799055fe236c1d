"""Shared pytest set-up: headless rendering and the stage scripts importable as modules."""
import os
import sys
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")  # must be set before dm_control / mujoco is imported
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
