"""What a trained keypoint policy (pi05 with `keypoint_tokens`) sees and where it aims.

Open loop, on the frames of a demo dataset (every `--stride`-th frame of its first `--episodes-data` episodes): per
camera, the spread of each keypoint's (x, y) across frames (mean std, image units in [-1, 1]), the largest |corr|
of a keypoint coordinate with the target cube's table x / y (m; the first role of the sim's privileged object
poses), and the R^2 of a linear read-out of the target's x / y from all keypoint coordinates; the spread of the
keypoint token itself across frames against its mean norm; and the keypoint reliance: the open-loop flow loss with
each frame's keypoint tokens swapped for another frame's (keypoint_reliance). A policy whose keypoints locate the
target but whose loss does not rise when they are swapped does not use them. With prompt-query keypoints
(keypoint_prompt_queries), each camera also reports whether each query points at the cube the prompt names or
at the other one (prompt_query_grounding: image distances to both cubes' projections). With `--episodes N`, the
closed loop on scenes `--first-scene` + j (sft_success's traced evaluation: success, failure modes, the aim summary:
does the grasp point follow the target).
Prints one JSON object (and writes --out). Usage::

    .venv/bin/python bench/keypoint_probe.py --checkpoint CK --dataset DEMOS --colors fixed --episodes 20 --out p.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from critic_trainer.sft import heldout_flow_loss, load_demo_data  # noqa: E402
from qvgm.policy import load_policy  # noqa: E402

TUNING_SCENE0 = 200_000  # closed-loop scenes: the tuning range, never the benchmark's held-out 900000+


def _sft_success():
    spec = importlib.util.spec_from_file_location("bench_sft_success", Path(__file__).with_name("sft_success.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def query_grounding(policy: torch.nn.Module, data, rows: np.ndarray, query_xy: np.ndarray, task: str,
                    camera: str) -> dict:
    """Do the prompt-query keypoints of `camera`, query_xy [F, Q, 2] (keypoint convention), point at the cube the
    prompt names or at the other one? Per query: the median image distance ([-1, 1] units) to each cube's
    projection and the fraction of frames (both cubes inside the image) where it is nearer the named one."""
    from critic_trainer.sft import grounding_targets
    from qvgm.sim.tasks import ROLES

    other = ROLES[task].index("distractor_0")
    size = policy.config.image_size
    target, t_in = (v.numpy()[rows] for v in grounding_targets(data, camera, size, role=0))
    distractor, d_in = (v.numpy()[rows] for v in grounding_targets(data, camera, size, role=other))
    both = t_in & d_in
    out = {"frames_both_inside": int(both.sum())}
    for j in range(query_xy.shape[1] if both.any() else 0):
        dt = np.linalg.norm(query_xy[:, j] - target, axis=1)[both]
        dd = np.linalg.norm(query_xy[:, j] - distractor, axis=1)[both]
        out[f"query_{j}"] = {"median_dist_named_cube": round(float(np.median(dt)), 3),
                             "median_dist_other_cube": round(float(np.median(dd)), 3),
                             "nearer_named_cube": round(float((dt < dd).mean()), 3)}
    return out


@torch.no_grad()
def open_loop(policy: torch.nn.Module, data, rows: np.ndarray, task: str = "pick_place") -> dict:
    """Keypoint statistics on frames `rows` of `data` (see the module docstring)."""
    kp = policy.model.keypoints
    if kp is None:
        raise SystemExit("the checkpoint has no keypoints (keypoint_tokens = 0)")
    if data.privileged is None:
        raise SystemExit("the dataset has no privileged object poses (the target's position is unknown)")
    inp = policy.preprocess(data.observations(rows))
    target = data.privileged[rows][:, :2].astype(np.float64)
    out: dict = {"frames": len(rows)}
    # what the keypoints read from the prompt (FiLM vector, prompt queries), one camera at a time
    cond, queries = policy.model.keypoint_conditioning(inp["tokens"], inp["token_mask"], 1)
    q = queries.shape[1] if queries is not None else 0
    for ci, cam in enumerate(policy.config.camera_names):
        images = inp["images"][:, ci]
        xy = kp.coordinates(images, cond, queries=queries).double().numpy()  # [F, K + Q, 2]
        coords = xy.reshape(len(rows), -1)
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = np.abs(np.corrcoef(np.c_[coords, target].T)[: coords.shape[1], coords.shape[1]:])
        tokens = kp(images, cond, queries=queries).float()  # [F, T, width]
        out[cam] = {"coord_std": round(float(xy.std(0).mean()), 4),
                    "max_abs_corr_target_xy": round(float(np.nanmax(corr)), 3),
                    "linear_r2_target_xy": _linear_r2(coords, target),
                    "token_std_over_frames": round(float(tokens.std(0).mean()), 4),
                    "token_norm": round(float(tokens.norm(dim=-1).mean()), 3)}
        if q:  # the prompt-query keypoints alone: do they find the cube the prompt names?
            out[cam]["prompt_query_r2_target_xy"] = _linear_r2(xy[:, -q:].reshape(len(rows), -1), target)
            out[cam]["prompt_query_grounding"] = query_grounding(policy, data, rows, xy[:, -q:], task, cam)
    return out


def _linear_r2(coords: np.ndarray, target: np.ndarray) -> list[float]:
    """R^2 per target column of a least-squares linear read-out (with intercept) of target [F, 2] from coords [F, C]."""
    design = np.c_[coords, np.ones(len(coords))]
    beta, *_ = np.linalg.lstsq(design, target, rcond=None)
    r2 = 1.0 - ((design @ beta - target) ** 2).sum(0) / ((target - target.mean(0)) ** 2).sum(0)
    return [round(float(v), 3) for v in r2]


def keypoint_reliance(policy: torch.nn.Module, data, seed: int = 0) -> dict:
    """Open-loop flow loss on `data` (fixed noise / flow-time draws) as is, and with every frame's keypoint tokens
    replaced by those of another frame of its batch (the same camera; the SigLIP tokens untouched). The increase is
    how much the policy's actions depend on what the keypoints say: ~0 = the policy ignores them."""
    kp = policy.model.keypoints
    n_cams = len(policy.config.camera_names)
    gen = torch.Generator().manual_seed(seed)

    def swap(_module, _inputs, out):  # out [B * N, T, width], cameras innermost
        b = out.shape[0] // n_cams
        perm = torch.randperm(b, generator=gen).to(out.device)
        return out.view(b, n_cams, *out.shape[1:])[perm].reshape(out.shape)

    plain = heldout_flow_loss(policy, data, seed=seed)
    handle = kp.register_forward_hook(swap)
    try:
        swapped = heldout_flow_loss(policy, data, seed=seed)
    finally:
        handle.remove()
    return {"flow_loss": round(plain, 4), "flow_loss_keypoints_swapped": round(swapped, 4),
            "increase": round(swapped - plain, 4)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--dataset", required=True, type=Path, help="demos recorded with privileged object poses")
    ap.add_argument("--episodes-data", type=int, default=20, help="first N episodes of the dataset")
    ap.add_argument("--stride", type=int, default=3, help="every k-th frame")
    ap.add_argument("--task", default="pick_place")
    ap.add_argument("--colors", choices=["random", "fixed"], default="random")
    ap.add_argument("--episodes", type=int, default=0, help="closed-loop episodes (0 = open loop only)")
    ap.add_argument("--first-scene", type=int, default=TUNING_SCENE0)
    ap.add_argument("--n-exec", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    policy = load_policy(args.checkpoint).eval()
    if not getattr(policy.config, "keypoint_tokens", 0):
        raise SystemExit(f"{args.checkpoint}: no keypoints (keypoint_tokens = 0)")
    data = load_demo_data([args.dataset], policy.horizon, with_images=True, max_episodes=args.episodes_data)
    rows = np.arange(0, len(data), max(1, args.stride))
    result: dict = {"bench": "keypoint_probe", "checkpoint": str(args.checkpoint), "dataset": str(args.dataset),
                    "keypoint_tokens": policy.config.keypoint_tokens,
                    "keypoint_per_token": bool(getattr(policy.config, "keypoint_per_token", False)),
                    "patch_token_dropout": float(getattr(policy.config, "patch_token_dropout", 0.0)),
                    "keypoint_prompt_queries": int(getattr(policy.config, "keypoint_prompt_queries", 0)),
                    "open_loop": open_loop(policy, data, rows, args.task),
                    "keypoint_reliance": keypoint_reliance(policy, data.subset(rows))}
    if args.episodes:
        bench = _sft_success()
        ns = argparse.Namespace(n_exec=args.n_exec, image_size=[policy.config.image_size] * 2, colors=args.colors)
        seeds = list(range(args.first_scene, args.first_scene + args.episodes))
        ev = bench.traced_eval(policy, args.task, seeds, bench.eval_env(policy, args.task, ns), ns)
        result["closed_loop"] = {"scenes": f"{seeds[0]}..{seeds[-1]}", "colors": args.colors,
                                 **{k: v for k, v in ev.items() if k != "runs"}}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    return result


if __name__ == "__main__":
    main()
