"""Multi-embodiment world-model pre-training (GSA paper Sec. 3.2, Eq. 1 without task losses).

One DreamerV3-style RSSM learns the dynamics of every embodiment in the offline data, without rewards,
task ids or embodiment ids. Actions are zero-padded to 12 dims so all embodiments share one model.

Reads:  <data-dir>/manifest.json and the episode .npz files it lists (collect_offline.py's format).
Writes: <out-dir>/wm.pt (checkpoint: model, optimiser, step, RNG, args, model config, manifest hash),
        <out-dir>/args.json, <out-dir>/metrics.jsonl, <out-dir>/tb/ (TensorBoard),
        <out-dir>/videos/openloop-<embodiment>-<step>.gif (5 context frames, then imagination | truth);
        with --track, a Weights & Biases run named pretrain-<size>-<embodiments>-s<seed> (wandb-run-id, wandb/).
Every flag's range (ARG_RANGES), the manifest and a resumed checkpoint are checked before anything is written;
each episode is checked when it is loaded (sha256, shapes, finite actions in [-1, 1]), naming the file.

Example:
    python pretrain_wm.py --data-dir data --out-dir runs/wm --embodiments all --size xs --steps 20000
    torchrun --nproc_per_node 2 pretrain_wm.py --data-dir data --out-dir runs/wm --size s   # data-parallel
Under torchrun every process trains on its own GPU, cuda:LOCAL_RANK (NCCL), or on the CPU (gloo).
"""
import os

os.environ.setdefault("MUJOCO_GL", "egl")  # no rendering here, but keep the stage scripts uniform

import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import io
import json
import math
import random
import re
import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro


SCRIPT = "pretrain_wm.py"
MANIFEST_FORMAT_VERSION = 1  # of collect_offline.py's manifest.json (the same constant there)
CHECKPOINT_FORMAT_VERSION = 1  # of the wm.pt written here (retrieval.py and finetune_gsa.py read it)
EMBODIMENTS = ("cartpole", "acrobot", "walker", "cheetah", "quadruped", "sawyer")
ACTION_DIMS = {"cartpole": 1, "acrobot": 1, "walker": 6, "cheetah": 6, "quadruped": 12, "sawyer": 4}
MAX_ACTION_DIM = 12
ACTION_TOLERANCE = 1e-6  # stored actions may exceed [-1, 1] by float rounding, no more


@dataclass
class Args:
    data_dir: str = "data/offline"
    """offline data (collect_offline.py's --out-dir: manifest.json + episode .npz files)"""
    out_dir: str = "runs/pretrain"
    """run directory: wm.pt, args.json, metrics.jsonl, tb/, videos/ (finetune_gsa.py's default --checkpoint is
    runs/pretrain/wm.pt)"""
    seed: int = 0
    """seed of model init, latent sampling and the data sampler"""
    device: str = "auto"
    """torch device: auto (cuda if available), cpu, cuda, cuda:1, ..."""
    threads: Optional[int] = None
    """torch CPU threads (default: torch's choice); set it when other processes share the cores"""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """matmul/conv precision of the updates: auto = bf16 autocast on GPU, fp32 on CPU (at xs, bf16 pre-training
    is slower even with AVX512-BF16; at s and up such a CPU runs it about 1.3x faster: README, Speed)"""
    compile: bool = False
    """torch.compile the step of the world model's filtering loop; on a GPU with CUDA graphs. The same computation
    (to float rounding); measured on this project's CPU: no gain; on GPUs unmeasured (README, Speed)"""
    resume: bool = False
    """continue the run in --out-dir from its wm.pt (required to reuse a run directory that holds one); the
    data and the run-defining args must be the same"""
    track: bool = False
    """also log the config and every TensorBoard scalar to Weights & Biases (needs `pip install wandb`;
    WANDB_MODE=offline keeps the run on disk)"""
    wandb_project_name: str = "gsa"
    """W&B project of --track"""
    wandb_entity: Optional[str] = None
    """W&B entity (user or team) of --track; default: your W&B default entity"""
    embodiments: str = "all"
    """comma-separated names, `dmc` (first five), `metaworld` (= sawyer), or `all` (every embodiment in the
    data); an asked-for embodiment without episodes is an error"""
    size: Literal["tiny", "xs", "s", "paper"] = "xs"
    """named model and batch size (SIZES): tiny = tests, xs = CPU, s = DreamerV3 S, paper = ~280M params"""
    steps: int = 200_000
    """total gradient updates (the paper pre-trains 200k)"""
    batch_size: Optional[int] = None
    """sequences per update per process (default: the size's; paper 32)"""
    seq_len: Optional[int] = None
    """sequence length (default: the size's; paper 64)"""
    lr: float = 1e-4
    """Adam learning rate"""
    adam_eps: float = 1e-5
    """Adam epsilon"""
    weight_decay: float = 1e-6
    """Adam weight decay"""
    grad_clip: float = 100.0
    """clip the global gradient norm to this"""
    dyn_scale: float = 1.0
    """beta_dyn of the balanced KL (release 1.0; DreamerV3 0.5)"""
    rep_scale: float = 0.1
    """beta_rep of the balanced KL"""
    free_nats: float = 1.0
    """free bits: each KL term is clipped below at this many nats"""
    pool_mb: float = 2048
    """memory cap of the in-memory episode pool (MiB per process); the dataset itself may exceed RAM"""
    pool_swaps_per_step: float = 0.5
    """episodes replaced in the pool (loaded from disk in a background thread) per update"""
    holdout_fraction: float = 0.05
    """fraction of each embodiment's episodes held out for open-loop evaluation (at least 1 if it has 2+)"""
    eval_episodes: int = 2
    """held-out episodes per embodiment in each open-loop evaluation (and video)"""
    openloop_len: int = 50
    """frames per open-loop clip: 5 context frames, then imagined frames"""
    eval_every: int = 5000
    """open-loop evaluation (held-out MSE + videos) every this many updates, and at the end"""
    checkpoint_every: int = 1000
    """write <out-dir>/wm.pt atomically every this many updates, and at the end"""
    log_every: int = 100
    """metrics.jsonl / TensorBoard / progress line every this many updates (averaged over them)"""

