"""GSA fine-tuning of a pretrained generalist world model on one task (paper Sec. 3.3, Algorithm 1).

Starting from pretrain_wm.py's world model, the agent learns one task online with DreamerV3 behaviour learning
(reward head, actor-critic in imagination), plus GSA's two techniques:
  * experience rehearsal (Eq. 4): the k offline episodes whose first frames are nearest to the task's reset
    frames (retrieval.py's index) are replayed beside the online data: 25% of every batch;
  * execution guidance: a behaviour-cloned prior pi_bc, trained on the retrieved episodes, drives the
    warm-up episodes and, with a probability that decays linearly, a random window of later episodes.
The whole world model (encoder, RSSM, decoder) is fine-tuned. Ablations are flags: --no-pretrain (DreamerV3
from scratch), --no-rehearsal, --no-guidance, --guidance jsrl (the prior acts only at the episode start).

Reads:  --checkpoint (pretrain_wm.py's wm.pt), --index-dir (retrieval.py build's index.faiss + index.json),
        --data-dir (collect_offline.py's manifest.json + episode .npz files; only the retrieved ones are read).
Writes: <out-dir>/args.json, metrics.jsonl (one line per evaluation), train.jsonl (training losses, one line
        per episode that trained), episodes.jsonl (one line per collected episode: return, length, warm-up or
        not, guidance p and pi_bc's window), retrieval.json (D_r), tb/ (TensorBoard),
        videos/eval-<env_steps>.mp4, replay/ep-<n>.npz (online episodes), ckpt.pt (everything --resume needs);
        with --track, a Weights & Biases run named <task>-<variant>-s<seed> (wandb-run-id, wandb/).

Example:
    python finetune_gsa.py --task walker-run                      # runs/pretrain/wm.pt, runs/index, data/offline
    python finetune_gsa.py --task mw-shelf-place --size xs --env-steps 30000 --seed 1
    python finetune_gsa.py --task walker-run --no-pretrain        # DreamerV3 from scratch (no offline data)

How the file reads: Args and the size presets; GSA and behaviour learning (guidance schedule, DreamerV3 pieces,
networks and the BC prior, the Agent and its update, replay, acting); files and checkpoints; Algorithm 1 (the
preamble and each step as a function, then main); last, an appendix of the code shared with the other scripts
(task suite, retrieval, world model), whose copies tests keep identical.

Choices worth knowing:
  * No continuation head: DMControl and Meta-World episodes end only at their time limit, so imagined
    trajectories use the constant discount (weights gamma^t).
  * Actor gradients come from backpropagating the normalised lambda-return through the learned dynamics (as the
    release does); the world model, reward head and critic get no update from the actor loss.
  * Update timing is the release's: training starts once 10 episodes are in the replay (or at the end of the
    warm-up, if sooner), so on Meta-World the world model, reward head and critic learn from the prior's
    warm-up episodes before the RL policy acts; then train_ratio / (batch * seq_len) updates per agent step
    follow every collected episode, with no catch-up burst.
  * The actor's action is a normal sample clipped to [-1, 1] with a straight-through gradient (the release's),
    and the critic's targets bootstrap from the slow critic (the release's; --critic-bootstrap fast closes them
    on the critic itself); see actor_sample and Agent.behavior_loss for why.
  * --no-pretrain has no encoder to query the index with, hence no retrieval, rehearsal or guidance.
  * --init-from RUN (task adaptation, Sec. 4.2) starts from an earlier run of the same embodiment: its world model
    and actor, fresh reward head, critics, return scale and optimisers; the earlier runs' online episodes are
    retrieval candidates beside the offline ones (in memory: the index files are not changed), encoded, like the
    query, by the pre-trained encoder the index was built with. With --no-pretrain it chains runs learned from
    scratch instead (nothing is retrieved).
  * --packnet is the paper's adaptation baseline: PackNet (class PackNet) packs the tasks of a sequence into the
    actor's weights, each task training only the weights the earlier ones left free, with the critic fresh per
    task. The paper does not say which world model its PackNet agent used; results/adaptation runs it with
    --no-pretrain (a world model learned along the sequence, no offline data).
  * --resume restores weights, optimisers, return normalisation, counters, RNG states and the online replay
    (replay/*.npz), but a simulator's state cannot be saved: the resumed train env is rebuilt with seed
    seed + 1000 * episodes, so episodes after a resume differ from those of an uninterrupted run.
  * Sizes: the world-model part (SIZES) is pretrain_wm.py's; AGENT_SIZES holds the rest. paper = appendix J and
    the release; s = DreamerV3 S (2-layer MLPs), the speed-benchmark size; xs = the CPU preset (batch 16 x 32,
    train ratio 128, i.e. the release's one update per 4 agent steps: ~5.6k updates in 50k frames, about 2 h on 1
    thread in bf16 (--precision auto's choice on a CPU with AVX512-BF16 or AMX), about 3 h in fp32; warm-up 5
    episodes; BC at most 30k steps of a half-width CNN, early-stopped); tiny = tests. Ratio 128 was chosen over 64
    on walker-stand (results/learner/README.md).
"""
import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must be set before mujoco is imported

import atexit
import contextlib
import copy
import dataclasses
import ctypes
import errno
import hashlib
import io
import json
import math
import random
import re
import resource
import sys
import time
import weakref
from collections import Counter, deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import faiss
import imageio
import mujoco
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from dm_control import suite
from dm_control.rl import control
from dm_control.suite import cheetah, common, quadruped, walker
from dm_control.utils import rewards
from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE
from torch.utils.tensorboard import SummaryWriter

FORMAT_VERSION = 1  # of the ckpt.pt written here
WM_CHECKPOINT_FORMAT_VERSION = 1  # of pretrain_wm.py's wm.pt read here (its CHECKPOINT_FORMAT_VERSION)
INDEX_FORMAT_VERSION = 1  # of retrieval.py's index.json read here

SCRIPT = "finetune_gsa.py"


@dataclass
class Args:
    task: str = "walker-run"
    """task: DMControl `domain-task` (the paper's 22, e.g. walker-run), Meta-World `mw-<name>` (50), or a stock
    dm_control task for quick checks (STOCK_DMC_TASKS, e.g. reacher-easy, cup-catch, finger-spin; a body without
    offline data needs --no-pretrain, or --no-rehearsal --no-guidance)"""
    checkpoint: str = "runs/pretrain/wm.pt"
    """pretrain_wm.py checkpoint to fine-tune (not read with --no-pretrain)"""
    index_dir: str = "runs/index"
    """retrieval.py index (index.faiss + index.json) built with --checkpoint's encoder"""
    data_dir: str = "data/offline"
    """offline data the index was built over (collect_offline.py's output); only retrieved episodes are read"""
    out_dir: Optional[str] = None
    """run directory; default runs/finetune/<task>-<variant>-s<seed> (variant: gsa, no-pretrain, pretrain-only,
    no-rehearsal, no-guidance, jsrl)"""
    seed: int = 0
    """seed of torch, numpy, the train env (eval env: seed + 10000) and everything sampled"""
    device: str = "auto"
    """torch device: auto (cuda if available), cpu, cuda, cuda:1, ..."""
    threads: Optional[int] = None
    """torch CPU threads (default: torch's choice); set it when other processes share the cores"""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """matmul/conv precision of the updates: auto = bf16 autocast on GPU and on a CPU with AVX512-BF16 or AMX
    (0.7x the fp32 update time there, same learning: README, Speed), fp32 on other CPUs (bf16 is slower)"""
    compile: bool = False
    """torch.compile the steps of the update's two sequential loops (filtering, imagination); on a GPU with CUDA
    graphs. The same computation (to float rounding). Measured on this project's CPU: no gain worth its minute of
    compiling; on GPUs unmeasured (README, Speed)"""
    resume: bool = False
    """continue the run in --out-dir from its ckpt.pt (required to reuse an existing run directory)"""
    init_from: Optional[str] = None
    """task adaptation (Sec. 4.2): start from an earlier fine-tuning run directory of the same embodiment and model
    size: its world model and actor are loaded, the reward head, critics, return scale and optimisers start
    fresh, and its online episodes (and those of the runs it started from) join the offline episodes that
    retrieval and rehearsal draw from, without their rewards. With --no-pretrain it continues an earlier
    --no-pretrain run (a world model learned along the sequence). With --resume, it must name the run's own"""
    packnet: bool = False
    """PackNet on the actor (the paper's Sec. 4.2 baseline): this task trains only the actor weights that earlier
    tasks left free, keeps the largest --packnet-keep of them at --packnet-prune-at and frees the rest for later
    tasks (class PackNet). Without --init-from the run is the sequence's first task; with it, the earlier run
    must have used --packnet and pruned"""
    packnet_keep: float = 0.5
    """fraction of the free actor weights this task keeps at its pruning (1 / tasks left gives equal shares)"""
    packnet_prune_at: float = 0.8
    """prune once this fraction of --env-steps is collected; the kept weights retrain for the rest"""
    track: bool = False
    """also log the config and every TensorBoard scalar to Weights & Biases (needs `pip install wandb`;
    WANDB_MODE=offline keeps the run on disk)"""
    wandb_project_name: str = "gsa"
    """W&B project of --track"""
    wandb_entity: Optional[str] = None
    """W&B entity (user or team) of --track; default: your W&B default entity"""
    size: Optional[Literal["tiny", "xs", "s", "paper"]] = None
    """preset (SIZES + AGENT_SIZES); default: the checkpoint's own (xs with --no-pretrain); must match it"""
    env_steps: int = 150_000
    """environment frames to collect (after action repeat, like the paper's 150k samples)"""
    no_pretrain: bool = False
    """DreamerV3 from scratch: a fresh world model, so no checkpoint, no retrieval, no rehearsal, no guidance
    (KL weights beta_dyn 1.0, beta_rep 0.1 as in pre-training and the release; DreamerV3's paper uses 0.5, 0.1)"""
    no_rehearsal: bool = False
    """train on online data only (no D_r sequences in the batches)"""
    no_guidance: bool = False
    """no prior pi_bc: random warm-up actions and the RL policy acts everywhere"""
    guidance: Literal["window", "jsrl"] = "window"
    """window: pi_bc acts on a random window of a guided episode (GSA); jsrl: the window starts at step 0"""
    guidance_schedule: Literal["paper", "release", "scaled"] = "paper"
    """paper: p = 1 -> 0 over 50k frames (DMC) / 150k (Meta-World); release: 1 -> 0.1 over 200k frames;
    scaled: 1 -> 0 over the first third of --env-steps (DMC) / two thirds (Meta-World), for shorter runs"""
    guidance_start: Optional[float] = None
    """override the schedule's initial guidance probability"""
    guidance_end: Optional[float] = None
    """override the schedule's final guidance probability"""
    guidance_frames: Optional[int] = None
    """override the schedule's length in env frames"""
    offline_ratio: float = 0.25
    """fraction of every batch drawn from the retrieved episodes D_r (experience rehearsal)"""
    k: int = 500
    """number of offline episodes to retrieve (Eq. 4)"""
    query_resets: int = 5
    """env resets whose first frames form the retrieval query"""
    batch_size: Optional[int] = None
    """sequences per batch (default: the size preset)"""
    seq_len: Optional[int] = None
    """sequence length (default: the size preset)"""
    horizon: Optional[int] = None
    """imagination horizon (default: the size preset; paper 16)"""
    train_ratio: Optional[float] = None
    """replayed steps per agent step; updates per agent step = train_ratio / (batch_size * seq_len)"""
    warmup_frames: Optional[int] = None
    """env frames collected before training, whole episodes by pi_bc (random without guidance); default: preset"""
    train_after_episodes: int = 10
    """training starts once this many episodes are in the replay, or when the warm-up ends if that is sooner
    (the release: 10); from then on, updates follow every episode at the train ratio, with no catch-up burst"""
    bc_steps: Optional[int] = None
    """most behaviour-cloning steps of the prior; it stops earlier once its held-out MSE stops falling
    (default: preset; paper 150k)"""
    eval_every: Optional[int] = None
    """evaluate every this many env frames (default: preset)"""
    eval_episodes: Optional[int] = None
    """episodes per evaluation (default: preset)"""
    video: bool = True
    """save an mp4 of the first episode of every evaluation (--no-video: don't)"""
    checkpoint_every: int = 10_000
    """save ckpt.pt at least every this many env frames (also after every evaluation and at the end)"""
    max_episode_steps: Optional[int] = None
    """cut episodes after this many agent steps (debugging and tests; default: the task's 500 / 100)"""
    discount: float = 0.99
    """discount gamma of the lambda-returns (Eq. 2)"""
    return_lambda: float = 0.95
    """lambda of the lambda-returns (Eq. 2)"""
    entropy_scale: float = 1e-4
    """actor entropy regulariser eta (Eq. 3)"""
    critic_bootstrap: Optional[Literal["slow", "fast"]] = None
    """critic whose values close the lambda-returns (Eq. 2): the slow EMA copy (the release's) or the critic
    itself (Dreamer's first version); see Agent.behavior_loss (default: the size preset)"""
    actor_lr: float = 8e-5
    """actor Adam learning rate"""
    critic_lr: Optional[float] = None
    """critic Adam learning rate (default: the size preset; paper 8e-5)"""
    wm_lr: float = 1e-4
    """world model (+ reward head) Adam learning rate, as in pre-training"""
    bc_lr: float = 1e-4
    """behaviour-cloning Adam learning rate"""

# Valid range of every numeric flag, (low, high) inclusive, None = unbounded; checked by check_ranges before
# anything is written. tests/ check that every int/float field of Args has an entry.
ARG_RANGES = {
    "seed": (0, 10**9), "threads": (1, None), "env_steps": (1, None), "guidance_start": (0.0, 1.0),
    "guidance_end": (0.0, 1.0), "guidance_frames": (0, None), "offline_ratio": (0.0, 0.95), "k": (1, None),
    "query_resets": (1, None), "batch_size": (1, None), "seq_len": (2, None), "horizon": (1, None),
    "train_ratio": (1e-6, None), "warmup_frames": (0, None), "train_after_episodes": (1, None),
    "bc_steps": (1, None), "eval_every": (1, None), "eval_episodes": (1, None), "checkpoint_every": (1, None),
    "max_episode_steps": (1, None), "discount": (0.0, 1.0), "return_lambda": (0.0, 1.0),
    "entropy_scale": (0.0, None), "packnet_keep": (1e-3, 1.0), "packnet_prune_at": (0.0, 1.0),
    "actor_lr": (1e-8, 1.0), "critic_lr": (1e-8, 1.0), "wm_lr": (1e-8, 1.0),
    "bc_lr": (1e-8, 1.0),
}


# Fine-tuning part of the sizes. `paper` follows the paper's appendix and the release (MLPs 3 x 512, batch
# 16 x 64, horizon 16, train ratio 256, BC at most 150k steps of batch 256 with a 2 x 512 MLP, warm-up 15k
# frames). `s` is DreamerV3's S size (2-layer MLPs of 512), the speed-benchmark size. `xs` is the CPU preset:
# shorter sequences, a quarter of the replay ratio, BC with a half-width CNN, warm-up of 5 episodes. BC stops
# early once its held-out loss stops falling. `tiny` runs a whole fine-tune in seconds. The critic is the
# release's at every size for now (returns closed on the slow critic, lr 8e-5); results/learner measures a faster
# one for the CPU preset.
AGENT_SIZES = {
    "tiny": dict(units=32, layers=1, batch_size=4, seq_len=8, horizon=4, train_ratio=16, bc_depth=4, bc_units=32,
                 bc_steps=4, bc_batch=8, warmup_frames=0, warmup_episodes=1, eval_every=80, eval_episodes=1,
                 critic_bootstrap="slow", critic_lr=8e-5),
    "xs": dict(units=256, layers=2, batch_size=16, seq_len=32, horizon=16, train_ratio=128, bc_depth=16,
               bc_units=256, bc_steps=30_000, bc_batch=64, warmup_frames=5000, warmup_episodes=5,
               eval_every=5000, eval_episodes=10, critic_bootstrap="slow", critic_lr=8e-5),
    "s": dict(units=512, layers=2, batch_size=16, seq_len=64, horizon=16, train_ratio=256, bc_depth=32,
              bc_units=512, bc_steps=150_000, bc_batch=256, warmup_frames=15_000, warmup_episodes=5,
              eval_every=10_000, eval_episodes=10, critic_bootstrap="slow", critic_lr=8e-5),
    "paper": dict(units=512, layers=3, batch_size=16, seq_len=64, horizon=16, train_ratio=256, bc_depth=32,
                  bc_units=512, bc_steps=150_000, bc_batch=256, warmup_frames=15_000, warmup_episodes=5,
                  eval_every=10_000, eval_episodes=10, critic_bootstrap="slow", critic_lr=8e-5),
}


