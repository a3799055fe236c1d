"""benchmark.py runs each stage in a fresh process and prints a table; a tiny smoke run of its two update
stages at both precisions, a side-by-side comparison (a commit against the working tree in bf16), and its refusal
of an unknown precision and of a CUDA device that is not there."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_update_stages_at_both_precisions(tmp_path):
    out = tmp_path / "bench.md"
    res = subprocess.run([sys.executable, "benchmark.py", "--stages", "pretrain", "finetune", "--sizes", "tiny",
                          "--precision", "fp32", "bf16", "--threads", "1", "--updates", "1", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.with_suffix(".json").read_text())
    assert sorted((r["stage"], r["precision"]) for r in rows) == [
        ("finetune", "bf16"), ("finetune", "fp32"), ("pretrain", "bf16"), ("pretrain", "fp32")]
    assert all(r["s_per_update"] > 0 and r["peak_mb"] > 0 for r in rows)
    assert "| tiny | bf16 |" in out.read_text()


def test_unknown_precision_is_refused():
    res = subprocess.run([sys.executable, "benchmark.py", "--precision", "fp8"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0 and "unknown precision" in res.stderr


def test_compare_side_by_side(tmp_path):
    out = tmp_path / "compare.md"
    res = subprocess.run([sys.executable, "benchmark.py", "--stages", "finetune", "--sizes", "tiny", "--threads", "1",
                          "--updates", "2", "--warmup", "1", "--compare", "ref=HEAD", "precision=bf16",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    (row,) = json.loads(out.with_suffix(".json").read_text())
    assert (row["a"], row["b"], len(row["a_walls"]), len(row["b_walls"])) == ("ref=HEAD", "precision=bf16", 2, 2)
    assert len(row["a_commit"]) == 40 and row["b_commit"] is None
    assert row["ratio"] > 0 and set(row["a_first"]) == {"wm_loss", "reward_loss", "actor_loss", "critic_loss"}
    assert "| finetune | tiny | ref=HEAD | precision=bf16 |" in out.read_text()


def test_compare_refuses_a_bad_configuration():
    res = subprocess.run([sys.executable, "benchmark.py", "--stages", "finetune", "--compare", "ref=HEAD", "speed=2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "bad configuration 'speed=2'" in res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_gpu_is_refused_clearly():
    res = subprocess.run([sys.executable, "benchmark.py", "--device", "cuda", "--stages", "finetune", "--sizes", "s"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "sees no CUDA device" in res.stderr and "no GPU numbers" in res.stderr
