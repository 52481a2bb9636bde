"""Train the RL token (qvgm.policy.rl_token) of a pi05 checkpoint on dataset observations, VLA frozen.

    critic_trainer rl-token --policy CKPT --dataset DIR [--dataset DIR2] --out CKPT2 --steps N --seed S

The prefix embeddings of every frame are computed once with the frozen policy (no gradient) and cached; the
last `--val-frac` of the episodes are held out. Reports (stdout JSON and the manifest summary) the held-out
teacher-forced reconstruction cosine similarity before (untrained token) and after training. The new
checkpoint is the input one plus the RL token (config field `rl_token`, weights `rl_token.*`), parent = the
input's version; critic_features of the loaded policy then return z_rl.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qvgm.policy import load_policy, save_policy
from qvgm.policy.flow import FlowPolicyBase
from qvgm.policy.rl_token import RLTokenConfig, attach_rl_token, prefix_length

HELP = "train the RL token (critic features) of a pi05 checkpoint with the VLA frozen"


@torch.no_grad()
def prefix_embeddings(policy: FlowPolicyBase, observations: list[dict[str, Any]],
                      batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen final-norm prefix embeddings z [N, M, width] (float32, or float16 above 512 MB) and masks [N, M]."""
    zs, ms = [], []
    big = None
    for s in range(0, len(observations), batch):
        ctx = policy.encode(policy.preprocess(observations[s:s + batch]))
        z = ctx.prefix_out.float().cpu()
        if big is None:
            big = z[0].numel() * 4 * len(observations) > 512 * 2**20
        zs.append(z.half() if big else z)
        ms.append(ctx.prefix_mask.cpu())
    return torch.cat(zs), torch.cat(ms)


def split_by_episode(episode: np.ndarray, val_frac: float) -> tuple[np.ndarray, np.ndarray]:
    """Frame rows (train, held-out): the last ceil(val_frac * n_episodes) episodes (>= 1, < n) are held out."""
    eps = np.unique(episode)
    if len(eps) < 2:
        raise ValueError(f"need at least 2 episodes to hold some out, got {len(eps)}")
    n_val = min(len(eps) - 1, max(1, int(np.ceil(val_frac * len(eps)))))
    val_eps = eps[-n_val:]
    val = np.isin(episode, val_eps)
    return np.nonzero(~val)[0], np.nonzero(val)[0]


def _cosine(mod: torch.nn.Module, z: torch.Tensor, m: torch.Tensor, dev: torch.device,
            drop_context: bool = False) -> float:
    vals = [mod.cosine(z[s:s + 64].float().to(dev), m[s:s + 64].to(dev), drop_context=drop_context)
            for s in range(0, len(z), 64)]
    return float(torch.cat(vals).mean())


