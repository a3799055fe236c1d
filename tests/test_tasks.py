"""Tests of the environment section (task list, pixel envs, custom rewards of the paper's tasks).

The section lives in finetune_gsa.py; until it is pasted there it is the module gsa_tasks.py.
Every custom reward is checked against an independent computation of its formula.
"""
import math

import mujoco
import numpy as np
import pytest
from dm_control.utils import rewards

import finetune_gsa as T  # the task environments live in finetune_gsa.py's environment section

INF = float("inf")


def tol(x, lo, hi, margin, sigmoid="gaussian", value_at_margin=0.1):
    return float(rewards.tolerance(x, bounds=(lo, hi), margin=margin, sigmoid=sigmoid,
                                   value_at_margin=value_at_margin))


def lin(x, lo, hi, margin, value_at_margin):
    return tol(x, lo, hi, margin, sigmoid="linear", value_at_margin=value_at_margin)


# --- task list and errors ----------------------------------------------------------------------------------

def test_task_lists():
    assert len(T.DMC_TASKS) == 22 and len(set(T.DMC_TASKS)) == 22
    assert len(T.MW_TASKS) == 50 and len(set(T.MW_TASKS)) == 50
    assert T.TASK_NAMES == T.DMC_TASKS + tuple("mw-" + n for n in T.MW_TASKS) + tuple(T.STOCK_DMC_TASKS)
    assert len(set(T.TASK_NAMES)) == len(T.TASK_NAMES)
    dims = {"cartpole": 1, "acrobot": 1, "walker": 6, "cheetah": 6, "quadruped": 12, "sawyer": 4}
    for task in T.TASK_NAMES:
        embodiment = T.embodiment_of(task)
        assert embodiment == ("sawyer" if task.startswith("mw-") else task.split("-")[0])
        assert T.task_action_dim(task) == T.STOCK_DMC_TASKS.get(task, dims.get(embodiment))
    assert {T.embodiment_of(t) for t in T.DMC_TASKS + tuple("mw-" + n for n in T.MW_TASKS)} == set(dims)


@pytest.mark.parametrize("call", [lambda: T.make_env("walker-fly", 0), lambda: T.embodiment_of("mw-nope"),
                                  lambda: T.make_env("lqr-lqr-2-1", 0), lambda: T.make_env("ball_in_cup-catch", 0)])
def test_unknown_task_lists_valid_names(call):
    with pytest.raises(SystemExit) as error:
        call()
    message = str(error.value.code)
    assert "unknown task" in message
    assert all(name in message for name in T.TASK_NAMES)


# --- every task builds, resets, steps, renders -------------------------------------------------------------

# One stock task per dm_control domain (and both swimmers, whose widths differ): building one checks the action
# dims (PixelEnv asserts the spec's shape), the camera and the pixels of its body; test_stock_task_names checks
# the rest by name.
STOCK_SAMPLE = ("cartpole-swingup", "pendulum-swingup", "cup-catch", "finger-spin", "point_mass-easy", "reacher-easy",
                "hopper-hop", "fish-swim", "swimmer-swimmer6", "swimmer-swimmer15", "manipulator-bring-ball",
                "stacker-stack-2", "quadruped-fetch", "humanoid-stand", "humanoid_CMU-stand", "dog-stand")


@pytest.mark.parametrize("task", T.DMC_TASKS + tuple("mw-" + n for n in T.MW_TASKS) + STOCK_SAMPLE)
def test_task_builds_and_steps(task):
    env = T.make_env(task, seed=0)
    try:
        assert env.task == task and env.embodiment == T.embodiment_of(task)
        assert env.action_dim == T.task_action_dim(task) and env.is_metaworld == task.startswith("mw-")
        assert env.max_steps == (100 if env.is_metaworld else 500)
        image = env.reset()
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and image.flags.c_contiguous
        assert image.std() > 10  # a real picture, not a blank or garbage buffer
        rng = np.random.default_rng(0)
        for _ in range(2):
            image, reward, done, info = env.step(rng.uniform(-1, 1, env.action_dim).astype(np.float32))
            assert image.shape == (64, 64, 3) and image.dtype == np.uint8
            assert isinstance(reward, float) and math.isfinite(reward)
            assert done is False and isinstance(info["success"], bool)
            if env.is_metaworld:
                assert 0.0 <= reward <= 20.0  # package reward in [0, 10] per frame, 2 frames
            elif not task.endswith("-hard"):
                assert 0.0 <= reward <= 2.0
                assert info["success"] is False
        assert np.array_equal(env.render(), image)  # one render per step, after the last repeated frame
    finally:
        env.close()


