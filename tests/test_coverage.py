"""Tests of results/coverage/coverage.py: a tiny walker collection is replayed from its manifest seeds (the
replayed states render to the stored frames, first frames included), the JSON's fields exist and are in range,
and a tampered episode is caught by the pixel check."""
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import collect_offline as co

ROOT = Path(__file__).resolve().parents[1]


def load_coverage():
    spec = importlib.util.spec_from_file_location("coverage_script", ROOT / "results/coverage/coverage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cov = load_coverage()


@pytest.fixture(scope="module")
def walker_data(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("walker")
    co.main(co.Args(out_dir=str(out), embodiments="walker", episodes_per_embodiment=2, explorer_steps=300,
                    explorer_stages=2, num_workers=1))
    return out


def test_replay_reproduces_frames_and_json_is_in_range(walker_data, tmp_path):
    result = cov.main(cov.Args(data_dir=str(walker_data), out=str(tmp_path / "cov"), verify_every=250))
    check = result["replay_check"]
    assert check["frames_compared"] == 2 * 3  # steps 0, 250, 500 of each episode
    assert check["frames_identical"] == check["frames_compared"] and check["max_abs_pixel_diff"] == 0
    for ep in result["episodes"]:
        assert ep["replay_checked_steps"] == [0, 250, 500] and ep["replay_max_abs_pixel_diff"] == 0
    written = json.loads((tmp_path / "cov/coverage.json").read_text())
    assert written["groups"] == json.loads(json.dumps(result["groups"]))
    assert (tmp_path / "cov/coverage.png").stat().st_size > 0
    groups = written["groups"]
    assert "reference/uniform-random" in groups and "data/all" in groups
    assert groups["reference/uniform-random"]["episodes"] == groups["data/all"]["episodes"] == 2
    assert written["thresholds"]["stand_height"] == 1.2 and written["thresholds"]["run_speed"] == 8
    for name, g in groups.items():
        assert g["steps"] == 500 * g["episodes"]
        fracs = {k: v for k, v in g.items() if k.startswith("frac_")}
        assert len(fracs) >= 10 and all(0.0 <= v <= 1.0 for v in fracs.values()), name
        assert g[f"frac_height_above_1.2"] <= g[f"frac_height_above_1.0"]
        assert -0.5 < g["height"]["min"] <= g["height"]["p50"] <= g["height"]["max"] < 2.5
        assert g["abs_vx"]["min"] >= 0 and abs(g["vx"]["mean"]) < 10
        assert -1 <= g["upright"]["min"] <= g["upright"]["max"] <= 1
        assert 0 <= g["stand_reward_mean"] <= 1 and 0 <= g["walk_reward_mean"] <= g["stand_reward_mean"]
    # The walker starts standing (torso at 1.3 m) and random actions let it fall: its first state is high.
    ref = groups["reference/uniform-random"]
    assert ref["height"]["max"] > 1.2 and ref["height"]["p50"] < 1.0


def test_tampered_actions_fail_the_pixel_check(walker_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(walker_data, data)
    path = data / "walker/walker-000000.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["action"][1:] = -arrays["action"][1:]
    np.savez_compressed(path, **arrays)
    result = cov.main(cov.Args(data_dir=str(data), out=str(tmp_path / "cov"), random_episodes=0, verify_every=250))
    first, second = result["episodes"]
    assert first["replay_max_abs_pixel_diff"] > 0 and second["replay_max_abs_pixel_diff"] == 0
    assert "reference/uniform-random" not in result["groups"]


def test_other_embodiments_are_refused(walker_data, tmp_path):
    with pytest.raises(SystemExit, match="only walker"):
        cov.main(cov.Args(data_dir=str(walker_data), embodiment="cheetah", out=str(tmp_path / "cov")))
    assert not (tmp_path / "cov").exists()
