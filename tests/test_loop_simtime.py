"""The loop's graph on sim time (sim_node publishes /clock, every node use_sim_time) at real_time_factor 2, and the
loop driver's per-episode bookkeeping off the executor thread. Real parts only: MuJoCo, rclpy nodes over DDS, a
tiny SFT policy served from a real CheckpointStore, the real recorder writing a real replay buffer."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytest.importorskip("mujoco")

from qvgm.data import ReplayBuffer, ReplayReader  # noqa: E402
from qvgm_policy_node import loop  # noqa: E402

TINY = ["--demos", "3", "--sft-steps", "20", "--no-progress"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(work dir, demos buffer, v0): 3 noisy demos and a 20-step SFT policy published as v0 (the loop's stages)."""
    work = tmp_path_factory.mktemp("loop_simtime")
    args = loop_args(work)
    log = loop.Progress()
    demos = loop.stage_demos(args, work, log)
    v0 = loop.stage_sft(args, work, demos, loop.LoopState(work), log)
    return work, demos, v0


def loop_args(work: Path, *extra: str) -> argparse.Namespace:
    args = loop.build_parser().parse_args(["--work", str(work), *TINY, *extra])
    loop.resolve_recipe(args)
    return args


def test_rtf2_on_sim_time_records_whole_episodes_in_sim_seconds(tiny, tmp_path) -> None:
    """At real_time_factor 2 the recorder keeps the whole episode (before sim time it kept ~1/2): the episode lasts
    its time limit in SIM seconds (stamps 0.1 s apart at the recorder's 10 fps) and the nodes' clocks follow /clock.
    How far sim time runs ahead of the wall clock depends on the machine's load: bench/loop_rtf.py measures it."""
    work, _, v0 = tiny
    args = loop_args(work, "--real-time-factor", "2", "--episode-time", "3")
    with loop.SimLoop(args, work, loop.Progress()) as sim:
        sim.wait_serving(v0)
        driver = sim.graph.nodes["loop_driver"]
        robot = sim.graph.nodes["sim_node"]
        assert driver.get_parameter("use_sim_time").value and sim.policy.get_parameter("use_sim_time").value
        r0 = robot.sim_to_ros(float(robot.env.time))
        infos = sim.episodes(tmp_path / "rec", 2, "test", seed=5)
        robot_s = robot.sim_to_ros(float(robot.env.time)) - r0
        # the driver's node clock is /clock, i.e. the sim's robot time
        sim.graph.spin_for(0.2)
        lag = robot.sim_to_ros(float(robot.env.time)) - driver.get_clock().now().nanoseconds * 1e-9
        assert -1e-3 <= lag < 0.5, lag  # (ns rounding of the Clock message)
    assert len(infos) == 2 and all(loop.served_only(i, v0) for i in infos)
    sim_s = 0.0
    for info in infos:
        st = np.asarray(info["stamps"])
        steps = np.diff(st)
        assert np.all(steps > 0) and np.median(steps) == pytest.approx(0.1, abs=0.02)  # 10 fps in sim seconds
        span = st[-1] - st[0]
        if not info["success"]:  # a timeout lasts the whole 3 sim-s limit, and the recorder kept all of it
            assert span == pytest.approx(3.0, abs=0.4) and info["frames"] >= 25, (span, info["frames"])
        sim_s += span
    assert 0 < sim_s < robot_s, (robot_s, sim_s)  # the recorded spans lie inside the sim time, resets between
    rd = ReplayReader(tmp_path / "rec", decode_images=False)
    try:
        assert len(rd.episodes) == 2
    finally:
        rd.close()


def grow(buffer: Path, episodes: int, frames: int = 3) -> None:
    """Append `episodes` short rollout-like episodes (the loop buffer's layout: 64 px front camera, 7 joints) so
    reading the buffer back costs what a buffer of ~100 episodes costs."""
    buf = ReplayBuffer.open(buffer)
    try:
        for k in range(episodes):
            ep = buf.begin_episode(task="pick up the red cube and put it in the bowl", start_stamp=0.0)
            for i in range(frames):
                obs = {"images": {loop.CAMERA: np.full((64, 64, 3), (k * 7 + i) % 255, np.uint8)},
                       "state": np.zeros(7, np.float32), "prompt": "pick up the red cube and put it in the bowl",
                       "stamp": 0.1 * i}
                ep.add_frame(obs, np.zeros(7, np.float32), reward=0.0, done=False, policy_version="filler")
            ep.finish(success=False, label_source="auto")
    finally:
        buf.close()


