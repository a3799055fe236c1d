"""The learner's maths (issue 11): the actor's estimator, the critic's target, replay windows, update timing,
non-finite gradients. Tiny sizes; seconds each."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import finetune_gsa as ft
from benchmark import finetune_batch

torch.set_num_threads(1)


def tiny_agent(action_dim=6, **kw):
    torch.manual_seed(0)
    p = ft.AGENT_SIZES["tiny"]
    return ft.Agent(ft.model_config_for("tiny"), action_dim, units=kw.pop("units", p["units"]),
                    layers=p["layers"], horizon=kw.pop("horizon", p["horizon"]), **kw)


class ConstantReward(nn.Module):
    """A reward head whose two-hot prediction is `value` at every state."""

    def __init__(self, bins, value: float):
        super().__init__()
        self.bins, self.value = bins, value

    def forward(self, feat):
        enc = ft.twohot_encode(ft.symlog(torch.full(feat.shape[:-1], self.value)), self.bins)
        return torch.log(enc + 1e-12)


@pytest.mark.parametrize("mean, std", [(0.5, 0.5), (0.9, 0.2), (-0.7, 0.3)])
def test_linear_reward_through_imagination_gives_the_std_no_gradient(monkeypatch, mean, std):
    # A reward linear in the action, R = sum(a), read off imagined states that carry the action. The exact
    # truncated normal gave dE[a]/dstd = -0.61 at (0.5, 0.5) and -0.77 at (0.9, 0.2): it shrank its own std.
    agent = tiny_agent()
    leaves = []

    def actor(self, feat):
        n = feat.shape[0]
        m = torch.full((n, 12), mean, requires_grad=True)
        s = torch.full((n, 12), std, requires_grad=True)
        leaves.append((m, s))
        return m, s

    def img_step(state, action):  # the next state's features hold the action
        return {**state, "deter": torch.cat([action, state["deter"][:, 12:]], -1)}

    monkeypatch.setattr(type(agent.actor), "forward", actor)
    monkeypatch.setattr(agent.wm.rssm, "img_step", img_step)
    torch.manual_seed(1)
    n = 200_000
    feats, _ = agent.imagine(agent.wm.rssm.initial(n), horizon=1)
    reward = feats[1:, :, :6].sum(-1).mean()
    reward.backward()
    m, s = leaves[0]
    d_std = s.grad[:, :6].sum(0)  # dE[R]/dstd per action dim
    d_mean = m.grad[:, :6].sum(0)
    assert d_std.abs().max() < 0.02, d_std
    assert torch.allclose(d_mean, torch.ones(6), atol=1e-5)  # straight-through: the clip passes the gradient


def test_actor_sample_is_clipped_and_entropy_is_the_normals():
    torch.manual_seed(0)
    x = ft.actor_sample(torch.full((10_000, 1), 0.9), torch.full((10_000, 1), 0.5))
    assert x.min() >= -1 and x.max() <= 1 and (x == 1).float().mean() > 0.3
    assert torch.allclose(ft.actor_entropy(torch.tensor(1.0)), torch.tensor(1.4189385), atol=1e-6)


def test_entropy_stays_up_under_a_flat_reward():
    # 300 full updates on batches whose reward is 0 everywhere: nothing to gain, so the policy must not narrow
    # itself. Stated floor: mean std at least 0.5 in every dim, i.e. entropy >= 6 * (log 0.5 + 1.419) = 4.36
    # (it starts at 6 * 1.306 = 7.84 with std 0.89).
    agent = tiny_agent()
    batch = finetune_batch(4, 8, 6, online_rows=4, seed=0)
    batch["reward"].zero_()
    for i in range(300):
        m = agent.update(batch)
    assert m["entropy"] >= 6 * (np.log(0.5) + 0.5 * np.log(2 * np.pi * np.e)), m["entropy"]


def test_critic_tracks_its_target_under_a_constant_reward():
    # Reward 1 at every imagined state. The release's critic (targets bootstrapped from the slow critic) is
    # within 10% of its lambda-return after 400 updates at critic lr 1e-3; DreamerV3's (targets from the fast
    # critic, plus a regulariser toward the slow one) was still 30% below at that point. This checks that the
    # critic fits its own target, not that the target is near the true value (100 here): it is not yet, see
    # results/learner/critic_convergence.py.
    agent = tiny_agent(units=64, horizon=16, critic_lr=1e-3)
    agent.reward = ConstantReward(agent.bins, 1.0)
    g = torch.Generator().manual_seed(1)
    start = agent.wm.rssm.initial(64)
    start["deter"] = torch.randn(start["deter"].shape, generator=g)
    params = list(agent.critic.parameters())
    for _ in range(400):
        with ft.frozen(agent.wm, agent.actor):
            _, critic_loss, m = agent.behavior_loss(start)
        agent.critic_opt.zero_grad()
        critic_loss.backward(inputs=params)
        agent.critic_opt.step()
        with torch.no_grad():
            for p_slow, p in zip(agent.slow_critic.parameters(), params):
                p_slow.lerp_(p, 0.02)
    value, ret = m["value"].item(), m["return_mean"].item()
    assert ret > 15 and abs(ret - value) <= 0.1 * ret, (value, ret)


@pytest.mark.parametrize("bootstrap, value", [("slow", 2.0), ("fast", 10.0)])
def test_critic_bootstrap_chooses_which_critic_closes_the_returns(bootstrap, value):
    # Reward 0; the critic says 10 everywhere, the slow critic 2: the lambda-returns must close on the chosen one.
    agent = tiny_agent(horizon=5, critic_bootstrap=bootstrap)
    agent.reward = ConstantReward(agent.bins, 0.0)
    agent.critic, agent.slow_critic = ConstantReward(agent.bins, 10.0), ConstantReward(agent.bins, 2.0)
    _, _, m = agent.behavior_loss(agent.wm.rssm.initial(8))
    expected = ft.lambda_return(torch.zeros(5, 8), torch.full((6, 8), value), 0.99, 0.95).mean()
    assert m["return_mean"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_replay_windows_start_a_sequence():
    replay = ft.SequenceReplay()
    for _ in range(3):
        n = 50
        replay.add({"image": np.zeros((n, 64, 64, 3), np.uint8), "action": np.ones((n, 12), np.float32),
                    "reward": np.zeros(n, np.float32), "is_first": np.arange(n) == 0})
    batch = replay.sample(np.random.default_rng(0), 64, 10)
    assert batch["is_first"][:, 0].all() and not batch["is_first"][:, 1:].any()
    assert not replay.episodes[0]["is_first"][1:].any()  # the stored episode is untouched


def test_non_finite_gradient_stops_before_any_weight_changes(monkeypatch):
    agent = tiny_agent()
    batch = finetune_batch(4, 6, 6, online_rows=3)
    before = {k: v.clone() for k, v in agent.named_parameters()}  # slow critic included (no grad, a param)
    real = ft.Agent.behavior_loss

    def poisoned(self, *a):  # finite losses, NaN gradient into the critic
        actor_loss, critic_loss, m = real(self, *a)
        critic_loss.register_hook(lambda g: g * float("nan"))
        return actor_loss, critic_loss, m

    monkeypatch.setattr(ft.Agent, "behavior_loss", poisoned)
    with pytest.raises(FloatingPointError, match=r"^non-finite critic_grad_norm=nan$"):
        agent.update(batch)
    after = dict(agent.named_parameters())
    assert all(torch.equal(before[k], after[k]) for k in before), "weights changed before the check"


def test_training_starts_after_ten_episodes_or_the_warmup(tmp_path):
    # tiny: 0.5 updates per agent step; 20-step episodes. Warm-up 12 episodes (480 frames) with training after
    # 10 (the release): the first updates follow episode 11, 10 per episode, no burst.
    out = tmp_path / "run"
    ft.main(ft.Args(task="cartpole-balance", no_pretrain=True, size="tiny", max_episode_steps=20, threads=1,
                    video=False, env_steps=560, warmup_frames=480, out_dir=str(out)))
    lines = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert lines[0]["env_steps"] == 11 * 40
    assert [x["updates_this_episode"] for x in lines] == [10, 10, 10, 10]  # episodes 11-14
    eps = [json.loads(x) for x in (out / "episodes.jsonl").read_text().splitlines()]
    assert [e["warmup"] for e in eps].count(True) == 12


def test_bc_prior_is_the_releases_network_and_stops_on_heldout_loss():
    prior = ft.BCPrior(12, depth=4, units=16)
    assert isinstance(prior.norms[0], ft.ChannelNorm) and isinstance(prior.mlp[2], torch.nn.ELU)
    assert isinstance(prior.mlp[-1], torch.nn.Linear)
    out = prior(torch.zeros(2, 3, 64, 64, 3, dtype=torch.uint8))
    assert out.shape == (2, 12)
    # Episodes whose action is a fixed function of the frame: the prior can learn it, and training stops
    # by itself once the held-out MSE stops falling.
    rng = np.random.default_rng(0)
    episodes = []
    for _ in range(20):
        level = rng.uniform(0, 1, 31)
        image = np.broadcast_to((level * 255).astype(np.uint8)[:, None, None, None], (31, 64, 64, 3)).copy()
        action = np.zeros((31, 12), np.float32)
        action[1:, 0] = 2 * level[:-1] - 1  # action t + 1 follows image t
        episodes.append({"image": image, "action": action})
    torch.manual_seed(0)
    curve = ft.train_bc(prior, episodes, max_steps=3000, batch=16, lr=3e-3, action_dim=1,
                        rng=np.random.default_rng(0), device=torch.device("cpu"), log=lambda *_: None,
                        check_every=50, patience=3, min_steps=0)
    steps = [s for s, _ in curve["heldout"]]
    assert steps[-1] < 3000 and curve["best_step"] == steps[-4]  # stopped 3 checks after its best
    assert min(v for _, v in curve["heldout"]) < 0.1 / 3  # a tenth of the MSE of predicting 0 (variance 1/3)
    # min_steps: no stop before it, however flat the held-out curve
    curve = ft.train_bc(ft.BCPrior(12, depth=4, units=16), episodes, max_steps=600, batch=16, lr=3e-3, action_dim=1,
                        rng=np.random.default_rng(0), device=torch.device("cpu"), log=lambda *_: None,
                        check_every=50, patience=1, min_steps=500)
    assert curve["heldout"][-1][0] >= 500


def test_imagined_reward_is_split_by_where_imagination_starts():
    agent = tiny_agent()
    agent.reward = ConstantReward(agent.bins, 2.0)
    m = agent.update(finetune_batch(4, 6, 6, online_rows=3))
    assert abs(m["imag_reward_online_starts"] - 2.0) < 1e-3 and abs(m["imag_reward_offline_starts"] - 2.0) < 1e-3
    assert "imag_reward_online_starts" not in agent.update(finetune_batch(4, 6, 6, online_rows=4))


def test_episode_logs_value_of_first_frame_and_discounted_return(tmp_path):
    out = tmp_path / "run"
    ft.main(ft.Args(task="cartpole-balance", no_pretrain=True, size="tiny", max_episode_steps=20, threads=1,
                    video=False, env_steps=80, out_dir=str(out)))
    eps = [json.loads(x) for x in (out / "episodes.jsonl").read_text().splitlines()]
    for e in eps:
        assert np.isfinite(e["value_first"]) and 0 < e["return_discounted"] <= e["return"]
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "eval_value_first" in evals[-1] and "eval_return_discounted" in evals[-1]