# Flags that override one entry of the size preset (None: the preset's value).
PRESET_FLAGS = ("batch_size", "seq_len", "horizon", "train_ratio", "warmup_frames", "bc_steps", "eval_every",
                "eval_episodes", "critic_bootstrap", "critic_lr")

ACTION_REPEAT = 2

BC_FRAMES = 3  # stacked frames seen by the prior (release)

# ----------------------------------------------------------------------------------------------------------
# Execution guidance (Sec. 3.3): the schedule of p and the prior's window
# ----------------------------------------------------------------------------------------------------------

def guidance_schedule(args: Args, is_metaworld: bool) -> tuple[float, float, int]:
    """(start p, end p, length in env frames) of the linear guidance schedule."""
    if args.guidance_schedule == "paper":  # appendix J: linear(1, 0, 50k) DMC, linear(1, 0, 150k) Meta-World
        start, end, frames = 1.0, 0.0, 150_000 if is_metaworld else 50_000
    elif args.guidance_schedule == "release":  # 1 -> 0.1 over 100k agent steps = 200k env frames
        start, end, frames = 1.0, 0.1, 100_000 * ACTION_REPEAT
    else:  # scaled: the paper's DMC shape (a third of a 150k budget) at any budget; Meta-World two thirds
        start, end, frames = 1.0, 0.0, (2 * args.env_steps if is_metaworld else args.env_steps) // 3
    start = start if args.guidance_start is None else args.guidance_start
    end = end if args.guidance_end is None else args.guidance_end
    frames = frames if args.guidance_frames is None else args.guidance_frames
    return start, end, frames


def guidance_probability(env_frames: int, start: float, end: float, frames: int) -> float:
    """Linear schedule: start at 0 frames, end from `frames` on."""
    frac = 1.0 if frames <= 0 else min(max(env_frames / frames, 0.0), 1.0)
    return start + frac * (end - start)


def guidance_window(length: int, rng: np.random.Generator, mode: str = "window") -> tuple[int, int]:
    """(first step, number of steps) of pi_bc's window in an episode of `length` agent steps: the number of
    steps is a random multiple (1..10) of length / 10; it starts uniformly in [0, length - steps], or at 0
    for the JSRL-style variant."""
    steps = int(round(int(rng.integers(1, 11)) * length / 10))
    steps = min(max(steps, 1), length)
    first = 0 if mode == "jsrl" else int(rng.integers(0, length - steps + 1))
    return first, steps

# ----------------------------------------------------------------------------------------------------------
# Behaviour learning (DreamerV3; Eq. 2-3): two-hot heads, lambda-returns, return scale, the actor's distribution
# ----------------------------------------------------------------------------------------------------------

def symlog(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.expm1(x.abs())


def twohot_bins(device=None) -> torch.Tensor:
    """255 bins evenly spaced in symlog space over [-20, 20] (DreamerV3)."""
    return torch.linspace(-20.0, 20.0, 255, device=device)


def twohot_encode(y: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """y [...] (already symlog'ed) -> weights [..., K] on the two nearest bins, linear interpolation."""
    y = y.clamp(bins[0], bins[-1])
    below = (torch.bucketize(y, bins, right=True) - 1).clamp(0, len(bins) - 1)
    above = (below + 1).clamp(max=len(bins) - 1)
    gap = bins[above] - bins[below]
    w_above = torch.where(above > below, (y - bins[below]) / gap.clamp(min=1e-8), torch.zeros_like(y))
    out = torch.zeros(*y.shape, len(bins), device=y.device, dtype=y.dtype)
    out.scatter_add_(-1, below.unsqueeze(-1), (1.0 - w_above).unsqueeze(-1))
    out.scatter_add_(-1, above.unsqueeze(-1), w_above.unsqueeze(-1))
    return out


def twohot_mean(logits: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Expected value: softmax-weighted bins in symlog space, then symexp."""
    return symexp((torch.softmax(logits, -1) * bins).sum(-1))


def twohot_nll(logits: torch.Tensor, target: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the two-hot encoding of symlog(target) under the predicted bins."""
    return -(twohot_encode(symlog(target), bins) * torch.log_softmax(logits, -1)).sum(-1)


def lambda_return(reward: torch.Tensor, value: torch.Tensor, discount: float, lam: float) -> torch.Tensor:
    """Eq. 2: R_t = r_{t+1} + gamma * ((1 - lambda) * v_{t+1} + lambda * R_{t+1}), R_H = v_H.
    reward [H, N] (reward[t] is predicted at imagined state t+1), value [H+1, N] -> returns [H, N]."""
    out, ret = [], value[-1]
    for t in reversed(range(reward.shape[0])):
        ret = reward[t] + discount * ((1.0 - lam) * value[t + 1] + lam * ret)
        out.append(ret)
    return torch.stack(out[::-1])


class ReturnNorm(nn.Module):
    """DreamerV3 return normalisation: EMA of the 5th and 95th return percentiles; scale = max(1, P95 - P5)."""

    def __init__(self, decay: float = 0.99, floor: float = 1.0, low: float = 0.05, high: float = 0.95):
        super().__init__()
        self.decay, self.floor = decay, floor
        self.register_buffer("quantiles", torch.tensor([low, high]))
        self.register_buffer("low", torch.zeros(()))
        self.register_buffer("high", torch.zeros(()))

    @torch.no_grad()
    def update(self, returns: torch.Tensor) -> None:
        lo, hi = torch.quantile(returns.detach().float().flatten(), self.quantiles)
        self.low.mul_(self.decay).add_((1.0 - self.decay) * lo)
        self.high.mul_(self.decay).add_((1.0 - self.decay) * hi)

    def scale(self) -> torch.Tensor:
        return torch.clamp(self.high - self.low, min=self.floor)


def actor_sample(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """a ~ N(mean, std) clipped to [-1, 1] with a straight-through gradient (the release's policy): the forward
    value is clipped, the backward pass is that of the unclipped reparameterised sample mean + std * eps. So
    d a / d std = eps, whose mean is 0: a reward linear in the action gives the std no gradient, wherever the
    mean is. (The exact inverse-CDF truncated normal that this replaces gets d E[a] / d std = -0.61 at mean 0.5,
    std 0.5: it shrinks its own std whenever the mean is off-centre.)"""
    x = mean + std * torch.randn_like(mean)
    return x + (x.clamp(-1.0, 1.0) - x).detach()


def actor_entropy(std: torch.Tensor) -> torch.Tensor:
    """Entropy of N(mean, std) per dimension, in closed form (the release estimates it by -log N(sample))."""
    return torch.log(std) + 0.5 * math.log(2.0 * math.pi * math.e)


def cpu_has_bf16_units() -> bool:
    """AVX512-BF16 or AMX: CPUs on which bf16 matmuls run about twice as fast as fp32 (README, Speed). Elsewhere
    bf16 is emulated and slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own probes (private, so guarded)
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def uses_bf16(precision: str, device_type: str) -> bool:
    """--precision auto is bf16 autocast on a GPU and on a CPU with bf16 units, fp32 on other CPUs. On the CPU this
    rests on a learning comparison: walker-stand from scratch, the same seeds and code in fp32 and bf16 to 20k
    frames, with matching losses and returns (results/speed/precision-learning.md)."""
    if precision != "auto":
        return precision == "bf16"
    return device_type == "cuda" or (device_type == "cpu" and cpu_has_bf16_units())


@contextlib.contextmanager
def frozen(*modules: nn.Module):
    """No parameter gradients for these modules inside the block (gradients still flow through them)."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)

# ----------------------------------------------------------------------------------------------------------
# Networks: reward head, critic, actor (DreamerV3) and the behaviour-cloned prior pi_bc (Sec. 3.3)
# ----------------------------------------------------------------------------------------------------------

class MLP(nn.Module):
    """`layers` x (Linear, LayerNorm, SiLU), then a linear output (zero-initialised for two-hot heads)."""

    def __init__(self, inp: int, out: int, units: int, layers: int, zero_output: bool = False):
        super().__init__()
        mods, dim = [], inp
        for _ in range(layers):
            mods += [nn.Linear(dim, units, bias=False), nn.LayerNorm(units, eps=1e-3), nn.SiLU()]
            dim = units
        self.body = nn.Sequential(*mods)
        self.out = nn.Linear(dim, out)
        _trunc_normal_init(self)
        if zero_output:  # DreamerV3: reward and critic start predicting exactly 0
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x)).float()  # fp32 outputs under bf16 autocast (two-hot, actor dist)


class Actor(nn.Module):
    """pi(a | s) over the world model's padded action space: mean tanh(.), std in [0.1, 1] (sampled by
    actor_sample); the agent masks the padded dims to 0."""

    def __init__(self, feat_dim: int, act_dim: int, units: int, layers: int, min_std: float = 0.1,
                 max_std: float = 1.0):
        super().__init__()
        self.net = MLP(feat_dim, 2 * act_dim, units, layers)
        self.min_std, self.max_std = min_std, max_std

    def forward(self, feat: torch.Tensor):
        mean, std = self.net(feat).chunk(2, -1)
        return torch.tanh(mean), (self.max_std - self.min_std) * torch.sigmoid(std + 2.0) + self.min_std


class BCPrior(nn.Module):
    """pi_bc (the release's network): 3 stacked frames -> 4 convs (kernel 4, stride 2, no padding) with channels
    [d, 2d, 4d, 8d], each with a channel LayerNorm and ELU -> 2 x (Linear, LayerNorm, ELU) -> a linear action
    head (clipped to [-1, 1] when it acts, not when it learns)."""

    def __init__(self, act_dim: int, depth: int = 32, units: int = 512, image_size: int = 64):
        super().__init__()
        chans = [3 * BC_FRAMES, depth, 2 * depth, 4 * depth, 8 * depth]
        self.convs = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 4, 2) for i in range(4))
        self.norms = nn.ModuleList(ChannelNorm(chans[i + 1], eps=1e-3) for i in range(4))
        res = image_size
        for _ in range(4):
            res = (res - 4) // 2 + 1  # 64 -> 31 -> 14 -> 6 -> 2
        self.mlp = nn.Sequential(nn.Linear(8 * depth * res * res, units), nn.LayerNorm(units), nn.ELU(),
                                 nn.Linear(units, units), nn.LayerNorm(units), nn.ELU(),
                                 nn.Linear(units, act_dim))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames uint8 [N, 3, H, W, 3] (oldest first) -> action [N, 12] (unbounded)."""
        x = frames.permute(0, 1, 4, 2, 3).reshape(frames.shape[0], -1, *frames.shape[2:4]).float() / 255.0 - 0.5
        for conv, norm in zip(self.convs, self.norms):
            x = F.elu(norm(conv(x)))
        return self.mlp(x.flatten(1))


def random_shift(x: torch.Tensor, rng: torch.Generator, pad: int = 3) -> torch.Tensor:
    """DrQ augmentation: replicate-pad by `pad` and crop back at a random offset per sample. x [N, C, H, W]."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=rng, device="cpu").to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=rng, device="cpu").to(x.device)
    rows = (torch.arange(h, device=x.device)[None] + dy[:, None])[:, :, None]  # [N, H, 1]
    cols = (torch.arange(w, device=x.device)[None] + dx[:, None])[:, None, :]  # [N, 1, W]
    out = padded[torch.arange(n, device=x.device)[:, None, None], :, rows, cols]  # [N, H, W, C]
    return out.permute(0, 3, 1, 2)


def bc_stack(episode: dict, t: int) -> np.ndarray:
    """Frames t-2, t-1, t of an episode (the first frame repeated before the start): uint8 [3, H, W, 3]."""
    idx = [max(t - i, 0) for i in reversed(range(BC_FRAMES))]
    return episode["image"][idx]


def bc_batch(episodes: list, pairs, device) -> tuple:
    """(frames uint8 [N, 3, H, W, 3], target action [N, 12]) for (episode, t) pairs: frames up to t predict
    action[t + 1], the action taken at image t."""
    frames = torch.as_tensor(np.stack([bc_stack(episodes[e], t) for e, t in pairs]), device=device)
    target = torch.as_tensor(np.stack([episodes[e]["action"][t + 1] for e, t in pairs]), device=device)
    return frames, target


