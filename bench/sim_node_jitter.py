"""Control-loop tick jitter of sim_node with two cameras publishing; JSON on stdout.

sim_node's stepping timer runs at --hz (default 10 Hz, the control rate) with `front` and `wrist` rendered at
--size x --size and published at the same rate; a subscriber in the same graph receives every image stream.
Jitter = |tick interval - nominal period| (ms), from the node's own tick wall times. Sets loopback DDS first.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's qvgm, when run as a script

from qvgm_policy_node.ros_env import apply_loopback_env  # noqa: E402

apply_loopback_env(keep_existing_domain=True)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hz", type=float, default=10.0)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--inline-render", action="store_true", help="render on the control thread (for comparison)")
    args = parser.parse_args()

    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    from qvgm_policy_node import topics
    from qvgm_policy_node.graph import Graph
    from qvgm_policy_node.profile import NodeSpec

    cams = ["front", "wrist"]
    params = {"cameras": cams, "image_width": args.size, "image_height": args.size, "camera_hz": args.hz,
              "joint_state_hz": args.hz, "task": "pick_place", "render_thread": not args.inline_render}
    received = {c: 0 for c in cams}
    with Graph([NodeSpec("sim_node", "sim_node", params)]) as g:
        sim = g.nodes["sim_node"]
        io = g.node("jitter_bench_io")
        for c in cams:
            io.create_subscription(Image, topics.camera_image(c),
                                   lambda _m, c=c: received.__setitem__(c, received[c] + 1), qos_profile_sensor_data)
        g.spin_for(args.warmup)
        n0, sim0, wall0 = len(sim.tick_times), float(sim.env.time), time.monotonic()
        rec0 = dict(received)
        g.spin_for(args.seconds)
        ticks = np.array(sim.tick_times[n0:])
        sim_advance = float(sim.env.time) - sim0
        wall = time.monotonic() - wall0
        worker = sim._render_worker
        dropped = worker.dropped if worker is not None else 0
    period = 1.0 / args.hz
    intervals = np.diff(ticks)
    jitter = np.abs(intervals - period) * 1e3
    out = {
        "bench": "sim_node_jitter", "hz": args.hz, "cameras": cams, "image_size": [args.size, args.size],
        "render_thread": not args.inline_render, "seconds": round(wall, 2), "ticks": int(len(ticks)),
        "jitter_ms_p50": round(float(np.percentile(jitter, 50)), 3) if len(jitter) else None,
        "jitter_ms_p99": round(float(np.percentile(jitter, 99)), 3) if len(jitter) else None,
        "interval_ms_p50": round(float(np.percentile(intervals, 50) * 1e3), 3) if len(intervals) else None,
        "interval_ms_p99": round(float(np.percentile(intervals, 99) * 1e3), 3) if len(intervals) else None,
        "real_time_factor_achieved": round(sim_advance / wall, 3),
        "camera_frames_dropped": dropped,
        "images_received_per_s": {c: round((received[c] - rec0[c]) / wall, 2) for c in cams},
        "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "machine": platform.node(),
        "mujoco_gl": os.environ.get("MUJOCO_GL"),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
