"""JointTrajectoryController semantics in pure Python: validation, reordering, splice, hold, interpolation."""

from __future__ import annotations

import numpy as np
import pytest

from qvgm.safety import SafetyLimits
from qvgm.trajectory import TrajectoryExecutor, TrajectoryRejected, validate_trajectory

NAMES = ("a", "b", "c")
LIM = SafetyLimits(NAMES, np.array([-1.0, -1.0, 0.0]), np.array([1.0, 1.0, 0.04]), np.array([2.0, 2.0, 0.1]),
                   np.array([10.0, 10.0, 10.0]))


def traj(pos, times, start=0.0, names=NAMES, vel=None):
    return validate_trajectory(names, times, pos, vel, LIM, start)


def test_reorders_columns_to_controlled_order() -> None:
    t = validate_trajectory(["c", "a", "b"], [0.1], [[0.02, 0.5, -0.5]], None, LIM, 3.0)
    np.testing.assert_allclose(t.positions[0], [0.5, -0.5, 0.02])
    assert t.start_time == 3.0 and t.end_time == pytest.approx(3.1)


@pytest.mark.parametrize("names,times,pos,vel,reason", [
    (NAMES, [], [], None, "empty"),
    (["a", "b", "x"], [0.1], [[0, 0, 0]], None, "unknown_joint"),
    (["a", "b"], [0.1], [[0, 0]], None, "missing_joint"),
    (["a", "a", "b"], [0.1], [[0, 0, 0]], None, "duplicate_joint"),
    (NAMES, [0.1, 0.2], [[0, 0, 0]], None, "wrong_length"),
    (NAMES, [0.1], [[0, 0]], None, "wrong_length"),
    (NAMES, [0.1, 0.2], [[0, 0, 0], [0, 0, 0]], [[0, 0, 0]], "wrong_length"),
    (NAMES, [0.2, 0.1], [[0, 0, 0], [0, 0, 0]], None, "non_monotonic_time"),
    (NAMES, [0.1, 0.1], [[0, 0, 0], [0, 0, 0]], None, "non_monotonic_time"),
    (NAMES, [-0.1], [[0, 0, 0]], None, "non_monotonic_time"),
    (NAMES, [0.1], [[float("nan"), 0, 0]], None, "non_finite"),
    (NAMES, [float("inf")], [[0, 0, 0]], None, "non_finite"),
    (NAMES, [0.1], [[0, 0, 0.5]], None, "position_limit"),
    (NAMES, [0.1], [[0, 0, 0]], [[9.0, 0, 0]], "velocity_limit"),
])
def test_rejections(names, times, pos, vel, reason) -> None:
    with pytest.raises(TrajectoryRejected) as err:
        validate_trajectory(names, times, pos, vel, LIM, 0.0)
    assert err.value.reason == reason


def test_hold_when_idle_and_last_point_after_end() -> None:
    ex = TrajectoryExecutor(3)
    ex.hold(np.array([0.1, 0.2, 0.01]))
    np.testing.assert_allclose(ex.sample(5.0), [0.1, 0.2, 0.01])
    ex.set_trajectory(traj([[0.3, 0.2, 0.01], [0.5, 0.0, 0.02]], [0.1, 0.2], start=1.0))
    np.testing.assert_allclose(ex.sample(0.5), [0.1, 0.2, 0.01])  # not started yet: hold
    np.testing.assert_allclose(ex.sample(1.05), [0.2, 0.2, 0.01])  # from the held setpoint to point 0
    np.testing.assert_allclose(ex.sample(1.15), [0.4, 0.1, 0.015])  # linear between points
    np.testing.assert_allclose(ex.sample(9.0), [0.5, 0.0, 0.02])  # last point held
    ex.prune(9.0)
    assert ex.active(9.0) is None
    np.testing.assert_allclose(ex.sample(9.0), [0.5, 0.0, 0.02])


def test_splice_at_start_time() -> None:
    ex = TrajectoryExecutor(3)
    ex.hold(np.zeros(3))
    old = traj([[0.1 * k, 0, 0] for k in range(1, 11)], [0.1 * k for k in range(1, 11)], start=0.0)
    ex.set_trajectory(old)
    new = traj([[-0.5, 0, 0], [-0.6, 0, 0]], [0.1, 0.2], start=0.5)
    ex.set_trajectory(new)
    np.testing.assert_allclose(ex.sample(0.45), [0.45, 0, 0])  # old still in charge before 0.5
    assert ex.active(0.45) is old and ex.active(0.5) is new
    # new starts from the old trajectory's setpoint at 0.5 (0.5) and reaches its first point at 0.6
    np.testing.assert_allclose(ex.sample(0.55), [0.0, 0, 0], atol=1e-12)
    np.testing.assert_allclose(ex.sample(0.6), [-0.5, 0, 0])
    # a trajectory starting earlier than a queued one drops the queued one
    later = traj([[0.9, 0, 0]], [0.1], start=2.0)
    ex.set_trajectory(later)
    earlier = traj([[0.7, 0, 0]], [0.1], start=1.0)
    ex.set_trajectory(earlier)
    np.testing.assert_allclose(ex.sample(3.0), [0.7, 0, 0])


def test_cubic_with_velocities_hits_points_and_slopes() -> None:
    ex = TrajectoryExecutor(3)
    ex.hold(np.zeros(3))
    t = traj([[0.0, 0, 0], [0.2, 0, 0]], [0.1, 1.1], vel=[[0.0, 0, 0], [0.5, 0, 0]])
    ex.set_trajectory(t)
    np.testing.assert_allclose(ex.sample(0.1), [0, 0, 0], atol=1e-12)
    np.testing.assert_allclose(ex.sample(1.1), [0.2, 0, 0])
    eps = 1e-5
    slope = (ex.sample(1.1 - eps)[0] - ex.sample(1.1 - 2 * eps)[0]) / eps
    assert slope == pytest.approx(0.5, rel=1e-3)
    mid = ex.sample(0.6)[0]
    assert 0.0 < mid < 0.2 and mid != pytest.approx(0.1)  # not linear
