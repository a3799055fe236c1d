"""State coverage of an embodiment's offline episodes: torso height, forward speed and uprightness, per policy
group, against uniformly random actions (issue 13: "the walker exploration data must contain standing and moving,
not mostly lying down").

The episodes store only image, action and is_first; their states are recovered by replay. Each episode's env is
made and reset exactly as collect_offline.py made it (`RewardFreeDMC(embodiment).reset(row["seed"])`: the task's
initial-state randomness seeded from the manifest row's seed), and the stored actions 1..T are stepped through the
same `RewardFreeDMC.step` (action repeat 2, no task reward ever called). After every agent step the script records
the torso height (`physics.torso_height()`), the forward speed (`physics.horizontal_velocity()`, the torso subtree's
linear velocity along x, signed: the quantity walker-walk/run reward) and the torso's up-axis z (`torso_upright()`).
Replay is checked against the stored pixels: every --verify-every agent steps (and at step 0 and T) the replayed
state is rendered with collect_offline.py's own renderer and compared with the stored frame.

The reference is as many episodes of uniform random actions in [-1, 1] (from fresh initial states), played here.

Thresholds (dm_control suite/walker.py): _STAND_HEIGHT 1.2 (walker-stand's standing term is 1 above it),
_WALK_SPEED 1 and _RUN_SPEED 8 (walker-walk / walker-run's move term is 1 above them). "Upright" here means
torso_upright > 0.9 (torso within ~26 degrees of vertical). For scale, the script also gives the mean per-step
stock stand and walk rewards these states would earn (computed from height, upright and speed with
dm_control.utils.rewards.tolerance, as suite/walker.py does); x 1000 they approximate an episode's return, counting
the state after each agent step for both of its env frames. This is analysis only: nothing is written to the data.

Reads:  <data-dir>/manifest.json and the embodiment's episodes (.npz). Nothing is modified.
Writes: <out>/coverage.json (per group statistics, per episode rows, replay check), <out>/coverage.png.
Example: OMP_NUM_THREADS=1 python results/coverage/coverage.py --data-dir ~/experiments/gsa/data --out results/coverage
"""
import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco / dm_control are imported

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import collect_offline as co  # noqa: E402  (the env, reset and step of the collection itself)


@dataclass
class Args:
    data_dir: str = "data/offline"
    """dataset made by collect_offline.py (read only)"""
    embodiment: str = "walker"
    """embodiment whose episodes are measured (walker: the only one with these measures so far)"""
    out: str = "results/coverage"
    """output directory for coverage.json and coverage.png"""
    seed: int = 0
    """seed of the uniform-random reference episodes (initial states and actions)"""
    random_episodes: Optional[int] = None
    """reference episodes of uniform random actions; default: as many as the data has for the embodiment"""
    verify_every: int = 100
    """render the replayed state every this many agent steps (plus steps 0 and T) and compare it with the stored
    frame; 0 skips the check"""


STAND_HEIGHT, WALK_SPEED, RUN_SPEED = 1.2, 1.0, 8.0  # dm_control suite/walker.py
LOW_HEIGHT = 1.0  # a looser "standing-ish" threshold (torso clearly off the ground, knees may be bent)
UPRIGHT_ZZ = 0.9
PERCENTILES = (5, 25, 50, 75, 95)


def fail(message: str):
    raise SystemExit(f"coverage.py: error: {message}")


# ----------------------------------------------------------------------------------------------------------
# Replay and the random reference
# ----------------------------------------------------------------------------------------------------------

def read_state(env) -> tuple:
    p = env.physics
    return float(p.torso_height()), float(p.horizontal_velocity()), float(p.torso_upright())


def replay(env, row: dict, data_dir: Path, verify_every: int) -> dict:
    """Replay one stored episode from its manifest seed; per-step states and the pixel check."""
    with np.load(data_dir / row["path"], allow_pickle=False) as z:
        image, action = z["image"], z["action"]
    T = len(action) - 1
    if T != row["length"] or image.shape[0] != T + 1:
        fail(f"{row['path']}: {T} actions for a manifest length of {row['length']}")
    check = set() if verify_every <= 0 else {0, T, *range(0, T + 1, verify_every)}
    frame = np.zeros_like(image[0])
    diffs = []  # (step, max abs pixel diff, fraction of differing pixel values)

    def compare(t: int) -> None:
        env.render(frame)
        d = np.abs(frame.astype(np.int16) - image[t].astype(np.int16))
        diffs.append((t, int(d.max()), float((d > 0).mean())))

    states = np.zeros((T + 1, 3))
    env.reset(row["seed"])
    states[0] = read_state(env)
    if 0 in check:
        compare(0)
    for t in range(1, T + 1):
        env.step(action[t])  # float32, already clipped to [-1, 1] at collection: the same values it was stepped with
        states[t] = read_state(env)
        if t in check:
            compare(t)
    return {"states": states, "diffs": diffs}


