"""Figures for the learner runs (issue 11): eval return against DreamerV3's published curve and the random-action
level; the actor's entropy; imagined against real reward per step; the critic's value of the first frame against
the discounted return each episode earned.

    python results/learner/plot.py ~/experiments/learner/walker-stand-scratch-r64-s0 ... --out results/learner
Also copies each run's small files (args.json, metrics.jsonl, train.jsonl, episodes.jsonl) into --out/runs/.
"""
import csv
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT.parent / "shared" / "reference" / "dreamerv3_dmc_vision.csv"


def critic(a: dict) -> str:
    """The critic's bootstrap and learning rate as run: flags, else the resolved preset, else the release's (runs
    older than the --critic-bootstrap flag)."""
    resolved = a.get("resolved", {})
    boot = a.get("critic_bootstrap") or resolved.get("critic_bootstrap") or "slow"
    lr = a.get("critic_lr") or resolved.get("critic_lr") or 8e-5
    return f"critic {boot} {lr:g}"


def precision(a: dict) -> str:
    """The update precision as run: what --precision auto chose where args.json records it, else (older runs)
    auto was fp32 on a CPU and bf16 on a GPU."""
    p = a.get("precision", "auto")
    if p == "auto":
        return a.get("resolved_precision") or ("bf16" if str(a.get("device", "cpu")).startswith("cuda") else "fp32")
    return p


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
    fig, axes = plt.subplots(len(runs), 4, figsize=(20, 4 * len(runs)), squeeze=False)
    summary = []
    for row, run in zip(axes, runs):
        a = json.loads((run / "args.json").read_text())
        guided = not (a["no_pretrain"] or a["no_guidance"])
        label = (f"{a['task']} {'GSA' if guided else 'from scratch'}, train ratio {a['resolved']['train_ratio']:g}, "
                 f"entropy {a['entropy_scale']:g}, {critic(a)}, {precision(a)}, seed {a['seed']}")
        evals, train, eps = jsonl(run / "metrics.jsonl"), jsonl(run / "train.jsonl"), jsonl(run / "episodes.jsonl")
        warm = [e["return"] for e in eps if e["warmup"]]
        x = [e["env_steps"] for e in evals]
        row[0].plot(x, [e["eval_return"] for e in evals], "o-", label="eval return (policy mode)")
        if "eval_success" in (evals[0] if evals else {}):
            for e in evals:
                row[0].annotate(f"{e['eval_success']:.1f}", (e["env_steps"], e["eval_return"]), fontsize=7)
        if warm:
            row[0].axhline(np.mean(warm), ls=":", color="gray",
                           label=f"warm-up episodes ({'the prior' if guided else 'random actions'})")
        ref = reference_curve(Path(args.reference), a["task"])
        if ref:
            row[0].plot(*zip(*ref), "k--", label="DreamerV3, published (larger model, train ratio 512)")
        t = [r["env_steps"] for r in train]
        row[1].plot(t, [r["entropy"] for r in train])
        row[2].plot(t, [r["imag_reward"] for r in train], label="imagined")
        split = [r for r in train if "imag_reward_offline_starts" in r]
        if split:  # rehearsal runs: imagination from online rows against from D_r rows
            ts = [r["env_steps"] for r in split]
            for origin, style, where in (("online", "--", "online"), ("offline", ":", "D_r")):
                row[2].plot(ts, [r[f"imag_reward_{origin}_starts"] for r in split], style,
                            label=f"imagined, {where} starts")
        row[2].plot([e["env_steps"] for e in eps], [e["return"] / max(e["length"], 1) for e in eps], ".", ms=4,
                    label="real (training episodes)")
        pairs = [(e["env_steps"], e["value_first"], e["return_discounted"]) for e in eps if "value_first" in e]
        if pairs:
            xs, v, r = zip(*pairs)
            row[3].plot(xs, v, "-", label="critic value of the first frame")
            row[3].plot(xs, r, ".", ms=4, label="discounted return earned")
        row[3].plot(t, [r["value"] for r in train], "--", label="critic value, imagined states")
        row[3].plot(t, [r["return_mean"] for r in train], ":", label="lambda-return, imagined states")
        titles = ["eval return" + (" (success rate annotated)" if "eval_success" in (evals[0] if evals else {}) else ""),
                  "actor entropy (nats, task dims)", "reward per agent step", "critic value against returns"]
        for ax, title in zip(row, titles):
            ax.set_title(f"{label}\n{title}", fontsize=9)
            ax.set_xlabel("env frames")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        summary.append({"run": run.name, "label": label,
                        "evals": [{k: e[k] for k in e if k.startswith("eval_") or k == "env_steps"} for e in evals],
                        "warmup_mean_return": float(np.mean(warm)) if warm else None,
                        "updates": train[-1]["train_updates"] if train else 0,
                        "final_entropy": train[-1]["entropy"] if train else None,
                        "wall_time_h": evals[-1]["wall_time"] / 3600 if evals else None})
        dest = out / "runs" / run.name
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("args.json", "metrics.jsonl", "train.jsonl", "episodes.jsonl", "retrieval.json", "bc.json"):
            if (run / name).is_file():
                shutil.copy(run / name, dest / name)
    fig.tight_layout()
    fig.savefig(out / "learner-curves.png", dpi=90)
    plt.close(fig)
    overlay(runs, Path(args.reference), out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for s in summary:
        print(s["label"], "| evals", [(e["env_steps"], round(e["eval_return"], 1)) for e in s["evals"]],
              "| warm-up mean", s["warmup_mean_return"], "| updates", s["updates"])


def overlay(runs: list, reference: Path, out: Path) -> None:
    """<task>-eval.png per task: every run's eval return on one axis (from 0), the random-action level (mean of
    the from-scratch runs' random warm-up episodes) and DreamerV3's published curve."""
    by_task = {}
    for run in runs:
        a = json.loads((run / "args.json").read_text())
        by_task.setdefault(a["task"], []).append((run, a))
    for task, items in by_task.items():
        fig, ax = plt.subplots(figsize=(8, 5))
        randoms = []
        for run, a in items:
            evals = jsonl(run / "metrics.jsonl")
            ratio = a["resolved"]["train_ratio"]
            bold = ratio == 128  # the xs preset's ratio since session 6
            ax.plot([e["env_steps"] for e in evals], [e["eval_return"] for e in evals], "o-", ms=3,
                    lw=2.2 if bold else 1.0, alpha=1.0 if bold else 0.6,
                    label=f"{'scratch' if a['no_pretrain'] else 'GSA'}, ratio {ratio:g}, {critic(a)}, "
                          f"entropy {a['entropy_scale']:g}, {precision(a)}, seed {a['seed']}")
            if a["no_pretrain"] or a["no_guidance"]:
                randoms += [e["return"] for e in jsonl(run / "episodes.jsonl") if e["warmup"]]
        if randoms:
            ax.axhline(np.mean(randoms), ls=":", color="gray", label=f"random actions ({np.mean(randoms):.0f})")
        ref = reference_curve(reference, task)
        if ref:
            ax.plot(*zip(*ref), "k--", label="DreamerV3 published (larger model, train ratio 512)")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("env frames")
        ax.set_ylabel("eval return (10 episodes, policy mode)")
        kind = "from scratch" if all(a["no_pretrain"] for _, a in items) else "GSA / from scratch"
        ax.set_title(f"{task}, {kind}, xs preset: one line per run (no bands: one run each)", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"{task}-eval.png", dpi=100)
        plt.close(fig)


if __name__ == "__main__":
    main(tyro.cli(Args))
