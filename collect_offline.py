"""Collect the non-curated offline dataset: reward-free, mixed-quality, multi-embodiment pixel episodes (GSA Sec. 3.1).

Non-curated means the three things of the paper's Sec. 3.1 (its data: Sec. 4, "Dataset"):
1. Reward-free: no reward is stored anywhere. DMControl physics is stepped through `RewardFreeDMC`, which never
   calls the task's reward function; the exploration agent learns from an intrinsic (RND) reward only.
2. Mixed quality: Meta-World episodes come from the package's scripted experts with per-episode Gaussian
   action noise whose scale is drawn from [--mw-noise-min, --mw-noise-max] (near-expert to near-random);
   DMControl episodes come from snapshots of a task-agnostic exploration agent taken at several stages of its
   training (DDPG with clipped double Q on proprioceptive state, reward = RND novelty only; the paper's come
   from curiosity-driven unsupervised RL agents), played with a little per-episode action noise. A fraction
   --random-fraction of every embodiment's episodes use uniform random actions. The manifest records the
   policy and noise scale of every episode.
3. Multi-embodiment: cartpole, acrobot, walker, cheetah, quadruped (DMControl) and sawyer (all 50 Meta-World
   v3 tasks), action dims 1, 1, 6, 6, 12, 4.

Images are 64x64 RGB uint8 rendered once per agent step (after the last of the 2 repeated env frames) with
cheap settings (no anti-aliasing, no shadows, 64x64 offscreen buffer) through `mujoco.Renderer`, which makes
its own GL context current on every call. DMControl: camera 0 (quadruped 2), 500 agent steps. Meta-World:
camera corner2 moved to [0.75, 0.075, 0.7] and flipped `img[::-1, ::-1]` (upside down in metaworld 3.1.1),
100 agent steps = 200 env frames (the package's own limit of 500 is never reached).

Reads: nothing (the environments only). Writes, under --out-dir:
  <emb>/<name>-<index:06d>.npz   one episode: image uint8 [T+1,64,64,3], action float32 [T+1,A] (row 0 zero,
                                 action t led to image t), is_first bool [T+1]; no reward key
  <emb>/<name>-<index:06d>.json  the episode's manifest row (written after the .npz; marks it complete)
  manifest.json                  format version, sizes, the resolved Args, one row per episode, sorted by path
  _explorer/<emb>-stage<k>.pt    exploration-agent actor snapshots (plain dict of tensors, weights_only loadable)
  args.json, metrics.jsonl, tb/ (TensorBoard), contact_sheet.png (first frames, one row per embodiment)
  with --track, also a Weights & Biases run named collect-<embodiments>-s<seed> (wandb-run-id, wandb/)
All files are written atomically (temporary name, fsync, rename); a write that fails removes its temporary
file, and a run sweeps those that killed runs left behind.

Determinism and resume: every episode's bytes depend only on (--seed, embodiment, task, episode index) (and,
for DMControl, the explorer snapshots, which are themselves a deterministic function of --seed, trained at
1 thread and cached in _explorer/). A killed run re-run with the same command skips every episode whose
.npz and .json exist and agree (sha256), regenerates the rest, and rebuilds manifest.json from the sidecar
rows. Re-running into a directory made with different content settings (seed, explorer, noise, random
fraction) is refused. Raising --episodes-per-embodiment later only adds episodes: existing ones are reused.
A selection that would leave out episodes listed in an existing manifest.json is refused unless --allow-shrink
is given (every flag's valid range and the dataset are checked before anything is written).

Sharding: `--shard k/N` keeps the episodes whose id (path) hashes to k-1 modulo N; each shard writes its own
--out-dir with a manifest of its own episodes (each shard trains its own explorer snapshots, the same ones
given the same seed and software; copy _explorer/ between shards to skip that). To merge, copy the shard
directories into one (`cp -rn shard*/* merged/`) and run the same command without --shard on it: every
episode is verified and skipped and one manifest for all is written.

Default run (`python collect_offline.py`): 6 embodiments, 10 episodes per DMControl embodiment and 10 per
Meta-World task (550 episodes, 75k agent steps, ~0.1 GB), explorer 20k agent steps per DMControl embodiment.
Measured CPU cost (1 thread): step + render per agent step 1.3 ms (cartpole) to 4.5 ms (quadruped), ~11 ms
Meta-World; explorer training ~4 ms per agent step. In all ~1200 CPU-s: about 10-12 minutes on 2 cores.
Paper scale (10k DMControl episodes = 2000 per embodiment, 50k Meta-World episodes = 1000 per task; ~13 GB):
  python collect_offline.py --out-dir data/offline-paper --episodes-per-embodiment 2000 \\
      --mw-episodes-per-task 1000 --explorer-steps 500000 --num-workers 64 [--shard k/N on N machines]

Example (small): python collect_offline.py --out-dir data/tiny --embodiments walker,sawyer \\
      --episodes-per-embodiment 2 --mw-tasks reach,drawer-open --explorer-steps 2000
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must precede any mujoco / dm_control import

import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import io
import json
import math
import multiprocessing as mp
import re
import signal
import sys
import time
import warnings
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import imageio.v2 as imageio
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro


@dataclass
class Args:
    out_dir: str = "data/offline"
    """output directory of the dataset (episodes, manifest.json, explorer snapshots, logs)"""
    seed: int = 0
    """master seed: every episode's content is a function of (seed, embodiment, task, episode index)"""
    track: bool = False
    """also log the config and every TensorBoard scalar to Weights & Biases (needs `pip install wandb`;
    WANDB_MODE=offline keeps the run on disk)"""
    wandb_project_name: str = "gsa"
    """W&B project of --track"""
    wandb_entity: Optional[str] = None
    """W&B entity (user or team) of --track; default: your W&B default entity"""
    embodiments: str = "all"
    """comma list of embodiments (cartpole, acrobot, walker, cheetah, quadruped, sawyer), or dmc, metaworld, all"""
    episodes_per_embodiment: int = 10
    """episodes per DMControl embodiment; for sawyer the default of --mw-episodes-per-task"""
    mw_episodes_per_task: Optional[int] = None
    """episodes per Meta-World task in --mw-tasks, if different from --episodes-per-embodiment"""
    mw_tasks: str = "all"
    """Meta-World v3 tasks for sawyer: all, or a comma list of names such as reach,shelf-place"""
    num_workers: int = 2
    """worker processes (spawn context); 1 runs everything in this process"""
    shard: str = "1/1"
    """k/N: collect only the k-th of N deterministic shares of the episodes (to split across machines)"""
    allow_shrink: bool = False
    """let this selection rewrite an existing manifest.json without some of the episodes it lists (their files
    stay on disk); without it such a run is refused"""
    random_fraction: float = 0.1
    """fraction of each embodiment's episodes played with uniform random actions"""
    mw_noise_min: float = 0.0
    """smallest std of the per-episode Gaussian action noise added to the Meta-World scripted expert"""
    mw_noise_max: float = 1.0
    """largest std of that noise (actions are clipped to [-1, 1]; at 1.0 the expert mostly fails)"""
    dmc_noise_max: float = 0.3
    """largest std of the per-episode Gaussian action noise added to the DMControl explorer snapshots"""
    explorer_steps: int = 20_000
    """agent steps (action repeat 2) of reward-free exploration training per DMControl embodiment"""
    explorer_stages: int = 4
    """explorer snapshots taken evenly over training; DMControl episodes are spread over them"""
    compress_level: int = 6
    """zlib level of the .npz files (6, as np.savez_compressed; 1 is ~15% faster to write and 30-80% larger)"""