def random_episode(env, seed: int, index: int, length: int) -> np.ndarray:
    """Uniform random actions in [-1, 1] from a fresh initial state (a stream apart from every data episode's)."""
    rng = np.random.default_rng([seed, 424242, index])
    env.reset(int(rng.integers(2**31)))
    states = np.zeros((length + 1, 3))
    states[0] = read_state(env)
    for t in range(1, length + 1):
        env.step(np.clip(rng.uniform(-1, 1, env.act_dim), -1, 1).astype(np.float32))
        states[t] = read_state(env)
    return states


# ----------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------

def tolerance(x, lower, margin, sigmoid="gaussian", value_at_margin=0.1):
    from dm_control.utils import rewards

    return rewards.tolerance(x, bounds=(lower, float("inf")), margin=margin, sigmoid=sigmoid,
                             value_at_margin=value_at_margin)


def stock_rewards(h: np.ndarray, vx: np.ndarray, zz: np.ndarray) -> tuple:
    """Per-state stock walker-stand and walker-walk rewards (suite/walker.py's formulas, for scale only)."""
    stand = (3 * tolerance(h, STAND_HEIGHT, STAND_HEIGHT / 2) + (1 + zz) / 2) / 4
    move = tolerance(vx, WALK_SPEED, WALK_SPEED / 2, "linear", 0.5)
    return stand, stand * (5 * move + 1) / 6


def describe(x: np.ndarray) -> dict:
    return {"mean": float(x.mean()), "max": float(x.max()), "min": float(x.min()),
            **{f"p{q}": float(v) for q, v in zip(PERCENTILES, np.percentile(x, PERCENTILES))}}


def longest_run(mask: np.ndarray) -> int:
    """Length of the longest stretch of consecutive True values."""
    best = run = 0
    for m in mask:
        run = run + 1 if m else 0
        best = max(best, run)
    return best


def group_stats(episodes: list) -> dict:
    """Statistics over the agent steps 1..T of a list of per-episode state arrays [T+1, 3]."""
    s = np.concatenate([e[1:] for e in episodes])
    h, vx, zz = s[:, 0], s[:, 1], s[:, 2]
    stand_r, walk_r = stock_rewards(h, vx, zz)
    speed = np.abs(vx)
    runs = [longest_run(e[51:, 0] > LOW_HEIGHT) for e in episodes]
    return {
        "episodes": len(episodes), "steps": int(len(s)),
        "height": describe(h), "vx": describe(vx), "abs_vx": describe(speed), "upright": describe(zz),
        f"frac_height_above_{STAND_HEIGHT}": float((h > STAND_HEIGHT).mean()),
        f"frac_height_above_{LOW_HEIGHT}": float((h > LOW_HEIGHT).mean()),
        f"frac_upright_above_{UPRIGHT_ZZ}": float((zz > UPRIGHT_ZZ).mean()),
        "frac_standing_upright": float(((h > STAND_HEIGHT) & (zz > UPRIGHT_ZZ)).mean()),
        f"frac_vx_above_{WALK_SPEED}": float((vx > WALK_SPEED).mean()),
        f"frac_abs_vx_above_{WALK_SPEED}": float((speed > WALK_SPEED).mean()),
        f"frac_vx_above_{RUN_SPEED}": float((vx > RUN_SPEED).mean()),
        f"frac_abs_vx_above_{RUN_SPEED}": float((speed > RUN_SPEED).mean()),
        f"frac_height_above_{LOW_HEIGHT}_and_abs_vx_above_{WALK_SPEED}": float(((h > LOW_HEIGHT) & (speed > WALK_SPEED)).mean()),
        # after the first 50 agent steps: the walker starts near standing height, and falling takes a while
        f"frac_height_above_{STAND_HEIGHT}_after_step_50": float(np.mean([(e[51:, 0] > STAND_HEIGHT).mean() for e in episodes])),
        f"frac_height_above_{LOW_HEIGHT}_after_step_50": float(np.mean([(e[51:, 0] > LOW_HEIGHT).mean() for e in episodes])),
        "frac_episodes_reaching_stand_height_after_step_50": float(np.mean([(e[51:, 0] > STAND_HEIGHT).any() for e in episodes])),
        # how long a stay off the ground lasts: longest stretch of agent steps with h > 1.0 after step 50
        f"longest_run_height_above_{LOW_HEIGHT}_after_step_50": {
            "mean": float(np.mean(runs)),
            "max": int(max(runs))},
        "stand_reward_mean": float(stand_r.mean()), "walk_reward_mean": float(walk_r.mean()),
    }


