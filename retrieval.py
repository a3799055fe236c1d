"""Retrieval of task-relevant offline episodes for experience rehearsal (GSA paper Sec. 3.3, Eq. 4).

`build` encodes the first frame of every offline episode with the encoder of a pre-trained world model and
stores the features in a Faiss index (exact L2 by default, as released; IVF as an approximate option for
very large datasets). `query` encodes the first frames of a task's env resets and returns the k nearest
episodes (score of an episode = min L2 distance over the query frames), optionally only those whose action
dim matches the task's: this is the retrieved set D_r that fine-tuning rehearses and clones its prior from.

Reads:  build: <checkpoint> (pretrain_wm.py's wm.pt; only its `encoder.*` weights), <data-dir>/manifest.json
        and the first frame and actions of every episode .npz it lists (sha256 checked against the manifest,
        actions finite and in [-1, 1]).
        query: <index-dir>/index.faiss + index.json, the same checkpoint (sha256 checked), and for the grid
        image the first frames of the retrieved episodes from the data dir recorded at build time.
Writes: build: <out-dir>/index.faiss (faiss.serialize_index: what faiss.read_index reads) and
        <out-dir>/index.json (rows, hashes, settings).
        query: <out> (default <index-dir>/query-<task>.png): query frames beside the retrieved first frames
        (green border: same embodiment as the task, red: other), and <out> with suffix .json: the results.
Every flag's range (ARG_RANGES) and every input is checked before anything is written; a damaged file is named.

Examples:
    python retrieval.py build --checkpoint runs/wm/wm.pt --data-dir data --out-dir runs/index
    python retrieval.py query --index-dir runs/index --task walker-run --k 500
    python retrieval.py query --index-dir runs/index --query-images frames.npy --k 100 --action-dim 6

How the file reads: the two subcommands' Args; retrieval (Eq. 4: encode, index, `retrieve`); the `build` and
`query` steps; files (checkpoint, manifest, episodes, index, grid image); main; last, an appendix of the code
shared with the other scripts (the query rendering, whose original lives here, and pretrain_wm.py's encoder),
whose copies tests keep identical.
"""
import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must precede mujoco / dm_control imports

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import math
import re
import time
import zipfile
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import faiss
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

SCRIPT = "retrieval.py"
CHECKPOINT_FORMAT_VERSION = 1  # of pretrain_wm.py's wm.pt (the same constant there)
MANIFEST_FORMAT_VERSION = 1  # of collect_offline.py's manifest.json (the same constant there)
INDEX_FORMAT_VERSION = 1  # of the index.json written here (finetune_gsa.py reads it)
INDEX_FILE, META_FILE = "index.faiss", "index.json"
ACTION_TOLERANCE = 1e-6  # stored actions may exceed [-1, 1] by float rounding, no more
EMBODIMENTS = ("cartpole", "acrobot", "walker", "cheetah", "quadruped", "sawyer")
ACTION_DIMS = {"cartpole": 1, "acrobot": 1, "walker": 6, "cheetah": 6, "quadruped": 12, "sawyer": 4}
# The paper's 22 DMControl tasks and 50 Meta-World v3 tasks (Sec. 4, appendix I), and the stock dm_control tasks
# for quick checks: finetune_gsa.py's names (tests keep them identical).
DMC_TASKS = (
    "cartpole-balance",
    "acrobot-swingup", "acrobot-swingup-sparse", "acrobot-swingup-hard",
    "walker-stand", "walker-walk", "walker-run", "walker-backflip", "walker-walk-backwards",
    "walker-walk-hard", "walker-run-backwards",
    "cheetah-run", "cheetah-run-front", "cheetah-run-back", "cheetah-run-backwards", "cheetah-jump",
    "quadruped-walk", "quadruped-stand", "quadruped-run", "quadruped-jump", "quadruped-roll",
    "quadruped-roll-fast",
)
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


