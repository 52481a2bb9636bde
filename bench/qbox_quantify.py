"""How much Q-VGM's ascent projection moves real actions: [-1, 1] ("unit") vs the buffer's per-dim range ("data").

Reads a bench/learning.py work dir (SFT checkpoint, 60-rollout buffer, cached features and trained critic per
training seed) and, at --frames random buffer frames, measures with the SFT policy as both actor and reference
(Q-VGM's first update; openpi flow time: t = 1 noise, t = 0 clean; K = 10 Euler steps):
  - buffer: fraction of normalised executed-action coordinates outside [-1, 1] and outside the data box, per dim;
  - SFT samples: the same for the critic coordinates (first n_exec steps x real dims) of the policy's own chunks,
    and the mean distance to [-1, 1] of the coordinates outside it;
  - the ascent targets A_Q of the gated steps (last 5 of 10) from A_base = x_k - t_k v_base(x_k, t_k), per box
    ("unit", "data", "none" = no projection, and the no-critic control J = 0): fraction of chunk-steps whose kept
    iterate is not A_base, fraction of coordinates moved, mean |A_Q - A_base| over all / over moved coordinates,
    on coordinates that start outside [-1, 1] vs inside, and the mean Q gain.
Prints JSON (and writes --out). Usage::

    PYTHONPATH=. .venv/bin/python bench/qbox_quantify.py --work /tmp/qb/w01 --seeds 0 1 --out q01.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from critic_trainer import pipeline as P
from critic_trainer.critic import critic_action
from critic_trainer.qvgm import QVGMConfig, bind_critic, gate_weights, q_ascent
from critic_trainer.sft import batch_inputs, encode_inputs
from qvgm.policy import load_policy


def _one(path: Path) -> Path:
    found = sorted(p for p in path.parent.glob(path.name) if not p.name.endswith((".tmp", ".work", ".json")))
    if len(found) != 1:
        raise SystemExit(f"expected one match for {path}, found {[str(f) for f in found]}")
    return found[0]


def outside(a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Distance of each coordinate of a [..., A] to the box [lo, hi] (0 inside)."""
    return (lo - a).clamp_min(0) + (a - hi).clamp_min(0)


