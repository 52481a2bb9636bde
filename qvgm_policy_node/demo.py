"""`make demo`: the simulated tabletop brought up in-process from the tabletop_sim profile, the scripted expert
driving it THROUGH the ROS topics (policy_node -> /arm_controller/joint_trajectory -> sim_node), episodes reset
through /sim_node/reset (task and seed set as sim_node parameters over the parameter services).

Prints one line per episode and a per-task summary; exits 0 when the run completed.
"""

from __future__ import annotations

from qvgm_policy_node.ros_env import apply_loopback_env

apply_loopback_env(keep_existing_domain=True)  # before rclpy: DDS discovery on loopback, per-run domain

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")


class EpisodeDriver:
    """Resets the sim through ROS and watches /qvgm/sim/success and /joint_states (robot clock)."""

    def __init__(self, graph: Any) -> None:
        from rclpy.parameter_client import AsyncParameterClient
        from sensor_msgs.msg import JointState
        from std_msgs.msg import Bool
        from std_srvs.srv import Trigger

        from qvgm_policy_node import topics
        from qvgm_policy_node.sim_node import from_time_msg

        self.graph = graph
        self.node = graph.node("demo_driver")
        self.params = AsyncParameterClient(self.node, "sim_node")
        self.reset_client = self.node.create_client(Trigger, "/sim_node/reset")
        self.success: list[tuple[bool, int]] = []  # (value, number of joint states received before it)
        self.js_stamps: list[float] = []  # robot clock: stamps of /joint_states
        self._from_time = from_time_msg
        self.node.create_subscription(JointState, topics.JOINT_STATES, self._on_js, 10)
        self.node.create_subscription(Bool, topics.SUCCESS,
                                      lambda m: self.success.append((m.data, len(self.js_stamps))), 10)

    def _on_js(self, msg: Any) -> None:
        self.js_stamps.append(self._from_time(msg.header.stamp))

    def reset(self, task: str, seed: int) -> str:
        from rclpy.parameter import Parameter
        from std_srvs.srv import Trigger

        fut = self.params.set_parameters([Parameter("task", value=task), Parameter("seed", value=seed)])
        if not self.graph.spin_until(fut.done, 10.0) or not all(r.successful for r in fut.result().results):
            raise RuntimeError(f"could not set sim_node parameters task={task} seed={seed}")
        self.success.clear()
        response = self.graph.call(self.reset_client, Trigger.Request(), timeout=30.0)
        if not response.success:
            raise RuntimeError(f"reset failed: {response.message}")
        return response.message

    def run_episode(self, time_limit: float, wall_limit: float) -> tuple[bool, float]:
        """Wait for success after the reset marker (the first False); returns (success, robot seconds)."""
        g = self.graph
        if not g.spin_until(lambda: any(not v for v, _ in self.success), 10.0):
            raise RuntimeError("no reset marker on /qvgm/sim/success")
        start_idx, n_js = next((i, n) for i, (v, n) in enumerate(self.success) if not v)
        if not g.spin_until(lambda: len(self.js_stamps) > n_js, 10.0):
            raise RuntimeError("no joint states after the reset")
        t0 = self.js_stamps[n_js]  # the first joint state after the reset marker
        wall_end = time.monotonic() + wall_limit

        def done() -> bool:
            return (any(v for v, _ in self.success[start_idx:]) or self.js_stamps[-1] - t0 >= time_limit
                    or time.monotonic() > wall_end)

        g.spin_until(done, wall_limit + 1.0)
        hits = [n for v, n in self.success[start_idx:] if v]
        if hits:
            return True, self.js_stamps[max(hits[0] - 1, n_js)] - t0
        return False, self.js_stamps[-1] - t0


def main(argv: list[str] | None = None) -> int:
    from qvgm.sim import TASKS
    from qvgm.sim.tasks import TIME_LIMIT_S

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=3, help="episodes per task")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first episode (then +1 per episode)")
    parser.add_argument("--profile", default="tabletop_sim")
    parser.add_argument("--real-time-factor", type=float, default=1.0)
    parser.add_argument("--image-size", type=int, default=0,
                        help="render SIZE x SIZE images instead of the profile's (0 = profile); the expert does not "
                             "look at them, and software rendering on a small CPU is the main cost")
    parser.add_argument("--camera-hz", type=float, default=0.0, help="camera rate (0 = the profile's)")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks or args.episodes < 1:
        parser.error(f"unknown tasks {unknown} (known: {list(TASKS)}) or --episodes < 1")

    from qvgm_policy_node.graph import Graph
    from qvgm_policy_node.profile import load_profile, node_specs

    sim_ov: dict[str, Any] = {"real_time_factor": args.real_time_factor, "task": tasks[0], "seed": args.seed}
    pol_ov: dict[str, Any] = {}
    if args.image_size:
        sim_ov.update(image_width=args.image_size, image_height=args.image_size)
    if args.camera_hz:
        sim_ov["camera_hz"] = args.camera_hz
        pol_ov["max_image_age"] = max(0.5, 3.0 / args.camera_hz)
    specs = node_specs(load_profile(args.profile), {"sim_node": sim_ov, "policy_node": pol_ov})
    print(f"qvgm demo: profile {args.profile}, ROS_DOMAIN_ID={os.environ['ROS_DOMAIN_ID']} (loopback), "
          f"nodes {[s.name for s in specs]}, sim overrides {sim_ov}", flush=True)
    results: dict[str, list[bool]] = {t: [] for t in tasks}
    t_start = time.monotonic()
    with Graph(specs) as graph:
        driver = EpisodeDriver(graph)
        seed = args.seed
        for task in tasks:
            for _ in range(args.episodes):
                prompt = driver.reset(task, seed)
                limit = TIME_LIMIT_S[task]
                t0 = time.monotonic()
                ok, robot_s = driver.run_episode(limit, wall_limit=3.0 * limit / args.real_time_factor + 10.0)
                results[task].append(ok)
                print(f"episode task={task:<10} seed={seed:<3} success={ok!s:<5} robot_time={robot_s:5.1f}s "
                      f"wall={time.monotonic() - t0:5.1f}s  prompt={prompt!r}", flush=True)
                seed += 1
        sim = graph.nodes["sim_node"]
        rejected = dict(sim.rejected)
    print("summary:")
    for task, oks in results.items():
        print(f"  {task:<10} {sum(oks)}/{len(oks)} successful")
    total = [ok for oks in results.values() for ok in oks]
    print(f"  all        {sum(total)}/{len(total)} successful in {time.monotonic() - t_start:.0f}s wall; "
          f"rejected trajectories: {rejected or 0}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
