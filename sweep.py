"""Sweep launcher: fine-tune every task x variant x seed with finetune_gsa.py, then report.py over them all.

The runs go to N local worker processes, or to SLURM as one job array through submitit. Running the same sweep
again skips the runs that finished and continues the others with --resume, so it is also how an interrupted
sweep goes on, and how a sweep submitted with --no-wait gets its report.

Variants (run directories are named with finetune_gsa.py's variant names, which report.py groups by):
  gsa           the method: pre-trained world model, experience rehearsal and execution guidance
  scratch       --no-pretrain: DreamerV3 from scratch                                 (runs named no-pretrain)
  naive         --no-rehearsal --no-guidance: pre-trained model, naive fine-tuning    (runs named pretrain-only)
  no-rehearsal, no-guidance, jsrl (--guidance jsrl): the ablations

A run is finished when its metrics.jsonl holds an evaluation at or beyond --env-steps env frames:
finetune_gsa.py evaluates once more when it reaches its budget, and only at its end or every --eval-every
frames. A run directory that exists and is not finished is continued with --resume (finetune_gsa.py restores
its ckpt.pt, or starts afresh in the directory if none was saved yet). A run whose args.json was made with
other settings than the sweep's (other than those --resume may change) stops the sweep before it starts.

Reads:  <out-dir>/runs/*/ (args.json, metrics.jsonl: what is finished, what to resume); checks that --checkpoint,
        --index-dir and --data-dir exist for the variants that read them.
Writes: <out-dir>/runs/<task>-<variant>-s<seed>/ (finetune_gsa.py's run directories), <out-dir>/logs/<run>.log
        (each run's output, appended), <out-dir>/sweep.json (this sweep's arguments and commands),
        <out-dir>/report/ (report.py over every finished run of the sweep), <out-dir>/submitit/ (job files).

Example:
    python sweep.py --tasks walker-walk mw-drawer-open --variants gsa scratch naive --seeds 0 1 2 \\
        --size xs --env-steps 50000 --workers 2 --finetune-args="--eval-every 5000"
    python sweep.py ... --launcher slurm --slurm-partition gpu --slurm-gpus 1 --threads 8 --no-wait
    python sweep.py ... --dry-run          # print what would run, write nothing
"""
import contextlib
import dataclasses
import fcntl
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import tyro

SCRIPT = "sweep.py"
ROOT = Path(__file__).resolve().parent