# Valid range of every numeric flag, (low, high) inclusive, None = unbounded; checked by check_ranges before
# anything is written. tests/ check that every int/float field of Args has an entry.
ARG_RANGES = {
    "seed": (0, 2**32 - 1),  # numpy's seed range
    "episodes_per_embodiment": (1, None),
    "mw_episodes_per_task": (1, None),
    "num_workers": (1, None),
    "random_fraction": (0.0, 1.0),
    "mw_noise_min": (0.0, None),
    "mw_noise_max": (0.0, None),
    "dmc_noise_max": (0.0, None),
    "explorer_steps": (1, None),
    "explorer_stages": (1, None),
    "compress_level": (0, 9),  # zlib's levels
}


SCRIPT = "collect_offline.py"
MANIFEST_FORMAT_VERSION = 1  # of manifest.json (pretrain_wm.py and retrieval.py read it; the same constant there)
SNAPSHOT_FORMAT_VERSION = 1  # of the explorer snapshots _explorer/<emb>-stage<k>.pt, read back here only
EMBODIMENTS = ("cartpole", "acrobot", "walker", "cheetah", "quadruped", "sawyer")
ACTION_DIMS = {"cartpole": 1, "acrobot": 1, "walker": 6, "cheetah": 6, "quadruped": 12, "sawyer": 4}
MAX_ACTION_DIM = 12
IMAGE_SIZE = 64
ACTION_REPEAT = 2
EPISODE_STEPS = {"cartpole": 500, "acrobot": 500, "walker": 500, "cheetah": 500, "quadruped": 500, "sawyer": 100}
# Stock suite task per DMControl embodiment: used only to build the physics and initial-state distribution.
DMC_TASKS = {"cartpole": "swingup", "acrobot": "swingup", "walker": "walk", "cheetah": "run", "quadruped": "walk"}
DMC_CAMERA = {"cartpole": 0, "acrobot": 0, "walker": 0, "cheetah": 0, "quadruped": 2}
MW_TASKS = (
    "assembly", "basketball", "bin-picking", "box-close", "button-press", "button-press-topdown",
    "button-press-topdown-wall", "button-press-wall", "coffee-button", "coffee-pull", "coffee-push", "dial-turn",
    "disassemble", "door-close", "door-lock", "door-open", "door-unlock", "drawer-close", "drawer-open",
    "faucet-open", "faucet-close", "hammer", "hand-insert", "handle-press-side", "handle-press",
    "handle-pull-side", "handle-pull", "lever-pull", "peg-insert-side", "peg-unplug-side", "pick-out-of-hole",
    "pick-place-wall", "pick-place", "plate-slide-back-side", "plate-slide-back", "plate-slide-side",
    "plate-slide", "push-back", "push-wall", "push", "reach", "reach-wall", "shelf-place", "soccer",
    "stick-push", "stick-pull", "sweep-into", "sweep", "window-close", "window-open",
)
MW_CAMERA_POS = (0.75, 0.075, 0.7)  # the release moves corner2 closer
# Args that change episode bytes: a re-run into an existing directory must agree on them.
CONTENT_ARGS = ("seed", "random_fraction", "mw_noise_min", "mw_noise_max", "dmc_noise_max", "explorer_steps",
                "explorer_stages", "compress_level")


def fail(message: str):
    raise SystemExit(f"{SCRIPT}: error: {message}")


# ----------------------------------------------------------------------------------------------------------
# Argument resolution and the episode plan
# ----------------------------------------------------------------------------------------------------------

def parse_embodiments(spec: str) -> list:
    names = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        group = {"all": EMBODIMENTS, "dmc": EMBODIMENTS[:5], "metaworld": ("sawyer",)}.get(part, (part,))
        for name in group:
            if name not in EMBODIMENTS:
                fail(f"unknown embodiment {name!r}; valid: {', '.join(EMBODIMENTS)}, dmc, metaworld, all")
            names.append(name)
    if not names:
        fail("--embodiments is empty")
    return [e for e in EMBODIMENTS if e in names]  # canonical order, no duplicates


def parse_mw_tasks(spec: str) -> list:
    if spec.strip() == "all":
        return list(MW_TASKS)
    names = [p.strip() for p in spec.split(",") if p.strip()]
    for name in names:
        if name not in MW_TASKS:
            fail(f"unknown Meta-World task {name!r}; valid: all or {', '.join(MW_TASKS)}")
    if not names:
        fail("--mw-tasks is empty")
    return [t for t in MW_TASKS if t in names]


def parse_shard(spec: str) -> tuple:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        fail(f"--shard must be k/N with 1 <= k <= N, got {spec!r}")
    return int(m.group(1)), int(m.group(2))


def validate(args: Args) -> None:
    """What check_ranges cannot see: flags that constrain each other, and the text flags."""
    if args.mw_noise_min > args.mw_noise_max:
        fail(f"--mw-noise-min {args.mw_noise_min} exceeds --mw-noise-max {args.mw_noise_max}")
    if args.explorer_stages > args.explorer_steps:  # every stage needs a snapshot at a distinct step
        fail(f"--explorer-stages {args.explorer_stages} exceeds --explorer-steps {args.explorer_steps}")
    parse_embodiments(args.embodiments)
    parse_mw_tasks(args.mw_tasks)
    parse_shard(args.shard)


