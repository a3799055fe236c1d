"""Tests of report.py: variant naming; rliable's aggregates, probability of improvement, performance profiles
and stratified bootstrap by hand and against rliable's own functions; figures and tables; the per-task evidence
(per-seed tables, GSA minus each variant with its bootstrap CI, diagnostics, film strip); bad input."""
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
    assert v({"no_pretrain": True, "packnet": True}) == "no-pretrain-packnet"
    assert v({"packnet": True}) == "gsa-packnet"


def column(*values):
    """One task's scores as rliable's [seeds, 1] array."""
    return np.array(values, dtype=float).reshape(-1, 1)


def estimate(func, per_task, reps=4000, seed=0, conf=0.95):
    with report.numpy_global_seed(seed):
        return report.interval_estimates({"v": per_task}, func, reps, conf)["v"]


def test_aggregate_metrics_by_hand():
    # tasks with 1, 1, 1 and 5 seeds: per-task means 0, 10, 20, 40; pooled runs 0, 10, 20, 0, 20, 40, 60, 80
    point = report.aggregate_metrics(column(0), column(10), column(20), column(0, 20, 40, 60, 80))
    mean, median, iqm, gap = point
    assert mean == pytest.approx(17.5) and median == pytest.approx(15.0)
    assert iqm == pytest.approx(np.mean([10, 20, 20, 40]))  # 8 runs: drop the 2 lowest (0, 0) and 2 highest
    assert gap == pytest.approx(100 - np.mean([0, 10, 20, 0, 20, 40, 60, 80]))
    assert report.aggregate_metrics(column(150.0))[3] == pytest.approx(0.0)  # scores above 100 count as 100
    assert report.aggregate_metrics(column(100, 1, 3, 2, 4))[2] == pytest.approx(3.0)  # n=5: drop one each end


def test_aggregate_metrics_are_rliables_on_a_full_matrix():
    from rliable import metrics

    scores = np.random.default_rng(0).uniform(0, 120, (5, 4))  # [seeds, tasks]
    point = report.aggregate_metrics(*[scores[:, [t]] for t in range(4)])
    expected = [metrics.aggregate_mean(scores), metrics.aggregate_median(scores), metrics.aggregate_iqm(scores),
                metrics.aggregate_optimality_gap(scores, 100)]
    np.testing.assert_allclose(point, expected)


def test_stratified_bootstrap_by_hand():
    point, ci = estimate(report.aggregate_metrics, [column(0), column(10), column(20), column(100)])
    np.testing.assert_allclose(point, [32.5, 15.0, 15.0, 67.5])
    np.testing.assert_allclose(ci, [point, point])  # one seed per task: resampling changes nothing
    # one task, seeds {0, 10}: resampled means are 0, 5, 10 with probability 1/4, 1/2, 1/4
    point, ci = estimate(report.aggregate_metrics, [column(0, 10)])
    assert point[0] == 5.0 and list(ci[:, 0]) == [0.0, 10.0]
    # two such tasks (rliable's [seeds, tasks] matrix): each resampled on its own, so the mean of the two
    # task means is 0 or 10 with probability 1/16 each, 2.5 or 7.5 with 1/4 each, 5 with 3/8
    point, ci = estimate(report.aggregate_metrics, [column(0, 10), column(10, 0)])
    assert point[0] == 5.0 and list(ci[:, 0]) == [0.0, 10.0]
    point, ci = estimate(report.aggregate_metrics, [column(0, 10), column(10, 0)], conf=0.8)
    assert list(ci[:, 0]) == [2.5, 7.5]  # 10% and 90% percentiles fall inside the 1/4 atoms
    # stratified: each task resampled only from its own seeds, so a constant task keeps its value
    point, ci = estimate(report.aggregate_metrics, [column(3, 3, 3), column(0, 10)], seed=1)
    assert point[0] == 4.0 and list(ci[:, 0]) == [1.5, 6.5]


