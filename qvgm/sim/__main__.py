"""Run the scripted expert in the tabletop sim (no ROS) and print one JSON line per episode plus a summary.

    .venv/bin/python -m qvgm.sim --task push --episodes 5 [--noise 0.01] [--seed 0] [--expert-seed 0]
"""

from __future__ import annotations

import argparse
import json
import time

from qvgm.sim import TASKS, TabletopEnv, make_expert


def run_episode(env: TabletopEnv, expert, seed: int) -> dict:
    """One seeded episode of ``expert`` in ``env``; returns success, steps and sim time (s)."""
    obs, info = env.reset(seed=seed)
    expert.reset()
    steps, terminated = 0, False
    while True:
        obs, _reward, terminated, truncated, info = env.step(expert.act(obs["state"], env.object_poses()))
        steps += 1
        if terminated or truncated:
            break
    return {"task": env.task, "seed": seed, "prompt": env.prompt, "success": bool(terminated), "steps": steps,
            "sim_time_s": round(env.time, 3)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="scripted expert rollouts in the qvgm tabletop sim")
    ap.add_argument("--task", choices=[*TASKS, "all"], default="all")
    ap.add_argument("--episodes", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="first scene seed")
    ap.add_argument("--noise", type=float, default=0.0, help="expert noise std in m")
    ap.add_argument("--expert-seed", type=int, default=None)
    args = ap.parse_args(argv)
    tasks = TASKS if args.task == "all" else (args.task,)
    summary = {}
    t0 = time.perf_counter()
    for task in tasks:
        env = TabletopEnv(task=task, render=False)
        expert = make_expert(task, noise=args.noise, seed=args.expert_seed)
        wins = 0
        for k in range(args.episodes):
            res = run_episode(env, expert, args.seed + k)
            wins += res["success"]
            print(json.dumps(res), flush=True)
        summary[task] = {"success": wins, "episodes": args.episodes}
        env.close()
    out = {"summary": summary, "noise": args.noise, "wall_s": round(time.perf_counter() - t0, 2)}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
