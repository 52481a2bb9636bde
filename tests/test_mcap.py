"""MCAP recording and the MCAP -> dataset converter (qvgm.data.mcap), without ROS: real MCAP files written by
McapTopicWriter (CDR encoded with mcap_ros2 against the schemas built from the installed .msg files), converted
into a real replay buffer and read back with ReplayReader; the expected frames are computed by a brute-force
model of "as-of with max age, with what had arrived when the frame was due" written independently here.
Also: truncated files (cut bytes, and a writer process killed with SIGKILL), non-MCAP input, the CLI."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mcap.reader import make_reader
from mcap_ros2._dynamic import serialize_dynamic
from mcap_ros2.decoder import DecoderFactory

from qvgm.data import ReplayReader
from qvgm.data.mcap import (
    METADATA_NAME,
    McapConvertError,
    McapTopicWriter,
    ReadState,
    RecordingConfig,
    convert_mcap,
    iter_records,
    message_definition,
    package_share,
)
from qvgm.recording import QualityConfig

REPO = Path(__file__).resolve().parents[1]
H = W = 32
T0 = 1000.0
JOINTS = ["joint_1", "joint_2", "joint_3", "joint_4", "joint_5", "joint_6", "gripper_finger_joint"]
TOPICS = {"image/front": "/camera/front/color/image_raw", "image/wrist": "/camera/wrist/color/image_raw",
          "joint_states": "/joint_states", "trajectory": "/arm_controller/joint_trajectory", "task": "/qvgm/task",
          "version": "/qvgm/policy/version", "status": "/qvgm/episode/status"}
TYPES = {"image/front": "sensor_msgs/msg/Image", "image/wrist": "sensor_msgs/msg/Image",
         "joint_states": "sensor_msgs/msg/JointState", "trajectory": "trajectory_msgs/msg/JointTrajectory",
         "task": "std_msgs/msg/String", "version": "std_msgs/msg/String", "status": "std_msgs/msg/String"}
MAX_AGE, DELAY = 0.1, 0.2


def config() -> RecordingConfig:
    return RecordingConfig(topics=dict(TOPICS), cameras={"front": (H, W), "wrist": (H, W)}, reference="front",
                           fps=10, joint_names=list(JOINTS), quality=QualityConfig(max_age=MAX_AGE), delay=DELAY)


def coded_image(code: int) -> np.ndarray:
    """An image carrying an integer 0..224 that survives lossy video."""
    a = np.empty((H, W, 3), np.uint8)
    a[: H // 2] = 16 * (code % 15) + 8
    a[H // 2:] = 16 * (code // 15) + 8
    return a


def decode_image(a: np.ndarray) -> int:
    return int(round((a[2: H // 2 - 2].mean() - 8) / 16)) + 15 * int(round((a[H // 2 + 2: -2].mean() - 8) / 16))


def tstamp(t: float) -> dict[str, int]:
    sec = int(math.floor(t))
    return {"sec": sec, "nanosec": int(round((t - sec) * 1e9))}


_ENC: dict[str, Any] = {}


def encode(type_name: str, msg: dict) -> bytes:
    if type_name not in _ENC:
        _ENC[type_name] = serialize_dynamic(type_name, message_definition(type_name))[type_name]
    return _ENC[type_name](msg)


class Session:
    """Messages of a scripted recording: (log time s, role, payload, meta for the model)."""

    def __init__(self) -> None:
        self.msgs: list[tuple[float, str, dict, dict]] = []

    def add(self, log: float, role: str, payload: dict, **meta: Any) -> None:
        self.msgs.append((log, role, payload, meta))

    def image(self, cam: str, t: float, code: int, log: float | None = None) -> None:
        self.add(t + 0.002 if log is None else log, f"image/{cam}",
                 {"header": {"stamp": tstamp(t), "frame_id": cam}, "height": H, "width": W, "encoding": "rgb8",
                  "is_bigendian": 0, "step": 3 * W, "data": coded_image(code).tobytes()}, stamp=t, code=code)

    def joints(self, t: float, log: float | None = None, names: list[str] | None = None) -> None:
        q = [t - T0] + [0.0] * 6  # q[0] = its own stamp relative to T0
        names = list(reversed(JOINTS)) if names is None else names
        self.add(t + 0.003 if log is None else log, "joint_states",
                 {"header": {"stamp": tstamp(t)}, "name": names, "position": list(reversed(q)),
                  "velocity": [], "effort": []}, stamp=t, q0=t - T0)

    def chunk(self, t: float, cid: int) -> None:
        pts = [{"positions": [100.0 * cid + k] + [0.0] * 6, "velocities": [], "accelerations": [], "effort": [],
                "time_from_start": {"sec": 0, "nanosec": int(k * 1e8)}} for k in range(10)]
        self.add(t + 0.003, "trajectory", {"header": {"stamp": tstamp(t)}, "joint_names": JOINTS, "points": pts},
                 stamp=t, cid=cid)

    def string(self, log: float, role: str, data: Any) -> None:
        self.add(log, role, {"data": data if isinstance(data, str) else json.dumps(data)})

    def status(self, log: float, **st: Any) -> None:
        base = {"takeover": False, "label": None, "label_source": None, "discarded": False, "terminal": False,
                "end_reason": None, "t_end": None, "control": "policy"}
        self.string(log, "status", {**base, **st})

    def ordered(self) -> list[tuple[float, str, dict, dict]]:
        """File (= arrival) order."""
        return sorted(self.msgs, key=lambda m: m[0])

    def write(self, path: Path, cfg: RecordingConfig | None = None, flush_period: float = 1.0,
              msgs: list | None = None) -> Path:
        cfg = cfg or config()
        w = McapTopicWriter(path, {METADATA_NAME: cfg.to_metadata()}, flush_period=flush_period)
        for role, topic in cfg.topics.items():
            w.add_channel(topic, TYPES[role])
        for log, role, payload, _ in (msgs if msgs is not None else self.ordered()):
            assert w.write(cfg.topics[role], encode(TYPES[role], payload), int(round(log * 1e9)))
        w.close()
        assert w.failed is None and not w.dropped
        return path


def play_episode(s: Session, ep: int, t0: float, n: int, drop: set[int] = frozenset(),
                 late_ref: dict[int, float] | None = None, late_wrist: dict[int, float] | None = None,
                 label: bool = True) -> dict[str, float]:
    """Episode `ep`: front frames m=1..n at t0+0.1m (code 10*ep+m), wrist at t0+0.1m+0.06, joint states every
    20 ms (every 7th pair logged in swapped order), chunks every 0.5 s; late_*[m] = extra arrival delay (s)."""
    late_ref, late_wrist = late_ref or {}, late_wrist or {}
    t_start, t_end = t0 + 0.05, t0 + 0.1 * n + 0.001
    s.string(t0 - 0.1, "version", f"v{ep}")
    s.status(t_start, state="RUNNING", episode=ep, t_start=t_start, control_since=t_start)
    for i in range(int(round((0.1 * n + 0.3) / 0.02)) + 1):
        t = t0 + 0.02 * i
        s.joints(t, log=t + (0.028 if i % 7 == 0 else 0.003))  # every 7th arrives after the next one
    for c in range(int((0.1 * n) / 0.5) + 1):
        s.chunk(t0 + 0.5 * c + 0.01, 10 * ep + c)
    for m in range(1, n + 1):
        t = t0 + 0.1 * m
        if m not in drop:
            s.image("front", t, 10 * ep + m, log=t + 0.002 + late_ref.get(m, 0.0))
    for m in range(0, n + 1):
        t = t0 + 0.1 * m + 0.06
        s.image("wrist", t, 10 * ep + m, log=t + 0.002 + late_wrist.get(m, 0.0))
    s.status(t_end + 0.01, state="LABEL", episode=ep, t_start=t_start, t_end=t_end, control="teleop",
             control_since=t_end, end_reason="stopped", terminal=True)
    s.status(t_end + 0.05, state="RESET", episode=ep, t_start=t_start, t_end=t_end, control="teleop",
             control_since=t_end, label=label, label_source="operator", terminal=True, end_reason="stopped")
    return {"t_start": t_start, "t_end": t_end}


def session() -> tuple[Session, list[dict[str, float]]]:
    s = Session()
    s.string(T0 - 1.0, "task", "put the cube in the bowl")
    e0 = play_episode(s, 0, T0, 20, drop={6}, late_ref={11: 0.21, 12: 0.12, 13: 0.025}, late_wrist={8: 0.5})
    s.joints(T0 + 2.5, names=["only_one_joint"])  # a bad message: counted, skipped
    e1 = play_episode(s, 1, T0 + 3.0, 10)
    return s, [e0, e1]


def model(msgs: list[tuple[float, str, dict, dict]], t_start: float, t_end: float) -> list[dict[str, Any]]:
    """Brute-force expectation for one episode: each reference frame (in arrival order, newer stamp than every
    earlier one) is sampled at the first later message logged >= stamp + DELAY (or the end of the file); it may
    only use messages that arrived before that point, with stamp <= its stamp and age <= MAX_AGE; a frame with a
    missing stream is skipped."""
    out = []
    last_ref = -math.inf
    for p, (_, role, _, meta) in enumerate(msgs):
        if role != "image/front":
            continue
        t = meta["stamp"]
        if t <= last_ref:
            continue
        last_ref = t
        if not (t_start <= t <= t_end):
            continue
        q = next((j for j in range(p + 1, len(msgs)) if msgs[j][0] >= t + DELAY), len(msgs))
        seen = [m for m in msgs[:q] if m[3].get("stamp", math.inf) <= t]

        def as_of(r: str, seen: list = seen, t: float = t) -> dict | None:
            cand = [m[3] for m in seen if m[1] == r and "stamp" in m[3] and ("q0" in m[3] or r != "joint_states")]
            if not cand:
                return None
            best = max(cand, key=lambda x: x["stamp"])
            return best if r == "trajectory" or t - best["stamp"] <= MAX_AGE + 1e-9 else None

        wrist, js, ch = as_of("image/wrist"), as_of("joint_states"), as_of("trajectory")
        if wrist is None or js is None:
            continue
        rel = t - ch["stamp"]
        action0 = 100.0 * ch["cid"] + min(max(rel / 0.1, 0.0), 9.0)
        out.append({"stamp": t, "front": meta["code"], "wrist": wrist["code"], "q0": js["q0"], "a0": action0})
    return out


def check_episode(r: ReplayReader, k: int, want: list[dict[str, Any]], imgs: bool = True) -> None:
    s, e = int(r.ep_start[k]), int(r.ep_end[k])
    assert e - s == len(want), (k, e - s, len(want), (r.stamp[s:e] - T0).round(3), [w["stamp"] - T0 for w in want])
    np.testing.assert_allclose(r.stamp[s:e], [w["stamp"] for w in want], atol=1e-6)
    np.testing.assert_allclose(r.state[s:e, 0], [w["q0"] for w in want], atol=1e-4)
    np.testing.assert_allclose(r.action[s:e, 0], [w["a0"] for w in want], atol=1e-3)
    assert np.all(r.state[s:e, 0] <= r.stamp[s:e] - T0 + 1e-4), "a joint state stamped after its frame was used"
    if imgs:
        got = r.images(range(s, e))
        assert [decode_image(got[g]["front"]) for g in range(s, e)] == [w["front"] for w in want]
        assert [decode_image(got[g]["wrist"]) for g in range(s, e)] == [w["wrist"] for w in want]


def test_message_definition_is_rosbag2_concatenation() -> None:
    d = message_definition("trajectory_msgs/msg/JointTrajectory")
    parts = d.split("\n" + "=" * 80 + "\n")
    share = {p: package_share(p) for p in ("trajectory_msgs", "std_msgs", "builtin_interfaces")}
    assert parts[0] == (share["trajectory_msgs"] / "msg/JointTrajectory.msg").read_text()
    names = [p.split("\n", 1)[0] for p in parts[1:]]
    assert names == ["MSG: std_msgs/Header", "MSG: builtin_interfaces/Time",
                     "MSG: trajectory_msgs/JointTrajectoryPoint", "MSG: builtin_interfaces/Duration"]
    for part in parts[1:]:
        head, text = part.split("\n", 1)
        pkg, typ = head[len("MSG: "):].split("/")
        assert text == (share[pkg] / "msg" / f"{typ}.msg").read_text()
    with pytest.raises(LookupError):
        message_definition("no_such_msgs/msg/Nothing")


def test_writer_roundtrip_schemas_counts_content(tmp_path: Path) -> None:
    s, _ = session()
    path = s.write(tmp_path / "rec.mcap")
    with open(path, "rb") as f:
        reader = make_reader(f, decoder_factories=[DecoderFactory()])
        summary = reader.get_summary()
        assert summary is not None and reader.get_header().profile == "ros2"
        schemas = {sc.name: sc for sc in summary.schemas.values()}
        assert set(schemas) == set(TYPES.values())
        for name, sc in schemas.items():
            assert sc.encoding == "ros2msg" and sc.data.decode() == message_definition(name)
        assert {ch.message_encoding for ch in summary.channels.values()} == {"cdr"}
        counts = {summary.channels[c].topic: n for c, n in summary.statistics.channel_message_counts.items()}
        want = {}
        for _, role, _, _ in s.msgs:
            want[TOPICS[role]] = want.get(TOPICS[role], 0) + 1
        assert counts == want
        md = {m.name: m.metadata for m in reader.iter_metadata()}
        assert RecordingConfig.from_metadata(md[METADATA_NAME]) == config()
        got = [(sc.topic, msg.log_time, dec) for _, sc, msg, dec in reader.iter_decoded_messages()]
    sent = s.ordered()
    assert len(got) == len(sent)
    for (topic, log_ns, dec), (log, role, payload, _) in zip(got, sent, strict=True):
        assert topic == TOPICS[role] and log_ns == int(round(log * 1e9))
        if role.startswith("image/"):
            assert bytes(dec.data) == payload["data"] and dec.header.stamp.sec == payload["header"]["stamp"]["sec"]
        elif role == "joint_states":
            assert list(dec.name) == payload["name"] and list(dec.position) == payload["position"]
        elif role == "trajectory":
            assert [list(p.positions) for p in dec.points] == [p["positions"] for p in payload["points"]]
        else:
            assert dec.data == payload["data"]


def test_convert_matches_as_of_model(tmp_path: Path) -> None:
    s, eps = session()
    path = s.write(tmp_path / "rec.mcap")
    rep = convert_mcap(path, tmp_path / "ds")
    assert rep.complete and not rep.truncated and not rep.incomplete
    assert [e["status"] for e in rep.episodes] == ["committed", "committed"], rep.episodes
    assert rep.bad == {TOPICS["joint_states"]: 1}, rep.errors  # the message lacking joints
    r = ReplayReader(tmp_path / "ds")
    try:
        msgs = s.ordered()
        for k, e in enumerate(eps):
            want = model(msgs, e["t_start"], e["t_end"])
            check_episode(r, k, want)
        # the scripted flaws: frame 6 dropped, frame 9 skipped (wrist 8 arrived after frame 9 was due, wrist 7 is
        # older than max_age), frame 11 late (and 12, 13 queued behind it); late frames are still aligned as-of
        # their own stamps, with what had arrived when they were sampled
        stamps0 = np.round((r.stamp[r.ep_start[0]:r.ep_end[0]] - T0) / 0.1).astype(int).tolist()
        assert stamps0 == [m for m in range(1, 21) if m not in (6, 9)]
        notes = json.loads(r.episodes[0]["notes"])["recorder"]
        assert notes["verdict"] == "marked"
        assert (notes["counts"]["dropped"], notes["counts"]["stale"], notes["counts"]["late"]) == (1, 1, 1), notes
        assert json.loads(r.episodes[1]["notes"])["recorder"]["verdict"] == "ok"
        assert [ep["success"] for ep in r.episodes] == [True, True]
        assert r.tasks == ["put the cube in the bowl"]
        assert r.done[r.ep_end[0] - 1] and not r.done[r.ep_start[0]:r.ep_end[0] - 1].any()
        assert set(r.policy_version[r.ep_start[1]:r.ep_end[1]]) == {"v1"}
    finally:
        r.close()


def _offset_after(path: Path, log_time: float) -> int:
    """Byte offset just after the record (chunk) holding the last message logged <= log_time."""
    from mcap.records import Message

    state = ReadState()
    off = 0
    for rec in iter_records(path, state):
        if isinstance(rec, Message) and rec.log_time <= int(round(log_time * 1e9)):
            off = state.bytes_read
    return off


def test_truncated_file_converts_complete_part(tmp_path: Path) -> None:
    s, eps = session()
    full = s.write(tmp_path / "full.mcap", flush_period=0.0)  # one chunk per message: cuts land anywhere
    cut_log = eps[1]["t_start"] + 0.62  # inside episode 1
    off = _offset_after(full, cut_log)
    data = full.read_bytes()
    assert 0 < off < len(data)
    cut = tmp_path / "cut.mcap"
    cut.write_bytes(data[:off + 7])  # the next record is cut short
    kept = [m for m in s.ordered() if m[0] <= cut_log]

    rep = convert_mcap(cut, tmp_path / "ds")  # default: the running episode is dropped
    assert rep.truncated and not rep.complete and rep.stopped and rep.incomplete == [1]
    assert [e["status"] for e in rep.episodes] == ["committed"]
    r = ReplayReader(tmp_path / "ds")
    check_episode(r, 0, model(kept, eps[0]["t_start"], eps[0]["t_end"]), imgs=False)
    assert len(r.episodes) == 1
    r.close()

    rep = convert_mcap(cut, tmp_path / "ds2", recover_partial=True)
    assert [e["status"] for e in rep.episodes] == ["committed", "committed"] and not rep.incomplete
    r = ReplayReader(tmp_path / "ds2", include_discarded=True)
    try:
        ep = r.episodes[1]
        assert ep["discarded"] and ep["success"] is None and ep["label_source"] is None
        assert json.loads(ep["notes"])["recorder"]["end_reason"].startswith("partial")
        last = max(m[3]["stamp"] for m in kept if "stamp" in m[3])
        want = model(kept, eps[1]["t_start"], last)
        assert len(want) >= 4
        check_episode(r, 1, want)
        assert not r.done[r.ep_start[1]:r.ep_end[1]].any()
        n0 = int(r.ep_end[0] - r.ep_start[0])
    finally:
        r.close()
    r = ReplayReader(tmp_path / "ds2")
    assert len(r) == n0  # the partial episode is hidden by default (discarded)
    r.close()


def test_refuses_non_mcap_and_cut_header(tmp_path: Path) -> None:
    s, _ = session()
    full = s.write(tmp_path / "full.mcap")
    bad = tmp_path / "bad.mcap"
    bad.write_bytes(b"not an mcap file at all")
    with pytest.raises(McapConvertError, match="not an MCAP"):
        convert_mcap(bad, tmp_path / "ds")
    bad.write_bytes(full.read_bytes()[:12])  # magic, then the header record cut
    with pytest.raises(McapConvertError, match="header"):
        convert_mcap(bad, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()  # nothing written


def test_config_without_metadata_and_incompatible_dataset(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from critic_trainer.cli import main

    s = Session()
    play_episode(s, 0, T0, 5)
    path = tmp_path / "bare.mcap"
    w = McapTopicWriter(path)  # no qvgm.recorder metadata (e.g. a file from `ros2 bag record -s mcap`)
    for role, topic in TOPICS.items():
        w.add_channel(topic, TYPES[role])
    for log, role, payload, _ in s.ordered():
        assert w.write(TOPICS[role], encode(TYPES[role], payload), int(round(log * 1e9)))
    w.close()
    with pytest.raises(McapConvertError, match="metadata"):
        convert_mcap(path, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()
    cfg_json = config().to_metadata()["config"]
    assert main(["mcap2dataset", str(path), str(tmp_path / "ds"), "--config", cfg_json]) == 0
    assert [e["status"] for e in json.loads(capsys.readouterr().out)["episodes"]] == ["committed"]
    other = RecordingConfig(**{**config().__dict__, "cameras": {"front": (H, 2 * W), "wrist": (H, W)}})
    with pytest.raises(McapConvertError, match="dataset has"):
        convert_mcap(path, tmp_path / "ds", other)  # appending needs the same cameras/fps/joints
    r = ReplayReader(tmp_path / "ds", decode_images=False)
    assert len(r.episodes) == 1  # unchanged
    r.close()


def child_writer(path: str) -> None:
    """Write messages forever; print each index once it is flushed to the file."""
    import time

    w = McapTopicWriter(path, {METADATA_NAME: config().to_metadata()}, flush_period=0.0)
    w.add_channel(TOPICS["joint_states"], TYPES["joint_states"])
    s = Session()
    i = 0
    while True:
        s.msgs.clear()
        s.joints(T0 + 0.01 * i)
        _, _, payload, _ = s.msgs[0]
        assert w.write(TOPICS["joint_states"], encode(TYPES["joint_states"], payload), int((T0 + 0.01 * i) * 1e9))
        while w.written[TOPICS["joint_states"]] <= i or w.pending():
            time.sleep(0.0005)
        time.sleep(0.001)  # the flush follows the write in the writer thread
        print(i, flush=True)
        i += 1


def test_sigkilled_writer_leaves_readable_prefix(tmp_path: Path) -> None:
    path = tmp_path / "killed.mcap"
    proc = subprocess.Popen([sys.executable, __file__, "writer", str(path)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        last = -1
        while last < 30:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            last = int(line)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    from mcap.records import Message

    state = ReadState()
    stamps = [rec.log_time for rec in iter_records(path, state) if isinstance(rec, Message)]
    assert not state.complete  # no footer: the process never finished the file
    assert len(stamps) >= 31 and stamps == sorted(stamps)
    rep = convert_mcap(path, tmp_path / "ds")
    assert rep.truncated and rep.messages[TOPICS["joint_states"]] == len(stamps) and rep.episodes == []


def child_diskfull(path: str) -> None:
    """Write images under a 200 kB file-size limit (EFBIG stands in for a full disk); report what happened."""
    import resource
    import time

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    w = McapTopicWriter(path, {METADATA_NAME: config().to_metadata()}, compression="none", flush_period=0.0)
    w.add_channel(TOPICS["image/front"], TYPES["image/front"])
    s = Session()
    refused = 0
    for i in range(100):
        s.msgs.clear()
        s.image("front", T0 + 0.1 * i, i)
        if not w.write(TOPICS["image/front"], encode(TYPES["image/front"], s.msgs[0][2]), int((T0 + 0.1 * i) * 1e9)):
            refused += 1
        time.sleep(0.002)
    w.close()
    print(json.dumps({"failed": w.failed, "written": w.written[TOPICS["image/front"]], "refused": refused}))


def test_writer_disk_full_stops_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "full.mcap"
    out = subprocess.run([sys.executable, __file__, "diskfull", str(path)], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["failed"] and "File too large" in res["failed"] and res["refused"] > 0, res
    assert 0 < res["written"] < 100
    from mcap.records import Message

    state = ReadState()
    n = sum(isinstance(rec, Message) for rec in iter_records(path, state))
    assert not state.complete and 0 < n <= res["written"]  # what reached the disk stays readable
    assert convert_mcap(path, tmp_path / "ds").truncated


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from critic_trainer.cli import main

    s = Session()
    s.string(T0 - 1.0, "task", "stack")
    play_episode(s, 0, T0, 6)
    path = s.write(tmp_path / "rec.mcap")
    assert main(["mcap2dataset", str(path), str(tmp_path / "ds")]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [e["status"] for e in rep["episodes"]] == ["committed"] and rep["complete"]
    assert main(["mcap2dataset", str(tmp_path / "none.mcap"), str(tmp_path / "ds")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_converter_needs_no_ros(tmp_path: Path) -> None:
    """The trainer image has no ROS packages: conversion runs with rclpy and every message package unimportable."""
    s = Session()
    play_episode(s, 0, T0, 5)
    path = s.write(tmp_path / "rec.mcap")
    blocked = ["rclpy", "sensor_msgs", "std_msgs", "trajectory_msgs", "builtin_interfaces", "ament_index_python",
               "rosidl_runtime_py", "qvgm_policy_node"]
    code = (f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
            f"from qvgm.data.mcap import main\nsys.exit(main([{str(path)!r}, {str(tmp_path / 'ds')!r}]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert [e["status"] for e in json.loads(out.stdout)["episodes"]] == ["committed"]


if __name__ == "__main__":
    {"writer": child_writer, "diskfull": child_diskfull}[sys.argv[1]](sys.argv[2])