@dataclass
class BuildArgs:
    """Encode the first frame of every offline episode and write a Faiss index + JSON sidecar."""

    checkpoint: str = "runs/pretrain/wm.pt"
    """pre-trained world-model checkpoint (pretrain_wm.py's wm.pt); only its encoder is used"""
    data_dir: str = "data/offline"
    """offline data to index (collect_offline.py's --out-dir: manifest.json + episode .npz files)"""
    out_dir: str = "runs/index"
    """index directory to write (index.faiss and index.json; finetune_gsa.py's default --index-dir)"""
    seed: int = 0
    """seed of the k-means that trains an IVF index (a flat index involves no randomness)"""
    device: str = "auto"
    """torch device: auto (cuda if available), cpu, cuda, cuda:1, ..."""
    threads: Optional[int] = None
    """torch and Faiss CPU threads (default: the libraries' choice); set it when other processes share the cores"""
    index_type: Literal["flat", "ivf"] = "flat"
    """flat: exact L2 search (IndexFlatL2, as released); ivf: approximate, for very large datasets"""
    nlist: Optional[int] = None
    """IVF clusters (default: round(sqrt(episodes))); only with --index-type ivf"""
    nprobe: int = 16
    """IVF clusters visited per query, stored in the index; only with --index-type ivf"""
    batch_size: int = 64
    """first frames encoded per forward pass"""
    overwrite: bool = False
    """replace an existing index in --out-dir (it stays intact if the build fails)"""


@dataclass
class QueryArgs:
    """Return the k offline episodes nearest to a task's reset frames (Eq. 4); print and draw them."""

    index_dir: str = "runs/index"
    """index directory written by `retrieval.py build`"""
    checkpoint: Optional[str] = None
    """encoder checkpoint (default: the one recorded at build time); its sha256 must match the index's"""
    data_dir: Optional[str] = None
    """offline data for the grid image (default: the one recorded at build time; its manifest must match)"""
    out: Optional[str] = None
    """grid image path (PNG); the results go beside it as .json (default: <index-dir>/query-<task>.png)"""
    seed: int = 0
    """the fine-tuning run's seed: the query env is seeded as finetune_gsa.py seeds its own (same D_r)"""
    device: str = "auto"
    """torch device: auto (cuda if available), cpu, cuda, cuda:1, ..."""
    threads: Optional[int] = None
    """torch and Faiss CPU threads (default: the libraries' choice); set it when other processes share the cores"""
    task: Optional[str] = None
    """fine-tuning task (e.g. walker-run, mw-shelf-place): query frames are its env resets"""
    query_images: Optional[str] = None
    """instead of --task: a .npy file of uint8 query frames [Q, H, W, 3] (or one frame [H, W, 3])"""
    k: int = 500
    """number of episodes to retrieve (release: 500)"""
    query_resets: int = 5
    """env resets whose first frames form the query (with --task); the same default as finetune_gsa.py"""
    action_dim: Optional[int] = None
    """keep only episodes of this action dim (default: the task's own; none with --query-images)"""
    all_action_dims: bool = False
    """keep episodes of every action dim (turns the action-dim filter off)"""
    grid: int = 32
    """retrieved first frames drawn in the grid image, best first (0: no image, no data dir needed)"""


# Valid range of every numeric flag of BuildArgs and QueryArgs, (low, high) inclusive, None = unbounded;
# checked by check_ranges before anything is written. tests/ check that every int/float field has an entry.
ARG_RANGES = {
    "seed": (0, 2**31 - 1),  # Faiss's k-means takes a C int; the query env's seed + QUERY_SEED_OFFSET < 2**32
    "threads": (1, None),
    "nlist": (1, None),
    "nprobe": (1, None),
    "batch_size": (1, None),
    "k": (1, None),
    "query_resets": (1, None),
    "action_dim": (1, 12),  # the world model's padded action size
    "grid": (0, None),  # 0: no grid image
}


# ----------------------------------------------------------------------------------------------------------
# Retrieval (Sec. 3.3, Eq. 4): first frames -> encoder features -> a Faiss index -> the k nearest episodes
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def encode(encoder: "Encoder", frames: np.ndarray, device: str) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 features [N, E]: the pre-trained world model's encoder, as in Eq. 4."""
    return encoder(torch.as_tensor(frames, device=device)).float().cpu().numpy()


