"""recorder_node's MCAP option over real DDS: the scripted robot of test_recorder_node plays an episode into a
recorder_node with `mcap_dir` set; the MCAP it leaves is opened with the mcap reader (ros2msg schemas equal to
the installed definitions, per-topic message counts, decoded content equal to what was published, rclpy's CDR
decoded by mcap_ros2), then converted with qvgm.data.mcap and compared with the dataset the node recorded live
from the same messages: the same frames, states, actions, flags and images."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
from mcap.reader import make_reader
from mcap_ros2.decoder import DecoderFactory
from rclpy.parameter import Parameter
from std_msgs.msg import String
from test_recorder_node import TICK, H, Script, W, decode_image, script_node, spinning

from qvgm.data import ReplayReader
from qvgm.data.mcap import METADATA_NAME, RecordingConfig, convert_mcap, message_definition
from qvgm_policy_node.recorder_node import JOINT_NAMES, RecorderNode

TYPES = {"/camera/front/color/image_raw": "sensor_msgs/msg/Image",
         "/camera/wrist/color/image_raw": "sensor_msgs/msg/Image", "/joint_states": "sensor_msgs/msg/JointState",
         "/arm_controller/joint_trajectory": "trajectory_msgs/msg/JointTrajectory", "/qvgm/task": "std_msgs/msg/String",
         "/qvgm/policy/version": "std_msgs/msg/String", "/qvgm/episode/status": "std_msgs/msg/String"}


def wait_matched_twice(s: Script, timeout: float = 10.0) -> None:
    """Every stream has both the recorder's typed and its raw (MCAP) subscription."""
    pubs = [*s.cam.values(), s.js, s.traj, s.status, s.task, s.version]
    deadline = time.time() + timeout
    while time.time() < deadline:
        if all(p.get_subscription_count() >= 2 for p in pubs):
            return
        time.sleep(0.02)
    raise TimeoutError("recorder_node typed + raw subscriptions not matched")


def test_recorder_mcap_roundtrip_equals_live_dataset(tmp_path: Path) -> None:
    root, mdir = tmp_path / "live", tmp_path / "mcap"
    params = [Parameter("root", value=str(root)), Parameter("fps", value=10), Parameter("image_height", value=H),
              Parameter("image_width", value=W), Parameter("max_latency", value=1.0),
              Parameter("align_delay", value=0.3), Parameter("mcap_dir", value=str(mdir))]  # slack for a busy CI
    n = 12
    with spinning(lambda ctx: RecorderNode(context=ctx, parameter_overrides=params)) as (node, _), \
            script_node() as s:
        wait_matched_twice(s)
        s.task.publish(String(data="stack the cubes"))
        tm = s.play_episode(0, n, takeover=(4, 6))
        s.wait_results(1)
        assert s.results[0]["status"] == "committed", s.results
        path = node.mcap.path
        assert path.parent == mdir and path.name.startswith("session-")
    # the node is destroyed: the MCAP has its summary and footer
    with open(path, "rb") as f:
        reader = make_reader(f, decoder_factories=[DecoderFactory()])
        summary = reader.get_summary()
        assert summary is not None and reader.get_header().profile == "ros2"
        topics = {ch.topic: summary.schemas[ch.schema_id] for ch in summary.channels.values()}
        assert {t: sc.name for t, sc in topics.items()} == TYPES
        for sc in topics.values():
            assert sc.encoding == "ros2msg" and sc.data.decode() == message_definition(sc.name)
        counts = {summary.channels[c].topic: k for c, k in summary.statistics.channel_message_counts.items()}
        ticks = 5 * n + 3
        assert counts == {"/joint_states": ticks, "/camera/front/color/image_raw": n + 1,
                          "/camera/wrist/color/image_raw": n, "/arm_controller/joint_trajectory": math.ceil(ticks / 25),
                          "/qvgm/task": 1, "/qvgm/policy/version": 2, "/qvgm/episode/status": 5}, counts
        cfg = RecordingConfig.from_metadata({m.name: m.metadata for m in reader.iter_metadata()}[METADATA_NAME])
        assert cfg.joint_names == JOINT_NAMES and cfg.reference == "front" and cfg.delay == 0.3
        front, joints, statuses, chunks, sent_before_logged = [], [], [], [], []
        for _, ch, msg, dec in reader.iter_decoded_messages():
            if ch.topic == "/camera/front/color/image_raw":
                img = np.frombuffer(bytes(dec.data), np.uint8).reshape(H, W, 3)
                front.append((dec.header.stamp.sec + dec.header.stamp.nanosec * 1e-9, decode_image(img)))
            elif ch.topic == "/joint_states":
                t = dec.header.stamp.sec + dec.header.stamp.nanosec * 1e-9
                joints.append((t, list(dec.name), list(dec.position)))
                assert t - 1e-3 <= msg.log_time * 1e-9 < t + 1.0  # log time = reception on the node clock
                assert abs(msg.publish_time * 1e-9 - t) < 0.5  # publish time = the DDS source timestamp
                sent_before_logged.append(msg.publish_time < msg.log_time)
            elif ch.topic == "/qvgm/episode/status":
                statuses.append(json.loads(dec.data)["state"])
            elif ch.topic == "/arm_controller/joint_trajectory":
                chunks.append([p.positions[0] for p in dec.points])
    assert [c for _, c in front] == list(range(n + 1))
    assert all(sent_before_logged)  # publish_time is the sender's stamp, not a copy of log_time
    np.testing.assert_allclose([t - tm["t0"] for t, _ in front], 5 * TICK * np.arange(n + 1), atol=1e-6)
    assert all(names == list(reversed(JOINT_NAMES)) for _, names, _ in joints)
    np.testing.assert_allclose([q[-1] for _, _, q in joints], [t - tm["t0"] for t, _, _ in joints], atol=1e-6)
    assert statuses == ["RUNNING", "RUNNING", "RUNNING", "LABEL", "RESET"]
    assert chunks == [[100.0 * c + k for k in range(10)] for c in range(len(chunks))]

    rep = convert_mcap(path, tmp_path / "converted")
    assert rep.complete and not rep.bad and [e["status"] for e in rep.episodes] == ["committed"], rep
    live, conv = ReplayReader(root), ReplayReader(tmp_path / "converted")
    try:
        assert live.num_frames == conv.num_frames == n
        np.testing.assert_array_equal(conv.stamp, live.stamp)
        np.testing.assert_array_equal(conv.state, live.state)
        np.testing.assert_array_equal(conv.action, live.action)
        for key in ("is_intervention", "done", "reward"):
            np.testing.assert_array_equal(getattr(conv, key), getattr(live, key))
        assert list(conv.policy_version) == list(live.policy_version)
        assert conv.is_intervention.sum() == 2 and conv.tasks == live.tasks == ["stack the cubes"]
        a, b = live.images(range(n)), conv.images(range(n))
        for g in range(n):
            for cam in ("front", "wrist"):
                assert decode_image(a[g][cam]) == decode_image(b[g][cam])
        assert json.loads(conv.episodes[0]["notes"])["recorder"]["counts"] == \
            json.loads(live.episodes[0]["notes"])["recorder"]["counts"]
    finally:
        live.close()
        conv.close()
