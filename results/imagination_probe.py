"""Where does a fine-tuning run's imagined reward come from? A probe of a finished run's world model and reward
head against the rewards its own RL policy really earned.

For each of the run's last `--episodes` training episodes that the RL policy drove alone (no prior window), and
for each start step t0 in `--starts`, the world model filters the episode's real frames up to t0 (posterior),
then imagines `--horizon` steps from there with five action sequences, and the reward head scores each
imagined state:
  recorded  the actions the policy really took from t0 (open loop): does the model predict the real outcome?
  actor     the actor acting on the imagined states (its samples, as in training): what the actor is taught
  mode      the actor's mean action on the imagined states
  random    uniform random actions in [-1, 1]
  zero      all-zero actions
and "real" is the reward the episode really earned at t0+1 .. t0+horizon. If recorded matches real while actor
is far above it, the actor has found actions that the model believes succeed and that fail in the env; if
random and zero are as high as actor, the model's predictions hardly depend on the actions at all.

Usage (any finetune_gsa.py run directory with ckpt.pt, replay/ and episodes.jsonl):
    python results/imagination_probe.py --runs <run dir> [<run dir> ...] --out results/demo/probe.md
Each start and kind is imagined `--samples` times (the latent samples differ) and averaged; torch is seeded.
Cost: seconds per run on one CPU thread (no training).
"""
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import finetune_gsa as F  # noqa: E402


@dataclass
class Args:
    runs: list[str]
    """finetune_gsa.py run directories"""
    episodes: int = 10
    """the last this many training episodes driven by the RL policy alone"""
    starts: list[int] = field(default_factory=lambda: [5, 20, 40, 60])
    """start steps t0 within each episode"""
    horizon: int = 16
    """imagined steps (the preset's imagination horizon at xs)"""
    samples: int = 16
    """imagined rollouts per start and action kind (the latent samples differ), averaged"""
    seed: int = 0
    out: Optional[str] = None
    """also write the table (markdown) here"""


def load_agent(run: Path) -> F.Agent:
    missing = [name for name in ("ckpt.pt", "episodes.jsonl", "replay") if not (run / name).exists()]
    if missing:
        raise SystemExit(f"imagination_probe.py: error: {run} is not a finetune_gsa.py run (no {', '.join(missing)})")
    ckpt = torch.load(run / "ckpt.pt", map_location="cpu", weights_only=False)
    preset = ckpt.get("preset") or F.AGENT_SIZES[ckpt["args"]["size"]]  # older checkpoints: the named preset
    cfg = F.ModelConfig(**ckpt["model_config"])
    action_dim = F.task_action_dim(ckpt["task"])
    agent = F.Agent(cfg, action_dim, units=preset["units"], layers=preset["layers"], horizon=preset["horizon"],
                    precision="fp32")
    agent.wm.load_state_dict(ckpt["model"])
    for name in ("reward", "actor", "critic"):
        getattr(agent, name).load_state_dict(ckpt[name])
    return agent.eval()


@torch.no_grad()
def probe(run: Path, args: Args) -> dict:
    agent = load_agent(run)
    torch.manual_seed(args.seed)
    rows = [json.loads(line) for line in (run / "episodes.jsonl").read_text().splitlines() if line.strip()]
    alone = [r for r in rows if not r["warmup"] and r["prior_steps"] == 0][-args.episodes:]
    gen = torch.Generator().manual_seed(args.seed)
    sums = {k: [] for k in ("real", "recorded", "actor", "mode", "random", "zero")}
    rssm, mask = agent.wm.rssm, agent.act_mask
    for row in alone:
        ep = F.load_episode(F.replay_path(run, row["episode"]))
        image = torch.as_tensor(ep["image"])[None]
        action = torch.as_tensor(ep["action"])[None]
        is_first = torch.as_tensor(ep["is_first"])[None]
        post, _ = rssm.observe(agent.wm.encoder(image), action, is_first)
        for t0 in args.starts:
            if t0 + args.horizon >= image.shape[1]:
                continue
            start = {k: v[:, t0].expand(args.samples, *v.shape[2:]) for k, v in post.items()}
            sums["real"].append(float(ep["reward"][t0 + 1:t0 + 1 + args.horizon].mean()))
            for kind in ("recorded", "actor", "mode", "random", "zero"):
                state, rewards = start, []
                for h in range(args.horizon):
                    feat = rssm.get_feat(state)
                    if kind == "recorded":
                        a = action[:, t0 + 1 + h].expand(args.samples, -1)
                    elif kind in ("actor", "mode"):
                        mean, std = agent.actor(feat)
                        a = (F.actor_sample(mean, std) if kind == "actor" else mean) * mask
                    elif kind == "random":
                        a = (torch.rand(args.samples, mask.shape[0], generator=gen) * 2 - 1) * mask
                    else:
                        a = torch.zeros(args.samples, mask.shape[0])
                    state = rssm.img_step(state, a)
                    rewards.append(F.twohot_mean(agent.reward(rssm.get_feat(state)), agent.bins))
                sums[kind].append(float(torch.stack(rewards).mean()))
    return {"run": "/".join(run.parts[-2:]), "episodes": len(alone), "windows": len(sums["real"]),
            **{k: float(np.mean(v)) if v else float("nan") for k, v in sums.items()}}


def main(args: Args) -> None:
    results = [probe(Path(r), args) for r in args.runs]
    lines = [f"Reward per step over {args.horizon} steps from t0 in {args.starts}, the last {args.episodes} training "
             "episodes each run's RL policy drove alone (mean over episodes and starts):", "",
             "| run | windows | real | recorded actions | actor (samples) | actor (mode) | random actions "
             "| zero actions |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['run']} | {r['windows']} | {r['real']:.2f} | {r['recorded']:.2f} | {r['actor']:.2f} | "
                     f"{r['mode']:.2f} | {r['random']:.2f} | {r['zero']:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main(tyro.cli(Args))
