"""Tests of results/imagination_probe.py on a real tiny fine-tuning run: the windows it scores are the policy's
own episodes, its "real" column is the reward those episodes earned, every column is finite, a seed fixes the
imagined samples, and a directory that is not a run is refused by name."""
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import finetune_gsa as ft

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("imagination_probe", ROOT / "results/imagination_probe.py")
probe_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe_script)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("probe") / "run"
    ft.main(ft.Args(task="cartpole-balance", no_pretrain=True, size="tiny", env_steps=240, max_episode_steps=20,
                    out_dir=str(out), video=False))
    return out


def test_probe_scores_the_policys_own_episodes(run_dir):
    args = probe_script.Args(runs=[str(run_dir)], episodes=3, starts=[2, 6], horizon=4, samples=4)
    result = probe_script.probe(run_dir, args)
    rows = [json.loads(line) for line in (run_dir / "episodes.jsonl").read_text().splitlines()]
    alone = [r for r in rows if not r["warmup"] and r["prior_steps"] == 0][-3:]
    assert len(alone) == 3 and result["episodes"] == 3 and result["windows"] == 6
    real = [ft.load_episode(ft.replay_path(run_dir, r["episode"]))["reward"][t0 + 1:t0 + 5].mean()
            for r in alone for t0 in (2, 6)]
    assert result["real"] == pytest.approx(float(np.mean(real)))
    for kind in ("recorded", "actor", "mode", "random", "zero"):
        assert math.isfinite(result[kind]), kind
    assert probe_script.probe(run_dir, args) == result  # seeded
    other = probe_script.probe(run_dir, probe_script.Args(**{**vars(args), "seed": 1}))
    assert other["real"] == result["real"] and other["actor"] != result["actor"]  # only the samples change


def test_probe_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(SystemExit, match="not a finetune_gsa.py run"):
        probe_script.probe(tmp_path, probe_script.Args(runs=[str(tmp_path)]))