def make_index(features_dim: int, index_type: str, num_rows: int, nlist: Optional[int], nprobe: int):
    """(empty Faiss index, its name for the sidecar). IVF still needs training (see index_first_frames)."""
    if index_type == "flat":
        return faiss.IndexFlatL2(features_dim), "flat"
    nlist = max(1, round(math.sqrt(num_rows))) if nlist is None else nlist
    if nlist > num_rows:
        fail(f"--nlist {nlist} exceeds the number of episodes ({num_rows})")
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(features_dim), features_dim, nlist, faiss.METRIC_L2)
    index.nprobe = min(nprobe, nlist)
    return index, f"ivf{nlist},flat"


# ==== retrieve: the original; finetune_gsa.py holds a verbatim copy (tests keep them identical) ====
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


# ----------------------------------------------------------------------------------------------------------
# build: encode every episode's first frame into the index
# ----------------------------------------------------------------------------------------------------------

def index_first_frames(args: BuildArgs, encoder: "Encoder", image_size: int, data_dir: Path, episodes: list,
                       device: str):
    """The Faiss index whose row i holds the features of episodes[i]'s first frame, its name for the sidecar,
    and the wall-clock seconds spent encoding and indexing."""
    n, dim = len(episodes), encoder.out_dim
    index, index_name = make_index(dim, args.index_type, n, args.nlist, args.nprobe)
    # A flat index takes features batch by batch (memory: one copy); IVF must see them all to train first.
    features = np.empty((n, dim), np.float32) if args.index_type == "ivf" else None
    start, last_print = time.time(), time.time()
    for lo in range(0, n, args.batch_size):
        batch = episodes[lo:lo + args.batch_size]
        feats = encode(encoder, np.stack([read_first_frame(data_dir, ep, image_size) for ep in batch]), device)
        if features is None:
            index.add(feats)
        else:
            features[lo:lo + len(batch)] = feats
        done = lo + len(batch)
        if time.time() - last_print > 10 or done == n:
            rate = done / max(time.time() - start, 1e-9)
            print(f"encoded {done}/{n} first frames, {rate:.1f} episodes/s, ETA {(n - done) / rate:.0f} s")
            last_print = time.time()
    encode_wall = time.time() - start
    start = time.time()
    if features is not None:
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = args.seed
        ivf.cp.max_points_per_centroid = 64  # k-means on <= 64 points per cluster: enough for coarse lists
        if n < 39 * ivf.nlist:
            print(f"warning: {n} episodes is few for {ivf.nlist} IVF clusters (Faiss wants >= 39 per cluster)")
        index.train(features)
        index.add(features)
    return index, index_name, encode_wall, time.time() - start


