"""Learning curves and aggregate scores of fine-tuning runs (the GSA paper's Fig. 3 / Fig. 6 style report).

Each run directory is one `finetune_gsa.py` run: its `args.json` gives the task, the seed and the variant
(from the flags no_pretrain, no_rehearsal, no_guidance, guidance), its `metrics.jsonl` one evaluation per
line ({"env_steps", "eval_return", and on Meta-World "eval_success", "eval_success_any"}).

Variants: gsa (everything on), jsrl (guidance only at the episode start), no-rehearsal, no-guidance,
pretrain-only (pre-trained world model, naive fine-tuning: no rehearsal, no guidance), no-pretrain
(DreamerV3 from scratch).

Scores (as the authors' release): DMControl return / 10, Meta-World success x 100, from the final evaluation
(or the mean of the last --last-n). Statistics are rliable's (Agarwal et al. 2021, "Deep RL at the edge of the
statistical precipice"), each with a 95% stratified bootstrap confidence interval (seeds resampled within each
task; tasks may have different seed counts):
  * aggregates over tasks and seeds: mean and median of the per-task means, IQM (interquartile mean of all
    run scores) and optimality gap (mean shortfall of the runs below a score of 100);
  * probability of improvement of GSA over each other variant (P(a GSA run scores above a run of the other
    variant on the same task), averaged over the tasks both have);
  * performance profiles (the fraction of runs scoring above tau, for tau from 0 to 100, or to the best score
    if higher).
On the 18 runs of results/cpu_scale they give the numbers of the hand-written bootstrap they replaced
(README, "Report and sweeps").

Reads:  <run>/args.json and <run>/metrics.jsonl for every run given (or every run one level below a dir).
Writes: <out-dir>/curves-<task>.png (mean over seeds and a bootstrap band, one line per variant),
        <out-dir>/performance-profile.png, <out-dir>/probability-of-improvement.png (rliable's plots; the
        latter only with GSA runs and runs of another variant on a task in common),
        <out-dir>/report.md (per-task, aggregate and probability-of-improvement tables), <out-dir>/scores.json
        (every number).

Example:
    python report.py --runs results/runs/*/ --out-dir results/ --paper-reference
"""
import os

os.environ.setdefault("MPLBACKEND", "Agg")  # figures are files; no display needed

import contextlib
import io
import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional

import numpy as np
import tyro
from rliable import library as rly
from rliable import metrics as rly_metrics

SCRIPT = "report.py"


@dataclass
class Args:
    runs: tuple[str, ...]
    """run directories of finetune_gsa.py (or directories holding run directories one level down)"""
    out_dir: Annotated[str, tyro.conf.arg(aliases=("--out",))]
    """where the figures and tables go (created if needed)"""
    seed: int = 0
    """seed of the bootstrap resampling (rliable draws from numpy's global generator; it is restored after)"""
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
# Statistics (rliable, Agarwal et al. 2021): aggregate metrics, probability of improvement, performance
# profiles, each with a stratified bootstrap CI
# ----------------------------------------------------------------------------------------------------------

OPTIMAL_SCORE = 100.0  # gamma of the optimality gap: a solved task (DMControl return 1000, Meta-World success 1)
AGGREGATES = ("mean", "median", "iqm", "optimality_gap")


@contextlib.contextmanager
def numpy_global_seed(seed: int):
    """rliable's bootstraps draw their indices from numpy's global generator (np.random.choice), not from a
    generator passed in: seed it for reproducible CIs, and give the caller's state back afterwards."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def interval_estimates(per_key: dict, func, reps: int, conf: float = 0.95) -> dict:
    """{key: (point [K], ci [2, K])} of func over each key's data, with rliable's stratified bootstrap.

    Each value of per_key is a list of arrays whose first axis is seeds (one array per task, [seeds, ...]),
    and func takes them as its arguments. Every array is resampled over its own seeds, independently of the
    others: rliable's StratifiedIndependentBootstrap, which allows tasks with different seed counts. When
    they are all [seeds, 1] with one seed count, they go to rliable as its [seeds, tasks] matrix instead
    (StratifiedBootstrap: the same resampling, one index draw per resample rather than one per task)."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a curve's points before any resampled seed's first eval
        for key, arrays in per_key.items():
            if len(arrays) > 1 and len({a.shape for a in arrays}) == 1 and arrays[0].shape[1:] == (1,):
                data = np.concatenate(arrays, axis=1)
                point, ci = rly.get_interval_estimates(
                    {key: data}, lambda m: func(*np.split(m, m.shape[1], axis=1)), reps=reps,
                    confidence_interval_size=conf)
            else:
                point, ci = rly.get_interval_estimates({key: arrays}, func, reps=reps, confidence_interval_size=conf)
            out[key] = (np.atleast_1d(point[key]).astype(float), np.asarray(ci[key], dtype=float).reshape(2, -1))
    return out


