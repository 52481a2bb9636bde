"""ros2_control JointTrajectoryController semantics in pure Python (no ROS).

Times are seconds on one clock (the robot's: sim time in the simulator). A trajectory is a whole action chunk:
points at start_time + time_from_start[k], positions [N, n] in the executor's joint order (rad / m),
optional velocities [N, n] (rad/s / m/s) which switch sampling from linear to cubic Hermite.

Semantics (as JTC):
  * a new trajectory splices in at its start time: the active one keeps running until then, and from then on
    the new one replaces it (queued trajectories starting later than the new one are dropped);
  * before its first point the trajectory interpolates from the setpoint the robot had at the start time;
  * after the last point the last point is held; with nothing active the current position is held.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qvgm.safety import SafetyLimits


class TrajectoryRejected(ValueError):
    """A trajectory failed validation; `reason` is a stable key for /diagnostics counters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Trajectory:
    """Validated trajectory in executor joint order. times: float64[N] strictly increasing, >= 0 (s)."""

    start_time: float
    times: np.ndarray
    positions: np.ndarray
    velocities: np.ndarray | None = None

    @property
    def end_time(self) -> float:
        return self.start_time + float(self.times[-1])


def validate_trajectory(joint_names: Sequence[str], times: Sequence[float], positions: Sequence[Sequence[float]],
                        velocities: Sequence[Sequence[float]] | None, limits: SafetyLimits,
                        start_time: float, tol: float = 1e-6) -> Trajectory:
    """Check a trajectory and reorder its columns to `limits.joint_names`; raise TrajectoryRejected otherwise.

    joint_names: the message's joint order (any permutation of the controlled joints, no extras/duplicates).
    times: time_from_start per point (s), strictly increasing, >= 0. positions/velocities: [N][len(joint_names)]
    (velocities may be None or empty for every point). Reasons: empty, unknown_joint, missing_joint,
    duplicate_joint, wrong_length, non_monotonic_time, non_finite, position_limit.
    """
    names = list(joint_names)
    if len(times) == 0 or len(positions) == 0:
        raise TrajectoryRejected("empty", "trajectory has no points")
    if len(set(names)) != len(names):
        raise TrajectoryRejected("duplicate_joint", f"duplicate joint names in {names}")
    unknown = [j for j in names if j not in limits.joint_names]
    if unknown:
        raise TrajectoryRejected("unknown_joint", f"unknown joints {unknown}; controlled: {list(limits.joint_names)}")
    missing = [j for j in limits.joint_names if j not in names]
    if missing:
        raise TrajectoryRejected("missing_joint", f"trajectory lacks joints {missing}")
    if len(times) != len(positions):
        raise TrajectoryRejected("wrong_length", f"{len(times)} times but {len(positions)} position rows")
    n = len(names)
    for k, row in enumerate(positions):
        if len(row) != n:
            raise TrajectoryRejected("wrong_length", f"point {k} has {len(row)} positions for {n} joints")
    has_vel = velocities is not None and len(velocities) > 0 and any(len(v) for v in velocities)
    if has_vel:
        if len(velocities) != len(positions) or any(len(v) != n for v in velocities):
            raise TrajectoryRejected("wrong_length", "velocities must be given for every point and joint")
    t = np.asarray(times, dtype=np.float64)
    if not np.all(np.isfinite(t)) or not np.isfinite(start_time):
        raise TrajectoryRejected("non_finite", "non-finite time")
    if t[0] < 0 or np.any(np.diff(t) <= 0):
        raise TrajectoryRejected("non_monotonic_time", f"time_from_start must be >= 0 and strictly increasing: "
                                 f"{t.tolist()[:8]}")
    perm = [names.index(j) for j in limits.joint_names]
    pos = np.asarray(positions, dtype=np.float64)[:, perm]
    vel = np.asarray(velocities, dtype=np.float64)[:, perm] if has_vel else None
    if not np.all(np.isfinite(pos)) or (vel is not None and not np.all(np.isfinite(vel))):
        raise TrajectoryRejected("non_finite", "NaN or inf in positions/velocities")
    for k in range(len(pos)):
        verdict = limits.check_vector(pos[k], tol=tol)
        if not verdict.ok:
            raise TrajectoryRejected(verdict.reason, f"point {k}: {verdict.detail}")
    if vel is not None and np.any(np.abs(vel) > limits.velocity + tol):
        raise TrajectoryRejected("velocity_limit", "point velocity beyond the URDF velocity limit")
    return Trajectory(float(start_time), t, pos, vel)