def episode_seed(seed: int, embodiment: str, task_index: int, index: int) -> int:
    ss = np.random.SeedSequence(seed, spawn_key=(EMBODIMENTS.index(embodiment), task_index, index))
    return int(ss.generate_state(1)[0])


def plan_episode(args: Args, embodiment: str, task: str, index: int) -> dict:
    """One episode's spec; depends only on content Args and (embodiment, task, index)."""
    is_mw = embodiment == "sawyer"
    seed = episode_seed(args.seed, embodiment, MW_TASKS.index(task) if is_mw else 0, index)
    rng = np.random.default_rng(seed)
    u_random, u_stage, u_noise = rng.random(3)
    if u_random < args.random_fraction:
        policy, noise = "random", None
    elif is_mw:
        policy, noise = "scripted", args.mw_noise_min + (args.mw_noise_max - args.mw_noise_min) * float(u_noise)
    else:
        stage = 1 + int(u_stage * args.explorer_stages)
        policy, noise = f"explore-rnd-stage{stage}", args.dmc_noise_max * float(u_noise)
    name = task if is_mw else embodiment
    return {"path": f"{embodiment}/{name}-{index:06d}.npz", "embodiment": embodiment, "task": task,
            "length": EPISODE_STEPS[embodiment], "policy": policy,
            "noise_scale": None if noise is None else round(noise, 6), "seed": seed}


def plan_all(args: Args) -> list:
    k, n = parse_shard(args.shard)
    mw_count = args.episodes_per_embodiment if args.mw_episodes_per_task is None else args.mw_episodes_per_task
    specs = []
    for emb in parse_embodiments(args.embodiments):
        if emb == "sawyer":
            specs += [plan_episode(args, emb, t, i) for t in parse_mw_tasks(args.mw_tasks) for i in range(mw_count)]
        else:
            specs += [plan_episode(args, emb, DMC_TASKS[emb], i) for i in range(args.episodes_per_embodiment)]
    # Shard by a hash of the episode id, so the assignment does not depend on the other flags.
    return [s for s in specs if int(hashlib.sha256(s["path"].encode()).hexdigest(), 16) % n == k - 1]


# ----------------------------------------------------------------------------------------------------------
# Environments
# ----------------------------------------------------------------------------------------------------------

def cheap_render_settings(model) -> None:
    """No anti-aliasing, no shadows, 64x64 offscreen buffer: Meta-World's default 4096 shadow map with 4x
    anti-aliasing would otherwise dominate the cost of a frame."""
    model.vis.quality.offsamples = 0
    model.light_castshadow[:] = 0
    model.vis.global_.offwidth = IMAGE_SIZE
    model.vis.global_.offheight = IMAGE_SIZE


class RewardFreeDMC:
    """A DMControl embodiment without reward: reset/step return the proprioceptive state vector only.

    Steps the physics the way `control.Environment.step` does (task.before_step, physics.step, task.after_step)
    but never calls `task.get_reward`, so nothing downstream of this class can see the task reward.
    Actions in [-1, 1] are mapped through the action-spec bounds, which are not [-1, 1] for every embodiment
    (quadruped: [-1, -1, -0.8] to [1, 1.1, 0.8] per leg).
    """

    def __init__(self, embodiment: str):
        from dm_control import suite

        env = suite.load(embodiment, DMC_TASKS[embodiment])
        self.embodiment, self.physics, self.task = embodiment, env.physics, env.task
        self.n_sub_steps = int(round(env.control_timestep() / env.physics.timestep()))
        spec = env.action_spec()
        self.low, self.high = spec.minimum.astype(np.float64), spec.maximum.astype(np.float64)
        self.act_dim = int(spec.shape[0])
        self.camera = DMC_CAMERA[embodiment]
        self.renderer = None

    def observation(self) -> np.ndarray:
        obs = self.task.get_observation(self.physics)
        return np.concatenate([np.asarray(v, np.float64).ravel() for v in obs.values()]).astype(np.float32)

    def reset(self, seed: int) -> np.ndarray:
        # The task's initial-state randomness comes from task._random (dm_control keeps no public setter).
        self.task._random = np.random.RandomState(seed)
        with self.physics.reset_context():
            self.task.initialize_episode(self.physics)
        return self.observation()

    def step(self, action: np.ndarray) -> np.ndarray:
        ctrl = self.low + (np.clip(action, -1.0, 1.0) + 1.0) * 0.5 * (self.high - self.low)
        for _ in range(ACTION_REPEAT):
            self.task.before_step(ctrl, self.physics)
            self.physics.step(self.n_sub_steps)
            self.task.after_step(self.physics)
        return self.observation()

    def render(self, out: np.ndarray) -> np.ndarray:
        import mujoco

        if self.renderer is None:
            cheap_render_settings(self.physics.model.ptr)
            self.renderer = mujoco.Renderer(self.physics.model.ptr, IMAGE_SIZE, IMAGE_SIZE)
        self.renderer.update_scene(self.physics.data.ptr, camera=self.camera)
        return self.renderer.render(out=out)


# The scripted experts warn on every call that their gains are high; their actions are clipped below.
warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high")


class MetaWorldTask:
    """One Meta-World v3 task (goal observable) with a new seeded goal per episode and a corner2 renderer."""

    def __init__(self, task: str):
        import metaworld
        import mujoco
        from metaworld.policies import ENV_POLICY_MAP

        self.task = task
        self.env = metaworld.ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{task}-v3-goal-observable"](seed=0)
        self.expert = ENV_POLICY_MAP[f"{task}-v3"]()
        model = self.env.model
        camera = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, "corner2")
        model.cam_pos[camera] = MW_CAMERA_POS
        cheap_render_settings(model)
        self.camera = camera
        self.renderer = mujoco.Renderer(model, IMAGE_SIZE, IMAGE_SIZE)

    def reset(self, seed: int) -> np.ndarray:
        # Meta-World ignores reset(seed=); with seeded_rand_vec on, the goal comes from env.np_random, which
        # env.seed seeds.
        self.env._freeze_rand_vec = False
        self.env.seeded_rand_vec = True
        self.env.seed(seed)
        obs, _ = self.env.reset()
        return obs

    def step(self, action: np.ndarray) -> tuple:
        success = False
        for _ in range(ACTION_REPEAT):
            obs, _, _, _, info = self.env.step(action)  # the reward is dropped here, unread
            success = bool(info["success"])
        return obs, success

    def render(self, out: np.ndarray) -> np.ndarray:
        self.renderer.update_scene(self.env.data, camera=self.camera)
        self.renderer.render(out=out)
        out[:] = out[::-1, ::-1]  # corner2's up vector points down in metaworld 3.1.1: this is the true view
        return out

    def close(self) -> None:
        self.renderer.close()
        self.env.close()


