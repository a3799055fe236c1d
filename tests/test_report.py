"""Tests of report.py: variant naming, IQM / bootstrap numbers by hand, figures and tables, bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import report

ROOT = Path(__file__).resolve().parents[1]


def make_run(root: Path, name: str, task: str, seed: int, values, flags=None, steps=None) -> Path:
    """A finetune_gsa.py-style run directory: args.json + metrics.jsonl (one line per evaluation)."""
    run = root / name
    run.mkdir(parents=True)
    (run / "args.json").write_text(json.dumps({"task": task, "seed": seed, "no_pretrain": False,
                                               "no_rehearsal": False, "no_guidance": False,
                                               "guidance": "window", **(flags or {})}))
    steps = steps or [10000 * (i + 1) for i in range(len(values))]
    with open(run / "metrics.jsonl", "w") as f:
        for s, v in zip(steps, values):
            line = {"env_steps": s, "eval_return": v * 1000 if task.startswith("mw-") else v, "wall_time": 1.0}
            if task.startswith("mw-"):
                line.update(eval_success=v, eval_success_any=min(1.0, v + 0.5))
            f.write(json.dumps(line) + "\n")
            f.write(json.dumps({"env_steps": s, "train_loss": 0.5}) + "\n")  # a non-evaluation record
    return run


def args_for(runs, out, **kw):
    return report.Args(runs=tuple(str(r) for r in runs), out_dir=str(out), **kw)


def test_variant_names():
    v = report.variant_name
    assert v({}) == "gsa"
    assert v({"guidance": "jsrl"}) == "jsrl"
    assert v({"no_pretrain": True}) == "no-pretrain"
    assert v({"no_pretrain": True, "no_rehearsal": True, "no_guidance": True}) == "no-pretrain"
    assert v({"no_rehearsal": True}) == "no-rehearsal"
    assert v({"no_rehearsal": True, "guidance": "jsrl"}) == "no-rehearsal-jsrl"
    assert v({"no_guidance": True}) == "no-guidance"
    assert v({"no_guidance": True, "guidance": "jsrl"}) == "no-guidance"  # the guidance kind is moot
    assert v({"no_rehearsal": True, "no_guidance": True}) == "pretrain-only"


def test_iqm_by_hand():
    assert report.iqm(np.arange(1.0, 9.0)) == pytest.approx(4.5)  # drop 1, 2 and 7, 8
    assert report.iqm(np.array([100.0, 1, 3, 2, 4])) == pytest.approx(3.0)  # n=5: drop one each end
    assert report.iqm(np.array([7.0])) == pytest.approx(7.0)
    np.testing.assert_allclose(report.iqm(np.array([[1.0, 2, 3, 4], [4, 4, 0, 8]])), [2.5, 4.0])


def test_aggregates_and_bootstrap_by_hand():
    per_task = [np.array([0.0]), np.array([10.0]), np.array([20.0]), np.array([100.0])]
    stats = report.stratified_bootstrap(per_task, 500, np.random.default_rng(0))
    assert stats["mean"]["value"] == pytest.approx(32.5)
    assert stats["median"]["value"] == pytest.approx(15.0)
    assert stats["iqm"]["value"] == pytest.approx(15.0)  # mean of 10 and 20
    for k in ("mean", "median", "iqm"):  # one seed per task: resampling changes nothing
        assert stats[k]["ci"] == pytest.approx([stats[k]["value"]] * 2)
    # one task, seeds {0, 10}: resampled means are 0, 5, 10 with probability 1/4, 1/2, 1/4
    stats = report.stratified_bootstrap([np.array([0.0, 10.0])], 4000, np.random.default_rng(0))
    assert stats["mean"]["value"] == 5.0 and stats["mean"]["ci"] == [0.0, 10.0]
    # stratified: each task resampled only from its own seeds, so a constant task keeps its value
    boot = report.stratified_bootstrap([np.array([3.0, 3.0, 3.0]), np.array([0.0, 10.0])], 4000,
                                       np.random.default_rng(1))
    assert boot["mean"]["value"] == 4.0 and boot["mean"]["ci"] == [1.5, 6.5]


def test_report_end_to_end(tmp_path):
    runs = [make_run(tmp_path / "runs", f"gsa-walker-{s}", "walker-run", s, [100, 400, 600 + 100 * s])
            for s in range(3)]
    runs += [make_run(tmp_path / "runs", f"dv3-walker-{s}", "walker-run", s, [50, 100, 200 + 100 * s],
                      flags={"no_pretrain": True}) for s in range(2)]
    runs += [make_run(tmp_path / "runs", f"gsa-reach-{s}", "mw-reach", s, [0.0, 0.5, 0.8 + 0.1 * s])
             for s in range(2)]
    out = tmp_path / "out"
    report.main(args_for([tmp_path / "runs"], out, paper_reference=True, bootstrap=200))  # a dir holding run dirs
    for task in ("walker-run", "mw-reach"):
        assert (out / f"curves-{task}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scores = json.loads((out / "scores.json").read_text())
    by = {(r["variant"], r["task"], r["seed"]): r["score"] for r in scores["runs"]}
    assert by[("gsa", "walker-run", 2)] == pytest.approx(80.0)  # return 800 / 10
    assert by[("gsa", "mw-reach", 1)] == pytest.approx(90.0)  # success 0.9 x 100
    gsa = scores["aggregate"]["gsa"]
    # per-task means: walker-run (60+70+80)/3 = 70, mw-reach (80+90)/2 = 85
    assert gsa["mean"]["value"] == pytest.approx(77.5) and gsa["median"]["value"] == pytest.approx(77.5)
    assert gsa["iqm"]["value"] == pytest.approx(np.mean([70, 80, 80]))  # of 60,70,80,80,90: drop 60, 90
    assert gsa["tasks"] == 2 and gsa["runs"] == 5
    dv3 = scores["aggregate"]["no-pretrain"]
    assert dv3["mean"]["value"] == pytest.approx(25.0) and dv3["tasks"] == 1
    md = (out / "report.md").read_text()
    assert "| walker-run | 70.0 (3) | 25.0 (2) | 72.8 | 22.4 |" in md
    assert "DreamerV3 (from scratch)" in md and "different task sets" in md

    # --last-n 2, --max-env-steps and the any-step success measure change the scores as documented
    report.main(args_for(runs, tmp_path / "out2", last_n=2, max_env_steps=25000, success_key="eval_success_any"))
    scores = json.loads((tmp_path / "out2" / "scores.json").read_text())
    by = {(r["variant"], r["task"], r["seed"]): r["score"] for r in scores["runs"]}
    assert by[("gsa", "walker-run", 0)] == pytest.approx(25.0)  # evals at 10k, 20k: (100 + 400) / 2 / 10
    assert by[("gsa", "mw-reach", 0)] == pytest.approx(75.0)  # any-step success 0.5 and 1.0


def test_curve_interpolates_and_holds_last_value():
    runs = [{"steps": np.array([0.0, 10.0]), "value": np.array([0.0, 10.0])},
            {"steps": np.array([0.0, 5.0]), "value": np.array([2.0, 4.0])}]
    mean, lo, hi = report.curve(runs, np.array([0.0, 5.0, 10.0]), 200, np.random.default_rng(0))
    np.testing.assert_allclose(mean, [1.0, 4.5, 7.0])  # seed 2 holds 4.0 after its last evaluation
    assert (lo <= mean).all() and (mean <= hi).all()


def test_bad_input_gives_clear_errors_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="no run directories"):
        report.main(args_for([], out))
    good = make_run(tmp_path, "good", "walker-run", 0, [1, 2])
    bad = make_run(tmp_path, "bad", "walker-run", 1, [1, 2])
    with open(bad / "metrics.jsonl", "a") as f:
        f.write('{"env_steps": 3, "eval_return": \n')
    with pytest.raises(SystemExit, match=r"metrics.jsonl:5 is not valid JSON"):
        report.main(args_for([good, bad], out))
    dup = make_run(tmp_path, "dup", "walker-run", 0, [3, 4])
    with pytest.raises(SystemExit, match="two runs of variant gsa, task walker-run, seed 0"):
        report.main(args_for([good, dup], out))
    mw = make_run(tmp_path, "mw", "mw-reach", 0, [0.5])
    (mw / "metrics.jsonl").write_text(json.dumps({"env_steps": 1, "eval_return": 3.0}) + "\n")
    with pytest.raises(SystemExit, match="without 'eval_success'"):
        report.main(args_for([mw], out))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="neither a run directory"):
        report.main(args_for([tmp_path / "empty"], out))
    with pytest.raises(SystemExit, match="no evaluations at or before 5 env steps"):
        report.main(args_for([good], out, max_env_steps=5))
    assert not out.exists()


def test_cli(tmp_path):
    run = make_run(tmp_path / "runs", "r0", "cheetah-run", 0, [100, 200])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "report.py", "--runs", str(run), "--out", str(tmp_path / "o"),
                           "--bootstrap", "100"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / "curves-cheetah-run.png").is_file() and "| cheetah-run | 20.0 (1) |" in proc.stdout
    proc = subprocess.run([sys.executable, "report.py", "--runs", str(tmp_path / "nope"), "--out-dir",
                           str(tmp_path / "o2")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "report.py: error:" in proc.stderr and "Traceback" not in proc.stderr


def test_every_flag_is_used():
    import dataclasses
    import inspect

    import ast

    tree = ast.parse(inspect.getsource(report))
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args"}
    for field in dataclasses.fields(report.Args):
        assert field.name in used, f"Args.{field.name} is never read"


def test_variant_names_agree_with_finetune():
    """finetune_gsa.py names its default run dir by the same variant names report.py groups by."""
    import itertools

    import finetune_gsa

    for no_pretrain, no_rehearsal, no_guidance, guidance in itertools.product(
            (False, True), (False, True), (False, True), ("window", "jsrl")):
        flags = dict(no_pretrain=no_pretrain, no_rehearsal=no_rehearsal, no_guidance=no_guidance,
                     guidance=guidance)
        args = finetune_gsa.Args(task="walker-walk", **flags)
        assert finetune_gsa.variant_name(args) == report.variant_name(flags), flags