def test_dmc_episode_is_1000_frames_and_step_after_end_raises():
    env = T.make_env("cartpole-balance", seed=0)
    env.reset()
    with pytest.raises(ValueError):
        env.step(np.array([np.nan], np.float32))
    dones = [env.step(np.zeros(1, np.float32))[2] for _ in range(env.max_steps)]
    assert dones == [False] * 499 + [True]
    assert env._env.physics.data.time == pytest.approx(10.0)  # 1000 frames of 0.01 s
    with pytest.raises(RuntimeError):
        env.step(np.zeros(1, np.float32))
    env.reset()
    assert env.step(np.zeros(1, np.float32))[2] is False
    env.close()


# --- custom DMC rewards against their formulas -------------------------------------------------------------

def _set_state(env, qpos, qvel):
    physics = env._env.physics
    physics.data.qpos[:] = qpos
    physics.data.qvel[:] = qvel
    physics.forward()
    return physics


def _walker_states(rng, physics):
    states = []
    nq, nv = physics.model.nq, physics.model.nv
    names = physics.named.data.qpos.axes.row.names
    iz, ix, iy = names.index("rootz"), names.index("rootx"), names.index("rooty")
    for rooty, vx in [(0.0, -1.2), (0.0, -7.0), (math.pi, -6.5), (0.3, -0.5), (math.pi * 0.8, -4.0)]:
        qpos, qvel = np.zeros(nq), rng.normal(0, 0.3, nv)
        qpos[iy], qvel[ix] = rooty, vx
        qpos[iz] = rng.uniform(-0.5, 0.2)
        states.append((qpos, qvel))
    for _ in range(5):
        qpos, qvel = rng.uniform(-1, 1, nq), rng.normal(0, 4, nv)
        qpos[iy] = rng.uniform(-math.pi, math.pi)
        states.append((qpos, qvel))
    return states


def _walker_expected(task, physics):
    d = physics.named.data
    vx = d.subtree_linvel["torso"][0]
    if task == "walker-backflip":
        feet = (d.xpos["left_foot", "z"] + d.xpos["right_foot", "z"]) / 2
        thighs = (d.xpos["left_thigh", "z"] + d.xpos["right_thigh", "z"]) / 2
        upside = (3 * tol(feet, 1.1, INF, 0.55) + 2 * tol(thighs, 1.0, INF, 0.5)) / 5
        return upside * (5 * lin(vx, -INF, -6, 3, 0.5) + 1) / 6
    stand = (3 * tol(d.xpos["torso", "z"], 1.2, INF, 0.6) + (1 + d.xmat["torso", "zz"]) / 2) / 4
    speed = 1.0 if task == "walker-walk-backwards" else 8.0
    return stand * (5 * lin(vx, -INF, -speed, speed / 2, 0.5) + 1) / 6


def _cheetah_expected(task, physics):
    d = physics.named.data
    vx = d.subtree_linvel["torso"][0]
    z = {b: d.xpos[b, "z"] for b in ("torso", "ffoot", "bfoot")}
    if task == "cheetah-run-backwards":
        return lin(vx, -INF, -8, 8, 0)
    if task == "cheetah-jump":
        def stand(lifted):
            return (5 * tol((z["torso"] + z[lifted]) / 2, 1.2, INF, 0.6) + lin(vx, -0.5, 0.5, 0.5, 0)) / 6
        return (stand("bfoot") + stand("ffoot")) / 2  # stand-front lifts bfoot, stand-back lifts ffoot
    lifted = "ffoot" if task == "cheetah-run-back" else "bfoot"
    up = (3 * tol(z[lifted], 1.2, INF, 0.6) + 2 * tol(z["torso"], 1.2, INF, 0.6)) / 5
    return up * (5 * lin(vx, 6, INF, 6, 0) + 1) / 6


def _cheetah_states(rng, physics):
    nq, nv = physics.model.nq, physics.model.nv
    names = physics.named.data.qpos.axes.row.names
    iz, ix, iy = names.index("rootz"), names.index("rootx"), names.index("rooty")
    states = []
    for rooty, rootz, vx in [(-1.3, 0.6, 7.0), (1.3, 0.6, 9.0), (-1.0, 0.4, 0.2), (0.0, 0.0, -8.5),
                             (0.9, 0.5, -0.3), (-1.5, 0.8, 3.0)]:
        qpos, qvel = rng.uniform(-0.3, 0.3, nq), rng.normal(0, 0.5, nv)
        qpos[iy], qpos[iz], qvel[ix] = rooty, rootz, vx
        states.append((qpos, qvel))
    for _ in range(4):
        qpos, qvel = rng.uniform(-1, 1, nq), rng.normal(0, 5, nv)
        states.append((qpos, qvel))
    return states


