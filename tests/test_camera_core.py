"""qvgm.camera without ROS: intrinsics/camera_info, timestamp mapping, frame health, and both sources driven
for real (pyrealsense2 software_device; an OpenCV video file written here)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from qvgm.camera import (
    CameraIntrinsics,
    FrameHealth,
    HealthConfig,
    OpenCVSource,
    RealSenseSource,
    SourceDisconnected,
    TimestampMapper,
    Verdict,
    camera_info_dict,
    optical_frame_id,
)
from qvgm.camera.software import SoftwareRealSense

W, H = 96, 72


def test_camera_info_fields_follow_realsense_ros() -> None:
    intr = CameraIntrinsics(640, 480, 615.0, 616.0, 320.5, 240.5, coeffs=(0.1, -0.2, 0.0, 0.0, 0.05))
    info = camera_info_dict(intr, optical_frame_id("wrist"))
    assert info["frame_id"] == "wrist_color_optical_frame"
    assert info["k"] == [615.0, 0, 320.5, 0, 616.0, 240.5, 0, 0, 1]
    assert info["p"] == [615.0, 0, 320.5, 0, 0, 616.0, 240.5, 0, 0, 0, 1, 0]
    assert info["r"] == [1, 0, 0, 0, 1, 0, 0, 0, 1] and info["distortion_model"] == "plumb_bob"
    assert info["d"] == [0.1, -0.2, 0.0, 0.0, 0.05] and (info["width"], info["height"]) == (640, 480)
    fov = CameraIntrinsics.from_fov(640, 480, 90.0)
    assert math.isclose(fov.fx, 320.0) and fov.ppx == 319.5
    with pytest.raises(ValueError):
        CameraIntrinsics.from_fov(640, 480, 0.0)


def test_timestamp_mapping_per_domain() -> None:
    m = TimestampMapper(rebase_jump_s=1.0)
    assert m.to_ros_ns(1_700_000_000_123.5, "global_time", 0) == 1_700_000_000_123_500_000
    assert m.to_ros_ns(1_700_000_000_000.0, "system_time", 0) == 1_700_000_000_000_000_000
    host = 1_800_000_000_000_000_000
    assert m.to_ros_ns(5000.0, "hardware_clock", host) == host  # first frame anchors the device clock
    assert m.to_ros_ns(5033.3, "hardware_clock", host + 99_000_000) == host + 33_300_000  # device spacing kept
    assert m.to_ros_ns(10.0, "hardware_clock", host + 10**9) == host + 10**9 and m.rebases == 1  # clock reset
    assert m.to_ros_ns(5000.0, "hardware_clock", host + 2 * 10**9) == host + 2 * 10**9 and m.rebases == 2  # jump
    with pytest.raises(ValueError, match="unknown timestamp domain"):
        m.to_ros_ns(1.0, "sensor_clock", 0)


def test_health_frozen_repeated_stale_drops() -> None:
    h = FrameHealth(HealthConfig(frozen_frames=3, stale_s=0.2))
    img = np.zeros((4, 4, 3), np.uint8)
    t = 10**18
    v = [h.check(img + i, i, t + i * 10**7, t + i * 10**7 + 10**6) for i in range(3)]
    assert v == [Verdict.OK] * 3 and h.last_age_s == pytest.approx(1e-3)
    assert h.check(img + 2, 2, t + 3 * 10**7, t + 3 * 10**7) is Verdict.REPEATED  # same frame number
    assert h.check(img + 3, 6, t + 4 * 10**7, t + 4 * 10**7) is Verdict.OK and h.drops == 3  # 3, 4, 5 missing
    assert h.check(img + 4, 7, t, t + 5 * 10**7) is Verdict.STALE  # stamp not after the last one
    assert h.check(img + 5, 8, t + 5 * 10**7, t + 5 * 10**7 + 3 * 10**8) is Verdict.STALE  # 0.3 s old
    same = [h.check(img, 9 + i, t + (6 + i) * 10**7, t + (6 + i) * 10**7) for i in range(4)]
    assert same == [Verdict.OK, Verdict.OK, Verdict.FROZEN, Verdict.FROZEN] and h.frozen
    h.reset_stream()  # a reopened stream that still delivers the same image stays frozen
    assert h.check(img, 0, t + 20 * 10**7, t + 20 * 10**7) is Verdict.FROZEN
    assert h.check(img + 9, 1, t + 21 * 10**7, t + 21 * 10**7) is Verdict.OK and not h.frozen
    assert (h.frames, h.repeated, h.stale, h.frozen_frames) == (13, 1, 2, 3)


def pattern(i: int) -> tuple[np.ndarray, np.ndarray]:
    color = np.zeros((H, W, 3), np.uint8)
    color[..., 0] = i % 256
    color[..., 1] = np.arange(W, dtype=np.uint8)[None, :]
    color[..., 2] = np.arange(H, dtype=np.uint8)[:, None]
    depth = (1000 + 10 * i + np.arange(W, dtype=np.uint16)[None, :] + np.zeros((H, 1), np.uint16)).astype(np.uint16)
    return color, depth


def test_realsense_source_software_device_colour_depth_aligned() -> None:
    sw = SoftwareRealSense("112233", W, H, 30, focal_px=80.0)
    src = RealSenseSource("112233", W, H, 30, enable_depth=True, device_factory=lambda: sw.device)
    src.open()
    try:
        assert src.hardware_id == "realsense:112233"
        assert src.intrinsics == CameraIntrinsics(W, H, 80.0, 80.0, (W - 1) / 2, (H - 1) / 2)
        for i in range(6):
            color, depth = pattern(i)
            ts = sw.push(color, depth, frame_number=i)
            f = src.read(2.0)
            assert f.frame_number == i and f.stamp_ns == int(round(ts * 1e3)) * 1000
            np.testing.assert_array_equal(f.color, color)
            # identity extrinsics and equal intrinsics: alignment reprojects each pixel onto itself
            np.testing.assert_array_equal(f.depth[2:-2, 2:-2], depth[2:-2, 2:-2])
            assert f.depth.dtype == np.uint16 and f.depth_scale == pytest.approx(0.001)
        # device clock domain: stamps are host time at the first frame plus the device's own spacing
        f0 = (sw.push(*pattern(10), frame_number=10, timestamp_ms=500.0, domain="hardware_clock"), src.read(2.0))[1]
        f1 = (sw.push(*pattern(11), frame_number=11, timestamp_ms=533.0, domain="hardware_clock"), src.read(2.0))[1]
        assert f1.stamp_ns - f0.stamp_ns == 33_000_000 and abs(f0.stamp_ns - f0.host_ns) < 10**8
        for k in range(12, 17):  # a consumer that fell behind gets the newest pair, not a backlog
            sw.push(*pattern(k), frame_number=k, timestamp_ms=1e12 + 33.0 * k)
        time.sleep(0.2)
        f = src.read(2.0)
        assert f.frame_number == 16 and int(f.depth[H // 2, W // 2]) == int(pattern(16)[1][H // 2, W // 2])
        color, depth = pattern(20)
        sw.push(color, depth, frame_number=20)
        color[:] = 0  # the caller reuses its buffer at once: the frame must hold its own copy
        np.testing.assert_array_equal(src.read(2.0).color, pattern(20)[0])
        with pytest.raises(SourceDisconnected, match="no frame"):
            src.read(0.2)
    finally:
        src.close()


def test_realsense_source_errors() -> None:
    sw = SoftwareRealSense("1", W, H, 30)
    with pytest.raises(ValueError, match="no colour rgb8 profile 640x480@30"):
        RealSenseSource("1", 640, 480, 30, device_factory=lambda: sw.device).open()

    def gone() -> None:
        raise RuntimeError("No device connected")

    with pytest.raises(SourceDisconnected, match="No device connected"):
        RealSenseSource("2", W, H, 30, device_factory=gone).open()
    with pytest.raises(SourceDisconnected, match="not connected"):
        RealSenseSource("no-such-serial", W, H, 30).open()  # the real lookup: no camera on this machine


def write_video(path: Path, n: int, fps: float = 30.0) -> list[np.ndarray]:
    """MJPG AVI of n frames, each a flat colour (R = 8*i) with a white square; returns the RGB frames."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (W, H))
    assert writer.isOpened()
    frames = []
    for i in range(n):
        rgb = np.zeros((H, W, 3), np.uint8)
        rgb[..., 0] = (8 * i) % 256
        rgb[..., 2] = 200
        rgb[10:30, 10:30] = 255
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        frames.append(rgb)
    writer.release()
    return frames


