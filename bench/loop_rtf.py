"""Which real_time_factor keeps the loop's control loop healthy? Prints JSON.

Builds (or reuses) the loop's round-0 policy in WORK (demos + SFT with the loop's defaults, qvgm_policy_node.loop),
then for every factor runs the loop's own in-process sim graph (sim time: /clock from sim_node, use_sim_time on
every node) for N recorded episodes of that policy on probe scene seeds PROBE0 + k (neither collection, evaluation
nor benchmark seeds) and reports the loop's control-loop health (SimLoop.health_report: effective RTF, sim tick
interval p50/p99/max in wall ms, missed ticks, late/dropped chunks, holds), frames per episode and successes::

    .venv/bin/python bench/loop_rtf.py --work /tmp/loop_rtf --rtf 1 2 3 4 --episodes 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import emit  # noqa: E402
from qvgm_policy_node import loop  # noqa: E402  (sets the loopback DDS environment before rclpy)

PROBE0 = 2_000_000  # probe scene seeds: disjoint from the loop's demos (0..), rollouts (10000 r..), eval (1e6..)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/loop_rtf")
    p.add_argument("--rtf", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0])
    p.add_argument("--episodes", type=int, default=8)
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    args = loop.build_parser().parse_args(["--work", str(work), "--no-progress"])
    loop.resolve_recipe(args)
    log = loop.Progress()
    state = loop.LoopState(work)
    demos = loop.stage_demos(args, work, log)
    v0 = loop.stage_sft(args, work, demos, state, log)
    rows = []
    for rtf in a.rtf:
        args.real_time_factor = rtf
        root = work / f"probe_rtf{rtf:g}"
        shutil.rmtree(root, ignore_errors=True)
        load0 = os.getloadavg()[0]
        with loop.SimLoop(args, work, log) as sim:
            sim.wait_serving(v0)
            t0, before = time.monotonic(), sim.health()
            infos = sim.episodes(root, a.episodes, f"rtf {rtf:g}", seed=PROBE0)
            h = sim.health_report(before, t0, infos)
        steps = np.concatenate([np.diff(i["stamps"]) for i in infos])  # recorded frame spacing, sim s (0.1 nominal)
        counters = h.pop("counters", {})
        rows.append({"rtf": rtf, "episodes": len(infos), "successes": sum(bool(i["success"]) for i in infos),
                     "frames": [int(i["frames"]) for i in infos],
                     "sim_s_per_episode": [round(float(i["stamps"][-1] - i["stamps"][0]), 2) for i in infos],
                     "frame_step_s_p50_p90_max": [round(float(np.percentile(steps, q)), 3) for q in (50, 90, 100)],
                     "camera_rendered": counters.get("sim.camera_rendered", 0),
                     "load1_before": round(load0, 2), "load1_after": round(os.getloadavg()[0], 2), **h})
        log("rtf", json.dumps(rows[-1]))
    out = {"v0": v0, "episodes_per_factor": a.episodes, "probe_seed0": PROBE0, "rows": rows}
    return emit(out, a.out)


if __name__ == "__main__":
    main()
