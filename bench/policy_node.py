"""Policy-node benchmark in the MuJoCo sim over real DDS (loopback): prints JSON.

For each control rate (`--rates`, default 10 and 30 Hz; chunk_dt = 1/rate, horizon `--horizon`) one in-process
graph runs sim_node (no cameras) + policy_node (`flow` backend serving a CheckpointStore, tiny `state`
FlowPolicy) + a listener node. Reported per rate:
  obs_to_chunk_ms      joint-state receipt (listener) -> chunk with that observation stamp received (listener),
                       p50 / p99: DDS hop + async scheduling + inference + trim/blend/safety + DDS hop
  inference_ms         backend.infer wall time on the worker thread, p50 / p99
  hot_reload           `--reloads` consecutive publishes into the store while the robot runs:
                         (the publisher is a separate process at nice +10, standing in for the trainer's machine,
                         and the graph keeps spinning while it publishes;
                         `control_publishing_without_reload` runs the same publisher load into a store the node
                         does not watch, so the machine's own contention can be told apart from reload cost)
                         publish_to_first_chunk_s (store commit returned -> first chunk from the new weights
                         published), missed_chunk_ticks (policy chunks later than one control step past their
                         schedule), sim_tick_gaps (sim control ticks more than 2 periods apart, with a no-reload
                         baseline window of the same length: the machine's own jitter); counts are per window,
                         with the 1-min load average at its end
  restart              the same upgrade done by restarting the node: publish, stop the in-process policy node,
                       start `policy_node` as a new process; publish -> first chunk received from it. ratio =
                       restart / hot reload (median).
  boundary_jump_rad    joint jump at chunk boundaries (inf-norm): `raw` = new chunk vs the executing one,
                       `blended` = after the cross-fade over `--blend-steps` points (same run, same chunks)
Sets ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST and a free ROS_DOMAIN_ID itself.
Usage: .venv/bin/python bench/policy_node.py [--rates 10 30] [--reloads 10] [--horizon 10] [--hidden 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qvgm_policy_node.ros_env import apply_loopback_env  # noqa: E402

DOMAIN = apply_loopback_env()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import String  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

from qvgm.checkpoints import CheckpointStore  # noqa: E402
from qvgm.policy import NormStats, make_policy  # noqa: E402
from qvgm.policy.checkpoint_io import write_policy_files  # noqa: E402
from qvgm_policy_node import topics  # noqa: E402
from qvgm_policy_node.graph import Graph  # noqa: E402
from qvgm_policy_node.profile import NodeSpec, ros_params_yaml  # noqa: E402
from qvgm_policy_node.sim_node import TRANSIENT_LOCAL, from_time_msg  # noqa: E402

HOME = np.array([0.0, -0.4, 0.9, 0.0, 0.9, 0.0, 0.02])


def publish(store: CheckpointStore, seed: int, horizon: int, hidden: int) -> str:
    """A small untrained `state` FlowPolicy whose actions stay near HOME, published into the store."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    stats = NormStats.compute(HOME + rng.normal(size=(256, 7)) * 0.05, HOME + rng.normal(size=(256, 7)) * 0.03)
    policy = make_policy("state", stats, state_dim=7, real_action_dim=7, horizon=horizon, hidden=hidden,
                         embed_dim=hidden // 2, head_hidden=hidden, head_depth=2)
    with store.writing() as staged:
        write_policy_files(policy, staged.path)
    assert staged.version is not None
    return staged.version


class Publisher:
    """A separate process (the trainer's role) that publishes checkpoints into the store on request, so that
    writing/hashing never runs on the benchmark's executor thread. publish() returns (version, commit time on
    the system-wide monotonic clock)."""

    def __init__(self, root: Path, horizon: int, hidden: int) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve-publisher", str(root), str(horizon),
                                      str(hidden)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=str(REPO))

    def start(self, seed: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{seed}\n")
        self.proc.stdin.flush()

    def result(self, spin: Callable[[], None] | None = None, timeout: float = 60.0) -> tuple[str, float]:
        """Wait for the publisher's answer, calling `spin()` meanwhile: the graph keeps running (blocking on the
        pipe instead would stall the sim and the policy node for the whole publish and count as missed ticks)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while spin is not None and not select.select([self.proc.stdout], [], [], 0)[0]:
            if time.monotonic() > deadline:
                raise TimeoutError("checkpoint publisher did not answer")
            spin()
        version, t = self.proc.stdout.readline().split()
        return version, float(t)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(30)


def serve_publisher(root: str, horizon: int, hidden: int) -> None:
    """--serve-publisher: one seed per stdin line -> publish -> print "version monotonic_commit_time"."""
    torch.set_num_threads(1)
    os.nice(10)  # the trainer normally runs on another machine: keep its CPU load off the robot's control loop
    store = CheckpointStore(root, keep_last=None)
    for line in sys.stdin:
        v = publish(store, int(line), horizon, hidden)
        print(v, time.monotonic(), flush=True)


def pct(values: list[float], q: float, scale: float = 1.0) -> float | None:
    return round(float(np.percentile(values, q)) * scale, 4) if values else None


def tick_gaps(times: list[float], t0: float, t1: float, period: float) -> dict[str, Any]:
    ts = np.array([t for t in times if t0 <= t <= t1])
    gaps = np.diff(ts) if len(ts) > 1 else np.zeros(0)
    return {"ticks": int(len(ts)), "gaps_over_2_periods": int(np.sum(gaps > 2 * period)),
            "max_gap_ms": round(float(gaps.max()) * 1e3, 2) if len(gaps) else None}


WINDOW_STATS = {"missed_chunk_ticks": "missed_ticks", "late_chunks": "late_chunks", "dropped_chunks": "dropped_chunks",
                "stale_holds": "holds.stale_state", "swaps": "swaps"}


def window_counts(node: Any, before: dict[str, int] | None = None) -> dict[str, int]:
    """The policy node's counters (missed ticks, late/dropped chunks, stale holds, swaps), minus `before`."""
    now = {k: int(node.stats[stat]) for k, stat in WINDOW_STATS.items()}
    return {k: v - (before or {}).get(k, 0) for k, v in now.items()}


def run_rate(hz: float, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    store = CheckpointStore(root / f"store_{int(hz)}", keep_last=None)
    seed = 1
    v = publish(store, seed, args.horizon, args.hidden)
    dt = 1.0 / hz
    js_hz = max(50.0, 2 * hz)
    physics_hz = next(f for f in (500.0, 600.0, 1000.0, 100.0 * hz) if (f / hz) == int(f / hz))
    sim = {"cameras": [], "control_hz": hz, "joint_state_hz": js_hz, "physics_hz": physics_hz}
    pol = {"backend": "flow", "checkpoint_store": str(store.root), "cameras": [], "num_steps": args.num_steps,
           "seed": 0, "chunk_dt": dt, "control_hz": hz, "poll_hz": max(50.0, 2 * hz),
           "async_start_fraction": args.start_fraction, "blend_steps": args.blend_steps, "reload_watch": "inotify",
           "reload_budget_s": 1.0, **args.param}
    js_receipt: dict[float, float] = {}
    chunk_rx: list[tuple[float, float]] = []  # (receipt monotonic, header stamp)
    latencies: list[float] = []

    def on_js(msg: JointState) -> None:
        js_receipt[from_time_msg(msg.header.stamp)] = time.monotonic()
        if len(js_receipt) > 5000:
            for k in sorted(js_receipt)[:2500]:
                del js_receipt[k]

    def on_chunk(msg: JointTrajectory) -> None:
        now = time.monotonic()
        stamp = from_time_msg(msg.header.stamp)
        chunk_rx.append((now, stamp))
        if stamp in js_receipt and len(msg.points) > 1:
            latencies.append(now - js_receipt[stamp])

    out: dict[str, Any] = {"control_hz": hz, "chunk_dt": dt, "horizon": args.horizon, "joint_state_hz": js_hz}
    with Graph([NodeSpec("sim_node", "sim_node", sim), NodeSpec("policy_node", "policy_node", pol)]) as g:
        node, simn = g.nodes["policy_node"], g.nodes["sim_node"]
        io = g.node("bench_io")
        io.create_subscription(JointState, topics.JOINT_STATES, on_js, 50)
        io.create_subscription(JointTrajectory, topics.TRAJECTORY, on_chunk, 50)
        io.create_publisher(String, topics.TASK, TRANSIENT_LOCAL).publish(String(data="pick the cube"))
        if not g.spin_until(lambda: node.published_versions.count(v) >= 10, 60):
            raise RuntimeError(f"policy node did not serve {v}: {dict(node.skipped)}")

        # baseline window (no reload) for the sim's tick jitter
        t0 = time.monotonic()
        g.spin_for(args.window)
        out["sim_tick_gaps_baseline"] = tick_gaps(simn.tick_times, t0, time.monotonic(), 1.0 / js_hz)

        # control window: the same publisher load into a store the node does not watch (no reload happens);
        # separates the machine's load from the cost of hot reloading itself
        other = CheckpointStore(root / f"unwatched_{int(hz)}", keep_last=None)
        pub = Publisher(other.root, args.horizon, args.hidden)
        before = window_counts(node)
        t0 = time.monotonic()
        for i in range(args.reloads):
            pub.start(1000 + i)
            pub.result(g.spin_once)
            g.spin_for(args.spacing + 0.3)
        out["control_publishing_without_reload"] = {
            **window_counts(node, before), "load_avg_1min": round(os.getloadavg()[0], 2),
            "sim_tick_gaps": tick_gaps(simn.tick_times, t0, time.monotonic(), 1.0 / js_hz)}
        pub.close()

        before = window_counts(node)
        hot: list[float] = []
        pub = Publisher(store.root, args.horizon, args.hidden)
        t0 = time.monotonic()
        for _ in range(args.reloads):
            seed += 1
            pub.start(seed)
            v, t_pub = pub.result(g.spin_once)
            ok = g.spin_until(lambda v=v: v in node.published_versions, 30)
            if not ok:
                raise RuntimeError(f"{v} never served: {node.backend.diagnostic_values()}")
            t_first = next(w for w, _, ver in node.publish_log if ver == v)
            hot.append(t_first - t_pub)
            g.spin_for(args.spacing)
        t1 = time.monotonic()
        out["hot_reload"] = {
            "reloads": args.reloads, "publish_to_first_chunk_s": {"p50": pct(hot, 50), "max": pct(hot, 100)},
            **window_counts(node, before), "load_avg_1min": round(os.getloadavg()[0], 2),
            "refused": node.backend.reloader.counters["refused"],
            "sim_tick_gaps": tick_gaps(simn.tick_times, t0, t1, 1.0 / js_hz)}
        out["obs_to_chunk_ms"] = {"p50": pct(latencies, 50, 1e3), "p99": pct(latencies, 99, 1e3),
                                  "n": len(latencies)}
        inf = list(node.latencies)
        out["inference_ms"] = {"p50": pct(inf, 50, 1e3), "p99": pct(inf, 99, 1e3)}
        raw, blended = list(node.jumps_raw), list(node.jumps_blended)
        out["boundary_jump_rad"] = {"blend_steps": args.blend_steps,
                                    "raw": {"p50": pct(raw, 50), "p95": pct(raw, 95), "max": pct(raw, 100)},
                                    "blended": {"p50": pct(blended, 50), "p95": pct(blended, 95),
                                                "max": pct(blended, 100)}}

        # the same upgrade by restart: publish, stop the node, start a fresh process, first chunk received
        restarts: list[float] = []
        params_file = root / f"policy_{int(hz)}.yaml"
        params_file.write_text(ros_params_yaml([NodeSpec("policy_node", "policy_node", pol)]))
        g.executor.remove_node(node)
        g.nodes.pop("policy_node")
        node.destroy_node()
        for _ in range(args.restarts):
            seed += 1
            pub.start(seed)
            v, t_pub = pub.result(g.spin_once)
            n_rx = len(chunk_rx)
            proc = subprocess.Popen([sys.executable, "-c", "from qvgm_policy_node.policy_node import main; main()",
                                     "--ros-args", "--params-file", str(params_file)], cwd=str(REPO),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                ok = g.spin_until(lambda n_rx=n_rx: len(chunk_rx) > n_rx, 60)
                if not ok:
                    raise RuntimeError("restarted policy node published nothing")
                restarts.append(chunk_rx[n_rx][0] - t_pub)
            finally:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            g.spin_for(0.5)
        pub.close()
        if not restarts:  # --restarts 0: hot reload only
            return out
        med_hot, med_restart = float(np.median(hot)), float(np.median(restarts))
        out["restart"] = {"restarts": args.restarts, "publish_to_first_chunk_s": {"p50": round(med_restart, 3),
                                                                                   "max": pct(restarts, 100)},
                          "ratio_restart_over_hot_reload": round(med_restart / med_hot, 1)}
    return out


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--serve-publisher":
        serve_publisher(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", type=float, nargs="+", default=[10.0, 30.0])
    ap.add_argument("--reloads", type=int, default=10)
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--horizon", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--num-steps", type=int, default=10)
    ap.add_argument("--start-fraction", type=float, default=0.5)
    ap.add_argument("--blend-steps", type=int, default=3)
    ap.add_argument("--window", type=float, default=5.0, help="baseline window (s)")
    ap.add_argument("--spacing", type=float, default=1.0, help="s between two reloads after the swap")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="extra policy_node parameter (JSON value), e.g. reload_pace_s=0; repeatable")
    args = ap.parse_args()
    args.param = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.param)}
    torch.set_num_threads(int(os.environ.get("QVGM_BENCH_THREADS", "1")))
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_rate(hz, args, Path(tmp)) for hz in args.rates]
    print(json.dumps({"bench": "policy_node", "ros_domain_id": DOMAIN, "machine": platform.machine(),
                      "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "backbone": "state",
                      "hidden": args.hidden, "num_steps": args.num_steps, "policy_params": args.param,
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
