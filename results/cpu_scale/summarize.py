"""Per-run numbers that report.py does not give: training-episode returns (by who acted: the prior pi_bc or
the RL policy), and how fast the world model fits the task (image MSE and reward loss at the first and last
update). Reads run directories of finetune_gsa.py; writes a markdown table and a figure.

    python results/cpu_scale/summarize.py runs/cpu_scale/finetune/*/ --out results/cpu_scale
"""
import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402


@dataclass
class Args:
    runs: tyro.conf.Positional[list[str]]
    """finetune_gsa.py run directories"""
    out: str = "results/cpu_scale"
    """where summary.md and train-curves.png go"""


def variant_of(a: dict) -> str:
    if a["no_pretrain"]:
        return "no-pretrain"
    if a["no_rehearsal"] and a["no_guidance"]:
        return "pretrain-only"
    return "gsa" if not (a["no_rehearsal"] or a["no_guidance"]) else "other"


def load(run: Path) -> dict:
    a = json.loads((run / "args.json").read_text())
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [json.loads(x) for x in (run / "train.jsonl").read_text().splitlines() if x.strip()]
    frames, returns = [], []
    total = 0
    for ep in sorted((run / "replay").glob("ep-*.npz")):
        with np.load(ep) as z:
            length = len(z["reward"]) - 1  # agent steps
            total += 2 * length  # action repeat 2
            frames.append(total)
            returns.append(float(z["reward"].sum()))
    return dict(task=a["task"], variant=variant_of(a), seed=a["seed"], evals=evals, train=train,
                ep_frames=np.array(frames), ep_returns=np.array(returns), warmup=a["resolved"]["warmup_frames"],
                ep_length=length)


def bootstrap_difference(a: np.ndarray, b: np.ndarray, n: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of mean(a) - mean(b), resampling the seeds of each group."""
    rng = np.random.default_rng(seed)
    diffs = (rng.choice(a, (n, len(a))).mean(1) - rng.choice(b, (n, len(b))).mean(1))
    return float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def comparison(runs: list) -> str:
    """Final evaluation per variant over seeds, and each variant's difference to --no-pretrain."""
    lines = ["| task | variant | seeds | final eval return, per seed | mean | minus no-pretrain: mean [95% bootstrap CI] "
             "| final success, mean |", "|---|---|---|---|---|---|---|"]
    for task in sorted({r["task"] for r in runs}):
        final = {}
        for r in (r for r in runs if r["task"] == task):
            final.setdefault(r["variant"], []).append(r["evals"][-1])
        base = np.array([e["eval_return"] for e in final.get("no-pretrain", [])])
        for variant, evals in sorted(final.items()):
            ret = np.array([e["eval_return"] for e in evals])
            diff = "-"
            if variant != "no-pretrain" and len(base):
                low, high = bootstrap_difference(ret, base)
                diff = f"{ret.mean() - base.mean():+.1f} [{low:+.1f}, {high:+.1f}]"
            success = (f"{np.mean([e['eval_success'] for e in evals]):.2f}" if "eval_success" in evals[0] else "-")
            lines.append(f"| {task} | {variant} | {len(ret)} | {', '.join(f'{x:.1f}' for x in ret)} | "
                         f"{ret.mean():.1f} | {diff} | {success} |")
    return ("\n".join(lines) + "\n\nWith 2-3 seeds a bootstrap interval is rough: it cannot be wider than the "
            "spread of the seeds themselves.")


def main(args: Args) -> None:
    runs = sorted((load(Path(r)) for r in args.runs), key=lambda r: (r["task"], r["variant"], r["seed"]))
    score = lambda e: e.get("eval_success", e["eval_return"])  # noqa: E731
    lines = ["| task | variant | seed | frames | updates | eval at the end | best eval | mean train-episode return "
             "(warm-up / after) | image MSE, first -> last train line | reward loss, first -> last | reward per step: "
             "imagined / eval |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        last, tr = r["evals"][-1], r["train"]
        warm = r["ep_frames"] <= max(r["warmup"], 1)
        after = ~warm
        lines.append(
            f"| {r['task']} | {r['variant']} | {r['seed']} | {last['env_steps']} | {last['train_updates']} | "
            f"{score(last):.3g} | {max(score(e) for e in r['evals']):.3g} | "
            f"{r['ep_returns'][warm].mean():.0f} / {r['ep_returns'][after].mean():.0f} | "
            f"{tr[0]['wm/image_mse']:.4f} -> {tr[-1]['wm/image_mse']:.4f} | "
            f"{tr[0]['reward_loss']:.2f} -> {tr[-1]['reward_loss']:.2f} | "
            f"{np.mean([t['imag_reward'] for t in tr[-len(tr) // 4:]]):.2f} / "
            f"{last['eval_return'] / r['ep_length']:.2f} |")
    note = ("Eval: mean return over 5 episodes (DMControl) or success rate at the episode end (Meta-World), "
            "policy mode, no prior. Train-episode returns include the prior's windows (GSA). Losses: the first "
            "and last lines of train.jsonl, each the mean over the updates after one episode (the first line "
            "covers the burst of updates when the warm-up ends). Reward per step: "
            "the mean reward the reward head predicts along imagined trajectories (mean over the last quarter of "
            "the logged updates) against the last evaluation's return divided by the episode length in agent "
            "steps. A large gap means the actor learns from states, or from model predictions, unlike what the "
            "policy meets from the reset state.")
    text = "\n".join(lines) + "\n\n" + note + "\n\n" + comparison(runs) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text)
    print(text)
    tasks = sorted({r["task"] for r in runs})
    fig, axes = plt.subplots(3, len(tasks), figsize=(5.5 * len(tasks), 10.5), squeeze=False)
    colors = {"gsa": "C0", "pretrain-only": "C2", "no-pretrain": "C3", "other": "C7"}
    for j, task in enumerate(tasks):
        for r in (r for r in runs if r["task"] == task):
            kw = dict(color=colors[r["variant"]], alpha=0.8, label=f"{r['variant']} s{r['seed']}")
            axes[0, j].plot(r["ep_frames"], r["ep_returns"], **kw)
            axes[1, j].plot([t["env_steps"] for t in r["train"]], [t["wm/image_mse"] for t in r["train"]], **kw)
            axes[2, j].plot([e["env_steps"] for e in r["evals"]], [e["eval_return"] for e in r["evals"]], **kw)
        axes[0, j].set(title=f"{task}: training-episode return", xlabel="env frames")
        axes[1, j].set(title=f"{task}: world-model image MSE (per update)", xlabel="env frames", yscale="log")
        axes[2, j].set(title=f"{task}: eval return (policy mode, no prior)", xlabel="env frames")
        axes[0, j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "train-curves.png", dpi=110)
    print(f"wrote {out / 'summary.md'} and {out / 'train-curves.png'}")


if __name__ == "__main__":
    main(tyro.cli(Args))