RUN_DEFINING = ("embodiments", "size", "seed", "batch_size", "seq_len", "lr", "adam_eps", "weight_decay",
                "grad_clip", "dyn_scale", "rep_scale", "free_nats", "pool_mb", "pool_swaps_per_step",
                "holdout_fraction")
"""Args that must match when resuming (others, e.g. --steps or logging intervals, may change)."""

# Valid range of every numeric flag, (low, high) inclusive, None = unbounded; checked by check_ranges before
# anything is written. tests/ check that every int/float field of Args has an entry.
ARG_RANGES = {
    "seed": (0, 2**32 - 1),  # 32 bits, as collect_offline.py takes
    "steps": (0, None),  # 0: save and evaluate the initial model
    "batch_size": (1, None),
    "seq_len": (1, None),
    "lr": (1e-10, None),
    "adam_eps": (1e-12, None),
    "weight_decay": (0.0, None),
    "grad_clip": (1e-8, None),
    "dyn_scale": (0.0, None),
    "rep_scale": (0.0, None),
    "free_nats": (0.0, None),
    "pool_mb": (1.0, None),
    "pool_swaps_per_step": (0.0, None),
    "holdout_fraction": (0.0, 1.0),  # never all of an embodiment's episodes (see split_holdout)
    "eval_episodes": (1, None),
    "openloop_len": (6, None),  # 5 context frames, then at least one imagined
    "eval_every": (1, None),
    "checkpoint_every": (1, None),
    "log_every": (1, None),
    "threads": (1, None),
}


# Named sizes (`--size`): ModelConfig fields plus the batch shape. Same names and world-model fields in
# finetune_gsa.py (tested). `paper` is the release's large config (~280M parameters, GPU only).
SIZES = {
    "tiny": dict(cnn_depth=4, deter=32, hidden=32, stoch=4, classes=4, blocks=2, batch_size=4, seq_len=8),
    "xs": dict(cnn_depth=16, deter=256, hidden=256, stoch=16, classes=16, blocks=1, batch_size=8, seq_len=32),
    "s": dict(cnn_depth=32, deter=512, hidden=512, stoch=32, classes=32, blocks=1, batch_size=16, seq_len=64),
    "paper": dict(cnn_depth=96, deter=12288, hidden=1536, stoch=32, classes=96, blocks=8, batch_size=32,
                  seq_len=64),
}


def fail(message: str):
    raise SystemExit(f"{SCRIPT}: error: {message}")


# ---------------------------------------------------------------------------------------------------------
# Data: manifest validation, episode loading (sha256-checked), a bounded episode pool refreshed from disk
# ---------------------------------------------------------------------------------------------------------

def parse_embodiments(spec: str) -> Optional[list]:
    """Embodiment names in canonical order; None for `all` (= every embodiment present in the data)."""
    if spec == "all":
        return None
    if spec == "dmc":
        return list(EMBODIMENTS[:5])
    if spec == "metaworld":
        return ["sawyer"]
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in EMBODIMENTS]
    if bad or not names:
        fail(f"unknown embodiment(s) {bad or spec!r}; valid: {', '.join(EMBODIMENTS)}, dmc, metaworld, all")
    return [e for e in EMBODIMENTS if e in names]  # canonical order