def test_opencv_source_plays_a_file_at_its_rate_and_reports_its_end(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    frames = write_video(path, 8, fps=40.0)
    src = OpenCVSource(str(path))
    src.open()
    got = []
    with pytest.raises(SourceDisconnected, match="end of stream"):
        while True:
            f = src.read(1.0)
            if f is not None:
                got.append(f)
    src.close()
    assert len(got) == 8 and src.intrinsics.width == W and src.intrinsics.height == H
    for f, ref in zip(got, frames, strict=True):
        assert f.color.shape == (H, W, 3) and f.depth is None
        assert np.abs(f.color.astype(int) - ref).mean() < 6  # MJPG is lossy; RGB order is checked by R vs B
    span = (got[-1].host_ns - got[0].host_ns) * 1e-9
    assert 0.12 < span < 0.6, span  # 7 periods of 25 ms, paced like a live camera
    looping = OpenCVSource(str(path), loop=True)
    looping.open()
    assert sum(looping.read(1.0) is not None for _ in range(12)) >= 10  # past the end without a disconnect
    path.unlink()
    with pytest.raises(SourceDisconnected, match="removed"):
        looping.read(1.0)
    looping.close()
    with pytest.raises(SourceDisconnected, match="does not exist"):
        OpenCVSource(str(path)).open()
    with pytest.raises(SourceDisconnected, match="cannot open"):
        OpenCVSource(str(tmp_path)).open()  # a directory is no video
