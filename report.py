"""Learning curves and aggregate scores of fine-tuning runs (the GSA paper's Fig. 3 / Fig. 6 style report).

Each run directory is one `finetune_gsa.py` run: its `args.json` gives the task, the seed and the variant
(from the flags no_pretrain, no_rehearsal, no_guidance, guidance), its `metrics.jsonl` one evaluation per
line ({"env_steps", "eval_return", and on Meta-World "eval_success", "eval_success_any"}).

Variants: gsa (everything on), jsrl (guidance only at the episode start), no-rehearsal, no-guidance,
pretrain-only (pre-trained world model, naive fine-tuning: no rehearsal, no guidance), no-pretrain
(DreamerV3 from scratch).

Scores (as the authors' release): DMControl return / 10, Meta-World success x 100, from the final evaluation
(or the mean of the last --last-n). Aggregates over tasks and seeds: mean (of per-task means), median (of
per-task means) and IQM (interquartile mean of all run scores, as rliable), each with a 95% stratified
bootstrap confidence interval (seeds resampled within each task).

Reads:  <run>/args.json and <run>/metrics.jsonl for every run given (or every run one level below a dir).
Writes: <out-dir>/curves-<task>.png (mean over seeds and a bootstrap band, one line per variant),
        <out-dir>/report.md (per-task and aggregate tables), <out-dir>/scores.json (every number).

Example:
    python report.py --runs results/runs/*/ --out-dir results/ --paper-reference
"""
import os

os.environ.setdefault("MPLBACKEND", "Agg")  # figures are files; no display needed

import io
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional

import numpy as np
import tyro

SCRIPT = "report.py"


@dataclass
class Args:
    runs: tuple[str, ...]
    """run directories of finetune_gsa.py (or directories holding run directories one level down)"""
    out_dir: Annotated[str, tyro.conf.arg(aliases=("--out",))]
    """where the figures and tables go (created if needed)"""
    seed: int = 0
    """seed of the bootstrap resampling"""
    last_n: int = 1
    """score of a run = mean of its last N evaluations (1: the final evaluation, as the paper)"""
    max_env_steps: Optional[int] = None
    """ignore evaluations after this many env frames (e.g. 150000 to compare at the paper's budget)"""
    success_key: Literal["eval_success", "eval_success_any"] = "eval_success"
    """Meta-World success measure: at the episode end (comparable with the paper) or at any step"""
    bootstrap: int = 2000
    """bootstrap resamples for the confidence intervals"""
    grid_points: int = 100
    """points of the common env-steps grid the seeds' curves are interpolated onto"""
    paper_reference: bool = False
    """draw the paper's GSA and DreamerV3 results at 150k samples as reference lines; add them to the tables"""


VARIANTS = ("gsa", "jsrl", "no-rehearsal", "no-guidance", "pretrain-only", "no-pretrain")
LABELS = {"gsa": "GSA", "jsrl": "GSA, JSRL-style guidance", "no-rehearsal": "GSA w/o rehearsal",
          "no-guidance": "GSA w/o guidance", "pretrain-only": "pre-train + naive fine-tune",
          "no-pretrain": "DreamerV3 (from scratch)"}
# Paper results at 150k samples, (GSA, DreamerV3): DMControl return, Meta-World success rate (the paper's tables).
PAPER_150K = {
    "walker-run": (728, 224), "walker-walk": (959, 809), "quadruped-walk": (934, 145),
    "cheetah-run": (526, 621), "walker-walk-hard": (878, -5), "cartpole-balance": (995, 956),
    "mw-shelf-place": (0.87, 0.0), "mw-assembly": (0.2, 0.0), "mw-stick-pull": (0.67, 0.0),
    "mw-drawer-open": (1.0, 0.13),
}
PAPER_MEAN_SCORE = {"dmc": (63.1, 32.1), "metaworld": (75.0, 36.0)}  # mean over 22 / 50 tasks, normalised


def fail(message: str) -> None:
    raise SystemExit(f"{SCRIPT}: error: {message}")


def is_metaworld(task: str) -> bool:
    return task.startswith("mw-")


