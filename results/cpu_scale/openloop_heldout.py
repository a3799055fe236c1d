"""Held-out open-loop prediction error of a pretrain_wm.py checkpoint, per embodiment, against the baseline of
repeating the last context frame. Uses the held-out split pretrain_wm.py made itself (its --holdout-fraction),
5 context frames, then 45 imagined with the true actions (pretrain_wm.openloop_eval).

    python results/cpu_scale/openloop_heldout.py runs/cpu_scale/pretrain/wm.pt data/cpu_scale \
        --out results/cpu_scale/openloop.json
"""
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import pretrain_wm as P  # noqa: E402


@dataclass
class Args:
    checkpoint: tyro.conf.Positional[str]
    """pretrain_wm.py checkpoint"""
    data_dir: tyro.conf.Positional[str]
    """the dataset it was trained on"""
    episodes: int = 8
    """held-out episodes per embodiment (at most as many as the split holds)"""
    frames: int = 50
    """frames per clip (5 context + imagined)"""
    out: str = ""
    """write the numbers here as JSON"""


def main(args: Args) -> None:
    torch.set_num_threads(1)
    ckpt = P.load_checkpoint(Path(args.checkpoint))
    wm = P.WorldModel(P.ModelConfig(**ckpt["model_config"]))
    wm.load_state_dict(ckpt["model"], strict=True)
    wm.eval()
    _, _, rows, embodiments = P.load_manifest(Path(args.data_dir), ckpt["embodiments"])
    _, held = P.split_holdout(rows, embodiments, ckpt["args"]["holdout_fraction"])
    out = {"checkpoint": args.checkpoint, "step": ckpt["step"], "per_embodiment": {}}
    for emb in embodiments:
        eps = [P.load_episode(Path(args.data_dir), r, args.frames) for r in held[emb][: args.episodes]]
        n = min(len(e["image"]) for e in eps)
        clips = {emb: {k: np.stack([e[k][:n] for e in eps]) for k in ("image", "action", "is_first")}}
        mse, _ = P.openloop_eval(wm, clips, torch.device("cpu"))
        row = {"held_out_episodes": len(eps), "model_mse": mse[emb]["model"], "repeat_last_frame_mse": mse[emb]["copy"]}
        out["per_embodiment"][emb] = row
        print(f"{emb}: {len(eps)} held-out episodes, open-loop MSE {row['model_mse']:.5f} "
              f"(repeat last frame {row['repeat_last_frame_mse']:.5f})")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main(tyro.cli(Args))
