"""End-to-end: the four stage scripts chained at tiny size in a temp dir, through their command lines only.

collect_offline.py -> pretrain_wm.py -> retrieval.py build/query -> finetune_gsa.py, each as a subprocess, the
way a user runs them; each stage reads only what the previous one wrote.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(script, *argv, cwd):
    env = dict(os.environ, MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Run the whole pipeline once; the tests below inspect what each stage left on disk."""
    tmp = tmp_path_factory.mktemp("e2e")
    data, wm, index, ft = tmp / "data", tmp / "wm", tmp / "index", tmp / "ft"
    logs = {}
    logs["collect"] = run("collect_offline.py", "--out-dir", data, "--embodiments", "walker,sawyer",
                          "--mw-tasks", "reach", "--episodes-per-embodiment", 2, "--explorer-steps", 300,
                          "--explorer-stages", 1, "--num-workers", 1, cwd=tmp)
    logs["pretrain"] = run("pretrain_wm.py", "--data-dir", data, "--out-dir", wm, "--embodiments", "walker,sawyer",
                           "--size", "tiny", "--steps", 6, cwd=tmp)
    logs["build"] = run("retrieval.py", "build", "--checkpoint", wm / "wm.pt", "--data-dir", data,
                        "--out-dir", index, cwd=tmp)
    logs["query"] = run("retrieval.py", "query", "--index-dir", index, "--task", "walker-walk", "--k", 3,
                        "--checkpoint", wm / "wm.pt", cwd=tmp)
    logs["finetune"] = run("finetune_gsa.py", "--task", "walker-walk", "--checkpoint", wm / "wm.pt",
                           "--index-dir", index, "--data-dir", data, "--out-dir", ft, "--size", "tiny",
                           "--env-steps", 400, "--max-episode-steps", 50, "--k", 4, cwd=tmp)
    return dict(tmp=tmp, data=data, wm=wm, index=index, ft=ft, logs=logs)


def test_dataset_is_reward_free_and_listed(pipeline):
    manifest = json.loads((pipeline["data"] / "manifest.json").read_text())
    embodiments = sorted({row["embodiment"] for row in manifest["episodes"]})
    assert embodiments == ["sawyer", "walker"]
    for row in manifest["episodes"]:
        with np.load(pipeline["data"] / row["path"], allow_pickle=False) as ep:
            assert sorted(ep.files) == ["action", "image", "is_first"]


def test_checkpoint_records_its_inputs(pipeline):
    ckpt = torch.load(pipeline["wm"] / "wm.pt", map_location="cpu", weights_only=True)
    import hashlib
    manifest_sha = hashlib.sha256((pipeline["data"] / "manifest.json").read_bytes()).hexdigest()
    assert ckpt["manifest_sha256"] == manifest_sha
    assert ckpt["step"] == 6
    assert list(ckpt["embodiments"]) == ["walker", "sawyer"]


def test_index_covers_every_episode(pipeline):
    manifest = json.loads((pipeline["data"] / "manifest.json").read_text())
    meta = json.loads((pipeline["index"] / "index.json").read_text())
    assert sorted(r["path"] for r in meta["rows"]) == sorted(r["path"] for r in manifest["episodes"])
    # walker-walk has 6 action dims: the query keeps only walker episodes (sawyer has 4), both of them (k=3).
    result = json.loads((pipeline["index"] / "query-walker-walk.json").read_text())
    assert [r["embodiment"] for r in result["results"]] == ["walker", "walker"]


def test_finetune_evaluates_and_saves(pipeline):
    ft = pipeline["ft"]
    lines = [json.loads(line) for line in (ft / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert lines, "no evaluation was logged"
    for rec in lines:
        assert isinstance(rec["env_steps"], int) and math.isfinite(rec["eval_return"])
    assert lines[-1]["env_steps"] >= 400
    assert (ft / "ckpt.pt").exists()
    saved = json.loads((ft / "args.json").read_text())
    assert saved["task"] == "walker-walk"
    import finetune_gsa  # what --precision auto chose on this machine is on record
    assert saved["resolved_precision"] == ("bf16" if finetune_gsa.uses_bf16(saved["precision"], "cpu") else "fp32")