def _quadruped_expected(task, physics):
    model, data = physics.model.ptr, physics.data.ptr
    w, x, y, _ = physics.named.data.qpos["root"][3:7] / np.linalg.norm(physics.named.data.qpos["root"][3:7])
    upright = (1 + (1 - 2 * (x * x + y * y))) / 2  # torso z-axis . world z-axis, from the quaternion
    if task == "quadruped-stand":
        return upright
    if task == "quadruped-jump":
        mass = model.body_mass[1:]
        com_z = float(mass @ data.xipos[1:, 2] / mass.sum())  # whole-body centre of mass
        return upright * lin(com_z, 1.0, INF, 1.0, 0.5)
    velocity = np.zeros(6)
    site = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, "torso")
    mujoco.mj_objectVelocity(model, data, mujoco.mjtObj.mjOBJ_SITE, site, velocity, 1)
    speed = float(np.linalg.norm(velocity[3:]))  # local-frame linear velocity
    target = 0.5 if task == "quadruped-roll" else 5.0
    return upright * lin(speed, target, INF, target, 0.5)


def _quadruped_states(rng, physics):
    nq, nv = physics.model.nq, physics.model.nv
    states = []
    for height, spin in [(0.6, 0.0), (1.2, 0.3), (0.9, 2.0), (2.0, 0.5), (0.4, 1.0)]:
        qpos, qvel = np.zeros(nq), rng.normal(0, 2, nv)
        quat = np.array([1.0, 0, 0, 0]) + spin * rng.normal(0, 1, 4)
        qpos[2], qpos[3:7] = height, quat / np.linalg.norm(quat)
        qpos[7:] = rng.uniform(-0.3, 0.3, nq - 7)
        qvel[:3] = rng.normal(0, 3, 3)
        states.append((qpos, qvel))
    return states


CUSTOM = {
    "walker-walk-backwards": (_walker_states, _walker_expected),
    "walker-run-backwards": (_walker_states, _walker_expected),
    "walker-backflip": (_walker_states, _walker_expected),
    "cheetah-run-backwards": (_cheetah_states, _cheetah_expected),
    "cheetah-jump": (_cheetah_states, _cheetah_expected),
    "cheetah-run-back": (_cheetah_states, _cheetah_expected),
    "cheetah-run-front": (_cheetah_states, _cheetah_expected),
    "quadruped-stand": (_quadruped_states, _quadruped_expected),
    "quadruped-jump": (_quadruped_states, _quadruped_expected),
    "quadruped-roll": (_quadruped_states, _quadruped_expected),
    "quadruped-roll-fast": (_quadruped_states, _quadruped_expected),
}


@pytest.mark.parametrize("task", sorted(CUSTOM))
def test_custom_reward_matches_formula(task):
    make_states, expected = CUSTOM[task]
    env = T.make_env(task, seed=0)
    env.reset()
    got = []
    for qpos, qvel in make_states(np.random.default_rng(1), env._env.physics):
        physics = _set_state(env, qpos, qvel)
        reward = float(env._env.task.get_reward(physics))
        assert reward == pytest.approx(expected(task, physics), rel=1e-9, abs=1e-12)
        got.append(reward)
    assert max(got) > 0.3 and max(got) - min(got) > 0.1  # the states exercise the reward's range
    env.close()


def test_custom_floors_and_episode_lengths():
    for task, floor in [("cheetah-jump", (200.0, 0.0)), ("quadruped-roll", (10.0, None))]:
        env = T.make_env(task, seed=0)
        named = env._env.physics.named.model
        name = "ground" if task.startswith("cheetah") else "floor"
        assert named.geom_size[name][0] == floor[0]
        if floor[1] is not None:
            assert named.geom_pos[name][0] == floor[1]
        assert env._env._step_limit == 1000  # 1000 env frames per episode
        env.close()


def test_quadruped_stand_random_initial_orientation():
    env = T.make_env("quadruped-stand", seed=0)
    quats = []
    for _ in range(3):
        env.reset()
        quats.append(env._env.physics.named.data.qpos["root"][3:7].copy())
    assert min(np.linalg.norm(quats[i] - quats[j]) for i in range(3) for j in range(i)) > 0.1
    env.close()


