"""policy_node with the learned (`flow`) backend over real DDS, driven by a test node that plays the robot:
velocities and observation stamps on the chunk, late-chunk trimming, the safety layer on the outgoing chunk,
frozen/stale joint states -> one hold, /qvgm/estop, /qvgm/policy/enable, /qvgm/policy/version."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("rclpy")
torch = pytest.importorskip("torch")
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import Bool, String  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

from qvgm.checkpoints import CheckpointStore  # noqa: E402
from qvgm.policy import NormStats, make_policy, save_policy  # noqa: E402
from qvgm.safety import SafetyLimits  # noqa: E402
from qvgm.sim import urdf_path  # noqa: E402
from qvgm_policy_node import topics  # noqa: E402
from qvgm_policy_node.graph import Graph  # noqa: E402
from qvgm_policy_node.profile import NodeSpec  # noqa: E402
from qvgm_policy_node.sim_node import TRANSIENT_LOCAL, from_time_msg  # noqa: E402

torch.set_num_threads(1)
NAMES = ["joint_1", "joint_2", "joint_3", "joint_4", "joint_5", "joint_6", "gripper_finger_joint"]
HOME = np.array([0.0, -0.4, 0.9, 0.0, 0.9, 0.0, 0.02])


def checkpoint(path: Path, action_center: np.ndarray = HOME, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    stats = NormStats.compute(HOME + rng.normal(size=(64, 7)) * 0.05, action_center + rng.normal(size=(64, 7)) * 0.02)
    save_policy(make_policy("state", stats, state_dim=7, real_action_dim=7, horizon=10, hidden=32, embed_dim=16,
                            head_hidden=32, head_depth=1), path, version=f"v-test-{seed}")
    return path


class Robot:
    """The test's stand-in for the robot: publishes /joint_states on demand, records chunks and versions."""

    def __init__(self, g: Graph) -> None:
        self.g = g
        self.io = g.node("policy_node_test_io")
        self.chunks: list[JointTrajectory] = []
        self.versions: list[str] = []
        self.io.create_subscription(JointTrajectory, topics.TRAJECTORY, self.chunks.append, 10)
        self.io.create_subscription(String, topics.POLICY_VERSION, lambda m: self.versions.append(m.data),
                                    TRANSIENT_LOCAL)
        self.pub_js = self.io.create_publisher(JointState, topics.JOINT_STATES, 10)
        self.pub_estop = self.io.create_publisher(Bool, topics.ESTOP, 10)
        self.pub_enable = self.io.create_publisher(Bool, topics.POLICY_ENABLE, TRANSIENT_LOCAL)
        self.io.create_publisher(String, topics.TASK, TRANSIENT_LOCAL).publish(String(data="pick the cube"))
        self.last_stamp = 0.0

    def run(self, seconds: float, q: np.ndarray = HOME, frozen: bool = False) -> None:
        """Publish joint states at ~50 Hz for `seconds` (frozen: the same stamp again and again)."""
        end = self.io.get_clock().now().nanoseconds * 1e-9 + seconds
        while self.io.get_clock().now().nanoseconds * 1e-9 < end:
            msg = JointState(name=NAMES, position=[float(x) for x in q])
            if frozen:
                msg.header.stamp.sec, msg.header.stamp.nanosec = int(self.last_stamp), int(self.last_stamp % 1 * 1e9)
            else:
                msg.header.stamp = self.io.get_clock().now().to_msg()
                self.last_stamp = from_time_msg(msg.header.stamp)
            self.pub_js.publish(msg)
            self.g.spin_for(0.02)


def params(ckpt: Path, **extra: Any) -> dict[str, Any]:
    p = {"backend": "flow", "checkpoint": str(ckpt), "cameras": [], "num_steps": 3, "seed": 0, "chunk_dt": 0.1,
         "async_start_fraction": 0.7, "max_state_age": 0.2}
    p.update(extra)
    return p


def test_learned_chunks_estop_enable_and_frozen_state(tmp_path: Path) -> None:
    ckpt = checkpoint(tmp_path / "ckpt")
    with Graph([NodeSpec("policy_node", "policy_node", params(ckpt))]) as g:
        policy = g.nodes["policy_node"]
        robot = Robot(g)
        robot.run(1.0)
        assert len(robot.chunks) >= 3, dict(policy.skipped)
        msg = robot.chunks[-1]
        assert msg.joint_names == NAMES and len(msg.points) == 10
        vel = np.array([p.velocities for p in msg.points])
        pos = np.array([p.positions for p in msg.points])
        lim = SafetyLimits.from_urdf(urdf_path(), NAMES).velocity * 0.999
        np.testing.assert_allclose(vel[1:-1], np.clip((pos[2:] - pos[:-2]) / 0.2, -lim, lim), atol=1e-6)  # central
        assert np.all(vel[-1] == 0.0)
        stamp = from_time_msg(msg.header.stamp)
        # the observation time, not the publish time; equal when no newer state arrived before the chunk
        assert 0 <= robot.last_stamp - stamp < 1.0
        assert g.spin_until(lambda: robot.versions == ["v-test-0"], 3)
        assert policy.stats["missed_ticks"] == 0

        # estop: one hold trajectory at the measured position, then nothing until cleared
        robot.pub_estop.publish(Bool(data=True))
        assert g.spin_until(lambda: policy.estop, 3)
        robot.run(0.3)
        hold = robot.chunks[-1]
        assert len(hold.points) == 1 and from_time_msg(hold.header.stamp) == 0.0
        np.testing.assert_allclose(hold.points[0].positions, HOME)
        n = len(robot.chunks)
        robot.run(0.8)
        assert len(robot.chunks) == n
        robot.pub_estop.publish(Bool(data=False))
        robot.run(0.8)
        assert len(robot.chunks) > n and len(robot.chunks[-1].points) == 10

        # enable=false mutes: nothing at all; true resumes
        robot.pub_enable.publish(Bool(data=False))
        assert g.spin_until(lambda: not policy.enabled, 3)
        n = len(robot.chunks)
        robot.run(0.8)
        assert len(robot.chunks) == n
        robot.pub_enable.publish(Bool(data=True))
        robot.run(0.8)
        assert len(robot.chunks) > n

        # frozen joint states (stamp stops advancing): one hold, then nothing
        n = len(robot.chunks)
        robot.run(0.8, frozen=True)
        assert policy.skipped["frozen_state"] > 0
        new = robot.chunks[n:]
        holds = [c for c in new if len(c.points) == 1]
        assert len(holds) == 1 and new[-1] is holds[0], [len(c.points) for c in new]
        # stale (no joint states at all): nothing more
        n = len(robot.chunks)
        g.spin_for(0.5)
        assert len(robot.chunks) == n and policy.skipped["stale_state"] > 0

        # no store: ~/reload answers with a clear failure
        reply = g.call(robot.io.create_client(Trigger, "/policy_node/reload"), Trigger.Request())
        assert not reply.success and "checkpoint_store" in reply.message