def build(args: BuildArgs, device: str) -> None:
    """`build`: check the inputs, encode every first frame, then write index.faiss and its sidecar."""
    out_dir, data_dir = Path(args.out_dir), Path(args.data_dir)
    if args.index_type == "flat" and (args.nlist != BuildArgs.nlist or args.nprobe != BuildArgs.nprobe):
        fail("--nlist / --nprobe only apply to --index-type ivf")
    check_out_dir(out_dir)
    if (out_dir / INDEX_FILE).exists() or (out_dir / META_FILE).exists():
        if not args.overwrite:
            fail(f"{out_dir} already holds an index; pass --overwrite to replace it")
    encoder, cfg, ckpt_sha = load_encoder(Path(args.checkpoint), device)
    manifest, manifest_sha = load_manifest(data_dir)
    if manifest.get("image_size", cfg.image_size) != cfg.image_size:
        fail(f"the data has {manifest['image_size']}px images, the encoder expects {cfg.image_size}px")
    episodes = manifest["episodes"]
    action_dims = {**ACTION_DIMS, **manifest.get("action_dims", {})}
    n, dim = len(episodes), encoder.out_dim
    print(f"encoder: {sum(p.numel() for p in encoder.parameters()):,} parameters, feature dim {dim}; "
          f"{n} episodes from {data_dir}")
    start_cpu = time.process_time()
    index, index_name, encode_wall, index_wall = index_first_frames(args, encoder, cfg.image_size, data_dir,
                                                                    episodes, device)
    meta = {
        "format_version": INDEX_FORMAT_VERSION, "script": SCRIPT, "metric": "l2", "index_type": index_name,
        "feature_dim": dim, "num_rows": n,
        "checkpoint_sha256": ckpt_sha, "manifest_sha256": manifest_sha,
        "checkpoint": str(Path(args.checkpoint).resolve()), "data_dir": str(data_dir.resolve()),
        "model_config": asdict(cfg), "args": asdict(args),
        "timing": {"encode_wall_s": round(encode_wall, 3), "index_wall_s": round(index_wall, 3),
                   "total_cpu_s": round(time.process_time() - start_cpu, 3)},
        "rows": [{"path": ep["path"], "embodiment": ep["embodiment"], "task": ep.get("task"),
                  "action_dim": int(action_dims[ep["embodiment"]]), "length": int(ep["length"])}
                 for ep in episodes],
    }
    if args.index_type == "ivf":
        meta["nprobe"] = int(faiss.extract_index_ivf(index).nprobe)
    # Each file is written atomically and the sidecar lands last, so a complete index.json always describes
    # the index.faiss beside it.
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(out_dir)
    write_atomic(out_dir / INDEX_FILE, faiss.serialize_index(index).tobytes())
    write_json_atomic(out_dir / META_FILE, meta)
    print(f"wrote {out_dir / INDEX_FILE} ({index_name}, {n} x {dim}) and {out_dir / META_FILE}; "
          f"encode {encode_wall:.2f} s, index {index_wall:.2f} s (wall)")


# ----------------------------------------------------------------------------------------------------------
# query: the task's reset frames -> the k nearest episodes, with diagnostics
# ----------------------------------------------------------------------------------------------------------

def make_query_frames(args: QueryArgs, image_size: int) -> np.ndarray:
    """The query of Eq. 4, uint8 [Q, H, W, 3]: the first frames of the task's env resets (seeded as fine-tuning
    seeds its query env), or the frames of --query-images."""
    if args.task:
        t0 = time.time()
        frames = render_reset_frames(args.task, args.query_resets, args.seed, image_size)
        print(f"rendered {len(frames)} reset frames of {args.task} in {time.time() - t0:.2f} s")
        return frames
    path = Path(args.query_images)
    if not path.is_file():
        fail(f"query images {path} do not exist")
    try:
        frames = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        fail(f"cannot read {path} as a .npy array: {type(e).__name__}: {e}")
    if frames.ndim == 3:
        frames = frames[None]
    if frames.dtype != np.uint8 or frames.shape[1:] != (image_size, image_size, 3) or not len(frames):
        fail(f"{path}: query images must be uint8 [Q, {image_size}, {image_size}, 3], got "
             f"{frames.dtype} {list(frames.shape)}")
    return frames


def describe(results: list, task: Optional[str], embodiment: Optional[str]) -> tuple[Counter, Counter, dict]:
    """Print which embodiments and source tasks were retrieved, and the precision by embodiment (by source task
    on Meta-World); returns (by embodiment, by source task, precision)."""
    by_embodiment = Counter(row["embodiment"] for row, _ in results)
    by_task = Counter(str(row["task"]) for row, _ in results)
    print("by embodiment: " + ", ".join(f"{e} {c}" for e, c in by_embodiment.most_common()))
    print("by source task: " + ", ".join(f"{t} {c}" for t, c in by_task.most_common(20))
          + (f", ... ({len(by_task)} tasks)" if len(by_task) > 20 else ""))
    precision = {}
    if embodiment is not None:
        precision["embodiment"] = by_embodiment[embodiment] / len(results)
        print(f"precision by embodiment ({embodiment}): {precision['embodiment']:.3f}")
        if embodiment == "sawyer":
            precision["source_task"] = by_task[task[3:]] / len(results)
            print(f"precision by source task ({task[3:]}): {precision['source_task']:.3f}")
    return by_embodiment, by_task, precision


