"""Safety layer: URDF limit parsing, target checks, rate limiting, stale-observation hold."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from qvgm.safety import SafetyLayer, SafetyLimits, box_workspace

URDF = """<?xml version="1.0"?>
<robot name="mini">
  <link name="base"/><link name="l1"/><link name="l2"/><link name="l3"/><link name="f1"/><link name="f2"/>
  <joint name="joint_1" type="revolute"><parent link="base"/><child link="l1"/>
    <limit lower="-3.0" upper="3.0" velocity="2.0" effort="50"/></joint>
  <joint name="joint_2" type="continuous"><parent link="l1"/><child link="l2"/>
    <limit velocity="1.5" effort="20"/></joint>
  <joint name="fixed_cam" type="fixed"><parent link="l2"/><child link="l3"/></joint>
  <joint name="gripper_finger_joint" type="prismatic"><parent link="l2"/><child link="f1"/>
    <limit lower="0.0" upper="0.04" velocity="0.1" effort="40"/></joint>
  <joint name="gripper_mimic" type="prismatic"><parent link="l2"/><child link="f2"/>
    <limit lower="0.0" upper="0.04" velocity="0.1" effort="40"/><mimic joint="gripper_finger_joint"/></joint>
</robot>
"""


@pytest.fixture()
def urdf(tmp_path: Path) -> Path:
    path = tmp_path / "mini.urdf"
    path.write_text(URDF)
    return path


def test_from_urdf_parses_limits_in_requested_order(urdf: Path) -> None:
    lim = SafetyLimits.from_urdf(urdf, ["gripper_finger_joint", "joint_1", "joint_2"])
    assert lim.joint_names == ("gripper_finger_joint", "joint_1", "joint_2")
    np.testing.assert_allclose(lim.lower[:2], [0.0, -3.0])
    np.testing.assert_allclose(lim.upper[:2], [0.04, 3.0])
    assert math.isinf(lim.lower[2]) and math.isinf(lim.upper[2])  # continuous joint
    np.testing.assert_allclose(lim.velocity, [0.1, 2.0, 1.5])
    np.testing.assert_allclose(lim.effort, [40, 50, 20])
    # default: movable, non-mimic joints in file order
    assert SafetyLimits.from_urdf(urdf).joint_names == ("joint_1", "joint_2", "gripper_finger_joint")


def test_from_urdf_missing_joint_is_a_clear_error(urdf: Path) -> None:
    with pytest.raises(ValueError, match="lacks joints"):
        SafetyLimits.from_urdf(urdf, ["joint_1", "joint_9"])


def test_check_vector_reasons(urdf: Path) -> None:
    lim = SafetyLimits.from_urdf(urdf)
    assert lim.check_vector([0.0, 10.0, 0.02]).ok  # continuous joint has no position limit
    assert lim.check_vector([0.0, 0.0]).reason == "wrong_length"
    assert lim.check_vector([np.nan, 0.0, 0.0]).reason == "non_finite"
    assert lim.check_vector([0.0, np.inf, 0.0]).reason == "non_finite"
    v = lim.check_vector([3.5, 0.0, 0.0])
    assert v.reason == "position_limit" and "joint_1" in v.detail


def test_filter_rate_limits_and_clamps(urdf: Path) -> None:
    layer = SafetyLayer(SafetyLimits.from_urdf(urdf), velocity_scale=0.5, max_obs_age=0.2)
    cur = np.zeros(3)
    v = layer.filter(cur, np.array([1.0, -1.0, 0.04]), dt=0.1)
    assert v.ok
    # max step = velocity * 0.5 * 0.1
    np.testing.assert_allclose(v.command, [0.1, -0.075, 0.005])
    # small moves pass through unchanged
    v = layer.filter(cur, np.array([0.01, 0.0, 0.001]), dt=0.1)
    np.testing.assert_allclose(v.command, [0.01, 0.0, 0.001])


def test_filter_holds_on_bad_target_stale_or_missing_observation(urdf: Path) -> None:
    layer = SafetyLayer(SafetyLimits.from_urdf(urdf), max_obs_age=0.2,
                        workspace=lambda q: "too far" if q[0] > 2.0 else None)
    cur = np.array([0.3, 0.2, 0.01])
    cases = [
        (np.array([np.nan, 0, 0]), 0.0, "non_finite"),
        (np.array([5.0, 0, 0]), 0.0, "position_limit"),
        (np.array([2.5, 0, 0]), 0.0, "workspace"),
        (np.array([0.0, 0, 0]), 0.5, "stale_observation"),
        (np.array([0.0, 0, 0]), float("nan"), "stale_observation"),
        (np.array([0.0, 0, 0]), None, "no_observation"),
        (np.zeros(5), 0.0, "wrong_length"),
    ]
    for target, age, reason in cases:
        v = layer.filter(cur, target, dt=0.02, obs_age=age)
        assert not v.ok and v.reason == reason, (target, age, v)
        np.testing.assert_array_equal(v.command, cur)  # hold
    assert layer.counters["stale_observation"] == 2 and layer.counters["non_finite"] == 1
    # no target: hold, but that is fine
    v = layer.filter(cur, None, dt=0.02)
    assert v.ok and np.array_equal(v.command, cur)


def test_box_workspace_hook(urdf: Path) -> None:
    # a planar 2-link "arm" (1 m links) as the forward kinematics
    def fk(q: np.ndarray) -> np.ndarray:
        return np.array([np.cos(q[0]) + np.cos(q[0] + q[1]), np.sin(q[0]) + np.sin(q[0] + q[1]), 0.5])

    hook = box_workspace(fk, [0.0, -2.0, 0.0], [2.0, 2.0, 1.0])
    layer = SafetyLayer(SafetyLimits.from_urdf(urdf), workspace=hook)
    assert layer.check_target([0.0, 0.0, 0.0]).ok  # tool at (2, 0)
    v = layer.check_target([2.5, 0.0, 0.0])  # tool at x < 0
    assert v.reason == "workspace" and "outside workspace box" in v.detail
    with pytest.raises(ValueError):
        box_workspace(fk, [1, 1, 1], [0, 0, 0])
