"""camera_node benchmark: prints JSON.

Cameras are librealsense software devices (`rs.software_device`, colour rgb8 + depth z16 aligned to colour)
fed at --fps by one thread each; each has its own CameraNode (all in this process, one executor). A separate
subscriber process receives /camera/cam<i>/color/image_raw over DDS (loopback) and measures:
  latency_ms     host time at reception - header.stamp, where header.stamp is the capture stamp the frame was
                 pushed with (global_time domain = host wall clock): capture -> pairing -> align -> publish ->
                 DDS -> subscriber callback; p50 / p95 / p99 / max
  received_fps   colour images per second per camera at the subscriber (steady state, after --warmup)
  pushed_fps / not_received (pushed in window - received) / node counters
  cpu_cores_used  CPU seconds per wall second of the node process (nodes + feeders) and of the subscriber
for 2 and 3 cameras (--cams), then, with one camera:
  frozen: the image stops changing (frame numbers go on) -> node flags it (detect_s) -> /diagnostics says
          "frozen" (diag_s); defaults: frozen_frames=10, diagnostics 1 Hz
  disconnect: the device vanishes -> node reports "disconnected" (detect_s, read_timeout_s=1.0); it is
          plugged back (a new device) -> first new image at a subscriber (recover_s, reconnect_period_s=0.5)
Each throughput run is repeated per --transports entry, each in its own process: `default` (the RMW's
default transports: Fast DDS UDP loopback + its default shared memory) and `shm16` (Fast DDS shared memory
only, 16 MB segments; see FASTDDS_SHM_XML). Frozen/disconnect timings use the default transport.
Usage: .venv/bin/python bench/camera_node.py [--seconds 6] [--cams 2 3] [--width 640 --height 480 --fps 30]
       [--transports default shm16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qvgm_policy_node.ros_env import apply_loopback_env  # noqa: E402

apply_loopback_env(keep_existing_domain=True)

# Fast DDS profile for the "shm16" transport: shared memory only (nothing can leave the host), 16 MB segments
# so a 640x480 rgb8 image (921,600 B) + its depth fit without fragmenting through a small default segment.
FASTDDS_SHM_XML = (Path(__file__).resolve().parents[1] / "config" / "fastdds_shm.xml").read_text()

import numpy as np  # noqa: E402
import rclpy  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from qvgm.camera import RealSenseSource  # noqa: E402
from qvgm.camera.software import SoftwareFeeder, SoftwareRealSense  # noqa: E402
from qvgm_policy_node.camera_node import CameraNode  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    return round(float(np.percentile(xs, q)), 2) if xs else float("nan")


# ------------------------------------------------------------------------------------ subscriber process
def probe_main(names: list[str], warmup: float, seconds: float) -> None:
    rclpy.init()
    node = Node("camera_bench_probe")
    rec: dict[str, list[tuple[float, float]]] = {n: [] for n in names}

    def cb(name: str):
        def f(msg: Image) -> None:
            rec[name].append((time.time(), msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9))
        return f

    for n in names:
        node.create_subscription(Image, f"/camera/{n}/color/image_raw", cb(n), qos_profile_sensor_data)
    print("ready", flush=True)
    t_start = time.time() + warmup
    t_end = t_start + seconds
    while time.time() < t_end:
        rclpy.spin_once(node, timeout_sec=0.05)
    out = {}
    for n, xs in rec.items():
        window = [(r, s) for r, s in xs if t_start <= r < t_end]
        lat = [(r - s) * 1e3 for r, s in window]
        out[n] = {"received_fps": round(len(window) / seconds, 2), "received": len(window),
                  "latency_ms": {"p50": pct(lat, 50), "p95": pct(lat, 95), "p99": pct(lat, 99),
                                 "max": round(max(lat), 2) if lat else float("nan")},
                  "window": [t_start, t_end]}
    cpu = os.times()
    out["probe_cpu_s"] = round(cpu.user + cpu.system, 2)
    print(json.dumps(out), flush=True)
    node.destroy_node()
    rclpy.shutdown()


# ----------------------------------------------------------------------------------------- helpers
class Graph:
    """rclpy context + executor thread holding camera nodes and an in-process listener."""

    def __init__(self) -> None:
        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx)
        self.executor = SingleThreadedExecutor(context=self.ctx)  # as camera_node's main (see there)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def camera(self, name: str, get_device: Any, args: argparse.Namespace, **params: Any) -> CameraNode:
        node = CameraNode(name, context=self.ctx, parameter_overrides={
            "width": args.width, "height": args.height, "fps": args.fps, "enable_depth": not args.no_depth,
            **params}, source_factory=lambda: RealSenseSource("", args.width, args.height, args.fps,
                                                                not args.no_depth, device_factory=get_device))
        self.executor.add_node(node)
        return node

    def close(self) -> None:
        nodes = list(self.executor.get_nodes())
        self.executor.shutdown()
        self.thread.join(timeout=5)
        for node in nodes:
            node.destroy_node()
        rclpy.shutdown(context=self.ctx)


class Listener(Node):
    def __init__(self, ctx: Any, name: str) -> None:
        super().__init__("camera_bench_listener", context=ctx)
        self.images: list[tuple[float, float]] = []
        self.diag: list[tuple[float, str]] = []
        self.create_subscription(Image, f"/camera/{name}/color/image_raw",
                                 lambda m: self.images.append((time.time(), m.header.stamp.sec
                                                               + m.header.stamp.nanosec * 1e-9)),
                                 qos_profile_sensor_data)

        def on_diag(msg: DiagnosticArray) -> None:
            for st in msg.status:
                if st.name == f"camera_node: {name}":
                    self.diag.append((time.time(), {kv.key: kv.value for kv in st.values}["state"]))
        self.create_subscription(DiagnosticArray, "/diagnostics", on_diag, 10)


def wait_until(pred: Any, timeout: float) -> float | None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return time.time()
        time.sleep(0.002)
    return None


# --------------------------------------------------------------------------------------- measurements
def throughput(n: int, args: argparse.Namespace) -> dict[str, Any]:
    names = [f"cam{i}" for i in range(n)]
    env = dict(os.environ)
    probe = subprocess.Popen([sys.executable, __file__, "--probe", ",".join(names), "--warmup", str(args.warmup),
                              "--seconds", str(args.seconds)], stdout=subprocess.PIPE, text=True, env=env)
    assert probe.stdout is not None and probe.stdout.readline().strip() == "ready"
    graph = Graph()
    devices = [SoftwareRealSense(f"9000000000{i:02d}", args.width, args.height, args.fps) for i in range(n)]
    nodes = [graph.camera(name, (lambda d=d: d.device), args) for name, d in zip(names, devices, strict=True)]
    c0, w0 = os.times(), time.time()
    feeders = [SoftwareFeeder(d, depth=not args.no_depth).__enter__() for d in devices]
    out_line = probe.stdout.readline()
    c1, w1 = os.times(), time.time()
    probe.wait(timeout=30)
    for f in feeders:
        f.__exit__()
    result = json.loads(out_line)
    probe_cpu_s = result.pop("probe_cpu_s")
    cams = {}
    for name, node, feeder in zip(names, nodes, feeders, strict=True):
        r = result[name]
        t0, t1 = r.pop("window")
        pushed = sum(1 for t in list(feeder.pushed.values()) if t0 <= t < t1)
        h = node.health
        cams[name] = {**r, "pushed_fps": round(pushed / args.seconds, 2),
                      "not_received": max(pushed - r["received"], 0),
                      "node": {"published": h.published, "frames": h.frames, "drops": h.drops, "stale": h.stale,
                               "frozen_frames": h.frozen_frames, "errors": node.errors}}
    graph.close()
    lat = [c["latency_ms"]["p50"] for c in cams.values()]
    return {"cameras": n, "per_camera": cams,
            "total_received_fps": round(sum(c["received_fps"] for c in cams.values()), 2),
            "median_of_p50_latency_ms": round(float(np.median(lat)), 2),
            "cpu_cores_used": {"nodes_and_feeders": round((c1.user + c1.system - c0.user - c0.system) / (w1 - w0), 2),
                               "subscriber": round(probe_cpu_s / (w1 - w0), 2)}}


def frozen_and_disconnect(args: argparse.Namespace) -> dict[str, Any]:
    graph = Graph()
    plugged: dict[str, Any] = {"dev": SoftwareRealSense("900000000099", args.width, args.height, args.fps)}

    def get_device() -> Any:
        if plugged["dev"] is None:
            raise RuntimeError("No device connected")
        return plugged["dev"].device

    node = graph.camera("fz", get_device, args)
    listener = Listener(graph.ctx, "fz")
    graph.executor.add_node(listener)
    out: dict[str, Any] = {}
    with SoftwareFeeder(plugged["dev"], depth=not args.no_depth) as feeder:
        wait_until(lambda: len(listener.images) > 30, 20)
        t0 = time.time()
        feeder.frozen = True
        t_detect = wait_until(lambda: node.health.frozen, 10)
        t_diag = wait_until(lambda: any(t > t0 and s == "frozen" for t, s in listener.diag), 10)
        out["frozen"] = {"detect_s": round(t_detect - t0, 3) if t_detect else None,
                         "diag_s": round(t_diag - t0, 3) if t_diag else None,
                         "frozen_frames_param": node.params["frozen_frames"], "fps": args.fps}
        feeder.frozen = False
        wait_until(lambda: node.state == "streaming", 10)
        time.sleep(0.5)
        t0 = time.time()
        feeder.paused = True
        plugged["dev"] = None
        t_detect = wait_until(lambda: node.state == "disconnected", 10)
        t_diag = wait_until(lambda: any(t > t0 and s == "disconnected" for t, s in listener.diag), 10)
    time.sleep(1.0)  # unplugged for a while: the node keeps retrying
    new = SoftwareRealSense("900000000099", args.width, args.height, args.fps)
    with SoftwareFeeder(new, depth=not args.no_depth):
        t1 = time.time()
        plugged["dev"] = new
        t_back = wait_until(lambda: any(s > t1 for _, s in listener.images[-5:]), 20)
    out["disconnect"] = {"detect_s": round(t_detect - t0, 3) if t_detect else None,
                         "diag_s": round(t_diag - t0, 3) if t_diag else None,
                         "recover_s": round(t_back - t1, 3) if t_back else None,
                         "read_timeout_s": node.params["read_timeout_s"],
                         "reconnect_period_s": node.params["reconnect_period_s"], "reconnects": node.reconnects}
    graph.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--cams", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--no-depth", action="store_true", help="colour only (default: colour + aligned depth)")
    ap.add_argument("--transports", nargs="+", default=["default", "shm16"], choices=["default", "shm16"])
    ap.add_argument("--probe", default="", help=argparse.SUPPRESS)
    ap.add_argument("--one-transport", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        probe_main(args.probe.split(","), args.warmup, args.seconds)
        return
    if args.one_transport:
        out = {"throughput": [throughput(n, args) for n in args.cams]}
        if args.one_transport == "default":
            out.update(frozen_and_disconnect(args))
        print(json.dumps(out), flush=True)
        return
    report: dict[str, Any] = {
        "bench": "camera_node", "host": {"cpus": os.cpu_count(), "machine": platform.machine(),
                                         "python": platform.python_version(),
                                         "load_avg_1m": round(os.getloadavg()[0], 2)},
        "config": {"width": args.width, "height": args.height, "fps": args.fps, "depth": not args.no_depth,
                   "seconds": args.seconds, "warmup": args.warmup, "rmw": os.environ.get("RMW_IMPLEMENTATION",
                                                                                         "default")},
        "throughput": {},
    }
    passthrough = [a for a in sys.argv[1:] if a != "--transports" and a not in ("default", "shm16")]
    with tempfile.TemporaryDirectory() as tmp:
        for transport in args.transports:
            env = dict(os.environ)
            if transport == "shm16":
                xml = Path(tmp) / "fastdds_shm16.xml"
                xml.write_text(FASTDDS_SHM_XML)
                env["FASTDDS_DEFAULT_PROFILES_FILE"] = env["FASTRTPS_DEFAULT_PROFILES_FILE"] = str(xml)
            res = subprocess.run([sys.executable, __file__, "--one-transport", transport, *passthrough], env=env,
                                 stdout=subprocess.PIPE, text=True, timeout=600, check=True)
            part = json.loads(res.stdout.strip().splitlines()[-1])
            report["throughput"][transport] = part.pop("throughput")
            report.update(part)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
