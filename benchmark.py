"""Benchmark every stage at each named size: env frames/s, updates/s, seconds per update, peak memory.

Each measurement runs in a fresh Python process, so its peak resident memory (ru_maxrss) is that stage's
alone. Measure on an idle machine: another busy process on a 2-core CPU can slow an update several-fold.

Stages:
  env        step + render cost of one task per embodiment (random actions), in env frames/s (action repeat 2)
  pretrain   one world-model update of pretrain_wm.py (train_step) on a random batch of the size's shape
  finetune   one full update of finetune_gsa.py (world model + imagination + actor + critic), one policy step,
             and the resulting fine-tuning throughput at the size's train ratio:
             env frames/s = frames per update / (update time + policy and env time of those frames)
  retrieval  Faiss build and query (500 nearest of 5 reset frames) over N synthetic features of the size's
             encoder width (default N = 60k, the paper's episode count), plus encoder time per frame

Example (writes a markdown table too):
    python benchmark.py --sizes tiny xs s --threads 2 --out results/benchmark.md

Side by side (--compare A B): two configurations of the update stages, each in its own long-lived process, take
turns update by update (A B, B A, A B, ...), so both see the same load; the table gives each one's median and the
ratio B/A. A configuration is comma-separated key=value pairs: ref (a git commit whose pretrain_wm.py and
finetune_gsa.py are measured; default: the working tree), precision (fp32, bf16), threads and compile (0, 1: the
training scripts' --compile):
    python benchmark.py --stages finetune --sizes xs --threads 1 --updates 20 --compare ref=HEAD~1 ref=.
    python benchmark.py --stages pretrain finetune --sizes xs --threads 1 --warmup 3 --compare compile=0 compile=1

On a GPU (per-update time and peak GPU memory; refused with a clear message where torch sees no CUDA device):
    python benchmark.py --device cuda --stages pretrain finetune --sizes s paper --precision bf16 fp32
"""
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parent


@dataclass
class Args:
    sizes: list[str] = field(default_factory=lambda: ["tiny", "xs", "s"])
    """named sizes to measure (the `paper` size needs a GPU and is skipped on a CPU)"""
    stages: list[str] = field(default_factory=lambda: ["env", "pretrain", "finetune", "retrieval"])
    """stages to measure: env, pretrain, finetune, retrieval (--compare: the update stages only)"""
    threads: int = 2
    """torch threads per measurement (the CPU presets are meant for 2)"""
    precision: list[str] = field(default_factory=lambda: ["fp32"])
    """update precisions to measure (pretrain and finetune stages): fp32, bf16 (autocast, as --precision bf16)"""
    updates: int = 10
    """timed updates per size; the median is reported (after `warmup` untimed updates); with --compare, per side"""
    warmup: int = 2
    """untimed updates first: the first ones allocate memory and pick kernels, which a long run does once"""
    env_steps: int = 200
    """agent steps timed per task in the env stage"""
    retrieval_rows: int = 60_000
    """synthetic episodes in the retrieval benchmark"""
    device: str = "cpu"
    """cpu or cuda (cuda: times include a device synchronisation; peak GPU memory is reported too)"""
    compile: bool = False
    """torch.compile the update loops' steps, as the training scripts' --compile (the first updates compile; keep
    --warmup at 2 or more so that they stay untimed)"""
    compare: list[str] = field(default_factory=list)
    """two configurations A B measured side by side, update by update, e.g. `ref=HEAD~1 ref=.` or
    `precision=fp32 precision=bf16` or `compile=0 compile=1` (keys: ref, precision, threads, compile); reports the
    medians and B/A"""
    out: Optional[str] = None
    """also write the table (markdown) and the raw numbers (.json beside it) here"""
    one: Optional[str] = None
    """internal: `stage:size` measured in this process, printed as one JSON line"""
    serve: Optional[str] = None
    """internal (--compare): `stage:size` updated in this process once per `update` line read from stdin"""
    code_dir: Optional[str] = None
    """internal (--compare): import pretrain_wm.py and finetune_gsa.py from this folder (a checked-out ref)"""


ENV_TASKS = ("cartpole-balance", "acrobot-swingup", "walker-walk", "cheetah-run", "quadruped-walk", "mw-reach")
UPDATE_STAGES = ("pretrain", "finetune")
SPEC_KEYS = ("ref", "precision", "threads", "compile")


