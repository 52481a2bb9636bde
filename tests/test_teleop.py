"""teleop_node over real DDS: Joy -> one-point JointTrajectory jogs only with the deadman held and teleop in
control (clamped per step and to the joint limits); keyboard mode in a separate process fed through a pty,
driving episode_manager's services and jogging a joint."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
from helpers import wait_for
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile
from sensor_msgs.msg import JointState, Joy
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from qvgm_policy_node.episode_manager import EpisodeManager
from qvgm_policy_node.teleop_node import JOINT_NAMES, TeleopNode

LATCHED = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
STATUS_QOS = QoSProfile(depth=20, durability=DurabilityPolicy.TRANSIENT_LOCAL)
HOME = [0.0, 0.2, 1.7, 0.0, 1.2, 0.0, 0.04]


@contextmanager
def spun(make: Callable[[rclpy.Context], Node]) -> Iterator[Node]:
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    ex = SingleThreadedExecutor(context=ctx)
    node = make(ctx)
    ex.add_node(node)
    th = threading.Thread(target=ex.spin, daemon=True)
    th.start()
    try:
        yield node
    finally:
        ex.shutdown(timeout_sec=2.0)
        th.join(5.0)
        node.destroy_node()
        rclpy.shutdown(context=ctx)


class Rig(Node):
    """Robot + operator side: joint states at 50 Hz, Joy, a fake status, and the trajectories teleop sends."""

    def __init__(self, ctx: rclpy.Context, publish_status: bool = True) -> None:
        super().__init__("rig", context=ctx)
        self.trajs: list[JointTrajectory] = []
        self.status: list[dict] = []
        self.pub_js = self.create_publisher(JointState, "/joint_states", 10)
        self.pub_joy = self.create_publisher(Joy, "/joy", 10)
        self.pub_status = self.create_publisher(String, "/qvgm/episode/status", LATCHED) if publish_status else None
        self.create_subscription(JointTrajectory, "/arm_controller/joint_trajectory", self.trajs.append, 10)
        self.create_subscription(String, "/qvgm/episode/status", lambda m: self.status.append(json.loads(m.data)),
                                 STATUS_QOS)
        self.joy: Joy | None = None
        self.create_timer(0.02, self._tick)

    def _tick(self) -> None:
        m = JointState(name=list(JOINT_NAMES), position=list(HOME))
        m.header.stamp = self.get_clock().now().to_msg()
        self.pub_js.publish(m)
        if self.joy is not None:
            self.pub_joy.publish(self.joy)

    def control(self, who: str) -> None:
        self.pub_status.publish(String(data=json.dumps({"state": "RESET", "episode": 0, "control": who,
                                                        "takeover": False})))

    def positions(self, since: int = 0) -> np.ndarray:
        return np.array([list(t.points[0].positions) for t in self.trajs[since:]])


def test_joy_jogs_only_with_deadman_and_control() -> None:
    params = [Parameter("rate_hz", value=20.0), Parameter("deadman_button", value=4),
              Parameter("axes", value=[0, 1, -1, -1, -1, -1, -1]),
              Parameter("scale", value=[0.4, 0.4, 0.5, 0.8, 0.8, 0.8, 0.05]),
              Parameter("max_velocity", value=[0.2, 0.5, 0.5, 0.8, 0.8, 0.8, 0.05]),
              Parameter("upper", value=[2.9671, 0.25, 2.618, 2.9671, 2.0944, 2.9671, 0.04])]
    with spun(lambda c: TeleopNode(context=c, parameter_overrides=params)) as tele, spun(Rig) as rig:
        wait_for(lambda: rig.pub_joy.get_subscription_count() > 0 and tele.q is not None)
        rig.joy = Joy(axes=[1.0, 1.0, 0.0, 0.0], buttons=[0, 0, 0, 0, 1])  # deadman held, but no status yet
        time.sleep(0.4)
        assert rig.trajs == [] and tele.control == "none"
        rig.control("policy")
        time.sleep(0.3)
        assert rig.trajs == []  # the policy drives: teleop stays silent
        rig.control("teleop")
        wait_for(lambda: len(rig.trajs) >= 8)
        q = rig.positions()
        t = rig.trajs[0]
        assert list(t.joint_names) == JOINT_NAMES and len(t.points) == 1
        assert t.points[0].time_from_start.nanosec == 50_000_000 and t.header.stamp.sec > 0
        d0 = np.diff(q[:, 0])
        assert np.all(d0 > 0) and np.all(d0 <= 0.2 * 0.05 + 1e-9)  # velocity clamp 0.2 rad/s at 20 Hz
        assert q[0, 0] <= 0.01 + 1e-9 and abs(q[0, 2] - HOME[2]) < 1e-9  # anchored on the measured state
        assert np.all(q[:, 1] <= 0.25 + 1e-12) and q[-1, 1] == 0.25  # joint_2 clamped at its upper limit
        rig.joy = Joy(axes=[1.0, 1.0, 0.0, 0.0], buttons=[0, 0, 0, 0, 0])  # deadman released
        time.sleep(0.2)
        n = len(rig.trajs)
        time.sleep(0.4)
        assert len(rig.trajs) == n  # nothing more while released
        rig.joy = Joy(axes=[-1.0, 0.0, 0.0, 0.0], buttons=[1, 0, 0, 0, 1])  # pressed again, gripper open button
        wait_for(lambda: len(rig.trajs) >= n + 4)
        q2 = rig.positions(n)
        assert q2[0, 0] >= -0.01 - 1e-9  # re-anchored on the measured state, not the old target
        assert np.all(np.diff(q2[:, 0]) < 0) and np.all(q2[:, 6] <= 0.04)
        rig.joy = None  # joystick goes silent while the deadman was held: treated as released
        time.sleep(0.7)
        n = len(rig.trajs)
        time.sleep(0.3)
        assert len(rig.trajs) == n


def test_keyboard_mode_through_a_pty() -> None:
    """teleop_node in its own process reads raw keys from a pty: episode control keys and a joint jog."""
    master, slave = pty.openpty()
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "qvgm_policy_node.teleop_node", "--ros-args",
                             "-p", "keyboard:=true", "-p", "key_step:=0.1"],
                            stdin=slave, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=root,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    os.close(slave)
    try:
        mgr_params = [Parameter("time_limit", value=60.0)]
        with spun(lambda c: EpisodeManager(context=c, parameter_overrides=mgr_params)), \
                spun(lambda c: Rig(c, publish_status=False)) as rig:
            wait_for(lambda: rig.count_subscribers("/joint_states") >= 1 and rig.count_publishers(
                "/arm_controller/joint_trajectory") >= 1, timeout=30.0)
            wait_for(lambda: rig.count_clients("/qvgm/episode/start") >= 1 and rig.count_clients(
                "/qvgm/episode/takeover") >= 1, timeout=30.0)
            time.sleep(0.5)  # let the teleop process discover the services and receive the latched status

            def key(ch: str, state: str, **match: Any) -> dict:
                os.write(master, ch.encode())
                return wait_for(lambda: rig.status and rig.status[-1]["state"] == state and all(
                    rig.status[-1][k] == v for k, v in match.items()) and rig.status[-1])

            for _ in range(10):  # a key pressed before the teleop client saw the service is refused with a warning
                os.write(master, b"g")
                try:
                    wait_for(lambda: rig.status and rig.status[-1]["state"] == "RUNNING", timeout=2.0)
                    break
                except TimeoutError:
                    continue
            assert rig.status[-1]["state"] == "RUNNING" and rig.status[-1]["episode"] == 0
            os.write(master, b"1=")  # policy drives: a jog is refused
            time.sleep(0.5)
            assert rig.trajs == []
            key("t", "RUNNING", takeover=True, control="teleop")
            time.sleep(0.3)
            os.write(master, b"3=")
            wait_for(lambda: rig.trajs)
            q = rig.positions()[0]
            tfs = rig.trajs[0].points[0].time_from_start
            assert abs(tfs.sec + tfs.nanosec * 1e-9 - 0.2) < 1e-6  # 0.1 rad at max_velocity 0.5 rad/s
            assert abs(q[2] - (HOME[2] + 0.1)) < 1e-6 and abs(q[0] - HOME[0]) < 1e-9
            key("t", "RUNNING", takeover=False, control="policy")
            key("x", "LABEL")
            key("s", "RESET", label=True, label_source="operator")
            key("x", "IDLE")
            key("g", "RUNNING", episode=1)
            key("d", "RESET", discarded=True)
    finally:
        os.close(master)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
