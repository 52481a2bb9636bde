"""A RealSense `rs.software_device` with a colour (rgb8) and a depth (z16) sensor that frames are pushed into:
librealsense's own simulated camera, used by tests, benchmarks and simulation to drive `RealSenseSource`."""

from __future__ import annotations

import time
from typing import Any

import numpy as np


class SoftwareRealSense:
    """Software device `serial`: colour and depth of the same size, identity extrinsics, pinhole intrinsics
    (fx = fy = `focal_px`, principal point at the centre), depth units `depth_scale` metres."""

    def __init__(self, serial: str = "000000000001", width: int = 640, height: int = 480, fps: int = 30,
                 focal_px: float = 600.0, depth_scale: float = 0.001) -> None:
        import pyrealsense2 as rs

        self.width, self.height, self.fps, self.depth_scale = width, height, fps, depth_scale
        self.device = rs.software_device()
        self.device.register_info(rs.camera_info.serial_number, serial)
        self.device.register_info(rs.camera_info.name, "Intel RealSense software device")
        intr = rs.intrinsics()
        intr.width, intr.height, intr.fx, intr.fy = width, height, focal_px, focal_px
        intr.ppx, intr.ppy = (width - 1) / 2.0, (height - 1) / 2.0
        intr.model, intr.coeffs = rs.distortion.brown_conrady, [0.0] * 5
        self.color_sensor = self.device.add_sensor("RGB Camera")
        self.depth_sensor = self.device.add_sensor("Stereo Module")

        def stream(kind: Any, uid: int, bpp: int, fmt: Any) -> Any:
            s = rs.video_stream()
            s.type, s.index, s.uid, s.width, s.height, s.fps = kind, 0, uid, width, height, fps
            s.bpp, s.fmt, s.intrinsics = bpp, fmt, intr
            return s

        self.color_profile = self.color_sensor.add_video_stream(stream(rs.stream.color, 0, 3, rs.format.rgb8))
        self.depth_profile = self.depth_sensor.add_video_stream(stream(rs.stream.depth, 1, 2, rs.format.z16))
        self.depth_sensor.add_read_only_option(rs.option.depth_units, depth_scale)
        ex = rs.extrinsics()
        ex.rotation, ex.translation = [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0], [0.0, 0.0, 0.0]
        self.depth_profile.register_extrinsics_to(self.color_profile, ex)

    def push(self, color: np.ndarray, depth: np.ndarray | None = None, frame_number: int = 0,
             timestamp_ms: float | None = None, domain: str = "global_time") -> float:
        """Deliver one colour (uint8 HxWx3 RGB) and optional depth (uint16 HxW) frame; returns the stamp used
        (ms; default: host wall time now, i.e. the `global_time` domain)."""
        import pyrealsense2 as rs

        if color.shape != (self.height, self.width, 3) or color.dtype != np.uint8:
            raise ValueError(f"colour must be uint8 {(self.height, self.width, 3)}, got {color.dtype} {color.shape}")
        ts = time.time() * 1e3 if timestamp_ms is None else timestamp_ms
        dom = getattr(rs.timestamp_domain, domain)
        frames = [(self.depth_sensor, self.depth_profile, depth, 2)] if depth is not None else []
        frames.append((self.color_sensor, self.color_profile, color, 3))
        for sensor, profile, pixels, bpp in frames:
            pixels = np.ascontiguousarray(pixels)  # pyrealsense2 copies it: the caller may reuse the array
            f = rs.software_video_frame()
            f.pixels, f.bpp, f.stride = pixels, bpp, self.width * bpp
            f.timestamp, f.domain, f.frame_number = ts, dom, frame_number
            f.profile = profile.as_video_stream_profile()
            if bpp == 2:
                f.depth_units = self.depth_scale
            sensor.on_video_frame(f)
        return ts


class SoftwareFeeder:
    """Pushes synthetic frames into a SoftwareRealSense at `fps` from a thread, like a camera's USB stream.

    Frame k: colour = a gradient with red = k mod 256 (plus a noise band so no two frames hash alike),
    depth = 1000 + k mod 1000 + column. `paused` stops delivery (unplugged); `frozen` repeats one image while
    frame numbers advance (a stuck sensor). `pushed` maps each stamp (ns, global time) to its host push time.
    """

    def __init__(self, sw: SoftwareRealSense, fps: float | None = None, depth: bool = True) -> None:
        import threading

        self.sw, self.period, self.depth = sw, 1.0 / (fps or sw.fps), depth
        self.paused = self.frozen = False
        self.count = 0
        self.pushed: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="software-feeder")
        rng = np.random.default_rng(0)
        self._base = rng.integers(0, 256, (sw.height, sw.width, 3), dtype=np.uint8)
        self._depth = (1000 + np.arange(sw.width, dtype=np.uint16)[None, :] + np.zeros((sw.height, 1), np.uint16))

    def __enter__(self) -> SoftwareFeeder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        next_t = time.monotonic()
        while not self._stop.is_set():
            next_t += self.period
            delay = next_t - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_t = time.monotonic()
            if self.paused or self._stop.is_set():
                continue
            self.count += 1
            k = 0 if self.frozen else self.count
            color = self._base.copy()
            color[0, :, 0] = k % 256
            color[1, :8] = np.frombuffer(int(k).to_bytes(24, "little"), np.uint8).reshape(8, 3)
            ts = self.sw.push(color, (self._depth + k % 1000) if self.depth else None, frame_number=self.count)
            self.pushed[int(round(ts * 1e3)) * 1000] = time.time()
