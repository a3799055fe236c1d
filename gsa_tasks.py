"""Environments and tasks for GSA fine-tuning (DESIGN.md §2, TASKS.md): pixel envs behind a small interface.

TEMPORARY module: its body is the environment section of finetune_gsa.py (pasted there by the lead), so it
imports only the standard library, numpy, mujoco, dm_control, metaworld and gymnasium. Rendering needs
`MUJOCO_GL` set before mujoco/dm_control are imported (the script sets it at its top; so does this module).

    env = make_env("walker-walk", seed=0)          # 64x64 RGB pixels, action repeat 2, actions in [-1, 1]
    image = env.reset()                            # uint8 [64, 64, 3]
    image, reward, done, info = env.step(action)   # reward summed over the repeated env frames
"""
import atexit
import os
import weakref

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; a user's own choice wins

import numpy as np
import mujoco
from dm_control import suite
from dm_control.rl import control
from dm_control.suite import cheetah, common, quadruped, walker
from dm_control.utils import rewards
from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE

# ----------------------------------------------------------------------------------------------------------
# Environments and tasks (DESIGN.md §2; every reward from TASKS.md)
# ----------------------------------------------------------------------------------------------------------

# The 22 DMControl tasks of the paper, in DESIGN.md §2 order.
DMC_TASKS = (
    "cartpole-balance",
    "acrobot-swingup", "acrobot-swingup-sparse", "acrobot-swingup-hard",
    "walker-stand", "walker-walk", "walker-run", "walker-backflip", "walker-walk-backwards",
    "walker-walk-hard", "walker-run-backwards",
    "cheetah-run", "cheetah-run-front", "cheetah-run-back", "cheetah-run-backwards", "cheetah-jump",
    "quadruped-walk", "quadruped-stand", "quadruped-run", "quadruped-jump", "quadruped-roll",
    "quadruped-roll-fast",
)
# The 50 Meta-World v3 tasks (names without "-v3"); the agent-facing task name is "mw-<name>".
MW_TASKS = (
    "assembly", "basketball", "bin-picking", "box-close", "button-press", "button-press-topdown",
    "button-press-topdown-wall", "button-press-wall", "coffee-button", "coffee-pull", "coffee-push",
    "dial-turn", "disassemble", "door-close", "door-lock", "door-open", "door-unlock", "drawer-close",
    "drawer-open", "faucet-open", "faucet-close", "hammer", "hand-insert", "handle-press-side",
    "handle-press", "handle-pull-side", "handle-pull", "lever-pull", "peg-insert-side", "peg-unplug-side",
    "pick-out-of-hole", "pick-place-wall", "pick-place", "plate-slide-back-side", "plate-slide-back",
    "plate-slide-side", "plate-slide", "push-back", "push-wall", "push", "reach", "reach-wall",
    "shelf-place", "soccer", "stick-push", "stick-pull", "sweep-into", "sweep", "window-close",
    "window-open",
)
TASK_NAMES = DMC_TASKS + tuple(f"mw-{name}" for name in MW_TASKS)
_ENV_ACTION_DIMS = {"cartpole": 1, "acrobot": 1, "walker": 6, "cheetah": 6, "quadruped": 12, "sawyer": 4}

DMC_EPISODE_FRAMES = 1000  # env frames per DMControl episode (500 agent steps at action repeat 2)
MW_EPISODE_FRAMES = 200  # env frames per Meta-World episode (100 agent steps); the package allows 500
MW_CAMERA = "corner2"
MW_CAMERA_POS = (0.75, 0.075, 0.7)  # corner2 moved closer, as in the authors' release
HARD_THRESHOLD = 0.6  # `-hard` tasks: a per-frame reward below this becomes 0 ...
HARD_ACTION_COST = 0.1  # ... and this times ||action||_2 is subtracted (action in policy units [-1, 1])

_INF = float("inf")


