"""qvgm/chunking.py: late-chunk trimming by elapsed time, overlap blending, boundary jump, velocities, schedule."""

from __future__ import annotations

import numpy as np
import pytest

from qvgm.chunking import (
    AsyncSchedule,
    Chunk,
    blend_chunks,
    boundary_jump,
    finite_difference_velocities,
    percentile,
    trim_late,
)


def ramp(stamp: float, start: float, slope: float, h: int = 10, n: int = 2, dt: float = 0.1) -> Chunk:
    """Chunk whose every joint is start + slope * (time since stamp)."""
    t = np.arange(h) * dt
    return Chunk(np.repeat((start + slope * t)[:, None], n, axis=1), stamp, dt)


def test_on_time_chunk_is_not_trimmed() -> None:
    c = ramp(10.0, 0.0, 1.0)
    out, n = trim_late(c, now=10.05)  # 50 ms of latency: point 0's step [10.0, 10.1) still running
    assert n == 0 and out is not None and len(out.positions) == 10 and out.first == 0


def test_late_chunk_is_trimmed_by_the_elapsed_time() -> None:
    c = ramp(10.0, 0.0, 1.0)
    out, n = trim_late(c, now=10.35)  # 350 ms late: steps 0, 1, 2 are over
    assert n == 3 and out is not None
    assert out.first == 3 and out.stamp == 10.0
    np.testing.assert_allclose(out.times(), 10.0 + np.arange(3, 10) * 0.1)
    np.testing.assert_allclose(out.positions[0], c.positions[3])  # the kept points are unchanged
    out2, n2 = trim_late(c, now=10.05, margin=0.1)  # a transport margin trims one more step
    assert n2 == 1 and out2 is not None and out2.first == 1


def test_chunk_entirely_in_the_past_is_dropped() -> None:
    out, n = trim_late(ramp(10.0, 0.0, 1.0), now=11.2)
    assert out is None and n == 10
    with pytest.raises(ValueError):
        trim_late(Chunk(np.zeros((3, 2)), 0.0, 0.0), now=0.0)


def test_boundary_jump_and_blend_reduce_the_discontinuity() -> None:
    prev = ramp(10.0, 0.0, 1.0)  # at t = 10.5 prev is at 0.5
    new = ramp(10.5, 0.8, 1.0)  # starts 0.3 above: a jump
    assert boundary_jump(None, new) == 0.0
    assert boundary_jump(prev, new) == pytest.approx(0.3)
    blended = blend_chunks(prev, new, overlap=3)
    # weights 1/4, 2/4, 3/4 then the new chunk alone
    for i, w in enumerate([0.25, 0.5, 0.75]):
        t = 10.5 + 0.1 * i
        expect = (1 - w) * (t - 10.0) + w * (0.8 + 0.1 * i)
        np.testing.assert_allclose(blended.positions[i], expect)
    np.testing.assert_allclose(blended.positions[3:], new.positions[3:])
    assert boundary_jump(prev, blended) == pytest.approx(0.075)
    assert boundary_jump(prev, blended) < boundary_jump(prev, new)
    assert blend_chunks(prev, new, 0) is new and blend_chunks(None, new, 3) is new


def test_blend_of_a_trimmed_chunk_uses_absolute_times() -> None:
    prev = ramp(0.0, 0.0, 0.0, h=10)  # holds 0
    late, _ = trim_late(ramp(0.2, 1.0, 0.0), now=0.45)  # points from t = 0.4 on
    assert late is not None and late.first == 2
    blended = blend_chunks(prev, late, overlap=1)
    np.testing.assert_allclose(blended.positions[0], 0.5)  # halfway between prev (0) and new (1)
    np.testing.assert_allclose(blended.times()[0], 0.4)


def test_sample_interpolates_and_holds_the_ends() -> None:
    c = ramp(1.0, 0.0, 2.0, h=3)  # 0, 0.2, 0.4 at t = 1.0, 1.1, 1.2
    np.testing.assert_allclose(c.sample(1.05), [0.1, 0.1])
    np.testing.assert_allclose(c.sample(0.0), [0.0, 0.0])
    np.testing.assert_allclose(c.sample(5.0), [0.4, 0.4])
    assert c.end_time == pytest.approx(1.2)


def test_finite_difference_velocities() -> None:
    pos = np.array([[0.0], [0.1], [0.3], [0.6]])
    vel = finite_difference_velocities(pos, 0.1)
    np.testing.assert_allclose(vel[:, 0], [1.0, 1.5, 2.5, 0.0])
    np.testing.assert_allclose(finite_difference_velocities(pos, 0.1, np.array([2.0]))[:, 0], [1.0, 1.5, 2.0, 0.0])
    assert finite_difference_velocities(pos[:1], 0.1).tolist() == [[0.0]]


def test_async_schedule_starts_when_the_fraction_is_left() -> None:
    s = AsyncSchedule(start_fraction=0.3)
    assert s.interval(10, 0.1) == pytest.approx(0.7)
    assert s.due(None, 0.0, 10, 0.1)
    assert not s.due(5.0, 5.69, 10, 0.1)
    assert s.due(5.0, 5.7, 10, 0.1)
    assert AsyncSchedule(0.5, period=0.2).interval(10, 0.1) == 0.2
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError):
            AsyncSchedule(bad)
    assert np.isnan(percentile([], 50)) and percentile([1.0, 2.0, 3.0], 50) == 2.0