# ----------------------------------------------------------------------------------------------------------
# Task-agnostic exploration agent: DDPG (clipped double Q) on state, intrinsic reward = RND novelty
# ----------------------------------------------------------------------------------------------------------

def mlp(inp: int, out: int, hidden: int = 128, norm: bool = True) -> nn.Sequential:
    first = [nn.Linear(inp, hidden), nn.LayerNorm(hidden), nn.Tanh()] if norm else [nn.Linear(inp, hidden), nn.ReLU()]
    return nn.Sequential(*first, nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out))


class Actor(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int):
        super().__init__()
        self.net = mlp(obs_dim, act_dim)

    def forward(self, obs):
        return torch.tanh(self.net(obs))


class Critic(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int):
        super().__init__()
        self.q1, self.q2 = mlp(obs_dim + act_dim, 1), mlp(obs_dim + act_dim, 1)

    def forward(self, obs, act):
        x = torch.cat([obs, act], -1)
        return self.q1(x), self.q2(x)


class RND(nn.Module):
    """Random network distillation: novelty = error of a trained predictor against a fixed random target."""

    def __init__(self, obs_dim: int, out: int = 64):
        super().__init__()
        self.target, self.predictor = mlp(obs_dim, out, norm=False), mlp(obs_dim, out, norm=False)
        for p in self.target.parameters():
            p.requires_grad_(False)

    def forward(self, obs_norm):
        return (self.predictor(obs_norm) - self.target(obs_norm)).pow(2).mean(-1)


def train_explorer(env: RewardFreeDMC, steps: int, stages: int, seed: int, log=None) -> list:
    """Reward-free exploration; returns `stages` actor state dicts taken evenly over `steps` agent steps.

    The env gives states only (no reward exists at this interface). Intrinsic reward: RND error on the
    normalised next state, divided by its running std. Deterministic given seed at 1 torch thread.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    obs_dim, act_dim = env.observation().shape[0], env.act_dim
    actor, critic, rnd = Actor(obs_dim, act_dim), Critic(obs_dim, act_dim), RND(obs_dim)
    actor_t, critic_t = Actor(obs_dim, act_dim), Critic(obs_dim, act_dim)
    actor_t.load_state_dict(actor.state_dict())
    critic_t.load_state_dict(critic.state_dict())
    opt_a = torch.optim.Adam(actor.parameters(), lr=3e-4, foreach=True)
    opt_c = torch.optim.Adam(critic.parameters(), lr=3e-4, foreach=True)
    opt_r = torch.optim.Adam(rnd.predictor.parameters(), lr=3e-4, foreach=True)
    pairs = [(list(n.parameters()), list(n_t.parameters())) for n, n_t in ((actor, actor_t), (critic, critic_t))]
    gamma, tau, batch, warmup, act_noise = 0.99, 0.01, 128, min(1000, steps // 4), 0.2
    buf_o = np.zeros((steps + 1, obs_dim), np.float32)
    buf_a = np.zeros((steps, act_dim), np.float32)
    obs_sum, obs_sq, r_var = np.zeros(obs_dim), np.zeros(obs_dim), 1.0
    snapshots, stage_at = [], {int(round(steps * k / stages)) for k in range(1, stages + 1)}
    obs, t_ep, episode, stats = None, 0, 0, []
    for step in range(steps):
        if obs is None or t_ep == EPISODE_STEPS[env.embodiment]:
            obs, t_ep = env.reset(int(rng.integers(2**31))), 0
            episode += 1
        if step < warmup:
            act = rng.uniform(-1, 1, act_dim).astype(np.float32)
        else:
            with torch.no_grad():
                act = actor(torch.as_tensor(obs)[None])[0].numpy()
            act = np.clip(act + act_noise * rng.standard_normal(act_dim), -1, 1).astype(np.float32)
        next_obs = env.step(act)
        # Transitions live in one flat buffer; the last step of an episode points at the next reset state,
        # which is harmless for novelty-seeking and keeps the buffer simple.
        buf_o[step], buf_a[step], buf_o[step + 1] = obs, act, next_obs
        obs_sum += next_obs
        obs_sq += next_obs.astype(np.float64) ** 2
        obs, t_ep = next_obs, t_ep + 1
        if step >= warmup and step % 2 == 0:  # one update per 2 agent steps keeps CPU cost down
            idx = rng.integers(0, step + 1, batch)
            mean = obs_sum / (step + 1)
            std = np.sqrt(np.maximum(obs_sq / (step + 1) - mean**2, 1e-6))
            o, a, o2 = (torch.as_tensor(x) for x in (buf_o[idx], buf_a[idx], buf_o[idx + 1]))
            o2n = torch.as_tensor(np.clip((buf_o[idx + 1] - mean) / std, -5, 5).astype(np.float32))
            novelty = rnd(o2n)
            opt_r.zero_grad()
            novelty.mean().backward()
            opt_r.step()
            r = novelty.detach()
            stats.append(float(r.mean()))
            r_var = 0.99 * r_var + 0.01 * float(r.pow(2).mean())
            r = (r / (np.sqrt(r_var) + 1e-8))[:, None]
            with torch.no_grad():
                a2 = (actor_t(o2) + (0.2 * torch.randn_like(a)).clamp(-0.5, 0.5)).clamp(-1, 1)
                target = r + gamma * torch.min(*critic_t(o2, a2))
            q1, q2 = critic(o, a)
            loss_c = F.mse_loss(q1, target) + F.mse_loss(q2, target)
            opt_c.zero_grad()
            loss_c.backward()
            opt_c.step()
            loss_a = -critic(o, actor(o))[0].mean()
            opt_a.zero_grad()
            loss_a.backward()
            opt_a.step()
            with torch.no_grad():
                for params, params_t in pairs:
                    torch._foreach_lerp_(params_t, params, tau)
        if step + 1 in stage_at:
            snapshots.append({k: v.detach().clone() for k, v in actor.state_dict().items()})
        if log is not None and (step + 1 in stage_at or (step + 1) % 5000 == 0):
            log({"embodiment": env.embodiment, "explorer_step": step + 1, "stage": len(snapshots),
                 "episodes": episode, "rnd_error": float(np.mean(stats[-500:])) if stats else None})
    return snapshots


def snapshot_path(out_dir: Path, embodiment: str, stage: int) -> Path:
    return out_dir / "_explorer" / f"{embodiment}-stage{stage}.pt"


def explorer_job(job: tuple) -> list:
    """Train (or find cached) the snapshots of one DMControl embodiment; returns metrics rows."""
    out_dir, embodiment, args_dict = job
    out_dir, args = Path(out_dir), Args(**args_dict)
    paths = [snapshot_path(out_dir, embodiment, k) for k in range(1, args.explorer_stages + 1)]
    if all(p.exists() for p in paths):
        return []
    torch.set_num_threads(1)
    rows, t0 = [], time.time()

    def log(row: dict) -> None:
        rows.append(row)
        print(f"{SCRIPT}: explorer {embodiment}: {row['explorer_step']}/{args.explorer_steps} steps "
              f"({row['explorer_step'] / (time.time() - t0):.0f} steps/s)", flush=True)

    seed = episode_seed(args.seed, embodiment, 1000, 0)  # its own stream, apart from every episode's
    snaps = train_explorer(RewardFreeDMC(embodiment), args.explorer_steps, args.explorer_stages, seed, log)
    for k, (path, actor) in enumerate(zip(paths, snaps), start=1):
        payload = {"format_version": SNAPSHOT_FORMAT_VERSION, "script": SCRIPT, "embodiment": embodiment,
                   "stage": k, "steps": int(round(args.explorer_steps * k / args.explorer_stages)),
                   "seed": args.seed, "actor": actor}
        buf = io.BytesIO()
        torch.save(payload, buf)
        write_atomic(path, buf.getvalue())
    return rows


# ----------------------------------------------------------------------------------------------------------
# Episode collection (runs in worker processes)
# ----------------------------------------------------------------------------------------------------------


# ==== shared file helpers: identical copies live in all four stage scripts (tests keep them in sync) ====
def write_atomic(path: Path, data: bytes) -> None:
    """Temporary file in the same directory, fsync, rename: readers never see a partial file. A failed write
    removes its temporary file and raises an OSError naming `path` (the caller turns a full disk into a
    one-line error, see fail_on_full_disk)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from e


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())