def _check_task(task: str) -> None:
    if task not in TASK_NAMES:
        raise SystemExit(f"unknown task {task!r}; valid tasks: {', '.join(TASK_NAMES)}")


def embodiment_of(task: str) -> str:
    """Embodiment name of a task ("walker-run" -> "walker", "mw-reach" -> "sawyer"); builds nothing."""
    _check_task(task)
    return "sawyer" if task.startswith("mw-") else task.split("-")[0]


def action_dim_of(task: str) -> int:
    """Action dimension of a task's embodiment; builds nothing."""
    return _ENV_ACTION_DIMS[embodiment_of(task)]


# --- Custom DMControl tasks (TD-MPC2 walker/cheetah, URLB quadruped), rewards per TASKS.md ---------------

def _z(physics, body: str) -> float:
    """World height of a body's frame origin."""
    return float(physics.named.data.xpos[body, "z"])


def _upright_walker_stand(physics) -> float:
    """Stock walker stand term: torso high (>= 1.2 m) and upright."""
    standing = rewards.tolerance(physics.torso_height(), bounds=(1.2, _INF), margin=0.6)
    upright = (1.0 + physics.torso_upright()) / 2.0
    return (3.0 * standing + upright) / 4.0


class WalkerBackwards(walker.PlanarWalker):
    """walker-walk-backwards (speed 1, margin 0.5) and walker-run-backwards (speed 8, margin 4)."""

    def get_reward(self, physics):
        move = rewards.tolerance(physics.horizontal_velocity(), bounds=(-_INF, -self._move_speed),
                                 margin=self._move_speed / 2, value_at_margin=0.5, sigmoid="linear")
        return _upright_walker_stand(physics) * (5.0 * move + 1.0) / 6.0


class WalkerBackflip(walker.PlanarWalker):
    """walker-backflip: feet and thighs high (upside down) while moving backwards at >= 6 m/s."""

    def __init__(self, random=None):
        super().__init__(move_speed=6, random=random)

    def get_reward(self, physics):
        feet_z = (_z(physics, "left_foot") + _z(physics, "right_foot")) / 2.0
        thigh_z = (_z(physics, "left_thigh") + _z(physics, "right_thigh")) / 2.0
        upside = (3.0 * rewards.tolerance(feet_z, bounds=(1.1, _INF), margin=0.55)
                  + 2.0 * rewards.tolerance(thigh_z, bounds=(1.0, _INF), margin=0.5)) / 5.0
        move = rewards.tolerance(physics.horizontal_velocity(), bounds=(-_INF, -6.0), margin=3.0,
                                 value_at_margin=0.5, sigmoid="linear")
        return upside * (5.0 * move + 1.0) / 6.0


class CheetahRunBackwards(cheetah.Cheetah):
    """cheetah-run-backwards: run at <= -8 m/s."""

    def get_reward(self, physics):
        return rewards.tolerance(physics.speed(), bounds=(-_INF, -8.0), margin=8.0, value_at_margin=0,
                                 sigmoid="linear")


def _cheetah_stand(physics, lifted_foot: str) -> float:
    """Stand on one leg pair: mean height of torso and lifted foot >= 1.2 m, nearly still."""
    mean_z = (_z(physics, "torso") + _z(physics, lifted_foot)) / 2.0
    height = rewards.tolerance(mean_z, bounds=(1.2, _INF), margin=0.6)
    still = rewards.tolerance(physics.speed(), bounds=(-0.5, 0.5), margin=0.5, value_at_margin=0,
                              sigmoid="linear")
    return (5.0 * height + still) / 6.0


class CheetahJump(cheetah.Cheetah):
    """cheetah-jump: mean of stand-front (back foot lifted) and stand-back (front foot lifted)."""

    def get_reward(self, physics):
        return (_cheetah_stand(physics, "bfoot") + _cheetah_stand(physics, "ffoot")) / 2.0


