"""sweep.py: commands per variant, validation before anything is written, local runs that finish, are skipped
and resume, a failing run, SIGTERM, submitit's LocalExecutor, and the SLURM submission script (fake sbatch).
Also setup.sh's --gpu and --dry-run, the other half of launching runs on a GPU machine.

Every run is tiny (cartpole-balance, 20-step episodes, 80-120 env frames), so each takes seconds.
"""
import ast
import dataclasses
import inspect
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tyro

import finetune_gsa
import sweep
from test_finetune import make_artifacts

ROOT = Path(__file__).resolve().parents[1]
TINY = "--max-episode-steps 20 --no-video --k 5"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def sweep_args(out, **kw):
    return sweep.Args(**{**dict(out_dir=str(out), tasks=("cartpole-balance",), variants=("scratch",), seeds=(0,),
                                size="tiny", env_steps=80, finetune_args=TINY, report_args="--bootstrap 100"), **kw})


def cli(*argv, env=None, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "sweep.py"), *map(str, argv)], cwd=ROOT, env=env or ENV,
                          capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("upstream"))


def test_dry_run_prints_each_variants_command_and_writes_nothing(tmp_path, artifacts, capsys):
    out = tmp_path / "sweep"
    sweep.main(sweep_args(out, variants=("gsa", "scratch", "naive", "jsrl"), seeds=(0, 3), threads=2, dry_run=True,
                          **artifacts))
    text = capsys.readouterr().out
    assert not out.exists()
    assert "8 runs (1 tasks x 4 variants x 2 seeds): 8 to start, 0 to resume, 0 finished" in text
    commands = [shlex.split(line.split(None, 1)[1]) for line in text.splitlines() if line.startswith("  new ")]
    assert len(commands) == 8
    names = set()
    for command in commands:
        assert command[1].endswith("finetune_gsa.py") and "--resume" not in command
        assert command[command.index("--threads") + 1] == "2" and command[command.index("--size") + 1] == "tiny"
        parsed = tyro.cli(finetune_gsa.Args, args=command[2:])  # finetune_gsa.py accepts every command
        run_dir = Path(parsed.out_dir)
        assert run_dir.parent == out / "runs"
        assert run_dir.name == f"{parsed.task}-{finetune_gsa.variant_name(parsed)}-s{parsed.seed}"
        names.add(run_dir.name)
    assert names == {f"cartpole-balance-{v}-s{s}" for v in ("gsa", "no-pretrain", "pretrain-only", "jsrl")
                     for s in (0, 3)}
    # seed-major: the four variants' seed 0 come first, so a sweep stopped part-way holds comparable runs
    order = [c[c.index("--seed") + 1] for c in commands]
    assert order == ["0"] * 4 + ["3"] * 4
    flags = {shlex.join(c[c.index("--seed") + 2:c.index("--checkpoint")]) for c in commands}
    assert flags == {"", "--no-pretrain", "--no-rehearsal --no-guidance", "--guidance jsrl"}
    assert "report.py --runs" in text and "--bootstrap 100" in text


@pytest.mark.parametrize("change, message", [
    (dict(tasks=("walker-fly",)), "unknown task"),
    (dict(variants=("gsa", "dreamer")), "unknown variant"),
    (dict(tasks=()), "--tasks is empty"),
    (dict(seeds=(1, 1)), "--seeds repeats a value"),
    (dict(seeds=(-1,)), "--seeds must be in"),
    (dict(workers=0), "--workers must be >= 1"),
    (dict(env_steps=0), "--env-steps must be >= 1"),
    (dict(finetune_args="--seed 4"), "may not hold --seed"),
    (dict(finetune_args="--no-rehearsal"), "may not hold --no-rehearsal"),
    (dict(finetune_args="--kk 3"), "finetune_gsa.py refuses --finetune-args '--kk 3': Unrecognized options"),
    (dict(finetune_args="--eval-every 0"), "--eval-every must be >= 1"),
    (dict(finetune_args="--k '5"), "cannot be split"),
    (dict(report_args="--out x"), "may not hold --out"),
    (dict(report_args="--bootstrap many"), "report.py refuses --report-args"),
    (dict(wait=False), "--no-wait needs --launcher slurm"),
    (dict(launcher="slurm"), "no sbatch or srun here"),
    (dict(variants=("naive",), checkpoint="/nonexistent/wm.pt"), "--checkpoint /nonexistent/wm.pt does not exist"),
    (dict(variants=("gsa",), index_dir="/nonexistent"), "holds no index.faiss"),
])
def test_bad_inputs_give_a_clear_error_and_write_nothing(tmp_path, artifacts, change, message):
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit, match=message):
        sweep.main(sweep_args(out, **{**artifacts, **change}))
    assert not out.exists()