def variant_name(run_args: dict) -> str:
    """Variant of a finetune_gsa.py run from its flags (missing flags take finetune_gsa.py's defaults)."""
    guidance = run_args.get("guidance", "window")
    if run_args.get("no_pretrain", False):
        return "no-pretrain"  # DreamerV3 from scratch: no checkpoint, hence no retrieval, rehearsal, guidance
    if run_args.get("no_rehearsal", False) and run_args.get("no_guidance", False):
        return "pretrain-only"
    if run_args.get("no_guidance", False):
        return "no-guidance"
    suffix = "" if guidance == "window" else f"-{guidance}"
    if run_args.get("no_rehearsal", False):
        return "no-rehearsal" + suffix
    return "gsa" if guidance == "window" else "jsrl" if guidance == "jsrl" else f"gsa{suffix}"


# ----------------------------------------------------------------------------------------------------------
# Reading runs
# ----------------------------------------------------------------------------------------------------------

def find_runs(paths) -> list:
    if not paths:
        fail("no run directories given (--runs DIR [DIR ...])")
    runs = []
    for p in map(Path, paths):
        if not p.is_dir():
            fail(f"{p} is not a directory")
        if (p / "metrics.jsonl").exists() or (p / "args.json").exists():
            runs.append(p)
        else:
            inner = sorted(q for q in p.iterdir() if q.is_dir() and (q / "metrics.jsonl").exists())
            if not inner:
                fail(f"{p} is neither a run directory (no args.json / metrics.jsonl) nor holds any")
            runs.extend(inner)
    return runs


def read_run(run: Path, args: Args) -> dict:
    """{"dir", "task", "seed", "variant", "steps" [N], "value" [N] (return or success rate), "score"}."""
    try:
        run_args = json.loads((run / "args.json").read_text())
    except FileNotFoundError:
        fail(f"{run}/args.json does not exist")
    except json.JSONDecodeError as e:
        fail(f"{run}/args.json is not valid JSON: {e}")
    for key in ("task", "seed"):
        if key not in run_args:
            fail(f"{run}/args.json has no {key!r}")
    task = run_args["task"]
    path = run / "metrics.jsonl"
    if not path.is_file():
        fail(f"{path} does not exist")
    steps, values = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            fail(f"{path}:{lineno} is not valid JSON: {e}")
        if not isinstance(record, dict):
            fail(f"{path}:{lineno} is not a JSON object")
        if "eval_return" not in record:
            continue  # not an evaluation record
        if "env_steps" not in record:
            fail(f"{path}:{lineno} has eval_return but no env_steps")
        if is_metaworld(task):
            if args.success_key not in record:
                fail(f"{path}:{lineno}: Meta-World evaluation without {args.success_key!r}")
            value = record[args.success_key]
        else:
            value = record["eval_return"]
        if not isinstance(value, (int, float)) or not math.isfinite(value) or not isinstance(
                record["env_steps"], (int, float)):
            fail(f"{path}:{lineno}: env_steps and the evaluation value must be finite numbers")
        if args.max_env_steps is None or record["env_steps"] <= args.max_env_steps:
            steps.append(float(record["env_steps"]))
            values.append(float(value))
    if not steps:
        fail(f"{path} has no evaluations" + (f" at or before {args.max_env_steps} env steps"
                                               if args.max_env_steps is not None else ""))
    order = np.argsort(steps, kind="stable")
    steps, values = np.array(steps)[order], np.array(values)[order]
    scale = 100.0 if is_metaworld(task) else 0.1  # normalised score: MW success x 100, DMC return / 10
    return {"dir": str(run), "task": task, "seed": run_args["seed"], "variant": variant_name(run_args),
            "steps": steps, "value": values, "score": float(values[-args.last_n:].mean() * scale)}


def group_runs(runs: list) -> dict:
    """{variant: {task: [run, ...]}}; two runs of one variant, task and seed are an error."""
    groups, seen = {}, {}
    for r in runs:
        key = (r["variant"], r["task"], r["seed"])
        if key in seen:
            fail(f"two runs of variant {key[0]}, task {key[1]}, seed {key[2]}: {seen[key]} and {r['dir']}")
        seen[key] = r["dir"]
        groups.setdefault(r["variant"], {}).setdefault(r["task"], []).append(r)
    return groups