def train_bc(prior: BCPrior, episodes: list, max_steps: int, batch: int, lr: float, action_dim: int,
             rng: np.random.Generator, device: torch.device, log=print, check_every: Optional[int] = None,
             patience: int = 5, min_steps: Optional[int] = None) -> dict:
    """Behaviour cloning on D_r (Sec. 3.3): MSE on the task's action dims, random-shift augmentation. One in ten
    episodes (at least one, if there are two) is held out; every `check_every` steps (default: 1% of max_steps,
    at least 250) the held-out MSE over all their frames is measured, and once `min_steps` (default: 10% of
    max_steps) have run, training stops when it has not improved for `patience` checks. The demonstrations'
    own action noise puts a floor under the held-out MSE, so a short patience would stop on noise. The prior
    keeps the weights of its best check. Returns {"train": [(step, mse)], "heldout": [(step, mse)], "best_step"}."""
    check_every = max(250, max_steps // 100) if check_every is None else check_every
    min_steps = max_steps // 10 if min_steps is None else min_steps
    opt = torch.optim.Adam(prior.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    order = rng.permutation(len(episodes))
    n_held = len(episodes) // 10 if len(episodes) >= 20 else int(len(episodes) >= 2)
    held, train = order[:n_held], order[n_held:]
    lengths = np.array([len(e["image"]) - 1 for e in episodes])  # valid t: 0 .. T-1
    width = episodes[0]["action"].shape[1]  # the padded action space
    mask = (torch.arange(width, device=device) < action_dim).float()
    held_pairs = [(int(e), int(t)) for e in held for t in range(lengths[e])]

    def mse(pred, target):
        return ((pred - target).square() * mask).sum(-1).mean() / action_dim

    @torch.no_grad()
    def heldout_mse():
        prior.eval()
        out = [mse(prior(f), y).item() * len(f) for f, y in
               (bc_batch(episodes, held_pairs[i:i + 256], device) for i in range(0, len(held_pairs), 256))]
        prior.train()
        return sum(out) / len(held_pairs)

    curve = {"train": [], "heldout": [], "best_step": 0}
    best, best_state, since_best, t0 = float("inf"), None, 0, time.time()
    for step in range(1, max_steps + 1):
        eps = train[rng.integers(0, len(train), size=batch)]
        pairs = list(zip(eps, (rng.random(batch) * lengths[eps]).astype(np.int64)))
        frames, target = bc_batch(episodes, pairs, device)
        n, f, h, w, c = frames.shape
        x = random_shift(frames.permute(0, 1, 4, 2, 3).reshape(n, f * c, h, w).float(), gen)
        x = x.reshape(n, f, c, h, w).permute(0, 1, 3, 4, 2).round().clamp(0, 255).to(torch.uint8)
        loss = mse(prior(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % check_every and step != max_steps:
            continue
        curve["train"].append((step, loss.item()))
        if not held_pairs:
            continue
        curve["heldout"].append((step, heldout_mse()))
        if curve["heldout"][-1][1] < best:
            best, since_best, curve["best_step"] = curve["heldout"][-1][1], 0, step
            best_state = copy.deepcopy(prior.state_dict())
        else:
            since_best += 1
        log(f"[bc] step {step}/{max_steps} train mse {loss.item():.4f} held-out mse {curve['heldout'][-1][1]:.4f} "
            f"(best {best:.4f} at {curve['best_step']}; {time.time() - t0:.0f}s)")
        if since_best >= patience and step >= min_steps:
            break
    if best_state is not None:
        prior.load_state_dict(best_state)
    return curve

# ----------------------------------------------------------------------------------------------------------
# PackNet (Mallya & Lazebnik 2018) on the actor: the task-adaptation baseline of Sec. 4.2 (--packnet)
# ----------------------------------------------------------------------------------------------------------

class PackNet:
    """The paper's continual-learning baseline (Sec. 4.2: "iteratively prunes actor parameters while preserving
    important weights (with larger magnitude) for previous skills"), on the actor only. Every weight of the actor's
    linear layers belongs to one task of the sequence or is free. Task t trains only the weights that are free
    when it starts (the earlier tasks' stay exactly as they were). At its pruning point it keeps the `keep`
    fraction of them with the largest magnitude, layer by layer, as its own, zeroes the others and leaves them
    free for the next tasks, then retrains its own for the rest of its frames. Pruning is PackNet's, by weight
    only: the LayerNorm gains and biases and the output bias (1% of the actor at xs) are trained by the first task
    and then fixed, as PackNet fixes biases after its first task.

    owner: {parameter name: int16 tensor of its shape}, 0 = free, t = task t of the sequence (the first is 1).
    Agent.update calls mask_grads before clipping and restore after the optimiser step, so Adam's momentum
    cannot move a weight that is not this task's either."""

    def __init__(self, actor: nn.Module, task: int, keep: float, owner: Optional[dict] = None, pruned: bool = False):
        self.params = dict(actor.named_parameters())
        self.task, self.keep, self.pruned = task, keep, pruned
        self.owner = owner if owner is not None else {
            name: torch.zeros_like(p, dtype=torch.int16) for name, p in self.params.items() if self.packed(p)}
        self.owner = {name: o.to(self.params[name].device) for name, o in self.owner.items()}
        self._freeze_the_rest()

    @staticmethod
    def packed(p: torch.Tensor) -> bool:
        return p.dim() == 2  # the linear layers' weights

    def _freeze_the_rest(self) -> None:
        """Which entries this task may change now, and the values every other entry keeps."""
        mine = self.task if self.pruned else 0  # before pruning: the free weights; after: the task's own
        self.trainable = {name: (self.owner[name] == mine) if name in self.owner
                          else torch.full_like(p, self.task == 1, dtype=torch.bool)
                          for name, p in self.params.items()}
        self.fixed = {name: p.detach().clone() for name, p in self.params.items()}

    def mask_grads(self) -> None:
        for name, p in self.params.items():
            if p.grad is not None:
                p.grad.mul_(self.trainable[name])

    @torch.no_grad()
    def restore(self) -> None:
        for name, p in self.params.items():
            p.copy_(torch.where(self.trainable[name], p, self.fixed[name]))

    @torch.no_grad()
    def prune(self) -> dict:
        """Keep the largest-magnitude `keep` fraction of the free weights of each layer as this task's; zero the
        rest (they stay free). -> {layer: (weights kept, weights left free)}."""
        counts = {}
        for name, owner in self.owner.items():
            p = self.params[name]
            free = (owner == 0).flatten().nonzero().squeeze(1)
            n_keep = int(round(self.keep * free.numel()))
            kept = free[p.flatten()[free].abs().topk(n_keep).indices]
            owner.view(-1)[kept] = self.task
            p.masked_fill_(owner == 0, 0.0)
            counts[name] = (n_keep, free.numel() - n_keep)
        self.pruned = True
        self._freeze_the_rest()
        return counts

    def state(self) -> dict:
        return {"task": self.task, "keep": self.keep, "pruned": self.pruned,
                "owner": {name: o.cpu() for name, o in self.owner.items()}}

# ----------------------------------------------------------------------------------------------------------
# The agent: world model + reward head + actor-critic; one update = world model, actor, critic
# ----------------------------------------------------------------------------------------------------------

class Agent(nn.Module):
    """World model, reward head and actor-critic. Hyperparameters are plain arguments (Sec. 3.3, appendix J)."""

    def __init__(self, cfg: "ModelConfig", action_dim: int, *, units: int, layers: int, horizon: int,
                 discount: float = 0.99, return_lambda: float = 0.95, entropy_scale: float = 1e-4,
                 wm_lr: float = 1e-4, actor_lr: float = 8e-5, critic_lr: float = 8e-5,
                 critic_bootstrap: str = "slow", kl: tuple = (1.0, 0.1, 1.0), precision: str = "auto"):
        super().__init__()
        self.cfg, self.action_dim, self.horizon = cfg, action_dim, horizon  # horizon: imagined steps per start
        self.discount, self.lam, self.entropy_scale = discount, return_lambda, entropy_scale
        if critic_bootstrap not in ("slow", "fast"):
            raise ValueError(f"critic_bootstrap must be 'slow' or 'fast', got {critic_bootstrap!r}")
        self.critic_bootstrap = critic_bootstrap
        self.kl, self.precision = tuple(kl), precision  # kl: beta_dyn, beta_rep, free nats (pre-training's)
        self.wm = WorldModel(cfg)
        feat_dim = cfg.deter + cfg.stoch * cfg.classes
        self.reward = MLP(feat_dim, 255, units, layers, zero_output=True)
        self.critic = MLP(feat_dim, 255, units, layers, zero_output=True)
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor = Actor(feat_dim, cfg.act_dim, units, layers)
        self.return_norm = ReturnNorm()
        self.register_buffer("bins", twohot_bins())
        self.register_buffer("act_mask", (torch.arange(cfg.act_dim) < action_dim).float())
        # World model and reward head share one optimiser (the reward loss also shapes the representation).
        self.wm_params = list(self.wm.parameters()) + list(self.reward.parameters())
        self.wm_opt = torch.optim.Adam(self.wm_params, lr=wm_lr, eps=1e-5, weight_decay=1e-6)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=actor_lr, eps=1e-5)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=critic_lr, eps=1e-5)
        self.packnet: Optional[PackNet] = None  # --packnet: which actor weights this task may change

    def autocast(self):
        """bf16 autocast for the forward passes of an update (--precision); backward runs outside it."""
        device = self.bins.device.type
        if uses_bf16(self.precision, device):
            return torch.autocast(device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def optimizers(self) -> dict:
        return {"wm": self.wm_opt, "actor": self.actor_opt, "critic": self.critic_opt}

    def imagine(self, start: dict, horizon: int):
        """Roll the prior from posterior start states with the actor. The actor sees detached features;
        its actions keep their graph, so returns backpropagate through the learned dynamics into the actor.
        Returns feats [H+1, N, F] and the actor's entropy [H, N] (task action dims only)."""
        state = start
        feats, ents = [self.wm.rssm.get_feat(state)], []
        for _ in range(horizon):
            state, feat, ent = self.imagine_step(state, feats[-1])
            feats.append(feat)
            ents.append(ent)
        return torch.stack(feats), torch.stack(ents)

    def imagine_step(self, state: dict, feat: torch.Tensor):
        """One imagined step: the actor acts on the detached features, the prior rolls on -> (state, its
        features, the actor's entropy [N]). The unit that --compile compiles."""
        mean, std = self.actor(feat.detach())
        action = actor_sample(mean, std) * self.act_mask
        entropy = (actor_entropy(std) * self.act_mask).sum(-1)
        state = self.wm.rssm.img_step(state, action)
        return state, self.wm.rssm.get_feat(state), entropy

    def compile_loops(self) -> None:
        """--compile: the update's two sequential loops run compiled steps (compile_step); call after .to(device).
        Acting is left eager (one state at a time, a different shape)."""
        device_type = self.bins.device.type
        self.imagine_step = compile_step(self.imagine_step, device_type)
        self.wm.rssm.filter_step = compile_step(self.wm.rssm.filter_step, device_type)
        self.mark_step = device_type == "cuda"  # CUDA graphs: tell each update's start apart from the last's

    def world_model_loss(self, batch: dict):
        """Eq. 1 on online and rehearsal rows plus the reward head's two-hot loss on online rows only (D_r
        has no reward). -> (world-model loss, reward loss, metrics, posterior states [B, T, ...])."""
        B, T = batch["action"].shape[:2]
        dyn_scale, rep_scale, free = self.kl
        wm_loss, wm_metrics, post = self.wm.loss(batch["image"], batch["action"], batch["is_first"], dyn_scale,
                                                 rep_scale, free)
        reward_nll = twohot_nll(self.reward(self.wm.rssm.get_feat(post)), batch["reward"], self.bins)  # [B, T]
        mask = batch["online"].to(reward_nll.dtype)[:, None].expand(B, T)
        reward_loss = (reward_nll * mask).sum() / mask.sum().clamp(min=1.0)
        return wm_loss, reward_loss, wm_metrics, post

    def behavior_loss(self, start: dict, start_online: Optional[torch.Tensor] = None):
        """Actor (Eq. 3) and critic losses on one imagined batch from the start states [N, ...].

        Returns are Eq. 2's lambda-returns, closed by the slow critic (the release's choice, every preset's
        default) or by the critic itself (critic_bootstrap "fast"): the critic regresses them, the actor
        maximises them through the dynamics, normalised by DreamerV3's percentile scale. Under a constant reward
        the slow version's value reaches 2/5 of the true value in 2000 updates, the fast one 48/50
        (results/learner/critic_convergence.py); on walker-stand the faster critic did not raise the return.
        The critic runs once on the imagined features; the actor's gradient goes through it, the reward head
        and the dynamics (all frozen here), the critic's only into its own weights."""
        feats, ent = self.imagine(start, self.horizon)
        # Heads on all H+1 states and slice their outputs: slicing the features instead would make the
        # backward pass zero-fill and copy a feature-sized gradient buffer.
        reward = twohot_mean(self.reward(feats), self.bins)[1:]  # [H, N]: reward[t] at state t+1
        if self.critic_bootstrap == "slow":
            bootstrap = twohot_mean(self.slow_critic(feats), self.bins)  # [H+1, N]; weights frozen, features not
            logits = self.critic(feats[:-1])
        else:  # one critic pass serves as both; the actor's backward is restricted to its own weights
            logits = self.critic(feats)
            bootstrap, logits = twohot_mean(logits, self.bins), logits[:-1]
        ret = lambda_return(reward, bootstrap, self.discount, self.lam)  # [H, N]
        self.return_norm.update(ret)
        scale = self.return_norm.scale()
        weight = self.discount ** torch.arange(self.horizon, device=ret.device, dtype=ret.dtype)[:, None]
        actor_loss = -(weight * ret).mean() / scale - self.entropy_scale * (weight * ent).mean()
        critic_loss = (weight * twohot_nll(logits, ret.detach(), self.bins)).mean()
        with torch.no_grad():
            value = twohot_mean(logits, self.bins)
        metrics = {"entropy": ent.mean(), "return_scale": scale, "return_mean": ret.mean(),
                   "imag_reward": reward.mean(), "value": value.mean()}
        if start_online is not None and start_online.any() and not start_online.all():
            # Where imagination's reward comes from: starts in online rows against starts in D_r rows.
            on = start_online.to(reward.dtype)
            for name, w in (("online", on), ("offline", 1.0 - on)):
                metrics[f"imag_reward_{name}_starts"] = (reward.detach() * w).sum() / (w.sum() * reward.shape[0])
        return actor_loss, critic_loss, metrics

    def update(self, batch: dict) -> dict:
        """One update on a batch (tensors): image uint8 [B, T, H, W, 3], action [B, T, 12], is_first [B, T],
        reward [B, T], online bool [B] (False for rehearsal rows, which have no reward).

        All three losses are computed with the weights as they are at the start (as DreamerV3 does), then every
        gradient norm is checked, and only then do the optimisers step: a non-finite loss or gradient raises
        FloatingPointError before any weight changes. Returns a dict of python floats."""
        B, T = batch["action"].shape[:2]
        t0 = time.perf_counter()
        if getattr(self, "mark_step", False):
            torch.compiler.cudagraph_mark_step_begin()
        with self.autocast():
            wm_loss, reward_loss, wm_metrics, post = self.world_model_loss(batch)
        for opt in self.optimizers().values():
            opt.zero_grad(set_to_none=True)
        (wm_loss + reward_loss).backward()
        t1 = time.perf_counter()
        start = {key: value.detach().reshape(B * T, *value.shape[2:]) for key, value in post.items()}
        del post
        actor_params, critic_params = list(self.actor.parameters()), list(self.critic.parameters())
        with frozen(self.wm, self.reward):
            with self.autocast():
                online = batch["online"][:, None].expand(B, T).reshape(B * T)
                actor_loss, critic_loss, ac_metrics = self.behavior_loss(start, online)
            actor_loss.backward(inputs=actor_params, retain_graph=True)
            critic_loss.backward(inputs=critic_params)
        if self.packnet is not None:
            self.packnet.mask_grads()
        norms = {"wm_grad_norm": nn.utils.clip_grad_norm_(self.wm_params, 100.0),
                 "actor_grad_norm": nn.utils.clip_grad_norm_(actor_params, 100.0),
                 "critic_grad_norm": nn.utils.clip_grad_norm_(critic_params, 100.0)}
        losses = {"wm_loss": wm_loss, "reward_loss": reward_loss, "actor_loss": actor_loss,
                  "critic_loss": critic_loss}
        checked = {**losses, **norms}
        rest = {**ac_metrics, **{f"wm/{k}": v for k, v in wm_metrics.items()}}
        # The only host sync of an update: every number at once (the metrics are all known before the step).
        numbers = torch.stack([v.detach().float().reshape(()) for v in (*checked.values(), *rest.values())]).tolist()
        metrics = dict(zip((*checked, *rest), numbers))
        bad = [f"{name}={metrics[name]}" for name in checked if not math.isfinite(metrics[name])]
        if bad:
            raise FloatingPointError(f"non-finite {', '.join(bad)}")
        for opt in self.optimizers().values():
            opt.step()
        if self.packnet is not None:
            self.packnet.restore()
        with torch.no_grad():  # slow critic: EMA with fraction 0.02 per update
            for p_slow, p in zip(self.slow_critic.parameters(), self.critic.parameters()):
                p_slow.lerp_(p, 0.02)
        t2 = time.perf_counter()
        metrics["time_wm"], metrics["time_actor_critic"] = t1 - t0, t2 - t1
        return metrics

    @torch.no_grad()
    def diverged(self) -> list:
        """Names of the parts whose weights are no longer finite (huge learning rates can get there with finite
        losses and gradients)."""
        parts = {"world model": self.wm, "reward head": self.reward, "actor": self.actor, "critic": self.critic}
        return [name for name, m in parts.items() if not all(bool(p.isfinite().all()) for p in m.parameters())]

    @torch.no_grad()
    def first_value(self, image: np.ndarray) -> float:
        """The critic's value of an episode's first frame (to set beside the discounted return it earned)."""
        _, post = self.act(None, torch.zeros(self.cfg.act_dim, device=self.bins.device), image, mode=True)
        return float(twohot_mean(self.critic(self.wm.rssm.get_feat(post)), self.bins)[0])

    @torch.no_grad()
    def act(self, state: Optional[dict], prev_action: torch.Tensor, image: np.ndarray, mode: bool):
        """Filter one observation and pick an action. state None = episode start. -> (action [12], state)."""
        device = self.bins.device
        embed = self.wm.encoder(torch.as_tensor(image, device=device)[None])
        is_first = torch.tensor([state is None], device=device)
        if state is None:
            state = self.wm.rssm.initial(1)
        post, _ = self.wm.rssm.obs_step(state, prev_action[None], embed, is_first)
        mean, std = self.actor(self.wm.rssm.get_feat(post))
        action = mean if mode else actor_sample(mean, std)
        return (action * self.act_mask)[0], post


def to_batch(online: dict, offline: Optional[dict], device) -> dict:
    """Numpy sequences [B_on, T, ...] (+ rehearsal [B_off, T, ...]) -> update() batch on the device."""
    parts = [online] + ([offline] if offline is not None else [])
    batch = {key: torch.as_tensor(np.concatenate([p[key] for p in parts]), device=device)
             for key in ("image", "action", "reward", "is_first")}
    n_on = len(online["image"])
    batch["online"] = torch.arange(len(batch["image"]), device=device) < n_on
    return batch

# ----------------------------------------------------------------------------------------------------------
# Replay: online episodes and the retrieved set D_r (experience rehearsal, Eq. 4)
# ----------------------------------------------------------------------------------------------------------

def pad_actions(action: np.ndarray, width: int) -> np.ndarray:
    """[T, A] -> [T, 12] zero-padded (the world model's shared action space)."""
    out = np.zeros((action.shape[0], width), np.float32)
    out[:, : action.shape[1]] = action
    return out


def load_offline_episode(data_dir: Path, row: dict, expected_sha: str, width: int) -> dict:
    """One retrieved episode in replay format, sha256-checked. Rewards are zeros: the offline data has none, and
    an earlier task's online episode (--init-from) has its rewards dropped."""
    path = data_dir / row["path"]
    try:
        raw = path.read_bytes()
    except OSError as e:
        fail(f"cannot read retrieved episode {path}: {e}")
    if sha256_bytes(raw) != expected_sha:
        fail(f"episode file {path} is corrupt: its sha256 differs from "
             + ("the one it had when this run retrieved it" if row.get("source") == "online"
                else str(data_dir / "manifest.json")))
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        if "image" not in z.files or "action" not in z.files:
            fail(f"episode file {path} lacks 'image' or 'action' (keys: {z.files})")
        image, action = z["image"], z["action"].astype(np.float32)
        is_first = z["is_first"].astype(bool) if "is_first" in z.files else np.arange(len(image)) == 0
    dim = row.get("action_dim", action.shape[-1])
    if action.ndim == 2 and action.shape[1] > dim and not action[:, dim:].any():
        action = action[:, :dim]  # an online episode (--init-from) stores its actions zero-padded to the model's
    if (image.ndim != 4 or image.shape[-1] != 3 or image.dtype != np.uint8 or action.ndim != 2
            or len(action) != len(image) or action.shape[1] != row.get("action_dim", action.shape[1])
            or action.shape[1] > width):
        fail(f"episode file {path} has unexpected shapes: image {image.shape} {image.dtype}, action {action.shape} "
             f"(index says action dim {row.get('action_dim')})")
    check_actions(path, action)
    return {"image": image, "action": pad_actions(action, width), "reward": np.zeros(len(image), np.float32),
            "is_first": is_first}


def check_actions(path: Path, action: np.ndarray) -> None:
    """Actions must be finite and in [-1, 1]: a bad value would otherwise surface hours later, unnamed."""
    bad = ~np.isfinite(action) | (np.abs(action) > 1.0 + 1e-6)
    if bad.any():
        t, d = np.argwhere(bad)[0]
        fail(f"episode file {path} has an action outside [-1, 1] or not finite: action[{t}, {d}] = {action[t, d]} "
             f"({int(bad.sum())} such values); remove or re-collect that episode")


class SequenceReplay:
    """Episodes in memory; samples uniform random windows of seq_len steps (every valid start equally likely)."""

    def __init__(self):
        self.episodes: list[dict] = []
        self.steps = 0  # agent steps stored (rows minus the first row of every episode)

    def add(self, episode: dict) -> None:
        n = len(episode["image"])
        assert episode["image"].ndim == 4 and episode["image"].dtype == np.uint8, episode["image"].shape
        assert episode["action"].shape[0] == n and episode["reward"].shape == (n,)
        assert not self.episodes or episode["action"].shape[1] == self.episodes[0]["action"].shape[1]
        self.episodes.append(episode)
        self.steps += n - 1

    def __len__(self) -> int:
        return len(self.episodes)

    def sample(self, rng: np.random.Generator, batch: int, seq_len: int) -> dict:
        lengths = np.array([len(e["image"]) for e in self.episodes])
        starts = np.maximum(lengths - seq_len + 1, 0)
        if starts.sum() == 0:
            raise ValueError(f"no episode has {seq_len} steps")
        cum = np.cumsum(starts)
        flat = rng.integers(0, cum[-1], size=batch)
        eps = np.searchsorted(cum, flat, side="right")
        offs = flat - (cum[eps] - starts[eps])
        batch_ = {key: np.stack([self.episodes[e][key][o:o + seq_len] for e, o in zip(eps, offs)])
                  for key in ("image", "action", "reward", "is_first")}
        # Every window starts a sequence (as in pre-training, the release and DreamerV3): the model filters it
        # from a zero state, and the RSSM zeroes the action that led into its first frame.
        batch_["is_first"][:, 0] = True
        return batch_


def replay_path(out_dir: Path, index: int) -> Path:
    return out_dir / "replay" / f"ep-{index:06d}.npz"


def save_episode(path: Path, episode: dict) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **episode)
    write_atomic(path, buf.getvalue())


def load_episode(path: Path) -> dict:
    """An online episode of this run's replay (for --resume), checked like the offline ones."""
    try:
        with np.load(path, allow_pickle=False) as z:
            episode = {key: z[key] for key in ("image", "action", "reward", "is_first")}
    except Exception as e:  # noqa: BLE001 - missing, truncated or not an npz
        fail(f"replay episode {path} is missing or damaged ({type(e).__name__}: {e}); the run cannot resume "
             f"exactly: start it again in a new --out-dir")
    check_actions(path, episode["action"])
    return episode

# ----------------------------------------------------------------------------------------------------------
# Acting in the environment: the RL policy, the prior's windows, evaluation
# ----------------------------------------------------------------------------------------------------------

class PriorActor:
    """Runs pi_bc on the last 3 frames of the current episode."""

    def __init__(self, prior: BCPrior, device):
        self.prior, self.device, self.frames = prior, device, deque(maxlen=BC_FRAMES)

    def reset(self, image):
        self.frames.clear()
        self.frames.extend([image] * BC_FRAMES)

    def observe(self, image):
        self.frames.append(image)

    @torch.no_grad()
    def act(self) -> torch.Tensor:
        return self.prior(torch.as_tensor(np.stack(self.frames), device=self.device)[None])[0].clamp(-1.0, 1.0)


def run_episode(env, agent: Agent, rng: np.random.Generator, max_steps: int, mode: bool = False,
                prior: Optional[PriorActor] = None, prior_window: tuple = (0, 0), random_actions: bool = False,
                record: bool = False):
    """One episode. Step t uses pi_bc if prior_window[0] <= t < sum(prior_window), else random actions (warm-up
    without guidance) or the RL policy (its mode with mode=True). When the RL policy acts anywhere in the episode
    it filters every observation, so its state is right when it takes over.
    Returns (episode dict in replay format, (stats, the frames if record else None))."""
    device, A = agent.bins.device, env.action_dim
    image = env.reset()
    W = agent.cfg.act_dim  # the world model's padded action space
    images, actions, episode_rewards = [image], [np.zeros(W, np.float32)], [0.0]
    state, prev = None, torch.zeros(W, device=device)
    if prior is not None:
        prior.reset(image)
    successes, prior_steps, done, t = [], 0, False, 0
    # The RL policy's state is only needed if the policy acts at some step of this episode.
    uses_policy = not random_actions and not (prior is not None and prior_window[0] == 0
                                              and prior_window[1] >= max_steps)
    while not done and t < max_steps:
        action = None
        if uses_policy:
            action, state = agent.act(state, prev, image, mode)
        if prior is not None and prior_window[0] <= t < prior_window[0] + prior_window[1]:
            action, prior_steps = prior.act() * agent.act_mask, prior_steps + 1
        elif random_actions:
            action = torch.as_tensor(np.pad(rng.uniform(-1, 1, A), (0, W - A)).astype(np.float32),
                                     device=device)
        a = action.cpu().numpy().astype(np.float32)
        image, reward, done, info = env.step(a[:A])  # only the task's own dims reach the env
        if prior is not None:
            prior.observe(image)
        images.append(image)
        actions.append(a)
        episode_rewards.append(reward)
        successes.append(bool(info.get("success", False)))
        prev, t = action, t + 1
    episode = {"image": np.stack(images), "action": np.stack(actions).astype(np.float32),
               "reward": np.asarray(episode_rewards, np.float32), "is_first": np.arange(len(images)) == 0}
    discounts = agent.discount ** np.arange(len(episode_rewards) - 1)
    stats = {"return": float(np.sum(episode_rewards)), "length": t,
             "return_discounted": float(np.sum(discounts * np.asarray(episode_rewards[1:]))),
             "value_first": agent.first_value(images[0]),
             "success": bool(successes[-1]) if successes else False, "success_any": any(successes),
             "prior_steps": prior_steps}
    return episode, (stats, images if record else None)


def evaluate(env, agent: Agent, episodes: int, max_steps: int, rng) -> tuple[dict, list]:
    stats, video = [], None
    for i in range(episodes):
        _, (s, frames) = run_episode(env, agent, rng, max_steps, mode=True, record=(i == 0))
        stats.append(s)
        video = frames if i == 0 else video
    out = {"eval_return": float(np.mean([s["return"] for s in stats])),
           "eval_return_discounted": float(np.mean([s["return_discounted"] for s in stats])),
           "eval_value_first": float(np.mean([s["value_first"] for s in stats]))}
    if env.is_metaworld:
        out["eval_success"] = float(np.mean([s["success"] for s in stats]))
        out["eval_success_any"] = float(np.mean([s["success_any"] for s in stats]))
    return out, video

# ----------------------------------------------------------------------------------------------------------
# Files: errors, hashing, atomic writes, logs, checkpoints and upstream artefacts
# ----------------------------------------------------------------------------------------------------------

def fail(message: str):
    raise SystemExit(f"{SCRIPT}: error: {message}")


def keep_freed_memory() -> bool:
    """glibc only: serve large tensors from the heap and never give freed memory back. By default each large
    allocation is a fresh mmap whose pages fault in zeroed on first touch, and an update allocates gigabytes of
    activations. The gain has not been re-measured on this code (issue 12). Returns whether it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameter ids from malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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


def read_log_lines(path: Path) -> list:
    """The JSON lines of a log. A torn last line (a kill mid-write) is dropped; a bad line before it is an error."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                print(f"[finetune] {path}: dropped a torn last line")
                return lines[:-1]
            fail(f"{path} line {i + 1} is not JSON; the log is damaged (remove that line to resume)")
    return lines


def write_video(path: Path, frames: list) -> None:
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}{path.suffix}")
    imageio.mimwrite(tmp, np.stack(frames), fps=30, macro_block_size=16)
    os.replace(tmp, path)


def load_torch_file(path: Path, what: str, remedy: str) -> dict:
    """torch.load with weights_only=True (a shared file cannot run code); a damaged file is named, with a remedy."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, random bytes, pickled code: all are a damaged file here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(f"{path} ({what}) is damaged or not a checkpoint of this project ({type(e).__name__}: {first[:200]}); "
             f"{remedy}")
    if not isinstance(obj, dict):
        fail(f"{path} ({what}) does not hold a checkpoint dict; {remedy}")
    return obj


def resolve_size(args: Args, wm_ckpt: Optional[dict]) -> str:
    if args.size is not None:
        return args.size
    if wm_ckpt is None:
        return "xs"
    size = (wm_ckpt.get("args") or {}).get("size")
    if size not in SIZES:
        fail(f"cannot tell the checkpoint's size ({size!r}); pass --size")
    return size


def model_config_for(size: str) -> "ModelConfig":
    return ModelConfig(**SIZES[size])


def load_wm_checkpoint(path: Path) -> tuple[dict, str]:
    if not path.is_file():
        fail(f"checkpoint {path} not found (train one with pretrain_wm.py, or pass --no-pretrain)")
    sha = sha256_file(path)
    ckpt = load_torch_file(path, "the world-model checkpoint", "re-run pretrain_wm.py, or pass --no-pretrain")
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != WM_CHECKPOINT_FORMAT_VERSION \
            or "model_config" not in ckpt:
        fail(f"{path} is not a pretrain_wm.py checkpoint of format version {WM_CHECKPOINT_FORMAT_VERSION} "
             f"(format_version={ckpt.get('format_version') if isinstance(ckpt, dict) else None})")
    return ckpt, sha


def check_model_config(ckpt: dict, size: str, path: Path) -> "ModelConfig":
    want = asdict(model_config_for(size))
    got = dict(ckpt["model_config"])
    if got != want:
        diff = {k: (got.get(k), want.get(k)) for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)}
        fail(f"checkpoint {path} holds a world model of another size than --size {size}: "
             + ", ".join(f"{k}: checkpoint {a} vs {size} {b}" for k, (a, b) in diff.items()))
    return ModelConfig(**got)


def load_index(index_dir: Path, checkpoint_sha: str, checkpoint: Path):
    meta_path, faiss_path = index_dir / "index.json", index_dir / "index.faiss"
    if not meta_path.is_file() or not faiss_path.is_file():
        fail(f"no retrieval index in {index_dir} (expected index.faiss and index.json; build one with "
             f"`python retrieval.py build`, or pass --no-rehearsal --no-guidance)")
    rebuild = f"rebuild the index with `python retrieval.py build --checkpoint {checkpoint} --overwrite`"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"{meta_path} is damaged ({e}); {rebuild}")
    if not isinstance(meta, dict) or not isinstance(meta.get("rows"), list):
        fail(f"{meta_path} is not a retrieval index sidecar (no 'rows' list); {rebuild}")
    if meta.get("format_version") != INDEX_FORMAT_VERSION:
        fail(f"{meta_path} has format_version {meta.get('format_version')}, expected {INDEX_FORMAT_VERSION}")
    if meta.get("checkpoint_sha256") != checkpoint_sha:
        fail(f"the index in {index_dir} was built with another encoder (checkpoint sha256 "
             f"{str(meta.get('checkpoint_sha256'))[:16]}...) than {checkpoint} ({checkpoint_sha[:16]}...); "
             f"rebuild it with `python retrieval.py build --checkpoint {checkpoint}`")
    try:
        index = faiss.read_index(str(faiss_path))
    except Exception as e:  # noqa: BLE001 - faiss raises RuntimeError with its C++ message
        fail(f"{faiss_path} is damaged ({str(e).strip().splitlines()[0][:200]}); {rebuild}")
    if index.ntotal != len(meta["rows"]):
        fail(f"{faiss_path} holds {index.ntotal} vectors but {meta_path} lists {len(meta['rows'])} episodes; {rebuild}")
    return index, meta


def load_manifest(data_dir: Path, expected_sha: str) -> dict:
    path = data_dir / "manifest.json"
    if not path.is_file():
        fail(f"no manifest.json in {data_dir} (the offline data the index was built over)")
    raw = path.read_bytes()
    if sha256_bytes(raw) != expected_sha:
        fail(f"{path} differs from the manifest the index was built over (sha256 mismatch)")
    return json.loads(raw)  # its sha256 matches the one recorded at build time, so it parsed then


def rng_state(np_rng: np.random.Generator) -> dict:
    state = {"numpy": json.dumps(np_rng.bit_generator.state), "python": json.dumps(random.getstate()),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, np_rng: np.random.Generator) -> None:
    np_rng.bit_generator.state = json.loads(state["numpy"])
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, agent: Agent, prior: Optional[BCPrior], bc_opt_done: bool, counters: dict,
                    np_rng: np.random.Generator, args: Args, extra: dict) -> None:
    ckpt = {"format_version": FORMAT_VERSION, "script": SCRIPT, "args": asdict(args),
            "model_config": asdict(agent.cfg), "model": agent.wm.state_dict(),
            "reward": agent.reward.state_dict(), "actor": agent.actor.state_dict(),
            "critic": agent.critic.state_dict(), "slow_critic": agent.slow_critic.state_dict(),
            "return_norm": agent.return_norm.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in agent.optimizers().items()},
            "bc_prior": prior.state_dict() if prior is not None else None, "bc_done": bc_opt_done,
            "counters": dict(counters), "rng": rng_state(np_rng), **extra}
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    write_atomic(path, buf.getvalue())

# ----------------------------------------------------------------------------------------------------------
# Algorithm 1: the run's preamble and steps as functions, then main
# ----------------------------------------------------------------------------------------------------------

def variant_name(args: Args) -> str:
    """The ablation's name, as report.py groups runs (tests keep the two in agreement); "-packnet" with --packnet."""
    jsrl = args.guidance == "jsrl"
    if args.no_pretrain:
        name = "no-pretrain"  # DreamerV3 from scratch
    elif args.no_rehearsal and args.no_guidance:
        name = "pretrain-only"  # pre-trained world model, naive fine-tuning
    elif args.no_guidance:
        name = "no-guidance"
    elif args.no_rehearsal:
        name = "no-rehearsal" + ("-jsrl" if jsrl else "")
    else:
        name = "jsrl" if jsrl else "gsa"
    return name + ("-packnet" if args.packnet else "")


@dataclass
class Setup:
    """What main needs, read and checked before anything is written."""

    out_dir: Path
    resume: Optional[dict]  # the run's own checkpoint with --resume, else None
    device: torch.device
    wm_ckpt: Optional[dict]  # the pretrained world model (None with --no-pretrain)
    wm_sha: Optional[str]
    size: str
    cfg: "ModelConfig"
    index: object  # Faiss index, its sidecar and the data manifest (None without retrieval)
    meta: Optional[dict]
    manifest: Optional[dict]
    preset: dict  # AGENT_SIZES[size] with the flags that override it
    b_on: int  # online and rehearsal rows of a batch
    b_off: int
    use_guidance: bool
    use_rehearsal: bool
    wandb: object = None  # the wandb module with --track
    init: Optional[dict] = None  # --init-from: the earlier run's checkpoint (a new run only)
    # --init-from: the earlier runs whose online episodes join the retrieval candidates, oldest first:
    # [{"run": absolute run dir, "task": its task, "episodes": its replay episodes}]
    experience: list = dataclasses.field(default_factory=list)


def prepare(args: Args) -> Setup:
    """Validate every flag and read every upstream file (the run's checkpoint with --resume, the world model,
    the index and the manifest); nothing is written here, so a bad input changes nothing."""
    if args.task not in TASK_NAMES:
        fail(f"unknown task {args.task!r}; valid tasks: {', '.join(TASK_NAMES)}")
    check_ranges(args)
    wandb = import_wandb(args.track)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    use_guidance = not (args.no_pretrain or args.no_guidance)
    use_rehearsal = not (args.no_pretrain or args.no_rehearsal) and args.offline_ratio > 0
    out_dir = Path(args.out_dir or f"runs/finetune/{args.task}-{variant_name(args)}-s{args.seed}")
    ckpt_path = out_dir / "ckpt.pt"
    resume, inherited = None, {}
    check_out_dir(out_dir)
    if args.resume:
        if ckpt_path.is_file():
            resume = load_torch_file(ckpt_path, "the run's checkpoint",
                                     "start the run again in a new --out-dir (or restore ckpt.pt from a backup)")
            if resume.get("format_version") != FORMAT_VERSION or resume.get("script") != SCRIPT:
                fail(f"{ckpt_path} is not a {SCRIPT} checkpoint of format version {FORMAT_VERSION}")
            diff, inherited = resume_differences(dict(resume["args"]), args, run_preset(resume, out_dir))
            for k, value in inherited.items():  # so the run's next checkpoint records them again
                setattr(args, k, value)
            if diff:
                fail(f"--resume with settings that differ from the run in {out_dir}: {', '.join(diff)}")
        else:
            print(f"[finetune] --resume: no checkpoint in {out_dir}; starting a fresh run there")
    elif out_dir.exists() and any(out_dir.iterdir()):
        fail(f"{out_dir} exists and is not empty; pass --resume to continue that run or choose another --out-dir")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)

    wm_ckpt, wm_sha = (None, None) if args.no_pretrain else load_wm_checkpoint(Path(args.checkpoint))
    size = resolve_size(args, wm_ckpt)
    cfg = model_config_for(size) if args.no_pretrain else check_model_config(wm_ckpt, size, Path(args.checkpoint))
    # Stock tasks may bring bodies the offline data lacks: from scratch any width goes (humanoid 21, dog 38 dims);
    # a pre-trained model takes at most its padded width, and retrieval needs episodes of the task's own body.
    embodiment, action_dim = embodiment_of(args.task), task_action_dim(args.task)
    pretrained_on = (wm_ckpt or {}).get("embodiments") or []
    if args.no_pretrain and action_dim > cfg.act_dim:
        cfg = dataclasses.replace(cfg, act_dim=action_dim)
    if action_dim > cfg.act_dim:
        fail(f"{args.task} has {action_dim} action dims, more than the {cfg.act_dim} the world model in "
             f"{args.checkpoint} takes (pre-trained on {', '.join(pretrained_on) or 'other embodiments'}); "
             f"learn it from scratch with --no-pretrain")
    init, experience = None, list((resume or {}).get("experience") or [])  # a resumed run keeps its own list
    if args.init_from is not None and resume is None:
        init, experience = load_init_run(args, size, cfg, wm_sha)
    index = meta = manifest = None
    if use_guidance or use_rehearsal:
        index, meta = load_index(Path(args.index_dir), wm_sha, Path(args.checkpoint))
        held = sorted({str(row.get("embodiment")) for row in meta["rows"]}
                      | {embodiment_of(run["task"]) for run in experience})
        if embodiment not in held:
            fail(f"the index in {args.index_dir} holds no {embodiment} episode (only {', '.join(held)}), so "
                 f"{args.task} has nothing to rehearse or to clone the prior from; fine-tune the pre-trained world "
                 f"model without them (--no-rehearsal --no-guidance) or learn from scratch (--no-pretrain)")
        manifest = load_manifest(Path(args.data_dir), meta.get("manifest_sha256"))
    if pretrained_on and embodiment not in pretrained_on:
        print(f"[finetune] note: the world model was pre-trained on {', '.join(pretrained_on)}, not {embodiment}; "
              f"it meets this body only here")
    preset = dict(AGENT_SIZES[size])
    overrides = {key: getattr(args, key) for key in PRESET_FLAGS}
    preset.update({key: value for key, value in {**overrides, **inherited}.items() if value is not None})
    B = preset["batch_size"]
    b_off = int(round(B * args.offline_ratio)) if use_rehearsal else 0
    if B - b_off < 1:
        fail(f"batch {B} with --offline-ratio {args.offline_ratio} leaves no online rows")
    return Setup(out_dir, resume, device, wm_ckpt, wm_sha, size, cfg, index, meta, manifest, preset, B - b_off,
                 b_off, use_guidance, use_rehearsal, wandb, init, experience)


