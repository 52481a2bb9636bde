"""Frame sources: a RealSense device (colour + optional depth aligned to colour) and OpenCV (V4L2/USB index,
video file or URL). Each yields `Frame`s with RGB images and ROS-time stamps; a lost device raises
`SourceDisconnected` so the caller can close and reopen it without restarting anything.

RealSense notes (pyrealsense2 2.59): the sensors are opened directly (sensor.open/start into a frame_queue),
not through `rs.pipeline`, so the same code drives a real camera and an `rs.software_device` (a software
device is never listed by `rs.context.query_devices`, so a pipeline cannot start it). Colour and depth are
paired here by timestamp (within half a frame period) and combined into a frameset by a processing block,
because `rs.syncer` delivered software-device frames one at a time; `rs.align(rs.stream.color)` then
reprojects depth into the colour camera.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from qvgm.camera.intrinsics import CameraIntrinsics
from qvgm.camera.timestamps import TimestampMapper


class SourceDisconnected(RuntimeError):
    """The device or stream is gone (unplugged, file removed, no frame within the timeout)."""


@dataclass
class Frame:
    """One capture. color: uint8 HxWx3 RGB; depth: uint16 HxW aligned to colour (units `depth_scale` m) or
    None; stamp_ns: ROS time of exposure (ns since epoch); host_ns: host wall time (ns) when it was received;
    frame_number: device counter when the device has one."""

    color: np.ndarray
    depth: np.ndarray | None
    stamp_ns: int
    host_ns: int
    frame_number: int | None
    depth_scale: float = 0.001


class FrameSource(Protocol):
    intrinsics: CameraIntrinsics
    hardware_id: str

    def open(self) -> None: ...
    def read(self, timeout_s: float) -> Frame | None: ...
    def close(self) -> None: ...


# ----------------------------------------------------------------------------------------------- OpenCV


class OpenCVSource:
    """cv2.VideoCapture over a device index (int or "0"), a file path, or a URL.

    Files play at their own frame rate (or `fps` when given), looping when `loop`; the end of a file that
    does not loop, a missing file or a failed grab counts as a disconnect. Stamps are the host time of
    the grab (USB cameras expose no usable device clock through OpenCV).
    """

    def __init__(self, uri: str | int, width: int = 0, height: int = 0, fps: float = 0.0, loop: bool = False,
                 hfov_deg: float = 69.0) -> None:
        self.uri = int(uri) if isinstance(uri, str) and uri.isdigit() else uri
        self.width, self.height, self.fps, self.loop, self.hfov_deg = width, height, fps, loop, hfov_deg
        self.hardware_id = f"opencv:{self.uri}"
        self.intrinsics = CameraIntrinsics.from_fov(max(width, 1), max(height, 1), hfov_deg)
        self._cap: Any = None
        self._is_file = isinstance(self.uri, str) and "://" not in self.uri
        self._period_s = 0.0
        self._next_s = 0.0
        self._count = 0

    def open(self) -> None:
        import cv2

        if self._is_file and not os.path.exists(str(self.uri)):
            raise SourceDisconnected(f"video file {self.uri} does not exist")
        cap = cv2.VideoCapture(self.uri)
        if not cap.isOpened():
            cap.release()
            raise SourceDisconnected(f"cannot open {self.uri!r} with OpenCV")
        if not self._is_file:
            if self.width and self.height:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.width)
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.height)
            if self.fps:
                cap.set(cv2.CAP_PROP_FPS, self.fps)
        w = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        h = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        native_fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.intrinsics = CameraIntrinsics.from_fov(w or max(self.width, 1), h or max(self.height, 1),
                                                    self.hfov_deg)
        rate = self.fps or native_fps or 30.0
        self._period_s = 1.0 / rate if self._is_file else 0.0
        self._next_s = time.monotonic()
        self._cap = cap

    def read(self, timeout_s: float) -> Frame | None:
        import cv2

        if self._cap is None:
            raise SourceDisconnected("source is not open")
        if self._period_s:  # pace file playback like a live camera
            delay = self._next_s - time.monotonic()
            if delay > timeout_s:
                return None
            if delay > 0:
                time.sleep(delay)
            self._next_s = max(self._next_s + self._period_s, time.monotonic() - self._period_s)
            if not os.path.exists(str(self.uri)):
                raise SourceDisconnected(f"video file {self.uri} was removed")
        ok, bgr = self._cap.read()
        if not ok and self._is_file and self.loop:
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, bgr = self._cap.read()
        if not ok or bgr is None:
            raise SourceDisconnected(f"no frame from {self.uri!r} (end of stream or device lost)")
        host_ns = time.time_ns()
        if bgr.ndim == 2:
            rgb = cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB)
        else:
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        if (rgb.shape[1], rgb.shape[0]) != (self.intrinsics.width, self.intrinsics.height):
            self.intrinsics = CameraIntrinsics.from_fov(rgb.shape[1], rgb.shape[0], self.hfov_deg)
        self._count += 1
        return Frame(rgb, None, host_ns, host_ns, self._count)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


# --------------------------------------------------------------------------------------------- RealSense


def find_realsense_device(serial: str) -> Any:
    """The connected RealSense device with this serial number ("" = the first one); SourceDisconnected if none."""
    import pyrealsense2 as rs

    devices = list(rs.context().query_devices())
    for dev in devices:
        if not serial or dev.get_info(rs.camera_info.serial_number) == serial:
            return dev
    found = [d.get_info(rs.camera_info.serial_number) for d in devices]
    raise SourceDisconnected(f"RealSense {serial or '(any)'} not connected; connected: {found or 'none'}")


def _domain_name(domain: Any) -> str:
    return str(domain).rsplit(".", 1)[-1]


class RealSenseSource:
    """Colour (rgb8) and optionally depth (z16, aligned to colour) from one RealSense device.

    device_factory: returns the `rs.device` to open (default: `find_realsense_device(serial)`); tests pass
    one returning an `rs.software_device`. No frame for `timeout_s` in `read` -> SourceDisconnected.
    """

    def __init__(self, serial: str = "", width: int = 640, height: int = 480, fps: int = 30,
                 enable_depth: bool = True, device_factory: Callable[[], Any] | None = None,
                 depth_width: int = 0, depth_height: int = 0) -> None:
        self.serial, self.width, self.height, self.fps = serial, width, height, fps
        self.enable_depth = enable_depth
        self.depth_width, self.depth_height = depth_width or width, depth_height or height
        self._factory = device_factory or (lambda: find_realsense_device(serial))
        self.hardware_id = f"realsense:{serial or 'any'}"
        self.intrinsics = CameraIntrinsics(width, height, 1.0, 1.0, 0.0, 0.0)
        self.depth_scale = 0.001
        self._sensors: list[Any] = []
        self._queue: Any = None
        self._align: Any = None
        self._combiner: Any = None
        self._combined: Any = None
        self._pending: list[Any] = []
        self._color: list[Any] = []
        self._depth: list[Any] = []
        self._mapper = TimestampMapper()
        self._lock = threading.Lock()

    @staticmethod
    def _pick(sensor: Any, stream: Any, fmt: Any, width: int, height: int, fps: int) -> Any | None:
        for prof in sensor.get_stream_profiles():
            if prof.stream_type() != stream or prof.format() != fmt or prof.fps() != fps:
                continue
            v = prof.as_video_stream_profile()
            if v.width() == width and v.height() == height:
                return prof
        return None

    def open(self) -> None:
        import pyrealsense2 as rs

        try:
            dev = self._factory()
        except SourceDisconnected:
            raise
        except Exception as exc:  # noqa: BLE001 - any librealsense error here means "not there"
            raise SourceDisconnected(f"RealSense {self.serial}: {exc}") from exc
        try:
            self.serial = self.serial or dev.get_info(rs.camera_info.serial_number)
            self.hardware_id = f"realsense:{self.serial}"
        except RuntimeError:
            pass
        color = depth = None
        color_sensor = depth_sensor = None
        for sensor in dev.query_sensors():
            if color is None:
                color = self._pick(sensor, rs.stream.color, rs.format.rgb8, self.width, self.height, self.fps)
                color_sensor = sensor if color is not None else None
            if self.enable_depth and depth is None:
                depth = self._pick(sensor, rs.stream.depth, rs.format.z16, self.depth_width, self.depth_height,
                                   self.fps)
                depth_sensor = sensor if depth is not None else None
        if color is None or (self.enable_depth and depth is None):
            what = "colour rgb8" if color is None else "depth z16"
            raise ValueError(f"RealSense {self.serial}: no {what} profile {self.width}x{self.height}@{self.fps}")
        self.intrinsics = CameraIntrinsics.from_realsense(color.as_video_stream_profile().get_intrinsics())
        self._queue = rs.frame_queue(16, keep_frames=True)
        self._mapper = TimestampMapper()
        self._color, self._depth, self._pending = [], [], []
        opened: list[Any] = []
        try:
            if depth is not None and depth_sensor is color_sensor:
                color_sensor.open([color, depth])
                opened.append(color_sensor)
            else:
                color_sensor.open(color)
                opened.append(color_sensor)
                if depth is not None:
                    depth_sensor.open(depth)
                    opened.append(depth_sensor)
            if depth_sensor is not None:
                self.depth_scale = float(depth_sensor.as_depth_sensor().get_depth_scale())
            for sensor in opened:
                sensor.start(self._queue)
        except Exception as exc:
            for sensor in opened:
                self._stop_sensor(sensor)
            raise SourceDisconnected(f"RealSense {self.serial}: cannot start streaming: {exc}") from exc
        self._sensors = opened
        if depth is not None:
            self._align = rs.align(rs.stream.color)
            self._combined = rs.frame_queue(4, keep_frames=True)
            self._combiner = rs.processing_block(self._combine)
            self._combiner.start(self._combined)

    def _combine(self, frame: Any, source: Any) -> None:
        """Processing-block callback: the second of two invoked frames closes a (depth, colour) frameset."""
        self._pending.append(frame)
        if len(self._pending) == 2:
            fs = source.allocate_composite_frame(self._pending)
            self._pending = []
            source.frame_ready(fs)

    def _pair(self) -> tuple[Any, Any | None] | None:
        """The newest colour frame that has a depth frame within half a period of it (or the newest colour
        frame without depth); older frames are discarded, so a slow consumer gets fresh frames, not a backlog
        (the skipped frame numbers show up as drops)."""
        if not self._color:
            return None
        if not self.enable_depth:
            c = self._color[-1]
            self._color.clear()
            return c, None
        half_ms = 500.0 / self.fps
        for i in range(len(self._color) - 1, -1, -1):
            c = self._color[i]
            for j in range(len(self._depth) - 1, -1, -1):
                d = self._depth[j]
                if abs(c.get_timestamp() - d.get_timestamp()) <= half_ms:
                    del self._color[: i + 1]
                    del self._depth[: j + 1]
                    return c, d
        return None

    def _take(self, frame: Any) -> None:
        import pyrealsense2 as rs

        kind = frame.get_profile().stream_type()
        buf = self._color if kind == rs.stream.color else self._depth if kind == rs.stream.depth else None
        if buf is not None:
            buf.append(frame)
            del buf[:-8]

    def read(self, timeout_s: float) -> Frame | None:
        if self._queue is None:
            raise SourceDisconnected("source is not open")
        deadline = time.monotonic() + timeout_s
        while True:
            while True:  # everything already delivered, so that pairing sees the newest frames
                f = self._queue.poll_for_frame()
                if not f:
                    break
                self._take(f)
            pair = self._pair()
            if pair is not None:
                break
            remaining = deadline - time.monotonic()
            ok, f = self._queue.try_wait_for_frame(max(int(remaining * 1000), 0)) if remaining > 0 else (False, None)
            if not ok:
                raise SourceDisconnected(f"RealSense {self.serial}: no frame for {timeout_s:.2f} s")
            self._take(f)
        host_ns = time.time_ns()
        cf, df = pair
        depth_img = None
        if df is not None:
            self._combiner.invoke(df)
            self._combiner.invoke(cf)
            ok, fs = self._combined.try_wait_for_frame(1000)
            if not ok:
                raise SourceDisconnected(f"RealSense {self.serial}: alignment produced no frameset")
            aligned = self._align.process(fs.as_frameset())
            cf, adf = aligned.get_color_frame(), aligned.get_depth_frame()
            if cf and adf:
                depth_img = np.asanyarray(adf.get_data()).copy()
        color_img = np.asanyarray(cf.get_data()).copy()
        if color_img.shape != (self.intrinsics.height, self.intrinsics.width, 3):
            raise ValueError(f"RealSense {self.serial}: colour frame of shape {color_img.shape}")
        stamp = self._mapper.to_ros_ns(cf.get_timestamp(), _domain_name(cf.get_frame_timestamp_domain()), host_ns)
        return Frame(color_img, depth_img, stamp, host_ns, int(cf.get_frame_number()), self.depth_scale)

    @staticmethod
    def _stop_sensor(sensor: Any) -> None:
        for step in (sensor.stop, sensor.close):
            try:
                step()
            except RuntimeError:
                pass  # already stopped/closed or the device is gone

    def close(self) -> None:
        for sensor in self._sensors:
            self._stop_sensor(sensor)
        self._sensors = []
        self._queue = self._align = self._combiner = self._combined = None
        self._color, self._depth, self._pending = [], [], []