def load_manifest(data_dir: Path, embodiments: Optional[list]):
    """Validate manifest.json and the episode list (embodiments None = all present in the data);
    returns (manifest, sha256 of its bytes, rows to use, ordered embodiment list)."""
    path = data_dir / "manifest.json"
    if not path.is_file():
        fail(f"no manifest.json in {data_dir} (run collect_offline.py first)")
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as e:
        fail(f"{path} is not valid JSON: {e}")
    if not isinstance(manifest, dict) or manifest.get("format_version") != MANIFEST_FORMAT_VERSION:
        fail(f"{path}: unsupported format_version {manifest.get('format_version') if isinstance(manifest, dict) else None!r}"
             f" (expected {MANIFEST_FORMAT_VERSION})")
    if manifest.get("image_size") != 64 or manifest.get("max_action_dim") != MAX_ACTION_DIM:
        fail(f"{path}: expected image_size 64 and max_action_dim {MAX_ACTION_DIM}")
    rows = manifest.get("episodes")
    if not isinstance(rows, list):
        fail(f"{path}: no 'episodes' list")
    keys = ("path", "embodiment", "length", "sha256")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or any(k not in row for k in keys):
            fail(f"{path}: episode row {i} lacks one of {keys}")
        p = row["path"]
        if not isinstance(p, str) or p.startswith("/") or ".." in p.split("/"):
            fail(f"{path}: episode row {i} has an unsafe path {p!r}")
        if row["embodiment"] not in EMBODIMENTS:
            fail(f"{path}: episode {p} has unknown embodiment {row['embodiment']!r}")
        if not isinstance(row["length"], int) or row["length"] < 1:
            fail(f"{path}: episode {p} has a bad length {row['length']!r}")
    missing = [r["path"] for r in rows if not (data_dir / r["path"]).is_file()]
    if missing:
        fail(f"{len(missing)} episode file(s) listed in {path} are missing, e.g. {missing[:3]}")
    if embodiments is None:  # `all`: every embodiment present in the data
        embodiments = [e for e in EMBODIMENTS if any(r["embodiment"] == e for r in rows)]
        if not embodiments:
            fail(f"{path} lists no episodes")
    chosen = [r for r in rows if r["embodiment"] in embodiments]
    empty = [e for e in embodiments if not any(r["embodiment"] == e for r in chosen)]
    if empty:
        fail(f"no episodes for embodiment(s) {empty} in {path}")
    return manifest, hashlib.sha256(raw).hexdigest(), chosen, embodiments


def split_holdout(rows: list, embodiments: list, fraction: float):
    """Deterministic split: per embodiment, the ceil(fraction * n) episodes with the smallest sha256(path)
    are held out (at least one when the embodiment has two or more episodes, never all)."""
    train, held = [], {}
    for emb in embodiments:
        mine = sorted((r for r in rows if r["embodiment"] == emb),
                      key=lambda r: hashlib.sha256(r["path"].encode()).hexdigest())
        k = min(len(mine) - 1, max(1, math.ceil(fraction * len(mine)))) if fraction > 0 else 0
        held[emb] = mine[:k]
        train.extend(mine[k:])
    return sorted(train, key=lambda r: r["path"]), held


def load_episode(data_dir: Path, row: dict, max_frames: Optional[int] = None) -> dict:
    """Read one episode, check its sha256 against the manifest, check shapes; actions zero-padded to 12."""
    path = data_dir / row["path"]
    try:
        raw = path.read_bytes()
    except OSError as e:
        fail(f"cannot read episode {path}: {e}")
    if hashlib.sha256(raw).hexdigest() != row["sha256"]:
        fail(f"episode {path} is corrupt: sha256 does not match the manifest")
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            image, action, is_first = z["image"], z["action"], z["is_first"]
    except Exception as e:  # a file with the right hash but the wrong content is still a clear error
        fail(f"episode {path} cannot be read as an episode .npz: {e}")
    T1 = row["length"] + 1
    adim = ACTION_DIMS[row["embodiment"]]
    if image.dtype != np.uint8 or image.shape != (T1, 64, 64, 3):
        fail(f"episode {path}: image must be uint8 [{T1}, 64, 64, 3], got {image.dtype} {list(image.shape)}")
    if action.shape != (T1, adim) or is_first.shape != (T1,):
        fail(f"episode {path}: action must be [{T1}, {adim}] and is_first [{T1}]")
    check_actions(path, action)
    n = T1 if max_frames is None else min(T1, max_frames)
    padded = np.zeros((n, MAX_ACTION_DIM), np.float32)
    padded[:, :adim] = action[:n]
    return {"image": np.ascontiguousarray(image[:n]), "action": padded, "is_first": is_first[:n].astype(bool)}


def check_actions(path: Path, action: np.ndarray) -> None:
    """Fail naming the file unless every action is finite and in [-1, 1] (what collect_offline.py writes)."""
    bad = ~np.isfinite(action) | (np.abs(action) > 1 + ACTION_TOLERANCE)
    if bad.any():
        t, i = (int(x) for x in np.argwhere(bad)[0])
        fail(f"episode {path}: action[{t}, {i}] = {float(action[t, i])} is not a finite number in [-1, 1] "
             f"({int(bad.sum())} such values); recollect or drop this episode")