def grid_frames(args: QueryArgs, meta: dict, results: list, image_size: int) -> np.ndarray:
    """The first frames of the best --grid retrieved episodes, read from the data the index was built over."""
    index_dir = Path(args.index_dir)
    data_dir = Path(args.data_dir or meta.get("data_dir", ""))
    if args.data_dir is None and not (data_dir / "manifest.json").is_file():
        fail(f"the data dir recorded in {index_dir / META_FILE} ({data_dir}) has no manifest.json; pass "
             f"--data-dir, or --grid 0 for no grid image")
    manifest, manifest_sha = load_manifest(data_dir)
    if manifest_sha != meta["manifest_sha256"]:
        fail(f"{data_dir / 'manifest.json'} (sha256 {manifest_sha[:16]}...) is not the manifest the index "
             f"was built from ({meta['manifest_sha256'][:16]}...); pass the right --data-dir or --grid 0")
    by_path = {ep["path"]: ep for ep in manifest["episodes"]}
    shown = results[:args.grid]
    unknown = [row["path"] for row, _ in shown if row["path"] not in by_path]
    if unknown:
        fail(f"{index_dir / META_FILE} is damaged: it lists {unknown[0]}, which the manifest it was built "
             f"from does not; rebuild the index with `retrieval.py build --overwrite`")
    return np.stack([read_first_frame(data_dir, by_path[row["path"]], image_size) for row, _ in shown])


def query(args: QueryArgs, device: str) -> None:
    """`query`: check the inputs, encode the query frames, retrieve (Eq. 4), then print, draw and save D_r."""
    index_dir = Path(args.index_dir)
    if (args.task is None) == (args.query_images is None):
        fail("give exactly one of --task and --query-images")
    if args.all_action_dims and args.action_dim is not None:
        fail("--action-dim and --all-action-dims exclude each other")
    embodiment = task_embodiment(args.task) if args.task else None
    name = args.task or Path(args.query_images).stem
    out = Path(args.out) if args.out else index_dir / f"query-{name}.png"
    if args.out:
        check_out_dir(out.parent, "--out")
    index, meta = load_index(index_dir)
    checkpoint = Path(args.checkpoint or meta.get("checkpoint", ""))
    if args.checkpoint is None and not checkpoint.is_file():
        fail(f"the checkpoint recorded in {index_dir / META_FILE} ({checkpoint}) does not exist; pass --checkpoint")
    encoder, cfg, _ = load_encoder(checkpoint, device, expected_sha256=meta["checkpoint_sha256"])
    if encoder.out_dim != meta["feature_dim"]:
        fail(f"encoder feature dim {encoder.out_dim} differs from the index's {meta['feature_dim']}")
    frames = make_query_frames(args, cfg.image_size)
    action_dim = args.action_dim
    if action_dim is None and embodiment is not None and not args.all_action_dims:
        # the release drops episodes of other action dims than the task's (a stock task's: its own)
        action_dim = STOCK_DMC_TASKS.get(args.task) or ACTION_DIMS[embodiment]

    t0, c0 = time.time(), time.process_time()
    results = retrieve(index, meta, encode(encoder, frames, device), args.k, action_dim)
    wall, cpu = time.time() - t0, time.process_time() - c0
    print(f"retrieved {len(results)} of {index.ntotal} episodes (k={args.k}, action dim "
          f"{'any' if action_dim is None else action_dim}, {meta['index_type']}) in {wall:.3f} s "
          f"({cpu:.3f} CPU-s), query frames encoded and searched")
    if not results:
        fail("no episode in the index has the requested action dim")
    by_embodiment, by_task, precision = describe(results, args.task, embodiment)
    grid = grid_frames(args, meta, results, cfg.image_size) if args.grid else None  # read before any write

    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(out.parent)
    if grid is not None:
        match = [None if embodiment is None else row["embodiment"] == embodiment for row, _ in results[:len(grid)]]
        save_grid(out, frames, grid, match)
        print(f"wrote {out}")
    summary = {"query": name, "k": args.k, "action_dim": action_dim, "num_query_frames": len(frames),
               "index_dir": str(index_dir.resolve()), "index_type": meta["index_type"],
               "seconds": round(wall, 4), "by_embodiment": dict(by_embodiment), "by_task": dict(by_task),
               "precision": precision, "args": asdict(args),
               "results": [{**row, "distance": d} for row, d in results]}
    write_json_atomic(out.with_suffix(".json"), summary)
    print(f"wrote {out.with_suffix('.json')}")