def aggregate_metrics(*per_task: np.ndarray) -> np.ndarray:
    """[mean, median, IQM, optimality gap] of one variant's scores; per_task: one [seeds, 1] array per task.

    As rliable defines them: mean and median of the per-task mean scores (aggregate_mean and aggregate_median
    of the [1, tasks] matrix of those means), IQM and optimality gap over all runs of all tasks (aggregate_iqm,
    aggregate_optimality_gap). With the same seed count on every task these are rliable's functions applied to
    the [seeds, tasks] matrix (tested)."""
    task_means = np.array([[s.mean() for s in per_task]])
    runs = np.concatenate(per_task)
    return np.array([rly_metrics.aggregate_mean(task_means), rly_metrics.aggregate_median(task_means),
                     rly_metrics.aggregate_iqm(runs), rly_metrics.aggregate_optimality_gap(runs, OPTIMAL_SCORE)])


def probability_of_improvement(*x_then_y: np.ndarray) -> np.ndarray:
    """[P(X > Y)]: rliable's probability of improvement, averaged over tasks; per task, the fraction of pairs
    (run of X, run of Y) in which X scores higher, ties counted half (the Mann-Whitney U statistic over
    n_x * n_y). x_then_y: X's per-task [seeds, 1] arrays, then Y's in the same task order; tasks may have
    different seed counts. The pairs are counted here directly: rliable's probability_of_improvement gives
    the same numbers (tested) through scipy's mannwhitneyu, whose ~1 ms per call makes the bootstrap take
    minutes over a benchmark's 72 tasks."""
    n = len(x_then_y) // 2
    per_task = []
    for x, y in zip(x_then_y[:n], x_then_y[n:]):
        diff = x.reshape(-1, 1) - y.reshape(1, -1)
        per_task.append((diff > 0).mean() + 0.5 * (diff == 0).mean())
    return np.array([np.mean(per_task)])


def performance_profile(taus: np.ndarray):
    """The function [len(taus)] of per-task [seeds, 1] score arrays: the fraction of runs with a score above
    tau (rliable's score distribution), each task weighted equally. With the same seed count on every task
    this is rliable's create_performance_profile (tested); it is computed with one comparison per task rather
    than rliable's per-tau loop, which would be slow inside the bootstrap over many tasks."""
    def profile(*per_task: np.ndarray) -> np.ndarray:
        return np.mean([(s.reshape(-1, 1) > taus).mean(axis=0) for s in per_task], axis=0)
    return profile


def curve(runs: list, grid: np.ndarray, reps: int, conf: float = 0.95):
    """Mean over seeds on `grid` and its bootstrap band (rliable). Each seed is interpolated linearly between
    its evaluations, holds its last value after its last one and is missing (NaN) before its first one; where
    a resample holds no seed evaluated yet, the band has a gap."""
    values = np.stack([np.interp(grid, r["steps"], r["value"], left=np.nan) for r in runs])  # [seeds, G]
    mean, (lo, hi) = interval_estimates({"curve": [values]}, lambda v: np.nanmean(v, axis=0), reps, conf)["curve"]
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


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def variant_colour(variant: str):
    """One colour per variant, the same in every figure."""
    colours = pyplot().get_cmap("tab10").colors
    return colours[VARIANTS.index(variant) if variant in VARIANTS else len(VARIANTS) + sum(map(ord, variant)) % 4]


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    pyplot().close(fig)
    return buf.getvalue()