@torch.no_grad()
def measure(work: Path, task: str, seed: int, frames: int, n_exec: int = 5) -> dict[str, Any]:
    sft_dir = _one(work / f"sft-{task}-s{seed}-*")
    policy = load_policy(sft_dir).eval()
    buf = P.load_buffer(_one(work / f"buffer-{sft_dir.name}-r*"), policy.horizon)
    feats, _ = P.extract_features(policy, buf, work / f"features-{task}-s{seed}", n_exec, num_ref=4, seed=seed)
    critic, _ = P.load_critic(_one(work / f"critic-{task}-s{seed}-*"))
    r = policy.real_action_dim
    out: dict[str, Any] = {"seed": seed, "sft": sft_dir.name, "frames_in_buffer": len(buf)}

    a_buf = torch.as_tensor(P.normalised_actions(policy, buf.action))  # [T, r]
    boxes = {name: P.action_box(policy, buf, P.ImproveConfig(n_exec=n_exec, action_box=name))
             for name in ("unit", "data")}
    lo_d, hi_d = boxes["data"][0][:r], boxes["data"][1][:r]
    out["data_box"] = {"lo": lo_d.tolist(), "hi": hi_d.tolist()}
    out["buffer_outside_unit_per_dim"] = (a_buf.abs() > 1).float().mean(0).tolist()
    out["buffer_outside_unit"] = float((a_buf.abs() > 1).float().mean())

    rng = np.random.default_rng(seed + 11)
    rows = rng.choice(len(buf), size=min(frames, len(buf)), replace=False)
    inputs = encode_inputs(policy, buf.demo)
    ctx = policy.encode(batch_inputs(inputs, torch.as_tensor(rows), policy.device))
    gen = torch.Generator().manual_seed(seed + 12)
    eps = torch.randn(len(rows), policy.horizon, policy.action_dim, generator=gen)
    chunk, path = policy.sample(ctx, num_steps=10, noise=eps, return_path=True)
    a_s = critic_action(chunk, n_exec, r)  # [B, n*r]
    per_dim = a_s.reshape(len(rows), n_exec, r)
    dist_u = outside(a_s, *boxes["unit"])
    out["sft_samples_outside_unit"] = float((dist_u > 0).float().mean())
    out["sft_samples_outside_unit_per_dim"] = (per_dim.abs() > 1).float().mean((0, 1)).tolist()
    out["sft_samples_mean_dist_to_unit_when_outside"] = float(dist_u[dist_u > 0].mean()) if (dist_u > 0).any() else 0
    out["sft_samples_outside_data"] = float((outside(a_s, *boxes["data"]) > 0).float().mean())
    out["sft_clamped_to_unit_rms_shift"] = float((a_s.clamp(-1, 1) - a_s).pow(2).mean(-1).sqrt().mean())

    z, p = torch.as_tensor(np.asarray(feats["z_rl"][rows])), torch.as_tensor(np.asarray(feats["proprio"][rows]))
    q_fn = bind_critic(critic, z, p, how="mean")
    out["q_sft_samples"] = float(q_fn(a_s).mean())
    out["q_sft_samples_clamped_unit"] = float(q_fn(a_s.clamp(-1, 1)).mean())

    # Q-VGM's first update: A_base at the gated steps (actor = reference = SFT)
    cfg = QVGMConfig(n_exec=n_exec)
    xs, ts = path.x[:-1], path.t[:-1]
    gated = [k for k, m in enumerate(gate_weights(ts, cfg).tolist()) if m > 0]
    b = len(rows)
    a_base = torch.stack([(xs[k] - ts[k] * policy.velocity(xs[k], ts[k].expand(b), ctx))[:, :n_exec, :r].flatten(1)
                          for k in gated], dim=1)  # [B, M, n*r]
    start_out = (a_base.abs() > 1)
    out["a_base_outside_unit"] = float(start_out.float().mean())
    variants = {"unit": (cfg, boxes["unit"]), "data": (cfg, boxes["data"]),
                "none": (QVGMConfig(n_exec=n_exec, project=False), None),
                "nocritic_J0": (QVGMConfig(n_exec=n_exec, ascent_steps=0), boxes["data"])}
    asc: dict[str, Any] = {}
    for name, (c, box) in variants.items():
        with torch.enable_grad():
            a_q, gain = q_ascent(q_fn, a_base, c, box=box)
        d = (a_q - a_base).abs()
        moved = d > 1e-7
        asc[name] = {"chunk_steps_changed": float(moved.any(-1).float().mean()),
                     "coords_moved": float(moved.float().mean()),
                     "mean_abs_shift": float(d.mean()),
                     "rms_shift": float(d.pow(2).mean(-1).sqrt().mean()),
                     "mean_abs_shift_when_moved": float(d[moved].mean()) if moved.any() else 0.0,
                     "coords_outside_unit_moved": float(moved[start_out].float().mean()) if start_out.any() else 0,
                     "mean_abs_shift_outside_unit": float(d[start_out].mean()) if start_out.any() else 0.0,
                     "mean_abs_shift_inside_unit": float(d[~start_out].mean()),
                     "q_gain": float(gain.mean()),
                     "by_step_rms_shift": d.pow(2).mean(-1).sqrt().mean(0).tolist()}
    out["ascent"] = asc
    out["gated_t"] = [float(ts[k]) for k in gated]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="bench/learning.py --work dir")
    ap.add_argument("--task", default="pick_place")
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--frames", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = {"bench": "qbox_quantify", "work": str(args.work), "task": args.task,
           "seeds": [measure(args.work, args.task, s, args.frames) for s in args.seeds]}
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    return res


if __name__ == "__main__":
    main()
