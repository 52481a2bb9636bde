"""recorder_node live benchmark (issue 4 "Measured"); prints JSON.

Two publisher PROCESSES (camera driver, robot driver) play two 640x480 rgb8 cameras at 30 Hz, /joint_states
at 100 Hz and 10 Hz action chunks (distinct synthetic images, stamps = publish time). This process runs
episode_manager + recorder_node and drives episodes of --episode-s seconds through the /qvgm/episode services
(start, stop, label). Reported: reference frames published vs received vs recorded, the recorder's own frame
checks (dropped/late/duplicated/frozen/stale...), recorder+manager process CPU share, write throughput,
finalise time (stop -> committed), and read-back windows/s for the trainer. On a loaded 2-core machine,
best-effort 640x480 images are lost in DDS before any subscriber sees them: compare --reliable.

    .venv/bin/python bench/recorder_node.py [--seconds 300] [--episode-s 60] [--width 640 --height 480] [--reliable]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qvgm_policy_node.ros_env import apply_loopback_env  # noqa: E402

JOINTS = ["joint_1", "joint_2", "joint_3", "joint_4", "joint_5", "joint_6", "gripper_finger_joint"]


def publisher(args: argparse.Namespace) -> None:
    import rclpy
    from builtin_interfaces.msg import Duration, Time
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import Image, JointState
    from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

    rclpy.init()
    node = rclpy.create_node(f"bench_{args.publisher}")
    cams_on, robot_on = args.publisher == "cameras", args.publisher == "robot"
    qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE) if args.reliable else qos_profile_sensor_data
    cams = {c: node.create_publisher(Image, f"/camera/{c}/color/image_raw", qos) for c in ("front", "wrist")}
    js = node.create_publisher(JointState, "/joint_states", 100)
    traj = node.create_publisher(JointTrajectory, "/arm_controller/joint_trajectory", 10)
    rng = np.random.default_rng(0)
    h, w = args.height, args.width
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    frames = [np.roll(base, 8 * i, axis=1) for i in range(30)]

    def stamp(t: float) -> Time:
        return Time(sec=int(t), nanosec=int((t - int(t)) * 1e9))

    t0 = time.time() + 1.0
    end = t0 + args.seconds
    next_js, next_cam, next_chunk = t0, t0, t0
    sent = 0
    while True:
        now = time.time()
        if now >= end:
            break
        nxt = min(next_js if robot_on else end, next_cam if cams_on else end, next_chunk if robot_on else end)
        if nxt > now:
            time.sleep(min(nxt - now, 0.005))
            continue
        if robot_on and now >= next_js:
            m = JointState(name=JOINTS, position=[float(np.sin(now))] * 7)
            m.header.stamp = stamp(now)
            js.publish(m)
            next_js += 0.01
        if robot_on and now >= next_chunk:
            m = JointTrajectory(joint_names=JOINTS)
            m.header.stamp = stamp(now)
            m.points = [JointTrajectoryPoint(positions=[float(k)] * 7,
                                             time_from_start=Duration(nanosec=k * 100_000_000)) for k in range(10)]
            traj.publish(m)
            next_chunk += 0.1
        if cams_on and now >= next_cam:
            for c, pub in cams.items():
                f = frames[sent % 30]
                f[0, :8] = np.frombuffer(sent.to_bytes(24, "little"), np.uint8).reshape(8, 3)  # unique content
                m = Image(height=h, width=w, encoding="rgb8", step=3 * w, data=f.tobytes())
                m.header.stamp = stamp(next_cam)
                m.header.frame_id = f"{c}_color_optical_frame"
                pub.publish(m)
            sent += 1
            next_cam += 1.0 / 30
    print(json.dumps({"published_frames": sent}), flush=True)
    node.destroy_node()
    rclpy.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--episode-s", type=float, default=60.0)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--keep", action="store_true", help="keep the dataset (default: deleted after the read-back)")
    ap.add_argument("--reliable", action="store_true", help="reliable image QoS (default: sensor-data best effort)")
    ap.add_argument("--publisher", choices=["cameras", "robot"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    apply_loopback_env(keep_existing_domain=bool(args.publisher))  # the publisher child joins the parent's domain
    if args.publisher:
        publisher(args)
        return

    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter
    from std_srvs.srv import SetBool, Trigger

    from qvgm.data import ReplayReader, stack_windows
    from qvgm_policy_node.episode_manager import EpisodeManager
    from qvgm_policy_node.recorder_node import RecorderNode

    tmp = tempfile.mkdtemp(prefix="qvgm-recbench-")
    root = os.path.join(tmp, "buffer")
    rclpy.init()
    ex = SingleThreadedExecutor()
    rec = RecorderNode(parameter_overrides=[Parameter("root", value=root), Parameter("fps", value=30),
                                            Parameter("image_height", value=args.height),
                                            Parameter("image_width", value=args.width),
                                            Parameter("image_reliability",
                                                      value="reliable" if args.reliable else "best_effort")])
    mgr = EpisodeManager(parameter_overrides=[Parameter("time_limit", value=args.episode_s + 30)])
    cli = rclpy.create_node("bench_operator")
    for n in (rec, mgr, cli):
        ex.add_node(n)
    srv = {k: cli.create_client(Trigger, f"/qvgm/episode/{k}") for k in ("start", "stop")}
    label = cli.create_client(SetBool, "/qvgm/episode/label")

    def call(c: object, req: object) -> object:
        fut = c.call_async(req)
        while not fut.done():
            ex.spin_once(timeout_sec=0.01)
        return fut.result()

    def spin_for(s: float) -> None:
        end = time.monotonic() + s
        while time.monotonic() < end:
            ex.spin_once(timeout_sec=0.01)

    pubs = [subprocess.Popen([sys.executable, __file__, "--publisher", role, "--seconds", str(args.seconds),
                              "--width", str(args.width), "--height", str(args.height)]
                             + (["--reliable"] if args.reliable else []), stdout=subprocess.PIPE, text=True)
            for role in ("cameras", "robot")]  # camera driver and robot driver are separate processes
    ru0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    spin_for(1.0)
    finalise: list[float] = []
    t_end = time.monotonic() + args.seconds
    while time.monotonic() < t_end - 1.0:
        call(srv["start"], Trigger.Request())
        spin_for(min(args.episode_s, t_end - time.monotonic() - 0.5))
        call(srv["stop"], Trigger.Request())
        t_stop = time.monotonic()
        n = len(rec.core.results)
        call(label, SetBool.Request(data=True))
        while len(rec.core.results) == n and time.monotonic() - t_stop < 120:
            ex.spin_once(timeout_sec=0.01)
        finalise.append(time.monotonic() - t_stop)
        call(srv["stop"], Trigger.Request())  # reset done
    ru1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    out = [p.communicate(timeout=60)[0] for p in pubs]
    published = json.loads(out[0].strip().splitlines()[-1])["published_frames"]
    results = list(rec.core.results)
    received = dict(rec.received)
    for n in (rec, mgr, cli):
        n.destroy_node()
    rclpy.shutdown()
    counts: dict[str, int] = {}
    details: list[str] = []
    for r in results:
        notes = json.loads(r["notes"] or "{}").get("recorder", {})
        for k, v in notes.get("counts", {}).items():
            counts[k] = counts.get(k, 0) + v
        details.extend(notes.get("details", [])[:3])
    r = ReplayReader(root)
    recorded = r.num_frames
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    nb = 0
    while recorded and time.perf_counter() - t < 5.0:
        stack_windows(r.sample_windows(32, n=5, rng=rng))
        nb += 1
    read_ws = nb * 32 / (time.perf_counter() - t)
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    size = sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())
    print(json.dumps({
        "bench": "recorder_node", "host": platform.node(), "cpus": os.cpu_count(), "seconds": args.seconds,
        "image_qos": "reliable" if args.reliable else "best_effort",
        "cameras": 2, "resolution": [args.width, args.height], "camera_hz": 30, "joint_state_hz": 100,
        "episodes": [r["status"] for r in results], "published_reference_frames": published,
        "received_images": received, "recorded_frames": recorded, "frame_checks": counts, "first_events": details[:6],
        "recorder_cpu_share": round(cpu / (w1 - w0), 3),
        "write_frames_per_s": round(recorded / (w1 - w0), 2), "bytes_per_frame": int(size / max(recorded, 1)),
        "finalise_s": [round(f, 3) for f in finalise], "read_windows_per_s": round(read_ws, 1),
        "dataset": root if args.keep else None}, indent=1))
    r.close()
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