# Settings a --resume may change; every other setting must equal the run's own (sweep.py uses the same rule).
RESUME_MAY_DIFFER = {"resume", "env_steps", "threads", "device", "precision", "compile", "out_dir", "eval_every",
                     "eval_episodes", "checkpoint_every", "video", "track", "wandb_project_name", "wandb_entity"}


def resume_differences(saved: dict, args: Args, preset: Optional[dict] = None) -> tuple[list, dict]:
    """A resume's settings against the run's saved ones -> (["key (there, now)" for each that differs and may
    not], the preset flags left unset now that keep the run's own value: the flag it was given, else the value its
    size preset had when it ran, `preset`). So a run keeps its train ratio, batch and the rest when the presets
    change between versions, and runs older than a flag's preset default (which saved a fixed default, e.g.
    critic_lr 8e-5) resume with it; an unset preset flag is never a difference. A flag the run's version did not
    have yet (absent from its saved settings) counts as its default, whose behaviour that version had (so runs
    from before --packnet resume)."""
    preset = preset or {}
    defaults = {f.name: f.default for f in dataclasses.fields(Args)}
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    inherited = {k: saved[k] if saved.get(k) is not None else preset[k] for k in PRESET_FLAGS
                 if getattr(args, k) is None and (saved.get(k) is not None or k in preset)}
    diff = [f"{k} ({saved.get(k)!r} there, {getattr(args, k)!r} now)" for k in asdict(args)
            if k not in RESUME_MAY_DIFFER and k not in inherited and saved.get(k) != getattr(args, k)]
    return diff, inherited


