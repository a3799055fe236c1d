"""The main job's picture and knobs: report.py --summary from a tiny GSA run and a tiny from-scratch run (the
caption's numbers against the runs' own files), its Meta-World form, its clear errors; demo.sh's DRY_RUN=1
sequence parsed by each stage's own argument parser."""
import io
import json
import os
import shlex
import subprocess
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import tyro

import finetune_gsa as ft
import report
from test_finetune import RUN, make_artifacts

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def episodes_text(n: int) -> str:
    return f"{n} warm-up episode" + ("" if n == 1 else "s")


def write_openloop(pretrain_dir: Path, embodiment: str, step: int, model_mse: float, copy_mse: float):
    """pretrain_wm.py's open-loop outputs: videos/openloop-<embodiment>-<step>.gif (per frame, rows of clips, each
    [truth | model]) and the metrics.jsonl lines (a training line with wall_time, an open-loop line)."""
    (pretrain_dir / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (12, 2 * 64, 2 * 64, 3), dtype=np.uint8)
    imageio.mimwrite(pretrain_dir / "videos" / f"openloop-{embodiment}-{step:08d}.gif", list(frames))
    with open(pretrain_dir / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": step, "loss": 1.0, "wall_time": 600.0}) + "\n")
        f.write(json.dumps({"step": step, f"openloop_mse/{embodiment}": model_mse,
                            f"openloop_copy_mse/{embodiment}": copy_mse}) + "\n")


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A tiny GSA run and a tiny from-scratch run of walker-walk (finetune_gsa.py at size tiny, as
    test_finetune.py builds them), with pre-training's open-loop outputs beside the checkpoint."""
    root = tmp_path_factory.mktemp("demo")
    artifacts = make_artifacts(root)
    write_openloop(Path(artifacts["checkpoint"]).parent, "walker", 300, 0.0123, 0.0456)
    runs = root / "runs"
    ft.main(ft.Args(**{**RUN, "task": "walker-walk", "env_steps": 160, "out_dir": str(runs / "gsa"),
                       "guidance_schedule": "scaled", **artifacts}))
    ft.main(ft.Args(**{**RUN, "task": "walker-walk", "env_steps": 160, "out_dir": str(runs / "no-pretrain"),
                       "no_pretrain": True}))
    return root, runs


def test_summary_of_tiny_gsa_and_scratch_runs(tiny_runs):
    root, runs = tiny_runs
    out = root / "report"
    report.main(report.Args(runs=(str(runs / "gsa"), str(runs / "no-pretrain")), out_dir=str(out), summary=True,
                            paper_reference=True, bootstrap=50))
    png = (out / "summary.png").read_bytes()
    assert png[:8] == PNG
    width, height = imageio.imread(io.BytesIO(png)).shape[1::-1]
    assert width >= 1500 and height >= 1200  # one page

    summary = json.loads((out / "scores.json").read_text())["summary"]
    n, caption = summary["numbers"], summary["caption"]
    assert summary["task"] == "walker-walk" and caption in (out / "report.md").read_text()

    # Every number of the caption, recomputed here from the runs' own files.
    final = {v: read_jsonl(runs / v / "metrics.jsonl")[-1] for v in ("gsa", "no-pretrain")}
    episodes = {v: read_jsonl(runs / v / "episodes.jsonl") for v in ("gsa", "no-pretrain")}
    random_eps = [e for e in episodes["no-pretrain"] if e["warmup"]]  # scratch's warm-up: random actions
    prior_eps = [e for e in episodes["gsa"] if e["warmup"]]  # GSA's warm-up: the prior drives it all
    assert random_eps and prior_eps and all(e["prior_steps"] == e["length"] for e in prior_eps)
    retrieved = json.loads((runs / "gsa" / "retrieval.json").read_text())
    rl_eps = [e for e in episodes["gsa"] if not e["warmup"]]
    expected = [
        "walker-walk, 1 seed per variant (seed 0), 160 env frames, size tiny.",
        f"GSA return {final['gsa']['eval_return']:.0f};",
        f"DreamerV3 from scratch return {final['no-pretrain']['eval_return']:.0f}.",
        f"Random actions ({episodes_text(len(random_eps))} of the runs without guidance): return "
        f"{np.mean([e['return'] for e in random_eps]):.0f}.",
        f"Retrieved D_r (k=5): {len(retrieved['episodes'])} episodes, "
        + ", ".join(f"{e} {c}" for e, c in sorted(retrieved["by_embodiment"].items(), key=lambda kv: (-kv[1], kv[0]))),
        f"drove its {episodes_text(len(prior_eps))} to a return of {np.mean([e['return'] for e in prior_eps]):.0f}",
        f"{sum(e['prior_steps'] > 0 for e in rl_eps)} of GSA's {len(rl_eps)} training episodes had a prior window "
        "(guidance schedule 'scaled')",
        f"GSA {np.mean([e['return'] for e in episodes['gsa']]):.0f} ({len(episodes['gsa'])} episodes), scratch "
        f"{np.mean([e['return'] for e in episodes['no-pretrain']]):.0f} ({len(episodes['no-pretrain'])})",
        "Paper at 150k frames: GSA return 959, DreamerV3 809.",
        "not a significance test",
    ]
    for text in expected:
        assert text in caption, (text, caption)
    assert n["variants"]["gsa"]["final_return"] == pytest.approx(final["gsa"]["eval_return"])
    assert n["random"]["return"] == pytest.approx(np.mean([e["return"] for e in random_eps]))
    assert n["openloop"] == {"embodiment": "walker", "step": 300, "model_mse": 0.0123, "copy_mse": 0.0456,
                             "minutes": 10.0, "video": "openloop-walker-00000300.gif"}
    # the usual report comes too
    assert (out / "curves-walker-walk.png").read_bytes()[:8] == PNG


def test_summary_errors_are_clear_and_write_nothing(tiny_runs, tmp_path):
    root, runs = tiny_runs
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="--summary needs a GSA run and a from-scratch"):
        report.main(report.Args(runs=(str(runs / "gsa"),), out_dir=str(out), summary=True, bootstrap=20))
    broken = tmp_path / "no-episodes"
    broken.mkdir()
    for name in ("args.json", "metrics.jsonl"):
        (broken / name).write_bytes((runs / "no-pretrain" / name).read_bytes())
    with pytest.raises(SystemExit, match="episodes.jsonl does not exist"):
        report.main(report.Args(runs=(str(runs / "gsa"), str(broken)), out_dir=str(out), summary=True, bootstrap=20))
    assert not out.exists()