@pytest.mark.parametrize("task", ["walker-walk-hard", "acrobot-swingup-hard"])
def test_hard_wrapper(task):
    """r' = (r if r >= 0.6 else 0) - 0.1 * ||a||_2 per env frame, action in policy units [-1, 1]."""
    hard, base = T.make_env(task, seed=5), T.make_env(task[: -len("-hard")], seed=5)
    policy_action = np.array([1.5, -0.3, 0.2, 0.0, -2.0, 0.7][: hard.action_dim], np.float32)
    clipped = np.clip(policy_action, -1, 1)  # what the env receives (and what the cost is computed on)
    cost = 0.1 * float(np.linalg.norm(clipped))
    states = [None]
    if task.startswith("walker"):  # also a standing, walking state, so that r >= 0.6 occurs
        physics = hard._env.physics
        qvel = np.zeros(physics.model.nv)
        qvel[physics.named.data.qvel.axes.row.names.index("rootx")] = 1.5
        states.append((np.zeros(physics.model.nq), qvel))
    seen = set()
    for state in states:
        np.testing.assert_array_equal(hard.reset(), base.reset())
        if state is not None:
            _set_state(hard, *state)
            _set_state(base, *state)
        frame_rewards = [base._env.step(clipped.astype(np.float64)).reward for _ in range(2)]
        _, reward, _, _ = hard.step(policy_action)
        assert reward == pytest.approx(sum((r if r >= 0.6 else 0.0) - cost for r in frame_rewards), abs=1e-9)
        seen.update(r >= 0.6 for r in frame_rewards)
    if task.startswith("walker"):
        assert seen == {True, False}  # both branches of the threshold were exercised
    hard.close()
    base.close()


# --- actions, seeding, rendering ---------------------------------------------------------------------------

def test_quadruped_actions_map_to_env_bounds():
    a, b = T.make_env("quadruped-walk", seed=2), T.make_env("quadruped-walk", seed=2)
    spec = a._env.action_spec()
    np.testing.assert_allclose(a._env_action(np.ones(12, np.float32)), spec.maximum)
    np.testing.assert_allclose(a._env_action(-np.ones(12, np.float32)), spec.minimum)
    assert spec.maximum.max() > 1.0  # the trap this mapping exists for
    a.reset()
    b.reset()
    ia, ra, _, _ = a.step(np.full(12, 7.0, np.float32))  # clipped to 1
    ib, rb, _, _ = b.step(np.ones(12, np.float32))
    assert ra == rb and np.array_equal(ia, ib)
    np.testing.assert_allclose(a._env.physics.data.ctrl, spec.maximum)
    a.close()
    b.close()


@pytest.mark.parametrize("task", ["quadruped-stand", "mw-reach"])
def test_seeding_is_deterministic(task):
    a, b, c = T.make_env(task, seed=3), T.make_env(task, seed=3), T.make_env(task, seed=4)
    rng = np.random.default_rng(0)
    first_frames = []
    for _ in range(2):
        frame_a, frame_b = a.reset(), b.reset()  # both alive and rendering in one process
        np.testing.assert_array_equal(frame_a, frame_b)
        first_frames.append(frame_a)
        for _ in range(3):
            action = rng.uniform(-1, 1, a.action_dim).astype(np.float32)
            out_a, out_b = a.step(action), b.step(action)
            np.testing.assert_array_equal(out_a[0], out_b[0])
            assert out_a[1] == out_b[1]
    assert not np.array_equal(first_frames[0], first_frames[1])  # new initial state / goal every reset
    assert not np.array_equal(c.reset(), first_frames[0])  # another seed, another start
    for env in (a, b, c):
        env.close()


def test_envs_render_correctly_side_by_side():
    """Train + eval envs (and DMC beside Meta-World) in one process: no stale or garbage frames."""
    a = T.make_env("mw-reach", seed=0)
    frame_a = a.reset()
    alone = a.render()
    b, c, d = T.make_env("mw-push", seed=0), T.make_env("walker-walk", seed=0), T.make_env("mw-reach", seed=9)
    frame_b, frame_c, frame_d = b.reset(), c.reset(), d.reset()
    b.step(np.ones(4, np.float32))
    c.step(np.ones(6, np.float32))
    np.testing.assert_array_equal(a.render(), alone)
    np.testing.assert_array_equal(frame_a, alone)
    for frame in (frame_b, frame_c, frame_d):
        assert frame.std() > 10 and not np.array_equal(frame, frame_a)
    # The walker frame matches dm_control's own renderer (same camera, same cheap settings).
    np.testing.assert_array_equal(c.render(), c._env.physics.render(64, 64, camera_id=0))
    np.testing.assert_array_equal(a.render(), alone)
    for env in (a, b, c, d):
        env.close()