class CheetahRunOneEnd(cheetah.Cheetah):
    """cheetah-run-back (lifted_foot="ffoot": runs on its back legs) and cheetah-run-front ("bfoot")."""

    def __init__(self, lifted_foot: str, random=None):
        self._lifted_foot = lifted_foot
        super().__init__(random=random)

    def get_reward(self, physics):
        up = (3.0 * rewards.tolerance(_z(physics, self._lifted_foot), bounds=(1.2, _INF), margin=0.6)
              + 2.0 * rewards.tolerance(_z(physics, "torso"), bounds=(1.2, _INF), margin=0.6)) / 5.0
        run = rewards.tolerance(physics.speed(), bounds=(6.0, _INF), margin=6.0, value_at_margin=0,
                                sigmoid="linear")
        return up * (5.0 * run + 1.0) / 6.0


def _quadruped_upright(physics) -> float:
    """(1 + zz) / 2 of the torso: 1 upright, 0 upside down."""
    return rewards.tolerance(physics.torso_upright(), bounds=(1.0, _INF), margin=2.0, value_at_margin=0,
                             sigmoid="linear")


class QuadrupedStand(quadruped.Move):
    """quadruped-stand (URLB): be upright. Move's reset gives the random initial orientation."""

    def __init__(self, random=None):
        super().__init__(desired_speed=0, random=random)

    def get_reward(self, physics):
        return _quadruped_upright(physics)


class QuadrupedJump(quadruped.Move):
    """quadruped-jump (URLB): upright with the whole-body centre of mass >= 1 m high."""

    def __init__(self, random=None):
        super().__init__(desired_speed=0, random=random)

    def get_reward(self, physics):
        com_z = physics.named.data.sensordata["center_of_mass"][2]  # subtreecom of the torso (root) body
        jump = rewards.tolerance(com_z, bounds=(1.0, _INF), margin=1.0, value_at_margin=0.5, sigmoid="linear")
        return _quadruped_upright(physics) * jump


class QuadrupedRoll(quadruped.Move):
    """quadruped-roll (speed 0.5) / roll-fast (speed 5) (URLB): upright, any 3-D torso speed."""

    def get_reward(self, physics):
        speed = np.linalg.norm(physics.torso_velocity())
        move = rewards.tolerance(speed, bounds=(self._desired_speed, _INF), margin=self._desired_speed,
                                 value_at_margin=0.5, sigmoid="linear")
        return _quadruped_upright(physics) * move


def _walker_env(task):
    physics = walker.Physics.from_xml_string(*walker.get_model_and_assets())
    return control.Environment(physics, task, time_limit=25, control_timestep=0.025)  # 1000 frames


def _cheetah_env(task):
    xml, assets = cheetah.get_model_and_assets()
    stock_floor = b'pos="98 0 0" size="100 .8 .5"'
    xml = xml if isinstance(xml, bytes) else xml.encode()
    if stock_floor not in xml:
        raise RuntimeError("dm_control's cheetah.xml is not the expected one; cannot lengthen its floor")
    # Floor twice as long (half-length 200) and centred, so running backwards stays on it.
    xml = xml.replace(stock_floor, b'pos="0 0 0" size="200 .8 .5"')
    physics = cheetah.Physics.from_xml_string(xml, assets)
    return control.Environment(physics, task, time_limit=10)  # timestep 0.01 -> 1000 frames


def _quadruped_env(task):
    xml = quadruped.make_model(floor_size=10)  # URLB: 10 x 10 floor
    physics = quadruped.Physics.from_xml_string(xml, common.ASSETS)
    return control.Environment(physics, task, time_limit=20, control_timestep=0.02)  # 1000 frames


