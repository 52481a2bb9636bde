"""ROS message -> numpy conversions shared by recorder_node (rclpy messages) and the MCAP converter (messages
decoded by mcap_ros2, plain attribute objects). Duck-typed on field names, so this module never imports rclpy.

Stamps are seconds (float) of the clock that stamped them; joint positions are robot units (rad, m) reordered
to the caller's joint names; images uint8[H, W, 3] RGB. Every function raises ValueError (or KeyError for a
missing joint) on a bad message; callers turn that into a counted, logged rejection, never a crash.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def stamp_seconds(stamp: Any) -> float:
    """builtin_interfaces/Time or Duration (sec, nanosec) -> seconds."""
    return stamp.sec + stamp.nanosec * 1e-9


def image_array(msg: Any) -> np.ndarray:
    """sensor_msgs/Image rgb8 (or bgr8) -> uint8[H, W, 3] RGB (read-only view for rgb8); ValueError otherwise."""
    if msg.encoding not in ("rgb8", "bgr8"):
        raise ValueError(f"encoding {msg.encoding!r} (need rgb8)")
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if step < 3 * w or len(msg.data) < h * step:
        raise ValueError(f"data {len(msg.data)} bytes too short for {h}x{w} step {step}")
    a = np.frombuffer(msg.data, np.uint8, count=h * step).reshape(h, step)[:, :3 * w].reshape(h, w, 3)
    # a zero-copy view of the message buffer (rclpy never reuses a delivered message); bgr8 is converted
    return np.ascontiguousarray(a[..., ::-1]) if msg.encoding == "bgr8" else a


def joint_vector(msg: Any, joint_names: list[str]) -> np.ndarray:
    """sensor_msgs/JointState -> float64[len(joint_names)] positions in `joint_names` order (the message may
    list joints in any order, and more of them). KeyError/IndexError for a missing joint, ValueError for NaN."""
    idx = {n: i for i, n in enumerate(msg.name)}
    q = np.array([msg.position[idx[n]] for n in joint_names], dtype=np.float64)
    if not np.all(np.isfinite(q)):
        raise ValueError("non-finite position")
    return q


def trajectory_arrays(msg: Any, joint_names: list[str]) -> tuple[float, np.ndarray, np.ndarray]:
    """trajectory_msgs/JointTrajectory -> (header stamp s (0 = unstamped), times float64[H] s from the stamp,
    positions float64[H, n] in `joint_names` order). KeyError/IndexError for a missing joint, ValueError for
    no points."""
    idx = {n: i for i, n in enumerate(msg.joint_names)}
    cols = [idx[n] for n in joint_names]
    if not msg.points:
        raise ValueError("no points")
    pos = np.array([[p.positions[c] for c in cols] for p in msg.points], dtype=np.float64)
    times = np.array([stamp_seconds(p.time_from_start) for p in msg.points])
    return stamp_seconds(msg.header.stamp), times, pos