def test_bad_input_on_the_command_line_exits_non_zero(tmp_path):
    proc = cli("--out-dir", tmp_path / "sweep", "--tasks", "cartpole-balance", "--variants", "scratch", "bogus")
    assert proc.returncode != 0 and "sweep.py: error: unknown variant(s) bogus" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "sweep").exists()


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """Two tiny runs from scratch with two local workers, then the report."""
    out = tmp_path_factory.mktemp("local") / "sweep"
    args = sweep_args(out, seeds=(0, 1), workers=2)
    sweep.main(args)
    return args


def test_local_sweep_runs_every_run_and_reports(finished_sweep):
    out = Path(finished_sweep.out_dir)
    for seed in (0, 1):
        run = out / "runs" / f"cartpole-balance-no-pretrain-s{seed}"
        assert [m["env_steps"] for m in read_metrics(run)] == [80]
        assert json.loads((run / "args.json").read_text())["threads"] == 1
        log = (out / "logs" / f"{run.name}.log").read_text()
        assert log.startswith("[sweep] ") and "--resume" not in log and "[finetune] done: 80 frames" in log
    scores = json.loads((out / "report" / "scores.json").read_text())
    assert sorted((r["variant"], r["seed"]) for r in scores["runs"]) == [("no-pretrain", 0), ("no-pretrain", 1)]
    assert (out / "report" / "curves-cartpole-balance.png").is_file()
    record = json.loads((out / "sweep.json").read_text())
    assert [r["state"] for r in record["runs"]] == ["new", "new"] and record["args"]["workers"] == 2


def test_finished_runs_are_skipped(finished_sweep, capsys):
    out = Path(finished_sweep.out_dir)
    run = out / "runs" / "cartpole-balance-no-pretrain-s0"
    files = (run / "metrics.jsonl", run / "ckpt.pt", out / "logs" / f"{run.name}.log")
    before = {p: p.stat().st_mtime_ns for p in files}
    (out / "report" / "report.md").unlink()
    sweep.main(finished_sweep)
    assert "0 to start, 0 to resume, 2 finished (skipped)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing ran
    assert (out / "report" / "report.md").is_file()  # but the report is written again


def test_unfinished_run_resumes(finished_sweep, capsys):
    out = Path(finished_sweep.out_dir)
    sweep.main(sweep_args(out, seeds=(0,), env_steps=120))  # a bigger budget: seed 0 is no longer finished
    assert "0 to start, 1 to resume, 0 finished" in capsys.readouterr().out
    run = out / "runs" / "cartpole-balance-no-pretrain-s0"
    assert [m["env_steps"] for m in read_metrics(run)] == [80, 120]
    last_command = [line for line in (out / "logs" / f"{run.name}.log").read_text().splitlines()
                    if line.startswith("[sweep] ")][-1]
    assert last_command.endswith("--resume") and "--env-steps 120" in last_command


def test_run_dir_made_with_other_settings_is_refused(finished_sweep):
    out = Path(finished_sweep.out_dir)
    before = (out / "sweep.json").read_bytes()
    with pytest.raises(SystemExit, match=r"made with other settings.*entropy_scale \(0.0001 there, 0.0003 now\)"):
        sweep.main(sweep_args(out, seeds=(0, 1), finetune_args=TINY + " --entropy-scale 3e-4"))
    assert (out / "sweep.json").read_bytes() == before


def test_sweep_applies_finetunes_resume_rule(tmp_path):
    """sweep.py refuses a run dir exactly when finetune_gsa.py --resume would: one rule, resume_differences."""
    now = finetune_gsa.Args(task="cartpole-balance", no_pretrain=True, out_dir=str(tmp_path))
    old = {**dataclasses.asdict(now), "critic_lr": 8e-5, "env_steps": 1}  # an older run: a fixed default, fewer frames
    (tmp_path / "args.json").write_text(json.dumps(old))
    assert sweep.differences(tmp_path, now) == [] == finetune_gsa.resume_differences(old, now)[0]
    other = {**old, "entropy_scale": 3e-4}
    (tmp_path / "args.json").write_text(json.dumps(other))
    diff = finetune_gsa.resume_differences(other, now)[0]
    assert diff == ["entropy_scale (0.0003 there, 0.0001 now)"] and sweep.differences(tmp_path, now) == [
        f"{tmp_path}: {diff[0]}"]
    # A run from a version without a flag (--packnet and its two knobs came later) resumes as if it had the
    # default; the flag given with another value is a difference.
    older = {k: v for k, v in old.items() if not k.startswith("packnet")}
    assert finetune_gsa.resume_differences(older, now)[0] == []
    packnet = dataclasses.replace(now, packnet=True)
    assert finetune_gsa.resume_differences(older, packnet)[0] == ["packnet (False there, True now)"]


