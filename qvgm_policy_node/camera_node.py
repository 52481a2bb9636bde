"""camera_node: one camera (RealSense or OpenCV) -> realsense-ros style topics, thin over `qvgm.camera`.

One node per camera (node `/camera/<camera_name>`); several cameras = several nodes, in one process
(`make_camera_nodes` + one executor, or `qvgm up`) or one process each. Publishes:
  /camera/<name>/color/image_raw                     sensor_msgs/Image rgb8, frame `<name>_color_optical_frame`
  /camera/<name>/color/camera_info                   sensor_msgs/CameraInfo from the device intrinsics
  /camera/<name>/aligned_depth_to_color/image_raw    sensor_msgs/Image 16UC1 (units: depth_scale_m on /diagnostics)
  /camera/<name>/aligned_depth_to_color/camera_info  same intrinsics as colour (depth is reprojected into it)
  /diagnostics                                       diagnostic_msgs/DiagnosticArray, every diagnostics_period_s
Images use sensor-data QoS (best effort: subscribers must not ask for RELIABLE), camera_info and diagnostics
are reliable (image_qos / info_qos select SENSOR_DATA or DEFAULT). header.stamp is the capture time in ROS
time (device clock mapped as realsense-ros does; host time of the grab for OpenCV).
Frames with a repeated frame number, a stale stamp or frozen content are not published; a frozen stream
longer than `frozen_reconnect_s` and a lost device are reopened by the capture thread, never by a restart.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import rclpy
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header

from qvgm.camera import (
    CameraIntrinsics,
    FrameHealth,
    FrameSource,
    HealthConfig,
    OpenCVSource,
    RealSenseSource,
    SourceDisconnected,
    Verdict,
    camera_info_dict,
    optical_frame_id,
)

PARAMETERS: dict[str, Any] = {
    "camera_name": "camera",  # topic and frame prefix
    "backend": "realsense",  # realsense | opencv
    "serial_no": "",  # realsense: device serial number ("" = first device found)
    "device": "0",  # opencv: V4L2 index, video file path or URL
    "width": 640,
    "height": 480,
    "fps": 30,
    "enable_depth": True,  # realsense: publish depth aligned to colour
    "loop_file": False,  # opencv: loop a video file instead of treating its end as a disconnect
    "hfov_deg": 69.0,  # opencv: horizontal field of view for the (uncalibrated) camera_info
    "frozen_frames": 10,  # identical images in a row that make the stream frozen
    "stale_timeout_s": 0.5,  # frames older than this at reception are not published
    "read_timeout_s": 1.0,  # no frame for this long = disconnected
    "frozen_reconnect_s": 2.0,  # reopen a stream frozen for this long
    "reconnect_period_s": 0.5,  # wait between reopen attempts
    "diagnostics_period_s": 1.0,
    "image_qos": "SENSOR_DATA",  # images: SENSOR_DATA (best effort) | DEFAULT (reliable, depth 10)
    "info_qos": "DEFAULT",  # camera_info: reliable by default, so reliable and best-effort subscribers both match
}

QOS_PROFILES = {"SENSOR_DATA": qos_profile_sensor_data, "DEFAULT": QoSProfile(depth=10)}


def qos_by_name(name: str) -> QoSProfile:
    """realsense-ros style QoS names (SENSOR_DATA, DEFAULT) -> profile; ValueError for any other."""
    try:
        return QOS_PROFILES[name.upper()]
    except KeyError:
        raise ValueError(f"unknown QoS {name!r}; use one of {sorted(QOS_PROFILES)}") from None


def stamp_msg(ns: int) -> Time:
    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def image_msg(array: np.ndarray, encoding: str, header: Header) -> Image:
    """rgb8 (HxWx3 uint8) or 16UC1 (HxW uint16, little-endian) image message."""
    arr = np.ascontiguousarray(array)
    msg = Image(header=header, height=arr.shape[0], width=arr.shape[1], encoding=encoding,
                is_bigendian=0, step=arr.shape[1] * arr.itemsize * (arr.shape[2] if arr.ndim == 3 else 1))
    msg.data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    return msg


def camera_info_msg(intr: CameraIntrinsics, frame_id: str, stamp: Time) -> CameraInfo:
    info = camera_info_dict(intr, frame_id)
    return CameraInfo(header=Header(stamp=stamp, frame_id=frame_id), height=info["height"], width=info["width"],
                      distortion_model=info["distortion_model"], d=info["d"], k=info["k"], r=info["r"],
                      p=info["p"])


class CameraNode(Node):
    """One camera. `source_factory` (optional) builds the FrameSource, overriding backend/serial/device:
    used to drive a software RealSense device in tests and benchmarks."""

    def __init__(self, camera_name: str | None = None, *, source_factory: Callable[[], FrameSource] | None = None,
                 parameter_overrides: dict[str, Any] | None = None, **node_kwargs: Any) -> None:
        overrides = dict(parameter_overrides or {})
        if camera_name is not None:
            overrides["camera_name"] = camera_name
        name = str(overrides.get("camera_name", PARAMETERS["camera_name"]))
        super().__init__(name, namespace="camera", **node_kwargs)
        p = {key: self.declare_parameter(key, overrides.get(key, default)).value
             for key, default in PARAMETERS.items()}
        self.params = p
        self.camera_name = str(p["camera_name"])
        self.health = FrameHealth(HealthConfig(int(p["frozen_frames"]), float(p["stale_timeout_s"])))
        self._factory = source_factory or self._default_factory
        base = f"/camera/{self.camera_name}"
        self.color_frame_id = optical_frame_id(self.camera_name, "color")
        image_qos, info_qos = qos_by_name(str(p["image_qos"])), qos_by_name(str(p["info_qos"]))
        self.pub_color = self.create_publisher(Image, f"{base}/color/image_raw", image_qos)
        self.pub_info = self.create_publisher(CameraInfo, f"{base}/color/camera_info", info_qos)
        self.pub_depth = self.pub_depth_info = None
        if p["backend"] == "realsense" and p["enable_depth"]:
            self.pub_depth = self.create_publisher(Image, f"{base}/aligned_depth_to_color/image_raw", image_qos)
            self.pub_depth_info = self.create_publisher(CameraInfo, f"{base}/aligned_depth_to_color/camera_info",
                                                        info_qos)
        self.pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", QoSProfile(depth=10))
        self.state = "starting"
        self.reconnects = 0
        self.errors = 0
        self.last_error = ""
        self.hardware_id = ""
        self.depth_scale = float("nan")
        self._source: FrameSource | None = None
        self._opened_once = False
        self._frozen_reopen_ns = 0
        self._running = True
        self._thread = threading.Thread(target=self._capture_loop, name=f"camera-{self.camera_name}", daemon=True)
        self.create_timer(float(p["diagnostics_period_s"]), self.publish_diagnostics)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ sources
    def _default_factory(self) -> FrameSource:
        p = self.params
        if p["backend"] == "realsense":
            return RealSenseSource(str(p["serial_no"]), int(p["width"]), int(p["height"]), int(p["fps"]),
                                   bool(p["enable_depth"]))
        if p["backend"] == "opencv":
            return OpenCVSource(str(p["device"]), int(p["width"]), int(p["height"]), float(p["fps"]),
                                bool(p["loop_file"]), float(p["hfov_deg"]))
        raise ValueError(f"unknown camera backend {p['backend']!r} (realsense | opencv)")

    def _open(self) -> bool:
        try:
            source = self._factory()
            self.hardware_id = source.hardware_id
            source.open()
        except Exception as exc:  # absent device, bad configuration, driver error: report and retry, never die
            self._set_error("disconnected", exc)
            return False
        self._source = source
        self.hardware_id = source.hardware_id
        self.health.reset_stream()
        if self._opened_once:
            self.reconnects += 1
            self.get_logger().info(f"{self.camera_name}: reconnected to {self.hardware_id}")
        self._opened_once = True
        self.state = "frozen" if self.health.frozen else "streaming"  # reopening does not unfreeze
        return True

    def _close(self) -> None:
        if self._source is not None:
            try:
                self._source.close()
            except Exception as exc:  # closing a vanished device may raise anything; it is gone either way
                self.get_logger().warning(f"{self.camera_name}: close failed: {exc}")
            self._source = None

    def _set_error(self, state: str, exc: BaseException) -> None:
        msg = f"{type(exc).__name__}: {exc}"
        if msg != self.last_error or state != self.state:
            self.get_logger().warning(f"{self.camera_name}: {state}: {msg}")
        self.state, self.last_error = state, msg

    # --------------------------------------------------------------------------------------- capture
    def _capture_loop(self) -> None:
        p = self.params
        period = float(p["reconnect_period_s"])
        while self._running and self.context.ok():
            if self._source is None and not self._open():
                time.sleep(period)
                continue
            try:
                frame = self._source.read(float(p["read_timeout_s"]))
            except SourceDisconnected as exc:
                self._set_error("disconnected", exc)
                self._close()
                continue
            except Exception as exc:  # a bad frame: count it, keep the stream
                self.errors += 1
                self._set_error("bad_frame", exc)
                continue
            if frame is None:
                continue
            try:
                self._handle(frame)
            except Exception as exc:
                self.errors += 1
                self._set_error("bad_frame", exc)

    def _handle(self, frame: Any) -> None:
        now = time.time_ns()
        verdict = self.health.check(frame.color, frame.frame_number, frame.stamp_ns, now)
        if verdict is Verdict.FROZEN:
            self.state = "frozen"
            since = max(self.health.frozen_since_ns or now, self._frozen_reopen_ns)
            if (now - since) * 1e-9 >= float(self.params["frozen_reconnect_s"]):
                self.get_logger().warning(f"{self.camera_name}: frozen for {(now - since) * 1e-9:.1f} s, reopening")
                self._frozen_reopen_ns = now
                self._close()
            return
        if verdict is not Verdict.OK:
            return
        src = self._source
        intr = src.intrinsics if src is not None else CameraIntrinsics.from_fov(*frame.color.shape[1::-1], 69.0)
        if frame.color.dtype != np.uint8 or frame.color.shape != (intr.height, intr.width, 3):
            raise ValueError(f"colour image {frame.color.dtype} {frame.color.shape} does not match "
                             f"{intr.width}x{intr.height} rgb8")
        self.state = "streaming"
        stamp = stamp_msg(frame.stamp_ns)
        header = Header(stamp=stamp, frame_id=self.color_frame_id)
        self.pub_color.publish(image_msg(frame.color, "rgb8", header))
        self.pub_info.publish(camera_info_msg(intr, self.color_frame_id, stamp))
        if self.pub_depth is not None and frame.depth is not None:
            if frame.depth.dtype != np.uint16 or frame.depth.shape != frame.color.shape[:2]:
                raise ValueError(f"depth image {frame.depth.dtype} {frame.depth.shape} is not uint16 aligned")
            self.pub_depth.publish(image_msg(frame.depth, "16UC1", header))
            self.depth_scale = frame.depth_scale
            self.pub_depth_info.publish(camera_info_msg(intr, self.color_frame_id, stamp))
        self.health.mark_published(time.time_ns())

    # ----------------------------------------------------------------------------------- diagnostics
    def diagnostics(self) -> DiagnosticStatus:
        """OK while streaming fresh frames; WARN when frames are late/stale; ERROR when frozen or disconnected."""
        now = time.time_ns()
        h = self.health
        fps = h.fps(now)
        last = h.last_publish_host_ns
        since_last = (now - last) * 1e-9 if last is not None else float("inf")
        if self.state in ("disconnected", "frozen", "starting") or since_last > float(self.params["read_timeout_s"]):
            level, message = DiagnosticStatus.ERROR, self.state if self.state != "streaming" else "no frames"
        elif fps < 0.8 * float(self.params["fps"]) or since_last > float(self.params["stale_timeout_s"]):
            level, message = DiagnosticStatus.WARN, f"low rate {fps:.1f} fps"
        else:
            level, message = DiagnosticStatus.OK, "streaming"
        values = {
            "state": self.state, "fps": f"{fps:.2f}", "frames": h.frames, "published": h.published,
            "drops": h.drops, "repeated": h.repeated, "stale": h.stale, "frozen_frames": h.frozen_frames,
            "age_ms": f"{h.last_age_s * 1e3:.2f}", "since_last_publish_s": f"{since_last:.3f}",
            "reconnects": self.reconnects, "errors": self.errors, "last_error": self.last_error,
            "depth_scale_m": f"{self.depth_scale:g}",
        }
        return DiagnosticStatus(level=level, name=f"camera_node: {self.camera_name}", message=message,
                                hardware_id=self.hardware_id,
                                values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])

    def publish_diagnostics(self) -> None:
        msg = DiagnosticArray(header=Header(stamp=self.get_clock().now().to_msg()), status=[self.diagnostics()])
        self.pub_diag.publish(msg)

    def destroy_node(self) -> None:
        self._running = False
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5.0)
        self._close()
        super().destroy_node()


def make_camera_nodes(cameras: Sequence[dict[str, Any]], **node_kwargs: Any) -> list[CameraNode]:
    """One CameraNode per parameter dict (keys from PARAMETERS; each needs a distinct `camera_name`), e.g. from
    a profile's camera list; node_kwargs (context=...) go to every node. Add them to one executor."""
    names = [str(c.get("camera_name", "")) for c in cameras]
    if len(set(names)) != len(names) or "" in names:
        raise ValueError(f"each camera needs a distinct non-empty camera_name, got {names}")
    unknown = sorted({k for c in cameras for k in c} - set(PARAMETERS))
    if unknown:
        raise ValueError(f"unknown camera parameters {unknown}; known: {sorted(PARAMETERS)}")
    return [CameraNode(parameter_overrides=dict(c), **node_kwargs) for c in cameras]


def main(argv: list[str] | None = None) -> int:
    """`python -m qvgm_policy_node.camera_node --ros-args -p camera_name:=wrist -p serial_no:=...`"""
    args = sys.argv if argv is None else argv
    rclpy.init(args=args)
    # the node is named after the camera (/camera/<camera_name>) unless remapped with -r __node:=...
    name = next((a.split(":=", 1)[1] for a in args if a.startswith("camera_name:=")), None)
    node = CameraNode(name)
    # frames are captured and published on the node's own thread; the executor only runs the diagnostics timer and
    # parameter services. Not rclpy's MultiThreadedExecutor: with image subscribers in the same executor (the tests)
    # its spin loop busy-waited holding the GIL and starved the capture thread from 30 to 2-5 fps in about half the
    # runs (rclpy issue #1452); one thread is all this node needs
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