def test_metaworld_frame_is_upright_and_not_mirrored():
    """Where each small geom shows up in the frame agrees with a pinhole view whose up is the world's up."""
    env = T.make_env("mw-shelf-place", seed=0)
    rgb = env.reset()
    model, data = env._env.model, env._env.data
    env._renderer.enable_segmentation_rendering()
    try:
        segmentation = env.render()  # same pipeline as the RGB frame (camera, flip)
    finally:
        env._renderer.disable_segmentation_rendering()
    np.testing.assert_array_equal(env.render(), rgb)
    camera = model.camera("corner2").id
    position = data.cam_xpos[camera]
    view = -data.cam_xmat[camera].reshape(3, 3)[:, 2]  # a camera looks along its -z axis
    up = np.array([0.0, 0.0, 1.0]) - view[2] * view  # world up, made orthogonal to the view
    up /= np.linalg.norm(up)
    right = np.cross(view, up)
    rows, cols, along_up, along_right = [], [], [], []
    ids = np.where(segmentation[..., 1] == mujoco.mjtObj.mjOBJ_GEOM, segmentation[..., 0], -1)
    for g in np.unique(ids[ids >= 0]):
        r, c = np.nonzero(ids == g)
        if len(r) >= 3 and 0 < model.geom_rbound[g] < 0.25:  # small geoms: their centre says where they are
            offset = data.geom_xpos[g] - position
            rows.append(r.mean()), cols.append(c.mean())
            along_up.append(offset @ up / (offset @ view))
            along_right.append(offset @ right / (offset @ view))
    assert len(rows) >= 8
    assert np.corrcoef(rows, along_up)[0, 1] < -0.7  # world up is up in the frame
    assert np.corrcoef(cols, along_right)[0, 1] > 0.7  # and not mirrored
    env.close()


def test_metaworld_episode_ends_at_100_steps_and_scripted_policy_succeeds():
    from metaworld.policies import ENV_POLICY_MAP

    env = T.make_env("mw-reach", seed=0)
    policy = ENV_POLICY_MAP["reach-v3"]()
    for _ in range(2):
        env.reset()
        assert env._env.curr_path_length == 0  # the package's 500-frame count restarts with every episode
        assert env.state.shape == (39,)
        dones, successes = [], []
        for _ in range(env.max_steps):
            action = np.clip(policy.get_action(env.state), -1, 1).astype(np.float32)
            _, reward, done, info = env.step(action)
            dones.append(done), successes.append(info["success"])
        assert dones == [False] * 99 + [True]
        assert env._env.curr_path_length == 200  # 100 agent steps x action repeat 2
        assert successes[-1] is True
    with pytest.raises(RuntimeError):
        env.step(np.zeros(4, np.float32))
    env.close()


# --- stock dm_control tasks (quick checks beside the paper's): names, rewards, fine-tuning, what is refused ---

def test_stock_task_names_cover_the_suite():
    from dm_control import suite

    alias = {v: k for k, v in T.DMC_DOMAIN_NAMES.items()}
    names = {(alias.get(d, d) + "-" + t.replace("_", "-")): (d, t) for d, t in suite.ALL_TASKS if d != "lqr"}
    assert set(T.STOCK_DMC_TASKS) == set(names) - set(T.DMC_TASKS)  # every stock task not already the paper's
    assert "cup-catch" in T.STOCK_DMC_TASKS and "lqr-lqr-2-1" not in T.TASK_NAMES  # lqr: unbounded actions
    for task in T.STOCK_DMC_TASKS:  # one body, one width, but the two swimmers; STOCK_SAMPLE builds each
        domain = task.split("-")[0]
        sample = next(s for s in STOCK_SAMPLE if s.split("-")[0] == domain and (domain != "swimmer" or s == task))
        assert T.STOCK_DMC_TASKS[task] == T.STOCK_DMC_TASKS[sample], task
        assert not T._is_hard(task) and T._dmc_base_task(task) == task  # reacher-hard is not a `-hard` task