# ----------------------------------------------------------------------------------------------------------
# Files: errors, hashes, atomic writes, the checkpoint, the manifest and episodes, the index, the grid image
# ----------------------------------------------------------------------------------------------------------

def fail(message: str) -> None:
    """User error: message on stderr, exit status 1, nothing written."""
    raise SystemExit(f"{SCRIPT}: error: {message}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
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


def first_sentence(e: BaseException) -> str:
    """The start of an exception's message (torch's and Faiss's run to many lines)."""
    return f"{type(e).__name__}: " + re.split(r"(?<=\.)\s|\n", str(e).strip(), maxsplit=1)[0][:200]


def task_embodiment(task: str) -> str:
    if task not in TASK_NAMES:
        fail(f"unknown task {task!r}; valid tasks: {', '.join(TASK_NAMES)}")
    return "sawyer" if task.startswith("mw-") else task.split("-")[0]


def load_encoder(checkpoint: Path, device: str, expected_sha256: Optional[str] = None):
    """Encoder rebuilt from checkpoint["model_config"], strict-loaded from the `encoder.*` weights.

    Returns (encoder in eval mode, ModelConfig, sha256 of the checkpoint file). With `expected_sha256`, a
    checkpoint with other bytes is refused before it is loaded.
    """
    if not checkpoint.is_file():
        fail(f"checkpoint {checkpoint} does not exist")
    sha = sha256_file(checkpoint)
    if expected_sha256 is not None and sha != expected_sha256:
        fail(f"the index was built with the encoder of a checkpoint with sha256 {expected_sha256[:16]}..., "
             f"but {checkpoint} has sha256 {sha[:16]}...; rebuild the index with this checkpoint "
             f"(retrieval.py build --overwrite ...) or pass the checkpoint it was built with")
    redo = "re-run pretrain_wm.py to write it again, or pass a good --checkpoint"
    try:  # mmap: only the encoder's tensors are read from a large checkpoint
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 (truncated, random bytes, a pickle with code: all a damaged file)
        fail(f"checkpoint {checkpoint} is damaged or not a torch file ({first_sentence(e)}); {redo}")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or "model_config" not in ckpt:
        fail(f"{checkpoint} is not a pretrain_wm.py checkpoint (no 'model' / 'model_config'); {redo}")
    if ckpt.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        fail(f"{checkpoint} has format_version {ckpt.get('format_version')!r}, this script reads "
             f"{CHECKPOINT_FORMAT_VERSION}; {redo}")
    state = {k[len("encoder."):]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    if not state:
        fail(f"{checkpoint} has no encoder weights (no 'encoder.*' keys in 'model'); {redo}")
    try:
        cfg = ModelConfig(**ckpt["model_config"])
        encoder = Encoder(cfg)
        encoder.load_state_dict(state, strict=True)
    except (TypeError, ValueError, RuntimeError) as e:  # unknown config fields, odd sizes, mismatched weights
        fail(f"{checkpoint}: its model_config and encoder weights do not build this script's Encoder "
             f"({first_sentence(e)}); {redo}")
    return encoder.to(device).eval(), cfg, sha


def load_manifest(data_dir: Path):
    """(manifest dict, sha256 of manifest.json); checks the fields retrieval relies on."""
    path = data_dir / "manifest.json"
    if not path.is_file():
        fail(f"no manifest at {path} (is --data-dir a collect_offline.py output directory?)")
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as e:
        fail(f"{path} is not valid JSON: {e}")
    if not isinstance(manifest, dict) or manifest.get("format_version") != MANIFEST_FORMAT_VERSION:
        fail(f"{path}: expected a manifest with format_version {MANIFEST_FORMAT_VERSION}")
    episodes = manifest.get("episodes")
    if not isinstance(episodes, list) or not episodes:
        fail(f"{path} lists no episodes")
    for i, ep in enumerate(episodes):
        missing = [key for key in ("path", "embodiment", "sha256", "length") if key not in ep]
        if missing:
            fail(f"{path}: episode {i} lacks {missing}")
        if ep["embodiment"] not in EMBODIMENTS:
            fail(f"{path}: episode {ep['path']} has unknown embodiment {ep['embodiment']!r}")
        p = Path(ep["path"])
        if p.is_absolute() or ".." in p.parts:
            fail(f"{path}: episode path {ep['path']!r} must be relative and inside the data directory")
    return manifest, hashlib.sha256(raw).hexdigest()


def read_first_frame(data_dir: Path, episode: dict, image_size: int) -> np.ndarray:
    """First image of an episode file, uint8 [H, W, 3], after checking the file's sha256 and its actions.

    Only the start of the compressed 'image' member is inflated (header + one frame): about 0.2 ms
    instead of about 14 ms for np.load of a whole 501-frame DMC episode. The small 'action' member is read
    whole, so that bad numbers are reported here, naming the file, rather than found in fine-tuning.
    """
    path = data_dir / episode["path"]
    if not path.is_file():
        fail(f"episode file {path} listed in the manifest does not exist")
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != episode["sha256"]:
        fail(f"episode file {path} is corrupt: its sha256 differs from the manifest's")
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as npz:
            with npz.open("image.npy") as f:
                version = np.lib.format.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f"unsupported .npy format version {version}")
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, fortran_order, dtype = read_header(f)
                expected = (image_size, image_size, 3)
                if dtype != np.uint8 or fortran_order or len(shape) != 4 or shape[1:] != expected or shape[0] < 1:
                    raise ValueError(f"'image' must be uint8 [T+1, {image_size}, {image_size}, 3] (C order), got "
                                     f"{dtype} {list(shape)}")
                frame = np.frombuffer(f.read(math.prod(expected)), np.uint8)
            with npz.open("action.npy") as f:
                action = np.lib.format.read_array(f, allow_pickle=False)
    except (KeyError, ValueError, OSError, zipfile.BadZipFile, zlib.error) as e:  # no member, bad header or zip
        fail(f"cannot read the first frame and actions of episode file {path}: {type(e).__name__}: {e}")
    check_actions(path, action)
    return frame.reshape(expected).copy()


def check_actions(path: Path, action: np.ndarray) -> None:
    """Fail naming the file unless every action is finite and in [-1, 1] (what collect_offline.py writes)."""
    bad = ~np.isfinite(action) | (np.abs(action) > 1 + ACTION_TOLERANCE)
    if bad.any():
        t, i = (int(x) for x in np.argwhere(bad)[0])
        fail(f"episode {path}: action[{t}, {i}] = {float(action[t, i])} is not a finite number in [-1, 1] "
             f"({int(bad.sum())} such values); recollect or drop this episode")


def load_index(index_dir: Path):
    """(Faiss index, sidecar dict) of an index directory, checked for consistency."""
    index_path, meta_path = index_dir / INDEX_FILE, index_dir / META_FILE
    for p in (index_path, meta_path):
        if not p.is_file():
            fail(f"{p} does not exist (build the index with `retrieval.py build`)")
    rebuild = f"rebuild the index with `retrieval.py build --overwrite --out-dir {index_dir} ...`"
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"{meta_path} is damaged: not valid JSON ({e}); {rebuild}")
    if not isinstance(meta, dict) or meta.get("format_version") != INDEX_FORMAT_VERSION:
        fail(f"{meta_path}: expected an index sidecar with format_version {INDEX_FORMAT_VERSION}; {rebuild}")
    # The fields query and fine-tuning read, with their types: a sidecar lacking one is damaged.
    fields = {"rows": list, "feature_dim": int, "index_type": str, "checkpoint_sha256": str,
              "manifest_sha256": str, "checkpoint": str, "data_dir": str}
    row_fields = {"path": str, "embodiment": str, "action_dim": int}
    wrong = [k for k, kind in fields.items() if not isinstance(meta.get(k), kind)]
    if not wrong:
        wrong = [f"rows[{i}].{k}" for i, row in enumerate(meta["rows"]) for k, kind in row_fields.items()
                 if not isinstance(row, dict) or not isinstance(row.get(k), kind)][:3]
    if wrong:
        fail(f"{meta_path} is damaged: missing or mistyped {', '.join(wrong)}; {rebuild}")
    try:
        index = faiss.read_index(str(index_path))
    except RuntimeError as e:
        fail(f"{index_path} is damaged: Faiss cannot read it ({first_sentence(e)}); {rebuild}")
    if index.ntotal != len(meta["rows"]) or index.d != meta["feature_dim"]:
        fail(f"{index_dir}: index.faiss ({index.ntotal} x {index.d}) does not match index.json "
             f"({len(meta['rows'])} rows x {meta['feature_dim']}); {rebuild}")
    return index, meta