# task name -> builder(seed) of a dm_control Environment. Stock tasks load through suite.load.
_CUSTOM_DMC = {
    "walker-walk-backwards": lambda s: _walker_env(WalkerBackwards(move_speed=1, random=s)),
    "walker-run-backwards": lambda s: _walker_env(WalkerBackwards(move_speed=8, random=s)),
    "walker-backflip": lambda s: _walker_env(WalkerBackflip(random=s)),
    "cheetah-run-backwards": lambda s: _cheetah_env(CheetahRunBackwards(random=s)),
    "cheetah-jump": lambda s: _cheetah_env(CheetahJump(random=s)),
    "cheetah-run-back": lambda s: _cheetah_env(CheetahRunOneEnd("ffoot", random=s)),
    "cheetah-run-front": lambda s: _cheetah_env(CheetahRunOneEnd("bfoot", random=s)),
    "quadruped-stand": lambda s: _quadruped_env(QuadrupedStand(random=s)),
    "quadruped-jump": lambda s: _quadruped_env(QuadrupedJump(random=s)),
    "quadruped-roll": lambda s: _quadruped_env(QuadrupedRoll(desired_speed=0.5, random=s)),
    "quadruped-roll-fast": lambda s: _quadruped_env(QuadrupedRoll(desired_speed=5, random=s)),
}


def _dmc_base_task(task: str) -> str:
    return task[: -len("-hard")] if task.endswith("-hard") else task


def _make_dmc(task: str, seed: int) -> control.Environment:
    base = _dmc_base_task(task)
    if base in _CUSTOM_DMC:
        return _CUSTOM_DMC[base](seed)
    domain, name = base.split("-", 1)
    return suite.load(domain, name.replace("-", "_"), task_kwargs={"random": seed})


def hard_reward(reward: float, action: np.ndarray) -> float:
    """`-hard` tasks (DESIGN §2): sparse reward minus an action cost, per env frame; action in [-1, 1]."""
    return (reward if reward >= HARD_THRESHOLD else 0.0) - HARD_ACTION_COST * float(np.linalg.norm(action))


_OPEN_ENVS = weakref.WeakSet()  # envs whose GL renderer is still open


def _close_open_envs() -> None:
    # Free GL contexts at exit before EGL shuts its display down (and before interpreter teardown);
    # otherwise every open renderer prints EGL errors when garbage-collected.
    for env in list(_OPEN_ENVS):
        env.close()


def _cheap_rendering(model: mujoco.MjModel, image_size: int) -> None:
    """No anti-aliasing and no shadows (SETUP.md: 4-9 ms instead of 22-32 ms per DMC frame)."""
    model.vis.quality.offsamples = 0
    model.light_castshadow[:] = 0
    model.vis.global_.offwidth = max(image_size, 1)
    model.vis.global_.offheight = max(image_size, 1)