# ----------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------

def iqm(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Interquartile mean: mean of the middle 50% after dropping floor(n/4) values at each end (rliable's
    trim_mean(x, 0.25))."""
    x = np.sort(x, axis=axis)
    n = x.shape[axis]
    cut = int(0.25 * n)
    return np.take(x, np.arange(cut, n - cut), axis=axis).mean(axis=axis)


def aggregates(per_task: list) -> dict:
    """per_task: list over tasks of score arrays [seeds] (or [B, seeds] for bootstrap samples)."""
    means = np.stack([s.mean(axis=-1) for s in per_task], axis=-1)  # [..., tasks]
    return {"mean": means.mean(axis=-1), "median": np.median(means, axis=-1),
            "iqm": iqm(np.concatenate(per_task, axis=-1), axis=-1)}


def stratified_bootstrap(per_task: list, reps: int, rng: np.random.Generator, conf: float = 0.95) -> dict:
    """Point estimates and percentile CIs of the aggregates; seeds resampled with replacement within each
    task (stratified bootstrap, Agarwal et al. 2021)."""
    point = {k: float(v) for k, v in aggregates(per_task).items()}
    samples = [s[rng.integers(0, len(s), size=(reps, len(s)))] for s in per_task]
    boot = aggregates(samples)
    lo, hi = 100 * (1 - conf) / 2, 100 * (1 + conf) / 2
    return {k: {"value": point[k], "ci": [float(np.percentile(boot[k], lo)), float(np.percentile(boot[k], hi))]}
            for k in point}


def curve(runs: list, grid: np.ndarray, reps: int, rng: np.random.Generator, conf: float = 0.95):
    """Mean over seeds on `grid` and a bootstrap band. Each seed is interpolated linearly between its
    evaluations, holds its last value after its last one and is missing (NaN) before its first one."""
    values = np.stack([np.interp(grid, r["steps"], r["value"], left=np.nan) for r in runs])  # [seeds, G]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # grid points before every seed's first evaluation
        mean = np.nanmean(values, axis=0)
        boot = np.nanmean(values[rng.integers(0, len(runs), size=(reps, len(runs)))], axis=1)  # [B, G]
        lo = np.nanpercentile(boot, 100 * (1 - conf) / 2, axis=0)
        hi = np.nanpercentile(boot, 100 * (1 + conf) / 2, axis=0)
    return mean, lo, hi


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------

def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def plot_task(task: str, by_variant: dict, args: Args, rng: np.random.Generator) -> bytes:
    """PNG bytes of one task's learning curves, one line + band per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(VARIANTS, plt.get_cmap("tab10").colors))
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, runs in by_variant.items():
        first = min(r["steps"][0] for r in runs)
        last = max(r["steps"][-1] for r in runs)
        grid = np.linspace(first, last, args.grid_points) if last > first else np.array([first])
        mean, lo, hi = curve(runs, grid, args.bootstrap, rng)
        colour = colours.get(variant)
        ax.plot(grid, mean, color=colour, label=f"{LABELS.get(variant, variant)} ({len(runs)} seeds)",
                marker="o" if len(grid) == 1 else None)
        ax.fill_between(grid, lo, hi, color=colour, alpha=0.2, linewidth=0)
    if args.paper_reference and task in PAPER_150K:
        gsa, dreamer = PAPER_150K[task]
        ax.axhline(gsa, color="black", linestyle="--", linewidth=1, label="paper GSA @150k")
        ax.axhline(dreamer, color="grey", linestyle=":", linewidth=1, label="paper DreamerV3 @150k")
    ax.set_xlabel("env steps (frames)")
    ax.set_ylabel(f"success rate ({'end' if args.success_key == 'eval_success' else 'any step'})"
                  if is_metaworld(task) else "episode return")
    ax.set_title(f"{task}: mean over seeds, 95% bootstrap band")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def fmt(x: float) -> str:
    return f"{x:.1f}"


def main(args: Args) -> None:
    if args.last_n < 1 or args.bootstrap < 1 or args.grid_points < 2:
        fail("--last-n and --bootstrap must be >= 1, --grid-points >= 2")
    runs = [read_run(r, args) for r in find_runs(args.runs)]
    groups = group_runs(runs)
    variants = sorted(groups, key=lambda v: (VARIANTS.index(v) if v in VARIANTS else len(VARIANTS), v))
    tasks = sorted({r["task"] for r in runs}, key=lambda t: (is_metaworld(t), t))
    rng = np.random.default_rng(args.seed)

    # Per-task table: mean normalised score over seeds (and the seed count) per variant.
    lines = [f"# Fine-tuning report ({len(runs)} runs)", "",
             f"Scores: DMControl return / 10, Meta-World success ({args.success_key}) x 100; score of a run = "
             f"mean of its last {args.last_n} evaluation(s)"
             + (f" at or before {args.max_env_steps} env steps" if args.max_env_steps else "") + ".", "",
             "## Per task: mean score over seeds (seeds)", ""]
    header = ["task"] + [LABELS.get(v, v) for v in variants]
    if args.paper_reference:
        header += ["paper GSA @150k", "paper DreamerV3 @150k"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task in tasks:
        cells = [task]
        for v in variants:
            rs = groups[v].get(task, [])
            cells.append(f"{fmt(np.mean([r['score'] for r in rs]))} ({len(rs)})" if rs else "-")
        if args.paper_reference:
            scale = 100.0 if is_metaworld(task) else 0.1
            cells += [fmt(x * scale) for x in PAPER_150K[task]] if task in PAPER_150K else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")

    # Aggregate table: per variant, over its tasks, with stratified bootstrap CIs.
    lines += ["", f"## Aggregate normalised score, 95% stratified bootstrap CI ({args.bootstrap} resamples, "
              f"seed {args.seed})", "", "| variant | tasks | runs | mean | median | IQM |", "|---|---|---|---|---|---|"]
    table = {}
    for v in variants:
        per_task = [np.array([r["score"] for r in groups[v][t]]) for t in tasks if t in groups[v]]
        stats = stratified_bootstrap(per_task, args.bootstrap, rng)
        table[v] = {"tasks": len(per_task), "runs": int(sum(len(s) for s in per_task)), **stats}
        cells = [LABELS.get(v, v), str(len(per_task)), str(table[v]["runs"])]
        cells += [f"{fmt(stats[k]['value'])} [{fmt(stats[k]['ci'][0])}, {fmt(stats[k]['ci'][1])}]"
                  for k in ("mean", "median", "iqm")]
        lines.append("| " + " | ".join(cells) + " |")
    if len({tuple(sorted(groups[v])) for v in variants}) > 1:
        lines += ["", "Note: the variants cover different task sets; their aggregates are not directly comparable."]
    if args.paper_reference:
        lines += ["", "Paper, mean over all tasks at 150k samples (GSA / DreamerV3): DMControl (22 tasks) "
                  f"{PAPER_MEAN_SCORE['dmc'][0]} / {PAPER_MEAN_SCORE['dmc'][1]}, Meta-World (50 tasks) "
                  f"{PAPER_MEAN_SCORE['metaworld'][0]} / {PAPER_MEAN_SCORE['metaworld'][1]}."]
    report = "\n".join(lines) + "\n"

    # Everything is computed before anything is written.
    figures = {task: plot_task(task, {v: groups[v][task] for v in variants if task in groups[v]}, args, rng)
               for task in tasks}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for task, png in figures.items():
        write_bytes_atomic(out / f"curves-{task}.png", png)
    write_bytes_atomic(out / "report.md", report.encode())
    scores = {"args": asdict(args), "aggregate": table,
              "runs": [{"dir": r["dir"], "variant": r["variant"], "task": r["task"], "seed": r["seed"],
                        "score": r["score"], "final_env_steps": float(r["steps"][-1])} for r in runs]}
    write_bytes_atomic(out / "scores.json", (json.dumps(scores, indent=1) + "\n").encode())
    print(report)
    print(f"wrote {out / 'report.md'}, {out / 'scores.json'} and {len(figures)} figure(s) curves-<task>.png")


if __name__ == "__main__":
    main(tyro.cli(Args))
