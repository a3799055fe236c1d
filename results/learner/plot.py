"""Figures for the learner runs (issue 11): eval return against DreamerV3's published curve and the random-action
level; the actor's entropy; imagined against real reward per step; the critic's value of the first frame against
the discounted return each episode earned.

    python results/learner/plot.py ~/experiments/learner/walker-stand-scratch-r64-s0 ... --out results/learner
Also copies each run's small files (args.json, metrics.jsonl, train.jsonl, episodes.jsonl) into --out/runs/.
"""
import csv
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT.parent / "shared" / "reference" / "dreamerv3_dmc_vision.csv"


@dataclass
class Args:
    runs: list[str] = field(default_factory=list)
    """fine-tuning run directories"""
    out: str = "results/learner"
    """folder for the figures and the copied run files"""
    reference: str = str(REFERENCE)
    """DreamerV3's published DMControl-from-pixels curves (CSV: task, seeds, at_<frames>...)"""


def jsonl(path: Path) -> list:
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:  # a run still writing
            pass
    return lines


def reference_curve(path: Path, task: str):
    if not path.is_file():
        return None
    with open(path) as f:
        for row in csv.DictReader(f):
            if row["task"] == task.replace("-", "_"):
                pts = [(int(k[3:]), float(v)) for k, v in row.items() if k.startswith("at_") and v]
                return [p for p in pts if p[0] <= 60_000]
    return None


def main(args: Args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [Path(r).expanduser() for r in args.runs]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    summary = []
    for run in runs:
        a = json.loads((run / "args.json").read_text())
        label = f"{a['task']} r{a['resolved']['train_ratio']:g} s{a['seed']}" + ("" if a["no_pretrain"] else " GSA")
        evals, train, eps = jsonl(run / "metrics.jsonl"), jsonl(run / "train.jsonl"), jsonl(run / "episodes.jsonl")
        warm = [e["return"] for e in eps if e["warmup"]]
        x = [e["env_steps"] for e in evals]
        key = "eval_success" if evals and "eval_success" in evals[0] else "eval_return"
        axes[0].plot(x, [e[key] for e in evals], "o-", label=label)
        if warm:
            axes[0].axhline(np.mean(warm), ls=":", lw=1, color=axes[0].lines[-1].get_color())
        t = [r["env_steps"] for r in train]
        axes[1].plot(t, [r["entropy"] for r in train], label=label)
        axes[2].plot(t, [r["imag_reward"] for r in train], label=f"{label}: imagined")
        split = [r for r in train if "imag_reward_offline_starts" in r]
        if split:  # rehearsal runs: imagination from online rows against from D_r rows
            ts = [r["env_steps"] for r in split]
            for key, style, where in (("online", "--", "online"), ("offline", ":", "D_r")):
                axes[2].plot(ts, [r[f"imag_reward_{key}_starts"] for r in split], style,
                             label=f"{label}: imagined, {where} starts")
        steps = [(e["env_steps"], e["return"] / max(e["length"], 1)) for e in eps]
        axes[2].plot(*zip(*steps), ".", ms=3, label=f"{label}: real (training episodes)")
        pairs = [(e["env_steps"], e["value_first"], e["return_discounted"]) for e in eps if "value_first" in e]
        if pairs:
            xs, v, r = zip(*pairs)
            axes[3].plot(xs, v, "-", label=f"{label}: critic value of first frame")
            axes[3].plot(xs, r, ".", ms=3, label=f"{label}: discounted return earned")
        summary.append({"run": run.name, "label": label, "evals": [(e["env_steps"], e[key]) for e in evals],
                        "random_level": float(np.mean(warm)) if warm else None,
                        "updates": train[-1]["train_updates"] if train else 0,
                        "final_entropy": train[-1]["entropy"] if train else None,
                        "wall_time_h": evals[-1]["wall_time"] / 3600 if evals else None})
        dest = out / "runs" / run.name
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("args.json", "metrics.jsonl", "train.jsonl", "episodes.jsonl", "retrieval.json", "bc.json"):
            if (run / name).is_file():
                shutil.copy(run / name, dest / name)
    tasks = sorted({json.loads((r / "args.json").read_text())["task"] for r in runs})
    for task in tasks:
        ref = reference_curve(Path(args.reference), task)
        if ref:
            axes[0].plot(*zip(*ref), "k--", label=f"DreamerV3 (published, {task})")
    titles = ["eval return (dotted: random-action warm-up episodes)", "actor entropy (nats, task dims)",
              "reward per agent step", "critic value vs discounted return"]
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("env frames")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "learner-curves.png", dpi=110)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for s in summary:
        print(s["label"], "evals", [(f, round(v, 1)) for f, v in s["evals"]], "random", s["random_level"],
              "updates", s["updates"])


if __name__ == "__main__":
    main(tyro.cli(Args))
