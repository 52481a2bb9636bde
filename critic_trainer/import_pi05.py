"""Import published pi0.5 weights as a qvgm checkpoint, sized to a robot's dataset, ready for few-shot SFT.

    critic_trainer import-pi05 --weights model.safetensors --tokenizer tokenizer.json --dataset DIR --out CKPT
                               [--config pi05] [--layout auto|openpi|lerobot] [--dtype float32|bfloat16]
                               [--norm-stats norm_stats.json] [--override KEY=JSON] [--version V]
    critic_trainer sft --dataset DIR --init CKPT --out SFT_CKPT ...

`--weights`: openpi's PyTorch `model.safetensors` or LeRobot's `pi05` policy file (qvgm.policy.weights_import; no
pickle). `--tokenizer`: a HF `tokenizer.json` (PaliGemma's). The dataset (replay-buffer format) gives the robot
profile: state and action dims and camera names (sorted, as SFT orders them), and the quantile norm stats of its
frames (or `--norm-stats`: an openpi `norm_stats.json`). Nothing is downloaded; a mismatch of keys or shapes writes
nothing and names what differs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "import published pi0.5 weights (openpi / LeRobot layout) as a checkpoint for a robot's dataset"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True, help="published model.safetensors (openpi or LeRobot layout)")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer.json (e.g. PaliGemma's)")
    p.add_argument("--dataset", required=True, help="replay-buffer dataset of the robot: dims, cameras, norm stats")
    p.add_argument("--out", required=True, help="checkpoint directory to write (must not exist)")
    p.add_argument("--config", default="pi05", help="architecture of the weights (default pi05, the published size)")
    p.add_argument("--layout", default="auto", choices=["auto", "openpi", "lerobot"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="stored weight dtype")
    p.add_argument("--norm-stats", default=None, metavar="JSON",
                   help="openpi norm_stats.json instead of the dataset's own quantiles")
    p.add_argument("--override", action="append", default=[], metavar="KEY=JSON",
                   help="config override (repeatable), e.g. horizon=50")
    p.add_argument("--version", default=None, help="checkpoint version (default: pi05-import)")


def run(args: argparse.Namespace) -> int:
    import torch

    from critic_trainer.sft import load_demo_data, norm_stats_from, parse_overrides
    from qvgm.data import ReplayReader
    from qvgm.policy.processor import NormStats
    from qvgm.policy.weights_import import import_published_checkpoint

    if Path(args.out).exists():
        raise FileExistsError(f"output checkpoint {args.out} already exists")
    overrides = parse_overrides(args.override, args.config)
    data = load_demo_data([args.dataset], 1, with_images=False)
    reader = ReplayReader(args.dataset, decode_images=False)
    try:
        cameras = sorted(k.split(".")[-1] for k in reader.video_keys)  # SFT's camera order
    finally:
        reader.close()
    if not cameras:
        raise ValueError(f"dataset {args.dataset} records no cameras: pi0.5 reads images")
    state_dim, action_dim = int(data.state.shape[1]), int(data.actions.shape[2])
    if args.norm_stats:
        stats = NormStats.from_openpi(json.loads(Path(args.norm_stats).read_text()), state_dim, action_dim)
    else:
        stats = norm_stats_from(data)
    profile = {"state_dim": state_dim, "real_action_dim": action_dim, "camera_names": cameras, **overrides}
    report = import_published_checkpoint(args.weights, args.tokenizer, stats, args.out,
                                         version=args.version or "pi05-import", config=args.config,
                                         layout=args.layout, dtype=getattr(torch, args.dtype), **profile)
    print(json.dumps({"out": args.out, "layout": report.layout, "ignored_keys": len(report.ignored),
                      "state_dim": state_dim, "real_action_dim": action_dim, "camera_names": cameras,
                      "norm_stats": args.norm_stats or f"{args.dataset} ({len(data)} frames)"}))
    return 0
