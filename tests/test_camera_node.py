"""camera_node over real DDS: a software RealSense device and an OpenCV video file feed the node, a subscriber
node checks content, encodings, stamps, camera_info and /diagnostics; disconnects, frozen and bad frames."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from helpers import wait_for
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image

from qvgm.camera import RealSenseSource, SourceDisconnected
from qvgm.camera.software import SoftwareRealSense
from qvgm_policy_node.camera_node import CameraNode

pytestmark = pytest.mark.ros
W, H, FPS = 96, 72, 30
OK, ERROR = (int.from_bytes(c, "little") for c in (DiagnosticStatus.OK, DiagnosticStatus.ERROR))


class Probe(Node):
    """Subscribes to everything one camera publishes; keeps the messages with their reception time."""

    def __init__(self, name: str, context: Any) -> None:
        super().__init__(f"probe_{name}", context=context)
        self.lock = threading.Lock()
        self.msgs: dict[str, list[tuple[float, Any]]] = defaultdict(list)
        base = f"/camera/{name}"
        for key, typ, topic in [("color", Image, "color/image_raw"), ("info", CameraInfo, "color/camera_info"),
                                ("depth", Image, "aligned_depth_to_color/image_raw"),
                                ("depth_info", CameraInfo, "aligned_depth_to_color/camera_info")]:
            self.create_subscription(typ, f"{base}/{topic}", self._keep(key), qos_profile_sensor_data)
        self.create_subscription(DiagnosticArray, "/diagnostics", self._diag(name), 10)

    def _keep(self, key: str) -> Callable[[Any], None]:
        def cb(msg: Any) -> None:
            with self.lock:
                self.msgs[key].append((time.time(), msg))
        return cb

    def _diag(self, name: str) -> Callable[[DiagnosticArray], None]:
        def cb(msg: DiagnosticArray) -> None:
            for st in msg.status:
                if st.name == f"camera_node: {name}":
                    with self.lock:
                        self.msgs["diag"].append((time.time(), st))
        return cb

    def get(self, key: str) -> list[Any]:
        with self.lock:
            return [m for _, m in self.msgs[key]]

    def count(self, key: str) -> int:
        with self.lock:
            return len(self.msgs[key])

    def last_diag(self) -> dict[str, str] | None:
        d = self.get("diag")
        if not d:
            return None
        return {"level": int.from_bytes(d[-1].level, "little") if isinstance(d[-1].level, bytes) else d[-1].level,
                "message": d[-1].message, **{kv.key: kv.value for kv in d[-1].values}}


@pytest.fixture
def ros() -> Iterator[tuple[Any, SingleThreadedExecutor]]:
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    # as camera_node's main: rclpy's MultiThreadedExecutor busy-waits holding the GIL and starved the feeder and
    # capture threads to 2-5 fps in about half the runs (both CI failures of 2026-11-27)
    executor = SingleThreadedExecutor(context=ctx)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    yield ctx, executor
    nodes = list(executor.get_nodes())
    executor.shutdown()
    thread.join(timeout=5)
    for node in nodes:
        node.destroy_node()
    rclpy.shutdown(context=ctx)


def pattern(i: int) -> tuple[np.ndarray, np.ndarray]:
    color = np.zeros((H, W, 3), np.uint8)
    color[..., 0] = i % 256
    color[..., 1] = np.arange(W, dtype=np.uint8)[None, :]
    color[..., 2] = 255 - np.arange(H, dtype=np.uint8)[:, None]
    depth = np.broadcast_to(1000 + 7 * i + np.arange(W, dtype=np.uint16)[None, :], (H, W)).astype(np.uint16)
    return color, depth


class Feeder:
    """Pushes frames into a software device at `fps` from a thread, like a camera's USB stream.
    `device` can be swapped (re-plug); `paused` stops delivery (unplugged); `frozen` repeats one image."""

    def __init__(self, sw: SoftwareRealSense, fps: float = FPS) -> None:
        self.sw, self.period = sw, 1.0 / fps
        self.paused = self.frozen = False
        self.i = 0
        self.stamps: dict[int, int] = {}  # stamp_ns -> pattern index
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Feeder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            if self.paused:
                continue
            self.i += 1
            k = 0 if self.frozen else self.i
            ts = self.sw.push(*pattern(k), frame_number=self.i)
            self.stamps[int(round(ts * 1e3)) * 1000] = k


def add_realsense_camera(executor: SingleThreadedExecutor, ctx: Any, name: str, get_device: Callable[[], Any],
                         **params: Any) -> tuple[CameraNode, Probe]:
    probe = Probe(name, ctx)
    executor.add_node(probe)
    node = CameraNode(name, context=ctx, parameter_overrides={
        "width": W, "height": H, "fps": FPS, "read_timeout_s": 0.5, "reconnect_period_s": 0.1,
        "diagnostics_period_s": 0.2, **params},
        source_factory=lambda: RealSenseSource("", W, H, FPS, True, device_factory=get_device))
    executor.add_node(node)
    return node, probe


def test_realsense_software_device_through_node(ros: tuple[Any, SingleThreadedExecutor]) -> None:
    ctx, executor = ros
    sw = SoftwareRealSense("843112070001", W, H, FPS, focal_px=90.0)
    # read timeout 2 s: this test checks the data path; a feeder thread starved for 0.5 s on a loaded 2-core CI
    # machine made the node reconnect (seen once in CI). Reconnects are tested with their own timeouts below.
    node, probe = add_realsense_camera(executor, ctx, "front", lambda: sw.device, read_timeout_s=2.0)
    with Feeder(sw) as feeder:
        wait_for(lambda: probe.count("color") >= 20 and probe.count("depth") >= 20, 20, "20 colour+depth images")
        wait_for(lambda: (probe.last_diag() or {}).get("state") == "streaming"
                 and (probe.last_diag() or {}).get("level") != ERROR, 10, "diagnostics: streaming, not ERROR")
        # read while frames still flow: once the feeder stops, diagnostics turn ERROR ("no frames") after
        # read_timeout_s, and the checks below can take that long on a loaded CI machine
        diag = probe.last_diag()
        hardware_id = probe.get("diag")[-1].hardware_id
    colors, depths = probe.get("color"), probe.get("depth")
    for msg in colors[:20]:
        assert (msg.encoding, msg.height, msg.width, msg.step) == ("rgb8", H, W, 3 * W)
        assert msg.header.frame_id == "front_color_optical_frame"
        ns = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
        k = feeder.stamps[ns]  # header.stamp is the device's (global-time) capture stamp, exactly
        img = np.frombuffer(bytes(msg.data), np.uint8).reshape(H, W, 3)
        np.testing.assert_array_equal(img, pattern(k)[0])
    by_stamp = {(m.header.stamp.sec, m.header.stamp.nanosec): m for m in depths}
    for msg in colors[:20]:
        d = by_stamp.get((msg.header.stamp.sec, msg.header.stamp.nanosec))
        if d is None:
            continue  # depth of that frame not yet received (best-effort QoS)
        assert (d.encoding, d.step, d.is_bigendian) == ("16UC1", 2 * W, 0) and d.header.frame_id == msg.header.frame_id
        k = feeder.stamps[msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec]
        depth = np.frombuffer(bytes(d.data), "<u2").reshape(H, W)
        # the frame's own depth reprojected into the colour camera: +-1 px rounding, a few holes (0 = no depth)
        valid = depth > 0
        diff = depth[valid].astype(int) - pattern(k)[1][valid]
        assert valid.mean() > 0.9 and np.abs(diff).max() <= 1 and np.median(diff) == 0
    info = probe.get("info")[-1]
    assert (info.width, info.height, info.distortion_model) == (W, H, "plumb_bob")
    assert list(info.k) == [90.0, 0, (W - 1) / 2, 0, 90.0, (H - 1) / 2, 0, 0, 1]
    assert info.header.frame_id == "front_color_optical_frame" and probe.count("depth_info") > 0
    assert diag["level"] != ERROR and diag["state"] == "streaming"  # WARN = below 80% of fps (a loaded machine)
    # frames are flowing (rates are benchmarked in bench/camera_node.py; a loaded CI machine measured 3.5 fps here)
    assert float(diag["fps"]) > 0 and float(diag["age_ms"]) < 500 and diag["reconnects"] == "0"
    assert hardware_id == "realsense:843112070001"


def test_realsense_unplug_replug_and_frozen_stream(ros: tuple[Any, SingleThreadedExecutor]) -> None:
    ctx, executor = ros
    plugged = {"dev": SoftwareRealSense("843112070002", W, H, FPS)}

    def get_device() -> Any:
        if plugged["dev"] is None:
            raise RuntimeError("No device connected")  # what librealsense says once the camera is gone
        return plugged["dev"].device

    node, probe = add_realsense_camera(executor, ctx, "wrist", get_device, frozen_frames=5, frozen_reconnect_s=0.5)
    first = plugged["dev"]
    with Feeder(first) as feeder:
        wait_for(lambda: probe.count("color") >= 5, 20, "first images")
        feeder.paused = True  # unplugged: no more frames, and the device cannot be opened
        plugged["dev"] = None
        wait_for(lambda: (probe.last_diag() or {}).get("state") == "disconnected", 10, "disconnect reported")
        assert probe.last_diag()["level"] == ERROR
    n_before = probe.count("color")
    second = SoftwareRealSense("843112070002", W, H, FPS)  # plugged back in: a new device object
    plugged["dev"] = second
    with Feeder(second) as feeder:
        wait_for(lambda: probe.count("color") >= n_before + 10, 20, "images after the reconnect")
        wait_for(lambda: (probe.last_diag() or {}).get("state") == "streaming", 10, "streaming again")
        assert int(probe.last_diag()["reconnects"]) >= 1
        reconnects = node.reconnects
        feeder.frozen = True  # the image stops changing (frame numbers still advance)
        wait_for(lambda: (probe.last_diag() or {}).get("state") == "frozen", 10, "frozen reported")
        assert probe.last_diag()["level"] == ERROR
        # frozen for longer than frozen_reconnect_s: reopened, still frozen, nothing published. Waited for, not
        # slept for: a loaded 2-core CI machine delivered only 6 frozen frames in 1 s once
        wait_for(lambda: node.reconnects > reconnects and int((probe.last_diag() or {}).get("frozen_frames", 0)) > 10
                 and (probe.last_diag() or {}).get("state") == "frozen", 20, "reopened and still frozen")
        frozen_img = pattern(0)[0].tobytes()
        published_frozen = [m for m in probe.get("color") if bytes(m.data) == frozen_img]
        assert len(published_frozen) <= 4  # at most frozen_frames - 1 identical images went out
        n_frozen = probe.count("color")
        feeder.frozen = False
        wait_for(lambda: probe.count("color") >= n_frozen + 5, 10, "images after the freeze")
    assert node.errors == 0


class FlakySource(RealSenseSource):
    """A real software-device source whose every 4th read fails like a corrupt USB transfer, and every 7th
    frame comes back with a wrong-sized colour image."""

    n = 0

    def read(self, timeout_s: float) -> Any:
        frame = super().read(timeout_s)
        FlakySource.n += 1
        if FlakySource.n % 4 == 0:
            raise RuntimeError("Frame didn't arrive within 5000")
        if FlakySource.n % 7 == 0:
            frame.color = frame.color[:-1]
        return frame


def test_bad_frames_never_stop_the_node(ros: tuple[Any, SingleThreadedExecutor]) -> None:
    ctx, executor = ros
    sw = SoftwareRealSense("843112070003", W, H, FPS)
    probe = Probe("flaky", ctx)
    executor.add_node(probe)
    # generous stall limits: this test is about bad frames (never a reason to reopen), not about a feeder thread
    # starved on a loaded machine (a read timeout or a frozen stream, which do reopen: tested above)
    node = CameraNode("flaky", context=ctx, parameter_overrides={"width": W, "height": H, "diagnostics_period_s": 0.2,
                                                                 "read_timeout_s": 10.0, "frozen_reconnect_s": 60.0},
                      source_factory=lambda: FlakySource("", W, H, FPS, True, device_factory=lambda: sw.device))
    executor.add_node(node)
    with Feeder(sw):
        wait_for(lambda: probe.count("color") >= 20, 20, "images despite bad frames")
    assert node.errors >= 5 and node.reconnects == 0
    assert all((m.height, m.width) == (H, W) for m in probe.get("color"))
    wait_for(lambda: int((probe.last_diag() or {}).get("errors", "0")) >= 5, 5, "errors on /diagnostics")


def write_video(path: Path, n: int, fps: float) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (W, H))
    for i in range(n):
        rgb = np.zeros((H, W, 3), np.uint8)
        rgb[..., 0] = 40 + 4 * i
        rgb[..., 2] = 220
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()


def test_opencv_video_file_through_node_and_file_removed(ros: tuple[Any, SingleThreadedExecutor],
                                                         tmp_path: Path) -> None:
    ctx, executor = ros
    path = tmp_path / "usb_cam.avi"
    write_video(path, 45, FPS)
    probe = Probe("usb", ctx)
    executor.add_node(probe)
    node = CameraNode("usb", context=ctx, parameter_overrides={
        "backend": "opencv", "device": str(path), "loop_file": True, "hfov_deg": 90.0, "read_timeout_s": 0.5,
        "reconnect_period_s": 0.1, "diagnostics_period_s": 0.2})
    executor.add_node(node)
    assert probe.count("depth") == 0
    wait_for(lambda: probe.count("color") >= 15, 20, "images from the video file")
    t0 = time.time()
    for msg in probe.get("color")[:15]:
        assert (msg.encoding, msg.width, msg.height, msg.header.frame_id) == ("rgb8", W, H, "usb_color_optical_frame")
        img = np.frombuffer(bytes(msg.data), np.uint8).reshape(H, W, 3).astype(int)
        assert abs(img[..., 2].mean() - 220) < 6 and img[..., 0].mean() < 40 + 4 * 45 + 6  # RGB, not BGR
        assert abs(msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9 - t0) < 30
    info = probe.get("info")[-1]
    assert list(info.k)[:3] == pytest.approx([W / 2, 0, (W - 1) / 2])  # 90 degree field of view
    path.unlink()  # the stream goes away
    wait_for(lambda: (probe.last_diag() or {}).get("state") == "disconnected", 10, "file removal reported")
    assert "removed" in probe.last_diag()["last_error"] or "does not exist" in probe.last_diag()["last_error"]
    n = probe.count("color")
    write_video(path, 45, FPS)  # and comes back
    wait_for(lambda: probe.count("color") >= n + 10, 20, "images after the file is back")
    assert node.reconnects >= 1


def test_unknown_backend_is_reported_not_raised(ros: tuple[Any, SingleThreadedExecutor]) -> None:
    ctx, executor = ros
    probe = Probe("odd", ctx)
    executor.add_node(probe)
    executor.add_node(CameraNode("odd", context=ctx, parameter_overrides={"backend": "gige",
                                                                           "diagnostics_period_s": 0.2}))
    wait_for(lambda: probe.last_diag() is not None, 10, "diagnostics")
    d = probe.last_diag()
    assert d["level"] == ERROR and "unknown camera backend 'gige'" in d["last_error"]
    assert probe.count("color") == 0
    with pytest.raises(SourceDisconnected):
        RealSenseSource("", W, H, FPS, device_factory=lambda: (_ for _ in ()).throw(SourceDisconnected("x"))).open()


def test_node_process_with_ros_args(ros: tuple[Any, SingleThreadedExecutor], tmp_path: Path) -> None:
    """`python -m qvgm_policy_node.camera_node --ros-args -p ...` as its own process, OpenCV backend."""
    import os
    import subprocess
    import sys

    ctx, executor = ros
    path = tmp_path / "cam.avi"
    write_video(path, 30, FPS)
    probe = Probe("side", ctx)
    executor.add_node(probe)
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "qvgm_policy_node.camera_node", "--ros-args",
                             "-p", "camera_name:=side", "-p", "backend:=opencv", "-p", f"device:={path}",
                             "-p", "loop_file:=true", "-p", "diagnostics_period_s:=0.2"],
                            cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: probe.count("color") >= 10 and probe.last_diag() is not None, 30, "images from the process")
        assert probe.get("color")[0].header.frame_id == "side_color_optical_frame"
        assert probe.get("diag")[-1].hardware_id == f"opencv:{path}"
    finally:
        proc.terminate()
        out = proc.communicate(timeout=10)[0]
    assert "Traceback" not in out, out


def test_several_cameras_at_once(ros: tuple[Any, SingleThreadedExecutor]) -> None:
    """Two software devices, two nodes in one process: each topic carries its own device's frames."""
    ctx, executor = ros
    devs = {"left": SoftwareRealSense("843112070010", W, H, FPS), "right": SoftwareRealSense("843112070011", W, H, FPS)}
    probes = {}
    for name, sw in devs.items():
        _, probes[name] = add_realsense_camera(executor, ctx, name, (lambda sw=sw: sw.device))
    with Feeder(devs["left"]) as fl, Feeder(devs["right"]) as fr:
        wait_for(lambda: all(p.count("color") >= 10 for p in probes.values()), 20, "images from both cameras")
    for name, feeder in (("left", fl), ("right", fr)):
        msgs = probes[name].get("color")
        assert {m.header.frame_id for m in msgs} == {f"{name}_color_optical_frame"}
        assert all(m.header.stamp.sec * 10**9 + m.header.stamp.nanosec in feeder.stamps for m in msgs)
        assert probes[name].get("diag")[-1].hardware_id == f"realsense:{devs[name].device.get_info(rs_serial())}"