def sweep_stale_temporaries(*folders: Path) -> None:
    """Remove the temporary files (<name>.tmp-<pid>[.ext]) left by processes that no longer run."""
    for folder in folders:
        for path in folder.glob("*.tmp-*"):
            m = re.fullmatch(r".+\.tmp-(\d+)(\.\w+)?", path.name)
            if m and path.is_file() and not pid_running(int(m.group(1))):
                path.unlink(missing_ok=True)


def pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def check_out_dir(path: Path, flag: str = "--out-dir") -> None:
    """Fail unless `path` is a directory or can be made one (no regular file in the way)."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                fail(f"{flag} {path}: {p} is not a directory")
            return


def check_ranges(args) -> None:
    """Fail with a message naming the flag (--kebab-case) for any numeric flag outside its range in ARG_RANGES
    (the table beside Args). Called first in main, before anything is written."""
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        if field.name not in ARG_RANGES or value is None:  # not numeric, or None = "use the default"
            continue
        low, high = ARG_RANGES[field.name]
        flag = "--" + field.name.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"{flag} must be a finite number, got {value}")
        if (low is not None and value < low) or (high is not None and value > high):
            valid = f"in [{low}, {high}]" if None not in (low, high) else f">= {low}" if high is None else f"<= {high}"
            fail(f"{flag} must be {valid}, got {value}")


@contextlib.contextmanager
def fail_on_full_disk(remedy: str):
    """A full disk ends the run with a one-line error naming the file and saying what to do (`remedy`)."""
    try:
        yield
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        fail(f"No space left on device while writing {e.filename or 'the outputs'}; free some space and {remedy}")
# ==== end shared file helpers ====

# ==== experiment tracking: identical copies live in the three training scripts (tests keep them in sync) ====
def import_wandb(track: bool):
    """The wandb module with --track, else None. Weights & Biases is optional (not in requirements.txt): without
    it, --track is an error raised while the inputs are checked, before anything is written."""
    if not track:
        return None
    try:
        import wandb
    except ImportError:
        fail("--track logs to Weights & Biases, which is not installed: `pip install wandb` (or drop --track)")
    return wandb


def start_tracking(wandb, args, name: str, out_dir: Path, config: dict, axes: dict):
    """CleanRL's opt-in tracking: a W&B run called `name` with `config`, whose scalars are logged explicitly,
    each group against its own x-axis (axes {"eval/*": "env_steps"}: log {"env_steps": x, "eval/return": y}),
    rather than by sync_tensorboard, which patches TensorBoard's writer and puts every tag on one global_step.
    The run id is kept in <out-dir>/wandb-run-id, so a resumed run continues its W&B run. W&B's local files go
    to $WANDB_DIR if set, else under <out-dir>, never the current directory. None without --track."""
    if wandb is None:
        return None
    id_file = out_dir / "wandb-run-id"
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    run = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=name, config=config,
                     id=run_id, resume="allow" if run_id else None,
                     dir=None if os.environ.get("WANDB_DIR") else str(out_dir))
    if run_id is None:
        write_atomic(id_file, run.id.encode())
    for axis in sorted(set(axes.values())):
        run.define_metric(axis, hidden=True)
    for pattern, axis in axes.items():
        run.define_metric(pattern, step_metric=axis)
    return run


def stop_tracking(run) -> None:
    """Finish the W&B run (if any); marked failed when an exception is on its way out (fail() or a crash)."""
    if run is not None:
        run.finish(exit_code=1 if sys.exc_info()[0] is not None else 0)
# ==== end experiment tracking ====


def encode_episode(image: np.ndarray, action: np.ndarray, is_first: np.ndarray, level: int) -> bytes:
    """A .npz (zip of .npy members, as np.savez_compressed writes) at a chosen zlib level, with fixed
    timestamps so equal arrays give equal bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=level) as zf:
        for key, arr in (("image", image), ("action", action), ("is_first", is_first)):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue(),
                        compress_type=zipfile.ZIP_DEFLATED, compresslevel=level)
    return buf.getvalue()


