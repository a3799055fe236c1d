"""Work per update (GFLOP) of pretrain_wm.py and finetune_gsa.py at a size, as README "Speed" quotes it.

torch.profiler(with_flops=True) counts matmuls and forward convolutions. It does not count transposed
convolutions or convolution backward passes, so the total adds those from the forward convolution count
(the decoder mirrors the encoder: same work; backward = 2x forward).

    python results/flops.py --sizes xs s
"""
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import tyro
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import finetune_gsa as F  # noqa: E402
import pretrain_wm as P  # noqa: E402
from benchmark import finetune_batch  # noqa: E402


@dataclass
class Args:
    sizes: list[str] = field(default_factory=lambda: ["xs", "s"])


def counted_gflop(fn) -> dict:
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        fn()
    return {e.key: e.flops / 1e9 for e in prof.key_averages() if e.flops}


def report(name: str, counts: dict) -> None:
    conv_fwd_encoder = counts.get("aten::conv2d", 0.0)
    conv_total = 3 * 2 * conv_fwd_encoder  # encoder + mirrored decoder, forward + 2x backward
    mm = counts.get("aten::mm", 0.0) + counts.get("aten::addmm", 0.0)
    print(f"{name}: ~{conv_total + mm:.0f} GFLOP per update (matmuls {mm:.0f}, convolutions ~{conv_total:.0f}); "
          f"profiler counts: " + ", ".join(f"{k} {v:.1f}" for k, v in counts.items()))


def main(args: Args) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for size in args.sizes:
        cfg = P.size_config(size)
        B, T = P.SIZES[size]["batch_size"], P.SIZES[size]["seq_len"]
        wm = P.WorldModel(cfg)
        opt = torch.optim.Adam(wm.parameters(), lr=1e-4, eps=1e-5)
        batch = {"image": torch.randint(0, 256, (B, T, 64, 64, 3), dtype=torch.uint8),
                 "action": torch.rand(B, T, 12) * 2 - 1, "is_first": torch.zeros(B, T, dtype=torch.bool)}
        pargs = P.Args(out_dir="-", data_dir="-", size=size)
        report(f"pretrain {size} ({B}x{T})", counted_gflop(lambda: P.train_step(wm, opt, batch, pargs)))
        cfg, preset = F.model_config_for(size), F.AGENT_SIZES[size]
        agent = F.Agent(cfg, 6, units=preset["units"], layers=preset["layers"], horizon=preset["horizon"])
        B, T = preset["batch_size"], preset["seq_len"]
        batch = finetune_batch(B, T, 6, online_rows=B - round(0.25 * B))
        report(f"finetune {size} ({B}x{T}, horizon {preset['horizon']})",
               counted_gflop(lambda: agent.update(batch)))


if __name__ == "__main__":
    main(tyro.cli(Args))
