"""How often collect_offline.py's reward-free explorer lifts the walker's torso while it trains, with its RND bonus
or (a probe, not in collect_offline.py) APT's k-nearest-neighbour state-entropy bonus in its place.

It runs `collect_offline.train_explorer` on walker unchanged and records the torso height after every agent step
of the explorer's own training experience; it prints, per quarter of training, the share of steps with the torso
above 1.0 m and above 1.2 m (walker-stand's standing height). --bonus apt swaps the RND module for one whose
"novelty" is log(1 + mean distance to the 12 nearest other next-states in the batch) (Liu & Abbeel 2021, on the
normalised state), leaving everything else (DDPG, the reward's running scale, the schedule) as it is.

    OMP_NUM_THREADS=1 python results/coverage/probe_explorer.py --bonus rnd --steps 20000
"""
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import collect_offline as co  # noqa: E402


@dataclass
class Args:
    bonus: Literal["rnd", "apt"] = "rnd"
    """rnd: collect_offline.py's explorer as it is; apt: the kNN state-entropy bonus in RND's place"""
    steps: int = 20_000
    """explorer training steps (agent steps, action repeat 2)"""
    seed: int = 0


class KNNBonus(nn.Module):
    """Stands in for collect_offline.RND: the same call, novelty = log(1 + mean distance to the k nearest other
    states of the batch). Its one parameter only gives the explorer's RND optimiser something to step (zero
    gradient), so train_explorer runs unchanged."""

    def __init__(self, obs_dim: int, k: int = 12):
        super().__init__()
        self.k, self.predictor = k, nn.Linear(1, 1)

    def forward(self, states):
        nearest = torch.cdist(states, states).topk(self.k + 1, dim=1, largest=False).values[:, 1:]  # 0: itself
        return torch.log1p(nearest.mean(1)) + 0.0 * self.predictor.weight.sum()


class HeightLog(co.RewardFreeDMC):
    heights: list = []

    def step(self, action):
        obs = super().step(action)
        HeightLog.heights.append(float(self.physics.torso_height()))
        return obs


def main(args: Args) -> None:
    torch.set_num_threads(1)
    if args.bonus == "apt":
        co.RND = KNNBonus
    start = time.time()
    co.train_explorer(HeightLog("walker"), args.steps, 4, args.seed)
    heights = np.array(HeightLog.heights)
    out = {"bonus": args.bonus, "steps": args.steps, "seed": args.seed, "minutes": round((time.time() - start) / 60, 1)}
    for q in range(4):
        part = heights[q * args.steps // 4:(q + 1) * args.steps // 4]
        out[f"steps {q * args.steps // 4}-{(q + 1) * args.steps // 4}: share above 1.0 m, 1.2 m"] = [
            round(float((part > 1.0).mean()), 3), round(float((part > 1.2).mean()), 3)]
    print(json.dumps(out))


if __name__ == "__main__":
    main(tyro.cli(Args))
