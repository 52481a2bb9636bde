"""Can a from-scratch pi05 vision tower locate the sim's objects in scenes it was not trained on? (issue 3)

Vision-only training (`critic_trainer.sft.pose_pretrain`: SigLIP tower + projector + PoseReadout, no LM, no expert)
on the pose targets (normalised object poses, xyz + quat per role) of the first `--train` of `--scenes` scripted
episodes, then the readout's mean squared error per target value on the training scenes, on the rest of the same
collection, and on `--heldout` fresh scenes, next to the error of predicting the training mean. Prints JSON.

    python bench/pose_readout_probe.py --task pick_place --scenes 200 --train 150 --steps 1500 --out X.json

Scene seeds 600000+ (`bench/sft_success.py --pose-scenes`), fresh scenes 200000+ (its `--heldout-demos`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.report import emit, machine  # noqa: E402
from critic_trainer.demos import collect_demos  # noqa: E402
from critic_trainer.sft import (  # noqa: E402
    PoseReadout,
    SFTConfig,
    build_policy_for,
    encode_inputs,
    load_demo_data,
    pose_pretrain,
    pose_readout_error,
    pose_targets,
)
from qvgm.sim.tasks import ROLES  # noqa: E402

POSE_SCENE_SEED0 = 600_000
HELDOUT_SEED0 = 200_000


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="pick_place")
    ap.add_argument("--config", default="pi05-tiny")
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--train", type=int, default=150, help="the first N scenes train, the rest validate")
    ap.add_argument("--heldout", type=int, default=10)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pose_probe_") as tmp:
        size = (args.image_size, args.image_size)
        collect_demos(args.task, args.scenes, f"{tmp}/scenes", noise=0.01, seed=POSE_SCENE_SEED0, image_size=size)
        collect_demos(args.task, args.heldout, f"{tmp}/held", noise=0.01, seed=HELDOUT_SEED0, image_size=size)
        every = load_demo_data([f"{tmp}/scenes"], 10, with_images=True)
        held = load_demo_data([f"{tmp}/held"], 10, with_images=True)
    episodes = np.unique(every.episode)
    train = every.subset(np.flatnonzero(every.episode < episodes[args.train]))
    val = every.subset(np.flatnonzero(every.episode >= episodes[args.train]))
    cfg = SFTConfig(datasets=["-"], config=args.config, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                    pose_aux=1.0, pose_pretrain_steps=args.steps, overrides={"delta_actions": True})
    torch.manual_seed(args.seed)
    policy = build_policy_for(train, cfg)
    targets, quantiles = pose_targets(train)
    readout = PoseReadout(policy.model.paligemma.model.multi_modal_projector.linear.out_features, targets.shape[1])
    t1 = time.perf_counter()
    pose_pretrain(policy, readout, [(encode_inputs(policy, train), targets)], cfg)
    t_train = time.perf_counter() - t1
    policy.eval()
    readout.eval()
    names = [f"{role}.{v}" for role in ROLES[args.task] for v in ("x", "y", "z", "qw", "qx", "qy", "qz")]
    mean = targets.mean(0)
    rows = {}
    for split, data in (("train", train), ("validation", val), ("heldout", held)):
        err = pose_readout_error(policy, readout, data, quantiles, per_value=True)
        guess = ((pose_targets(data, quantiles)[0] - mean) ** 2).mean(0).numpy()
        rows[split] = {"frames": len(data), "mse": round(float(err.mean()), 4),
                       "mse_mean_guess": round(float(guess.mean()), 4),
                       "per_value": {n: [round(float(e), 3), round(float(g), 3)]
                                     for n, e, g in zip(names, err, guess, strict=True)}}
    out = {"bench": "pose_readout_probe", "task": args.task, "config": args.config, "image_size": args.image_size,
           "scenes": args.scenes, "train_scenes": args.train, "heldout_scenes": args.heldout, "steps": args.steps,
           "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
           "scene_seeds": f"{POSE_SCENE_SEED0}+k", "heldout_seeds": f"{HELDOUT_SEED0}+k",
           "per_value_format": "[readout mse, mean-guess mse]", "results": rows, "train_s": round(t_train, 1),
           "wall_s": round(time.perf_counter() - t0, 1),
           "machine": machine(torch.get_num_threads())}
    return emit(out, args.out)


if __name__ == "__main__":
    main()