class EpisodePool:
    """A bounded in-memory pool of episodes, refreshed continually from disk (Sec. 3.2 data: ~10M frames).

    The pool holds `slots` episodes (slots * largest-episode bytes <= the memory cap). Every update,
    `swaps_per_step` slots (on average, on a fixed schedule) are replaced by an episode drawn uniformly from
    the training set, so in the long run every episode is equally present and sequences are sampled
    uniformly across episodes. Which slot and episode is a function of the sampler's RNG only: a background
    thread merely prefetches (reads, verifies, decompresses) the next scheduled episodes, so training is
    deterministic and resumable. Checkpoints hold the pool's state (slot contents, queued episodes) and,
    with the other RNG states, its generator's (see rng_state).
    """

    PREFETCH = 4

    def __init__(self, data_dir: Path, rows: list, seq_len: int, pool_mb: float, swaps_per_step: float,
                 rng: np.random.Generator):
        self.data_dir, self.rows, self.seq_len, self.rng = data_dir, rows, seq_len, rng
        shortest = min(r["length"] for r in rows) + 1
        if shortest < seq_len:
            fail(f"--seq-len {seq_len} is longer than the shortest episode ({shortest} frames)")
        ep_bytes = (max(r["length"] for r in rows) + 1) * (64 * 64 * 3 + 4 * MAX_ACTION_DIM + 1)
        budget = int(pool_mb * 2**20) // ep_bytes  # episodes that fit under the cap
        if budget >= len(rows):
            self.slots = len(rows)
        else:  # the prefetch queue holds up to PREFETCH more episodes: keep them under the cap too
            self.slots = max(1, budget - self.PREFETCH)
        self.full = self.slots == len(rows)  # everything fits: no refreshing needed
        self.swaps_per_step = 0.0 if self.full else swaps_per_step
        self.slot_ids: list = []
        self.episodes: list = []
        self.queue: list = []  # episode ids scheduled to enter the pool next, in order
        self._cache: dict = {}  # id -> loaded episode or an exception (filled by the thread)
        self._cond = threading.Condition()
        self._thread = None
        self._stop = False

    # -- state --------------------------------------------------------------------------------------------
    def fill(self, state: Optional[dict] = None):
        """Load the initial pool (fresh: a uniform draw without replacement) or restore a saved one (its
        generator's state is restored apart, by set_rng_state)."""
        if state is None:
            self.slot_ids = [int(i) for i in self.rng.choice(len(self.rows), self.slots, replace=False)]
            self.queue = [int(self.rng.integers(len(self.rows))) for _ in range(self.PREFETCH)]
        else:
            self.slot_ids, self.queue = list(state["slot_ids"]), list(state["queue"])
            if len(self.slot_ids) != self.slots or not all(0 <= i < len(self.rows) for i in self.slot_ids + self.queue):
                raise ValueError(f"the saved pool of {len(self.slot_ids)} episodes does not fit this one of "
                                 f"{self.slots} slots over {len(self.rows)} episodes")
        self.episodes = [load_episode(self.data_dir, self.rows[i]) for i in self.slot_ids]
        if self.swaps_per_step > 0:
            self._thread = threading.Thread(target=self._prefetch_loop, daemon=True)
            self._thread.start()

    def state(self) -> dict:
        return {"slot_ids": list(self.slot_ids), "queue": list(self.queue)}

    def close(self):
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    # -- background prefetch ------------------------------------------------------------------------------
    def _prefetch_loop(self):
        while True:
            with self._cond:
                while not self._stop and all(i in self._cache for i in self.queue):
                    self._cond.wait()
                if self._stop:
                    return
                todo = next(i for i in self.queue if i not in self._cache)
            try:
                ep = load_episode(self.data_dir, self.rows[todo])
            except BaseException as e:  # handed to the training thread, which exits with the message
                ep = e if isinstance(e, SystemExit) else SystemExit(
                    f"{SCRIPT}: error: loading {self.rows[todo]['path']} failed: {e!r}")
            with self._cond:
                self._cache[todo] = ep
                self._cond.notify_all()

    def _take(self, i: int):
        with self._cond:
            while i not in self._cache:
                self._cond.wait()
            ep = self._cache.pop(i) if self.queue.count(i) == 1 else self._cache[i]
        if isinstance(ep, SystemExit):
            raise ep
        return ep

    def refresh(self, step: int):
        """Swap in the episodes scheduled for update `step` (floor((step+1)*r) - floor(step*r) of them)."""
        r = self.swaps_per_step
        for _ in range(int(math.floor((step + 1) * r)) - int(math.floor(step * r))):
            ep_id = self.queue[0]
            ep = self._take(ep_id)
            slot = int(self.rng.integers(self.slots))
            self.slot_ids[slot], self.episodes[slot] = ep_id, ep
            with self._cond:
                self.queue = self.queue[1:] + [int(self.rng.integers(len(self.rows)))]
                self._cond.notify_all()

    # -- sampling -------------------------------------------------------------------------------------------
    def sample(self, batch_size: int) -> dict:
        """batch_size windows of seq_len frames, every window start in the pool equally likely: an episode is
        drawn in proportion to its number of window starts, so time steps are sampled uniformly, as in
        DreamerV3's replay (uniform over episodes would give a 101-frame Meta-World episode five times the
        weight per frame of a 501-frame DMControl one)."""
        L = self.seq_len
        out = {"image": np.empty((batch_size, L, 64, 64, 3), np.uint8),
               "action": np.empty((batch_size, L, MAX_ACTION_DIM), np.float32),
               "is_first": np.empty((batch_size, L), bool)}
        starts = np.array([len(ep["image"]) - L + 1 for ep in self.episodes], np.float64)
        slots = self.rng.choice(self.slots, size=batch_size, p=starts / starts.sum())
        for b, slot in enumerate(slots):
            ep = self.episodes[int(slot)]
            t0 = int(self.rng.integers(len(ep["image"]) - L + 1))
            for k in out:
                out[k][b] = ep[k][t0 : t0 + L]
        out["is_first"][:, 0] = True  # every window starts from a fresh state
        return out


