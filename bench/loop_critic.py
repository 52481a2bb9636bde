"""The loop's critic settings, chosen on the loop's own rollouts: MC-return correlation of the critic on held-out
rollout episodes (and on the training rollouts) for critic steps x rollout fraction. Prints JSON.

Input: a finished loop round (WORK/rounds/rN/buffer = scripted demos + the rollouts collected so far, WORK/store
with the version that served them). A seeded third of the rollout episodes (stratified by outcome, at least one
failure) is held out of critic training; the critic trains on the demos + the other rollouts with the loop's
Q-VGM settings (qvgm_policy_node.loop.improve_config) and each (critic_steps, critic_rollout_fraction)::

    .venv/bin/python bench/loop_critic.py --work /tmp/loop_final/w --round 2 --steps 800 2000 --fractions 0 0.5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import emit  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="a loop work dir with a finished round")
    p.add_argument("--round", type=int, default=2)
    p.add_argument("--steps", type=int, nargs="+", default=[800, 2000])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.5])
    p.add_argument("--cache", default="/tmp/loop_critic_features")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="critic seeds (and held-out splits)")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    import dataclasses

    import torch

    from critic_trainer.pipeline import (
        buffer_transitions,
        extract_features,
        load_buffer,
        split_transitions,
        train_critic,
    )
    from qvgm.checkpoints import CheckpointStore
    from qvgm.policy import load_policy
    from qvgm_policy_node import loop

    torch.set_num_threads(1)
    work = Path(a.work)
    state = json.loads((work / loop.STATE_FILE).read_text())
    serving = state["rounds"][str(a.round)]["from"]
    policy = load_policy(CheckpointStore(work / "store").path(serving))
    policy.eval()
    buf = load_buffer(work / "rounds" / f"r{a.round}" / "buffer", policy.horizon)
    args = loop.build_parser().parse_args([])
    loop.resolve_recipe(args)
    base = loop.improve_config(args)
    tr = buffer_transitions(policy, buf, base.n_exec, base.gamma)
    features, _ = extract_features(policy, buf, a.cache, base.n_exec, num_ref=base.num_ref,
                                   num_steps=base.num_steps, seed=base.seed, features=base.critic_features)
    roll = buf.rollout_frames()
    ro_eps = np.unique(buf.episode[roll])
    ok = {int(e) for e in np.unique(buf.episode[buf.success])}
    rows = []
    for seed in a.seeds:
        rng = np.random.default_rng(1000 + seed)
        held = []
        for group in ([e for e in ro_eps if int(e) in ok], [e for e in ro_eps if int(e) not in ok]):
            if len(group) >= 2:
                held += rng.choice(group, size=max(1, round(len(group) / 3)), replace=False).tolist()
        held_arr = np.asarray(sorted(held), dtype=buf.episode.dtype)
        tr_fit, tr_held = split_transitions(buf, tr, held_arr)
        for steps in a.steps:
            for frac in a.fractions:
                cfg = dataclasses.replace(base, critic_steps=steps, critic_rollout_fraction=frac, seed=seed)
                t0 = time.perf_counter()
                with torch.inference_mode(False):
                    _, info = train_critic(policy, features, tr_fit, cfg, heldout=tr_held,
                                           rollouts=roll[tr_fit.index])
                row = {"seed": seed, "critic_steps": steps, "rollout_fraction": frac,
                       "wall_s": round(time.perf_counter() - t0, 1),
                       "corr_train_all": info["eval"]["mc_corr"],
                       "corr_train_rollouts": info.get("eval_rollouts", {}).get("mc_corr"),
                       "corr_heldout_rollouts": info["heldout"]["mc_corr"],
                       "mae_heldout_rollouts": info["heldout"]["mc_mae"]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = {"work": str(work), "round": a.round, "serving": serving, "episodes": int(len(np.unique(buf.episode))),
           "rollout_episodes": int(len(ro_eps)),
           "rollout_failures": int(sum(int(e) not in ok for e in ro_eps)), "rows": rows}
    return emit(out, a.out)


if __name__ == "__main__":
    main()