def save_grid(path: Path, query_frames: np.ndarray, frames: np.ndarray, match: list, cols: int = 8) -> None:
    """PNG: query frames in a column (blue borders), then the retrieved frames in rows of `cols`, best
    first, bordered green (same embodiment as the query task), red (other) or grey (unknown)."""
    import imageio.v2 as imageio

    size = query_frames.shape[1]
    tile, pad = size + 4, 8
    colours = {True: (40, 200, 40), False: (220, 40, 40), None: (128, 128, 128)}

    def bordered(frame, colour):
        out = np.empty((tile, tile, 3), np.uint8)
        out[:] = colour
        out[2:-2, 2:-2] = frame
        return out

    rows = max(1, math.ceil(len(frames) / cols))
    nq = min(len(query_frames), max(rows, 1))
    height = max(rows, nq) * tile
    grid = np.full((height, tile + pad + cols * tile, 3), 255, np.uint8)
    for i in range(nq):
        grid[i * tile:(i + 1) * tile, :tile] = bordered(query_frames[i], (40, 80, 230))
    for i, frame in enumerate(frames):
        r, c = divmod(i, cols)
        x = tile + pad + c * tile
        grid[r * tile:(r + 1) * tile, x:x + tile] = bordered(frame, colours[match[i]])
    buf = io.BytesIO()
    imageio.imwrite(buf, grid, format="png")
    write_atomic(path, buf.getvalue())