@dataclass
class Args:
    out_dir: str = "runs/sweep"
    """sweep root: runs/<task>-<variant>-s<seed>/, logs/, report/, sweep.json"""
    tasks: tuple[str, ...] = ("walker-walk",)
    """finetune_gsa.py tasks (DMControl domain-task, Meta-World mw-<name>, stock dm_control tasks)"""
    variants: tuple[str, ...] = ("gsa", "scratch", "naive")
    """gsa, scratch (--no-pretrain), naive (--no-rehearsal --no-guidance), no-rehearsal, no-guidance, jsrl"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """seeds, each run for every task and variant"""
    checkpoint: str = "runs/pretrain/wm.pt"
    """pretrain_wm.py checkpoint (finetune_gsa.py --checkpoint; not read by scratch)"""
    index_dir: str = "runs/index"
    """retrieval.py index (finetune_gsa.py --index-dir; read by the variants with rehearsal or guidance)"""
    data_dir: str = "data/offline"
    """offline data (finetune_gsa.py --data-dir; read by the variants with rehearsal or guidance)"""
    size: Optional[Literal["tiny", "xs", "s", "paper"]] = None
    """finetune_gsa.py --size (default: the checkpoint's own; xs from scratch)"""
    env_steps: int = 150_000
    """env frames per run (finetune_gsa.py --env-steps); a finished run is one evaluated at this budget"""
    finetune_args: str = ""
    """more finetune_gsa.py flags for every run, one string, e.g. --finetune-args="--eval-every 5000 --k 20"
    (not the flags sweep.py sets itself)"""
    threads: int = 1
    """torch threads of each run (finetune_gsa.py --threads, OMP_NUM_THREADS, MKL_NUM_THREADS; SLURM
    --cpus-per-task)"""
    launcher: Literal["local", "slurm", "submitit-local"] = "local"
    """local: --workers processes on this machine; slurm: one SLURM job array through submitit; submitit-local:
    the slurm path through submitit's LocalExecutor, every run at once on this machine (a check without a
    cluster)"""
    workers: int = 1
    """local: runs at a time; slurm: most array jobs running at once"""
    slurm_partition: Optional[str] = None
    """SLURM partition (default: the cluster's)"""
    slurm_time_min: int = 24 * 60
    """time limit of each job in minutes; a run it cuts short resumes when the sweep is run again"""
    slurm_gpus: int = 0
    """GPUs per job (finetune_gsa.py uses CUDA when it sees one)"""
    slurm_mem_gb: Optional[int] = None
    """memory per job in GB (default: the cluster's)"""
    wait: bool = True
    """wait for the runs, then write the report; --no-wait (slurm only): submit and exit, and run the same
    command again once the jobs have ended to write the report (not while they run: it would start them twice)"""
    report_args: str = ""
    """more report.py flags, one string, e.g. --report-args="--paper-reference" (not --runs, --out-dir)"""
    dry_run: bool = False
    """print each run's state and command and the report's command; write nothing"""


ARG_RANGES = {"seeds": (0, 10**9), "env_steps": (1, None), "threads": (1, None), "workers": (1, None),
              "slurm_time_min": (1, None), "slurm_gpus": (0, None), "slurm_mem_gb": (1, None)}

# Each variant's finetune_gsa.py flags.
VARIANTS = {
    "gsa": (),
    "scratch": ("--no-pretrain",),
    "naive": ("--no-rehearsal", "--no-guidance"),
    "no-rehearsal": ("--no-rehearsal",),
    "no-guidance": ("--no-guidance",),
    "jsrl": ("--guidance", "jsrl"),
}
# finetune_gsa.py flags that the sweep sets, so --finetune-args may not.
OWN_FLAGS = ("--task", "--seed", "--out-dir", "--resume", "--checkpoint", "--index-dir", "--data-dir", "--size",
             "--env-steps", "--threads", "--no-pretrain", "--no-rehearsal", "--no-guidance", "--guidance")


def fail(message: str) -> None:
    raise SystemExit(f"{SCRIPT}: error: {message}")


@dataclass
class Run:
    name: str  # <task>-<variant>-s<seed>, finetune_gsa.py's default run-dir name
    dir: Path
    log: Path
    command: list  # without --resume: run_logged adds it when the run directory holds files
    state: str  # "new", "resume" or "finished"


# ----------------------------------------------------------------------------------------------------------
# Planning: validate everything, build the commands, find what is finished
# ----------------------------------------------------------------------------------------------------------

def check_args(args: Args) -> None:
    """Counts, names and ranges of the sweep's own flags."""
    for name in ("tasks", "variants", "seeds"):
        values = getattr(args, name)
        if not values:
            fail(f"--{name} is empty")
        if len(set(values)) != len(values):
            fail(f"--{name} repeats a value: {' '.join(map(str, values))}")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        fail(f"unknown variant(s) {', '.join(unknown)}; valid variants: {', '.join(VARIANTS)}")
    for name, (low, high) in ARG_RANGES.items():
        value = getattr(args, name)
        for x in value if isinstance(value, tuple) else (value,):
            if x is not None and (x < low or (high is not None and x > high)):
                fail(f"--{name.replace('_', '-')} must be {f'in [{low}, {high}]' if high else f'>= {low}'}, got {x}")
    if not args.wait and args.launcher != "slurm":
        fail("--no-wait needs --launcher slurm (other runs end with the sweep)")
    if args.launcher != "local":
        try:
            import submitit  # noqa: F401
        except ImportError:
            fail(f"--launcher {args.launcher} needs submitit: pip install submitit")
    if args.launcher == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        fail("--launcher slurm: no sbatch or srun here, so this is not a SLURM login node (--launcher "
             "submitit-local runs the same jobs on this machine)")


def split_flags(value: str, name: str, forbidden: tuple) -> list:
    try:
        tokens = shlex.split(value)
    except ValueError as e:
        fail(f"--{name} {value!r} cannot be split into flags: {e}")
    for token in tokens:
        flag = token.split("=", 1)[0].replace("_", "-")
        if flag in forbidden:
            fail(f"--{name} may not hold {flag}: sweep.py sets it itself (see sweep.py --help)")
    return tokens


def parse_quietly(cls, argv: list, what: str):
    """tyro's parse of argv into cls; its boxed error message becomes one sweep.py error line about `what`."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
            return tyro.cli(cls, args=argv)
    except SystemExit:
        lines = [line.strip(" │╭╮╰╯") for line in buf.getvalue().splitlines()]
        lines = [line for line in lines if line.strip("-─ ") and "--help" not in line]
        fail(f"{what}: {'; '.join(dict.fromkeys(lines))}")


def run_setup(args: Args) -> tuple:
    """(finetune flags shared by every run, report.py flags), both checked by the scripts' own parsers."""
    import finetune_gsa
    import report

    unknown = [t for t in args.tasks if t not in finetune_gsa.TASK_NAMES]
    if unknown:
        fail(f"unknown task(s) {', '.join(unknown)}; valid tasks: {', '.join(finetune_gsa.TASK_NAMES)}")
    extra = split_flags(args.finetune_args, "finetune-args", OWN_FLAGS)
    common = ["--checkpoint", args.checkpoint, "--index-dir", args.index_dir, "--data-dir", args.data_dir,
              "--env-steps", str(args.env_steps), "--threads", str(args.threads),
              *(["--size", args.size] if args.size else []), *extra]
    report_extra = split_flags(args.report_args, "report-args", ("--runs", "--out-dir", "--out"))
    parse_quietly(report.Args, ["--runs", ".", "--out-dir", ".", *report_extra],
                  f"report.py refuses --report-args {args.report_args!r}")
    return common, report_extra


def last_evaluation(run_dir: Path) -> float:
    """Env frames of the run's last evaluation in metrics.jsonl (-1: none); a torn line is skipped."""
    last = -1.0
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            steps = record.get("env_steps") if isinstance(record, dict) and "eval_return" in record else None
            if isinstance(steps, (int, float)):
                last = max(last, float(steps))
    return last


def plan(args: Args, common: list) -> list:
    """Every run of the sweep with its command and state; refuses run dirs made with other settings."""
    import finetune_gsa

    runs_dir, logs_dir = Path(args.out_dir) / "runs", Path(args.out_dir) / "logs"
    script = os.path.relpath(ROOT / "finetune_gsa.py")
    script = script if not script.startswith("..") else str(ROOT / "finetune_gsa.py")
    # finetune_gsa.py's own parser and range checks on each variant's flags (the task and seed are checked above)
    parsed_variants = {}
    for variant in args.variants:
        parsed_variants[variant] = parse_quietly(finetune_gsa.Args, [*VARIANTS[variant], *common],
                                                 f"finetune_gsa.py refuses --finetune-args {args.finetune_args!r}")
        try:
            finetune_gsa.check_ranges(parsed_variants[variant])
        except SystemExit as e:
            fail(f"--finetune-args: {e}")
    runs, mismatched = [], []
    # Seed-major order: every variant's seed 0 runs before any seed 1, so a sweep stopped part-way (or read while
    # it runs) already holds like-for-like comparisons rather than all seeds of the first variant.
    for task in args.tasks:
        for seed in args.seeds:
            for variant in args.variants:
                argv = ["--task", task, "--seed", str(seed), *VARIANTS[variant], *common]
                run_dir = runs_dir / f"{task}-{finetune_gsa.variant_name(parsed_variants[variant])}-s{seed}"
                parsed = dataclasses.replace(parsed_variants[variant], task=task, seed=seed, out_dir=str(run_dir))
                name = run_dir.name
                argv += ["--out-dir", str(run_dir)]
                state = "new"
                if run_dir.is_dir() and any(run_dir.iterdir()):
                    state = "finished" if last_evaluation(run_dir) >= args.env_steps else "resume"
                    mismatched += differences(run_dir, parsed)
                runs.append(Run(name, run_dir, logs_dir / f"{name}.log", [sys.executable, script, *argv], state))
    if mismatched:
        fail("run directories made with other settings than this sweep's: " + "; ".join(mismatched)
             + ". Use another --out-dir, or the settings those runs were made with")
    check_inputs(args)
    return runs


def differences(run_dir: Path, parsed) -> list:
    """'<dir>: key (there, now)' for each setting of the run's args.json that --resume would refuse."""
    path = run_dir / "args.json"
    if not path.is_file():
        return []  # the run stopped before writing it; finetune_gsa.py starts it afresh
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        fail(f"{path} is damaged ({e}); move the run directory away to start it again")
    import finetune_gsa

    diff, _ = finetune_gsa.resume_differences(saved, parsed)  # the rule finetune_gsa.py --resume applies
    return [f"{run_dir}: {', '.join(diff)}"] if diff else []


def check_inputs(args: Args) -> None:
    """The upstream files exist for the variants that read them (finetune_gsa.py checks their contents)."""
    pretrained = [v for v in args.variants if v != "scratch"]
    retrieving = [v for v in args.variants if v not in ("scratch", "naive")]
    if pretrained and not Path(args.checkpoint).is_file():
        fail(f"--checkpoint {args.checkpoint} does not exist (needed by {', '.join(pretrained)}; "
             "run pretrain_wm.py, or sweep only --variants scratch)")
    if retrieving and not (Path(args.index_dir) / "index.faiss").is_file():
        fail(f"--index-dir {args.index_dir} holds no index.faiss (needed by {', '.join(retrieving)}; "
             "run retrieval.py build)")
    if retrieving and not (Path(args.data_dir) / "manifest.json").is_file():
        fail(f"--data-dir {args.data_dir} holds no manifest.json (needed by {', '.join(retrieving)})")


# ----------------------------------------------------------------------------------------------------------
# Launching
# ----------------------------------------------------------------------------------------------------------

def run_logged(command: list, run_dir: str, log: str, env: dict, cwd: str, on_start=None) -> int:
    """One run: its command, with --resume if its run directory holds files (decided when it starts, so that a
    requeued SLURM job resumes too), output appended to its log; -> exit status. on_start(process) -> False
    stops the process at once (the local launcher is shutting down)."""
    if Path(run_dir).is_dir() and any(Path(run_dir).iterdir()):
        command = [*command, "--resume"]
    with open(log, "a") as f:
        f.write(f"[sweep] {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
        f.flush()
        process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env={**os.environ, **env})
        if on_start is not None and not on_start(process):
            process.terminate()
        return process.wait()


def run_env(args: Args) -> dict:
    threads = str(args.threads)
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}