def fail(message: str):
    raise SystemExit(f"benchmark.py: error: {message}")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so that wall time covers it (a no-op on a CPU)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(fn, repeats: int, warmup: int = 1, device: str = "cpu"):
    """Median wall seconds and CPU seconds of fn() over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        synchronize(device)
        w, c = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return float(np.median(walls)), float(np.median(cpus))


def check_device(device: str) -> None:
    """Refuse a CUDA device that torch cannot see, before any measurement starts."""
    import torch

    if device == "cpu":
        return
    if not device.startswith("cuda"):
        fail(f"--device {device!r}: use cpu or cuda")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        fail(f"--device {device}: torch {torch.__version__} ({build}) sees no CUDA device. Run the GPU check on a "
             f"machine with an NVIDIA GPU and torch's CUDA build of the same version; no GPU numbers were measured")


def bench_env(args: Args, size: str) -> dict:
    import finetune_gsa as F

    out = {}
    for task in ENV_TASKS:
        env = F.make_env(task, seed=0)
        rng = np.random.default_rng(0)
        env.reset()
        w, c, steps = time.perf_counter(), time.process_time(), 0
        while steps < args.env_steps:
            _, _, done, _ = env.step(rng.uniform(-1, 1, env.action_dim).astype(np.float32))
            steps += 1
            if done:
                env.reset()
        wall = time.perf_counter() - w
        out[task] = {"frames_per_s": 2 * steps / wall, "cpu_ms_per_step": 1e3 * (time.process_time() - c) / steps}
        env.close()
    return out


def pretrain_update(size: str, device: str, precision: str, compile_loops: bool = False):
    """(update function, facts) for one world-model update of pretrain_wm.py at a size on a fixed batch."""
    import torch
    import pretrain_wm as P

    if device == "cpu":
        P.keep_freed_memory()
    torch.manual_seed(0)
    cfg = P.size_config(size)
    B, T = P.SIZES[size]["batch_size"], P.SIZES[size]["seq_len"]
    wm = P.WorldModel(cfg).to(device)
    if compile_loops:
        wm.rssm.filter_step = P.compile_step(wm.rssm.filter_step, torch.device(device).type)
    opt = torch.optim.Adam(wm.parameters(), lr=1e-4, eps=1e-5, weight_decay=1e-6)
    pargs = P.Args(out_dir="-", data_dir="-", size=size)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randint(0, 256, (B, T, 64, 64, 3), dtype=torch.uint8, generator=g),
             "action": torch.rand(B, T, 12, generator=g) * 2 - 1,
             "is_first": torch.zeros(B, T, dtype=torch.bool)}
    batch["is_first"][:, 0] = True
    batch = {k: v.to(device) for k, v in batch.items()}
    dtype = torch.bfloat16 if precision == "bf16" else None

    def update() -> dict:
        metrics = P.train_step(wm, opt, batch, pargs, dtype)
        return {"loss": float(metrics["loss"])}

    facts = {"params_M": sum(p.numel() for p in wm.parameters()) / 1e6, "batch": f"{B}x{T}"}
    return update, facts


def finetune_batch(batch_size: int, seq_len: int, action_dim: int, online_rows: Optional[int] = None,
                   image_size: int = 64, device="cpu", seed: int = 0) -> dict:
    """A random batch in finetune_gsa.Agent.update's format (benchmarks and tests)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    online_rows = batch_size if online_rows is None else online_rows
    action = torch.zeros(batch_size, seq_len, 12)
    action[..., :action_dim] = torch.rand(batch_size, seq_len, action_dim, generator=g) * 2 - 1
    is_first = torch.zeros(batch_size, seq_len, dtype=torch.bool)
    is_first[:, 0] = True
    batch = {"image": torch.randint(0, 256, (batch_size, seq_len, image_size, image_size, 3), generator=g,
                                    dtype=torch.uint8),
             "action": action, "is_first": is_first, "reward": torch.rand(batch_size, seq_len, generator=g),
             "online": torch.arange(batch_size) < online_rows}
    return {k: v.to(device) for k, v in batch.items()}