def test_bookkeeping_between_episodes_does_not_hold_the_graph(tiny, tmp_path) -> None:
    """Reading each finished episode back from a large buffer (here ~0.3 s or more per read) happens off the
    executor thread: the driver never keeps the graph from spinning for long, and the sim ticks on."""
    work, demos, v0 = tiny
    buffer = tmp_path / "buffer"
    shutil.copytree(demos, buffer)
    grow(buffer, 90)
    t0 = time.perf_counter()
    ReplayReader(buffer, decode_images=False, include_discarded=True).close()
    read_s = time.perf_counter() - t0  # what the old driver spent on the executor thread after every episode
    args = loop_args(work, "--real-time-factor", "2", "--episode-time", "2")
    with loop.SimLoop(args, work, loop.Progress()) as sim:
        sim.wait_serving(v0)
        t1, before = time.monotonic(), sim.health()
        infos = sim.episodes(buffer, 3, "collect", seed=7)
        health = sim.health_report(before, t1, infos)
    assert len(infos) == 3 and len(sim.committed) >= 3
    assert {i["index"] for i in infos} <= {i["index"] for i in sim.committed}
    assert min(i["index"] for i in infos) == 3 + 90  # appended after the demos and the fillers
    # generous bounds (a loaded 2-core CI): the driver's longest gap between spins well under one buffer read
    assert health["driver_gap_ms_max"] < max(150.0, 0.5 * read_s * 1e3), (health, read_s)
    assert health["tick_ms_max"] < 1000.0, health
    assert health["holds"] == 0, health


def test_sim_node_lockstep_waits_for_the_next_chunk_then_runs_free_after_the_timeout() -> None:
    """sim_node publishing /clock with lockstep_s 0.4 at real_time_factor 2: after one chunk (stamp = now) the sim
    stops 0.4 sim-s later and waits (/clock stands still) instead of running on; lockstep_timeout_s (0.6 wall s)
    after that chunk it runs free again."""
    from builtin_interfaces.msg import Duration
    from rclpy.parameter import Parameter
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

    from qvgm_policy_node import topics
    from qvgm_policy_node.graph import Graph
    from qvgm_policy_node.profile import NodeSpec

    params = {"task": "push", "seed": 1, "cameras": [], "real_time_factor": 2.0, "publish_clock": True,
              "lockstep_s": 0.4, "lockstep_timeout_s": 0.6}
    with Graph([NodeSpec("sim_node", "sim_node", params)]) as g:
        sim = g.nodes["sim_node"]
        io = g.node("lockstep_io", parameter_overrides=[Parameter("use_sim_time", value=True)])
        pub = io.create_publisher(JointTrajectory, topics.TRAJECTORY, 10)
        g.spin_for(0.5)  # discovery; the sim runs free (no chunk yet)
        t_free = float(sim.env.time)
        assert t_free > 0.3  # ~1 sim-s in 0.5 wall-s
        q = [float(x) for x in sim.env.joint_state()[0]]
        msg = JointTrajectory(joint_names=list(sim.joint_names))
        for k in range(10):  # a 10 x 0.1 s chunk holding the current pose, stamp 0 = now
            msg.points.append(JointTrajectoryPoint(positions=q, time_from_start=Duration(nanosec=k * 100_000_000)))
        accepted = sim.accepted
        pub.publish(msg)
        assert g.spin_until(lambda: sim.accepted > accepted, 5.0)
        start = float(sim.env.time)
        g.spin_for(0.4)  # 0.8 sim-s at rtf 2, but the sim may only go 0.4 past the chunk
        held = float(sim.env.time)
        assert held <= start + 0.4 + 1e-6 and held > start + 0.3, (start, held)
        assert sim.lockstep_waits > 0
        clock = io.get_clock().now().nanoseconds * 1e-9
        assert abs(clock - sim.sim_to_ros(held)) < 0.05  # /clock stands at the sim's time
        g.spin_for(0.6)  # past lockstep_timeout_s after the chunk: free run again
        assert float(sim.env.time) > held + 0.2