def lr_at(step: int, steps: int, lr: float, warmup: int, schedule: str) -> float:
    """Learning rate of optimizer step `step` (0-based): `constant`, or `cosine` = linear warm-up over
    min(`warmup`, steps // 10) steps then cosine decay to 0.05 * lr at the last step."""
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule {schedule!r} (constant, cosine)")
    warmup = min(warmup, steps // 10)
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def train_rl_token(policy: FlowPolicyBase, observations: list[dict[str, Any]] | None, episode: np.ndarray,
                   steps: int = 2000, seed: int = 0, batch_size: int = 32, lr: float = 1e-3, dim: int = 256,
                   heads: int = 4, layers: int = 2, context_dropout: float = 0.3, val_frac: float = 0.2,
                   log_every: int = 50, schedule: str = "cosine", warmup: int = 100,
                   prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
    """Attach and train an RL token on `policy` (a pi05 policy, frozen here). observations: interface dicts,
    episode [N] episode id per observation (held-out split); `prefix` = precomputed (z, mask) from
    `prefix_embeddings` instead of observations (to compare settings on one cache). Returns a report with held-out
    cosine before/after (teacher forced; `*_zrl_only`: every context token dropped, i.e. from z_rl alone), the
    final training loss and the loss curve [(step, loss)]. lr 1e-3 with the cosine schedule replaced 3e-4 constant
    (bench/results/rl_token_pi05small_sweep.json)."""
    n_obs = len(prefix[0]) if prefix is not None else len(observations or [])
    if n_obs != len(episode):
        raise ValueError(f"{n_obs} observations but {len(episode)} episode ids")
    lr_at(0, steps, lr, warmup, schedule)  # unknown schedule -> ValueError before any work
    torch.manual_seed(seed)
    policy.eval()
    for p in policy.parameters():
        p.requires_grad_(False)
    z, m = prefix if prefix is not None else prefix_embeddings(policy, observations or [])
    tr, va = split_by_episode(np.asarray(episode), val_frac)
    cfg = RLTokenConfig(width=z.shape[2], max_len=prefix_length(policy.config), dim=dim, heads=heads,
                        enc_layers=layers, dec_layers=layers, context_dropout=context_dropout)
    if z.shape[1] != cfg.max_len:
        raise ValueError(f"prefix has {z.shape[1]} tokens, config implies {cfg.max_len}")
    mod = attach_rl_token(policy, cfg)
    dev = policy.device
    before = _cosine(mod, z[va], m[va], dev)
    before_rl = _cosine(mod, z[va], m[va], dev, drop_context=True)
    opt = torch.optim.AdamW(mod.parameters(), lr=lr, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    mod.train()
    curve = []
    loss_v = float("nan")
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup, schedule)
        rows = torch.from_numpy(tr[rng.integers(0, len(tr), size=batch_size)])
        loss = mod.loss(z[rows].float().to(dev), m[rows].to(dev), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mod.parameters(), 1.0)
        opt.step()
        loss_v = loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            curve.append((step + 1, loss_v))
    mod.eval()
    for p in mod.parameters():
        p.requires_grad_(False)
    after = _cosine(mod, z[va], m[va], dev)
    after_rl = _cosine(mod, z[va], m[va], dev, drop_context=True)
    return {"heldout_cosine_untrained": before, "heldout_cosine": after, "heldout_cosine_zrl_only_untrained": before_rl,
            "heldout_cosine_zrl_only": after_rl, "final_loss": loss_v,
            "train_frames": int(len(tr)), "heldout_frames": int(len(va)), "steps": steps, "seed": seed,
            "lr": lr, "schedule": schedule, "warmup": warmup, "batch_size": batch_size,
            "config": cfg.to_dict(), "loss_curve": curve}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", required=True, help="pi05 checkpoint directory (frozen)")
    p.add_argument("--dataset", action="append", required=True, help="replay-buffer dataset dir (repeatable)")
    p.add_argument("--out", required=True, help="output checkpoint directory (must not exist)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"], help="lr schedule")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (cosine schedule)")
    p.add_argument("--dim", type=int, default=256, help="z_rl size")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2, help="encoder and decoder depth")
    p.add_argument("--context-dropout", type=float, default=0.3)
    p.add_argument("--val-frac", type=float, default=0.2, help="fraction of episodes held out")
    p.add_argument("--max-episodes", type=int, default=None)
    p.add_argument("--version", default=None)
    p.add_argument("--threads", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    from critic_trainer.sft import load_demo_data

    if args.threads:
        torch.set_num_threads(args.threads)
    if Path(args.out).exists():
        raise FileExistsError(f"output checkpoint {args.out} already exists")
    policy = load_policy(args.policy)
    if getattr(policy.config, "backbone", None) != "pi05":
        raise ValueError("the RL token needs a pi05 checkpoint (the `state` backbone uses its encoder embedding)")
    if policy.config.rl_token is not None:
        raise ValueError(f"{args.policy} already has an RL token")
    data = load_demo_data(args.dataset, 1, with_images=True, max_episodes=args.max_episodes)
    if data.state.shape[1] != policy.config.state_dim:
        raise ValueError(f"dataset state dim {data.state.shape[1]} != policy state_dim {policy.config.state_dim}")
    report = train_rl_token(policy, data.observations(range(len(data))), data.episode, steps=args.steps,
                            seed=args.seed, batch_size=args.batch_size, lr=args.lr, dim=args.dim, heads=args.heads,
                            layers=args.layers, context_dropout=args.context_dropout, val_frac=args.val_frac,
                            schedule=args.schedule, warmup=args.warmup)
    parent = policy.version
    summary = {"kind": "rl_token", "datasets": data.datasets, "parent_summary": policy.manifest.get("summary"),
               **{k: v for k, v in report.items() if k != "loss_curve"}}
    manifest = save_policy(policy, args.out, version=args.version or f"{parent}+rltok", parent=parent, summary=summary)
    print(json.dumps({"out": args.out, "version": manifest["version"],
                      "heldout_cosine_untrained": report["heldout_cosine_untrained"],
                      "heldout_cosine": report["heldout_cosine"], "final_loss": report["final_loss"]}))
    return 0
