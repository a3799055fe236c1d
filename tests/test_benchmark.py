"""benchmark.py runs each stage in a fresh process and prints a table; a tiny smoke run of its two update
stages at both precisions, and its refusal of an unknown precision."""
import json
import subprocess
import sys
from pathlib import Path

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