# ----------------------------------------------------------------------------------------------------------
# Figure
# ----------------------------------------------------------------------------------------------------------

def plot(groups: dict, states: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    names = list(states)
    fig = plt.figure(figsize=(3.0 * len(names), 6.6))
    grid = fig.add_gridspec(2, len(names), height_ratios=(1.1, 1))
    hb, vb = np.linspace(-0.1, 1.6, 52), np.linspace(-8, 8, 65)
    for i, name in enumerate(names):
        ax = fig.add_subplot(grid[0, i])
        s = np.concatenate([e[1:] for e in states[name]])
        ax.hist2d(np.clip(s[:, 1], vb[0], vb[-1]), np.clip(s[:, 0], hb[0], hb[-1]), bins=(vb, hb),
                  norm=LogNorm(vmin=1), cmap="viridis")
        ax.axhline(STAND_HEIGHT, color="w", lw=0.8, ls="--")
        for v in (-WALK_SPEED, WALK_SPEED):
            ax.axvline(v, color="w", lw=0.6, ls=":")
        g = groups[name]
        ax.set_title(f"{name}\n{g['episodes']} ep; h>{STAND_HEIGHT}: {100 * g[f'frac_height_above_{STAND_HEIGHT}']:.1f}%",
                     fontsize=8)
        ax.set_xlabel("forward speed vx (m/s)", fontsize=8)
        if i == 0:
            ax.set_ylabel("torso height (m)", fontsize=8)
        ax.tick_params(labelsize=7)
    parts = [("torso height (m)", 0, hb), ("forward speed vx (m/s)", 1, vb), ("torso upright (zz)", 2, np.linspace(-1, 1, 41))]
    sub = grid[1, :].subgridspec(1, 3, wspace=0.25)
    for j, (label, k, bins) in enumerate(parts):
        ax = fig.add_subplot(sub[0, j])
        for name in names:
            x = np.concatenate([e[1:, k] for e in states[name]])
            ax.hist(np.clip(x, bins[0], bins[-1]), bins=bins, density=True, histtype="step", lw=1.3,
                    label=name, ls="--" if name.startswith("reference") else "-")
        if k == 0:
            ax.axvline(STAND_HEIGHT, color="k", lw=0.8, ls=":")
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("density of agent steps", fontsize=8)
        ax.tick_params(labelsize=7)
        if j == 0:
            ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------

def main(args: Args) -> dict:
    if args.embodiment != "walker":
        fail(f"--embodiment {args.embodiment!r}: only walker's height and speed measures are written")
    if args.random_episodes is not None and args.random_episodes < 0:
        fail("--random-episodes must be >= 0")
    data_dir, out = Path(args.data_dir).expanduser(), Path(args.out)
    manifest_file = data_dir / "manifest.json"
    if not manifest_file.is_file():
        fail(f"{manifest_file} not found")
    manifest = json.loads(manifest_file.read_text())
    rows = [r for r in manifest["episodes"] if r["embodiment"] == args.embodiment]
    if not rows:
        fail(f"{manifest_file} lists no {args.embodiment} episode")
    n_random = len(rows) if args.random_episodes is None else args.random_episodes
    t0 = time.time()
    env = co.RewardFreeDMC(args.embodiment)
    try:
        episodes, data_states = [], {}
        for row in rows:
            r = replay(env, row, data_dir, args.verify_every)
            data_states.setdefault(row["policy"], []).append(r["states"])
            h, vx = r["states"][1:, 0], r["states"][1:, 1]
            episodes.append({"path": row["path"], "policy": row["policy"], "noise_scale": row["noise_scale"],
                             "seed": row["seed"], "height_mean": float(h.mean()), "height_max": float(h[50:].max()),
                             f"frac_height_above_{STAND_HEIGHT}": float((h > STAND_HEIGHT).mean()),
                             f"frac_height_above_{LOW_HEIGHT}": float((h > LOW_HEIGHT).mean()),
                             f"longest_run_height_above_{LOW_HEIGHT}_after_step_50": longest_run(h[50:] > LOW_HEIGHT),
                             "vx_mean": float(vx.mean()), "abs_vx_mean": float(np.abs(vx).mean()),
                             "replay_max_abs_pixel_diff": max((d[1] for d in r["diffs"]), default=None),
                             "replay_checked_steps": [d[0] for d in r["diffs"]]})
            episodes[-1]["_diffs"] = r["diffs"]
        length = rows[0]["length"]
        reference = [random_episode(env, args.seed, i, length) for i in range(n_random)]
    finally:
        if env.renderer is not None:
            env.renderer.close()
    wall = time.time() - t0

    # Groups: each policy of the data (stages in order, its random episodes last), all explorer stages, all data,
    # and the reference.
    policies = sorted(data_states, key=lambda p: (p == "random", p))
    states = {f"data/{p}": data_states[p] for p in policies}
    explorer = [e for p in policies if p.startswith("explore") for e in data_states[p]]
    pooled = {"data/explorer (all stages)": explorer} if explorer else {}
    pooled["data/all"] = [e for p in policies for e in data_states[p]]
    if reference:
        states["reference/uniform-random"] = reference
    groups = {name: group_stats(eps) for name, eps in {**states, **pooled}.items()}

    diffs = [d for e in episodes for d in e.pop("_diffs")]
    replay_check = {"frames_compared": len(diffs), "frames_identical": sum(d[1] == 0 for d in diffs),
                    "max_abs_pixel_diff": max((d[1] for d in diffs), default=None),
                    "max_frac_pixel_values_differing": max((d[2] for d in diffs), default=None),
                    "verify_every": args.verify_every}
    result = {"script": "results/coverage/coverage.py", "args": asdict(args), "data_dir": str(data_dir),
              "manifest_sha256": hashlib.sha256(manifest_file.read_bytes()).hexdigest(),
              "collection": manifest.get("collection"), "embodiment": args.embodiment,
              "thresholds": {"stand_height": STAND_HEIGHT, "low_height": LOW_HEIGHT, "walk_speed": WALK_SPEED,
                             "run_speed": RUN_SPEED, "upright_zz": UPRIGHT_ZZ},
              "notes": "statistics over agent steps 1..T (state after each action, action repeat 2); vx is signed "
                       "forward speed (physics.horizontal_velocity()), abs_vx its magnitude; *_reward_mean are the "
                       "stock per-step rewards these states would earn (x1000 ~ an episode's return)",
              "wall_s": round(wall, 1), "replay_check": replay_check, "groups": groups, "episodes": episodes}
    out.mkdir(parents=True, exist_ok=True)
    co.write_json_atomic(out / "coverage.json", result)
    plot(groups, states, out / "coverage.png",
         f"{args.embodiment} coverage of {data_dir} ({len(rows)} episodes) vs {n_random} uniform-random episodes")
    print_table(groups, replay_check, wall)
    return result


def print_table(groups: dict, check: dict, wall: float) -> None:
    cols = [("h>1.2", f"frac_height_above_{STAND_HEIGHT}"), ("h>1.0", f"frac_height_above_{LOW_HEIGHT}"),
            ("h>1.2 t>50", f"frac_height_above_{STAND_HEIGHT}_after_step_50"),
            ("h>1.0 t>50", f"frac_height_above_{LOW_HEIGHT}_after_step_50"),
            ("ep h>1.2", "frac_episodes_reaching_stand_height_after_step_50"),
            ("upright", f"frac_upright_above_{UPRIGHT_ZZ}"), ("vx>1", f"frac_vx_above_{WALK_SPEED}"),
            ("|vx|>1", f"frac_abs_vx_above_{WALK_SPEED}"), ("|vx|>8", f"frac_abs_vx_above_{RUN_SPEED}"),
            ("h>1&|vx|>1", f"frac_height_above_{LOW_HEIGHT}_and_abs_vx_above_{WALK_SPEED}")]
    print(f"{'group':<30} {'ep':>3} " + " ".join(f"{c:>10}" for c, _ in cols)
          + f" {'h p50':>6} {'h p95':>6} {'|vx| p50':>8} {'|vx| p95':>8} {'stand r':>7} {'run max':>7}")
    for name, g in groups.items():
        print(f"{name:<30} {g['episodes']:>3} " + " ".join(f"{100 * g[k]:>9.1f}%" for _, k in cols)
              + f" {g['height']['p50']:>6.2f} {g['height']['p95']:>6.2f} {g['abs_vx']['p50']:>8.2f}"
              f" {g['abs_vx']['p95']:>8.2f} {g['stand_reward_mean']:>7.3f}"
              f" {g[f'longest_run_height_above_{LOW_HEIGHT}_after_step_50']['max']:>7d}")
    print(f"replay check: {check['frames_identical']}/{check['frames_compared']} compared frames identical, "
          f"max abs pixel diff {check['max_abs_pixel_diff']}; {wall:.0f} s")


if __name__ == "__main__":
    main(tyro.cli(Args))