class PixelEnv:
    """One task as 64x64 RGB pixels with action repeat; actions in [-1, 1]^action_dim.

    Rendering goes through a per-env `mujoco.Renderer`, which makes its own GL context current on every
    call, so several envs (train + eval, DMC beside Meta-World) render correctly in one process
    (SETUP.md traps 1 and 2).
    """

    def __init__(self, task: str, seed: int, image_size: int = 64, action_repeat: int = 2):
        self.task = task
        self.embodiment = embodiment_of(task)
        self.action_dim = _ENV_ACTION_DIMS[self.embodiment]
        self.is_metaworld = self.embodiment == "sawyer"
        self.image_size = image_size
        self.action_repeat = action_repeat
        self.hard = task.endswith("-hard")
        frames = MW_EPISODE_FRAMES if self.is_metaworld else DMC_EPISODE_FRAMES
        if frames % action_repeat:
            raise ValueError(f"action_repeat {action_repeat} does not divide {frames} frames per episode")
        self.max_steps = frames // action_repeat
        if self.is_metaworld:
            name = f"{task[len('mw-'):]}-v3-goal-observable"
            env = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[name](seed=seed)  # seeds env.np_random
            env._freeze_rand_vec = False  # a new random goal at every reset
            env.seeded_rand_vec = True  # ... drawn from the env's seeded generator, not global np.random
            model, self._data = env.model, env.data
            model.cam_pos[model.camera(MW_CAMERA).id] = MW_CAMERA_POS
            self._camera = MW_CAMERA
            self._low, self._high = env.action_space.low, env.action_space.high
        else:
            env = _make_dmc(task, seed)
            model, self._data = env.physics.model.ptr, env.physics.data.ptr
            self._camera = 2 if self.embodiment == "quadruped" else 0
            spec = env.action_spec()
            self._low, self._high = spec.minimum, spec.maximum
        assert self._low.shape == (self.action_dim,), (task, self._low.shape)
        self._identity_bounds = bool(np.all(self._low == -1.0) and np.all(self._high == 1.0))
        self._env = env
        _cheap_rendering(model, image_size)
        self._renderer = mujoco.Renderer(model, height=image_size, width=image_size)
        # Registered after the renderer's GL backend set up its own exit hook, so (LIFO) ours runs first.
        atexit.unregister(_close_open_envs)
        atexit.register(_close_open_envs)
        _OPEN_ENVS.add(self)
        self._t = None  # agent steps taken in the current episode; None before the first reset
        self.state = None  # latest low-dim observation (never given to the agent; for scripted policies)

    def _env_action(self, action: np.ndarray) -> np.ndarray:
        """Policy action in [-1, 1] -> the env's bounds (quadruped's are not [-1, 1], SETUP.md trap 6)."""
        if self._identity_bounds:
            return action.astype(np.float64)
        return self._low + (action.astype(np.float64) + 1.0) * 0.5 * (self._high - self._low)

    def render(self) -> np.ndarray:
        """The current frame, uint8 [image_size, image_size, 3], C-contiguous."""
        self._renderer.update_scene(self._data, camera=self._camera)
        image = self._renderer.render()
        if self.is_metaworld:
            image = image[::-1, ::-1]  # corner2 is upside down in metaworld 3.1.1 (SETUP.md trap 4)
        return np.ascontiguousarray(image)

    def _set_state(self, observation) -> None:
        if self.is_metaworld:
            self.state = np.asarray(observation, dtype=np.float64)
        else:
            self.state = np.concatenate([np.ravel(v) for v in observation.values()]).astype(np.float64)

    def reset(self) -> np.ndarray:
        """Start an episode (Meta-World: a new random goal) and return its first frame."""
        if self.is_metaworld:
            observation, _ = self._env.reset()
        else:
            observation = self._env.reset().observation
        self._set_state(observation)
        self._t = 0
        return self.render()

    def step(self, action):
        """Apply one action for `action_repeat` env frames -> (image, summed reward, done, {"success"})."""
        if self._t is None or self._t >= self.max_steps:
            raise RuntimeError(f"{self.task}: step() called before reset() or after the episode ended")
        action = np.asarray(action, dtype=np.float32).reshape(self.action_dim)
        if not np.all(np.isfinite(action)):
            raise ValueError(f"{self.task}: non-finite action {action}")
        action = np.clip(action, -1.0, 1.0)
        env_action = self._env_action(action)
        total, success, env_done = 0.0, False, False
        for _ in range(self.action_repeat):
            if self.is_metaworld:
                observation, reward, _, _, env_info = self._env.step(env_action)
                success = bool(env_info["success"])
            else:
                time_step = self._env.step(env_action)
                observation, reward, env_done = time_step.observation, time_step.reward, time_step.last()
                reward = 0.0 if reward is None else float(reward)
                if self.hard:
                    reward = hard_reward(reward, action)
            total += float(reward)
            if env_done:
                break
        self._set_state(observation)
        self._t += 1
        done = self._t >= self.max_steps or env_done
        if done:
            self._t = self.max_steps
        return self.render(), total, done, {"success": success}

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
            if self.is_metaworld:
                self._env.close()
        _OPEN_ENVS.discard(self)


def make_env(task: str, seed: int, image_size: int = 64, action_repeat: int = 2) -> PixelEnv:
    """Build a task's pixel env; unknown task names exit with the list of valid ones."""
    _check_task(task)
    return PixelEnv(task, seed, image_size=image_size, action_repeat=action_repeat)
