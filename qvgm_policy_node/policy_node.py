"""policy_node: observation dict from ROS topics -> PolicyBackend -> whole chunk as JointTrajectory.

A timer polls at `poll_hz`; a chunk goes out whenever the robot clock (the joint-state stamp) has advanced by
1/control_hz since the last chunk, so the policy keeps pace with a sim running slower or faster than real time.
Each chunk assembles {images, state, prompt, stamp} (qvgm/policy/interface.py)
from the latest /joint_states, camera images and /qvgm/task. Each stream has a max age (measured on this node's
clock at receipt); if any is stale or missing no chunk is published and the robot keeps executing/holding its
last trajectory. The chunk goes out with header.stamp = the observation's (joint state) stamp and
time_from_start = k * chunk_dt, k = 0..H-1. Backends are chosen by name (qvgm_policy_node/backends.py):
`expert` (sim only, needs /qvgm/sim/objects), `hold`, `flow` (a learned FlowPolicy checkpoint).
"""

from __future__ import annotations

import time
import traceback
from collections import Counter
from typing import Any

import numpy as np
import rclpy
from builtin_interfaces.msg import Duration
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint
from visualization_msgs.msg import MarkerArray

from qvgm.policy.interface import ActionChunk, Observation
from qvgm_policy_node import topics
from qvgm_policy_node.backends import BackendConfig, backend_entry
from qvgm_policy_node.sim_node import TRANSIENT_LOCAL, declare, from_time_msg, to_time_msg

DEFAULTS: dict[str, Any] = {
    "backend": "expert", "control_hz": 10.0, "poll_hz": 50.0, "chunk_dt": 0.1, "horizon": 10,
    "cameras": ["front", "wrist"],
    "joint_names": ["joint_1", "joint_2", "joint_3", "joint_4", "joint_5", "joint_6", "gripper_finger_joint"],
    "max_state_age": 0.25, "max_image_age": 0.5, "max_objects_age": 0.5, "expert_noise": 0.0,
    "expert_seed": -1, "checkpoint": "", "device": "cpu", "num_steps": 10, "seed": -1, "diagnostics_hz": 1.0,
}


def image_to_array(msg: Image) -> np.ndarray:
    """sensor_msgs/Image rgb8 -> uint8[H, W, 3]; ValueError for any other encoding or a bad size."""
    if msg.encoding != "rgb8":
        raise ValueError(f"unsupported encoding {msg.encoding!r} (expected rgb8)")
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if step < 3 * w or len(msg.data) != step * h:
        raise ValueError(f"image data size {len(msg.data)} != step {step} * height {h}")
    buf = np.frombuffer(bytes(msg.data), dtype=np.uint8).reshape(h, step)
    return buf[:, : 3 * w].reshape(h, w, 3).copy()