# ==== shared model classes, the originals: verbatim copies in finetune_gsa.py, the encoder part in retrieval.py ====
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
# ==== end shared model classes ====


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


def resolve_device(spec: str, local_rank: int, world_size: int) -> torch.device:
    """--device as a torch.device. Under torchrun each process takes its own GPU, cuda:LOCAL_RANK, so there
    --device cuda (or auto) names the kind of device and an explicit index is refused."""
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if spec == "auto" else spec)
    except RuntimeError:
        fail(f"--device {spec!r} is not a torch device; use auto, cpu, cuda, cuda:1, ...")
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        fail(f"--device {spec} but no CUDA device is available")
    if world_size > 1 and device.index is not None:
        fail(f"--device {spec} names one GPU, but under torchrun each process takes cuda:LOCAL_RANK; pass --device "
             f"cuda")
    index = local_rank if device.index is None else device.index
    if index >= torch.cuda.device_count():
        fail(f"--device {spec}: cuda:{index} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    return torch.device("cuda", index)


def size_config(size: str) -> ModelConfig:
    return ModelConfig(**{k: v for k, v in SIZES[size].items() if k not in ("batch_size", "seq_len")})


# ---------------------------------------------------------------------------------------------------------
# One update, open-loop evaluation
# ---------------------------------------------------------------------------------------------------------

class _LossModule(nn.Module):
    """DDP synchronises gradients of what runs inside forward(); this routes forward() to WorldModel.loss."""

    def __init__(self, world_model: WorldModel):
        super().__init__()
        self.world_model = world_model

    def forward(self, image, action, is_first, dyn_scale, rep_scale, free):
        return self.world_model.loss(image, action, is_first, dyn_scale, rep_scale, free)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in batch.items()}


def train_step(world_model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, args: Args,
               autocast_dtype: Optional[torch.dtype] = None) -> dict:
    """One world-model update on a batch {image uint8 [B,T,64,64,3], action [B,T,12], is_first [B,T]}.
    world_model: a WorldModel, or its _LossModule wrapped in DDP. Returns metrics (detached tensors)."""
    device = batch["image"].device
    ctx = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with ctx:
        if isinstance(world_model, WorldModel):
            loss, metrics, _ = world_model.loss(batch["image"], batch["action"], batch["is_first"],
                                                args.dyn_scale, args.rep_scale, args.free_nats)
        else:
            loss, metrics, _ = world_model(batch["image"], batch["action"], batch["is_first"],
                                           args.dyn_scale, args.rep_scale, args.free_nats)
    if not bool(torch.isfinite(loss)):
        metrics["nonfinite"] = "loss"
        return metrics
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    if not bool(torch.isfinite(metrics["grad_norm"])):  # checked before the step: the weights stay as they were
        metrics["nonfinite"] = "gradient"
        return metrics
    optimizer.step()
    return metrics


@torch.no_grad()
def openloop_eval(world_model: WorldModel, clips: dict, device: torch.device, context: int = 5):
    """Per embodiment: observe `context` frames, then imagine the rest with the true actions.
    Returns ({embodiment: {"model": open-loop MSE per pixel in [0, 1] scale, "copy": the same for repeating
    the last context frame}}, {embodiment: video frames uint8})."""
    results, videos = {}, {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)  # evaluation never moves the training RNG (resume stays exact)
        for emb, batch in clips.items():
            b = to_device(batch, device)
            image, action, is_first = b["image"], b["action"], b["is_first"]
            embed = world_model.encoder(image[:, :context])
            post, _ = world_model.rssm.observe(embed, action[:, :context], is_first[:, :context])
            state = {k: v[:, -1] for k, v in post.items()}
            feats = [world_model.rssm.get_feat(post)]
            preds = []
            for t in range(context, image.shape[1]):
                state = world_model.rssm.img_step(state, action[:, t])
                preds.append(world_model.rssm.get_feat(state))
            feats.append(torch.stack(preds, 1))
            model = world_model.decoder(torch.cat(feats, 1)).float().add(0.5).clamp(0, 1)
            truth = image.float() / 255.0
            # baseline "copy": repeat the last context frame (a model must beat it to have learned any motion)
            results[emb] = {"model": float((model[:, context:] - truth[:, context:]).square().mean()),
                            "copy": float((truth[:, context - 1 : context] - truth[:, context:]).square().mean())}
            # video: rows = clips, each row [truth | model]; frames over time
            frames = torch.cat([truth, model], 3)  # [B, T, H, 2W, 3]
            frames = frames.permute(1, 0, 2, 3, 4).reshape(frames.shape[1], -1, frames.shape[3], 3)
            videos[emb] = (frames * 255).round().to(torch.uint8).cpu().numpy()
    return results, videos