def finetune_agent(size: str, device: str, precision: str, action_dim: int = 6):
    """(agent, batch) of finetune_gsa.py at a size: a fresh agent (seed 0) and a fixed batch, 1/4 rehearsal rows."""
    import torch
    import finetune_gsa as F

    if device == "cpu":
        F.keep_freed_memory()  # as finetune_gsa.py's main does on a CPU
    torch.manual_seed(0)
    cfg, preset = F.model_config_for(size), F.AGENT_SIZES[size]
    agent = F.Agent(cfg, action_dim, units=preset["units"], layers=preset["layers"], horizon=preset["horizon"],
                    precision=precision).to(device)
    B, T = preset["batch_size"], preset["seq_len"]
    return agent, finetune_batch(B, T, action_dim, online_rows=B - round(0.25 * B), device=device)


def finetune_update(size: str, device: str, precision: str, compile_loops: bool = False):
    """(update function, facts) for one full update of finetune_gsa.py (world model, actor, critic) at a size."""
    import finetune_gsa as F

    agent, batch = finetune_agent(size, device, precision)
    if compile_loops:
        agent.compile_loops()
    preset = F.AGENT_SIZES[size]

    def update() -> dict:
        metrics = agent.update(batch)
        return {k: metrics[k] for k in ("wm_loss", "reward_loss", "actor_loss", "critic_loss")}

    facts = {"params_M": sum(p.numel() for p in agent.parameters()) / 1e6,
             "batch": f"{preset['batch_size']}x{preset['seq_len']}", "horizon": preset["horizon"],
             "train_ratio": preset["train_ratio"]}
    return update, facts, agent


def bench_pretrain(args: Args, size: str) -> dict:
    update, facts = pretrain_update(size, args.device, args.precision[0], args.compile)
    wall, cpu = timed(update, args.updates, args.warmup, args.device)
    return {"precision": args.precision[0], **facts, "s_per_update": wall, "cpu_s_per_update": cpu,
            "updates_per_s": 1 / wall}


def bench_finetune(args: Args, size: str) -> dict:
    import torch
    import finetune_gsa as F

    update, facts, agent = finetune_update(size, args.device, args.precision[0], args.compile)
    wall, cpu = timed(update, args.updates, args.warmup, args.device)
    A = agent.action_dim
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    prev = torch.zeros(12, device=args.device)
    act_wall, _ = timed(lambda: agent.act(None, prev, image, mode=False), 20, device=args.device)
    try:
        env = F.make_env("walker-walk", seed=0)
        env.reset()
        env_wall, _ = timed(lambda: env.step(np.zeros(A, np.float32)), 20)
        env.close()
    except Exception as e:  # noqa: BLE001 -- a GPU machine without rendering still gets its update numbers
        print(f"benchmark.py: no env timing ({type(e).__name__}: {e})", file=sys.stderr)
        env_wall = None
    agent_steps_per_update = int(facts["batch"].split("x")[0]) * int(facts["batch"].split("x")[1]) / facts["train_ratio"]
    frames_per_s = (None if env_wall is None else
                    2 * agent_steps_per_update / (wall + agent_steps_per_update * (act_wall + env_wall)))
    return {"precision": args.precision[0], **facts, "s_per_update": wall, "cpu_s_per_update": cpu,
            "updates_per_s": 1 / wall, "ms_per_policy_step": 1e3 * act_wall,
            "ms_per_env_step": None if env_wall is None else 1e3 * env_wall, "env_frames_per_s": frames_per_s}


