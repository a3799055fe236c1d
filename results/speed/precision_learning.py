"""Does bf16 learn like fp32? Issue 12 asks for this before bf16 may be a CPU default: the same seeds, side by side
at 20k frames, with matching curves and losses. This script tabulates fine-tuning runs that differ only in
--precision (same task, seed, preset and code): at every evaluation, the eval return, then the training losses,
the actor's entropy and the critic's value (train.jsonl, the last record at or before that evaluation) and the
median update time (world model + actor-critic) up to it.

    python results/speed/precision_learning.py --runs <fp32 run> <bf16 run> [<fp32 run> <bf16 run> ...] \
        --out results/speed/precision-learning.md
Each run is labelled with its --precision, seed and train ratio from args.json.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import tyro

TRAIN_KEYS = ("wm_loss", "reward_loss", "actor_loss", "critic_loss", "entropy", "value", "imag_reward")


@dataclass
class Args:
    runs: list[str] = field(default_factory=list)
    """fine-tuning run directories"""
    out: Optional[str] = None
    """markdown file to write (default: print only)"""
    max_env_steps: Optional[int] = None
    """leave out evaluations after this many env frames"""


def jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def label(run: Path) -> str:
    a = json.loads((run / "args.json").read_text())
    ratio = a.get("train_ratio") or a.get("resolved", {}).get("train_ratio")
    precision = a["precision"]
    if precision == "auto":  # what auto chose (recorded since auto became bf16 on CPUs with bf16 units)
        if "resolved_precision" in a:
            precision = f"{a['resolved_precision']} (auto)"
        else:  # older runs: auto was fp32 on every CPU
            precision = "bf16 (auto)" if str(a.get("device", "cpu")).startswith("cuda") else "fp32 (auto)"
    return f"{precision}, seed {a['seed']}, ratio {ratio:g}"


def rows(run: Path, max_env_steps: Optional[int]) -> list:
    evals = [m for m in jsonl(run / "metrics.jsonl") if "eval_return" in m]
    train = jsonl(run / "train.jsonl")
    out = []
    for m in evals:
        if max_env_steps is not None and m["env_steps"] > max_env_steps:
            continue
        before = [t for t in train if t["env_steps"] <= m["env_steps"]]
        row = {"env_steps": m["env_steps"], "eval_return": m["eval_return"], "updates": m.get("train_updates", 0)}
        if before:
            row.update({k: before[-1].get(k) for k in TRAIN_KEYS})
            times = [t["time_wm"] + t["time_actor_critic"] for t in before if "time_wm" in t]
            row["s_per_update"] = float(np.median(times)) if times else None
        out.append(row)
    return out


def fmt(x) -> str:
    return "" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)


def main(args: Args) -> None:
    keys = ("env_steps", "updates", "eval_return") + TRAIN_KEYS + ("s_per_update",)
    lines = ["| run | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for run in map(Path, args.runs):
        for row in rows(run, args.max_env_steps):
            lines.append(f"| {label(run)} | " + " | ".join(fmt(row.get(k)) for k in keys) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main(tyro.cli(Args))