def write_mw_run(root: Path, name: str, flags: dict, evals: list, episodes: list, **extra) -> Path:
    """A finetune_gsa.py-style Meta-World run directory: args.json, metrics.jsonl, episodes.jsonl."""
    run = root / name
    run.mkdir(parents=True)
    (run / "args.json").write_text(json.dumps({"task": "mw-drawer-open", "seed": 0, "size": "xs",
                                               "eval_episodes": 10, **flags, **extra}))
    with open(run / "metrics.jsonl", "w") as f:
        for steps, ret, success in evals:
            f.write(json.dumps({"env_steps": steps, "eval_return": ret, "eval_success": success,
                                "eval_success_any": success}) + "\n")
    with open(run / "episodes.jsonl", "w") as f:
        for i, (warmup, prior_steps, ret, success_any) in enumerate(episodes):
            f.write(json.dumps({"env_steps": 200 * (i + 1), "episode": i, "warmup": warmup, "guidance_p": 0.5,
                                "prior_first": 0, "return": ret, "length": 100, "prior_steps": prior_steps,
                                "success": False, "success_any": success_any}) + "\n")
    return run


def test_summary_on_metaworld_states_success(tmp_path):
    data = tmp_path / "data"
    (data / "sawyer").mkdir(parents=True)
    for i in range(3):
        np.savez_compressed(data / "sawyer" / f"drawer-open-{i:06d}.npz",
                            image=np.full((5, 64, 64, 3), 40 * i, np.uint8))
    pretrain = tmp_path / "pretrain"
    write_openloop(pretrain, "sawyer", 2000, 0.008, 0.009)
    gsa = write_mw_run(tmp_path / "runs", "gsa", {"guidance_schedule": "scaled"},
                       [(2000, 150.0, 0.0), (4000, 420.0, 0.3)],
                       [(True, 100, 600.0, True), (True, 100, 500.0, False), (False, 30, 300.0, False),
                        (False, 0, 200.0, False)],
                       checkpoint=str(pretrain / "wm.pt"), data_dir=str(data))
    (gsa / "retrieval.json").write_text(json.dumps({
        "k": 3, "mixed_embodiments": False, "by_embodiment": {"sawyer": 3}, "by_source_task": {"sawyer/drawer-open": 3},
        "episodes": [{"path": f"sawyer/drawer-open-{i:06d}.npz", "embodiment": "sawyer", "task": "drawer-open",
                      "distance": float(i)} for i in range(3)] + [{"path": "sawyer/missing.npz",
                                                                  "embodiment": "sawyer", "task": "drawer-open"}]}))
    write_mw_run(tmp_path / "runs", "scratch", {"no_pretrain": True}, [(2000, 90.0, 0.0), (4000, 110.0, 0.1)],
                 [(True, 0, 80.0, False), (True, 0, 100.0, True), (False, 0, 120.0, False), (False, 0, 140.0, False)])
    out = tmp_path / "out"
    report.main(report.Args(runs=(str(tmp_path / "runs"),), out_dir=str(out), summary=True, paper_reference=True,
                            bootstrap=20))
    assert (out / "summary.png").read_bytes()[:8] == PNG
    caption = json.loads((out / "scores.json").read_text())["summary"]["caption"]
    for text in ("mw-drawer-open, 1 seed per variant (seed 0), 4000 env frames, size xs.",
                 "(10 episodes, success at the episode's end): GSA return 420, success 0.30; DreamerV3 from scratch "
                 "return 110, success 0.10.",
                 "Random actions (2 warm-up episodes of the runs without guidance): return 90, success 0.00.",
                 "Retrieved D_r (k=3): 4 episodes, sawyer 3; by source task sawyer/drawer-open 3.",
                 "drove its 2 warm-up episodes to a return of 550 on average and reached the goal (success at any "
                 "step) in 50% of them.",
                 "1 of GSA's 2 training episodes had a prior window (guidance schedule 'scaled').",
                 "Paper at 150k frames: GSA success 1.00, DreamerV3 0.13."):
        assert text in caption, (text, caption)


