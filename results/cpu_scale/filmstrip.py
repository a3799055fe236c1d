"""Film strips of training episodes from a finetune_gsa.py run's replay: one row per episode, frames at fixed
agent steps, labelled with the episode's return and how many steps pi_bc acted (read back from TensorBoard's
episode/prior_steps). Shows what execution guidance did in a run.

    python results/cpu_scale/filmstrip.py runs/cpu_scale/finetune/mw-drawer-open-gsa-s0 --episodes 24 25 26 29 44 \
        --out results/cpu_scale/filmstrip-mw-drawer-open-gsa-s0.png
"""
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


@dataclass
class Args:
    run: tyro.conf.Positional[str]
    """a finetune_gsa.py run directory"""
    episodes: list[int] = field(default_factory=lambda: [0, 1])
    """episode indices (replay/ep-<index>.npz)"""
    steps: list[int] = field(default_factory=lambda: [0, 5, 10, 20, 40, 60, 80, 100])
    """agent steps to show (clipped to the episode's length)"""
    out: str = "filmstrip.png"


def main(args: Args) -> None:
    run = Path(args.run)
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    # Episode i is the i-th scalar of each tag: both are written once per collected episode.
    prior_steps = [int(e.value) for e in events.Scalars("episode/prior_steps")]
    fig, axes = plt.subplots(len(args.episodes), 1, figsize=(1.1 * len(args.steps), 1.35 * len(args.episodes)),
                             squeeze=False)
    for ax, i in zip(axes[:, 0], args.episodes):
        with np.load(run / "replay" / f"ep-{i:06d}.npz") as z:
            images, reward = z["image"], z["reward"]
        length = len(images) - 1
        ax.imshow(np.concatenate([images[min(t, length)] for t in args.steps], 1))
        ax.set_xticks([32 + 64 * j for j in range(len(args.steps))], [str(min(t, length)) for t in args.steps],
                      fontsize=6)
        ax.set_yticks([])
        ax.set_ylabel(f"ep {i}", fontsize=7)
        ax.set_title(f"episode {i}: return {reward.sum():.0f}, pi_bc acted {prior_steps[i]} of {length} steps",
                     fontsize=7, loc="left")
    axes[-1, 0].set_xlabel("agent step", fontsize=7)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=130)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