def test_a_failed_run_is_named_and_the_others_are_reported(tmp_path, artifacts):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")  # exists, so the sweep starts; finetune_gsa.py refuses it
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit, match=r"1 run\(s\) did not finish: cartpole-balance-pretrain-only-s0 \(exit 1"):
        sweep.main(sweep_args(out, variants=("scratch", "naive"), workers=2, checkpoint=str(broken)))
    assert "damaged" in (out / "logs" / "cartpole-balance-pretrain-only-s0.log").read_text()
    scores = json.loads((out / "report" / "scores.json").read_text())
    assert [r["variant"] for r in scores["runs"]] == ["no-pretrain"]


def test_sigterm_stops_the_runs(tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), "--out-dir", str(out), "--tasks",
                             "cartpole-balance", "--variants", "scratch", "--size", "tiny", "--env-steps", "100000",
                             f"--finetune-args={TINY}"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = out / "logs" / "cartpole-balance-no-pretrain-s0.log"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and "[finetune] " not in (
            log.read_text() if log.exists() else ""):
        time.sleep(0.5)
    if proc.poll() is not None or not log.exists():
        proc.kill()
        pytest.fail(f"the run did not start: {proc.communicate()}")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "interrupted: the runs were stopped" in stderr
    running = [pid for pid in processes_mentioning(out) if pid != os.getpid()]
    for pid in running:  # clean up before failing: these are the runs this test started
        os.kill(pid, signal.SIGKILL)
    assert not running, "a run outlived its sweep"


def processes_mentioning(path: Path) -> list:
    """Ids of the processes whose command line holds `path` (Linux /proc; none elsewhere)."""
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if str(path).encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:  # ended meanwhile
            continue
    return pids