def plot_task(task: str, by_variant: dict, args: Args) -> bytes:
    """PNG bytes of one task's learning curves, one line + band per variant."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for variant, runs in by_variant.items():
        first = min(r["steps"][0] for r in runs)
        last = max(r["steps"][-1] for r in runs)
        grid = np.linspace(first, last, args.grid_points) if last > first else np.array([first])
        mean, lo, hi = curve(runs, grid, args.bootstrap)
        colour = variant_colour(variant)
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
    return png_bytes(fig)


def plot_performance_profiles(taus: np.ndarray, profiles: dict) -> bytes:
    """PNG bytes of rliable's performance-profile plot: per variant, the fraction of runs scoring above tau."""
    from rliable import plot_utils

    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    plot_utils.plot_performance_profiles(
        {LABELS.get(v, v): p[0] for v, p in profiles.items()}, taus,
        performance_profile_cis={LABELS.get(v, v): p[1] for v, p in profiles.items()},
        colors={LABELS.get(v, v): variant_colour(v) for v in profiles}, ax=ax,
        xlabel=r"normalised score $\tau$", ylabel=r"fraction of runs with score $> \tau$",
        labelsize="medium", ticklabelsize="medium", legend=True, legendsize="small")
    ax.set_title("Performance profiles, 95% stratified bootstrap bands", fontsize="medium")
    fig.tight_layout()
    return png_bytes(fig)


def plot_probability_of_improvement(poi: dict) -> bytes:
    """PNG bytes of rliable's probability-of-improvement plot: one bar (the 95% CI) and tick (the estimate)
    per pair (GSA, another variant)."""
    from rliable import plot_utils

    fig, ax = pyplot().subplots(figsize=(8, 1.2 + 0.6 * len(poi)))
    pairs = {f"{LABELS.get(x, x)};{LABELS.get(y, y)}": (p, ci) for (x, y), (p, ci) in poi.items()}
    plot_utils.plot_probability_of_improvement(
        {k: p[0] for k, (p, _) in pairs.items()}, {k: ci[:, 0] for k, (_, ci) in pairs.items()},
        pair_separator=";", ax=ax, colors=[variant_colour(y) for _, y in poi], xticks=[0.0, 0.25, 0.5, 0.75, 1.0],
        xlabel="P(X > Y)", left_ylabel="X", right_ylabel="Y", labelsize="medium", ticklabelsize="small")
    ax.axvline(0.5, color="grey", linestyle=":", linewidth=1)  # no difference
    ax.set_xlim(0.0, 1.0)
    ax.set_title("Probability of improvement, 95% stratified bootstrap CIs", fontsize="medium")
    fig.tight_layout()
    return png_bytes(fig)


def fmt(x: float) -> str:
    return f"{x:.1f}"