def bench_retrieval(args: Args, size: str) -> dict:
    import faiss  # noqa: F401 -- fail here, before the encoder runs, if faiss is missing
    import torch
    import retrieval as R

    cfg = R.ModelConfig(**{k: v for k, v in __import__("pretrain_wm").SIZES[size].items()
                           if k in R.ModelConfig.__dataclass_fields__})
    encoder = R.Encoder(cfg).eval()
    frames = torch.randint(0, 256, (64, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        enc_wall, _ = timed(lambda: encoder(frames), 2)
    dim = encoder.out_dim
    feats = np.random.default_rng(0).standard_normal((args.retrieval_rows, dim), dtype=np.float32)
    w = time.perf_counter()
    index = faiss.IndexFlatL2(dim)
    index.add(feats)
    build = time.perf_counter() - w
    meta = {"rows": [{"action_dim": 6} for _ in range(args.retrieval_rows)]}
    queries = feats[:5] + 0.01
    w = time.perf_counter()
    R.retrieve(index, meta, queries, k=500, action_dim=6)
    query = time.perf_counter() - w
    return {"feature_dim": dim, "rows": args.retrieval_rows, "build_s": build, "query_s": query,
            "encode_ms_per_frame": 1e3 * enc_wall / len(frames)}


STAGES = {"env": bench_env, "pretrain": bench_pretrain, "finetune": bench_finetune, "retrieval": bench_retrieval}


def memory_facts(device: str) -> dict:
    out = {"peak_mb": peak_mb()}
    if device.startswith("cuda"):
        import torch

        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_one(args: Args) -> None:
    import torch

    stage, size = args.one.split(":")
    torch.set_num_threads(args.threads)
    result = STAGES[stage](args, size)
    result.update(memory_facts(args.device))
    print(json.dumps({"stage": stage, "size": size, **result}))


# ---------------------------------------------------------------------------------------------------------
# Side by side: two long-lived worker processes take turns, update by update
# ---------------------------------------------------------------------------------------------------------

def serve(args: Args) -> None:
    """Worker of --compare: build the stage at the size, run the warm-up updates, then one timed update per
    `update` line on stdin, answering each with a `BENCH {json}` line; `quit` answers with memory facts."""
    if args.code_dir:
        sys.path.insert(0, args.code_dir)
    import torch

    stage, size = args.serve.split(":")
    torch.set_num_threads(args.threads)
    try:
        made = (pretrain_update if stage == "pretrain" else finetune_update)(size, args.device, args.precision[0],
                                                                             args.compile)
    except AttributeError as e:  # an older ref without compile_step / compile_loops
        fail(f"--compare: this code cannot run the configuration ({e})")
    update, facts = made[0], made[1]
    first = update()  # the first update's losses: equal on both sides when they compute the same thing
    for _ in range(args.warmup - 1):
        update()
    print("BENCH " + json.dumps({"facts": facts, "first": first}), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        synchronize(args.device)
        w, c = time.perf_counter(), time.process_time()
        update()
        synchronize(args.device)
        print("BENCH " + json.dumps({"wall": time.perf_counter() - w, "cpu": time.process_time() - c}), flush=True)
    print("BENCH " + json.dumps(memory_facts(args.device)), flush=True)


def parse_spec(text: str, args: Args) -> dict:
    spec = {"ref": None, "precision": args.precision[0], "threads": args.threads, "compile": args.compile}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in SPEC_KEYS:
            fail(f"--compare: bad configuration {text!r}; use comma-separated key=value with keys {SPEC_KEYS}")
        spec[key] = value
    if spec["ref"] in (".", ""):
        spec["ref"] = None
    if spec["precision"] not in ("fp32", "bf16"):
        fail(f"--compare: unknown precision {spec['precision']!r} in {text!r}; valid: fp32, bf16")
    try:
        spec["threads"] = int(spec["threads"])
    except ValueError:
        fail(f"--compare: threads must be an integer in {text!r}")
    flags = {"0": False, "1": True, "false": False, "true": True, False: False, True: True}
    if spec["compile"] not in flags:
        fail(f"--compare: compile must be 0 or 1 in {text!r}")
    spec["compile"] = flags[spec["compile"]]
    spec["label"] = text
    return spec


def checkout(ref: str, into: Path) -> str:
    """Write ref's two stage scripts into `into`; return the full commit id."""
    run = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True)  # noqa: E731
    res = run("rev-parse", "--verify", f"{ref}^{{commit}}")
    if res.returncode != 0:
        fail(f"--compare: ref={ref} is not a commit of this repository")
    commit = res.stdout.decode().strip()
    into.mkdir(parents=True)
    for name in ("pretrain_wm.py", "finetune_gsa.py"):
        res = run("show", f"{commit}:{name}")
        if res.returncode != 0:
            fail(f"--compare: ref={ref} has no {name}")
        (into / name).write_bytes(res.stdout)
    return commit


class Worker:
    def __init__(self, args: Args, spec: dict, stage: str, size: str, code_dir: Optional[Path]):
        cmd = [sys.executable, __file__, "--serve", f"{stage}:{size}", "--threads", str(spec["threads"]),
               "--precision", spec["precision"], "--warmup", str(max(1, args.warmup)), "--device", args.device,
               "--compile" if spec["compile"] else "--no-compile"]
        if code_dir is not None:
            cmd += ["--code-dir", str(code_dir)]
        self.label = spec["label"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.ready = self.read()

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("BENCH "):
                return json.loads(line[6:])
        self.proc.wait()
        fail(f"--compare: the worker for {self.label!r} stopped:\n{self.proc.stderr.read()[-2000:]}")

    def ask(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> dict:
        out = self.ask("quit")
        self.proc.stdin.close()
        self.proc.wait()
        return out


def compare_one(args: Args, specs: list, dirs: list, stage: str, size: str) -> dict:
    """Both workers ready (one after the other), then `updates` rounds: A B in even rounds, B A in odd ones (a
    load that drifts during a round then weighs on both sides alike)."""
    workers = []
    try:
        for spec, code_dir in zip(specs, dirs):
            workers.append(Worker(args, spec, stage, size, code_dir))
        walls, cpus = [[], []], [[], []]
        for i in range(args.updates):
            for side in ((0, 1) if i % 2 == 0 else (1, 0)):
                answer = workers[side].ask("update")
                walls[side].append(answer["wall"])
                cpus[side].append(answer["cpu"])
        memory = [w.close() for w in workers]
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
    a, b = np.array(walls[0]), np.array(walls[1])
    a_cpu, b_cpu = np.median(cpus[0]), np.median(cpus[1])
    return {"stage": stage, "size": size, "a": specs[0]["label"], "b": specs[1]["label"],
            "a_commit": specs[0].get("commit"), "b_commit": specs[1].get("commit"),
            "a_s": float(np.median(a)), "b_s": float(np.median(b)), "ratio": float(np.median(b) / np.median(a)),
            "paired_ratio": float(np.median(b / a)), "paired_ratio_q25_q75": [float(q) for q in np.quantile(b / a, [0.25, 0.75])],
            "a_cpu_s": float(a_cpu), "b_cpu_s": float(b_cpu), "cpu_ratio": float(b_cpu / a_cpu),
            "a_walls": walls[0], "b_walls": walls[1], "a_cpus": cpus[0], "b_cpus": cpus[1], "a_first": workers[0].ready["first"],
            "b_first": workers[1].ready["first"], "facts": workers[0].ready["facts"],
            "a_memory": memory[0], "b_memory": memory[1]}


def compare_table(rows: list) -> str:
    lines = ["| stage | size | A | B | A s/update | B s/update | B/A (medians) | B/A (median of pairs, IQR) | "
             "B/A CPU s | peak MB A / B | first-update losses A / B |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        losses = " / ".join(", ".join(f"{v:.6g}" for v in r[k].values()) for k in ("a_first", "b_first"))
        q = r["paired_ratio_q25_q75"]
        lines.append(f"| {r['stage']} | {r['size']} | {r['a']} | {r['b']} | {r['a_s']:.3f} | {r['b_s']:.3f} | "
                     f"{r['ratio']:.3f} | {r['paired_ratio']:.3f} ({q[0]:.3f}-{q[1]:.3f}) | {r['cpu_ratio']:.3f} | "
                     f"{r['a_memory']['peak_mb']:.0f} / {r['b_memory']['peak_mb']:.0f} | {losses} |")
    return "\n".join(lines) + "\n"


def compare(args: Args) -> tuple:
    if len(args.compare) != 2:
        fail(f"--compare takes two configurations (A B), got {len(args.compare)}")
    stages = [s for s in args.stages if s in UPDATE_STAGES]
    if not stages:
        fail(f"--compare measures the update stages {UPDATE_STAGES}; none is in --stages {args.stages}")
    specs = [parse_spec(text, args) for text in args.compare]
    tmp = Path(tempfile.mkdtemp(prefix="benchmark-compare-"))
    try:
        dirs = []
        for i, spec in enumerate(specs):
            if spec["ref"] is None:
                dirs.append(None)
            else:
                spec["commit"] = checkout(spec["ref"], tmp / f"side{i}")
                dirs.append(tmp / f"side{i}")
        rows = []
        for stage in stages:
            for size in args.sizes:
                if size == "paper" and args.device == "cpu":
                    print(f"skip {stage}:{size} (GPU only)", flush=True)
                    continue
                rows.append(compare_one(args, specs, dirs, stage, size))
                print(f"measured {stage}:{size} side by side", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load = os.getloadavg()
    header = (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, device {args.device}; "
              f"side by side, {args.updates} updates per side after {max(1, args.warmup)} untimed, alternating A B / "
              f"B A; load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return header + "\n\n" + compare_table(rows), rows


def table(results: list) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = []
    for stage in ("env", "pretrain", "finetune", "retrieval"):
        rows = [r for r in results if r["stage"] == stage]
        if not rows:
            continue
        gpu = any("peak_cuda_mb" in r for r in rows)
        gpu_head, gpu_rule = (" peak GPU MB |", " --- |") if gpu else ("", "")
        gpu_cell = lambda r: f" {r['peak_cuda_mb']:.0f} |" if gpu else ""  # noqa: E731
        if stage == "env":
            lines += ["| task | env frames/s | CPU ms per agent step (step + render) |", "| --- | --- | --- |"]
            r = rows[0]
            lines += [f"| {t} | {r[t]['frames_per_s']:.0f} | {r[t]['cpu_ms_per_step']:.1f} |" for t in ENV_TASKS]
            lines += [f"\npeak memory {r['peak_mb']:.0f} MB\n"]
        elif stage == "pretrain":
            lines += ["| pretrain size | precision | params | batch | s/update | CPU s/update | updates/s | peak MB |"
                      + gpu_head, "| --- | --- | --- | --- | --- | --- | --- | --- |" + gpu_rule]
            lines += [f"| {r['size']} | {r['precision']} | {r['params_M']:.2f}M | {r['batch']} | {r['s_per_update']:.3f} | "
                      f"{r['cpu_s_per_update']:.3f} | {r['updates_per_s']:.2f} | {r['peak_mb']:.0f} |" + gpu_cell(r)
                      for r in rows]
            lines.append("")
        elif stage == "finetune":
            lines += ["| finetune size | precision | params | batch | horizon | train ratio | s/update | updates/s | "
                      "policy ms/step | env ms/step | env frames/s | peak MB |" + gpu_head,
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |" + gpu_rule]
            lines += [f"| {r['size']} | {r['precision']} | {r['params_M']:.2f}M | {r['batch']} | {r['horizon']} | {r['train_ratio']} | "
                      f"{r['s_per_update']:.3f} | {r['updates_per_s']:.2f} | {r['ms_per_policy_step']:.1f} | "
                      f"{fmt(r['ms_per_env_step'], '.1f')} | {fmt(r['env_frames_per_s'], '.1f')} | {r['peak_mb']:.0f} |"
                      + gpu_cell(r) for r in rows]
            lines.append("")
        else:
            lines += ["| retrieval size | feature dim | episodes | build s | query s (k=500, 5 frames) | "
                      "encode ms/frame | peak MB |", "| --- | --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {r['size']} | {r['feature_dim']} | {r['rows']} | {r['build_s']:.2f} | {r['query_s']:.2f} | "
                      f"{r['encode_ms_per_frame']:.2f} | {r['peak_mb']:.0f} |" for r in rows]
            lines.append("")
    return "\n".join(lines)


def measure(args: Args) -> tuple:
    results = []
    for stage in args.stages:
        for size in (["-"] if stage == "env" else args.sizes):
            if size == "paper" and args.device == "cpu":
                print(f"skip {stage}:{size} (GPU only)", flush=True)
                continue
            for precision in (args.precision if stage in UPDATE_STAGES else ["fp32"]):
                cmd = [sys.executable, __file__, "--one", f"{stage}:{size}", "--threads", str(args.threads),
                       "--updates", str(args.updates), "--warmup", str(args.warmup),
                       "--env-steps", str(args.env_steps),
                       "--retrieval-rows", str(args.retrieval_rows), "--device", args.device,
                       "--precision", precision]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if proc.returncode != 0:
                    fail(f"{stage}:{size} failed:\n{proc.stderr[-2000:]}")
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"measured {stage}:{size} {precision}", flush=True)
    header = (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"{args.threads} torch threads, device {args.device}; median of {args.updates} updates after {args.warmup}")
    return header + "\n\n" + table(results), results


def main(args: Args) -> None:
    if args.one:
        return run_one(args)
    if args.serve:
        return serve(args)
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        fail(f"unknown stage(s) {unknown}; valid: {list(STAGES)}")
    bad = [p for p in args.precision if p not in ("fp32", "bf16")]
    if bad:
        fail(f"unknown precision(s) {bad}; valid: fp32, bf16")
    if args.updates < 1 or args.warmup < 0 or args.threads < 1:
        fail("--updates and --threads must be at least 1, --warmup at least 0")
    check_device(args.device)
    text, results = compare(args) if args.compare else measure(args)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main(tyro.cli(Args))