def _hermite(p0: np.ndarray, v0: np.ndarray, p1: np.ndarray, v1: np.ndarray, h: float, s: float) -> np.ndarray:
    """Cubic Hermite between (p0, v0) and (p1, v1) over duration h, at normalised s in [0, 1]."""
    s2, s3 = s * s, s * s * s
    return ((2 * s3 - 3 * s2 + 1) * p0 + (s3 - 2 * s2 + s) * h * v0 + (-2 * s3 + 3 * s2) * p1
            + (s3 - s2) * h * v1)


class TrajectoryExecutor:
    """Holds the active (and queued) trajectories and samples the setpoint [n] at any time t (s).

    `hold(q)` sets the position held when no trajectory is active (the measured position at start-up/reset).
    """

    def __init__(self, n_joints: int) -> None:
        self.n = n_joints
        self._queue: list[tuple[Trajectory, np.ndarray]] = []  # (trajectory, setpoint at its start time)
        self._hold = np.zeros(n_joints)

    def hold(self, q: np.ndarray) -> None:
        """Drop every trajectory and hold position q [n]."""
        self._queue.clear()
        self._hold = np.asarray(q, dtype=np.float64).copy()

    def set_trajectory(self, traj: Trajectory) -> None:
        """Splice `traj` in at traj.start_time (JTC replacement semantics)."""
        anchor = self.sample(traj.start_time)
        self._queue = [(tr, a) for tr, a in self._queue if tr.start_time < traj.start_time]
        self._queue.append((traj, anchor))

    def active(self, t: float) -> Trajectory | None:
        """The trajectory in charge at time t (the latest one started at or before t), or None."""
        entry = self._active_entry(t)
        return entry[0] if entry else None

    def _active_entry(self, t: float) -> tuple[Trajectory, np.ndarray] | None:
        current = None
        for entry in self._queue:
            if entry[0].start_time <= t:
                current = entry
        return current

    def prune(self, t: float) -> None:
        """Forget trajectories superseded before t; a finished last one becomes the held position."""
        entry = self._active_entry(t)
        if entry is None:
            return
        idx = self._queue.index(entry)
        self._queue = self._queue[idx:]
        if len(self._queue) == 1 and t >= entry[0].end_time:
            self.hold(entry[0].positions[-1])

    def sample(self, t: float) -> np.ndarray:
        """Setpoint positions [n] at time t: interpolated, last point held after the end, hold when idle."""
        entry = self._active_entry(t)
        if entry is None:
            return self._hold.copy()
        traj, anchor = entry
        tau = t - traj.start_time
        times, pos, vel = traj.times, traj.positions, traj.velocities
        if tau >= times[-1]:
            return pos[-1].copy()
        k = int(np.searchsorted(times, tau, side="right"))  # first point strictly after tau
        if k == 0:
            t0, p0, v0 = 0.0, anchor, np.zeros(self.n)
        else:
            t0, p0 = times[k - 1], pos[k - 1]
            v0 = vel[k - 1] if vel is not None else None
        t1, p1 = times[k], pos[k]
        h = t1 - t0
        if h <= 0:
            return p1.copy()
        s = (tau - t0) / h
        if vel is None:
            return p0 + s * (p1 - p0)
        return _hermite(p0, v0 if v0 is not None else np.zeros(self.n), p1, vel[k], h, s)
