"""Real DDS traffic between two processes on loopback: a publisher subprocess, a subscriber here."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

rclpy = pytest.importorskip("rclpy")
from sensor_msgs.msg import JointState  # noqa: E402

from qvgm_policy_node.graph import Graph  # noqa: E402

PUBLISHER = textwrap.dedent("""
    import sys, time
    import rclpy
    from rclpy.node import Node
    from sensor_msgs.msg import JointState
    rclpy.init()
    node = Node("dds_test_publisher")
    pub = node.create_publisher(JointState, "/dds_test/joint_states", 10)
    deadline = time.monotonic() + float(sys.argv[1])
    k = 0
    while time.monotonic() < deadline:
        msg = JointState(name=["joint_1", "joint_2"], position=[0.1 * k, -0.5])
        msg.header.stamp = node.get_clock().now().to_msg()
        pub.publish(msg)
        k += 1
        rclpy.spin_once(node, timeout_sec=0.02)
    node.destroy_node()
    rclpy.shutdown()
""")


def test_joint_states_cross_process() -> None:
    assert os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "LOCALHOST"
    proc = subprocess.Popen([sys.executable, "-c", PUBLISHER, "30"], env=dict(os.environ))
    received: list[JointState] = []
    try:
        with Graph() as graph:
            node = graph.node("dds_test_subscriber")
            node.create_subscription(JointState, "/dds_test/joint_states", received.append, 10)
            assert graph.spin_until(lambda: len(received) >= 5, timeout=25.0), "no DDS traffic from the subprocess"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    msgs = received[:5]
    assert all(m.name == ["joint_1", "joint_2"] and m.position[1] == -0.5 for m in msgs)
    positions = [m.position[0] for m in msgs]
    assert positions == sorted(positions) and len(set(positions)) == 5  # in order, no duplicates
    assert all(m.header.stamp.sec > 0 for m in msgs)