_CACHE: dict = {}  # per process: DMC envs by embodiment, the one live Meta-World task, explorer actors


def get_env(embodiment: str, task: str):
    if embodiment != "sawyer":
        if embodiment not in _CACHE:
            _CACHE[embodiment] = RewardFreeDMC(embodiment)
        return _CACHE[embodiment]
    current = _CACHE.get("sawyer")
    if current is None or current.task != task:
        if current is not None:
            current.close()  # two Meta-World envs rendering in one process: all but the newest draw garbage
        _CACHE["sawyer"] = MetaWorldTask(task)
    return _CACHE["sawyer"]


class NumpyActor:
    """The Actor's forward pass in numpy: ~10x less per-step overhead than torch for one small observation."""

    def __init__(self, actor: Actor):
        sd = {k: v.detach().numpy().astype(np.float64) for k, v in actor.state_dict().items()}
        self.w0, self.b0, self.g, self.beta = sd["net.0.weight"], sd["net.0.bias"], sd["net.1.weight"], sd["net.1.bias"]
        self.w1, self.b1, self.w2, self.b2 = sd["net.3.weight"], sd["net.3.bias"], sd["net.5.weight"], sd["net.5.bias"]

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        h = self.w0 @ obs + self.b0
        h = np.tanh((h - h.mean()) / np.sqrt(h.var() + 1e-5) * self.g + self.beta)  # LayerNorm, eps 1e-5
        h = np.maximum(self.w1 @ h + self.b1, 0.0)
        return np.tanh(self.w2 @ h + self.b2)


def get_actor(out_dir: Path, embodiment: str, stage: int, obs_dim: int, act_dim: int) -> NumpyActor:
    path = snapshot_path(out_dir, embodiment, stage)
    key = ("actor", str(path.resolve()))
    if key not in _CACHE:
        if not path.exists():
            raise FileNotFoundError(f"missing explorer snapshot {path}")
        payload = torch.load(path, weights_only=True)
        if payload.get("format_version") != SNAPSHOT_FORMAT_VERSION:
            raise ValueError(f"explorer snapshot {path} has format version {payload.get('format_version')!r}, "
                             f"not {SNAPSHOT_FORMAT_VERSION}; delete {path.parent} to train the explorers again")
        actor = Actor(obs_dim, act_dim)
        actor.load_state_dict(payload["actor"])
        _CACHE[key] = NumpyActor(actor)
    return _CACHE[key]


