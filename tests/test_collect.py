"""Tests of collect_offline.py: on-disk format, manifest, resume determinism, reward-freeness, scripted experts,
sharding and clear errors. Tiny settings throughout (one episode per embodiment, a few hundred explorer steps)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import collect_offline as co

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high")
TINY = dict(embodiments="cartpole,sawyer", episodes_per_embodiment=1, mw_tasks="reach", explorer_steps=300,
            explorer_stages=2, num_workers=1, random_fraction=0.0)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("data")
    args = co.Args(out_dir=str(out), **TINY)
    co.main(args)
    return out, args


def test_episode_files_have_the_contract_format(collection):
    out, _ = collection
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["image_size"] == 64 and manifest["action_repeat"] == 2
    assert manifest["max_action_dim"] == 12 and manifest["action_dims"] == co.ACTION_DIMS
    rows = manifest["episodes"]
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows) == [
        "cartpole/cartpole-000000.npz", "sawyer/reach-000000.npz"]
    for row in rows:
        assert set(row) == {"path", "embodiment", "task", "length", "policy", "noise_scale", "seed", "sha256"}
        assert row["sha256"] == sha(out / row["path"])
        T, A = row["length"], co.ACTION_DIMS[row["embodiment"]]
        assert T == (100 if row["embodiment"] == "sawyer" else 500)
        with np.load(out / row["path"], allow_pickle=False) as z:
            assert sorted(z.files) == ["action", "image", "is_first"]  # no reward, ever
            image, action, is_first = z["image"], z["action"], z["is_first"]
        assert image.shape == (T + 1, 64, 64, 3) and image.dtype == np.uint8
        assert action.shape == (T + 1, A) and action.dtype == np.float32
        assert is_first.shape == (T + 1,) and is_first.dtype == bool and is_first[0] and not is_first[1:].any()
        assert (action[0] == 0).all() and np.abs(action).max() <= 1.0 and np.abs(action[1:]).max() > 0
        assert image[1:].std() > 1 and (image[0] != image[-1]).any()  # real, changing frames
    assert rows[0]["task"] == "swingup" and rows[0]["policy"].startswith("explore-rnd-stage")
    assert rows[1]["task"] == "reach" and rows[1]["policy"] == "scripted"
    assert (out / "contact_sheet.png").stat().st_size > 0
    assert json.loads((out / "args.json").read_text())["seed"] == 0
    assert "reward" not in (out / "manifest.json").read_text()


def test_resume_after_kill_gives_identical_bytes(collection, tmp_path):
    out, args = collection
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    # Simulate a run killed at various points: a lost episode (npz + row), a row-less episode, a torn
    # temporary file, a truncated episode, no manifest, and no explorer snapshots (retrained identically).
    (resumed / "cartpole/cartpole-000000.npz").unlink()
    (resumed / "cartpole/cartpole-000000.json").unlink()
    (resumed / "sawyer/reach-000000.json").unlink()
    (resumed / "sawyer/reach-000000.npz.tmp-999").write_bytes(b"partial")
    (resumed / "manifest.json").unlink()
    shutil.rmtree(resumed / "_explorer")
    co.main(replace(args, out_dir=str(resumed)))
    a = json.loads((out / "manifest.json").read_text())["episodes"]
    b = json.loads((resumed / "manifest.json").read_text())["episodes"]
    assert a == b
    # The manifest's bytes (its sha256 is what later stages record) do not depend on how it was run.
    co.main(replace(args, out_dir=str(resumed), num_workers=args.num_workers + 1))
    assert sha(resumed / "manifest.json") == sha(out / "manifest.json")
    for row in b:
        assert sha(resumed / row["path"]) == row["sha256"]
    # A truncated episode file is detected by its sha256 and redone.
    victim = resumed / "cartpole/cartpole-000000.npz"
    victim.write_bytes(victim.read_bytes()[:1000])
    co.main(replace(args, out_dir=str(resumed)))
    assert sha(victim) == a[0]["sha256"]


def test_spawn_workers_give_the_same_bytes(collection, tmp_path):
    out, args = collection
    other = tmp_path / "pool"
    other.mkdir()
    shutil.copytree(out / "_explorer", other / "_explorer")  # cached snapshots: no retraining here
    co.main(replace(args, out_dir=str(other), embodiments="cartpole", num_workers=2))
    assert sha(other / "cartpole/cartpole-000000.npz") == sha(out / "cartpole/cartpole-000000.npz")


def test_explorer_and_dmc_collection_never_touch_the_task_reward(monkeypatch, tmp_path):
    from dm_control.rl import control

    torch.set_num_threads(1)
    env = co.RewardFreeDMC("cartpole")

    def poisoned(*_, **__):
        raise AssertionError("the task reward was read")

    monkeypatch.setattr(type(env.task), "get_reward", poisoned)
    monkeypatch.setattr(control.Environment, "step", poisoned)  # the reward-computing step is never used
    assert isinstance(env.reset(0), np.ndarray) and isinstance(env.step(np.zeros(1)), np.ndarray)
    snaps = co.train_explorer(env, 120, 1, seed=0)
    assert len(snaps) == 1
    spec = {"path": "x", "embodiment": "cartpole", "task": "swingup", "length": 5, "policy": "random",
            "noise_scale": None, "seed": 3}
    co._CACHE["cartpole"] = env
    try:
        ep = co.rollout(spec, tmp_path)
    finally:
        co._CACHE.pop("cartpole")
    assert set(ep) >= {"image", "action", "is_first"} and "reward" not in ep


@pytest.mark.parametrize("task", ["reach", "button-press", "drawer-open"])
def test_noise_free_scripted_expert_succeeds(task, tmp_path):
    spec = {"path": "x", "embodiment": "sawyer", "task": task, "length": 100, "policy": "scripted",
            "noise_scale": 0.0, "seed": 7}
    ep = co.rollout(spec, tmp_path)
    assert any(ep["successes"]), f"{task}: scripted expert never succeeded in 100 agent steps"


def test_plan_is_deterministic_and_shards_partition_it():
    args = co.Args(embodiments="all", episodes_per_embodiment=3, mw_episodes_per_task=2)
    full = co.plan_all(args)
    assert len(full) == 5 * 3 + 50 * 2 and len({s["path"] for s in full}) == len(full)
    shards = [co.plan_all(replace(args, shard=f"{k}/3")) for k in (1, 2, 3)]
    assert sorted(s["path"] for sh in shards for s in sh) == sorted(s["path"] for s in full)
    assert all(len(sh) > 0 for sh in shards)
    # An episode's spec depends on (seed, embodiment, task, index) only, not on how many are collected.
    more = co.plan_all(replace(args, episodes_per_embodiment=5, mw_episodes_per_task=4))
    by_path = {s["path"]: s for s in more}
    assert all(by_path[s["path"]] == s for s in full)
    assert co.plan_all(replace(args, seed=1))[0]["seed"] != full[0]["seed"]
    policies = {s["policy"] for s in co.plan_all(replace(args, episodes_per_embodiment=40))}
    assert "random" in policies and "scripted" in policies and "explore-rnd-stage4" in policies


@pytest.mark.parametrize("change, message", [
    (dict(embodiments="walker,spider"), "unknown embodiment 'spider'"),
    (dict(mw_tasks="reach,fly"), "unknown Meta-World task 'fly'"),
    (dict(shard="3/2"), "--shard"),
    (dict(shard="one/2"), "--shard"),
    (dict(episodes_per_embodiment=0), "must be positive"),
    (dict(mw_episodes_per_task=-1), "must be positive"),
    (dict(num_workers=0), "must be positive"),
    (dict(random_fraction=1.5), "--random-fraction"),
])
def test_bad_arguments_fail_clearly_and_write_nothing(change, message, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(SystemExit, match=f"collect_offline.py: error: .*{message}"):
        co.main(co.Args(out_dir=str(out), **change))
    assert not out.exists()


def test_rerun_with_other_content_settings_is_refused(collection):
    out, args = collection
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(SystemExit, match="different seed"):
        co.main(replace(args, seed=5))
    assert (out / "manifest.json").read_bytes() == before


def test_command_line_error_exit_code(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "collect_offline.py"), "--out-dir", str(out),
                           "--embodiments", "spider"], capture_output=True, text=True,
                          env=dict(os.environ, MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl")))
    assert proc.returncode != 0
    assert "collect_offline.py: error: unknown embodiment 'spider'" in proc.stderr
    assert not out.exists()


def test_every_flag_is_used():
    import inspect
    from dataclasses import fields

    body = inspect.getsource(co).split("\nFORMAT_VERSION = ")[1]  # everything after the Args class
    for f in fields(co.Args):
        assert f"args.{f.name}" in body, f"--{f.name.replace('_', '-')} does nothing"


def test_numpy_actor_matches_torch_actor():
    torch.manual_seed(0)
    actor = co.Actor(24, 6)
    obs = np.random.default_rng(0).normal(size=(5, 24)).astype(np.float32) * 3
    with torch.no_grad():
        expected = actor(torch.as_tensor(obs)).numpy()
    fast = co.NumpyActor(actor)
    np.testing.assert_allclose(np.stack([fast(o.astype(np.float64)) for o in obs]), expected, atol=1e-5)