def fmt_ci(point: float, ci, digits: int = 1) -> str:
    return f"{point:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def main(args: Args) -> None:
    if args.last_n < 1 or args.bootstrap < 1 or args.grid_points < 2:
        fail("--last-n and --bootstrap must be >= 1, --grid-points >= 2")
    runs = [read_run(r, args) for r in find_runs(args.runs)]
    groups = group_runs(runs)
    variants = sorted(groups, key=lambda v: (VARIANTS.index(v) if v in VARIANTS else len(VARIANTS), v))
    tasks = sorted({r["task"] for r in runs}, key=lambda t: (is_metaworld(t), t))

    def per_task_scores(variant: str, only=None) -> list:  # one [seeds, 1] array per task, in `tasks` order
        return [np.array([[r["score"]] for r in groups[variant][t]]) for t in tasks
                if t in groups[variant] and (only is None or t in only)]

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

    with numpy_global_seed(args.seed):  # every bootstrap below, in this order, from this seed
        # Aggregates per variant over its tasks (rliable), with stratified bootstrap CIs.
        estimates = interval_estimates({v: per_task_scores(v) for v in variants}, aggregate_metrics, args.bootstrap)
        # GSA against each other variant, over the tasks both have: probability of improvement (rliable).
        pairs = [("gsa", v) for v in variants if v != "gsa" and set(groups.get("gsa", {})) & set(groups[v])]
        poi = interval_estimates({f"{x}>{y}": per_task_scores(x, groups[y]) + per_task_scores(y, groups[x])
                                  for x, y in pairs}, probability_of_improvement, args.bootstrap)
        poi = {(x, y): poi[f"{x}>{y}"] for x, y in pairs}
        # Performance profiles: fraction of runs scoring above tau, on a grid of normalised scores.
        taus = np.linspace(0.0, max(OPTIMAL_SCORE, max(r["score"] for r in runs)), 101)
        profiles = interval_estimates({v: per_task_scores(v) for v in variants}, performance_profile(taus),
                                      args.bootstrap)
        figures = {f"curves-{task}.png": plot_task(task, {v: groups[v][task] for v in variants if task in groups[v]},
                                                   args) for task in tasks}
    figures["performance-profile.png"] = plot_performance_profiles(taus, profiles)
    if poi:
        figures["probability-of-improvement.png"] = plot_probability_of_improvement(poi)

    lines += ["", f"## Aggregate normalised score, 95% stratified bootstrap CI (rliable; {args.bootstrap} resamples, "
              f"seed {args.seed})", "",
              "IQM: interquartile mean of all runs; optimality gap: how far the runs fall short of a score of "
              f"{OPTIMAL_SCORE:.0f}, on average (lower is better).", "",
              "| variant | tasks | runs | mean | median | IQM | optimality gap |", "|---|---|---|---|---|---|---|"]
    table = {}
    for v in variants:
        point, ci = estimates[v]
        table[v] = {"tasks": len(groups[v]), "runs": int(sum(len(rs) for rs in groups[v].values())),
                    **{k: {"value": float(point[i]), "ci": [float(ci[0, i]), float(ci[1, i])]}
                       for i, k in enumerate(AGGREGATES)}}
        lines.append("| " + " | ".join([LABELS.get(v, v), str(table[v]["tasks"]), str(table[v]["runs"])]
                                       + [fmt_ci(table[v][k]["value"], table[v][k]["ci"]) for k in AGGREGATES]) + " |")
    if len({tuple(sorted(groups[v])) for v in variants}) > 1:
        lines += ["", "Note: the variants cover different task sets; their aggregates are not directly comparable."]

    lines += ["", "## Probability of improvement of GSA over each other variant, 95% stratified bootstrap CI", ""]
    if poi:
        lines += ["P(X > Y): the probability that a run of X scores above a run of Y on the same task, averaged "
                  "over the tasks both have (0.5: no difference).", "",
                  "| X | Y | tasks | P(X > Y) |", "|---|---|---|---|"]
        for (x, y), (point, ci) in poi.items():
            n_shared = len(set(groups[x]) & set(groups[y]))
            lines.append(f"| {LABELS.get(x, x)} | {LABELS.get(y, y)} | {n_shared} | "
                         f"{fmt_ci(point[0], ci[:, 0], 2)} |")
    else:
        lines.append("None: it needs GSA runs and runs of another variant on a task in common.")
    lines += ["", "Figures: `curves-<task>.png` (learning curves), `performance-profile.png` (fraction of runs above "
              "each normalised score)" + (", `probability-of-improvement.png`" if poi else "") + "."]
    if args.paper_reference:
        lines += ["", "Paper, mean over all tasks at 150k samples (GSA / DreamerV3): DMControl (22 tasks) "
                  f"{PAPER_MEAN_SCORE['dmc'][0]} / {PAPER_MEAN_SCORE['dmc'][1]}, Meta-World (50 tasks) "
                  f"{PAPER_MEAN_SCORE['metaworld'][0]} / {PAPER_MEAN_SCORE['metaworld'][1]}."]
    report = "\n".join(lines) + "\n"

    # Everything is computed before anything is written.
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, png in figures.items():
        write_bytes_atomic(out / name, png)
    write_bytes_atomic(out / "report.md", report.encode())
    scores = {"args": asdict(args), "aggregate": table,
              "probability_of_improvement": {f"{x}>{y}": {"value": float(p[0]), "ci": [float(c) for c in ci[:, 0]],
                                                          "tasks": sorted(set(groups[x]) & set(groups[y]))}
                                             for (x, y), (p, ci) in poi.items()},
              "performance_profile": {"tau": taus.tolist(), **{v: {"value": p.tolist(), "ci": ci.tolist()}
                                                               for v, (p, ci) in profiles.items()}},
              "runs": [{"dir": r["dir"], "variant": r["variant"], "task": r["task"], "seed": r["seed"],
                        "score": r["score"], "final_env_steps": float(r["steps"][-1])} for r in runs]}
    write_bytes_atomic(out / "scores.json", (json.dumps(scores, indent=1) + "\n").encode())
    print(report)
    print(f"wrote {out / 'report.md'}, {out / 'scores.json'} and {len(figures)} figures ({', '.join(figures)})")


if __name__ == "__main__":
    main(tyro.cli(Args))