def rollout(spec: dict, out_dir: Path) -> dict:
    """Play one episode; returns arrays plus in-memory stats (success flags are never written to disk)."""
    emb, length = spec["embodiment"], spec["length"]
    env = get_env(emb, spec["task"])
    act_dim = ACTION_DIMS[emb]
    rng = np.random.default_rng([spec["seed"], 1])  # action noise stream, apart from the env's seed
    image = np.zeros((length + 1, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    action = np.zeros((length + 1, act_dim), np.float32)
    is_first = np.zeros(length + 1, bool)
    is_first[0] = True
    obs = env.reset(spec["seed"])
    env.render(image[0])
    actor = None
    if spec["policy"].startswith("explore"):
        stage = int(spec["policy"].rsplit("stage", 1)[1])
        actor = get_actor(out_dir, emb, stage, obs.shape[0], act_dim)
    successes, step_time = [], 0.0
    for t in range(1, length + 1):
        if spec["policy"] == "random":
            act = rng.uniform(-1, 1, act_dim)
        elif actor is not None:
            act = actor(obs.astype(np.float64)) + spec["noise_scale"] * rng.standard_normal(act_dim)
        else:  # scripted expert; its actions can leave [-1, 1]
            act = np.clip(env.expert.get_action(obs), -1, 1) + spec["noise_scale"] * rng.standard_normal(act_dim)
        act = np.clip(act, -1, 1).astype(np.float32)
        t0 = time.process_time()
        if emb == "sawyer":
            obs, success = env.step(act)
            successes.append(success)
        else:
            obs = env.step(act)
        env.render(image[t])
        step_time += time.process_time() - t0
        action[t] = act
    return {"image": image, "action": action, "is_first": is_first, "successes": successes,
            "step_render_cpu": step_time}


def sidecar_path(out_dir: Path, spec: dict) -> Path:
    return (out_dir / spec["path"]).with_suffix(".json")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def complete_row(out_dir: Path, spec: dict) -> Optional[dict]:
    """The stored row if the episode exists, matches its spec and its sha256; None otherwise."""
    side, npz = sidecar_path(out_dir, spec), out_dir / spec["path"]
    if not (side.exists() and npz.exists()):
        return None
    try:
        row = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    if any(row.get(k) != v for k, v in spec.items()) or row.get("sha256") != file_sha256(npz):
        print(f"{SCRIPT}: redoing {spec['path']} (stored file or row does not match)", flush=True)
        return None
    return row


def collect_chunk(job: tuple) -> list:
    """Collect a list of episode specs (same embodiment and task); returns (row, stats) per episode."""
    out_dir, specs, level = job
    out_dir = Path(out_dir)
    torch.set_num_threads(1)
    results = []
    for spec in specs:
        t0 = time.process_time()
        ep = rollout(spec, out_dir)
        data = encode_episode(ep["image"], ep["action"], ep["is_first"], level)
        row = dict(spec, sha256=hashlib.sha256(data).hexdigest())
        write_atomic(out_dir / spec["path"], data)
        write_json_atomic(sidecar_path(out_dir, spec), row)  # marks it complete
        results.append((row, {"cpu": time.process_time() - t0, "step_render_cpu": ep["step_render_cpu"],
                              "frames": spec["length"], "successes": ep["successes"]}))
    return results


# ----------------------------------------------------------------------------------------------------------
# Manifest, contact sheet, summary
# ----------------------------------------------------------------------------------------------------------

def write_manifest(out_dir: Path, args: Args, rows: list) -> None:
    manifest = {"format_version": MANIFEST_FORMAT_VERSION, "image_size": IMAGE_SIZE,
                "action_repeat": ACTION_REPEAT, "max_action_dim": MAX_ACTION_DIM, "action_dims": dict(ACTION_DIMS),
                # Only the settings that shape episode bytes: the manifest's sha256 is what pretrain_wm.py
                # and retrieval.py record, so a resume with other --num-workers must not change it.
                "collection": {k: getattr(args, k) for k in CONTENT_ARGS},
                "episodes": sorted(rows, key=lambda r: r["path"])}
    write_json_atomic(out_dir / "manifest.json", manifest)


def write_contact_sheet(out_dir: Path, rows: list, per_row: int = 10) -> None:
    """First frames, one row per embodiment (spread over its episodes / Meta-World tasks), 2x upscaled."""
    tile = IMAGE_SIZE * 2
    embs = [e for e in EMBODIMENTS if any(r["embodiment"] == e for r in rows)]
    sheet = np.full((len(embs) * tile, per_row * tile, 3), 255, np.uint8)
    for i, emb in enumerate(embs):
        mine = sorted((r for r in rows if r["embodiment"] == emb), key=lambda r: r["path"])
        picks = [mine[j] for j in np.unique(np.linspace(0, len(mine) - 1, per_row).round().astype(int))]
        for j, row in enumerate(picks):
            with np.load(out_dir / row["path"], allow_pickle=False) as z:
                frame = z["image"][0]
            sheet[i * tile:(i + 1) * tile, j * tile:(j + 1) * tile] = frame.repeat(2, 0).repeat(2, 1)
    buf = io.BytesIO()
    imageio.imwrite(buf, sheet, format="png")
    write_atomic(out_dir / "contact_sheet.png", buf.getvalue())


def summarize(rows: list) -> str:
    lines = ["embodiment   episodes  agent-steps  policies (noise std range)"]
    for emb in EMBODIMENTS:
        mine = [r for r in rows if r["embodiment"] == emb]
        if not mine:
            continue
        kinds = {}
        for r in mine:
            kinds.setdefault(r["policy"], []).append(r["noise_scale"])
        mix = ", ".join(f"{p} x{len(v)}" + (f" ({min(v):.2f}-{max(v):.2f})" if v[0] is not None else "")
                        for p, v in sorted(kinds.items()))
        lines.append(f"{emb:<12} {len(mine):>8}  {sum(r['length'] for r in mine):>11}  {mix}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# The output directory: checks before anything is written, leftovers of killed runs, a full disk
# ----------------------------------------------------------------------------------------------------------

def check_existing_dataset(out_dir: Path, args: Args, specs: list) -> None:
    """Refuse a run that would change the bytes of the episodes in --out-dir, or silently drop some from its
    manifest.json: a collection into an existing dataset only grows it unless --allow-shrink says otherwise."""
    check_out_dir(out_dir)
    args_file, manifest_file = out_dir / "args.json", out_dir / "manifest.json"
    if args_file.exists():
        try:
            old = json.loads(args_file.read_text())
        except ValueError:
            old = None
        if not isinstance(old, dict):
            fail(f"{args_file} is unreadable; use a new --out-dir")
        diff = [k for k in CONTENT_ARGS if old.get(k) != getattr(args, k)]
        if diff:
            fail(f"{out_dir} holds a collection made with different {', '.join(diff)}; use a new --out-dir")
    if not manifest_file.exists():
        return
    try:
        listed = [(r["path"], r["embodiment"], r["task"]) for r in json.loads(manifest_file.read_text())["episodes"]]
    except (ValueError, KeyError, TypeError):
        fail(f"{manifest_file} is unreadable; delete it and re-run the command that made the dataset (see "
             f"{args_file}) to rebuild it from the episode sidecars")
    planned = {s["path"] for s in specs}
    dropped = Counter(f"{emb}/{task}" for path, emb, task in listed if path not in planned)
    if dropped and not args.allow_shrink:
        counts = ", ".join(f"{k}: {n}" for k, n in sorted(dropped.items()))
        fail(f"this selection would drop {sum(dropped.values())} of the {len(listed)} episodes listed in "
             f"{manifest_file} ({counts}); select them too (see {args_file}) or pass --allow-shrink")


def drop_torn_line(path: Path) -> None:
    """Cut a partial last line (a run killed mid-write), so that the rows appended next start a line."""
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            os.truncate(path, data.rfind(b"\n") + 1)


# ----------------------------------------------------------------------------------------------------------
# Running the jobs: in this process or in a pool of worker processes
# ----------------------------------------------------------------------------------------------------------

def work(job: tuple):
    """Pool entry point: ("explore", out_dir, embodiment, args_dict) or ("episodes", out_dir, specs, level)."""
    return job[0], (explorer_job if job[0] == "explore" else collect_chunk)(job[1:])


def release_cache() -> None:
    """Free this process's renderers (before a suite switch in-process, and at the end)."""
    for key, obj in list(_CACHE.items()):
        if isinstance(obj, MetaWorldTask):
            obj.close()
        elif isinstance(obj, RewardFreeDMC) and obj.renderer is not None:
            obj.renderer.close()
        _CACHE.pop(key)


def stop_with_parent() -> None:
    """Pool initializer: the kernel sends this worker SIGTERM when its parent dies, even by SIGKILL (Linux)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1  # from linux/prctl.h
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def stop_on_sigterm(signum, frame) -> None:
    fail("stopped by SIGTERM; re-run the same command to continue")


def run_jobs(jobs: list, workers: int, on_result) -> None:
    """Run jobs in this process (workers == 1) or in a pool of spawned workers (a fork after the parent made a
    GL context deadlocks them)."""
    if workers == 1 or not jobs:
        for job in jobs:
            on_result(*work(job))
        release_cache()
        return
    # SIGTERM becomes SystemExit here, so that leaving the `with` terminates the workers rather than leaving
    # them to finish their jobs as orphans.
    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        with mp.get_context("spawn").Pool(min(workers, len(jobs)), initializer=stop_with_parent) as pool:
            for kind, result in pool.imap_unordered(work, jobs):
                on_result(kind, result)
    finally:
        signal.signal(signal.SIGTERM, previous)


def chunked(specs: list, size: int = 8) -> list:
    """Consecutive specs of the same (embodiment, task), at most `size` per chunk (one env per chunk)."""
    chunks = []
    for s in specs:
        if chunks and chunks[-1][-1]["task"] == s["task"] and len(chunks[-1]) < size:
            chunks[-1].append(s)
        else:
            chunks.append([s])
    return chunks


def collect(args: Args, out_dir: Path, specs: list, wandb=None) -> None:
    """Collect the episodes of `specs` that --out-dir lacks, then write manifest.json and the contact sheet
    (with --track, `wandb` is the module and the TensorBoard scalars go to a W&B run too)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(out_dir, out_dir / "_explorer", *(out_dir / e for e in EMBODIMENTS))
    write_json_atomic(out_dir / "args.json", asdict(args))
    drop_torn_line(out_dir / "metrics.jsonl")
    metrics = open(out_dir / "metrics.jsonl", "a")
    from torch.utils.tensorboard import SummaryWriter  # imported here, not in every spawned worker

    writer = SummaryWriter(str(out_dir / "tb"))
    k, n = parse_shard(args.shard)
    name = f"collect-{'+'.join(parse_embodiments(args.embodiments))}-s{args.seed}" + (f"-{k}of{n}" if n > 1 else "")
    tracker = start_tracking(wandb, args, name, out_dir, asdict(args),
                             {"explorer/*": "explorer_step", "collect/*": "agent_steps"})

    def log(row: dict) -> None:
        metrics.write(json.dumps(dict(row, wall_time=time.time())) + "\n")
        metrics.flush()
        if "explorer_step" in row and row["rnd_error"] is not None:
            key = f"explorer/{row['embodiment']}/rnd_error"
            writer.add_scalar(key, row["rnd_error"], row["explorer_step"])
            if tracker is not None:
                tracker.log({"explorer_step": row["explorer_step"], key: row["rnd_error"]})

    rows = {}  # path -> manifest row of every complete episode
    for s in specs:
        row = complete_row(out_dir, s)
        if row is not None:
            rows[s["path"]] = row
    todo = [s for s in specs if s["path"] not in rows]
    print(f"{SCRIPT}: {len(specs)} episodes in shard {args.shard}, {len(specs) - len(todo)} already "
          f"complete, {len(todo)} to collect with {args.num_workers} worker(s)", flush=True)

    total_frames = sum(s["length"] for s in todo)
    done = {"frames": 0, "episodes": 0, "cpu": 0.0, "step_render_cpu": 0.0}
    t_start, t_print, first = time.time(), 0.0, None  # first: (time, frames) at the first finished chunk

    def on_result(kind: str, result: list) -> None:
        nonlocal t_print, first
        if kind == "explore":
            for row in result:
                log(row)
            return
        for row, st in result:
            rows[row["path"]] = row
            done["frames"] += st["frames"]
            done["episodes"] += 1
            done["cpu"] += st["cpu"]
            done["step_render_cpu"] += st["step_render_cpu"]
            log({"path": row["path"], "policy": row["policy"], "noise_scale": row["noise_scale"],
                 "cpu_s": round(st["cpu"], 3), "step_render_cpu_s": round(st["step_render_cpu"], 3)})
        now = time.time()
        if first is None:
            first = (now, done["frames"])
        elif now - t_print > 10 or done["frames"] == total_frames:
            t_print = now
            fps = (done["frames"] - first[1]) / max(now - first[0], 1e-9)  # episode rate, explorer time excluded
            eta = (total_frames - done["frames"]) / max(fps, 1e-9)
            writer.add_scalar("collect/agent_steps_per_s", fps, done["frames"])
            if tracker is not None:
                tracker.log({"agent_steps": done["frames"], "collect/agent_steps_per_s": fps})
            print(f"{SCRIPT}: {done['episodes']}/{len(todo)} episodes, {fps:.0f} agent steps/s "
                  f"({ACTION_REPEAT * fps:.0f} env frames/s), ETA {eta:.0f} s", flush=True)

    # Phase 1, one pool: reward-free explorer training for the DMControl embodiments that still need episodes
    # (largest first), then the Meta-World episodes, which fill the workers as explorers finish. These processes
    # never render DMControl: after a Meta-World render in the same process, dm_control's frames can be garbage.
    need = sorted({s["embodiment"] for s in todo if s["policy"].startswith("explore")},
                  key=lambda e: -ACTION_DIMS[e])
    args_dict = asdict(args)
    jobs = [("explore", str(out_dir), e, args_dict) for e in need]
    jobs += [("episodes", str(out_dir), c, args.compress_level)
             for c in chunked([s for s in todo if s["embodiment"] == "sawyer"])]
    run_jobs(jobs, args.num_workers, on_result)
    # Phase 2, a fresh pool: DMControl episodes, longest chunks first for load balance.
    chunks = sorted(chunked([s for s in todo if s["embodiment"] != "sawyer"]),
                    key=lambda c: -sum(ACTION_DIMS[s["embodiment"]] * s["length"] for s in c))
    run_jobs([("episodes", str(out_dir), c, args.compress_level) for c in chunks], args.num_workers, on_result)
    if todo:
        wall = time.time() - t_start
        log({"summary": "collection", "episodes": done["episodes"], "agent_steps": done["frames"], "wall_s": wall,
             "agent_steps_per_s": done["frames"] / wall, "cpu_s": done["cpu"],
             "step_render_cpu_s": done["step_render_cpu"]})
        print(f"{SCRIPT}: collected {done['episodes']} episodes ({done['frames']} agent steps) in "
              f"{wall:.0f} s; episode CPU {done['cpu']:.0f} s, of which env step + render "
              f"{done['step_render_cpu']:.0f} s (loop overhead "
              f"{100 * (1 - done['step_render_cpu'] / max(done['cpu'], 1e-9)):.0f}%)", flush=True)

    missing = [s["path"] for s in specs if s["path"] not in rows]
    if missing:
        fail(f"{len(missing)} episodes missing after collection, e.g. {missing[0]}")
    rows = [rows[s["path"]] for s in specs]
    write_manifest(out_dir, args, rows)
    write_contact_sheet(out_dir, rows)
    metrics.close()
    writer.close()
    stop_tracking(tracker)
    print(summarize(rows))
    print(f"{SCRIPT}: wrote {out_dir / 'manifest.json'} ({len(rows)} episodes) and "
          f"{out_dir / 'contact_sheet.png'}", flush=True)


@fail_on_full_disk("re-run the same command (it continues where this one stopped)")
def main(args: Args) -> None:
    check_ranges(args)
    validate(args)
    wandb = import_wandb(args.track)
    out_dir = Path(args.out_dir)
    specs = plan_all(args)
    check_existing_dataset(out_dir, args, specs)  # before anything is written
    collect(args, out_dir, specs, wandb)


if __name__ == "__main__":
    main(tyro.cli(Args))