@pytest.mark.parametrize("task", ["reacher-hard", "cup-catch", "finger-turn-hard"])
def test_stock_task_rewards_are_dm_control_s_own(task):
    from dm_control import suite

    domain, name = task.split("-", 1)
    env = T.make_env(task, seed=4)
    stock = suite.load(T.DMC_DOMAIN_NAMES.get(domain, domain), name.replace("-", "_"), task_kwargs={"random": 4})
    assert env.max_steps == 500 and not env.hard
    env.reset()
    stock.reset()
    np.testing.assert_array_equal(env._env.physics.data.qpos, stock.physics.data.qpos)
    rng, total = np.random.default_rng(0), []
    for _ in range(30):
        action = rng.uniform(-1, 1, env.action_dim).astype(np.float32)
        _, reward, _, _ = env.step(action)
        expected = sum(stock.step(action.astype(np.float64)).reward for _ in range(2))
        assert reward == pytest.approx(expected, abs=1e-12)
        total.append(reward)
    env.close()


def test_stock_query_frames_are_the_task_s_resets():
    frames = T.render_reset_frames("cup-catch", 2, 3)
    env = T.make_env("cup-catch", seed=3 + T.QUERY_SEED_OFFSET)
    np.testing.assert_array_equal(frames, np.stack([env.reset() for _ in range(2)]))
    assert frames.std() > 10
    env.close()


@pytest.mark.parametrize("task", ["reacher-easy", "humanoid-stand"])
def test_stock_task_finetunes_from_scratch(task, tmp_path):
    import json

    import torch
    from test_finetune import run_main

    out = tmp_path / "run"
    run_main(task=task, no_pretrain=True, env_steps=80, out_dir=str(out))
    (line,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert line["env_steps"] == 80 and math.isfinite(line["eval_return"]) and line["train_updates"] > 0
    episodes = [json.loads(x) for x in (out / "episodes.jsonl").read_text().splitlines()]
    assert len(episodes) == 2 and all(0.0 <= e["return"] <= 2.0 * e["length"] for e in episodes)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    width = max(12, T.task_action_dim(task))  # humanoid's 21 dims widen the from-scratch model's padding
    assert ckpt["model_config"]["act_dim"] == width and ckpt["task"] == task
    with np.load(out / "replay" / "ep-000001.npz") as z:
        action = z["action"]
    assert action.shape[1] == width and not action[:, T.task_action_dim(task):].any()  # padding stays zero
    assert np.abs(action[1:, :T.task_action_dim(task)]).max() > 0


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from test_finetune import make_artifacts

    return make_artifacts(tmp_path_factory.mktemp("upstream"))  # walker, cheetah and cartpole data


def test_stock_task_with_a_pretrained_model_says_what_it_needs(artifacts, tmp_path):
    import json

    from test_finetune import run_main

    out = tmp_path / "run"
    # No reacher episode to retrieve (and none for acrobot, a paper task): rehearsal and guidance are refused.
    for task in ("reacher-easy", "hopper-hop", "acrobot-swingup"):  # hopper has sawyer's 4 dims; acrobot cartpole's 1
        with pytest.raises(SystemExit, match=rf"holds no {task.split('-')[0]} episode .*--no-rehearsal --no-guidance"
                                             r".*--no-pretrain"):
            run_main(task=task, out_dir=str(out), **artifacts)
        assert not out.exists()
    # Wider than the world model's 12 padded action dims: only from scratch.
    with pytest.raises(SystemExit, match=r"humanoid-stand has 21 action dims, more than the 12 .*--no-pretrain"):
        run_main(task="humanoid-stand", no_rehearsal=True, no_guidance=True, out_dir=str(out), **artifacts)
    assert not out.exists()
    # A body the model has not seen, fine-tuned naively (no retrieval): allowed.
    run_main(task="reacher-easy", no_rehearsal=True, no_guidance=True, env_steps=80, out_dir=str(out),
             checkpoint=artifacts["checkpoint"], index_dir="/nonexistent", data_dir="/nonexistent")
    (line,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert line["env_steps"] == 80 and line["train_updates"] > 0
    # cartpole-swingup is stock but its body is in the data: GSA retrieves cartpole episodes.
    run_main(task="cartpole-swingup", env_steps=40, guidance_frames=40, out_dir=str(tmp_path / "gsa"), **artifacts)
    summary = json.loads((tmp_path / "gsa" / "retrieval.json").read_text())
    assert summary["by_embodiment"] == {"cartpole": 2} and summary["action_dim"] == 1
