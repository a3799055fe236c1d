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
"""
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import json
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import tyro


@dataclass
class Args:
    sizes: list[str] = field(default_factory=lambda: ["tiny", "xs", "s"])
    """named sizes to measure (the `paper` size needs a GPU and is skipped on a CPU)"""
    stages: list[str] = field(default_factory=lambda: ["env", "pretrain", "finetune", "retrieval"])
    """stages to measure: env, pretrain, finetune, retrieval"""
    threads: int = 2
    """torch threads per measurement (the CPU presets are meant for 2)"""
    precision: list[str] = field(default_factory=lambda: ["fp32"])
    """update precisions to measure (pretrain and finetune stages): fp32, bf16 (autocast, as --precision bf16)"""
    updates: int = 10
    """timed updates per size; the median is reported (after `warmup` untimed updates)"""
    warmup: int = 2
    """untimed updates first: the first ones allocate memory and pick kernels, which a long run does once"""
    env_steps: int = 200
    """agent steps timed per task in the env stage"""
    retrieval_rows: int = 60_000
    """synthetic episodes in the retrieval benchmark"""
    device: str = "cpu"
    """cpu or cuda"""
    out: Optional[str] = None
    """also write the table (markdown) and the raw numbers (.json beside it) here"""
    one: Optional[str] = None
    """internal: `stage:size` measured in this process, printed as one JSON line"""


ENV_TASKS = ("cartpole-balance", "acrobot-swingup", "walker-walk", "cheetah-run", "quadruped-walk", "mw-reach")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeats: int, warmup: int = 1):
    """Median wall seconds and CPU seconds of fn() over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return float(np.median(walls)), float(np.median(cpus))


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


def bench_pretrain(args: Args, size: str) -> dict:
    import torch
    import pretrain_wm as P

    P.keep_freed_memory()
    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = P.size_config(size)
    B, T = P.SIZES[size]["batch_size"], P.SIZES[size]["seq_len"]
    wm = P.WorldModel(cfg).to(device)
    opt = torch.optim.Adam(wm.parameters(), lr=1e-4, eps=1e-5, weight_decay=1e-6)
    pargs = P.Args(out_dir="-", data_dir="-", size=size)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randint(0, 256, (B, T, 64, 64, 3), dtype=torch.uint8, generator=g),
             "action": torch.rand(B, T, 12, generator=g) * 2 - 1,
             "is_first": torch.zeros(B, T, dtype=torch.bool)}
    batch["is_first"][:, 0] = True
    batch = {k: v.to(device) for k, v in batch.items()}
    dtype = torch.bfloat16 if args.precision[0] == "bf16" else None
    wall, cpu = timed(lambda: P.train_step(wm, opt, batch, pargs, dtype), args.updates, args.warmup)
    return {"precision": args.precision[0], "params_M": sum(p.numel() for p in wm.parameters()) / 1e6, "batch": f"{B}x{T}",
            "s_per_update": wall, "cpu_s_per_update": cpu, "updates_per_s": 1 / wall}


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


def bench_finetune(args: Args, size: str) -> dict:
    import torch
    import finetune_gsa as F

    F.keep_freed_memory()  # as finetune_gsa.py's main does on a CPU
    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg, preset = F.model_config_for(size), F.AGENT_SIZES[size]
    A = 6  # walker
    agent = F.Agent(cfg, A, units=preset["units"], layers=preset["layers"], horizon=preset["horizon"],
                    precision=args.precision[0]).to(device)
    B, T = preset["batch_size"], preset["seq_len"]
    batch = finetune_batch(B, T, A, online_rows=B - round(0.25 * B), device=device)
    wall, cpu = timed(lambda: agent.update(batch), args.updates, args.warmup)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    prev = torch.zeros(12, device=device)
    act_wall, _ = timed(lambda: agent.act(None, prev, image, mode=False), 20)
    env = F.make_env("walker-walk", seed=0)
    env.reset()
    env_wall, _ = timed(lambda: env.step(np.zeros(A, np.float32)), 20)
    env.close()
    agent_steps_per_update = B * T / preset["train_ratio"]
    frames_per_s = 2 * agent_steps_per_update / (wall + agent_steps_per_update * (act_wall + env_wall))
    return {"precision": args.precision[0], "params_M": sum(p.numel() for p in agent.parameters()) / 1e6,
            "batch": f"{B}x{T}",
            "horizon": preset["horizon"], "train_ratio": preset["train_ratio"], "s_per_update": wall,
            "cpu_s_per_update": cpu, "updates_per_s": 1 / wall, "ms_per_policy_step": 1e3 * act_wall,
            "ms_per_env_step": 1e3 * env_wall, "env_frames_per_s": frames_per_s}


