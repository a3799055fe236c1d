"""Where the time of one fine-tuning update goes (finetune_gsa.py Agent.update at a size), by phase and by op.

Phases are marked from outside the code (record_function around the methods an update calls, and around each
backward call), so the profiled code is the code as it is. Prints two markdown tables: wall time per phase (self
time of the phase, i.e. nested phases excluded) and the ops with the most self CPU time.

    OMP_NUM_THREADS=1 python results/speed/profile_update.py --size xs --threads 1
    (--code-dir DIR profiles DIR/finetune_gsa.py instead, e.g. an older commit's: git show REF:finetune_gsa.py)
"""
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
if "--code-dir" in sys.argv:
    sys.path.insert(0, sys.argv[sys.argv.index("--code-dir") + 1])
import finetune_gsa as F  # noqa: E402
from benchmark import finetune_batch  # noqa: E402


@dataclass
class Args:
    size: str = "xs"
    """preset (finetune_gsa.py AGENT_SIZES)"""
    threads: int = 1
    """torch threads"""
    warmup: int = 3
    """untimed updates first"""
    updates: int = 3
    """profiled updates (times are per update)"""
    top: int = 25
    """ops listed"""
    precision: str = "fp32"
    """fp32 or bf16"""
    code_dir: str = ""
    """import finetune_gsa.py from this folder (read before the imports above)"""


PHASES = [  # (label, object path from the agent, method name)
    ("wm: encoder", "wm.encoder", "forward"),
    ("wm: RSSM observe (posterior loop)", "wm.rssm", "observe"),
    ("wm: decoder", "wm.decoder", "forward"),
    ("wm: KL", "wm.rssm", "kl_loss"),
    ("ac: imagine (actor + img_step loop)", "", "imagine"),
    ("reward head", "reward", "forward"),
    ("critic", "critic", "forward"),
    ("slow critic", "slow_critic", "forward"),
    ("ac: return norm (quantile)", "return_norm", "update"),
    ("grad clip", None, None),
]
BACKWARDS = ["backward: world model + reward head", "backward: actor (through dynamics and heads)",
             "backward: critic"]


def _wrap(obj, name: str, label: str) -> None:
    fn = getattr(obj, name)

    def wrapped(*a, **k):
        with record_function(label):
            return fn(*a, **k)

    setattr(obj, name, wrapped)


def instrument(agent: F.Agent) -> None:
    for label, path, name in PHASES:
        if path is None:
            continue
        obj = agent
        for part in filter(None, path.split(".")):
            obj = getattr(obj, part)
        _wrap(obj, name, label)
    for opt in agent.optimizers().values():
        _wrap(opt, "step", "optimizer step")
    backward, calls = torch.Tensor.backward, [0]

    def marked_backward(self, *a, **k):  # an update calls backward three times: world model, actor, critic
        label = BACKWARDS[calls[0] % len(BACKWARDS)]
        calls[0] += 1
        with record_function(label):
            return backward(self, *a, **k)

    torch.Tensor.backward = marked_backward
    clip = torch.nn.utils.clip_grad_norm_

    def marked_clip(*a, **k):
        with record_function("grad clip"):
            return clip(*a, **k)

    F.nn.utils.clip_grad_norm_ = marked_clip


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    F.keep_freed_memory()
    cfg, preset = F.model_config_for(args.size), F.AGENT_SIZES[args.size]
    agent = F.Agent(cfg, 6, units=preset["units"], layers=preset["layers"], horizon=preset["horizon"],
                    precision=args.precision)
    B, T = preset["batch_size"], preset["seq_len"]
    batch = finetune_batch(B, T, 6, online_rows=B - round(0.25 * B))
    for _ in range(args.warmup):
        agent.update(batch)
    walls = []
    for _ in range(3):
        w = time.perf_counter()
        agent.update(batch)
        walls.append(time.perf_counter() - w)
    instrument(agent)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.updates):
            with record_function("update"):
                agent.update(batch)
    events = prof.key_averages()
    n = args.updates
    total = next(e for e in events if e.key == "update").cpu_time_total / n / 1e3  # ms
    labels = ["update"] + [p[0] for p in PHASES] + ["optimizer step"] + BACKWARDS
    # self time of a phase = its total minus the phases nested directly in it (computed from the trace tree)
    self_ms = {label: 0.0 for label in labels}

    def walk(ev, current):
        name = ev.name
        if name in self_ms:
            self_ms[name] += ev.cpu_time_total / 1e3
            if current is not None:
                self_ms[current] -= ev.cpu_time_total / 1e3
            current = name
        for child in ev.cpu_children:
            walk(child, current)

    for ev in prof.events():
        if ev.cpu_parent is None:
            walk(ev, None)
    print(f"{F.__file__}: size {args.size}, {args.threads} thread(s), {args.precision}; unprofiled update median "
          f"{np.median(walls):.3f} s; profiled update {total / 1e3:.3f} s\n")
    print("| phase | ms per update | share |\n| --- | --- | --- |")
    for label in labels:
        ms = self_ms[label] / n
        name = "rest of update (losses, two-hot, lambda-return, syncs, ...)" if label == "update" else label
        print(f"| {name} | {ms:.0f} | {100 * ms / total:.0f}% |")
    print(f"\n| op (self CPU) | ms per update | share | calls per update |\n| --- | --- | --- | --- |")
    ops = sorted((e for e in events if not e.key.startswith(("update", "wm:", "ac:")) and e.key not in self_ms),
                 key=lambda e: -e.self_cpu_time_total)
    for e in ops[: args.top]:
        ms = e.self_cpu_time_total / n / 1e3
        print(f"| {e.key} | {ms:.1f} | {100 * ms / total:.1f}% | {e.count // n} |")
    calls = sum(e.count for e in events if e.key.startswith("aten::")) // n
    print(f"\naten op calls per update: {calls}")


if __name__ == "__main__":
    main(tyro.cli(Args))
