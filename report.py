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

Evidence per task (every task, whatever the seed counts):
  * every seed's final and best evaluation (return; on Meta-World success too) and the env frames of its final
    evaluation, then each variant's mean;
  * GSA minus each other variant: the difference of the mean final scores (the scores above), with a 95%
    percentile bootstrap CI that resamples each variant's seeds independently (10,000 resamples, seeded by
    --seed); under 2 seeds on either side, the difference alone, and "CI needs 2+ seeds per variant";
  * diagnostics of the learner over env frames: (a) the actor's entropy, (b) the imagined reward per step from
    online starts against the real reward per agent step over all training episodes so far (what those starts
    are drawn from) and in each training episode, (c) the critic's value of each evaluation's first frame against
    the discounted return those episodes earned (mean over seeds thick, each seed thin). Panel (b) compares
    averages over different states; whether the model is optimistic on the states the policy itself reaches is
    results/imagination_probe.py's question;
  * a film strip of one GSA evaluation episode (the lowest seed's latest evaluation video).

Reads:  <run>/args.json and <run>/metrics.jsonl for every run given (or every run one level below a dir); where
        present, <run>/train.jsonl, <run>/episodes.jsonl and <run>/videos/eval-<env frames>.mp4 (older runs lack
        them: their panels or film strip are left out, and report.md says which).
Writes: <out-dir>/curves-<task>.png (mean over seeds, a bootstrap band where there are 2+ seeds, one line per
        variant; the random-action level when the runs' episodes.jsonl hold random warm-up episodes; on
        Meta-World a second panel with the shaped return),
        <out-dir>/diagnostics-<task>.png (the three panels above), <out-dir>/filmstrip-<task>.png (tasks with a
        GSA run that saved a video), <out-dir>/performance-profile.png, <out-dir>/probability-of-improvement.png
        (rliable's plots; the latter only with GSA runs and runs of another variant on a task in common),
        <out-dir>/report.md (per-task, aggregate, probability-of-improvement, per-seed and GSA-minus-variant
        tables, and what the figures left out), <out-dir>/scores.json (every number; per_task: the per-seed
        tables and the differences); with --summary, <out-dir>/summary.png (below).

Summary (--summary, the main job's picture): one page on one GSA run against one from-scratch run of the same
task (other variants' single runs on it join the evaluation panel): (a) the task's reset frames beside the
retrieved episodes' first frames and D_r's make-up by embodiment and source task; (b) every training episode's
return over env frames, marking the warm-up episodes the prior drove, the random ones, and those with a prior
window, with GSA's guidance p; (c) the RL policy's evaluations (return, and success on Meta-World) with the
random-action level and, with --paper-reference, the paper's results at 150k frames; (d) the pre-trained world
model's open-loop prediction of a held-out clip of the task's embodiment; and a caption written from the numbers
(also in report.md and scores.json). It reads, besides args.json and metrics.jsonl: both runs' episodes.jsonl,
GSA's retrieval.json and first replay episodes, the offline episodes its --data-dir holds, and the videos/ and
metrics.jsonl beside its --checkpoint (pretrain_wm.py's). A missing optional input leaves its panel empty and is
printed.

Examples:
    python report.py --runs results/runs/*/ --out-dir results/ --paper-reference
    python report.py --runs runs/demo/finetune/*/ --out-dir runs/demo/report --summary --paper-reference
"""
import os

os.environ.setdefault("MPLBACKEND", "Agg")  # figures are files; no display needed

import contextlib
import io
import json
import math
import warnings
from dataclasses import asdict, dataclass, replace
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
    common_budget: bool = False
    """compare unfinished runs at one budget: ignore evaluations after the smallest final evaluation among the runs
    (with --max-env-steps, the smaller of the two); without it, runs that end at different budgets are flagged"""
    success_key: Literal["eval_success", "eval_success_any"] = "eval_success"
    """Meta-World success measure: at the episode end (comparable with the paper) or at any step"""
    bootstrap: int = 2000
    """bootstrap resamples for the confidence intervals"""
    grid_points: int = 100
    """points of the common env-steps grid the seeds' curves are interpolated onto"""
    paper_reference: bool = False
    """draw the paper's GSA and DreamerV3 results at 150k samples as reference lines; add them to the tables"""
    summary: bool = False
    """also draw summary.png, one page on one GSA run against one from-scratch run of the same task (the main
    job's picture): retrieved episodes, every training episode, the evaluations, the pre-trained model's open-loop
    prediction, and a caption stating the numbers; reads their episodes.jsonl, GSA's retrieval.json, replay and
    the data and pre-training outputs its args.json names"""


VARIANTS = ("gsa", "jsrl", "no-rehearsal", "no-guidance", "pretrain-only", "no-pretrain")
LABELS = {"gsa": "GSA", "jsrl": "GSA, JSRL-style guidance", "no-rehearsal": "GSA w/o rehearsal",
          "no-guidance": "GSA w/o guidance", "pretrain-only": "pre-train + naive fine-tune",
          "no-pretrain": "DreamerV3 (from scratch)", "no-pretrain-packnet": "DreamerV3 + PackNet"}
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
    """Variant of a finetune_gsa.py run from its flags (missing flags take finetune_gsa.py's defaults); a PackNet
    run's name ends in "-packnet"."""
    guidance = run_args.get("guidance", "window")
    suffix = "" if guidance == "window" else f"-{guidance}"
    if run_args.get("no_pretrain", False):
        name = "no-pretrain"  # DreamerV3 from scratch: no checkpoint, hence no retrieval, rehearsal, guidance
    elif run_args.get("no_rehearsal", False) and run_args.get("no_guidance", False):
        name = "pretrain-only"
    elif run_args.get("no_guidance", False):
        name = "no-guidance"
    elif run_args.get("no_rehearsal", False):
        name = "no-rehearsal" + suffix
    else:
        name = "gsa" if guidance == "window" else "jsrl" if guidance == "jsrl" else f"gsa{suffix}"
    return name + ("-packnet" if run_args.get("packnet", False) else "")


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


# finetune_gsa.py's evaluations: the critic's value of the first frame, and the discounted return earned after it
CRITIC_CHECK_KEYS = ("eval_value_first", "eval_return_discounted")


def read_run(run: Path, args: Args) -> dict:
    """{"dir", "task", "seed", "variant", "steps" [N], "value" [N] (return or success rate), "eval_return" [N],
    "value_first" [N] and "return_discounted" [N] (the critic check of finetune_gsa.py's evaluations; NaN where a
    record lacks them, as older runs' do), "score"}."""
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
    steps, values, returns, critic = [], [], [], []
    for lineno, record in read_jsonl(path):
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
        if not all(isinstance(x, (int, float)) and math.isfinite(x)
                   for x in (value, record["env_steps"], record["eval_return"])):
            fail(f"{path}:{lineno}: env_steps, eval_return and the evaluation value must be finite numbers")
        check = [record.get(k, math.nan) for k in CRITIC_CHECK_KEYS]
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in check):
            fail(f"{path}:{lineno}: {' and '.join(CRITIC_CHECK_KEYS)} must be numbers where present")
        if args.max_env_steps is None or record["env_steps"] <= args.max_env_steps:
            steps.append(float(record["env_steps"]))
            values.append(float(value))
            returns.append(float(record["eval_return"]))
            critic.append([float(x) for x in check])
    if not steps:
        fail(f"{path} has no evaluations" + (f" at or before {args.max_env_steps} env steps"
                                               if args.max_env_steps is not None else ""))
    order = np.argsort(steps, kind="stable")
    steps, values, returns = np.array(steps)[order], np.array(values)[order], np.array(returns)[order]
    critic = np.array(critic, dtype=float).reshape(-1, len(CRITIC_CHECK_KEYS))[order]
    scale = 100.0 if is_metaworld(task) else 0.1  # normalised score: MW success x 100, DMC return / 10
    return {"dir": str(run), "task": task, "seed": run_args["seed"], "variant": variant_name(run_args),
            "args": run_args, "steps": steps, "value": values, "eval_return": returns,
            "value_first": critic[:, 0], "return_discounted": critic[:, 1],
            "score": float(values[-args.last_n:].mean() * scale)}


def read_jsonl(path: Path) -> list:
    """[(line number, JSON object)] of a .jsonl file, blank lines skipped; a damaged line is named."""
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            fail(f"{path}:{lineno} is not valid JSON: {e}")
        if not isinstance(record, dict):
            fail(f"{path}:{lineno} is not a JSON object")
        records.append((lineno, record))
    return records


def random_policy_level(runs: list, success_key: str) -> Optional[dict]:
    """Mean return (and Meta-World success) of the random-action episodes among the runs' training episodes.

    finetune_gsa.py plays its warm-up with uniform random actions whenever guidance is off (from scratch,
    pre-train + naive), and with pi_bc otherwise; episodes.jsonl marks both (warmup, prior_steps), so the warm-up
    episodes with prior_steps 0 are random-policy episodes of the task. None if no run has any (or no
    episodes.jsonl)."""
    episodes = []
    for r in runs:
        path = Path(r["dir"]) / "episodes.jsonl"
        if path.is_file():
            episodes += [e for _, e in read_jsonl(path) if e.get("warmup") is True and e.get("prior_steps") == 0
                         and isinstance(e.get("return"), (int, float))]
    if not episodes:
        return None
    level = {"episodes": len(episodes), "return": float(np.mean([e["return"] for e in episodes]))}
    key = "success" if success_key == "eval_success" else "success_any"  # the same measure as the evaluations'
    if all(key in e for e in episodes):
        level["success"] = float(np.mean([float(e[key]) for e in episodes]))
    return level


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


def curve(runs: list, grid: np.ndarray, reps: int, key: str = "value", conf: float = 0.95):
    """Mean over seeds of each run's `key` series (its score by default) on `grid` and its bootstrap band
    (rliable). Each seed is interpolated linearly between its evaluations, holds its last value after its last
    one and is missing (NaN) before its first one; where a resample holds no seed evaluated yet, the band has a
    gap."""
    values = np.stack([np.interp(grid, r["steps"], r[key], left=np.nan) for r in runs])  # [seeds, G]
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
    """PNG bytes of one task's learning curves: per variant the mean over seeds, with a 95% bootstrap band
    only where there are 2+ seeds (a band over one seed is not a band); the random-policy level where the runs
    logged random-action episodes; the y-axis starts at 0 (and ends at 1 for success rates). Meta-World tasks
    get two panels: the success rate and the shaped return (which moves before any success does)."""
    metaworld = is_metaworld(task)
    panels = [("value", "success" if metaworld else "return")] + ([("eval_return", "return")] if metaworld else [])
    fig, axes = pyplot().subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    random_level = random_policy_level([r for runs in by_variant.values() for r in runs], args.success_key)
    seeds = {len(runs) for runs in by_variant.values()}
    for ax, (key, kind) in zip(axes[0], panels):
        for variant, runs in by_variant.items():
            first = min(r["steps"][0] for r in runs)
            last = max(r["steps"][-1] for r in runs)
            grid = np.linspace(first, last, args.grid_points) if last > first else np.array([first])
            mean, lo, hi = curve(runs, grid, args.bootstrap, key)
            colour = variant_colour(variant)
            ax.plot(grid, mean, color=colour, marker="o" if len(grid) == 1 else None,
                    label=f"{LABELS.get(variant, variant)} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
            if len(runs) > 1:
                ax.fill_between(grid, lo, hi, color=colour, alpha=0.2, linewidth=0)
        level = None if random_level is None else random_level.get(kind)
        if level is not None:
            ax.axhline(level, color="tab:grey", linestyle="-.", linewidth=1,
                       label=f"random actions ({random_level['episodes']} episodes)")
        if args.paper_reference and task in PAPER_150K and key == "value":
            gsa, dreamer = PAPER_150K[task]
            ax.axhline(gsa, color="black", linestyle="--", linewidth=1, label="paper GSA @150k")
            ax.axhline(dreamer, color="grey", linestyle=":", linewidth=1, label="paper DreamerV3 @150k")
        ax.set_xlabel("env steps (frames)")
        ax.set_ylabel(f"success rate ({'end' if args.success_key == 'eval_success' else 'any step'})"
                      if kind == "success" else "shaped episode return" if metaworld else "episode return")
        ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]), top=1.05 if kind == "success" else None)
        ax.set_title(f"{task}, {'success' if kind == 'success' else 'return'}: "
                     + ("1 seed per variant, no band" if seeds == {1} else
                        "mean over seeds, 95% bootstrap band (2+ seeds)"), fontsize=10)
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


# ----------------------------------------------------------------------------------------------------------
# Evidence per task: every seed's numbers, GSA minus each other variant, what the learner measured while it
# trained (diagnostics), and one GSA evaluation episode (film strip)
# ----------------------------------------------------------------------------------------------------------

DIFFERENCE_RESAMPLES = 10_000  # bootstrap resamples of each GSA-minus-variant difference (under a second)
FILMSTRIP_FRAMES = 10  # frames of the GSA evaluation episode shown, evenly spaced from the reset to the end


def say(notes: list, text: str) -> None:
    """A skipped figure or panel: printed now and listed in report.md."""
    print(f"{SCRIPT}: {text}")
    notes.append(text)


def per_seed_table(by_variant: dict, metaworld: bool) -> dict:
    """{"runs": one row per run (variant, seed, final and best eval return, on Meta-World final and best success,
    env frames of the final evaluation), "mean": {variant: the rows' means and the seed count}}. Final: the last
    evaluation kept (--max-env-steps cuts later ones); best: the highest evaluation (optimistic: the best of noisy
    evaluations)."""
    rows, means = [], {}
    for variant, runs in by_variant.items():
        mine = []
        for r in sorted(runs, key=lambda r: r["seed"]):
            row = {"variant": variant, "seed": r["seed"], "dir": r["dir"], "final_return": float(r["eval_return"][-1]),
                   "best_return": float(r["eval_return"].max()), "final_env_steps": int(r["steps"][-1])}
            if metaworld:
                row.update(final_success=float(r["value"][-1]), best_success=float(r["value"].max()))
            mine.append(row)
        rows += mine
        means[variant] = {"seeds": len(mine),
                          **{k: float(np.mean([row[k] for row in mine])) for k in mine[0]
                             if k.startswith(("final_", "best_")) and k != "final_env_steps"},
                          "final_env_steps": [min(row["final_env_steps"] for row in mine),
                                              max(row["final_env_steps"] for row in mine)]}
    return {"runs": rows, "mean": means}


def per_seed_lines(task: str, table: dict, success_key: str) -> list:
    """report.md's per-seed table of one task: its runs, then the mean of each variant."""
    mw = is_metaworld(task)
    success = f"success ({'end' if success_key == 'eval_success' else 'any step'})"
    header = ["variant", "seed", "final return"] + ([f"final {success}"] if mw else []) + ["best return"] \
        + ([f"best {success}"] if mw else []) + ["env frames (final eval)"]
    keys = ["final_return"] + (["final_success"] if mw else []) + ["best_return"] + (["best_success"] if mw else [])

    def cells(row: dict) -> list:
        return [f"{row[k]:.2f}" if k.endswith("success") else fmt(row[k]) for k in keys]

    lines = [f"### {task}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table["runs"]:
        lines.append("| " + " | ".join([LABELS.get(row["variant"], row["variant"]), str(row["seed"])] + cells(row)
                                       + [str(row["final_env_steps"])]) + " |")
    for variant, row in table["mean"].items():
        low, high = row["final_env_steps"]
        name, seeds = f"**{LABELS.get(variant, variant)}**", f"mean of {plural(row['seeds'], 'seed')}"
        lines.append("| " + " | ".join([name, seeds] + cells(row) + [str(low) if low == high else f"{low}-{high}"])
                     + " |")
    return lines + [""]


def difference_ci(x: np.ndarray, y: np.ndarray, seed: int, reps: int = DIFFERENCE_RESAMPLES,
                  conf: float = 0.95) -> np.ndarray:
    """[low, high]: the percentile bootstrap CI of mean(x) - mean(y), the seeds of x and of y each resampled with
    replacement, independently of the other's (the two variants' runs are independent): rliable's bootstrap, as
    every other CI here (interval_estimates), seeded."""
    with numpy_global_seed(seed):
        _, ci = interval_estimates({"d": [x.reshape(-1, 1), y.reshape(-1, 1)]},
                                   lambda a, b: np.array([a.mean() - b.mean()]), reps, conf)["d"]
    return ci[:, 0]


def gsa_differences(task: str, by_variant: dict, seed: int) -> dict:
    """{other variant: {"difference", "ci" (None under 2 seeds on either side), "seeds"}}: the mean final score of
    GSA's seeds minus the other variant's, on one task ({} without GSA runs on it)."""
    if "gsa" not in by_variant:
        return {}
    gsa = np.array([r["score"] for r in by_variant["gsa"]])
    out = {}
    for variant, runs in by_variant.items():
        if variant == "gsa":
            continue
        other = np.array([r["score"] for r in runs])
        enough = len(gsa) >= 2 and len(other) >= 2  # one seed has no spread to resample: no CI from it
        out[variant] = {"difference": float(gsa.mean() - other.mean()),
                        "ci": [float(c) for c in difference_ci(gsa, other, seed)] if enough else None,
                        "seeds": {"gsa": len(gsa), variant: len(other)}}
    return out


def read_training_logs(run: dict, args: Args) -> dict:
    """What the run logged per training episode, cut at --max-env-steps, as {name: (env frames [N], values [N])}:
    "entropy" (train.jsonl: the actor's entropy in imagination), "imag_reward" (train.jsonl: the reward head's mean
    reward per imagined step, all starts), "imag_online" (the same from the starts in online rows:
    imag_reward_online_starts where the run rehearses, else imag_reward, whose starts are all online),
    "real_reward" (episodes.jsonl: return / length, the reward per agent step the environment paid in each
    training episode) and "replay_reward" (the reward per agent step over all training episodes so far: what the
    online starts of imagination are drawn from, the prior's episodes included). A log the run lacks (older runs)
    or whose records lack a key is absent from the dict."""
    logs = {}
    for name, keys in (("train", ("entropy", "imag_reward")), ("episodes", ("return", "length"))):
        path = Path(run["dir"]) / f"{name}.jsonl"
        if not path.is_file():
            continue
        records = [r for _, r in read_jsonl(path)
                   if all(isinstance(r.get(k), (int, float)) and not isinstance(r[k], bool)
                          for k in ("env_steps",) + keys)
                   and (args.max_env_steps is None or r["env_steps"] <= args.max_env_steps)]
        records.sort(key=lambda r: r["env_steps"])
        if not records:
            continue
        steps = np.array([r["env_steps"] for r in records], float)
        if name == "train":
            logs.update({k: (steps, np.array([r[k] for r in records], float)) for k in keys})
            logs["imag_online"] = (steps, np.array([r.get("imag_reward_online_starts", r["imag_reward"])
                                                    for r in records], float))
        else:
            returns = np.array([r["return"] for r in records], float)
            lengths = np.array([max(r["length"], 1) for r in records], float)
            logs["real_reward"] = (steps, returns / lengths)
            logs["replay_reward"] = (steps, np.cumsum(returns) / np.cumsum(lengths))
    return logs


def seed_mean(series: list) -> tuple:
    """(env frames, mean over seeds) of several seeds' (x, y) series, on the span every seed covers (so the mean
    never changes which seeds it averages), each interpolated linearly onto the union of their x in that span.
    Empty where the seeds share no span."""
    low, high = max(x[0] for x, _ in series), min(x[-1] for x, _ in series)
    if high < low:
        return np.array([]), np.array([])
    grid = np.unique(np.concatenate([x[(x >= low) & (x <= high)] for x, _ in series]))
    return grid, np.mean([np.interp(grid, x, y) for x, y in series], axis=0)


def plot_diagnostics(task: str, by_variant: dict, logs: dict, notes: list) -> bytes:
    """PNG bytes of one task's diagnostics over env frames, one colour per variant (a thick line: the mean over
    seeds, where every seed has data; thin faint lines: each seed; no band): (a) the actor's entropy, (b) the
    reward head's imagined reward per step from online starts (solid) against the real reward per agent step over
    the online replay so far (dotted: what those starts are drawn from) and in each training episode (dashed),
    (c) the critic's value of each evaluation's first frame (solid) against the discounted return those episodes
    earned (dashed). logs: {run dir: read_training_logs}. Panels (b) and (c) start their
    y-axis at 0 (rewards and returns of these tasks are not negative; a zoomed axis would magnify a small gap);
    (a) does not: a Gaussian's entropy is a differential entropy, whose zero means nothing."""
    from matplotlib.lines import Line2D

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    panels = [  # (axes, title, y label, [(measure, line style)], where the measures come from)
        (axes[0], "(a) the actor's entropy in imagination (train.jsonl)",
         "actor entropy (nats, summed over action dims)", [("entropy", "-")], "train.jsonl"),
        (axes[1], "(b) reward per agent step on online states: imagined from replay\nstarts (solid), paid in the "
                  "replay so far (dotted), in each episode (dashed)",
         "reward per agent step", [("imag_online", "-"), ("replay_reward", ":"), ("real_reward", "--")],
         "train.jsonl or episodes.jsonl"),
        (axes[2], "(c) evaluations: the critic's value of the first frame (solid)\nvs the discounted return the "
                  "episodes earned (dashed)",
         "value / discounted return", [("value_first", "-"), ("return_discounted", "--")],
         "eval_value_first in metrics.jsonl"),
    ]
    for ax, title, ylabel, measures, source in panels:
        handles = []
        for variant, runs in by_variant.items():
            colour, drawn = variant_colour(variant), set()
            for key, style in measures:
                series = []
                for r in runs:
                    if key in ("value_first", "return_discounted"):
                        x, y = r["steps"], r[key]
                    elif key in logs[r["dir"]]:
                        x, y = logs[r["dir"]][key]
                    else:
                        continue
                    keep = np.isfinite(y)
                    if keep.any():
                        series.append((x[keep], y[keep]))
                        drawn.add(r["dir"])
                if not series:
                    continue
                sparse = key in ("value_first", "return_discounted")  # a few evaluations: mark each
                if len(series) > 1:
                    for x, y in series:
                        ax.plot(x, y, color=colour, linestyle=style, linewidth=0.8, alpha=0.35,
                                marker="o" if len(x) == 1 else None, markersize=3)
                x, y = seed_mean(series)
                ax.plot(x, y, color=colour, linestyle=style, linewidth=2.2, markersize=4,
                        marker="o" if sparse or len(x) == 1 else None)  # a line of one point is invisible
            if drawn:
                handles.append(Line2D([], [], color=colour, linewidth=2.2,
                                      label=f"{LABELS.get(variant, variant)} ({plural(len(drawn), 'seed')})"))
            missing = [str(r["seed"]) for r in runs if r["dir"] not in drawn]
            if missing:
                say(notes, f"{task}, diagnostics panel {title[:3]}: {LABELS.get(variant, variant)}, "
                           f"{'seed' if len(missing) == 1 else 'seeds'} {', '.join(missing)}: no {source} (older "
                           f"runs); left out of that panel")
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_xlabel("env frames")
        ax.set_ylabel(ylabel)
        if not handles:
            ax.text(0.5, 0.5, f"no run has {source}\n(older runs)", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
            ax.set_xticks([])
            ax.set_yticks([])  # an empty panel's 0-1 axes would read as data
            continue
        ax.set_xlim(left=0)
        if len(measures) > 1:
            ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
            names = {"imag_online": "imagined from online starts (train.jsonl)",
                     "replay_reward": "real, all training episodes so far (where the starts come from)",
                     "real_reward": "real, each training episode (episodes.jsonl return / length)",
                     "value_first": "critic's value (eval_value_first)",
                     "return_discounted": "discounted return (eval_return_discounted)"}
            handles += [Line2D([], [], color="black", linestyle=style, label=names[key]) for key, style in measures]
        ax.grid(alpha=0.3)
        ax.legend(handles=handles, fontsize=7.5)
    seeds = max(len(runs) for runs in by_variant.values())
    fig.suptitle(f"{task}: what the learner measured while training. Thick: mean over seeds"
                 + (" (where all have data); thin: each seed" if seeds > 1 else "") + "; no bands", fontsize=11)
    fig.tight_layout()
    return png_bytes(fig)


def latest_eval_video(run: dict, max_env_steps: Optional[int]) -> Optional[tuple]:
    """(env frames, path) of the run's latest evaluation video (finetune_gsa.py's videos/eval-<env frames>.mp4) at
    or before max_env_steps; None if it has none. Half-written temporaries (eval-<n>.tmp-<pid>.mp4) are not videos."""
    videos = []
    for path in (Path(run["dir"]) / "videos").glob("eval-*.mp4"):
        frames = path.stem[len("eval-"):]
        if frames.isdigit() and (max_env_steps is None or int(frames) <= max_env_steps):
            videos.append((int(frames), path))
    return max(videos) if videos else None


def filmstrip_steps(frames: int) -> np.ndarray:
    """The video frames (agent steps) a film strip shows: FILMSTRIP_FRAMES evenly spaced from the first to the last
    (all of them in a shorter video)."""
    return np.unique(np.linspace(0, frames - 1, FILMSTRIP_FRAMES).round().astype(int))


def plot_filmstrip(task: str, gsa_runs: list, args: Args, notes: list) -> Optional[bytes]:
    """PNG bytes of a film strip of one GSA evaluation episode: the latest evaluation video of the GSA run with the
    lowest seed (the first of that evaluation's episodes: the RL policy's mode, no prior), FILMSTRIP_FRAMES frames
    evenly spaced in one row, each with its agent step (the video's frame index; 0 is the reset frame) under it.
    None, with a note, if there is no video or it cannot be read."""
    import imageio.v2 as imageio

    run = min(gsa_runs, key=lambda r: r["seed"])
    found = latest_eval_video(run, args.max_env_steps)
    if found is None:
        say(notes, f"{task}: no film strip: no evaluation video under {run['dir']}/videos")
        return None
    env_frames, path = found
    try:
        frames = np.stack(imageio.mimread(path, memtest=False))[..., :3]
    except Exception as e:  # noqa: BLE001 - a damaged video: said, and the figure skipped
        say(notes, f"{task}: no film strip: {path} is unreadable ({type(e).__name__}: {e})")
        return None
    shown = filmstrip_steps(len(frames))
    height, width = frames.shape[1:3]
    gap = max(2, width // 32)
    strip = np.full((height, len(shown) * (width + gap) - gap, 3), 255, np.uint8)
    for i, t in enumerate(shown):
        strip[:, i * (width + gap):i * (width + gap) + width] = frames[t]
    fig, ax = pyplot().subplots(figsize=(1.3 * len(shown), 2.3))
    ax.imshow(strip, interpolation="nearest")
    ax.set_xticks([i * (width + gap) + width / 2 for i in range(len(shown))], [str(t) for t in shown])
    ax.set_yticks([])
    ax.set_xlabel(f"agent step (of {len(frames) - 1}; 0 is the reset frame)")
    at = np.flatnonzero(run["steps"] == env_frames)
    result = "" if not len(at) else f"; that evaluation's mean return {run['eval_return'][at[-1]]:.0f}" + (
        f", success {run['value'][at[-1]]:.2f}" if is_metaworld(task) else "")
    ax.set_title(f"{task}: GSA, seed {run['seed']}, evaluation at {env_frames} env frames ({path.name}, its first "
                 f"episode){result}", fontsize=9, loc="left")
    fig.tight_layout()
    return png_bytes(fig)


def task_evidence(task: str, by_variant: dict, args: Args, notes: list) -> tuple:
    """({figure name: PNG bytes}, numbers for scores.json) of one task: the per-seed table, GSA minus each other
    variant, diagnostics-<task>.png and (with GSA runs) filmstrip-<task>.png."""
    logs = {r["dir"]: read_training_logs(r, args) for runs in by_variant.values() for r in runs}
    figures = {f"diagnostics-{task}.png": plot_diagnostics(task, by_variant, logs, notes)}
    if "gsa" in by_variant:
        strip = plot_filmstrip(task, by_variant["gsa"], args, notes)
        if strip is not None:
            figures[f"filmstrip-{task}.png"] = strip
    numbers = {"per_seed": per_seed_table(by_variant, is_metaworld(task)),
               "gsa_minus": gsa_differences(task, by_variant, args.seed)}
    return figures, numbers


def difference_lines(differences: dict) -> list:
    """report.md's table of GSA minus each other variant, per task. differences: {task: gsa_differences}."""
    rows = [(task, variant, d) for task, by in differences.items() for variant, d in by.items()]
    lines = ["## GSA minus each other variant: final score, 95% bootstrap CI", ""]
    if not rows:
        return lines + ["None: it needs GSA runs and runs of another variant on the same task.", ""]
    lines += ["Mean final score of GSA's seeds minus the other variant's (scores as above); the CI resamples the seeds "
              f"of each variant independently ({DIFFERENCE_RESAMPLES} resamples, percentile interval). A CI that "
              "excludes 0 is evidence of a difference at these seeds; with few seeds it is itself rough.", "",
              "| task | other variant | seeds (GSA, other) | GSA minus other | 95% CI |", "|---|---|---|---|---|"]
    for task, variant, d in rows:
        ci = "CI needs 2+ seeds per variant" if d["ci"] is None else f"[{d['ci'][0]:.1f}, {d['ci'][1]:.1f}]"
        lines.append(f"| {task} | {LABELS.get(variant, variant)} | {d['seeds']['gsa']}, {d['seeds'][variant]} | "
                     f"{d['difference']:+.1f} | {ci} |")
    return lines + [""]


# ----------------------------------------------------------------------------------------------------------
# Summary: one page on one GSA run against one run from scratch (--summary; the main job's picture)
# ----------------------------------------------------------------------------------------------------------

SUMMARY_QUERY_FRAMES = 3  # task reset frames shown beside the retrieved ones
SUMMARY_RETRIEVED_FRAMES = 24  # retrieved first frames shown, best first (3 rows of 8)
SUMMARY_OPENLOOP_TIMES = (0, 4, 9, 14, 24, 34, 49)  # open-loop clip frames shown; 0-4 are observed (context 5)


def summary_runs(runs: list, groups: dict) -> tuple:
    """(task, {variant: run}): the task that has both a GSA and a from-scratch run, and one run per variant on
    it. The summary compares single runs; several seeds belong in the curves and the aggregate tables."""
    tasks = sorted(t for t in groups.get("gsa", {}) if t in groups.get("no-pretrain", {}))
    if len(tasks) != 1:
        fail(f"--summary needs a GSA run and a from-scratch (--no-pretrain) run of one task among --runs; "
             f"tasks with both: {tasks or 'none'}")
    task = tasks[0]
    chosen = {}
    for variant, by_task in groups.items():
        if task in by_task:
            if len(by_task[task]) != 1:
                fail(f"--summary draws one run per variant; --runs hold {len(by_task[task])} runs of {variant} on "
                     f"{task} ({', '.join(r['dir'] for r in by_task[task])})")
            chosen[variant] = by_task[task][0]
    return task, chosen


def read_episodes(run: dict) -> list:
    """The run's episodes.jsonl (finetune_gsa.py: one line per training episode), checked for the fields the
    summary draws."""
    path = Path(run["dir"]) / "episodes.jsonl"
    if not path.is_file():
        fail(f"{path} does not exist (the summary draws every training episode)")
    episodes = []
    for lineno, e in read_jsonl(path):
        for key, kind in (("env_steps", (int, float)), ("return", (int, float)), ("warmup", bool),
                          ("prior_steps", int), ("length", int), ("guidance_p", (int, float))):
            if not isinstance(e.get(key), kind) or isinstance(e[key], bool) != (kind is bool):
                fail(f"{path}:{lineno}: {key!r} missing or not a {'bool' if kind is bool else 'number'}")
        episodes.append(e)
    if not episodes:
        fail(f"{path} holds no episode")
    return episodes


def task_embodiment(task: str) -> str:
    """The embodiment whose pre-training outputs go with a task (Meta-World: sawyer; DMControl: the domain)."""
    return "sawyer" if is_metaworld(task) else task.split("-")[0]


def npz_first_frame(path: Path) -> np.ndarray:
    """The first image of an episode .npz (collect_offline.py's and finetune_gsa.py's replay format)."""
    with np.load(path, allow_pickle=False) as z:
        return np.asarray(z["image"][0])


def frame_grid(frames: list, colours: list, cols: int) -> np.ndarray:
    """uint8 image of the frames in rows of `cols`, each framed by a 3-pixel border of its colour; None frames
    (unreadable) are drawn grey."""
    size = next((f.shape[0] for f in frames if f is not None), 64)
    tile = size + 6
    rows = max(1, math.ceil(len(frames) / cols))
    grid = np.full((rows * tile, min(cols, max(1, len(frames))) * tile, 3), 255, np.uint8)
    for i, (frame, colour) in enumerate(zip(frames, colours)):
        r, c = divmod(i, cols)
        cell = grid[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
        cell[:] = colour
        cell[3:-3, 3:-3] = 160 if frame is None else frame
    return grid


def retrieval_frames(task: str, gsa: dict, retrieved: Optional[dict]) -> dict:
    """Panel (a)'s pictures: the task's reset frames (the first frames of GSA's first training episodes, from its
    replay; the query of Eq. 4 renders resets of the same env) and the first frames of the retrieved episodes
    (from the offline data the run read). What cannot be read is reported, not hidden."""
    notes, run_dir = [], Path(gsa["dir"])
    queries = []
    for i in range(SUMMARY_QUERY_FRAMES):
        path = run_dir / "replay" / f"ep-{i:06d}.npz"
        try:
            queries.append(npz_first_frame(path))
        except Exception as e:  # noqa: BLE001 - a missing or damaged replay file: said in the panel and printed
            notes.append(f"no reset frame from {path} ({type(e).__name__})")
            break
    shown, same = [], []
    if retrieved is not None:
        data_dir = Path(gsa["args"].get("data_dir") or "")
        unreadable = 0
        for episode in retrieved["episodes"][:SUMMARY_RETRIEVED_FRAMES]:
            try:
                shown.append(npz_first_frame(data_dir / episode["path"]))
            except Exception:  # noqa: BLE001 - counted below
                shown.append(None)
                unreadable += 1
            same.append(episode.get("embodiment") == task_embodiment(task))
        if unreadable:
            notes.append(f"{unreadable} of {len(shown)} retrieved episodes unreadable under {data_dir}")
    for note in notes:
        print(f"{SCRIPT}: summary: {note}")
    return {"queries": queries, "retrieved": shown, "same_embodiment": same, "notes": notes}


def read_retrieval(gsa: dict) -> Optional[dict]:
    """GSA's retrieval.json (D_r: k, make-up by embodiment and source task, the episodes nearest first)."""
    path = Path(gsa["dir"]) / "retrieval.json"
    if not path.is_file():
        print(f"{SCRIPT}: summary: {path} does not exist; the retrieval panel stays empty")
        return None
    try:
        retrieved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        fail(f"{path} is not valid JSON: {e}")
    if not isinstance(retrieved, dict) or not isinstance(retrieved.get("episodes"), list) or not all(
            isinstance(e, dict) and isinstance(e.get("path"), str) for e in retrieved["episodes"]):
        fail(f"{path} has no list of retrieved 'episodes' with a 'path' each")
    return retrieved


def read_openloop(task: str, gsa: dict) -> Optional[dict]:
    """Panel (d): pretrain_wm.py's last open-loop evaluation of the task's embodiment, next to the checkpoint GSA
    fine-tuned: the clip (videos/openloop-<embodiment>-<step>.gif: per frame, rows of held-out clips, each
    [truth | model]), the held-out MSE against repeating the last observed frame, and the pre-training steps and
    time. None (and a printed note) when those files are not there."""
    import imageio.v2 as imageio

    embodiment = task_embodiment(task)
    pretrain_dir = Path(gsa["args"].get("checkpoint") or "").parent
    videos = sorted((pretrain_dir / "videos").glob(f"openloop-{embodiment}-*.gif"))
    metrics = pretrain_dir / "metrics.jsonl"
    if not videos or not metrics.is_file():
        print(f"{SCRIPT}: summary: no open-loop video of {embodiment} or metrics.jsonl under {pretrain_dir}; "
              f"panel (d) stays empty")
        return None
    records = [r for _, r in read_jsonl(metrics)]
    evals = [r for r in records if f"openloop_mse/{embodiment}" in r]
    if not evals:
        print(f"{SCRIPT}: summary: {metrics} has no open-loop evaluation of {embodiment}")
        return None
    frames = np.stack(imageio.mimread(videos[-1]))  # [T, clips * H, 2W, 3]
    size = frames.shape[2] // 2
    clip = frames[:, :size]  # the first held-out clip
    times = [t for t in SUMMARY_OPENLOOP_TIMES if t < len(clip)]
    timed = [r for r in records if isinstance(r.get("wall_time"), (int, float))]
    return {"embodiment": embodiment, "step": evals[-1].get("step"), "video": videos[-1].name,
            "model_mse": evals[-1][f"openloop_mse/{embodiment}"],
            "copy_mse": evals[-1].get(f"openloop_copy_mse/{embodiment}"),
            "minutes": timed[-1]["wall_time"] / 60 if timed else None,
            "times": times, "truth": clip[times, :, :size, :3], "model": clip[times, :, size:, :3]}


def summary_numbers(task: str, chosen: dict, episodes: dict, retrieved: Optional[dict], openloop: Optional[dict],
                    args: Args) -> dict:
    """Every number the summary's caption states, from the runs' files (scores.json keeps them)."""
    metaworld = is_metaworld(task)
    gsa_args = chosen["gsa"]["args"]
    numbers = {"task": task, "metaworld": metaworld, "success_key": args.success_key,
               "eval_episodes": gsa_args.get("eval_episodes") or gsa_args.get("resolved", {}).get("eval_episodes"),
               "size": gsa_args.get("resolved_size") or gsa_args.get("size"), "variants": {}}
    for variant, run in chosen.items():
        entry = {"seed": run["seed"], "dir": run["dir"], "evaluations": len(run["steps"]),
                 "final_env_steps": int(run["steps"][-1]), "final_return": float(run["eval_return"][-1])}
        if metaworld:
            entry["final_success"] = float(run["value"][-1])
        if variant in episodes:
            entry["train_episodes"] = len(episodes[variant])
            entry["train_return_mean"] = float(np.mean([e["return"] for e in episodes[variant]]))
        numbers["variants"][variant] = entry
    numbers["random"] = random_policy_level(list(chosen.values()), args.success_key)
    warm = [e for e in episodes["gsa"] if e["warmup"] and e["prior_steps"] == e["length"]]  # pi_bc drove it all
    numbers["prior_warmup"] = None if not warm else {
        "episodes": len(warm), "return": float(np.mean([e["return"] for e in warm])),
        **({"success_any": float(np.mean([bool(e.get("success_any")) for e in warm])),
            "success": float(np.mean([bool(e.get("success")) for e in warm]))} if metaworld else {})}
    numbers["guided_episodes"] = sum(1 for e in episodes["gsa"] if not e["warmup"] and e["prior_steps"] > 0)
    numbers["rl_episodes"] = sum(1 for e in episodes["gsa"] if not e["warmup"])
    numbers["guidance_schedule"] = gsa_args.get("guidance_schedule", "paper")
    numbers["retrieved"] = None if retrieved is None else {
        "k": retrieved.get("k"), "episodes": len(retrieved["episodes"]),
        "by_embodiment": retrieved.get("by_embodiment", {}), "by_source_task": retrieved.get("by_source_task", {}),
        "mixed_embodiments": retrieved.get("mixed_embodiments")}
    numbers["paper_150k"] = (dict(zip(("gsa", "no-pretrain"), PAPER_150K[task]))
                             if args.paper_reference and task in PAPER_150K else None)
    numbers["openloop"] = None if openloop is None else {
        k: openloop[k] for k in ("embodiment", "step", "model_mse", "copy_mse", "minutes", "video")}
    return numbers


def plural(n, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def counts_text(counts: dict) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def summary_caption(n: dict) -> str:
    """The summary's caption, every number from `n` (summary_numbers); says what one seed can and cannot show."""
    v, mw = n["variants"], n["metaworld"]
    gsa, scratch = v["gsa"], v["no-pretrain"]
    end = "at the episode's end" if n["success_key"] == "eval_success" else "at any step"

    def result(entry):
        return f"return {entry['final_return']:.0f}" + (f", success {entry['final_success']:.2f}" if mw else "")

    frames = gsa["final_env_steps"] if gsa["final_env_steps"] == scratch["final_env_steps"] else \
        f"{gsa['final_env_steps']} (GSA) and {scratch['final_env_steps']} (scratch)"
    seeds = f"seed {gsa['seed']}" if gsa["seed"] == scratch["seed"] else f"seeds {gsa['seed']} and {scratch['seed']}"
    parts = [f"{n['task']}, 1 seed per variant ({seeds}), {frames} env frames, size {n['size']}."]
    parts.append(f"Final evaluation of the RL policy alone ({plural(n['eval_episodes'], 'episode')}"
                 + (f", success {end}" if mw else "") + f"): GSA {result(gsa)}; DreamerV3 from scratch "
                 f"{result(scratch)}"
                 + "".join(f"; {LABELS.get(k, k)} {result(e)}" for k, e in v.items() if k not in ("gsa", "no-pretrain"))
                 + ".")
    r = n["random"]
    parts.append("Random actions: unknown (no random-action warm-up episode in the runs' episodes.jsonl)." if r is None
                 else f"Random actions ({plural(r['episodes'], 'warm-up episode')} of the runs without guidance): "
                      f"return {r['return']:.0f}" + (f", success {r['success']:.2f}" if "success" in r else "") + ".")
    d = n["retrieved"]
    if d is not None:
        parts.append(f"Retrieved D_r (k={d['k']}): {d['episodes']} episodes, {counts_text(d['by_embodiment'])}"
                     + (f"; by source task {counts_text(d['by_source_task'])}" if mw else "")
                     + (" (mixed embodiments)" if d["mixed_embodiments"] else "") + ".")
    w = n["prior_warmup"]
    if w is not None:
        reached = f" and reached the goal (success at any step) in {100 * w['success_any']:.0f}% of them" if mw else ""
        parts.append(f"GSA's prior, cloned from D_r, drove its {plural(w['episodes'], 'warm-up episode')} to a "
                     f"return of {w['return']:.0f} on average{reached}.")
    parts.append(f"After the warm-up, {n['guided_episodes']} of GSA's {n['rl_episodes']} training episodes had a "
                 f"prior window (guidance schedule '{n['guidance_schedule']}').")
    parts.append(f"Mean return of all training episodes: GSA {gsa['train_return_mean']:.0f} ({gsa['train_episodes']} "
                 f"episodes), scratch {scratch['train_return_mean']:.0f} ({scratch['train_episodes']}).")
    p = n["paper_150k"]
    if p is not None:
        digits = 2 if mw else 0
        parts.append(f"Paper at 150k frames: GSA {'success' if mw else 'return'} {p['gsa']:.{digits}f}, DreamerV3 "
                     f"{p['no-pretrain']:.{digits}f}.")
    parts.append("One seed per variant: not a significance test; single evaluations swing widely.")
    return " ".join(parts)


def plot_summary(task: str, chosen: dict, episodes: dict, pictures: dict, openloop: Optional[dict], numbers: dict,
                 caption: str, args: Args) -> bytes:
    """PNG bytes of the summary page: (a) what was retrieved, (b) every training episode's return, (c) the
    evaluations, (d) the pre-trained model's open-loop prediction, and the caption."""
    import textwrap

    plt = pyplot()
    mw = is_metaworld(task)
    fig = plt.figure(figsize=(15, 12))
    outer = fig.add_gridspec(3, 2, height_ratios=[0.85, 1.5, 0.36], width_ratios=[1.25, 1.0], hspace=0.28,
                             wspace=0.2, left=0.05, right=0.97, top=0.9, bottom=0.02)
    fig.suptitle(f"GSA on {task}: what it retrieved, how the prior guided it, and how it compares with learning "
                 f"from scratch (1 seed)", fontsize=13, y=0.985)

    # (a) the task's reset frames and the first frames of the retrieved episodes
    top_left = outer[0, 0].subgridspec(1, 2, width_ratios=[1, 8], wspace=0.04)
    ax_q, ax_r = fig.add_subplot(top_left[0]), fig.add_subplot(top_left[1])
    for ax in (ax_q, ax_r):
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
    if pictures["queries"]:
        ax_q.imshow(frame_grid(pictures["queries"], [(40, 80, 230)] * len(pictures["queries"]), cols=1))
    ax_q.set_title("task resets", fontsize=9)
    d = numbers["retrieved"]
    if pictures["retrieved"]:
        colours = [(40, 170, 40) if same else (220, 40, 40) for same in pictures["same_embodiment"]]
        ax_r.imshow(frame_grid(pictures["retrieved"], colours, cols=8))
    ax_r.set_title("(a) retrieved episodes' first frames, nearest first (green: the task's embodiment, red: other)"
                   if d else "(a) no retrieval (retrieval.json missing)", fontsize=9, loc="left")
    note = ("D_r: k=" + f"{d['k']}, {d['episodes']} episodes: {counts_text(d['by_embodiment'])}"
            + (f"\nsource tasks: {counts_text(d['by_source_task'])}" if mw else "")) if d else ""
    note += "".join(f"\n{x}" for x in pictures["notes"])
    ax_r.set_xlabel(note.strip(), fontsize=9, loc="left")

    # (d) open-loop prediction of the pre-trained world model
    ax_o = fig.add_subplot(outer[0, 1])
    ax_o.set_xticks([])
    ax_o.set_yticks([])
    if openloop is not None:
        strip = np.concatenate([frame_grid(list(openloop["truth"]), [(255, 255, 255)] * len(openloop["times"]),
                                           cols=len(openloop["times"])),
                                frame_grid(list(openloop["model"]), [(255, 255, 255)] * len(openloop["times"]),
                                           cols=len(openloop["times"]))])
        ax_o.imshow(strip)
        tile = strip.shape[0] // 2
        ax_o.set_xticks([(i + 0.5) * tile for i in range(len(openloop["times"]))])
        ax_o.set_xticklabels([f"t={t}" + (" (seen)" if t < 5 else "") for t in openloop["times"]], fontsize=8)
        ax_o.set_yticks([tile / 2, 1.5 * tile])
        ax_o.set_yticklabels(["truth", "model"], fontsize=9)
        minutes = "" if openloop["minutes"] is None else f", {openloop['minutes']:.0f} min"
        copy = "" if openloop["copy_mse"] is None else f" vs {openloop['copy_mse']:.4f} repeating frame 4"
        ax_o.set_title(f"(d) the pre-trained world model ({openloop['step']} steps{minutes}) on a held-out "
                       f"{openloop['embodiment']} clip:\nframes 0-4 observed, the rest imagined from the actions\n"
                       f"open-loop MSE {openloop['model_mse']:.4f}{copy}", fontsize=9, loc="left")
    else:
        ax_o.set_title("(d) no open-loop video of the pre-trained world model found", fontsize=9, loc="left")

    # (b) every training episode's return over env frames
    ax_b = fig.add_subplot(outer[1, 0])
    rand = numbers["random"]
    for variant, eps in episodes.items():
        colour = variant_colour(variant)
        x = np.array([e["env_steps"] for e in eps], float)
        y = np.array([e["return"] for e in eps], float)
        kinds = {"warm-up, prior drives it all": [e["warmup"] and e["prior_steps"] > 0 for e in eps],
                 "warm-up, random actions": [e["warmup"] and e["prior_steps"] == 0 for e in eps],
                 "prior window (guidance)": [not e["warmup"] and e["prior_steps"] > 0 for e in eps],
                 "RL policy only": [not e["warmup"] and e["prior_steps"] == 0 for e in eps]}
        style = {"warm-up, prior drives it all": dict(marker="^", s=34),
                 "warm-up, random actions": dict(marker="x", s=28),
                 "prior window (guidance)": dict(marker="o", s=34, facecolors="none"),
                 "RL policy only": dict(marker="o", s=14)}
        for kind, mask in kinds.items():
            mask = np.array(mask, bool)
            if mask.any():
                st = dict(style[kind])
                colours = {"color": colour} if st["marker"] == "x" else {  # 'x' has no face: one colour
                    "edgecolors": colour, "facecolors": st.pop("facecolors", colour)}
                ax_b.scatter(x[mask], y[mask], linewidths=1.1, alpha=0.85,
                             label=f"{LABELS.get(variant, variant)}: {kind} ({int(mask.sum())})", **colours, **st)
        window = min(5, len(y))
        smooth = np.convolve(y, np.ones(window) / window, mode="valid")
        ax_b.plot(x[window - 1:], smooth, color=colour, linewidth=1.6, alpha=0.9)
    if rand is not None:
        ax_b.axhline(rand["return"], color="tab:grey", linestyle="-.", linewidth=1,
                     label=f"random actions: mean return ({rand['episodes']} episodes)")
    low, high = ax_b.get_ylim()
    ax_b.set_ylim(min(0.0, low), high + 0.3 * (high - min(0.0, low)))  # headroom for the legend
    ax_b.set_xlim(left=0)
    ax_b.set_xlabel("env frames")
    ax_b.set_ylabel("training episode return")
    ax_b.set_title("(b) every training episode (lines: mean of the last 5); guidance p on the right axis",
                   fontsize=10, loc="left")
    ax_p = ax_b.twinx()
    gsa_eps = episodes["gsa"]
    ax_p.step([e["env_steps"] for e in gsa_eps], [e["guidance_p"] for e in gsa_eps], where="pre",
              color=variant_colour("gsa"), linestyle=":", linewidth=1, alpha=0.7)
    ax_p.set_ylim(0, 3.0)  # p in [0, 1] on the lowest third, out of the returns' way
    ax_p.set_yticks([0, 0.5, 1])
    ax_p.set_ylabel("GSA guidance p", fontsize=8, loc="bottom")
    ax_b.grid(alpha=0.3)
    ax_b.legend(fontsize=7, loc="upper right", ncol=2)

    # (c) evaluations of the RL policy alone: return, and on Meta-World success
    right = outer[1, 1].subgridspec(2 if mw else 1, 1, hspace=0.3)
    axes = [fig.add_subplot(right[i]) for i in range(2 if mw else 1)]
    success_label = f"success ({'end' if args.success_key == 'eval_success' else 'any step'})"
    measures = [("eval_return", "eval return", "return")] + ([("value", success_label, "success")] if mw else [])
    for ax, (key, ylabel, level_key) in zip(axes, measures):
        for variant, run in chosen.items():
            ax.plot(run["steps"], run[key], marker="o", color=variant_colour(variant), linewidth=1.6,
                    label=f"{LABELS.get(variant, variant)} (1 seed)")
        if rand is not None and level_key in rand:
            ax.axhline(rand[level_key], color="tab:grey", linestyle="-.", linewidth=1, label="random actions")
        paper = numbers["paper_150k"]
        if paper is not None and level_key == ("success" if mw else "return"):
            ax.axhline(paper["gsa"], color="black", linestyle="--", linewidth=1, label="paper GSA @150k frames")
            ax.axhline(paper["no-pretrain"], color="grey", linestyle=":", linewidth=1,
                       label="paper DreamerV3 @150k frames")
        if level_key == "success":
            ax.set_ylim(0, 1.05)
        else:
            ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
        ax.set_xlim(left=0)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_title(f"(c) evaluations of the RL policy, no prior ({plural(numbers['eval_episodes'], 'episode')} "
                      f"each)",
                      fontsize=10, loc="left")
    axes[-1].set_xlabel("env frames")

    ax_t = fig.add_subplot(outer[2, :])
    ax_t.axis("off")
    ax_t.text(0, 1, "\n".join(textwrap.wrap(caption, 190)), va="top", ha="left", fontsize=9.5, family="serif",
              transform=ax_t.transAxes)
    return png_bytes(fig)


def make_summary(runs: list, groups: dict, args: Args) -> tuple:
    """(task, PNG bytes, numbers, caption) of the summary page; everything is read before anything is written."""
    task, chosen = summary_runs(runs, groups)
    episodes = {v: read_episodes(chosen[v]) for v in ("gsa", "no-pretrain")}
    retrieved = read_retrieval(chosen["gsa"])
    pictures = retrieval_frames(task, chosen["gsa"], retrieved)
    openloop = read_openloop(task, chosen["gsa"])
    numbers = summary_numbers(task, chosen, episodes, retrieved, openloop, args)
    caption = summary_caption(numbers)
    png = plot_summary(task, chosen, episodes, pictures, openloop, numbers, caption, args)
    return task, png, numbers, caption


def main(args: Args) -> None:
    if args.last_n < 1 or args.bootstrap < 1 or args.grid_points < 2:
        fail("--last-n and --bootstrap must be >= 1, --grid-points >= 2")
    runs = [read_run(r, args) for r in find_runs(args.runs)]
    if args.common_budget:  # every run's evaluations up to the budget all of them reached
        budget = int(min(r["steps"][-1] for r in runs))
        if args.max_env_steps is None or budget < args.max_env_steps:
            args = replace(args, max_env_steps=budget)
            runs = [read_run(Path(r["dir"]), args) for r in runs]
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
             + (f" at or before {args.max_env_steps} env steps" if args.max_env_steps else "")
             + (" (--common-budget: the smallest final evaluation among the runs)" if args.common_budget else "")
             + ".", ""]
    for task in tasks:  # scores of runs stopped at different budgets do not compare
        ends = sorted({int(r["steps"][-1]) for r in runs if r["task"] == task})
        if len(ends) > 1:
            lines += [f"**Warning: the runs of {task} end at different budgets ({ends[0]} to {ends[-1]} env frames), "
                      "so its scores, aggregates and differences below compare unequal budgets; --common-budget "
                      "compares them at one.**", ""]
    lines += ["## Per task: mean score over seeds (seeds)", ""]
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
    notes, evidence = [], {}  # notes: what the evidence figures had to leave out
    for task in tasks:
        task_figures, evidence[task] = task_evidence(
            task, {v: groups[v][task] for v in variants if task in groups[v]}, args, notes)
        figures.update(task_figures)
    figures["performance-profile.png"] = plot_performance_profiles(taus, profiles)
    if poi:
        figures["probability-of-improvement.png"] = plot_probability_of_improvement(poi)
    summary = None
    if args.summary:
        summary_task, figures["summary.png"], summary_numbers_, caption = make_summary(runs, groups, args)
        summary = {"task": summary_task, "caption": caption, "numbers": summary_numbers_}

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
    lines += ["", "## Per task: every seed", "",
              "Final: the last evaluation" + (f" at or before {args.max_env_steps} env steps" if args.max_env_steps
                                              else "") + "; best: the highest evaluation (optimistic: the best of "
              "noisy evaluations).", ""]
    for task in tasks:
        lines += per_seed_lines(task, evidence[task]["per_seed"], args.success_key)
    lines += difference_lines({task: evidence[task]["gsa_minus"] for task in tasks})
    strips = any(name.startswith("filmstrip-") for name in figures)
    lines += ["Figures: `curves-<task>.png` (learning curves), `diagnostics-<task>.png` (the actor's entropy, imagined "
              "against real reward, the critic's value against the discounted return earned), "
              + ("`filmstrip-<task>.png` (one GSA evaluation episode), " if strips else "")
              + "`performance-profile.png` (fraction of runs above each normalised score)"
              + (", `probability-of-improvement.png`" if poi else "") + "."]
    if notes:
        lines += ["", "Left out of the figures:"] + [f"- {note}" for note in notes]
    if summary is not None:
        lines += ["", f"## Summary (`summary.png`, {summary['task']})", "", summary["caption"]]
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
                        "score": r["score"], "final_env_steps": float(r["steps"][-1])} for r in runs],
              "per_task": evidence, "notes": notes,
              **({"summary": summary} if summary is not None else {})}
    write_bytes_atomic(out / "scores.json", (json.dumps(scores, indent=1) + "\n").encode())
    print(report)
    print(f"wrote {out / 'report.md'}, {out / 'scores.json'} and {len(figures)} figures ({', '.join(figures)})")


if __name__ == "__main__":
    main(tyro.cli(Args))