def test_bootstrap_seed_gives_the_same_ci_and_leaves_numpy_alone():
    per_task = [column(*np.random.default_rng(0).uniform(0, 100, 8)), column(5, 50, 70)]
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    a = estimate(report.aggregate_metrics, per_task, reps=300, seed=0)[1]
    assert np.random.random() == before  # the caller's global state is given back
    b = estimate(report.aggregate_metrics, per_task, reps=300, seed=0)[1]
    c = estimate(report.aggregate_metrics, per_task, reps=300, seed=1)[1]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_probability_of_improvement_by_hand():
    poi = report.probability_of_improvement
    assert poi(column(1, 2, 3), column(0, 0))[0] == pytest.approx(1.0)
    assert poi(column(0, 0), column(1, 2, 3))[0] == pytest.approx(0.0)
    assert poi(column(0, 0, 0), column(0, 0, 0))[0] == pytest.approx(0.5)  # ties count half
    # pairs (1,0) 1, (1,2) 0, (0,0) 1/2, (0,2) 0 -> 3/8 on task 1; task 2 (3 seeds vs 1): 2/3; mean over tasks
    assert poi(column(1, 0), column(5, 1, 9), column(0, 2), column(4))[0] == pytest.approx((3 / 8 + 2 / 3) / 2)
    point, ci = estimate(poi, [column(5, 6, 7), column(1, 2, 3)])  # X always better: no uncertainty
    assert point[0] == 1.0 and list(ci[:, 0]) == [1.0, 1.0]
    point, ci = estimate(poi, [column(1, 5, 9), column(2, 4, 6)], reps=500)
    assert 0.0 <= ci[0, 0] < point[0] < ci[1, 0] <= 1.0


def test_probability_of_improvement_and_profile_match_rliable_on_a_full_matrix():
    from rliable import library, metrics

    g = np.random.default_rng(1)
    x, y = g.uniform(0, 100, (4, 3)), g.uniform(0, 100, (5, 3))
    got = report.probability_of_improvement(*[x[:, [t]] for t in range(3)], *[y[:, [t]] for t in range(3)])
    assert got[0] == pytest.approx(metrics.probability_of_improvement(x, y))
    ties_x, ties_y = g.integers(0, 4, (6, 3)).astype(float), g.integers(0, 4, (3, 3)).astype(float)
    ties_y[:, 1] = ties_x[:3, 1]
    got = report.probability_of_improvement(*[ties_x[:, [t]] for t in range(3)], *[ties_y[:, [t]] for t in range(3)])
    assert got[0] == pytest.approx(metrics.probability_of_improvement(ties_x, ties_y))
    same = g.integers(0, 3, (4, 2)).astype(float)  # rliable's special case: identical columns give 0.5
    assert report.probability_of_improvement(same[:, [0]], same[:, [1]], same[:, [0]], same[:, [1]])[0] == 0.5
    taus = np.linspace(0, 100, 21)
    profile = report.performance_profile(taus)(*[x[:, [t]] for t in range(3)])
    expected, _ = library.create_performance_profile({"x": x}, taus, reps=2)
    np.testing.assert_allclose(profile, expected["x"])
    # by hand, tasks with different seed counts weigh the same: task 1 {10, 30}, task 2 {50}
    profile = report.performance_profile(np.array([0.0, 20.0, 40.0, 60.0]))(column(10, 30), column(50))
    np.testing.assert_allclose(profile, [1.0, (0.5 + 1) / 2, 0.5, 0.0])