def launch_local(args: Args, todo: list) -> dict:
    """{run name: exit status} of the runs, --workers at a time. SIGINT or SIGTERM stops them all."""
    lock, stopping, processes, status = threading.Lock(), threading.Event(), {}, {}

    def start(name, process):
        with lock:
            processes[name] = process
            return not stopping.is_set()

    def one(run: Run) -> int:
        t0 = time.time()
        rc = run_logged(run.command, str(run.dir), str(run.log), run_env(args), os.getcwd(),
                        lambda p: start(run.name, p))
        with lock:
            processes.pop(run.name, None)
            status[run.name] = rc
            print(f"[sweep] {len(status)}/{len(todo)} {run.name}: "
                  + ("ended" if rc == 0 else f"failed (exit {rc}), see {run.log}")
                  + f" after {(time.time() - t0) / 60:.1f} min", flush=True)
        return rc

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    pool = ThreadPoolExecutor(max_workers=args.workers)
    try:
        for future in as_completed([pool.submit(one, run) for run in todo]):
            future.result()
    except KeyboardInterrupt:
        stopping.set()
        with lock:
            for process in processes.values():
                process.terminate()
        fail("interrupted: the runs were stopped; run the same command again to continue them")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        signal.signal(signal.SIGTERM, previous)
    return status