def test_submitit_local_executor_runs_the_slurm_path(tmp_path, artifacts):
    pytest.importorskip("submitit")
    out = tmp_path / "sweep"
    proc = cli("--out-dir", out, "--tasks", "cartpole-balance", "--variants", "gsa", "--seeds", "0", "--size", "tiny",
               "--env-steps", 80, f"--finetune-args={TINY}", "--report-args=--bootstrap 100",
               "--launcher", "submitit-local", "--checkpoint", artifacts["checkpoint"],
               "--index-dir", artifacts["index_dir"], "--data-dir", artifacts["data_dir"], timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "submitted 1 job(s) to local" in proc.stdout and "all 1 runs finished" in proc.stdout
    run = out / "runs" / "cartpole-balance-gsa-s0"
    assert [m["env_steps"] for m in read_metrics(run)] == [80] and (run / "retrieval.json").is_file()
    assert any((out / "submitit").glob("*_result.pkl"))
    assert json.loads((out / "report" / "scores.json").read_text())["runs"][0]["variant"] == "gsa"


def test_slurm_submission_script(tmp_path):
    """A fake sbatch and srun on PATH: the job array sweep.py submits, with --no-wait."""
    pytest.importorskip("submitit")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/script.sh\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    out = tmp_path / "sweep"
    proc = cli("--out-dir", out, "--tasks", "cartpole-balance", "--variants", "scratch", "--seeds", 0, 1, 2,
               "--size", "tiny", "--launcher", "slurm", "--no-wait", "--slurm-partition", "gpu", "--slurm-gpus", 1,
               "--threads", 4, "--workers", 2, "--slurm-time-min", 90, "--slurm-mem-gb", 16,
               env={**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr
    assert "submitted 3 job(s) to slurm: 4242_0, 4242_1, 4242_2" in proc.stdout
    script = (tmp_path / "script.sh").read_text()
    for line in ("--array=0-2%2", "--partition=gpu", "--gpus-per-node=1", "--cpus-per-task=4", "--time=90",
                 "--mem=16GB", "--job-name=gsa-sweep"):
        assert f"#SBATCH {line}\n" in script
    assert not (out / "report").exists()  # --no-wait: the report comes with the next run of the command


def test_every_flag_is_used():
    tree = ast.parse(inspect.getsource(sweep))
    used = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "args"}
    unused = [f.name for f in sweep.dataclasses.fields(sweep.Args) if f.name not in used]
    assert not unused, f"Args fields never read: {unused}"


def test_requeued_job_is_the_same_run():
    submitit = pytest.importorskip("submitit")
    job = sweep.RunJob()
    arguments = (["python", "finetune_gsa.py", "--task", "walker-walk"], "runs/x", "runs/x.log", {}, ".")
    delayed = job.checkpoint(*arguments)
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert delayed.function is job and delayed.args == arguments


def test_run_logged_resumes_a_run_dir_that_holds_files(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    command = [sys.executable, "-c", "import sys; print(sys.argv[1:])", "--task", "x"]
    assert sweep.run_logged(command, str(run_dir), str(log), {}, str(tmp_path)) == 0
    run_dir.mkdir()
    assert sweep.run_logged(command, str(run_dir), str(log), {}, str(tmp_path)) == 0  # empty: still new
    (run_dir / "args.json").write_text("{}")
    assert sweep.run_logged(command + ["--fail"], str(run_dir), str(log), {"X": "1"}, str(tmp_path)) == 0
    printed = [line for line in log.read_text().splitlines() if not line.startswith("[sweep] ")]
    assert printed == ["['--task', 'x']", "['--task', 'x']", "['--task', 'x', '--fail', '--resume']"]


# ---------------------------------------------------------------------------------------------------------
# setup.sh --gpu: how a launch machine gets the CUDA build (tested here: argument handling and the commands,
# through --dry-run, in a copy of the script; the CUDA install itself has not been run)
# ---------------------------------------------------------------------------------------------------------

def setup_dry_run(tmp_path, *argv, torch_pin="torch==9.8.7", libopengl=True):
    """Run a copy of setup.sh (beside a requirements.txt pinning `torch_pin`) with a fake ldconfig that does
    or does not list libOpenGL; -> (process, the copy's directory)."""
    checkout, fake_bin = tmp_path / "checkout", tmp_path / "bin"
    checkout.mkdir()
    fake_bin.mkdir()
    shutil.copy(ROOT / "setup.sh", checkout)
    requirements = re.sub(r"^torch==.*$", torch_pin, (ROOT / "requirements.txt").read_text(), flags=re.M)
    (checkout / "requirements.txt").write_text(requirements)
    listing = "echo '\tlibOpenGL.so.0 (libc6,x86-64)'\n" if libopengl else ""
    (fake_bin / "ldconfig").write_text("#!/bin/sh\n" + listing)
    (fake_bin / "ldconfig").chmod(0o755)
    proc = subprocess.run(["bash", str(checkout / "setup.sh"), *argv], capture_output=True, text=True, timeout=60,
                          env={**ENV, "PATH": f"{fake_bin}:{os.environ['PATH']}"})
    return proc, checkout


PIP_LINE = "+ .venv/bin/python -m pip install -q --disable-pip-version-check"


def test_setup_default_is_the_plain_install(tmp_path):
    proc, checkout = setup_dry_run(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["+ python3 -m venv .venv", f"{PIP_LINE} -r requirements.txt"]
    assert sorted(p.name for p in checkout.iterdir()) == ["requirements.txt", "setup.sh"]  # nothing ran


@pytest.mark.parametrize("argv, cuda", [(["--gpu"], "cu130"), (["--gpu", "--cuda", "cu126"], "cu126"),
                                        (["--cuda=cu128", "--gpu"], "cu128")])
def test_setup_gpu_installs_the_pinned_torch_from_the_cuda_index(tmp_path, argv, cuda):
    proc, checkout = setup_dry_run(tmp_path, "--dry-run", *argv)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "+ python3 -m venv .venv",
        f"{PIP_LINE} torch==9.8.7+{cuda} --index-url https://download.pytorch.org/whl/{cuda}",  # requirements' pin
        f"{PIP_LINE} -r requirements.txt"]
    assert not (checkout / ".venv").exists()


@pytest.mark.parametrize("argv, torch_pin, message", [
    (["--cuda", "cu128"], "torch==2.13.0", "--cuda goes with --gpu"),
    (["--gpu", "--cuda", "12.8"], "torch==2.13.0", "--cuda must name one of PyTorch's CUDA wheel indexes"),
    (["--gpu", "--cuda"], "torch==2.13.0", "--cuda needs a value"),
    (["--cpu"], "torch==2.13.0", "unknown argument '--cpu'"),
    (["--gpu"], "torch>=2.13", "requirements.txt pins no torch==<version>"),
])
def test_setup_bad_arguments_exit_before_doing_anything(tmp_path, argv, torch_pin, message):
    proc, checkout = setup_dry_run(tmp_path, *argv, torch_pin=torch_pin)  # no --dry-run: it must stop first
    assert proc.returncode == 2 and f"setup.sh: error: {message}" in proc.stderr and proc.stdout == ""
    assert not (checkout / ".venv").exists()


def test_setup_dry_run_shows_apt_without_running_it(tmp_path):
    if shutil.which("apt-get") is None:
        pytest.skip("no apt-get here")
    proc, _ = setup_dry_run(tmp_path, "--dry-run", "--gpu", libopengl=False)
    assert proc.returncode == 0, proc.stderr
    sudo = "" if os.getuid() == 0 else "sudo "
    assert proc.stdout.splitlines()[:2] == [
        f"+ {sudo}apt-get update -qq",
        f"+ {sudo}apt-get install -y -qq --no-install-recommends libegl1 libopengl0 libgl1-mesa-dri libosmesa6"]
    help_text = subprocess.run(["bash", str(ROOT / "setup.sh"), "--help"], capture_output=True, text=True).stdout
    assert "--gpu" in help_text and "--dry-run" in help_text