def run_preset(resume: dict, out_dir: Path) -> dict:
    """The size preset a run resolved when it ran: saved in its checkpoint, or (checkpoints from before that) in
    its args.json's "resolved"; {} if neither has it."""
    if resume.get("preset"):
        return dict(resume["preset"])
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return dict(json.loads((out_dir / "args.json").read_text()).get("resolved") or {})
    return {}


def load_init_run(args: Args, size: str, cfg: "ModelConfig", wm_sha: Optional[str]) -> tuple[dict, list]:
    """--init-from (task adaptation, Sec. 4.2): the earlier run's checkpoint, checked against this run (same
    embodiment and action dims, same size and world-model config, same pre-trained checkpoint, so that the index
    still fits), and the earlier runs whose online episodes become retrieval candidates: the ones the earlier run
    itself started from, then the earlier run. Nothing is written. -> (its checkpoint, the list of runs)."""
    init_dir = Path(args.init_from)
    if not init_dir.is_dir():
        fail(f"--init-from {init_dir}: no such run directory")
    path = init_dir / "ckpt.pt"
    if not path.is_file():
        fail(f"--init-from {init_dir} holds no ckpt.pt (not a {SCRIPT} run directory, or one that never saved)")
    init = load_torch_file(path, "the earlier run's checkpoint (--init-from)",
                           "restore it from a backup or start from another run")
    keys = ("model", "actor", "model_config", "args", "counters")
    if init.get("format_version") != FORMAT_VERSION or init.get("script") != SCRIPT \
            or any(k not in init for k in keys):
        fail(f"--init-from {path} is not a {SCRIPT} checkpoint of format version {FORMAT_VERSION}")
    then = str((init.get("args") or {}).get("task"))
    if then not in TASK_NAMES:
        fail(f"--init-from {path} is a run of an unknown task {then!r}")
    if (embodiment_of(then), task_action_dim(then)) != (embodiment_of(args.task), task_action_dim(args.task)):
        fail(f"--init-from {init_dir} learned {then} ({embodiment_of(then)}, {task_action_dim(then)} action dims) "
             f"but {args.task} is a {embodiment_of(args.task)} task ({task_action_dim(args.task)} action dims); a "
             f"run carries over only to tasks of its own embodiment")
    then_scratch = bool((init.get("args") or {}).get("no_pretrain"))
    if then_scratch and not args.no_pretrain:
        fail(f"--init-from {init_dir} was learned from scratch (--no-pretrain); start a task from a run that "
             f"fine-tuned {args.checkpoint}, or continue its sequence from scratch too (--no-pretrain)")
    if args.no_pretrain and not then_scratch:
        fail(f"--init-from {init_dir} fine-tuned a pre-trained world model, but --no-pretrain continues a sequence "
             f"learned from scratch; drop --no-pretrain, or start from a --no-pretrain run")
    packnet = init.get("packnet")
    if args.packnet and packnet is None:
        fail(f"--packnet --init-from {init_dir}: that run did not use --packnet, so no actor weight is marked as "
             f"an earlier task's; start the PackNet sequence from a --packnet run (or without --init-from)")
    if args.packnet and not packnet["pruned"]:
        fail(f"--packnet --init-from {init_dir}: that run stopped before its pruning point (--packnet-prune-at), "
             f"so its task owns no weights yet; finish it first (--resume)")
    if init.get("size") != size:
        fail(f"--init-from {init_dir} is a run of size {init.get('size')!r}, this run is of size {size!r} (--size, "
             f"or the size of {args.checkpoint}); the world model and actor would not fit")
    if dict(init["model_config"]) != asdict(cfg):
        got, want = dict(init["model_config"]), asdict(cfg)
        fail(f"--init-from {init_dir} holds a world model of another configuration than this run's "
             f"({f'--no-pretrain, size {size}' if args.no_pretrain else args.checkpoint}): "
             + ", ".join(f"{k}: earlier run {got.get(k)} vs {want.get(k)}" for k in sorted(set(got) | set(want))
                         if got.get(k) != want.get(k)))
    then_sha = init.get("wm_sha256")
    if not args.no_pretrain:  # (from scratch, neither run has a pre-trained checkpoint to compare)
        if then_sha is None:
            print(f"[finetune] note: {path} does not record its pre-trained checkpoint; assuming {args.checkpoint}")
        elif then_sha != wm_sha:
            fail(f"--init-from {init_dir} fine-tuned another pre-trained checkpoint (sha256 {then_sha[:16]}...) "
                 f"than --checkpoint {args.checkpoint} ({wm_sha[:16]}...), whose index retrieval uses; pass the "
                 f"checkpoint the earlier run started from")
    episodes = int(init["counters"].get("episodes", 0))
    if init["counters"].get("env_frames", 0) < (init.get("args") or {}).get("env_steps", 0):
        print(f"[finetune] note: --init-from {init_dir} stopped at {init['counters'].get('env_frames')} of its "
              f"{init['args']['env_steps']} frames; starting from its last checkpoint")
    experience = [dict(run) for run in init.get("experience") or []]
    experience.append({"run": str(init_dir.resolve()), "task": then, "episodes": episodes})
    for run in [] if args.no_pretrain else experience:  # from scratch nothing is retrieved
        gone = [p for p in (replay_path(Path(run["run"]), i) for i in range(int(run["episodes"]))) if not p.is_file()]
        if gone:
            fail(f"{gone[0]} is missing ({len(gone)} of the {run['episodes']} online episodes of the earlier "
                 f"{run['task']} run {run['run']}); restore them, or start from a run whose episodes are all there")
    return init, experience


def build_agent(args: Args, setup: Setup, action_dim: int) -> Agent:
    """The agent around the pretrained world model, whole (Sec. 3.3), or a fresh one (--no-pretrain)."""
    kl = (1.0, 0.1, 1.0)  # beta_dyn, beta_rep, free nats: pre-training's own (from its args when pretrained)
    if setup.wm_ckpt is not None:
        pre = setup.wm_ckpt.get("args") or {}
        kl = (pre.get("dyn_scale", 1.0), pre.get("rep_scale", 0.1), pre.get("free_nats", 1.0))
    p = setup.preset
    agent = Agent(setup.cfg, action_dim, units=p["units"], layers=p["layers"], horizon=p["horizon"],
                  discount=args.discount, return_lambda=args.return_lambda, entropy_scale=args.entropy_scale,
                  wm_lr=args.wm_lr, actor_lr=args.actor_lr, critic_lr=p["critic_lr"],
                  critic_bootstrap=p["critic_bootstrap"], kl=kl,
                  precision=args.precision).to(setup.device)
    if setup.wm_ckpt is not None:
        agent.wm.load_state_dict(setup.wm_ckpt["model"], strict=True)
    if setup.init is not None:
        # Task adaptation (Sec. 4.2): the earlier task's world model and actor carry over; the reward head, critic,
        # slow critic, return scale and every optimiser stay as built, since rewards differ between tasks.
        try:
            agent.wm.load_state_dict(setup.init["model"], strict=True)
            agent.actor.load_state_dict(setup.init["actor"], strict=True)
        except RuntimeError as e:
            fail(f"--init-from {args.init_from}: its world model or actor does not fit this run's "
                 f"({str(e).strip().splitlines()[0][:200]}...)")
    if args.packnet and setup.resume is None:  # a resumed run gets its own back in restore()
        earlier = (setup.init or {}).get("packnet")
        agent.packnet = PackNet(agent.actor, task=earlier["task"] + 1 if earlier else 1, keep=args.packnet_keep,
                                owner=earlier["owner"] if earlier else None)
        if not any(bool(o.eq(0).any()) for o in agent.packnet.owner.values()):
            fail(f"--packnet --init-from {args.init_from}: the earlier tasks own every actor weight (one of them "
                 f"kept all its free weights, --packnet-keep 1.0), so this task has none left to learn with")
    if args.compile:
        agent.compile_loops()
    return agent


def retrieve_rehearsal_set(args: Args, setup: Setup, agent: Agent, env) -> tuple:
    """Step 1 (Eq. 4): the k offline episodes whose first frames are nearest to the task's reset frames, of the
    task's action dim, encoded by the agent's own encoder (with --init-from, the pre-trained one the index was built
    with; the earlier runs' online episodes are candidates too). A resumed run reloads the set it retrieved.
    -> (D_r as a SequenceReplay, [(index row, distance)], its make-up as retrieval_summary gives it)."""
    A = env.action_dim
    if setup.resume is not None:
        rows = {r["path"]: r for r in setup.meta["rows"]}
        rows.update({r["path"]: r for r in setup.resume.get("retrieved_online") or []})  # --init-from's
        missing = [path for path, _ in setup.resume["retrieved"] if path not in rows]
        if missing:
            fail(f"the index in {args.index_dir} changed since this run started: {missing[0]} is gone")
        pairs = [(rows[path], dist) for path, dist in setup.resume["retrieved"]]
    else:
        encoder = agent.wm.encoder if setup.init is None else index_encoder(setup, agent)
        frames = render_reset_frames(args.task, args.query_resets, args.seed)
        with torch.no_grad():
            query = encoder(torch.as_tensor(frames, device=setup.device)).float().cpu().numpy()
        if setup.experience:
            add_experience(setup, encoder)
        t0 = time.time()
        pairs = retrieve(setup.index, setup.meta, query, args.k, action_dim=A)
        print(f"[retrieval] {len(pairs)} episodes in {time.time() - t0:.2f}s (k={args.k}, action dim {A})")
    if not pairs:
        fail(f"the index in {args.index_dir} has no episode with action dim {A} for {args.task}; "
             f"collect data for {env.embodiment} or pass --no-rehearsal --no-guidance")
    shas = {ep["path"]: ep["sha256"] for ep in setup.manifest["episodes"]}
    offline = SequenceReplay()
    for row, _ in pairs:
        sha = row.get("sha256") if row.get("source") == "online" else shas.get(row["path"])
        if sha is None:
            fail(f"retrieved episode {row['path']} is not in {args.data_dir}/manifest.json")
        offline.add(load_offline_episode(Path(args.data_dir), row, sha, setup.cfg.act_dim))  # reward-free
    L = setup.preset["seq_len"]
    if setup.use_rehearsal and all(len(e["image"]) < L for e in offline.episodes):
        fail(f"no retrieved episode has {L} steps (--seq-len)")
    summary = retrieval_summary(args, pairs, A)
    print(f"[retrieval] D_r: {len(offline)} episodes, {offline.steps} steps; by embodiment "
          f"{summary['by_embodiment']}; by source task {summary['by_source_task']}"
          + (f"; by source {summary['by_source']}" if setup.experience else ""))
    if summary["mixed_embodiments"]:  # e.g. walker and cheetah share 6 action dims
        print(f"[retrieval] WARNING: D_r mixes embodiments {summary['by_embodiment']}: the prior is cloned from, and "
              f"rehearsal replays, another body's episodes too. With a small dataset, a --k of at most the task "
              f"embodiment's episode count avoids this.", flush=True)
    return offline, pairs, summary


def retrieval_summary(args: Args, pairs: list, action_dim: int) -> dict:
    """What D_r is made of: counts by embodiment, by source task and by source (the offline data, or the online
    episodes of an earlier task with --init-from), and every episode with its distance."""
    by_embodiment = dict(Counter(row["embodiment"] for row, _ in pairs))
    source = lambda row: f"online/{row.get('task')}" if row.get("source") == "online" else "offline"  # noqa: E731
    return {"k": args.k, "action_dim": action_dim, "mixed_embodiments": len(by_embodiment) > 1,
            "by_embodiment": by_embodiment,
            "by_source_task": dict(Counter(f"{row['embodiment']}/{row.get('task')}" for row, _ in pairs)),
            "by_source": dict(Counter(source(row) for row, _ in pairs)),
            "episodes": [{"path": row["path"], "embodiment": row["embodiment"], "task": row.get("task"),
                          "source": source(row), "distance": dist} for row, dist in pairs]}


