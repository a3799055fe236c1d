"""Critic convergence under a constant imagined reward of 0.5 (true value 0.5 / (1 - 0.99) = 50): the value and
the lambda-return after N critic updates, per target variant, learning rate and slow-critic EMA fraction. Only the
critic learns (tiny world model, untrained, 128 random start states, horizon 16, critic 2 x 256 as at xs).
Variants: slow = returns close on the slow EMA critic (the release); fast = on the critic itself; fast+reg =
fast plus a regulariser toward the slow critic (DreamerV3). Run: python results/learner/critic_convergence.py
"""
import sys
import time
from pathlib import Path

import torch

ROOT = str(Path(__file__).resolve().parents[2]); sys.path[:0] = [ROOT, ROOT + '/tests']
import finetune_gsa as ft
from test_learner import ConstantReward
torch.set_num_threads(1)
R = 0.5


def run(lr, frac, variant, n=2000):
    torch.manual_seed(0)
    agent = ft.Agent(ft.model_config_for("tiny"), 6, units=256, layers=2, horizon=16, critic_lr=lr)
    agent.reward = ConstantReward(agent.bins, R)
    g = torch.Generator().manual_seed(1)
    start = agent.wm.rssm.initial(128); start["deter"] = torch.randn(start["deter"].shape, generator=g)
    params = list(agent.critic.parameters()); out = {}
    for i in range(1, n + 1):
        with torch.no_grad():
            feats, _ = agent.imagine(start, 16)
            reward = ft.twohot_mean(agent.reward(feats), agent.bins)[1:]
            slow = ft.twohot_mean(agent.slow_critic(feats), agent.bins)
            boot = slow if variant == "slow" else ft.twohot_mean(agent.critic(feats), agent.bins)
            ret = ft.lambda_return(reward, boot, 0.99, 0.95)
        w = 0.99 ** torch.arange(16, dtype=ret.dtype)[:, None]
        logits = agent.critic(feats[:-1])
        loss = (w * ft.twohot_nll(logits, ret, agent.bins)).mean()
        if variant == "fast+reg":
            loss = loss + (w * ft.twohot_nll(logits, slow[:-1], agent.bins)).mean()
        agent.critic_opt.zero_grad(); loss.backward(); agent.critic_opt.step()
        with torch.no_grad():
            for ps, p in zip(agent.slow_critic.parameters(), params): ps.lerp_(p, frac)
        if i in (250, 500, 1000, 2000):
            v = ft.twohot_mean(logits.detach(), agent.bins).mean().item()
            out[i] = f"{v:.1f}/{ret.mean().item():.1f}"
    return out


for variant, lr, frac in [("slow", 3e-4, 0.02), ("fast+reg", 3e-4, 0.02), ("fast", 3e-4, 0.02), ("slow", 3e-4, 0.1),
                          ("slow", 1e-3, 0.02), ("slow", 8e-5, 0.02), ("fast+reg", 8e-5, 0.02)]:
    t = time.time(); print(variant, 'lr', lr, 'ema', frac, 'value/return', run(lr, frac, variant), f'{time.time()-t:.0f}s', flush=True)
