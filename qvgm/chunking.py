"""Action-chunk scheduling for asynchronous inference: pure numpy, no ROS, no torch.

Times are seconds on the robot clock (the joint-state stamps). A chunk is `positions` float64[H, n] (rad, gripper
m) whose point k is meant for `stamp + k * dt`, stamp = the observation time it was computed from (the same
convention as qvgm.policy.interface.ActionChunk and the JointTrajectory the node publishes).

Pipeline for a chunk coming back from the inference worker (qvgm_policy_node/policy_node.py):
    trim_late      drop the points whose time already passed (a late chunk is never executed stale)
    blend_chunks   linear cross-fade from the previous chunk to the new one over the first `overlap` points
    boundary_jump  max |joint difference| between the previous chunk's setpoint and the new chunk's first point
    finite_difference_velocities   velocities for cubic interpolation (JTC-style)
`AsyncSchedule` says when the next inference should start: when `start_fraction` of the current chunk is left.

Real-time-chunking-style conditioning (inpainting the committed prefix during denoising) lives in the sampler,
qvgm.policy.prefix.sample_with_prefix (policy node parameter boundary_mode=inpaint); blending still applies after.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Chunk:
    """positions float64[H, n]; point k at robot time stamp + (first + k) * dt (first = points trimmed off)."""

    positions: np.ndarray
    stamp: float
    dt: float
    first: int = 0

    def times(self) -> np.ndarray:
        """Absolute robot times (s) of the points, float64[H]."""
        return self.stamp + (self.first + np.arange(len(self.positions))) * self.dt

    @property
    def end_time(self) -> float:
        return self.stamp + (self.first + len(self.positions) - 1) * self.dt

    def sample(self, t: float) -> np.ndarray:
        """Piecewise-linear setpoint [n] at robot time t (first point before it, last point after it)."""
        times = self.times()
        pos = self.positions
        return np.array([np.interp(t, times, pos[:, j]) for j in range(pos.shape[1])], dtype=np.float64)


def trim_late(chunk: Chunk, now: float, margin: float = 0.0) -> tuple[Chunk | None, int]:
    """Trim a late chunk by the elapsed time: point k is dropped once its whole step [t_k, t_k + dt) has passed
    at robot time `now + margin` (s), i.e. floor((now + margin - stamp) / dt) points go. Returns (trimmed chunk,
    or None when every point is stale; number of points dropped). The stamp is unchanged: kept points keep their
    times."""
    if not chunk.dt > 0:
        raise ValueError(f"chunk dt must be > 0, got {chunk.dt}")
    times = chunk.times()
    keep = times + chunk.dt > now + margin + 1e-9
    if not np.any(keep):
        return None, len(times)
    k = int(np.argmax(keep))
    return Chunk(chunk.positions[k:].copy(), chunk.stamp, chunk.dt, chunk.first + k), k


def boundary_jump(previous: Chunk | None, new: Chunk) -> float:
    """Joint-space jump at a chunk boundary: max_j |new[0, j] - previous(t0)[j]| at the new chunk's first point
    time t0 (rad / m, inf-norm over joints). 0.0 without a previous chunk."""
    if previous is None or len(new.positions) == 0:
        return 0.0
    t0 = float(new.times()[0])
    return float(np.max(np.abs(new.positions[0] - previous.sample(t0))))


def blend_chunks(previous: Chunk | None, new: Chunk, overlap: int) -> Chunk:
    """Linear cross-fade over the first `overlap` points of `new`: point i (i < overlap) becomes
    (1 - w_i) * previous(t_i) + w_i * new_i with w_i = (i + 1) / (overlap + 1); points after previous.end_time
    are not blended (previous holds its last point there, which is still blended the same way). overlap <= 0
    or no previous chunk: `new` unchanged."""
    if previous is None or overlap <= 0 or len(new.positions) == 0:
        return new
    out = new.positions.astype(np.float64, copy=True)
    times = new.times()
    m = min(overlap, len(out))
    for i in range(m):
        w = (i + 1) / (overlap + 1)
        out[i] = (1.0 - w) * previous.sample(float(times[i])) + w * out[i]
    return Chunk(out, new.stamp, new.dt, new.first)


def finite_difference_velocities(positions: np.ndarray, dt: float, limit: np.ndarray | None = None) -> np.ndarray:
    """Velocities float64[H, n] (rad/s, m/s) for cubic interpolation: central differences inside, one-sided at
    the first point, 0 at the last (the robot stops at the end of a chunk); clipped to +-limit [n] if given."""
    pos = np.asarray(positions, dtype=np.float64)
    vel = np.zeros_like(pos)
    if len(pos) >= 2:
        vel = np.gradient(pos, dt, axis=0)
        vel[-1] = 0.0
    if limit is not None:
        lim = np.asarray(limit, dtype=np.float64)
        vel = np.clip(vel, -lim, lim)
    return vel


@dataclass
class AsyncSchedule:
    """When to start the next inference: once `start_fraction` (0..1] of the current chunk's duration
    (H * dt) is left, i.e. at robot time stamp + (1 - start_fraction) * H * dt; at once when nothing runs yet.
    `period` overrides the chunk-derived interval when > 0 (s)."""

    start_fraction: float = 0.5
    period: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.start_fraction <= 1.0:
            raise ValueError(f"start_fraction must be in (0, 1], got {self.start_fraction}")

    def interval(self, horizon: int, dt: float) -> float:
        """Robot seconds between two inference starts."""
        return self.period if self.period > 0 else (1.0 - self.start_fraction) * horizon * dt

    def due(self, last_start_stamp: float | None, now: float, horizon: int, dt: float) -> bool:
        """True when an inference started at observation time `last_start_stamp` (None: never) is old enough
        that the next one should start at robot time `now`."""
        if last_start_stamp is None:
            return True
        return now >= last_start_stamp + self.interval(horizon, dt) - 1e-6


def percentile(values: list[float] | np.ndarray, q: float) -> float:
    """q-th percentile (0..100) or nan for no values."""
    arr = np.asarray(values, dtype=np.float64)
    return float(np.percentile(arr, q)) if arr.size else float("nan")