def bench_retrieval(args: Args, size: str) -> dict:
    import faiss
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


def run_one(args: Args) -> None:
    import torch

    stage, size = args.one.split(":")
    torch.set_num_threads(args.threads)
    result = STAGES[stage](args, size)
    result["peak_mb"] = peak_mb()
    print(json.dumps({"stage": stage, "size": size, **result}))


def table(results: list) -> str:
    lines = []
    for stage in ("env", "pretrain", "finetune", "retrieval"):
        rows = [r for r in results if r["stage"] == stage]
        if not rows:
            continue
        if stage == "env":
            lines += ["| task | env frames/s | CPU ms per agent step (step + render) |", "| --- | --- | --- |"]
            r = rows[0]
            lines += [f"| {t} | {r[t]['frames_per_s']:.0f} | {r[t]['cpu_ms_per_step']:.1f} |" for t in ENV_TASKS]
            lines += [f"\npeak memory {r['peak_mb']:.0f} MB\n"]
        elif stage == "pretrain":
            lines += ["| pretrain size | precision | params | batch | s/update | CPU s/update | updates/s | peak MB |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {r['size']} | {r['precision']} | {r['params_M']:.2f}M | {r['batch']} | {r['s_per_update']:.3f} | "
                      f"{r['cpu_s_per_update']:.3f} | {r['updates_per_s']:.2f} | {r['peak_mb']:.0f} |" for r in rows]
            lines.append("")
        elif stage == "finetune":
            lines += ["| finetune size | precision | params | batch | horizon | train ratio | s/update | updates/s | "
                      "policy ms/step | env ms/step | env frames/s | peak MB |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {r['size']} | {r['precision']} | {r['params_M']:.2f}M | {r['batch']} | {r['horizon']} | {r['train_ratio']} | "
                      f"{r['s_per_update']:.3f} | {r['updates_per_s']:.2f} | {r['ms_per_policy_step']:.1f} | "
                      f"{r['ms_per_env_step']:.1f} | {r['env_frames_per_s']:.1f} | {r['peak_mb']:.0f} |" for r in rows]
            lines.append("")
        else:
            lines += ["| retrieval size | feature dim | episodes | build s | query s (k=500, 5 frames) | "
                      "encode ms/frame | peak MB |", "| --- | --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {r['size']} | {r['feature_dim']} | {r['rows']} | {r['build_s']:.2f} | {r['query_s']:.2f} | "
                      f"{r['encode_ms_per_frame']:.2f} | {r['peak_mb']:.0f} |" for r in rows]
            lines.append("")
    return "\n".join(lines)


def main(args: Args) -> None:
    if args.one:
        return run_one(args)
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        raise SystemExit(f"benchmark.py: error: unknown stage(s) {unknown}; valid: {list(STAGES)}")
    bad = [p for p in args.precision if p not in ("fp32", "bf16")]
    if bad:
        raise SystemExit(f"benchmark.py: error: unknown precision(s) {bad}; valid: fp32, bf16")
    results = []
    for stage in args.stages:
        for size in (["-"] if stage == "env" else args.sizes):
            if size == "paper" and args.device == "cpu":
                print(f"skip {stage}:{size} (GPU only)", flush=True)
                continue
            for precision in (args.precision if stage in ("pretrain", "finetune") else ["fp32"]):
                cmd = [sys.executable, __file__, "--one", f"{stage}:{size}", "--threads", str(args.threads),
                       "--updates", str(args.updates), "--warmup", str(args.warmup),
                       "--env-steps", str(args.env_steps),
                       "--retrieval-rows", str(args.retrieval_rows), "--device", args.device,
                       "--precision", precision]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
                if proc.returncode != 0:
                    raise SystemExit(f"benchmark.py: error: {stage}:{size} failed:\n{proc.stderr[-2000:]}")
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"measured {stage}:{size} {precision}", flush=True)
    header = (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"{args.threads} torch threads, device {args.device}; median of {args.updates} updates after {args.warmup}")
    text = header + "\n\n" + table(results)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main(tyro.cli(Args))