class RunJob:
    """A run as a submitit job. On a time-out or a pre-emption, submitit calls checkpoint() and requeues the
    job with what it returns: the same run, which then resumes from its last ckpt.pt (at most
    finetune_gsa.py's --checkpoint-every frames are redone)."""

    def __call__(self, command: list, run_dir: str, log: str, env: dict, cwd: str) -> int:
        return run_logged(command, run_dir, log, env, cwd)

    def checkpoint(self, *arguments):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *arguments)


def launch_submitit(args: Args, todo: list) -> Optional[dict]:
    """{run name: exit status} of the runs as one submitit job array (None with --no-wait)."""
    import submitit

    if __name__ != "__main__":  # imported: let the jobs unpickle RunJob without importing this module
        import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cluster = "slurm" if args.launcher == "slurm" else "local"
    executor = submitit.AutoExecutor(folder=Path(args.out_dir) / "submitit", cluster=cluster)
    executor.update_parameters(name="gsa-sweep", timeout_min=args.slurm_time_min, cpus_per_task=args.threads,
                               gpus_per_node=args.slurm_gpus, mem_gb=args.slurm_mem_gb,
                               slurm_partition=args.slurm_partition, slurm_array_parallelism=args.workers)
    n = len(todo)
    jobs = executor.map_array(RunJob(), [r.command for r in todo], [str(r.dir) for r in todo],
                              [str(r.log) for r in todo], [run_env(args)] * n, [os.getcwd()] * n)
    print(f"[sweep] submitted {n} job(s) to {cluster}: {', '.join(job.job_id for job in jobs)}", flush=True)
    if not args.wait:
        print("[sweep] once they have ended, run the same command again: finished runs are skipped, unfinished "
              "ones resumed, and the report written")
        return None
    status = {}
    for run, job in zip(todo, jobs):
        try:
            status[run.name] = job.result()
        except Exception as e:  # the job itself failed (killed, timed out, node lost): its run did not end
            status[run.name] = -1
            print(f"[sweep] {run.name}: job {job.job_id} failed: {str(e).splitlines()[0] if str(e) else e!r}")
        print(f"[sweep] {len(status)}/{n} {run.name}: "
              + ("ended" if status[run.name] == 0 else f"failed, see {run.log}"), flush=True)
    return status


