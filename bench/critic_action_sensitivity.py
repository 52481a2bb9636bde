"""How much of a trained critic's Q depends on the action at a fixed state (what Q-VGM's ascent can use) vs on the
state (what an MC-return correlation mostly measures); JSON.

For a learning-benchmark work dir (bench/learning.py --work, cached critic-<task>-s<seed>-* and
features-<task>-s<seed>), on N random buffer frames: the ensemble-mean Q of the frozen reference policy's own
chunk samples (the 4 cached per frame), its variance across states (of the per-state mean) and within a state
(across the samples), and the within-state variance for random perturbations of one sample (+-sigma, normalised).

    .venv/bin/python bench/critic_action_sensitivity.py --work /tmp/lb/w234 --task pick_place --seeds 2 3 4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from critic_trainer.pipeline import load_critic  # noqa: E402


def sensitivity(work: Path, task: str, seed: int, frames: int, sigma: float) -> dict[str, float]:
    cdirs = sorted(work.glob(f"critic-{task}-s{seed}-*"))
    if not cdirs:
        raise SystemExit(f"no cached critic-{task}-s{seed}-* in {work} (run bench/learning.py with --work first)")
    critic, _ = load_critic(cdirs[-1])
    f = work / f"features-{task}-s{seed}"
    z, p, ref = (np.load(f / f"{k}.npy", mmap_mode="r") for k in ("z_rl", "proprio", "ref_actions"))
    rows = np.sort(np.random.default_rng(0).choice(len(z), min(frames, len(z)), replace=False))
    zt, pt, rt = (torch.as_tensor(np.asarray(x[rows])) for x in (z, p, ref))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        st = critic.encode_state(zt, pt)
        q_ref = critic.q_from_state(st, rt).mean(0)  # [B, S]
        pert = rt[:, :1] + sigma * torch.randn(len(rows), 8, rt.shape[-1], generator=g)
        q_pert = critic.q_from_state(st, pert).mean(0)  # [B, 8]
    across, within = float(q_ref.mean(1).var()), float(q_ref.var(1).mean())
    return {"frames": len(rows), "q_var_across_states": across, "q_var_within_state_policy_samples": within,
            f"q_var_within_state_perturbed_{sigma}": float(q_pert.var(1).mean()),
            "within_over_across": within / across}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--task", default="pick_place")
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--frames", type=int, default=2000)
    ap.add_argument("--sigma", type=float, default=0.1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {"bench": "critic_action_sensitivity", "work": str(args.work), "task": args.task,
           "seeds": {s: sensitivity(args.work, args.task, s, args.frames, args.sigma) for s in args.seeds}}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