def test_report_end_to_end(tmp_path):
    runs = [make_run(tmp_path / "runs", f"gsa-walker-{s}", "walker-run", s, [100, 400, 600 + 100 * s])
            for s in range(3)]
    runs += [make_run(tmp_path / "runs", f"dv3-walker-{s}", "walker-run", s, [50, 100, 200 + 100 * s],
                      flags={"no_pretrain": True}) for s in range(2)]
    runs += [make_run(tmp_path / "runs", f"gsa-reach-{s}", "mw-reach", s, [0.0, 0.5, 0.8 + 0.1 * s])
             for s in range(2)]
    out = tmp_path / "out"
    report.main(args_for([tmp_path / "runs"], out, paper_reference=True, bootstrap=200))  # a dir holding run dirs
    for name in ("curves-walker-run", "curves-mw-reach", "performance-profile", "probability-of-improvement"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scores = json.loads((out / "scores.json").read_text())
    by = {(r["variant"], r["task"], r["seed"]): r["score"] for r in scores["runs"]}
    assert by[("gsa", "walker-run", 2)] == pytest.approx(80.0)  # return 800 / 10
    assert by[("gsa", "mw-reach", 1)] == pytest.approx(90.0)  # success 0.9 x 100
    gsa = scores["aggregate"]["gsa"]
    # per-task means: walker-run (60+70+80)/3 = 70, mw-reach (80+90)/2 = 85
    assert gsa["mean"]["value"] == pytest.approx(77.5) and gsa["median"]["value"] == pytest.approx(77.5)
    assert gsa["iqm"]["value"] == pytest.approx(np.mean([70, 80, 80]))  # of 60,70,80,80,90: drop 60, 90
    assert gsa["optimality_gap"]["value"] == pytest.approx(100 - np.mean([60, 70, 80, 80, 90]))
    assert gsa["tasks"] == 2 and gsa["runs"] == 5
    for k in ("mean", "median", "iqm", "optimality_gap"):
        assert gsa[k]["ci"][0] <= gsa[k]["value"] <= gsa[k]["ci"][1]
    # GSA (60, 70, 80) against from scratch (20, 30) on walker-run, the one task both have: always better
    assert scores["probability_of_improvement"] == {
        "gsa>no-pretrain": {"value": 1.0, "ci": [1.0, 1.0], "tasks": ["walker-run"]}}
    profile = scores["performance_profile"]
    assert profile["tau"][0] == 0.0 and profile["tau"][-1] == 100.0 and len(profile["tau"]) == 101
    at = {tau: i for i, tau in enumerate(profile["tau"])}
    assert profile["gsa"]["value"][at[75.0]] == pytest.approx((1 / 3 + 1) / 2)  # walker-run 80 > 75; reach both
    assert profile["no-pretrain"]["value"][at[25.0]] == pytest.approx(0.5)
    dv3 = scores["aggregate"]["no-pretrain"]
    assert dv3["mean"]["value"] == pytest.approx(25.0) and dv3["tasks"] == 1
    md = (out / "report.md").read_text()
    assert "| walker-run | 70.0 (3) | 25.0 (2) | 72.8 | 22.4 |" in md
    assert "DreamerV3 (from scratch)" in md and "different task sets" in md
    assert "| GSA | DreamerV3 (from scratch) | 1 | 1.00 [1.00, 1.00] |" in md
    assert "| GSA | 2 | 5 | 77.5 [" in md and "| 24.0 [" in md  # mean, then the optimality gap 100 - 76

    # --last-n 2, --max-env-steps and the any-step success measure change the scores as documented
    report.main(args_for(runs, tmp_path / "out2", last_n=2, max_env_steps=25000, success_key="eval_success_any"))
    scores = json.loads((tmp_path / "out2" / "scores.json").read_text())
    by = {(r["variant"], r["task"], r["seed"]): r["score"] for r in scores["runs"]}
    assert by[("gsa", "walker-run", 0)] == pytest.approx(25.0)  # evals at 10k, 20k: (100 + 400) / 2 / 10
    assert by[("gsa", "mw-reach", 0)] == pytest.approx(75.0)  # any-step success 0.5 and 1.0

    # without GSA runs: no probability of improvement, and report.md says why
    report.main(args_for(runs[3:5], tmp_path / "out3", bootstrap=50))
    assert not (tmp_path / "out3" / "probability-of-improvement.png").exists()
    assert (tmp_path / "out3" / "performance-profile.png").is_file()
    assert "None: it needs GSA runs" in (tmp_path / "out3" / "report.md").read_text()
    assert json.loads((tmp_path / "out3" / "scores.json").read_text())["probability_of_improvement"] == {}


def test_curve_interpolates_and_holds_last_value():
    runs = [{"steps": np.array([0.0, 10.0]), "value": np.array([0.0, 10.0])},
            {"steps": np.array([0.0, 5.0]), "value": np.array([2.0, 4.0])}]
    with report.numpy_global_seed(0):
        mean, lo, hi = report.curve(runs, np.array([0.0, 5.0, 10.0]), 200)
    np.testing.assert_allclose(mean, [1.0, 4.5, 7.0])  # seed 2 holds 4.0 after its last evaluation
    assert (lo <= mean).all() and (mean <= hi).all()
    # resampling two seeds: the band's ends are the all-seed-1 and all-seed-2 curves (both drawn with p = 1/4)
    np.testing.assert_allclose(lo, [0.0, 4.0, 4.0])
    np.testing.assert_allclose(hi, [2.0, 5.0, 10.0])


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

    for no_pretrain, no_rehearsal, no_guidance, guidance, packnet in itertools.product(
            (False, True), (False, True), (False, True), ("window", "jsrl"), (False, True)):
        flags = dict(no_pretrain=no_pretrain, no_rehearsal=no_rehearsal, no_guidance=no_guidance,
                     guidance=guidance, packnet=packnet)
        args = finetune_gsa.Args(task="walker-walk", **flags)
        assert finetune_gsa.variant_name(args) == report.variant_name(flags), flags


# ----------------------------------------------------------------------------------------------------------
# Evidence per task: per-seed table, GSA minus each variant, diagnostics, film strip
# ----------------------------------------------------------------------------------------------------------

def add_training_logs(run: Path, frames=(1000, 2000, 3000), entropy=2.0, imag_reward=0.5) -> None:
    """What finetune_gsa.py logs besides metrics.jsonl: train.jsonl and episodes.jsonl (one line per episode), and
    the critic check (eval_value_first, eval_return_discounted) in every evaluation record."""
    with open(run / "train.jsonl", "w") as f:
        for i, s in enumerate(frames):
            f.write(json.dumps({"env_steps": s, "entropy": entropy - 0.5 * i, "imag_reward": imag_reward,
                                "wm_loss": 1.0}) + "\n")
    with open(run / "episodes.jsonl", "w") as f:
        for i, s in enumerate(frames):
            f.write(json.dumps({"env_steps": s, "episode": i, "return": 100.0 * (i + 1), "length": 500,
                                "warmup": i == 0, "guidance_p": 0.0, "prior_first": 0, "prior_steps": 0}) + "\n")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        if "eval_return" in r:
            r.update(eval_value_first=0.1 * r["eval_return"], eval_return_discounted=0.2 * r["eval_return"])
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def add_eval_video(run: Path, env_frames: int, frames: int = 11) -> None:
    """videos/eval-<env frames>.mp4 as finetune_gsa.py writes it: 64x64 RGB, frame t after t agent steps."""
    import imageio.v2 as imageio

    video = np.zeros((frames, 64, 64, 3), np.uint8)
    video[:, :, :, 0] = np.linspace(0, 255, frames).astype(np.uint8)[:, None, None]
    (run / "videos").mkdir(exist_ok=True)
    imageio.mimwrite(run / "videos" / f"eval-{env_frames:07d}.mp4", video, fps=30, macro_block_size=16)


def test_evidence_files_and_per_seed_table(tmp_path):
    root = tmp_path / "runs"
    gsa = [make_run(root, f"gsa-{s}", "walker-run", s, [100, 500 + 10 * s, 300 + 100 * s]) for s in range(3)]
    dv3 = [make_run(root, f"dv3-{s}", "walker-run", s, [50, 200, 100 + 10 * s], flags={"no_pretrain": True},
                    steps=[10000, 20000, 25000 + 5000 * s]) for s in range(2)]
    mw = [make_run(root, f"reach-{s}", "mw-reach", s, [0.2, 0.9, 0.5 + 0.1 * s]) for s in range(2)]
    for run in gsa + dv3:
        add_training_logs(run)
    add_eval_video(gsa[0], 20000)
    add_eval_video(gsa[0], 30000, frames=7)  # the latest: the one shown
    (gsa[0] / "videos" / "eval-0040000.tmp-99.mp4").write_bytes(b"half written")  # not a video
    add_eval_video(mw[1], 30000)  # only the second seed has a video: no strip from the first seed's run
    out = tmp_path / "out"
    report.main(args_for([root], out, bootstrap=50))
    for name in ("diagnostics-walker-run", "diagnostics-mw-reach", "filmstrip-walker-run"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "filmstrip-mw-reach.png").exists()
    from PIL import Image  # Meta-World curves: success and shaped return side by side, twice as wide
    widths = {t: Image.open(out / f"curves-{t}.png").size[0] for t in ("walker-run", "mw-reach")}
    assert widths["mw-reach"] == 2 * widths["walker-run"]
    assert report.latest_eval_video({"dir": str(gsa[0])}, None)[0] == 30000
    assert report.latest_eval_video({"dir": str(gsa[0])}, 25000)[0] == 20000  # --max-env-steps holds for videos

    scores = json.loads((out / "scores.json").read_text())
    table = scores["per_task"]["walker-run"]["per_seed"]
    rows = {(r["variant"], r["seed"]): r for r in table["runs"]}
    assert rows[("gsa", 2)]["final_return"] == 500.0 and rows[("gsa", 2)]["best_return"] == 520.0
    assert rows[("gsa", 0)]["final_return"] == 300.0 and rows[("gsa", 0)]["best_return"] == 500.0
    assert rows[("no-pretrain", 1)]["final_env_steps"] == 30000 and rows[("no-pretrain", 0)]["final_env_steps"] == 25000
    assert table["mean"]["gsa"] == {"seeds": 3, "final_return": 400.0, "best_return": 510.0,
                                    "final_env_steps": [30000, 30000]}
    assert table["mean"]["no-pretrain"]["final_env_steps"] == [25000, 30000]
    reach = scores["per_task"]["mw-reach"]["per_seed"]["runs"][1]
    assert (reach["final_success"], reach["best_success"], reach["final_return"]) == (0.6, 0.9, 600.0)
    md = (out / "report.md").read_text()
    assert "| GSA | 0 | 300.0 | 500.0 | 30000 |" in md
    assert "| **DreamerV3 (from scratch)** | mean of 2 seeds | 105.0 | 200.0 | 25000-30000 |" in md
    assert "| GSA | 1 | 600.0 | 0.60 | 900.0 | 0.90 | 30000 |" in md  # Meta-World: return and success columns
    assert "mw-reach: no film strip: no evaluation video under" in md and "reach-0" in md
    assert not any("walker-run, diagnostics" in n for n in scores["notes"])  # every walker run has every log


def test_gsa_minus_other_variant_in_the_report(tmp_path):
    root = tmp_path / "runs"
    gsa = [make_run(root, f"gsa-{s}", "walker-run", s, [100, 800 + 20 * s]) for s in range(3)]  # scores 80, 82, 84
    dv3 = [make_run(root, f"dv3-{s}", "walker-run", s, [100, 100 + 20 * s], flags={"no_pretrain": True})
           for s in range(2)]  # scores 10, 12
    naive = make_run(root, "naive-0", "walker-run", 0, [100, 700],
                     flags={"no_rehearsal": True, "no_guidance": True})  # one seed: score 70
    out = tmp_path / "out"
    report.main(args_for([*gsa, *dv3, naive], out, bootstrap=50, seed=3))
    minus = json.loads((out / "scores.json").read_text())["per_task"]["walker-run"]["gsa_minus"]
    d = minus["no-pretrain"]
    assert d["difference"] == pytest.approx(82.0 - 11.0) and d["seeds"] == {"gsa": 3, "no-pretrain": 2}
    assert 0 < d["ci"][0] <= d["difference"] <= d["ci"][1]  # a clear gap: the CI excludes 0
    np.testing.assert_allclose(d["ci"], report.difference_ci(np.array([80.0, 82, 84]), np.array([10.0, 12]), 3))
    assert minus["pretrain-only"] == {"difference": pytest.approx(12.0), "ci": None,
                                      "seeds": {"gsa": 3, "pretrain-only": 1}}
    md = (out / "report.md").read_text()
    assert "| walker-run | DreamerV3 (from scratch) | 3, 2 | +71.0 | [" in md
    assert "| walker-run | pre-train + naive fine-tune | 3, 1 | +12.0 | CI needs 2+ seeds per variant |" in md
    # runs without train.jsonl, episodes.jsonl or the critic check (older runs) still give a whole report
    assert (out / "diagnostics-walker-run.png").is_file() and not (out / "filmstrip-walker-run.png").exists()
    assert "panel (a): GSA, seeds 0, 1, 2: no train.jsonl" in md and "no film strip" in md


def test_difference_ci_by_hand():
    ci = report.difference_ci
    x, y = np.array([0.0, 10.0]), np.array([0.0, 0.0])
    # x's resampled mean is 0, 5 or 10 with probability 1/4, 1/2, 1/4; y's is always 0
    np.testing.assert_allclose(ci(x, y, 0), [0.0, 10.0])
    np.testing.assert_allclose(ci(y, x, 0), [-10.0, 0.0])  # the other side is resampled as well
    same = np.array([10.0, 50.0, 90.0])
    low, high = ci(same, same.copy(), 0)
    assert low < 0 < high and low == pytest.approx(-high, abs=10)  # identical variants: around 0
    g = np.random.default_rng(0)
    a, b = g.normal(50, 10, 4), g.normal(20, 10, 4)
    base = ci(a, b, 1)
    np.testing.assert_allclose(ci(a + 7, b, 1), base + 7)  # same draws: the CI moves with the data
    np.testing.assert_allclose(ci(2 * a, 2 * b, 1), 2 * base)  # and widens with its spread
    np.testing.assert_array_equal(ci(a, b, 1), base)  # seeded: reproducible
    assert not np.array_equal(ci(a, b, 2), base)
    wide = np.diff(ci(np.array([0.0, 100.0]), np.array([50.0, 50.0]), 0))[0]
    narrow = np.diff(ci(np.tile([0.0, 100.0], 10), np.array([50.0, 50.0]), 0))[0]
    assert wide == pytest.approx(100.0) and narrow < 0.5 * wide  # more seeds, same spread: narrower


def test_training_logs_and_seed_mean(tmp_path):
    run = make_run(tmp_path, "r", "walker-run", 0, [1, 2, 3])
    add_training_logs(run, frames=(1000, 2000, 3000))
    logs = report.read_training_logs({"dir": str(run)}, args_for([run], tmp_path / "o"))
    np.testing.assert_allclose(logs["entropy"][1], [2.0, 1.5, 1.0])
    np.testing.assert_allclose(logs["real_reward"][1], [0.2, 0.4, 0.6])  # return / length
    np.testing.assert_allclose(logs["replay_reward"][1], [0.2, 0.3, 0.4])  # all episodes so far: 600 / 1500 at the end
    np.testing.assert_allclose(logs["imag_online"][1], [0.5, 0.5, 0.5])  # no rehearsal: every start is online
    lines = [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines()]
    lines[1]["imag_reward_online_starts"] = 0.25  # a rehearsing run logs its online starts' share
    (run / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    logs = report.read_training_logs({"dir": str(run)}, args_for([run], tmp_path / "o"))
    np.testing.assert_allclose(logs["imag_online"][1], [0.5, 0.25, 0.5])
    cut = report.read_training_logs({"dir": str(run)}, args_for([run], tmp_path / "o", max_env_steps=2000))
    np.testing.assert_allclose(cut["imag_reward"][0], [1000, 2000])
    (run / "train.jsonl").unlink()
    assert set(report.read_training_logs({"dir": str(run)}, args_for([run], tmp_path / "o"))) == {"real_reward",
                                                                                                  "replay_reward"}
    r = report.read_run(run, args_for([run], tmp_path / "o"))
    np.testing.assert_allclose(r["value_first"], [0.1, 0.2, 0.3])
    # the mean over seeds covers only the span every seed has: frames 5 to 10 here
    x, y = report.seed_mean([(np.array([0.0, 10.0]), np.array([0.0, 10.0])),
                             (np.array([5.0, 20.0]), np.array([0.0, 0.0]))])
    np.testing.assert_allclose(x, [5.0, 10.0])
    np.testing.assert_allclose(y, [2.5, 5.0])
    assert report.seed_mean([(np.array([0.0, 1.0]), np.zeros(2)), (np.array([2.0, 3.0]), np.zeros(2))])[0].size == 0
    np.testing.assert_array_equal(report.filmstrip_steps(501), [0, 56, 111, 167, 222, 278, 333, 389, 444, 500])
    np.testing.assert_array_equal(report.filmstrip_steps(4), [0, 1, 2, 3])


def test_runs_of_unequal_budgets_are_flagged_or_compared_at_one(tmp_path):
    """Unfinished runs: report.md warns when a task's runs end at different budgets; --common-budget cuts every run
    at the smallest final evaluation, so the scores compare like with like."""
    runs = [make_run(tmp_path, "gsa-s0", "mw-drawer-open", 0, [0.0, 0.5, 1.0, 1.0, 1.0]),  # to 50k frames
            make_run(tmp_path, "gsa-s1", "mw-drawer-open", 1, [0.0, 0.2]),  # stopped at 20k
            make_run(tmp_path, "scratch-s0", "mw-drawer-open", 0, [0.0, 0.1, 0.1, 0.3, 0.3],
                     flags={"no_pretrain": True})]

    def scores(out):
        data = json.loads((out / "scores.json").read_text())
        return {Path(r["dir"]).name: (r["score"], r["final_env_steps"]) for r in data["runs"]}

    report.main(args_for(runs, tmp_path / "mixed"))
    assert "end at different budgets (20000 to 50000 env frames)" in (tmp_path / "mixed/report.md").read_text()
    assert scores(tmp_path / "mixed") == {"gsa-s0": (100.0, 50000), "gsa-s1": (20.0, 20000),
                                          "scratch-s0": (30.0, 50000)}

    report.main(args_for(runs, tmp_path / "common", common_budget=True))
    text = (tmp_path / "common/report.md").read_text()
    assert "different budgets" not in text and "at or before 20000 env steps (--common-budget" in text
    assert scores(tmp_path / "common") == {"gsa-s0": (50.0, 20000), "gsa-s1": (20.0, 20000),
                                           "scratch-s0": (10.0, 20000)}
    # --max-env-steps below the common budget wins
    report.main(args_for(runs, tmp_path / "both", common_budget=True, max_env_steps=10000))
    assert {s for _, s in scores(tmp_path / "both").values()} == {10000}