def rs_serial() -> Any:
    import pyrealsense2 as rs

    return rs.camera_info.serial_number


def test_make_camera_nodes_validates_the_list() -> None:
    from qvgm_policy_node.camera_node import make_camera_nodes

    with pytest.raises(ValueError, match="distinct non-empty camera_name"):
        make_camera_nodes([{"camera_name": "a"}, {"camera_name": "a"}])
    with pytest.raises(ValueError, match=r"unknown camera parameters \['serial'\]"):
        make_camera_nodes([{"camera_name": "a", "serial": "123"}])


def test_qos_names() -> None:
    from rclpy.qos import ReliabilityPolicy

    from qvgm_policy_node.camera_node import qos_by_name

    assert qos_by_name("SENSOR_DATA").reliability == ReliabilityPolicy.BEST_EFFORT
    assert qos_by_name("default").reliability == ReliabilityPolicy.RELIABLE
    with pytest.raises(ValueError, match="unknown QoS 'FAST'"):
        qos_by_name("FAST")


def test_stale_stamps_are_not_published(ros: tuple[Any, SingleThreadedExecutor]) -> None:
    """Frames stamped 2 s in the past (a device clock gone wrong) are held back and counted as stale."""
    ctx, executor = ros
    sw = SoftwareRealSense("843112070020", W, H, FPS)
    node, probe = add_realsense_camera(executor, ctx, "late", lambda: sw.device)
    for i in range(1, 40):
        sw.push(*pattern(i), frame_number=i, timestamp_ms=time.time() * 1e3 - 2000.0)
        time.sleep(1 / FPS)
    wait_for(lambda: int((probe.last_diag() or {}).get("stale", "0")) >= 30, 10, "stale frames on /diagnostics")
    assert probe.count("color") == 0 and node.health.published == 0
    assert probe.last_diag()["level"] == ERROR and float(probe.last_diag()["age_ms"]) > 1900
    sw.push(*pattern(50), frame_number=50)  # fresh again
    wait_for(lambda: probe.count("color") == 1, 10, "the fresh frame")