# ---------------------------------------------------------------------------------------------------------
# demo.sh: DRY_RUN=1 prints the sequence; each command parses with its stage's own parser
# ---------------------------------------------------------------------------------------------------------

def dry_run(tmp_path, **knobs):
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path / "demo"), **knobs}
    return subprocess.run(["bash", str(ROOT / "demo.sh")], env=env, capture_output=True, text=True, timeout=60)


def parsed_commands(stdout: str) -> list:
    """[(script, parsed Args)] of the printed python commands, parsed by each script's own tyro parser."""
    import collect_offline
    import pretrain_wm
    import retrieval

    parsers = {"collect_offline.py": collect_offline.Args, "pretrain_wm.py": pretrain_wm.Args,
               "finetune_gsa.py": ft.Args, "report.py": report.Args}
    commands = []
    for line in stdout.splitlines():
        if line.startswith("[demo"):
            continue
        argv = shlex.split(line)
        script, rest = argv[1], argv[2:]
        if script == "retrieval.py":
            cls = {"build": retrieval.BuildArgs, "query": retrieval.QueryArgs}[rest[0]]
            script, rest = f"retrieval.py {rest[0]}", rest[1:]
        else:
            cls = parsers[script]
        commands.append((script, tyro.cli(cls, args=rest)))
    return commands


def test_demo_dry_run_sequence_is_valid(tmp_path):
    proc = dry_run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    commands = parsed_commands(proc.stdout)
    assert [s for s, _ in commands] == ["collect_offline.py", "pretrain_wm.py", "retrieval.py build",
                                        "retrieval.py query", "finetune_gsa.py", "finetune_gsa.py", "report.py"]
    collect, pretrain, build, query, gsa, scratch, rep = (a for _, a in commands)
    assert "drawer-open" in collect.mw_tasks.split(",") and collect.embodiments == "walker,cheetah,sawyer"
    assert query.task == gsa.task == scratch.task == "mw-drawer-open"
    assert query.k == gsa.k == collect.episodes_per_embodiment == 20  # one embodiment's (one MW task's) worth
    assert ft.variant_name(gsa) == "gsa" and gsa.guidance_schedule == "scaled"
    assert ft.variant_name(scratch) == "no-pretrain"
    assert gsa.threads == scratch.threads == 1 and gsa.env_steps == scratch.env_steps == 20000
    assert gsa.eval_every == 2000 and gsa.size == scratch.size == pretrain.size == "xs"
    assert gsa.train_ratio == scratch.train_ratio == 64  # half the xs preset's, to stay within the hour
    assert rep.summary and rep.paper_reference and rep.runs == (gsa.out_dir, scratch.out_dir)
    assert not (tmp_path / "demo").exists()  # a dry run writes nothing


def test_demo_knobs(tmp_path):
    proc = dry_run(tmp_path, VARIANTS="gsa pretrain-only", FINETUNE_FRAMES="4000", K="7", TASK="mw-reach",
                   TRAIN_RATIO="128")
    assert proc.returncode == 0, proc.stderr
    commands = parsed_commands(proc.stdout)
    runs = [a for s, a in commands if s == "finetune_gsa.py"]
    assert [ft.variant_name(a) for a in runs] == ["gsa", "pretrain-only"]
    assert all(a.env_steps == 4000 and a.k == 7 and a.task == "mw-reach" and a.train_ratio == 128 for a in runs)
    rep = commands[-1][1]
    assert not rep.summary  # no from-scratch run to compare with
    proc = dry_run(tmp_path, VARIANTS="gsa nonsense")
    assert proc.returncode == 2 and "unknown variant 'nonsense'" in proc.stderr