class PolicyNode(Node):
    """Publishes action chunks from a pluggable backend. Parameters: see DEFAULTS / config/tabletop_sim.yaml."""

    def __init__(self, node_name: str = "policy_node", **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        p = declare(self, DEFAULTS)
        self.joint_names: list[str] = list(p["joint_names"])
        self.cameras: list[str] = list(p["cameras"])
        self.max_age = {"state": float(p["max_state_age"]), "image": float(p["max_image_age"]),
                        "objects": float(p["max_objects_age"])}
        entry = backend_entry(str(p["backend"]))
        options = {"noise": float(p["expert_noise"]), "expert_seed": int(p["expert_seed"]),
                   "checkpoint": str(p["checkpoint"]), "device": str(p["device"]), "num_steps": int(p["num_steps"]),
                   "seed": int(p["seed"])}
        self.backend = entry.factory(BackendConfig(self.joint_names, int(p["horizon"]), float(p["chunk_dt"]), options))
        self.needs_objects = bool(getattr(self.backend, "needs_objects", entry.needs_objects))
        self.skipped: Counter[str] = Counter()
        self.published = 0
        self.last_chunk: ActionChunk | None = None

        # latest values: (value, ros stamp s, receipt time.monotonic())
        self._state: tuple[np.ndarray, float, float] | None = None
        self._images: dict[str, tuple[np.ndarray, float, float]] = {}
        self._objects: tuple[dict[str, np.ndarray], str, float] | None = None
        self._prompt: str | None = None

        self.create_subscription(JointState, topics.JOINT_STATES, self._on_joint_state, 10)
        for cam in self.cameras:
            self.create_subscription(Image, topics.camera_image(cam),
                                     lambda msg, cam=cam: self._on_image(cam, msg), qos_profile_sensor_data)
        self.create_subscription(String, topics.TASK, self._on_task, TRANSIENT_LOCAL)
        if self.needs_objects:
            self.create_subscription(MarkerArray, topics.OBJECTS, self._on_objects, 10)
        self.pub_traj = self.create_publisher(JointTrajectory, topics.TRAJECTORY, 10)
        self.pub_diag = self.create_publisher(DiagnosticArray, topics.DIAGNOSTICS, 10)
        self.control_period = 1.0 / float(p["control_hz"])
        self._last_chunk_stamp = -np.inf
        self.create_timer(1.0 / float(p["poll_hz"]), self._tick)
        self.create_timer(1.0 / float(p["diagnostics_hz"]), self._publish_diagnostics)

    # -- inputs (never raise) ----------------------------------------------------------------------------
    def _on_joint_state(self, msg: JointState) -> None:
        try:
            index = {n: i for i, n in enumerate(msg.name)}
            q = np.array([msg.position[index[j]] for j in self.joint_names], dtype=np.float64)
            if not np.all(np.isfinite(q)):
                raise ValueError("non-finite joint position")
        except (KeyError, IndexError, ValueError) as exc:
            self.skipped["bad_joint_state"] += 1
            self.get_logger().warning(f"ignoring joint state: {exc!r}", throttle_duration_sec=5.0)
            return
        self._state = (q, from_time_msg(msg.header.stamp), time.monotonic())

    def _on_image(self, cam: str, msg: Image) -> None:
        try:
            img = image_to_array(msg)
        except ValueError as exc:
            self.skipped["bad_image"] += 1
            self.get_logger().warning(f"ignoring image from {cam}: {exc}", throttle_duration_sec=5.0)
            return
        self._images[cam] = (img, from_time_msg(msg.header.stamp), time.monotonic())

    def _on_task(self, msg: String) -> None:
        self._prompt = msg.data
        self._last_chunk_stamp = -np.inf
        self._state = None  # a new episode: wait for post-reset observations
        self._objects = None
        self.backend.reset(msg.data)

    def _on_objects(self, msg: MarkerArray) -> None:
        objects: dict[str, np.ndarray] = {}
        task = ""
        for m in msg.markers:
            if m.ns == "task":
                task = m.text
                continue
            p, o = m.pose.position, m.pose.orientation
            objects[m.ns] = np.array([p.x, p.y, p.z, o.w, o.x, o.y, o.z], dtype=np.float64)
        self._objects = (objects, task, time.monotonic())

    # -- control tick ------------------------------------------------------------------------------------
    def observation(self) -> tuple[Observation | None, str]:
        """The current observation dict, or (None, reason) when a stream is missing or stale."""
        now = time.monotonic()
        if self._prompt is None:
            return None, "no_prompt"
        if self._state is None:
            return None, "no_state"
        q, stamp, received = self._state
        if now - received > self.max_age["state"]:
            return None, "stale_state"
        images = {}
        for cam in self.cameras:
            if cam not in self._images:
                return None, f"no_image.{cam}"
            img, _, received = self._images[cam]
            if now - received > self.max_age["image"]:
                return None, f"stale_image.{cam}"
            images[cam] = img
        obs: Observation = {"images": images, "state": q.astype(np.float32), "prompt": self._prompt,
                            "stamp": stamp}
        if self.needs_objects:
            if self._objects is None:
                return None, "no_objects"
            objects, task, received = self._objects
            if now - received > self.max_age["objects"]:
                return None, "stale_objects"
            obs["objects"], obs["task"] = objects, task
            # marker order = the sim's role order, the same layout as TabletopEnv's obs["privileged"]
            obs["privileged"] = np.concatenate(list(objects.values())).astype(np.float32) \
                if objects else np.zeros(0, np.float32)
        return obs, "ok"

    def _tick(self) -> None:
        obs, reason = self.observation()
        if obs is None:
            self.skipped[reason] += 1
            return
        if obs["stamp"] < self._last_chunk_stamp + self.control_period - 1e-3:
            return  # not yet time for the next chunk on the robot clock
        try:
            chunk = self.backend.infer(obs)
            msg = chunk_to_trajectory(chunk)
        except Exception:
            self.skipped["backend_error"] += 1
            self.get_logger().error("backend failed:\n" + traceback.format_exc(), throttle_duration_sec=5.0)
            return
        self.pub_traj.publish(msg)
        self._last_chunk_stamp = float(obs["stamp"])
        self.published += 1
        self.last_chunk = chunk

    def _publish_diagnostics(self) -> None:
        status = DiagnosticStatus()
        status.name, status.hardware_id = "qvgm/policy_node", str(self.backend.name)
        status.level = DiagnosticStatus.OK
        status.message = f"{self.published} chunks published"
        values = {"published_chunks": self.published, "backend": self.backend.name}
        values.update({f"skipped.{k}": v for k, v in sorted(self.skipped.items())})
        status.values = [KeyValue(key=k, value=str(v)) for k, v in values.items()]
        arr = DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        arr.status = [status]
        self.pub_diag.publish(arr)


def chunk_to_trajectory(chunk: ActionChunk) -> JointTrajectory:
    """ActionChunk -> JointTrajectory: header.stamp = chunk.stamp, point k at time_from_start = k * dt."""
    pos = np.asarray(chunk.positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != len(chunk.joint_names) or not np.all(np.isfinite(pos)):
        raise ValueError(f"bad chunk positions shape {pos.shape} for {len(chunk.joint_names)} joints")
    msg = JointTrajectory()
    msg.header.stamp = to_time_msg(chunk.stamp)
    msg.joint_names = list(chunk.joint_names)
    for k, row in enumerate(pos):
        t = k * chunk.dt
        sec = int(t)
        msg.points.append(JointTrajectoryPoint(positions=[float(x) for x in row],
                                               time_from_start=Duration(sec=sec, nanosec=int(round((t - sec) * 1e9)))))
    return msg


def main(args: list[str] | None = None) -> None:
    rclpy.init(args=args)
    node = PolicyNode()
    try:
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
