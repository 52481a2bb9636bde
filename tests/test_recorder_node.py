"""recorder_node over real DDS: a scripted publisher (its own rclpy context) plays cameras, joint states, chunks,
policy versions and episode status into recorder_node (another context, spun on a thread); the written dataset
is opened with ReplayReader and checked: as-of alignment (no future frames), actions, intervention flags,
version tags, drop/duplicate/frozen marking and refusal."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import rclpy
from builtin_interfaces.msg import Duration, Time
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from qvgm.data import ReplayReader
from qvgm_policy_node.recorder_node import JOINT_NAMES, RecorderNode

LATCHED = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
H = W = 32
TICK = 0.02  # s: joint states at 50 Hz; cameras every 5 ticks (10 Hz)


@contextmanager
def spinning(make_node: Any) -> Iterator[tuple[Node, rclpy.Context]]:
    """A node in its own rclpy context, spun on a background thread."""
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    ex = SingleThreadedExecutor(context=ctx)
    node = make_node(ctx)
    ex.add_node(node)
    th = threading.Thread(target=ex.spin, daemon=True)
    th.start()
    try:
        yield node, ctx
    finally:
        ex.shutdown(timeout_sec=2.0)
        th.join(5.0)
        node.destroy_node()
        rclpy.shutdown(context=ctx)


def tmsg(t: float) -> Time:
    sec = int(t)
    return Time(sec=sec, nanosec=int(round((t - sec) * 1e9)))


def coded_image(code: int) -> np.ndarray:
    """Image carrying an integer 0..224 that survives lossy video: top half 16*(code%15)+8, bottom 16*(code//15)+8."""
    a = np.empty((H, W, 3), np.uint8)
    a[: H // 2] = 16 * (code % 15) + 8
    a[H // 2:] = 16 * (code // 15) + 8
    return a


def decode_image(a: np.ndarray) -> int:
    top = int(round((a[2: H // 2 - 2].mean() - 8) / 16))
    bot = int(round((a[H // 2 + 2: -2].mean() - 8) / 16))
    return top + 15 * bot


class Script:
    """Publishes the robot's streams with explicit stamps on the wall clock (= the nodes' ROS clock)."""

    def __init__(self, ctx: rclpy.Context) -> None:
        self.node = Node("scripted_robot", context=ctx)
        n = self.node
        self.cam = {c: n.create_publisher(Image, f"/camera/{c}/color/image_raw", qos_profile_sensor_data)
                    for c in ("front", "wrist")}
        self.js = n.create_publisher(JointState, "/joint_states", 50)
        self.traj = n.create_publisher(JointTrajectory, "/arm_controller/joint_trajectory", 10)
        self.status = n.create_publisher(String, "/qvgm/episode/status", LATCHED)
        self.version = n.create_publisher(String, "/qvgm/policy/version", LATCHED)
        self.task = n.create_publisher(String, "/qvgm/task", LATCHED)
        self.results: list[dict] = []
        n.create_subscription(String, "/recorder_node/episodes", lambda m: self.results.append(json.loads(m.data)),
                              10)

    def image(self, cam: str, t: float, code: int) -> None:
        m = Image(height=H, width=W, encoding="rgb8", step=3 * W, data=coded_image(code).tobytes())
        m.header.stamp = tmsg(t)
        self.cam[cam].publish(m)

    def joints(self, t: float) -> None:
        q = [t - self.t0] + [0.0] * 6  # state[0] = its own stamp relative to t0 (checks as-of exactly)
        m = JointState(name=list(reversed(JOINT_NAMES)), position=list(reversed(q)))  # any order is fine
        m.header.stamp = tmsg(t)
        self.js.publish(m)

    def chunk(self, t: float, cid: int) -> None:
        m = JointTrajectory(joint_names=JOINT_NAMES)
        m.header.stamp = tmsg(t)
        m.points = [JointTrajectoryPoint(positions=[100.0 * cid + k] + [0.0] * 6,
                                         time_from_start=Duration(sec=0, nanosec=int(k * 1e8))) for k in range(10)]
        self.traj.publish(m)

    def set_status(self, **st: Any) -> None:
        base = {"takeover": False, "label": None, "label_source": None, "discarded": False, "terminal": False,
                "end_reason": None, "t_end": None}
        self.status.publish(String(data=json.dumps({**base, **st})))

    def play_episode(self, ep: int, n_frames: int, events: dict[int, str] | None = None,
                     takeover: tuple[int, int] | None = None, label: bool | None = True) -> dict[str, float]:
        """Episode of frames m = 1..n_frames (front at tick 5m); wrist at ticks 5m+3; chunks every 25 ticks;
        version v1 -> v2 at tick 60. events[m]: "drop" (skip front frame m), "dup" (send it twice), "freeze"
        (front shows frame 0's content). Returns times."""
        events = events or {}
        self.t0 = t0 = time.time() + 0.3
        t_start = t0 + 5 * TICK
        t_end = t0 + 5 * n_frames * TICK + 0.001
        self.version.publish(String(data="v1"))
        self.set_status(state="RUNNING", episode=ep, t_start=t_start, control="policy", control_since=t_start)
        switch = {}
        if takeover:
            switch = {5 * takeover[0] - 2: True, 5 * takeover[1] - 2: False}
        for i in range(5 * n_frames + 3):
            t = t0 + i * TICK
            while time.time() < t:
                time.sleep(0.001)
            self.joints(t)
            if i % 25 == 0:
                self.chunk(t, i // 25)
            if i == 60:
                self.version.publish(String(data="v2"))
            if i in switch:
                self.set_status(state="RUNNING", episode=ep, t_start=t_start, takeover=switch[i],
                                control="teleop" if switch[i] else "policy", control_since=t)
            m, r = divmod(i, 5)
            if r == 0:
                ev = events.get(m)
                if ev != "drop":
                    self.image("front", t, 0 if ev == "freeze" else m)
                if ev == "dup":
                    self.image("front", t, m)
            elif r == 3:
                self.image("wrist", t, m)
        self.set_status(state="LABEL", episode=ep, t_start=t_start, t_end=t_end, control="teleop",
                        control_since=t_end, end_reason="stopped", terminal=True)
        time.sleep(0.05)
        if label is None:
            self.set_status(state="RESET", episode=ep, t_start=t_start, t_end=t_end, control="teleop",
                            control_since=t_end, discarded=True, end_reason="stopped")
        else:
            self.set_status(state="RESET", episode=ep, t_start=t_start, t_end=t_end, control="teleop",
                            control_since=t_end, label=label, label_source="operator", terminal=True,
                            end_reason="stopped")
        return {"t0": t0, "t_start": t_start, "t_end": t_end}

    def wait_results(self, n: int, timeout: float = 20.0) -> None:
        deadline = time.time() + timeout
        while len(self.results) < n and time.time() < deadline:
            time.sleep(0.02)
        assert len(self.results) >= n, f"recorder reported {self.results}"


def recorder(root: str, mode: str = "mark") -> Any:
    params = [Parameter("root", value=root), Parameter("fps", value=10), Parameter("image_height", value=H),
              Parameter("image_width", value=W), Parameter("quality_mode", value=mode),
              Parameter("max_latency", value=0.5), Parameter("align_delay", value=0.1)]
    return lambda ctx: RecorderNode(context=ctx, parameter_overrides=params)


@contextmanager
def script_node() -> Iterator[Script]:
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    ex = SingleThreadedExecutor(context=ctx)
    s = Script(ctx)
    ex.add_node(s.node)
    th = threading.Thread(target=ex.spin, daemon=True)
    th.start()
    try:
        yield s
    finally:
        ex.shutdown(timeout_sec=2.0)
        th.join(5.0)
        s.node.destroy_node()
        rclpy.shutdown(context=ctx)


def wait_matched(s: Script, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if all(p.get_subscription_count() > 0 for p in [*s.cam.values(), s.js, s.traj, s.status]):
            return
        time.sleep(0.02)
    raise TimeoutError("recorder_node subscriptions not matched")


def test_recorder_aligns_streams_and_tags_steps(tmp_path) -> None:
    root = str(tmp_path / "ds")
    with spinning(recorder(root)), script_node() as s:
        wait_matched(s)
        s.task.publish(String(data="put the cube in the bowl"))
        n = 20
        tm = s.play_episode(0, n, takeover=(8, 12))
        s.wait_results(1)
        assert s.results[0]["status"] == "committed", s.results
    r = ReplayReader(root)
    assert r.num_frames == n, r.stamp - tm["t0"]
    rel = r.stamp - tm["t0"]
    np.testing.assert_allclose(rel, 5 * TICK * np.arange(1, n + 1), atol=1e-6)  # one frame per reference image
    assert np.all(r.stamp >= tm["t_start"] - 1e-9) and np.all(r.stamp <= tm["t_end"])
    # joint state as-of: its stamp (state[0]) is the frame's own tick (published at the same stamp), never later
    np.testing.assert_allclose(r.state[:, 0], rel, atol=1e-5)
    assert np.all(r.state[:, 0] <= rel + 1e-6)
    imgs = r.images(range(n))
    for g in range(n):
        m = g + 1
        assert decode_image(imgs[g]["front"]) == m
        # wrist as-of the front frame at tick 5m: the latest wrist image stamp <= t is from tick 5(m-1)+3
        assert decode_image(imgs[g]["wrist"]) == m - 1, (g, decode_image(imgs[g]["wrist"]))
    # action = setpoint of the latest chunk (stamp <= t), advanced by elapsed time: 100*cid + (t - stamp)/0.1
    ticks = 5 * np.arange(1, n + 1)
    cid = ticks // 25
    expect = 100.0 * cid + (ticks - 25 * cid) * TICK / 0.1
    np.testing.assert_allclose(r.action[:, 0], np.minimum(expect, 100.0 * cid + 9), atol=1e-4)
    # takeover from just before frame 8 to just before frame 12: frames 8..11 are interventions
    assert np.nonzero(r.is_intervention)[0].tolist() == [7, 8, 9, 10]
    versions = list(r.policy_version)
    for g in range(n):
        chunk_tick = 25 * cid[g]
        want = "teleop" if r.is_intervention[g] else ("v1" if chunk_tick < 60 else "v2")
        assert versions[g] == want, (g, versions)
    assert r.done.tolist() == [False] * (n - 1) + [True] and r.reward[-1] == 1.0 and r.reward[:-1].sum() == 0
    ep = r.episodes[0]
    assert ep["success"] is True and ep["label_source"] == "operator" and ep["num_intervention_frames"] == 4
    assert json.loads(ep["notes"])["recorder"]["verdict"] == "ok", ep["notes"]
    assert r.tasks == ["put the cube in the bowl"]


def test_recorder_marks_drop_duplicate_frozen(tmp_path) -> None:
    root = str(tmp_path / "ds")
    with spinning(recorder(root, "mark")), script_node() as s:
        wait_matched(s)
        s.task.publish(String(data="stack"))
        s.play_episode(0, 16, events={4: "drop", 7: "dup", 10: "freeze", 11: "freeze", 12: "freeze"})
        s.wait_results(1)
        assert s.results[0]["status"] == "committed", s.results
    r = ReplayReader(root, decode_images=False)
    assert r.num_frames == 15  # frame 4 missing: the gap is flagged, nothing shifted
    assert 4 not in np.round((r.stamp - r.stamp[0]) / 0.1 + 1).astype(int).tolist()
    notes = json.loads(r.episodes[0]["notes"])["recorder"]
    assert notes["verdict"] == "marked"
    assert notes["counts"]["dropped"] == 1 and notes["counts"]["duplicated"] == 1 and notes["counts"]["frozen"] >= 1
    assert set(notes["flawed"]) >= {"dropped", "duplicated", "frozen"}


def test_recorder_refuses_flawed_episode_keeps_clean_one(tmp_path) -> None:
    root = str(tmp_path / "ds")
    with spinning(recorder(root, "refuse")), script_node() as s:
        wait_matched(s)
        s.task.publish(String(data="stack"))
        s.play_episode(0, 8, events={4: "drop"})
        s.wait_results(1)
        assert s.results[0]["status"].startswith("refused") and s.results[0]["index"] is None
        s.play_episode(1, 6, label=None)  # clean, then discarded by the operator: committed, flagged discarded
        s.wait_results(2)
        assert s.results[1]["status"] == "committed" and s.results[1]["index"] == 0, s.results
    assert len(ReplayReader(root, decode_images=False)) == 0  # discarded hidden by default
    r = ReplayReader(root, decode_images=False, include_discarded=True)
    assert r.num_frames == 6 and r.episodes[0]["discarded"] and not r.done.any()


@pytest.mark.parametrize("bad", ["encoding", "size", "json"])
def test_recorder_survives_bad_messages(tmp_path, bad: str) -> None:
    root = str(tmp_path / "ds")
    with spinning(recorder(root)) as (node, _), script_node() as s:
        wait_matched(s)
        deadline = time.time() + 5
        while not node.bad and time.time() < deadline:  # resend: a best-effort message right after matching may be lost
            if bad == "json":
                s.status.publish(String(data="{not json"))
            else:
                enc = "mono8" if bad == "encoding" else "rgb8"
                m = Image(height=H, width=W + (2 if bad == "size" else 0), encoding=enc, step=3 * (W + 2),
                          data=bytes(3 * (W + 2) * H))
                m.header.stamp = tmsg(time.time())
                s.cam["front"].publish(m)
            time.sleep(0.1)
        assert sum(node.bad.values()) >= 1, node.bad
        s.play_episode(0, 4)
        s.wait_results(1)
        assert s.results[0]["status"] == "committed"
