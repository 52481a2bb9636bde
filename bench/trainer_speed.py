"""critic_trainer update speed on CPU (issue 5 "Measured"): prints JSON.

Per policy config (`state`, `pi05-small`; randomly initialised, the cost does not depend on the weights):
  critic_updates_per_s   one CriticTrainer.update (Cal-QL, ensemble of 2, per-layer injection, batch
                         --critic-batch) on cached features (training never touches images)
  qvgm_update_s          one Q-VGM actor update (critic_trainer.qvgm.qvgm_update): encode + K=10 no-grad rollout +
                         K reference velocities + J=4 batched ascent steps + K graph-holding actor velocities
  dql_update_s           one Diffusion-QL update at the same batch and K: backprop through all K Euler steps + BC
                         (critic_trainer.baselines.diffusion_ql_loss through pipeline.DifferentiableSampler)
  dql_over_qvgm          ratio of the medians (the headline: > 1 means Q-VGM is cheaper)
  peak_rss_mb_*          process peak RSS after each phase (ru_maxrss; monotone, so phases run cheapest first)
Medians over --reps timed repetitions after --warmup untimed ones, Q-VGM and DQL repetitions interleaved (same
machine load for the ratio); torch threads --threads.

    .venv/bin/python bench/trainer_speed.py [--configs state pi05-small] [--actor-batch 32] [--critic-batch 256]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from critic_trainer.baselines import diffusion_ql_loss  # noqa: E402
from critic_trainer.critic import CriticBatch, CriticConfig, CriticTrainConfig, CriticTrainer, QEnsemble  # noqa: E402
from critic_trainer.features import critic_state_features  # noqa: E402
from critic_trainer.pipeline import DifferentiableSampler  # noqa: E402
from critic_trainer.qvgm import QVGMConfig, bind_critic, qvgm_update  # noqa: E402
from qvgm.policy.factory import make_policy  # noqa: E402
from qvgm.policy.processor import NormStats  # noqa: E402

PROMPT = "push the red cube to the green target"
N_EXEC, REAL, PRIV = 5, 7, 21


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(fn: Any, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def observations(policy: Any, b: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    cams = list(getattr(policy.config, "camera_names", []) or [])
    size = int(getattr(policy.config, "image_size", 0) or 0)
    obs = []
    for _ in range(b):
        o: dict[str, Any] = {"state": rng.uniform(-1, 1, REAL).astype(np.float32), "prompt": PROMPT,
                             "images": {c: rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for c in cams}}
        if int(getattr(policy.config, "privileged_dim", 0) or 0):
            o["privileged"] = rng.uniform(-0.5, 0.5, PRIV).astype(np.float32)
        obs.append(o)
    return obs


def bench_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    overrides: dict[str, Any] = {"state_dim": REAL, "real_action_dim": REAL}
    if name == "state":
        overrides["privileged_dim"] = PRIV
    else:
        overrides["camera_names"] = ["front", "wrist"]
    policy = make_policy(name, NormStats.identity(REAL, REAL), tasks=[PROMPT], **overrides)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    actor = policy.train()
    params = sum(p.numel() for p in actor.parameters())
    inputs = actor.preprocess(observations(actor, args.actor_batch, rng))
    with torch.no_grad():
        ctx = reference.encode(inputs)
        z = critic_state_features(reference, ctx, inputs, "rl-token" if name == "state" else "pooled")
    p = inputs["state"].float()
    critic = QEnsemble(CriticConfig(feature_dim=z.shape[-1], proprio_dim=p.shape[-1], n_exec=N_EXEC,
                                    real_action_dim=REAL, num_q=2, hidden=tuple(args.critic_hidden)))
    trainer = CriticTrainer(critic, CriticTrainConfig(reg_weight=0.1))
    cb, a = args.critic_batch, N_EXEC * REAL
    g = torch.Generator().manual_seed(1)
    batch = CriticBatch(z=torch.randn(cb, z.shape[-1], generator=g), p=torch.randn(cb, p.shape[-1], generator=g),
                        actions=torch.rand(cb, a, generator=g) * 2 - 1, rewards=torch.zeros(cb, N_EXEC),
                        done=torch.zeros(cb), z_next=torch.randn(cb, z.shape[-1], generator=g),
                        p_next=torch.randn(cb, p.shape[-1], generator=g), mc_return=torch.rand(cb, generator=g),
                        ref_actions=torch.rand(cb, 4, a, generator=g) * 2 - 1,
                        ref_next_actions=torch.rand(cb, 4, a, generator=g) * 2 - 1)
    critic_t = timed(lambda: trainer.update(batch), args.warmup, args.reps * 5)
    rss_critic = rss_mb()

    q_fn = bind_critic(critic, z, p)
    opt = torch.optim.AdamW(actor.parameters(), lr=1e-5)
    qcfg = QVGMConfig(n_exec=N_EXEC, num_steps=10)
    chunks = torch.rand(args.actor_batch, actor.horizon, actor.action_dim, generator=g) * 2 - 1
    chunks[..., REAL:] = 0.0

    def qvgm_step() -> None:
        qvgm_update(actor, reference, opt, inputs, q_fn, qcfg)

    def dql_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss, _ = diffusion_ql_loss(DifferentiableSampler(actor), inputs, q_fn, N_EXEC, num_steps=10,
                                    bc_actions=chunks)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(actor.parameters(), 1.0)
        opt.step()

    # Q-VGM first (peak RSS is monotone), then the two interleaved so both see the same machine load
    qvgm_t = timed(qvgm_step, args.warmup, 1)
    rss_qvgm = rss_mb()
    dql_t = timed(dql_step, args.warmup, 1)
    for _ in range(args.reps - 1):
        qvgm_t += timed(qvgm_step, 0, 1)
        dql_t += timed(dql_step, 0, 1)
    rss_dql = rss_mb()
    med = statistics.median
    return {"config": name, "params": params, "actor_batch": args.actor_batch, "critic_batch": cb,
            "critic_hidden": list(args.critic_hidden), "critic_feature_dim": int(z.shape[-1]),
            "critic_updates_per_s": round(1.0 / med(critic_t), 1),
            "qvgm_update_s": round(med(qvgm_t), 4), "qvgm_updates_per_s": round(1.0 / med(qvgm_t), 2),
            "dql_update_s": round(med(dql_t), 4), "dql_updates_per_s": round(1.0 / med(dql_t), 2),
            "dql_over_qvgm": round(med(dql_t) / med(qvgm_t), 2),
            "peak_rss_mb_after_critic": round(rss_critic), "peak_rss_mb_after_qvgm": round(rss_qvgm),
            "peak_rss_mb_after_dql": round(rss_dql)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["state", "pi05-small"])
    ap.add_argument("--actor-batch", type=int, default=32)
    ap.add_argument("--critic-batch", type=int, default=256)
    ap.add_argument("--critic-hidden", type=int, nargs="+", default=[256, 256])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"bench": "trainer_speed", "machine": platform.machine(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "threads": args.threads, "load_avg_1min_start": round(os.getloadavg()[0], 2),
              "results": [bench_config(c, args) for c in args.configs],
              "load_avg_1min_end": round(os.getloadavg()[0], 2)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