def index_encoder(setup: Setup, agent: Agent) -> "Encoder":
    """The pre-trained checkpoint's encoder, the one the index was built with. With --init-from the agent's own
    encoder has been fine-tuned on earlier tasks, and Eq. 4 compares features of one and the same encoder."""
    encoder = copy.deepcopy(agent.wm.encoder)  # the same module; a copy draws no random numbers
    encoder.load_state_dict({k[len("encoder."):]: v for k, v in setup.wm_ckpt["model"].items()
                             if k.startswith("encoder.")}, strict=True)
    return encoder.eval()


def add_experience(setup: Setup, encoder: "Encoder", batch: int = 64) -> None:
    """Task adaptation (Sec. 4.2): the earlier runs' online episodes join the offline episodes as retrieval
    candidates. Their first frames are encoded like the index's (by the index's encoder) and added to the index as
    read into memory, with a row each (absolute path, sha256, source "online"); the index files are not touched.
    Rehearsal then reads them like offline episodes, sha256-checked and without their rewards."""
    rows, frames, t0 = [], [], time.time()
    size = setup.cfg.image_size
    for run in setup.experience:
        for i in range(int(run["episodes"])):
            path = replay_path(Path(run["run"]), i)
            try:
                raw = path.read_bytes()
                with np.load(io.BytesIO(raw), allow_pickle=False) as z:
                    image = z["image"]
            except Exception as e:  # noqa: BLE001 - missing, truncated or not an npz
                fail(f"online episode {path} of the earlier {run['task']} run is missing or damaged "
                     f"({type(e).__name__}: {str(e)[:200]})")
            if image.ndim != 4 or image.shape[1:] != (size, size, 3) or image.dtype != np.uint8:
                fail(f"online episode {path} has images {image.dtype} {list(image.shape)}, expected uint8 "
                     f"[T+1, {size}, {size}, 3]")
            frames.append(image[0])
            rows.append({"path": str(path), "embodiment": embodiment_of(run["task"]), "task": run["task"],
                         "action_dim": task_action_dim(run["task"]), "length": len(image) - 1, "source": "online",
                         "sha256": sha256_bytes(raw)})
    with torch.no_grad():
        for lo in range(0, len(frames), batch):
            x = torch.as_tensor(np.stack(frames[lo:lo + batch]), device=setup.device)
            setup.index.add(np.ascontiguousarray(encoder(x).float().cpu().numpy()))
    setup.meta = {**setup.meta, "rows": setup.meta["rows"] + rows}
    print(f"[retrieval] {len(rows)} online episodes of {len(setup.experience)} earlier run(s) "
          f"({', '.join(run['task'] for run in setup.experience)}) joined the {setup.index.ntotal - len(rows)} "
          f"offline candidates in {time.time() - t0:.1f}s")


def train_prior(args: Args, setup: Setup, offline: SequenceReplay, action_dim: int, np_rng,
                logs: "RunLogs") -> BCPrior:
    """Step 2: behaviour-clone pi_bc on D_r (or reload it on resume)."""
    p = setup.preset
    prior = BCPrior(setup.cfg.act_dim, p["bc_depth"], p["bc_units"]).to(setup.device)
    if setup.resume is not None and setup.resume.get("bc_done"):
        prior.load_state_dict(setup.resume["bc_prior"])
    else:
        t0 = time.time()
        curve = train_bc(prior, offline.episodes, p["bc_steps"], p["bc_batch"], args.bc_lr, action_dim, np_rng,
                         setup.device)
        for step, value in curve["heldout"]:
            logs.scalars({"bc/heldout_mse": value}, step, axis="bc_step")
        write_json_atomic(setup.out_dir / "bc.json", {**curve, "seconds": time.time() - t0})
        print(f"[bc] done in {time.time() - t0:.0f}s; kept the weights of step {curve['best_step']}")
    return prior.eval()


def restore(setup: Setup, agent: Agent, np_rng, online: SequenceReplay, counters: dict) -> None:
    """Everything of a resumed run but the simulator: weights, optimisers, return normalisation, RNG states and
    the online replay (reread from its episode files)."""
    ckpt = setup.resume
    agent.wm.load_state_dict(ckpt["model"])
    for name in ("reward", "actor", "critic", "slow_critic", "return_norm"):
        getattr(agent, name).load_state_dict(ckpt[name])
    for name, opt in agent.optimizers().items():
        opt.load_state_dict(ckpt["optimizers"][name])
    if ckpt.get("packnet") is not None:  # after the actor's weights: the fixed ones are read from them
        agent.packnet = PackNet(agent.actor, **ckpt["packnet"])
    set_rng_state(ckpt["rng"], np_rng)
    for i in range(counters["episodes"]):
        online.add(load_episode(replay_path(setup.out_dir, i)))
    print(f"[finetune] resumed at {counters['env_frames']} frames, {counters['episodes']} episodes, "
          f"{counters['updates']} updates")


class RunLogs:
    """TensorBoard plus three JSON-lines logs: metrics.jsonl (evaluations), train.jsonl (mean losses of each
    episode's updates) and episodes.jsonl (every collected episode). On resume, lines after the checkpoint's
    env frame count are dropped, so no row is duplicated or missing. With --track, every TensorBoard scalar is
    also logged to W&B (`tracker`), against env frames (the BC curve: against its step)."""

    NAMES = ("metrics", "train", "episodes")
    AXES = {"eval/*": "env_steps", "episode/*": "env_steps", "train/*": "env_steps", "bc/*": "bc_step"}

    def __init__(self, out_dir: Path, env_frames: int, tracker=None):
        for name in self.NAMES:
            path = out_dir / f"{name}.jsonl"
            if path.is_file():
                kept = [line for line in read_log_lines(path) if json.loads(line)["env_steps"] <= env_frames]
                write_atomic(path, "".join(line + "\n" for line in kept).encode())
        self.files = {name: open(out_dir / f"{name}.jsonl", "a") for name in self.NAMES}
        self.tb = SummaryWriter(str(out_dir / "tb"))
        self.tracker = tracker

    def scalars(self, values: dict, step: int, axis: str = "env_steps") -> None:
        """TensorBoard scalars at `step`; mirrored to W&B with `axis` = step (see AXES)."""
        for key, value in values.items():
            self.tb.add_scalar(key, value, step)
        if self.tracker is not None and values:
            self.tracker.log({axis: step, **values})

    def write(self, name: str, line: dict, scalars: Optional[dict] = None) -> None:
        self.files[name].write(json.dumps(line) + "\n")
        self.files[name].flush()
        self.scalars(scalars or {}, line["env_steps"])

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.tb.close()
        stop_tracking(self.tracker)


def train_updates(agent: Agent, online: SequenceReplay, offline: Optional[SequenceReplay], setup: Setup,
                  counters: dict, np_rng) -> dict:
    """Step 4: the updates now due at the train ratio, counted from where training started. Each batch is
    b_on online sequences and b_off rehearsal sequences from D_r. -> mean metrics of these updates ({} if none)."""
    B, L = setup.preset["batch_size"], setup.preset["seq_len"]
    owed = int((counters["agent_steps"] - counters["train_origin"]) * setup.preset["train_ratio"] / (B * L))
    due, summed, t_note = owed - counters["updates"], {}, time.time()
    for i in range(max(due, 0)):
        if time.time() - t_note > 60:  # a progress line during a long run of updates
            print(f"[finetune] update {i}/{due} of this episode ({counters['updates']} in all)", flush=True)
            t_note = time.time()
        on = online.sample(np_rng, setup.b_on, L)
        off = offline.sample(np_rng, setup.b_off, L) if setup.b_off else None
        for key, value in agent.update(to_batch(on, off, setup.device)).items():
            summed[key] = summed.get(key, 0.0) + value
        counters["updates"] += 1
    return {key: value / due for key, value in summed.items()} | ({"updates_this_episode": due} if due > 0 else {})


def open_run_dir(args: Args, setup: Setup, summary: Optional[dict]) -> None:
    """The run directory, written only once every input has been checked: args.json (the resolved preset too)
    and, for a new run with retrieval, retrieval.json."""
    out_dir = setup.out_dir
    if out_dir.is_dir():
        sweep_stale_temporaries(out_dir, out_dir / "replay", out_dir / "videos")
    (out_dir / "replay").mkdir(parents=True, exist_ok=True)
    (out_dir / "videos").mkdir(exist_ok=True)
    write_json_atomic(out_dir / "args.json", {**asdict(args), "resolved_size": setup.size, "resolved": setup.preset,
                                              "device": str(setup.device), "resolved_precision":
                                              "bf16" if uses_bf16(args.precision, setup.device.type) else "fp32"})
    if summary and setup.resume is None:
        write_json_atomic(out_dir / "retrieval.json", summary)


def collect_episode(args: Args, setup: Setup, env, agent: Agent, prior: Optional[BCPrior], np_rng, max_steps: int,
                    warm: bool, p: float) -> tuple:
    """Step 3: one training episode. In the warm-up pi_bc drives it whole (random actions without guidance);
    later, with probability p, pi_bc drives a random window of it (execution guidance) and the RL policy the
    rest. -> (episode in replay format, stats, the prior's window (first step, steps))."""
    window = (0, 0)
    if warm and setup.use_guidance:
        window = (0, max_steps)
    elif setup.use_guidance and np_rng.random() < p:
        window = guidance_window(max_steps, np_rng, args.guidance)
    agent.eval()
    episode, (stats, _) = run_episode(env, agent, np_rng, max_steps, prior_window=window,
                                      prior=PriorActor(prior, setup.device) if prior is not None else None,
                                      random_actions=warm and not setup.use_guidance)
    agent.train()
    return episode, stats, window


