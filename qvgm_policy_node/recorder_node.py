"""recorder_node: writes every episode to the replay buffer (qvgm.data) from the live topics.

Subscribes: /camera/<cam>/color/image_raw (sensor_msgs/Image rgb8, sensor-data QoS), /joint_states,
/arm_controller/joint_trajectory (chunks and teleop jogs: the executed setpoint), /qvgm/task (String,
transient-local), /qvgm/policy/version (String, transient-local: tags the chunks received after it),
/qvgm/episode/status (String JSON from episode_manager, transient-local).
Publishes: /recorder_node/episodes (String JSON per finished/refused episode), /diagnostics.
Debugging option: `mcap_dir` (default "" = off) also writes every subscribed topic's raw messages (CDR, from
`raw=True` subscriptions) to `<mcap_dir>/session-<UTC time>-<pid>.mcap`, one file per node run, with ros2msg
schemas and the recorder config as metadata (qvgm.data.mcap; `python -m qvgm.data.mcap` converts it to episodes).
Alignment, frame checks and the writer thread live in qvgm.recording.EpisodeRecorder; this node only converts
messages (stamps in seconds of the node clock, positions in robot units) and never blocks in a callback.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from qvgm.data import ReplayBuffer
from qvgm.data.mcap import METADATA_NAME, McapTopicWriter, RecordingConfig
from qvgm.recording import EpisodeRecorder, QualityConfig
from qvgm.rosmsg import image_array, joint_vector, stamp_seconds, trajectory_arrays
from qvgm_policy_node import topics
from qvgm_policy_node.params import declare, spin_main

LATCHED = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
STATUS_QOS = QoSProfile(depth=20, durability=DurabilityPolicy.TRANSIENT_LOCAL)  # every transition
STATUS_TOPIC = "/qvgm/episode/status"
VERSION_TOPIC = "/qvgm/policy/version"
JOINT_NAMES = ["joint_1", "joint_2", "joint_3", "joint_4", "joint_5", "joint_6", "gripper_finger_joint"]

DEFAULTS: dict[str, Any] = {
    "root": "", "fps": 10, "cameras": ["front", "wrist"], "reference_camera": "front", "image_height": 224,
    "image_width": 224, "joint_names": JOINT_NAMES, "quality_mode": "mark", "max_age": 0.1, "max_latency": 0.2,
    "gap_factor": 1.5, "frozen_frames": 3, "align_delay": 0.2, "queue_size": 256, "default_task": "",
    "poll_hz": 50.0, "image_queue_depth": 30, "image_reliability": "best_effort",
    "trajectory_topic": topics.TRAJECTORY,
    "codec": "libx264", "crf": 20, "pix_fmt": "yuv420p",
    "mcap_dir": "", "mcap_compression": "lz4",
}


class RecorderNode(Node):
    """See the module doc; parameters in DEFAULTS (root is required: the dataset directory)."""

    def __init__(self, node_name: str = "recorder_node", **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        p = declare(self, DEFAULTS)
        if not p["root"]:
            raise ValueError("recorder_node: parameter 'root' (dataset directory) is required")
        self.joint_names = list(p["joint_names"])
        cams = list(p["cameras"])
        buf = ReplayBuffer.open_or_create(p["root"], fps=int(p["fps"]),
                                          cameras={c: (int(p["image_height"]), int(p["image_width"])) for c in cams},
                                          state_names=self.joint_names, action_names=self.joint_names,
                                          codec=str(p["codec"]), crf=int(p["crf"]), pix_fmt=str(p["pix_fmt"]))
        if len(buf.features["observation.state"]["shape"]) and \
                buf.features["observation.state"]["shape"][0] != len(self.joint_names):
            buf.close()
            raise ValueError(f"{p['root']}: dataset state dim does not match joint_names {self.joint_names}")
        cfg = QualityConfig(mode=str(p["quality_mode"]), max_age=float(p["max_age"]),
                            max_latency=float(p["max_latency"]), gap_factor=float(p["gap_factor"]),
                            frozen_frames=int(p["frozen_frames"]))
        self.core = EpisodeRecorder(buf, str(p["reference_camera"]), cfg, delay=float(p["align_delay"]),
                                    queue_size=int(p["queue_size"]), default_task=str(p["default_task"]),
                                    logger=lambda m: self.get_logger().error(m))
        self.bad: dict[str, int] = {}
        self.received: dict[str, int] = {}  # images received per camera (diagnostics, benches)
        self._reported = 0
        # sensor-data QoS (best effort) with a deeper queue: a busy executor loses no frame for up to ~1 s
        # (image_reliability "reliable" only matches reliable publishers, e.g. realsense-ros' default image QoS)
        if p["image_reliability"] not in ("best_effort", "reliable"):
            raise ValueError(f"image_reliability must be best_effort or reliable, got {p['image_reliability']!r}")
        rel = ReliabilityPolicy.RELIABLE if p["image_reliability"] == "reliable" else ReliabilityPolicy.BEST_EFFORT
        image_qos = QoSProfile(depth=int(p["image_queue_depth"]), reliability=rel,
                               durability=qos_profile_sensor_data.durability)
        # (role, topic, type, callback, qos) of every subscription; the MCAP option records the same topics raw
        subs: list[tuple[str, str, Any, Any, Any]] = [
            (f"image/{cam}", topics.camera_image(cam), Image, lambda m, c=cam: self._on_image(c, m), image_qos)
            for cam in self.core.cameras]
        subs += [("joint_states", topics.JOINT_STATES, JointState, self._on_joint_state, 50),
                 ("trajectory", str(p["trajectory_topic"]), JointTrajectory, self._on_trajectory, 10),
                 ("task", topics.TASK, String, lambda m: self.core.set_task(m.data), LATCHED),
                 ("version", VERSION_TOPIC, String, lambda m: self.core.set_version(m.data), LATCHED),
                 ("status", STATUS_TOPIC, String, self._on_status, STATUS_QOS)]
        for _, topic, typ, cb, qos in subs:
            self.create_subscription(typ, topic, cb, qos)
        self.mcap: McapTopicWriter | None = None
        if p["mcap_dir"]:
            rec_cfg = RecordingConfig(topics={role: topic for role, topic, *_ in subs}, cameras=dict(self.core.sizes),
                                      reference=str(p["reference_camera"]), fps=int(p["fps"]),
                                      joint_names=self.joint_names, quality=cfg, delay=float(p["align_delay"]),
                                      default_task=str(p["default_task"]))
            t = time.time()
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(t)) + f".{int(t * 1e3) % 1000:03d}Z"
            name = f"session-{stamp}-{os.getpid()}.mcap"
            try:
                self.mcap = McapTopicWriter(Path(str(p["mcap_dir"])) / name, {METADATA_NAME: rec_cfg.to_metadata()},
                                            compression=str(p["mcap_compression"]))
                for _, topic, typ, _, _ in subs:
                    self.mcap.add_channel(topic, f"{typ.__module__.split('.')[0]}/msg/{typ.__name__}")
            except BaseException:
                if self.mcap is not None:
                    self.mcap.close()
                self.core.close()
                raise
            for _, topic, typ, _, qos in subs:
                self.create_subscription(typ, topic, lambda data, info, t=topic: self._on_raw(t, data, info), qos,
                                         raw=True)
            self.get_logger().info(f"recording raw topics to {self.mcap.path}")
        self.pub_episodes = self.create_publisher(String, "~/episodes", 10)
        self.pub_diag = self.create_publisher(DiagnosticArray, topics.DIAGNOSTICS, 10)
        self.create_timer(1.0 / float(p["poll_hz"]), self._poll)
        self.create_timer(1.0, self._diagnostics)

    def now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _bad(self, what: str, detail: str) -> None:
        self.bad[what] = self.bad.get(what, 0) + 1
        self.get_logger().warning(f"ignored bad {what} message: {detail}", throttle_duration_sec=2.0)

    def _on_raw(self, topic: str, data: bytes, info: Any) -> None:
        """A raw (CDR) message for the MCAP file: queued, never written here."""
        try:
            self.mcap.write(topic, data, self.get_clock().now().nanoseconds,  # type: ignore[union-attr]
                            int(info.get("source_timestamp") or 0) if isinstance(info, dict) else None)
        except Exception as exc:
            self._bad(f"mcap/{topic}", str(exc))

    def _on_image(self, cam: str, msg: Image) -> None:
        self.received[cam] = self.received.get(cam, 0) + 1
        try:
            img = image_array(msg)
            h, w = self.core.sizes[cam]
            if img.shape != (h, w, 3):
                raise ValueError(f"{img.shape[1]}x{img.shape[0]} image, dataset expects {w}x{h}")
            self.core.add_image(cam, stamp_seconds(msg.header.stamp) or self.now(), img, self.now())
        except Exception as exc:
            self._bad(f"image/{cam}", str(exc))

    def _on_joint_state(self, msg: JointState) -> None:
        try:
            q = joint_vector(msg, self.joint_names)
            self.core.add_state(stamp_seconds(msg.header.stamp) or self.now(), q)
        except (KeyError, IndexError) as exc:
            self._bad("joint_states", f"missing joint {exc}")
        except Exception as exc:
            self._bad("joint_states", str(exc))

    def _on_trajectory(self, msg: JointTrajectory) -> None:
        try:
            stamp, times, pos = trajectory_arrays(msg, self.joint_names)
            self.core.add_chunk(stamp if stamp > 0 else self.now(), times, pos)
        except (KeyError, IndexError) as exc:
            self._bad("trajectory", f"joint {exc} missing")
        except Exception as exc:
            self._bad("trajectory", str(exc))

    def _on_status(self, msg: String) -> None:
        try:
            st = json.loads(msg.data)
            if not isinstance(st, dict) or "state" not in st or "episode" not in st:
                raise ValueError("status needs state and episode")
            self.core.on_status(st)
        except Exception as exc:
            self._bad("status", str(exc))

    def _poll(self) -> None:
        try:
            self.core.poll(self.now())
        except Exception as exc:  # keep recording; the episode's notes carry the counts
            self.get_logger().error(f"poll failed: {type(exc).__name__}: {exc}", throttle_duration_sec=2.0)
        while self._reported < len(self.core.results):
            r = self.core.results[self._reported]
            self._reported += 1
            self.pub_episodes.publish(String(data=json.dumps(r)))
            self.get_logger().info(f"episode {r['episode']}: {r['status']} (buffer index {r['index']})")

    def _diagnostics(self) -> None:
        rep = self.core.aligner.report
        level = DiagnosticStatus.OK if not rep.flawed(self.core.cfg) and not self.core.errors else DiagnosticStatus.WARN
        vals = {**{f"count.{k}": v for k, v in rep.counts.items()}, **{f"bad.{k}": v for k, v in self.bad.items()},
                **{f"received.{k}": v for k, v in self.received.items()},
                "queue": self.core.pending(), "frames_queued": self.core.frames_queued,
                "episodes": len(self.core.results), "errors": len(self.core.errors)}
        if self.mcap is not None:
            vals.update({"mcap.path": str(self.mcap.path), "mcap.written": sum(self.mcap.written.values()),
                         "mcap.dropped": sum(self.mcap.dropped.values()), "mcap.failed": self.mcap.failed or ""})
            if self.mcap.failed or self.mcap.dropped:
                level = DiagnosticStatus.WARN
        st = DiagnosticStatus(level=level, name="qvgm: recorder_node", message="recording" if self.core.episode
                              is not None else "idle", values=[KeyValue(key=k, value=str(v)) for k, v in vals.items()])
        arr = DiagnosticArray(status=[st])
        arr.header.stamp = self.get_clock().now().to_msg()
        self.pub_diag.publish(arr)

    def destroy_node(self) -> None:
        try:
            self.core.close()
        finally:
            try:
                if self.mcap is not None:
                    self.mcap.close()
            finally:
                super().destroy_node()


def main(args: list[str] | None = None) -> None:
    spin_main(RecorderNode, args)


if __name__ == "__main__":
    main()