@fail_on_full_disk("re-run the same command (an existing index stays intact)")
def main(args: Union[BuildArgs, QueryArgs]) -> None:
    check_ranges(args)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        kind = torch.device(device).type
    except RuntimeError:
        fail(f"--device {args.device!r} is not a torch device; use auto, cpu, cuda, cuda:1, ...")
    if kind == "cuda" and not torch.cuda.is_available():
        fail(f"--device {args.device} but no CUDA device is available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    if isinstance(args, BuildArgs):
        build(args, device)
    else:
        query(args, device)


# ==========================================================================================================
# Appendix: code this script shares with the others, kept here so that the file stands alone.
#   * render_reset_frames and its QUERY_* constants (the query frames of Eq. 4): the original lives here;
#     finetune_gsa.py holds a verbatim copy, so retrieval.py query and fine-tuning retrieve the same D_r;
#   * the encoder classes (ModelConfig, _trunc_normal_init, BlockLinear, ChannelNorm, Encoder): verbatim copies
#     of pretrain_wm.py's, whose checkpoints they load strictly.
# Tests keep every copy identical to its original (same source text). `retrieve` (Eq. 4, above) is this
# script's own too; finetune_gsa.py holds a verbatim copy of it as well.
# ==========================================================================================================

# ==== query rendering: the original; finetune_gsa.py holds a verbatim copy (tests keep them identical) ====
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

# ==== encoder classes: verbatim copies of pretrain_wm.py's (tests compare the source text) ====
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
# ==== end encoder classes ====


if __name__ == "__main__":
    main(tyro.cli(Union[Annotated[BuildArgs, tyro.conf.subcommand("build")],
                        Annotated[QueryArgs, tyro.conf.subcommand("query")]]))