@contextlib.contextmanager
def sweep_lock(out_dir: Path):
    """One sweep at a time in an out-dir: a second would start the same runs twice."""
    with open(out_dir / ".sweep.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fail(f"another sweep.py is running in {out_dir}; wait for it to end")
        yield


def report_command(args: Args, runs: list, report_extra: list) -> list:
    return [sys.executable, str(ROOT / "report.py"), "--runs", *(str(r.dir) for r in runs),
            "--out-dir", str(Path(args.out_dir) / "report"), *report_extra]


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def main(args: Args) -> None:
    check_args(args)
    common, report_extra = run_setup(args)
    runs = plan(args, common)
    out = Path(args.out_dir)
    todo = [r for r in runs if r.state != "finished"]
    counts = {s: sum(r.state == s for r in runs) for s in ("new", "resume", "finished")}
    print(f"[sweep] {len(runs)} runs ({len(args.tasks)} tasks x {len(args.variants)} variants x {len(args.seeds)} "
          f"seeds): {counts['new']} to start, {counts['resume']} to resume, {counts['finished']} finished (skipped)")
    if args.dry_run:
        for r in runs:
            print(f"  {r.state:8s} " + (str(r.dir) if r.state == "finished" else
                                          shlex.join(r.command + (["--resume"] if r.state == "resume" else []))))
        print(f"  report   {shlex.join(report_command(args, runs, report_extra))}  (over the runs that finish)")
        return

    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    with sweep_lock(out):
        write_json_atomic(out / "sweep.json", {"args": asdict(args), "runs": [
            {"name": r.name, "dir": str(r.dir), "state": r.state, "command": r.command} for r in runs]})
        status = {}
        if todo:
            status = launch_local(args, todo) if args.launcher == "local" else launch_submitit(args, todo)
            if status is None:
                return  # --no-wait
        finished = [r for r in runs if last_evaluation(r.dir) >= args.env_steps]
        unfinished = [r for r in runs if r not in finished]
        if finished:
            print(f"[sweep] report.py over {len(finished)} finished run(s) -> {out / 'report'}", flush=True)
            if subprocess.run(report_command(args, finished, report_extra)).returncode != 0:
                fail("report.py failed (its message is above)")
        if unfinished:
            fail(f"{len(unfinished)} run(s) did not finish: "
                 + ", ".join(f"{r.name} (exit {status.get(r.name, '?')}, log {r.log})" for r in unfinished)
                 + "; run the same command again to resume them")
        print(f"[sweep] all {len(runs)} runs finished")


if __name__ == "__main__":
    main(tyro.cli(Args))