# ---------------------------------------------------------------------------------------------------------
# Checkpoint and artifact I/O
# ---------------------------------------------------------------------------------------------------------


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


def rng_state(np_rng: np.random.Generator, device: torch.device) -> dict:
    """This process's RNG states, encoded as finetune_gsa.py encodes its own: numpy's generator (the data
    sampler's) and python's as JSON strings, torch's as tensors; CUDA's of this process's device only."""
    state = {"numpy": json.dumps(np_rng.bit_generator.state), "python": json.dumps(random.getstate()),
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, np_rng: np.random.Generator, device: torch.device) -> None:
    np_rng.bit_generator.state = json.loads(state["numpy"])
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def first_sentence(e: BaseException) -> str:
    """The start of an exception's message (torch's run to many lines)."""
    return f"{type(e).__name__}: " + re.split(r"(?<=\.)\s|\n", str(e).strip(), maxsplit=1)[0][:200]


def damaged_checkpoint(path: Path, e: BaseException):
    fail(f"checkpoint {path} is damaged ({first_sentence(e)}); delete it to start this run over, or put back "
         f"a good copy and resume")


def load_checkpoint(path: Path) -> dict:
    """The checkpoint at `path`, its fields checked; a damaged or foreign file is an error naming it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (truncated, random bytes, a pickle with code: all a damaged file)
        damaged_checkpoint(path, e)
    if not isinstance(ckpt, dict) or ckpt.get("script") != SCRIPT:
        fail(f"{path} is not a {SCRIPT} checkpoint; choose another --out-dir")
    if ckpt.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        fail(f"{path} has format version {ckpt.get('format_version')!r}, and this script resumes only version "
             f"{CHECKPOINT_FORMAT_VERSION}; choose another --out-dir")
    fields = {"args": dict, "model_config": dict, "model": dict, "optimizer": dict, "step": int, "rng": dict,
              "embodiments": list, "manifest_sha256": str}
    wrong = [k for k, kind in fields.items() if not isinstance(ckpt.get(k), kind)]
    if wrong:
        damaged_checkpoint(path, KeyError(f"missing or mistyped {', '.join(wrong)}"))
    ranks = ckpt["rng"].get("ranks")
    if not ranks or not all(isinstance(r, dict) and isinstance(r.get("numpy"), str) for r in ranks):
        # written before RNG states were stored as JSON (2026-11-30)
        fail(f"{path} stores its RNG state in an older encoding, so this run cannot continue exactly; its model "
             f"still serves retrieval.py and finetune_gsa.py. Choose another --out-dir to pre-train again")
    return ckpt


@contextlib.contextmanager
def restoring_from(path: Path):
    """Restoring state from a checkpoint whose fields do not fit is an error naming the file."""
    try:
        yield
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        damaged_checkpoint(path, e)


def trim_metrics(path: Path, last_step: int) -> list:
    """On resume, drop the metric rows written after the checkpoint we continue from (they will be redone) and
    the torn last line of a killed run; returns the rows kept."""
    if not path.exists():
        return []
    lines, kept = path.read_text().splitlines(), []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            if i == len(lines) - 1:
                break  # a torn last line from a kill
            fail(f"{path} line {i + 1} is not a metrics row; delete that line, then resume")
        if row["step"] <= last_step:
            kept.append((line, row))
    write_atomic(path, "".join(line + "\n" for line, _ in kept).encode())
    return [row for _, row in kept]


def write_video(path: Path, frames: np.ndarray):
    import imageio.v2 as imageio

    buf = io.BytesIO()
    imageio.mimsave(buf, list(frames), format="gif", duration=100, loop=0)
    write_atomic(path, buf.getvalue())


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# ---------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------

@fail_on_full_disk("re-run the same command with --resume")
def main(args: Args):
    check_ranges(args)
    wandb = import_wandb(args.track)
    # -- distributed set-up (torchrun sets these variables) ------------------------------------------------
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(args.device, local_rank, world_size)
    use_cuda = device.type == "cuda"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not use_cuda:
        keep_freed_memory()
    is_main = rank == 0
    log = (lambda *a: print(*a, flush=True)) if is_main else (lambda *a: None)

    # -- validate everything before writing anything ------------------------------------------------------
    embodiments = parse_embodiments(args.embodiments)
    data_dir, out_dir = Path(args.data_dir), Path(args.out_dir)
    check_out_dir(out_dir)
    cfg = size_config(args.size)
    batch_size = SIZES[args.size]["batch_size"] if args.batch_size is None else args.batch_size
    seq_len = SIZES[args.size]["seq_len"] if args.seq_len is None else args.seq_len
    _, manifest_sha, rows, embodiments = load_manifest(data_dir, embodiments)
    ckpt_path = out_dir / "wm.pt"
    ckpt = None
    if ckpt_path.exists():
        if not args.resume:
            fail(f"{ckpt_path} exists; pass --resume to continue that run or choose another --out-dir")
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["manifest_sha256"] != manifest_sha:
            fail(f"{data_dir}/manifest.json differs from the one {ckpt_path} was trained on "
                 f"(sha256 {manifest_sha[:12]} vs {ckpt['manifest_sha256'][:12]})")
        diff = [k for k in RUN_DEFINING if ckpt["args"].get(k) != getattr(args, k)]
        if diff:
            old_args = ckpt["args"]
            changes = ", ".join(f"--{k.replace('_', '-')} {old_args.get(k)!r} -> {getattr(args, k)!r}" for k in diff)
            fail(f"cannot resume {ckpt_path}: run-defining args differ: {changes}")
        if ckpt["model_config"] != asdict(cfg) or ckpt["embodiments"] != embodiments:
            fail(f"{ckpt_path} was written with a different model config or embodiment list")
    train_rows, held_rows = split_holdout(rows, embodiments, args.holdout_fraction)

    # -- seeding, data (corrupt files fail here, still before any output) ----------------------------------
    random.seed(args.seed + rank)
    torch.manual_seed(args.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    pool = EpisodePool(data_dir, train_rows, seq_len, args.pool_mb, args.pool_swaps_per_step,
                       np.random.default_rng([args.seed, rank]))
    clips = {}
    for emb in embodiments:  # open-loop clips: held-out episodes (a training one if an embodiment has one)
        src = held_rows[emb] or [r for r in train_rows if r["embodiment"] == emb][:1]
        eps = [load_episode(data_dir, r, args.openloop_len) for r in src[: args.eval_episodes]]
        n = min(len(e["image"]) for e in eps)
        if n <= 5:
            fail(f"{emb} episodes are too short for open-loop evaluation")
        clips[emb] = {k: np.stack([e[k][:n] for e in eps]) for k in ("image", "action", "is_first")}
    if ckpt is None:
        pool.fill()
    else:
        with restoring_from(ckpt_path):
            ranks = ckpt["rng"].get("ranks", [])
            pool.fill(ranks[rank]["pool"] if len(ranks) == world_size else None)

    # -- model and optimiser --------------------------------------------------------------------------------
    world_model = WorldModel(cfg).to(device)
    if args.compile:
        world_model.rssm.filter_step = compile_step(world_model.rssm.filter_step, device.type)
    n_params = sum(p.numel() for p in world_model.parameters())
    optimizer = torch.optim.Adam(world_model.parameters(), lr=args.lr, eps=args.adam_eps,
                                 weight_decay=args.weight_decay, fused=True)  # fused: one kernel, CPU and GPU
    step, saved_step = 0, None  # saved_step: the update of the checkpoint in ckpt_path, if any
    if ckpt is not None:
        with restoring_from(ckpt_path):
            world_model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            step = saved_step = ckpt["step"]
            ranks = ckpt["rng"].get("ranks", [])
            if len(ranks) == world_size:
                set_rng_state(ranks[rank], pool.rng, device)
            else:
                log(f"note: resuming with {world_size} processes from a {len(ranks)}-process checkpoint; "
                    f"data sampling is re-seeded")
                torch.manual_seed(args.seed + 7919 * (step + rank))
    else:
        torch.manual_seed(args.seed + rank)  # latent sampling differs across ranks
    model = world_model
    if world_size > 1:
        if use_cuda:
            torch.cuda.set_device(device)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
        model = torch.nn.parallel.DistributedDataParallel(_LossModule(world_model),
                                                          device_ids=[local_rank] if use_cuda else None)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and use_cuda)
    autocast_dtype = torch.bfloat16 if bf16 else None

    # -- outputs (rank 0 only) -------------------------------------------------------------------------------
    writer, evaluated_at, tracker = None, None, None  # evaluated_at: the update of the last open-loop evaluation
    if is_main:
        (out_dir / "videos").mkdir(parents=True, exist_ok=True)
        sweep_stale_temporaries(out_dir, out_dir / "videos")
        write_json_atomic(out_dir / "args.json", asdict(args))
        if ckpt is not None:
            kept = trim_metrics(out_dir / "metrics.jsonl", step)
            evaluated_at = max((r["step"] for r in kept if any(k.startswith("openloop_mse/") for k in r)),
                               default=None)
        elif (out_dir / "metrics.jsonl").exists():
            (out_dir / "metrics.jsonl").unlink()  # left by a run killed before its first checkpoint
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tb"))
        tracker = start_tracking(wandb, args, f"pretrain-{args.size}-{'+'.join(embodiments)}-s{args.seed}", out_dir,
                                 asdict(args), {"train/*": "step", "openloop_mse/*": "step",
                                                "openloop_copy_mse/*": "step"})
    metrics_file = open(out_dir / "metrics.jsonl", "a") if is_main else None
    log(f"{SCRIPT}: {args.size} world model, {n_params / 1e6:.2f}M parameters; embodiments {embodiments}; "
        f"{len(train_rows)} train / {sum(len(v) for v in held_rows.values())} held-out episodes; pool "
        f"{pool.slots} episodes; batch {batch_size} x {seq_len} x {world_size} process(es); device {device} "
        f"({'bf16 autocast' if autocast_dtype is not None else 'fp32'}{', compiled loop' if args.compile else ''}); "
        f"step {step}/{args.steps}")

    def save_checkpoint():
        nonlocal saved_step
        states = {**rng_state(pool.rng, device), "pool": pool.state()}
        if world_size > 1:
            gathered = [None] * world_size
            torch.distributed.all_gather_object(gathered, states)
        else:
            gathered = [states]
        if is_main:
            buf = io.BytesIO()
            torch.save({
                "format_version": CHECKPOINT_FORMAT_VERSION, "script": SCRIPT, "args": asdict(args),
                "model_config": asdict(cfg), "model": world_model.state_dict(),
                "optimizer": optimizer.state_dict(), "step": step, "rng": {"ranks": gathered},
                "embodiments": embodiments, "manifest_sha256": manifest_sha}, buf)
            write_atomic(ckpt_path, buf.getbuffer())  # a view, not a copy, of a possibly large buffer
        saved_step = step

    def evaluate():
        nonlocal evaluated_at
        if not is_main:
            return
        world_model.eval()
        mse, videos = openloop_eval(world_model, clips, device)
        world_model.train()
        for emb, frames in videos.items():
            write_video(out_dir / "videos" / f"openloop-{emb}-{step:08d}.gif", frames)
        record = {"step": step, **{f"openloop_mse/{e}": v["model"] for e, v in mse.items()},
                  **{f"openloop_copy_mse/{e}": v["copy"] for e, v in mse.items()}}
        for k, v in record.items():
            if k != "step":
                writer.add_scalar(k, v, step)
        if tracker is not None:
            tracker.log(record)
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        evaluated_at = step
        log(f"step {step}: open-loop MSE (repeat-last-frame baseline) "
            + ", ".join(f"{e} {v['model']:.5f} ({v['copy']:.5f})" for e, v in mse.items()))

    # -- training loop --------------------------------------------------------------------------------------
    sums, n_sum = {}, 0
    t_last, step_last, t_start = time.perf_counter(), step, time.perf_counter()
    try:
        while step < args.steps:
            pool.refresh(step)
            batch = to_device(pool.sample(batch_size), device)
            metrics = train_step(model, optimizer, batch, args, autocast_dtype)
            bad = metrics.pop("nonfinite", None)
            if bad:
                kept = ("no checkpoint was written yet" if saved_step is None
                        else f"the checkpoint {ckpt_path} of update {saved_step} is kept")
                fail(f"non-finite {bad} at update {step + 1} (loss {float(metrics['loss'])}, gradient norm "
                     f"{float(metrics.get('grad_norm', float('nan')))}); stopped before the weights changed; {kept}")
            step += 1
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n_sum += 1
            if step % args.log_every == 0 or step == args.steps:
                now = time.perf_counter()
                rate = (step - step_last) / max(now - t_last, 1e-9)
                record = {"step": step, **{k: v / n_sum for k, v in sums.items()},
                          "steps_per_s": rate, "wall_time": now - t_start, "max_rss_mb": max_rss_mb()}
                sums, n_sum, t_last, step_last = {}, 0, now, step
                if is_main:
                    for k, v in record.items():
                        if k != "step":
                            writer.add_scalar(f"train/{k}", v, step)
                    if tracker is not None:
                        tracker.log({"step": step, **{f"train/{k}": v for k, v in record.items() if k != "step"}})
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    eta = (args.steps - step) / max(rate, 1e-9)
                    log(f"step {step}/{args.steps} loss {record['loss']:.2f} recon {record['recon_loss']:.2f} "
                        f"kl {record['kl_dyn']:.3f} | {rate:.2f} steps/s, ETA {eta / 60:.1f} min, "
                        f"rss {record['max_rss_mb']:.0f} MB")
            if step < args.steps and (step % args.checkpoint_every == 0 or step % args.eval_every == 0):
                t_pause = time.perf_counter()
                # Evaluate first: a checkpoint then implies its update's evaluation is logged (resume keeps it).
                if step % args.eval_every == 0:
                    evaluate()
                if step % args.checkpoint_every == 0:
                    save_checkpoint()
                t_last += time.perf_counter() - t_pause  # steps/s counts training time only
        if evaluated_at != step:  # not when resuming a finished run, whose last evaluation is logged
            evaluate()
        if saved_step != step:
            save_checkpoint()
        if world_size > 1:
            # gloo's worker thread frees the last all_gather_object's tensors, which needs the GIL; freeing the
            # DDP reducer (and its process group, whose destructor joins that thread) at interpreter exit,
            # with the GIL held, could deadlock. Collectives run in order, so after this barrier the thread is
            # idle; then drop the wrapper here.
            torch.distributed.barrier()
            del model
    finally:
        pool.close()
        if is_main:
            metrics_file.close()
            writer.close()
            stop_tracking(tracker)
        if world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    log(f"{SCRIPT}: done, {step} updates; checkpoint {ckpt_path}")


if __name__ == "__main__":
    main(tyro.cli(Args))