def test_late_chunks_are_trimmed_and_blended(tmp_path: Path) -> None:
    """late_margin 0.25 s: every chunk comes back 'late' by >= 2 steps, so its first points are dropped and the
    kept ones keep their time_from_start (k * dt) from the observation stamp."""
    ckpt = checkpoint(tmp_path / "ckpt")
    with Graph([NodeSpec("policy_node", "policy_node", params(ckpt, late_margin=0.25, blend_steps=3))]) as g:
        policy = g.nodes["policy_node"]
        robot = Robot(g)
        robot.run(1.2)
        assert len(robot.chunks) >= 3
        assert policy.stats["late_chunks"] == policy.published
        for msg in robot.chunks:
            tfs = [p.time_from_start.sec + p.time_from_start.nanosec * 1e-9 for p in msg.points]
            assert len(msg.points) <= 8 and tfs[0] >= 0.2 - 1e-9
            np.testing.assert_allclose(np.diff(tfs), 0.1, atol=1e-6)
        assert len(policy.jumps_raw) >= 2 and len(policy.jumps_blended) == len(policy.jumps_raw)
        assert max(policy.jumps_blended) <= max(policy.jumps_raw) + 1e-9


def test_safety_layer_limits_the_outgoing_chunk(tmp_path: Path) -> None:
    """A policy that wants joint_1 at 5 rad (limit 2.97) and the gripper at 0.3 m (limit 0.04): every published
    point is inside the URDF limits and moves at most velocity_scale * v_max * dt per step."""
    ckpt = checkpoint(tmp_path / "ckpt", action_center=HOME + np.array([5.0, 0, 0, 0, 0, 0, 0.28]))
    with Graph([NodeSpec("policy_node", "policy_node", params(ckpt, velocity_scale=0.5))]) as g:
        policy = g.nodes["policy_node"]
        robot = Robot(g)
        robot.run(1.0)
        assert len(robot.chunks) >= 2
        limits = SafetyLimits.from_urdf(urdf_path(), NAMES)
        for msg in robot.chunks:
            pos = np.array([p.positions for p in msg.points])
            assert np.all(pos >= limits.lower - 1e-9) and np.all(pos <= limits.upper + 1e-9)
            assert np.all(np.abs(np.diff(pos, axis=0)) <= limits.velocity * 0.5 * 0.1 + 1e-9)
            assert np.all(np.abs(np.array([p.velocities for p in msg.points])) <= limits.velocity * 0.5)
        first = np.array(robot.chunks[0].points[0].positions)
        assert np.all(np.abs(first - HOME) <= limits.velocity * 0.5 * 0.1 + 1e-9)  # starts at the measured state
        assert policy.stats["safety_interventions"] == policy.published
        assert policy.safety.counters.get("clamped", 0) > 0 and policy.safety.counters.get("rate_limited", 0) > 0
        last = np.array(robot.chunks[-1].points[-1].positions)
        assert last[0] > HOME[0] + 0.5  # it does move towards the (clamped) target, at the limited rate


def test_store_with_nothing_valid_serves_nothing(tmp_path: Path) -> None:
    """An empty store: the node runs, publishes no chunk (the robot holds), says why; a first publish serves."""
    store = CheckpointStore(tmp_path / "store")
    p = params(tmp_path / "unused", checkpoint="", checkpoint_store=str(store.root), reload_watch="inotify")
    with Graph([NodeSpec("policy_node", "policy_node", p)]) as g:
        policy = g.nodes["policy_node"]
        robot = Robot(g)
        robot.run(0.5)
        assert not robot.chunks and policy.skipped["no_policy"] > 0
        with store.writing() as staged:
            checkpoint(tmp_path / "ckpt", seed=4)
            for f in (tmp_path / "ckpt").iterdir():
                if f.name != "manifest.json":
                    (staged.path / f.name).write_bytes(f.read_bytes())
        robot.run(1.5)
        assert robot.chunks and policy.version == staged.version
        assert robot.versions[-1] == staged.version