def evaluate_policy(args: Args, setup: Setup, eval_env, agent: Agent, np_rng, max_steps: int, env_frames: int,
                    logs: "RunLogs", extra: dict) -> None:
    """Step 5: the RL policy's mode (no prior) over eval_episodes episodes; a line in metrics.jsonl, a video."""
    agent.eval()
    result, video = evaluate(eval_env, agent, setup.preset["eval_episodes"], max_steps, np_rng)
    agent.train()
    logs.write("metrics", {"env_steps": env_frames, **result, **extra}, {f"eval/{k[5:]}": v for k, v in result.items()})
    if args.video and video:
        write_video(setup.out_dir / "videos" / f"eval-{env_frames:07d}.mp4", video)
    print(f"[eval] {env_frames} frames: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))


@fail_on_full_disk("continue with --resume (the last checkpoint is kept)")
def main(args: Args) -> None:
    wall0 = time.time()
    setup = prepare(args)
    if setup.device.type == "cpu":
        keep_freed_memory()
    out_dir, preset, use_guidance = setup.out_dir, setup.preset, setup.use_guidance
    ckpt_path = out_dir / "ckpt.pt"
    # The train env is seeded by the seed and (on resume) the episode count: simulator state cannot be
    # checkpointed, so a resumed run's later episodes differ from an uninterrupted run's.
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    np_rng = np.random.default_rng(args.seed)
    counters = {"env_frames": 0, "agent_steps": 0, "episodes": 0, "updates": 0, "evals": 0, "wall_time": 0.0,
                "last_ckpt_frames": 0, "train_origin": -1}  # train_origin: agent steps when training began
    counters.update(setup.resume["counters"] if setup.resume is not None else {})
    env, eval_env = make_env(args.task, seed=args.seed + 1000 * counters["episodes"]), None
    max_steps = env.max_steps if args.max_episode_steps is None else min(env.max_steps, args.max_episode_steps)
    agent = build_agent(args, setup, env.action_dim)
    print(f"[finetune] {args.task} ({env.embodiment}, {env.action_dim} action dims), size {setup.size}, variant "
          f"{variant_name(args)}, world model {sum(p.numel() for p in agent.wm.parameters()) / 1e6:.2f}M params, "
          f"device {setup.device}, {'bf16' if uses_bf16(args.precision, setup.device.type) else 'fp32'}"
          f"{', compiled loops' if args.compile else ''}, out {out_dir}")

    # 1. Retrieval of D_r (Eq. 4), then the run directory (only now: every input has been checked).
    use_retrieval = use_guidance or setup.use_rehearsal
    offline, pairs, summary = retrieve_rehearsal_set(args, setup, agent, env) if use_retrieval else (None, [], None)
    open_run_dir(args, setup, summary)
    tracker = start_tracking(setup.wandb, args, f"{args.task}-{variant_name(args)}-s{args.seed}", out_dir,
                             json.loads((out_dir / "args.json").read_text()), RunLogs.AXES)  # args + resolved
    logs = RunLogs(out_dir, counters["env_frames"], tracker)

    # 2. The prior pi_bc, cloned from D_r.
    prior = train_prior(args, setup, offline, env.action_dim, np_rng, logs) if use_guidance else None
    g_start, g_end, g_frames = guidance_schedule(args, env.is_metaworld)
    online = SequenceReplay()
    if setup.resume is not None:
        restore(setup, agent, np_rng, online, counters)
    wall_offset, setup.resume, setup.wm_ckpt, setup.init = counters["wall_time"], None, None, None

    def checkpoint():
        counters["wall_time"] = wall_offset + time.time() - wall0
        counters["last_ckpt_frames"] = counters["env_frames"]
        save_checkpoint(ckpt_path, agent, prior, use_guidance, counters, np_rng, args,
                        {"size": setup.size, "preset": setup.preset, "task": args.task,
                         "retrieved": [[r["path"], d] for r, d in pairs],
                         "guidance": {"start": g_start, "end": g_end, "frames": g_frames}, "wm_sha256": setup.wm_sha,
                         # task adaptation: the earlier runs (for the next --init-from) and D_r's online rows
                         "experience": setup.experience,
                         "packnet": agent.packnet.state() if agent.packnet is not None else None,
                         "retrieved_online": [r for r, _ in pairs if r.get("source") == "online"]})

    if counters["episodes"] == 0:
        checkpoint()  # the prior is kept, so a resume does not clone it again
    warmup_total = max(preset["warmup_frames"], preset["warmup_episodes"] * max_steps * ACTION_REPEAT)
    print(f"[finetune] batch {setup.b_on}+{setup.b_off} x {preset['seq_len']}, horizon {preset['horizon']}, train "
          f"ratio {preset['train_ratio']}, warm-up {warmup_total} frames, guidance "
          f"{f'{args.guidance} p {g_start}->{g_end} over {g_frames} frames' if use_guidance else 'off'}", flush=True)
    rate_t, rate_frames = time.time(), counters["env_frames"]
    try:
        while counters["env_frames"] < args.env_steps:
            # 3. Collect one episode (the warm-up, or guidance with probability p) into the online replay.
            warm = counters["env_frames"] < warmup_total
            p = guidance_probability(counters["env_frames"], g_start, g_end, g_frames) if use_guidance else 0.0
            episode, stats, window = collect_episode(args, setup, env, agent, prior, np_rng, max_steps, warm, p)
            save_episode(replay_path(out_dir, counters["episodes"]), episode)
            online.add(episode)
            counters["episodes"] += 1
            counters["agent_steps"] += stats["length"]
            counters["env_frames"] += stats["length"] * ACTION_REPEAT
            line = {"env_steps": counters["env_frames"], "episode": counters["episodes"] - 1, "warmup": warm,
                    "guidance_p": p, "prior_first": window[0],
                    **{k: stats[k] for k in ("return", "length", "prior_steps", "return_discounted", "value_first")},
                    **({k: stats[k] for k in ("success", "success_any")} if env.is_metaworld else {})}
            logs.write("episodes", line, {"episode/return": stats["return"], "episode/guidance_p": p,
                                          "episode/prior_steps": stats["prior_steps"]})

            # 4. Train (the release's timing): from the episode that brings the replay to train_after_episodes
            # (or ends the warm-up, if sooner), at the train ratio, with no catch-up for the earlier steps.
            if counters["train_origin"] < 0 and (counters["episodes"] >= args.train_after_episodes
                                                 or counters["env_frames"] >= warmup_total):
                counters["train_origin"] = counters["agent_steps"]
                print(f"[finetune] training starts after {counters['episodes']} episodes")
            means = {}
            if counters["train_origin"] >= 0:
                means = train_updates(agent, online, offline, setup, counters, np_rng)
            if agent.packnet is not None and not agent.packnet.pruned \
                    and counters["env_frames"] >= args.packnet_prune_at * args.env_steps:
                counts = agent.packnet.prune()
                kept, left = sum(k for k, _ in counts.values()), sum(f for _, f in counts.values())
                logs.scalars({"packnet/weights_kept": kept, "packnet/weights_free": left}, counters["env_frames"])
                print(f"[packnet] task {agent.packnet.task} pruned at {counters['env_frames']} frames: it keeps {kept} "
                      f"actor weights and leaves {left} free for later tasks; the kept ones retrain from here")
            if means:
                bad = agent.diverged()
                if bad:
                    fail(f"the weights of the {', '.join(bad)} are no longer finite after update {counters['updates']} "
                         f"(learning rates too high?); stopped before overwriting the last checkpoint {ckpt_path}")
                logs.write("train", {"env_steps": counters["env_frames"], "train_updates": counters["updates"],
                                     **means}, {f"train/{k}": v for k, v in means.items()})
            fps = (counters["env_frames"] - rate_frames) / max(time.time() - rate_t, 1e-9)
            eta = (args.env_steps - counters["env_frames"]) / max(fps, 1e-9) / 60
            print(f"[finetune] {counters['env_frames']}/{args.env_steps} frames | ep {counters['episodes']} return "
                  f"{stats['return']:.1f} prior {stats['prior_steps']}/{stats['length']} p {p:.2f} | updates "
                  f"{counters['updates']} | {fps:.1f} frames/s | eta {eta:.1f} min"
                  + (f" | wm {means['wm_loss']:.3f} actor {means['actor_loss']:.3f}" if means else ""), flush=True)

            # 5. Evaluate the RL policy's mode (no prior) every eval_every frames, and checkpoint.
            done = counters["env_frames"] >= args.env_steps
            if counters["env_frames"] >= (counters["evals"] + 1) * preset["eval_every"] or done:
                eval_env = eval_env or make_env(args.task, seed=args.seed + 10_000 + counters["evals"])
                counters["evals"] = max(counters["evals"] + 1, counters["env_frames"] // preset["eval_every"])
                evaluate_policy(args, setup, eval_env, agent, np_rng, max_steps, counters["env_frames"], logs,
                                {"wall_time": wall_offset + time.time() - wall0, "train_updates": counters["updates"],
                                 "guidance_p": p, "episodes": counters["episodes"]})
                checkpoint()
            elif done or counters["env_frames"] - counters["last_ckpt_frames"] >= args.checkpoint_every:
                checkpoint()
    except FloatingPointError as e:
        fail(f"{e} at update {counters['updates']}; stopped, the last checkpoint {ckpt_path} is kept")
    finally:
        logs.close()
        env.close()
        if eval_env is not None:
            eval_env.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"[finetune] done: {counters['env_frames']} frames, {counters['updates']} updates, "
          f"{(wall_offset + time.time() - wall0) / 60:.1f} min, peak memory {peak:.0f} MB")

# ==========================================================================================================
# Appendix: code this script shares with the others, kept here so that the file stands alone.
#   * the task suite (the paper's 22 DMControl and 50 Meta-World tasks from pixels, and stock dm_control tasks
#     for quick checks): its original lives here; tests/test_tasks.py checks every custom reward;
#   * `retrieve` and `render_reset_frames`: verbatim copies of retrieval.py's (tests keep them identical);
#   * the world-model classes: verbatim copies of pretrain_wm.py's (tests compare the source text, and a
#     checkpoint of one script loads strictly into the other's classes); SIZES: pretrain_wm.py's model sizes.
# ==========================================================================================================

# ==== environments: the paper's 22 DMControl and 50 Meta-World tasks (Sec. 4, appendix), stock DMC, pixels ====

# ----------------------------------------------------------------------------------------------------------
# Environments and tasks (the paper's Sec. 4.1 and appendix; custom rewards as in TD-MPC2 and URLB)
# ----------------------------------------------------------------------------------------------------------

# The 22 DMControl tasks of the paper.
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
# Stock dm_control tasks beyond the paper's, for quick checks (reacher-easy, cup-catch and finger-spin are the
# usual pixel-RL sanity checks), with dm_control's own rewards: every task of suite.ALL_TASKS (dm_control
# 1.0.28) but lqr's, whose actions are unbounded. Named `domain-task` with the task's underscores as hyphens;
# ball_in_cup is `cup`, as pixel RL papers call it (DMC_DOMAIN_NAMES). Name -> action dims (tests check both
# against the suite). The offline data has none of the new bodies; fine-tuning says what that allows.
STOCK_DMC_TASKS = {
    "cartpole-balance-sparse": 1, "cartpole-swingup": 1, "cartpole-swingup-sparse": 1, "cartpole-two-poles": 1,
    "cartpole-three-poles": 1, "pendulum-swingup": 1, "cup-catch": 2, "finger-spin": 2, "finger-turn-easy": 2,
    "finger-turn-hard": 2, "point_mass-easy": 2, "point_mass-hard": 2, "reacher-easy": 2, "reacher-hard": 2,
    "hopper-stand": 4, "hopper-hop": 4, "fish-upright": 5, "fish-swim": 5, "swimmer-swimmer6": 5,
    "swimmer-swimmer15": 14, "manipulator-bring-ball": 5, "manipulator-bring-peg": 5,
    "manipulator-insert-ball": 5, "manipulator-insert-peg": 5, "stacker-stack-2": 5, "stacker-stack-4": 5,
    "quadruped-escape": 12, "quadruped-fetch": 12, "humanoid-stand": 21, "humanoid-walk": 21,
    "humanoid-run": 21, "humanoid-run-pure-state": 21, "humanoid_CMU-stand": 56, "humanoid_CMU-walk": 56,
    "humanoid_CMU-run": 56, "dog-stand": 38, "dog-walk": 38, "dog-trot": 38, "dog-run": 38, "dog-fetch": 38,
}
DMC_DOMAIN_NAMES = {"cup": "ball_in_cup"}  # domain in a task name -> dm_control's, where they differ
TASK_NAMES = DMC_TASKS + tuple(f"mw-{name}" for name in MW_TASKS) + tuple(STOCK_DMC_TASKS)
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


def task_action_dim(task: str) -> int:
    """Action dims of a task: its embodiment's (a stock task's own: swimmer6 and swimmer15 differ); builds nothing."""
    embodiment = embodiment_of(task)
    return STOCK_DMC_TASKS[task] if task in STOCK_DMC_TASKS else _ENV_ACTION_DIMS[embodiment]


# --- Custom DMControl tasks: walker/cheetah rewards as in TD-MPC2's tasks, quadruped as in URLB ------------

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


def _is_hard(task: str) -> bool:
    """The paper's `-hard` tasks (sparse reward minus an action cost); stock names such as finger-turn-hard are not."""
    return task.endswith("-hard") and task not in STOCK_DMC_TASKS


def _dmc_base_task(task: str) -> str:
    return task[: -len("-hard")] if _is_hard(task) else task


def _make_dmc(task: str, seed: int) -> control.Environment:
    base = _dmc_base_task(task)
    if base in _CUSTOM_DMC:
        return _CUSTOM_DMC[base](seed)
    domain, name = base.split("-", 1)
    return suite.load(DMC_DOMAIN_NAMES.get(domain, domain), name.replace("-", "_"), task_kwargs={"random": seed})


def hard_reward(reward: float, action: np.ndarray) -> float:
    """`-hard` tasks (the paper's appendix): sparse reward minus an action cost, per env frame; action in [-1, 1]."""
    return (reward if reward >= HARD_THRESHOLD else 0.0) - HARD_ACTION_COST * float(np.linalg.norm(action))


_OPEN_ENVS = weakref.WeakSet()  # envs whose GL renderer is still open


def _close_open_envs() -> None:
    # Free GL contexts at exit before EGL shuts its display down (and before interpreter teardown);
    # otherwise every open renderer prints EGL errors when garbage-collected.
    for env in list(_OPEN_ENVS):
        env.close()


def _cheap_rendering(model: mujoco.MjModel, image_size: int) -> None:
    """No anti-aliasing and no shadows: 4-9 ms instead of 22-32 ms per 64x64 DMC frame on a CPU (measured)."""
    model.vis.quality.offsamples = 0
    model.light_castshadow[:] = 0
    model.vis.global_.offwidth = max(image_size, 1)
    model.vis.global_.offheight = max(image_size, 1)


class PixelEnv:
    """One task as 64x64 RGB pixels with action repeat; actions in [-1, 1]^action_dim.

    Rendering goes through a per-env `mujoco.Renderer`, which makes its own GL context current on every
    call, so several envs (train + eval, DMC beside Meta-World) render correctly in one process
    (with a shared context, all but the newest env silently render garbage frames).
    """

    def __init__(self, task: str, seed: int, image_size: int = 64, action_repeat: int = 2):
        self.task = task
        self.embodiment = embodiment_of(task)
        self.action_dim = task_action_dim(task)
        self.is_metaworld = self.embodiment == "sawyer"
        self.image_size = image_size
        self.action_repeat = action_repeat
        self.hard = _is_hard(task)
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
        """Policy action in [-1, 1] -> the env's bounds (the quadruped's are not [-1, 1])."""
        if self._identity_bounds:
            return action.astype(np.float64)
        return self._low + (action.astype(np.float64) + 1.0) * 0.5 * (self._high - self._low)

    def render(self) -> np.ndarray:
        """The current frame, uint8 [image_size, image_size, 3], C-contiguous."""
        self._renderer.update_scene(self._data, camera=self._camera)
        image = self._renderer.render()
        if self.is_metaworld:
            image = image[::-1, ::-1]  # corner2 is upside down in metaworld 3.1.1; this is the true view
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
# ==== end environments ====

# ==== retrieve: verbatim copy of retrieval.py's, the original (tests keep them identical) ====
def retrieve(index, meta: dict, query_features: np.ndarray, k: int, action_dim: Optional[int] = None):
    """Eq. 4: the k offline episodes whose first-frame features are nearest to the query features.

    index: a Faiss index over the first-frame features (row i = meta["rows"][i]); query_features: float
    [Q, E] (encoder features of the task's reset frames). The score of an episode is its smallest squared
    L2 distance to any query feature (Faiss reports squared L2). With `action_dim`, only rows whose
    "action_dim" equals it are eligible. Returns [(row dict, score)], best first (ties: lower row first),
    at most k entries. Exact for a flat index; an IVF index searches only the clusters it probes.
    """
    rows = meta["rows"]
    n = int(index.ntotal)
    if n != len(rows):
        raise ValueError(f"index has {n} vectors but its sidecar lists {len(rows)} rows")
    queries = np.ascontiguousarray(np.asarray(query_features, dtype=np.float32))
    if queries.ndim == 1:
        queries = queries[None]
    if queries.ndim != 2 or queries.shape[0] == 0 or queries.shape[1] != index.d:
        raise ValueError(f"query features must be [Q, {index.d}], got {list(queries.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    params, want = None, min(k, n)
    if action_dim is not None:  # search only the rows of this action dim (the release drops other dims)
        eligible = np.flatnonzero([row["action_dim"] == action_dim for row in rows]).astype(np.int64)
        want = min(k, len(eligible))
        selector = faiss.IDSelectorBatch(eligible)  # referenced until the search is done
        ivf = faiss.try_extract_index_ivf(index)
        params = (faiss.SearchParameters(sel=selector) if ivf is None
                  else faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe))
    if want == 0:
        return []
    # The best `want` episodes by min-over-queries are all among each query's own `want` nearest rows.
    dist, ids = index.search(queries, want, params=params)  # [Q, want], nearest first; id -1: none found
    keep = ids >= 0
    ids, dist = ids[keep], dist[keep]
    order = np.lexsort((ids, dist))  # by distance, then row
    ids, dist = ids[order], dist[order]
    _, first = np.unique(ids, return_index=True)  # each row's first (= smallest) distance
    first = np.sort(first)[:want]
    return [(dict(rows[i]), float(d)) for i, d in zip(ids[first].tolist(), dist[first].tolist())]
# ==== end retrieve ====

# ==== query rendering: verbatim copy of retrieval.py's, the original (tests keep them identical) ====
QUERY_SEED_OFFSET = 20_000  # the query env's seed is the run's seed plus this, apart from the train/eval envs'
QUERY_CAMERA = {"sawyer": ("corner2", (0.75, 0.075, 0.7)), "quadruped": (2, None)}  # corner2 moved closer
QUERY_STOCK_TASK = {"cartpole": "balance", "acrobot": "swingup", "walker": "walk", "cheetah": "run",
                    "quadruped": "walk"}  # a stock task whose reset looks like a custom task's (same sampler)


def render_reset_frames(task: str, num_resets: int, seed: int, size: int = 64) -> np.ndarray:
    """The retrieval query of Eq. 4: first frames of `num_resets` resets of the task's env, seeded with
    seed + QUERY_SEED_OFFSET -> uint8 [num_resets, size, size, 3]. Same cameras, cheap render settings and
    renderer (`mujoco.Renderer`, which makes its own GL context current on every call) as the offline data
    and fine-tuning's envs. A custom DMC task (e.g. walker-run-backwards) resets like a stock task of its
    domain (same body, same initial-state sampler), so that stock task renders its frames. Meta-World draws a
    new goal at every reset from the env's seeded generator."""
    import mujoco

    embodiment = "sawyer" if task.startswith("mw-") else task.split("-")[0]
    camera, camera_pos = QUERY_CAMERA.get(embodiment, (0, None))
    if embodiment == "sawyer":
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE

        env = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{task[3:]}-v3-goal-observable"](seed=seed + QUERY_SEED_OFFSET)
        env._freeze_rand_vec = False  # a new goal at every reset ...
        env.seeded_rand_vec = True  # ... from the env's seeded generator, not numpy's global one
        model, data, reset = env.model, env.data, env.reset
        model.cam_pos[model.camera(camera).id] = camera_pos
    else:
        from dm_control import suite

        domain, rest = task.split("-", 1)
        domain, stock = DMC_DOMAIN_NAMES.get(domain, domain), rest.replace("-", "_")  # cup-catch: ball_in_cup
        if (domain, stock) not in suite.ALL_TASKS:
            base = rest.removesuffix("-hard").replace("-", "_")  # -hard only changes the reward
            stock = base if (domain, base) in suite.ALL_TASKS else QUERY_STOCK_TASK[domain]
        env = suite.load(domain, stock, task_kwargs={"random": seed + QUERY_SEED_OFFSET})
        model, data, reset = env.physics.model.ptr, env.physics.data.ptr, env.reset
    model.vis.quality.offsamples, model.light_castshadow[:] = 0, 0  # cheap settings, as collected
    model.vis.global_.offwidth, model.vis.global_.offheight = size, size
    renderer = mujoco.Renderer(model, size, size)
    frames = []
    for _ in range(num_resets):
        reset()
        renderer.update_scene(data, camera=camera)
        frame = renderer.render()
        # Meta-World's corner2 renders upside down in metaworld 3.1.1; [::-1, ::-1] is the true view
        frames.append(frame[::-1, ::-1].copy() if embodiment == "sawyer" else frame.copy())
    renderer.close()
    env.close()
    return np.stack(frames)
# ==== end query rendering ====

# ==== world-model classes: verbatim copies of pretrain_wm.py's, the originals (tests compare the source) ====
@dataclass
class ModelConfig:
    """Everything needed to rebuild the world model; saved in every checkpoint as `model_config`."""

    image_size: int = 64
    """height = width of the square RGB frames"""
    cnn_depth: int = 32
    """d: encoder channels [d, 2d, 4d, 8d], decoder the reverse"""
    deter: int = 512
    """size of the deterministic (GRU) state h"""
    hidden: int = 512
    """width of the RSSM's MLP layers (img_in, img_out, obs_out)"""
    stoch: int = 32
    """number of categorical latent variables in z"""
    classes: int = 32
    """classes per categorical latent"""
    blocks: int = 1
    """blocks of the block-diagonal GRU (DreamerV3 uses 8 at large sizes); 1 = dense GRU"""
    act_dim: int = 12
    """actions are zero-padded to this many dims (largest embodiment, quadruped)"""
    unimix: float = 0.01
    """uniform mix in every categorical (DreamerV3: 1%)"""


def _trunc_normal_init(module: nn.Module) -> None:
    """DreamerV3's default initialiser: truncated normal with variance 1 / fan_avg, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, BlockLinear)):
            w = m.weight
            if isinstance(m, BlockLinear):
                fan_in, fan_out = w.shape[1], w.shape[2]
            elif isinstance(m, nn.Linear):
                fan_in, fan_out = w.shape[1], w.shape[0]
            else:  # conv: [out, in, k, k] (transposed conv: [in, out, k, k])
                k = w.shape[2] * w.shape[3]
                fan_in, fan_out = w.shape[1] * k, w.shape[0] * k
            std = math.sqrt(2.0 / (fan_in + fan_out)) / 0.87962566103423978
            if w.device.type != "meta":
                nn.init.trunc_normal_(w, 0.0, std, -2.0 * std, 2.0 * std)
            if m.bias is not None and m.bias.device.type != "meta":
                nn.init.zeros_(m.bias)


class BlockLinear(nn.Module):
    """Block-diagonal linear layer: `blocks` independent [in/blocks -> out/blocks] maps (DreamerV3 GRU)."""

    def __init__(self, in_features: int, out_features: int, blocks: int, bias: bool = True):
        super().__init__()
        assert in_features % blocks == 0 and out_features % blocks == 0, (in_features, out_features, blocks)
        self.blocks, self.in_features, self.out_features = blocks, in_features, out_features
        self.weight = nn.Parameter(torch.empty(blocks, in_features // blocks, out_features // blocks))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if self.blocks == 1:
            y = x @ self.weight[0]
        else:  # [N, g, i] -> [g, N, i] @ [g, i, o] -> [N, g*o]
            x = x.view(-1, self.blocks, self.in_features // self.blocks).transpose(0, 1)
            y = torch.bmm(x, self.weight).transpose(0, 1).reshape(-1, self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channel dim of an NCHW tensor (DreamerV3 normalises channels per pixel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Encoder(nn.Module):
    """4 stride-2 convs (kernel 4), channels [d, 2d, 4d, 8d], channel LayerNorm + SiLU, flattened."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.cnn_depth
        chans = [3, d, 2 * d, 4 * d, 8 * d]
        self.convs = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 4, 2, 1, bias=False) for i in range(4))
        self.norms = nn.ModuleList(ChannelNorm(chans[i + 1], eps=1e-3) for i in range(4))
        self.out_dim = 8 * d * (cfg.image_size // 16) ** 2
        _trunc_normal_init(self)
        self.to(memory_format=torch.channels_last)  # NHWC convs: ~25% faster on CPU (oneDNN), fine on GPU

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image uint8 [..., H, W, 3] -> embed [..., out_dim]."""
        lead = image.shape[:-3]
        x = image.reshape(-1, *image.shape[-3:]).float() / 255.0 - 0.5
        x = x.permute(0, 3, 1, 2)  # NCHW view of NHWC memory, i.e. channels_last: no copy
        for conv, norm in zip(self.convs, self.norms):
            x = F.silu(norm(conv(x)))
        return x.reshape(*lead, self.out_dim)


class Decoder(nn.Module):
    """(h, z) -> 4x4x8d (h through a block-diagonal map, z through a dense one) -> transposed convs -> image."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, self.res = cfg.cnn_depth, cfg.image_size // 16
        self.deter, self.chan0 = cfg.deter, 8 * d
        self.space_deter = BlockLinear(cfg.deter, 8 * d * self.res**2, cfg.blocks, bias=False)
        self.space_stoch = nn.Linear(cfg.stoch * cfg.classes, 8 * d * self.res**2, bias=False)
        self.space_norm = ChannelNorm(8 * d, eps=1e-3)
        chans = [8 * d, 4 * d, 2 * d, d, 3]
        self.deconvs = nn.ModuleList(
            nn.ConvTranspose2d(chans[i], chans[i + 1], 4, 2, 1, bias=(i == 3)) for i in range(4))
        self.norms = nn.ModuleList(ChannelNorm(chans[i + 1], eps=1e-3) for i in range(3))
        _trunc_normal_init(self)
        self.to(memory_format=torch.channels_last)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """feat [..., deter + stoch*classes] -> image mean [..., H, W, 3] in the scale image/255 - 0.5."""
        lead = feat.shape[:-1]
        feat = feat.reshape(-1, feat.shape[-1])
        x = self.space_deter(feat[:, : self.deter]) + self.space_stoch(feat[:, self.deter :])
        x = x.view(-1, self.chan0, self.res, self.res).contiguous(memory_format=torch.channels_last)
        x = F.silu(self.space_norm(x))
        for i, deconv in enumerate(self.deconvs):
            x = deconv(x)
            if i < 3:
                x = F.silu(self.norms[i](x))
        x = x.permute(0, 2, 3, 1)
        return x.reshape(*lead, *x.shape[1:])


def compile_step(step, device_type: str):
    """--compile: torch.compile one step of a sequential loop (observe's filtering step, an imagination step), so
    that each step runs as one compiled graph instead of dozens of small kernels. On a GPU the mode is
    reduce-overhead (CUDA graphs: one launch per step); on a CPU inductor's default (C++ kernels, needs a compiler).
    Random ops keep torch's own kernels (fallback_random): the samples follow the seed as in eager mode, and the
    results match eager mode to float rounding. A step that cannot be compiled runs eagerly (suppress_errors: a
    warning, no crash)."""
    import torch._dynamo
    import torch._inductor.config

    torch._inductor.config.fallback_random = True
    torch._dynamo.config.suppress_errors = True
    return torch.compile(step, mode="reduce-overhead" if device_type == "cuda" else None, dynamic=False)


class RSSM(nn.Module):
    """Recurrent state-space model (DreamerV3). State: h (deter) and z (stoch, one-hot [S, C]) + logits.

    Sequence model h_t = f(h_{t-1}, z_{t-1}, a_t) (block GRU); prior p(z_t | h_t); posterior q(z_t | h_t, e_t).
    Action convention: a_t led to image t; where is_first, state and action are zeroed.
    """

    def __init__(self, cfg: ModelConfig, embed_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        D, H, S, C, g = cfg.deter, cfg.hidden, cfg.stoch, cfg.classes, cfg.blocks
        embed_dim = 8 * cfg.cnn_depth * (cfg.image_size // 16) ** 2 if embed_dim is None else embed_dim
        assert D % g == 0, "deter must be divisible by blocks"
        # Sequence model inputs (img_in), each Linear + LayerNorm + SiLU: one for h, one for (z, a) jointly.
        # The action is projected linearly and added to z's projection before the norm (= one Linear on
        # concat(z, a), as in DreamerV3): a LayerNorm of the action's projection alone would keep only its
        # direction (for a 1-D action only its sign). img_in_action is split out so it can be batched over T.
        self.img_in_deter = nn.Linear(D, H, bias=False)
        self.img_in_stoch = nn.Linear(S * C, H, bias=False)
        self.img_in_action = nn.Linear(cfg.act_dim, H, bias=False)
        self.img_in_norms = nn.ModuleList(nn.LayerNorm(H, eps=1e-3) for _ in range(2))
        # Block GRU: every block sees its slice of h and all inputs; one hidden layer then the gates.
        self.gru_hidden = BlockLinear(g * (D // g + 2 * H), D, g, bias=False)
        self.gru_hidden_norm = nn.LayerNorm(D, eps=1e-3)
        self.gru_gates = BlockLinear(D, 3 * D, g, bias=False)
        self.gru_gates_norm = nn.LayerNorm(3 * D, eps=1e-3)
        # Prior p(z | h) (img_out) and posterior q(z | h, e) (obs_out, split so e's part is batched over T).
        self.img_out = nn.Linear(D, H, bias=False)
        self.img_out_norm = nn.LayerNorm(H, eps=1e-3)
        self.img_logits = nn.Linear(H, S * C)
        self.obs_out_deter = nn.Linear(D, H, bias=False)
        self.obs_out_embed = nn.Linear(embed_dim, H, bias=False)
        self.obs_out_norm = nn.LayerNorm(H, eps=1e-3)
        self.obs_logits = nn.Linear(H, S * C)
        _trunc_normal_init(self)

    # -- state helpers -------------------------------------------------------------------------------------
    def initial(self, batch_size: int) -> dict:
        cfg, p = self.cfg, self.img_logits.weight
        zeros = lambda *s: torch.zeros(batch_size, *s, device=p.device, dtype=torch.float32)  # noqa: E731
        return {"deter": zeros(cfg.deter), "stoch": zeros(cfg.stoch, cfg.classes),
                "logits": zeros(cfg.stoch, cfg.classes)}

    def get_feat(self, state: dict) -> torch.Tensor:
        stoch = state["stoch"]
        return torch.cat([state["deter"], stoch.reshape(*stoch.shape[:-2], -1)], -1)

    def _logits(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw [..., S*C] -> log-probs [..., S, C] of the categoricals mixed with 1% uniform (DreamerV3)."""
        raw = raw.float().reshape(*raw.shape[:-1], self.cfg.stoch, self.cfg.classes)
        probs = torch.softmax(raw, -1)
        if self.cfg.unimix > 0:
            probs = (1.0 - self.cfg.unimix) * probs + self.cfg.unimix / self.cfg.classes
        return torch.log(probs)

    @staticmethod
    def sample(logits: torch.Tensor) -> torch.Tensor:
        """One-hot sample with straight-through gradients (forward: one-hot; backward: d/dprobs)."""
        probs = logits.exp()
        u = torch.rand_like(logits).clamp_(1e-20, 1.0)
        index = (logits - torch.log(-torch.log(u))).argmax(-1)  # Gumbel-max = a categorical sample
        onehot = F.one_hot(index, logits.shape[-1]).to(probs.dtype)
        return onehot + probs - probs.detach()

    # -- transitions -----------------------------------------------------------------------------------
    def _core(self, deter: torch.Tensor, stoch: torch.Tensor, action_in: torch.Tensor) -> torch.Tensor:
        """h_t = f(h_{t-1}, z_{t-1}, a_t); action_in is img_in_action's output (precomputable over T)."""
        g, D = self.cfg.blocks, self.cfg.deter
        x0 = F.silu(self.img_in_norms[0](self.img_in_deter(deter)))
        x1 = F.silu(self.img_in_norms[1](self.img_in_stoch(stoch.reshape(stoch.shape[0], -1)) + action_in))
        x = torch.cat([x0, x1], -1)
        if g == 1:
            x = torch.cat([deter, x], -1)
        else:
            x = x.unsqueeze(1).expand(-1, g, -1)
            x = torch.cat([deter.view(-1, g, D // g), x], -1).reshape(deter.shape[0], -1)
        x = F.silu(self.gru_hidden_norm(self.gru_hidden(x)))
        x = self.gru_gates_norm(self.gru_gates(x))
        x = x.view(-1, g, 3, D // g)  # per block: [reset | candidate | update]
        reset, cand, update = (x[:, :, i].reshape(-1, D) for i in range(3))
        reset = torch.sigmoid(reset)
        cand = torch.tanh(reset * cand)
        update = torch.sigmoid(update - 1.0)
        return update * cand + (1.0 - update) * deter

    def _action_in(self, action: torch.Tensor) -> torch.Tensor:
        return self.img_in_action(action)

    def prior_logits(self, deter: torch.Tensor) -> torch.Tensor:
        """Dynamics predictor p(z_t | h_t): log-probs [..., S, C]."""
        return self._logits(self.img_logits(F.silu(self.img_out_norm(self.img_out(deter)))))

    def img_step(self, prev_state: dict, prev_action: torch.Tensor) -> dict:
        deter = self._core(prev_state["deter"], prev_state["stoch"], self._action_in(prev_action))
        logits = self.prior_logits(deter)
        return {"deter": deter, "stoch": self.sample(logits), "logits": logits}

    @staticmethod
    def _reset(state: dict, action: torch.Tensor, is_first: torch.Tensor):
        keep = (~is_first.bool()).to(action.dtype).unsqueeze(-1)
        state = {"deter": state["deter"] * keep, "stoch": state["stoch"] * keep.unsqueeze(-1),
                 "logits": state["logits"] * keep.unsqueeze(-1)}
        return state, action * keep

    def _post(self, deter: torch.Tensor, embed_proj: torch.Tensor) -> dict:
        x = F.silu(self.obs_out_norm(self.obs_out_deter(deter) + embed_proj))
        logits = self._logits(self.obs_logits(x))
        return {"deter": deter, "stoch": self.sample(logits), "logits": logits}

    def obs_step(self, prev_state: dict, prev_action: torch.Tensor, embed: torch.Tensor,
                 is_first: torch.Tensor):
        """One filtering step -> (posterior, prior) for time t (prev_action = a_t, embed = e_t)."""
        prev_state, prev_action = self._reset(prev_state, prev_action, is_first)
        prior = self.img_step(prev_state, prev_action)
        post = self._post(prior["deter"], self.obs_out_embed(embed))
        return post, prior

    def filter_step(self, state: dict, keep: torch.Tensor, action_in: torch.Tensor, embed_proj: torch.Tensor):
        """One step of observe's loop: h_t from the previous state (zeroed where keep is 0, an episode start),
        then the posterior. The unit that --compile compiles (one graph per step instead of ~40 kernels)."""
        deter = self._core(state["deter"] * keep, state["stoch"] * keep.unsqueeze(-1), action_in)
        return self._post(deter, embed_proj)

    def observe(self, embed: torch.Tensor, action: torch.Tensor, is_first: torch.Tensor,
                state: dict | None = None):
        """Filter a batch of sequences: embed [B, T, E], action [B, T, A], is_first [B, T] -> (post, prior)."""
        B, T = embed.shape[:2]
        state = self.initial(B) if state is None else state
        keep = (~is_first.bool()).to(embed.dtype)
        # Everything that does not depend on the recurrent state is batched over T (one big matmul each).
        action_in = self._action_in(action * keep.unsqueeze(-1))
        embed_proj = self.obs_out_embed(embed)
        posts = []
        for t in range(T):
            state = self.filter_step(state, keep[:, t, None], action_in[:, t], embed_proj[:, t])
            posts.append(state)
        post = {key: torch.stack([p[key] for p in posts], 1) for key in posts[0]}
        prior_logits = self.prior_logits(post["deter"])  # the prior shares h_t with the posterior
        prior = {"deter": post["deter"], "stoch": self.sample(prior_logits), "logits": prior_logits}
        return post, prior

    def imagine(self, policy_fn, start_state: dict, horizon: int) -> dict:
        """Roll the prior forward from start_state ([N, ...]) with actions policy_fn(feat) -> [H+1, N, ...]."""
        states = [start_state]
        for _ in range(horizon):
            action = policy_fn(self.get_feat(states[-1]))
            states.append(self.img_step(states[-1], action))
        return {key: torch.stack([s[key] for s in states], 0) for key in ("deter", "stoch", "logits")}

    @staticmethod
    def kl_loss(post: dict, prior: dict, free: float = 1.0, dyn_scale: float = 1.0, rep_scale: float = 0.1):
        """Balanced KL with free bits (DreamerV3):
        dyn_scale * max(free, KL[sg(q) || p]) + rep_scale * max(free, KL[q || sg(p)]), KL summed over latents.
        Returns (loss [B, T], dyn_kl [B, T], rep_kl [B, T])."""
        def kl(lq, lp):
            lq, lp = torch.log_softmax(lq.float(), -1), torch.log_softmax(lp.float(), -1)
            return (lq.exp() * (lq - lp)).sum((-2, -1))

        dyn = kl(post["logits"].detach(), prior["logits"])
        rep = kl(post["logits"], prior["logits"].detach())
        loss = dyn_scale * torch.clamp(dyn, min=free) + rep_scale * torch.clamp(rep, min=free)
        return loss, dyn, rep


class WorldModel(nn.Module):
    """Encoder + RSSM + decoder. No reward, continuation, task or embodiment heads in pre-training."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.rssm = RSSM(cfg, self.encoder.out_dim)
        self.decoder = Decoder(cfg)

    def loss(self, image: torch.Tensor, action: torch.Tensor, is_first: torch.Tensor, dyn_scale: float = 1.0,
             rep_scale: float = 0.1, free: float = 1.0):
        """Eq. 1 without the task terms: image reconstruction (squared error summed over pixels) plus the
        balanced KL with free bits, averaged over batch and time (as DreamerV3's implementation does).
        image uint8 [B, T, H, W, 3], action [B, T, act_dim] (zero-padded), is_first bool [B, T].
        Returns (loss scalar, metrics dict of detached scalar tensors, posterior states)."""
        embed = self.encoder(image)
        post, prior = self.rssm.observe(embed, action, is_first)
        recon = self.decoder(self.rssm.get_feat(post))
        target = image.float() / 255.0 - 0.5
        # (recon - target)^2 as one fused op each way: the same numbers as .square() with fewer full-image passes
        recon_loss = F.mse_loss(recon.float(), target, reduction="none").sum((-3, -2, -1))  # [B, T]
        kl, dyn, rep = self.rssm.kl_loss(post, prior, free, dyn_scale, rep_scale)
        loss = (recon_loss + kl).mean()
        with torch.no_grad():
            ent = lambda lg: -(lg.exp() * lg).sum((-2, -1)).mean()  # noqa: E731
            metrics = {"loss": loss.detach(), "recon_loss": recon_loss.mean().detach(),
                       "image_mse": recon_loss.mean().detach() / target[0, 0].numel(),
                       "kl_dyn": dyn.mean().detach(), "kl_rep": rep.mean().detach(),
                       "post_ent": ent(post["logits"].detach()), "prior_ent": ent(prior["logits"].detach())}
        return loss, metrics, post
# ==== end world-model classes ====

# The world model of each named size: pretrain_wm.py's SIZES without its batch shape (tests check they agree;
# fine-tuning's batch shape is in AGENT_SIZES).
SIZES = {
    "tiny": dict(cnn_depth=4, deter=32, hidden=32, stoch=4, classes=4, blocks=2),
    "xs": dict(cnn_depth=16, deter=256, hidden=256, stoch=16, classes=16, blocks=1),
    "s": dict(cnn_depth=32, deter=512, hidden=512, stoch=32, classes=32, blocks=1),
    "paper": dict(cnn_depth=96, deter=12288, hidden=1536, stoch=32, classes=96, blocks=8),
}


if __name__ == "__main__":
    main(tyro.cli(Args, config=(tyro.conf.FlagCreatePairsOff,)))  # --no-pretrain, not --no-no-pretrain
