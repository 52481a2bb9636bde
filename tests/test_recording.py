"""qvgm.recording without ROS: as-of alignment, frame checks, chunk setpoints, state machine, joy jog, writer core."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qvgm.data import ReplayBuffer, ReplayReader
from qvgm.recording import (
    IDLE,
    LABEL,
    RESET,
    RUNNING,
    Aligner,
    Chunk,
    ChunkTracker,
    EpisodeRecorder,
    EpisodeStateMachine,
    Jogger,
    JoyMapping,
    QualityConfig,
    parse_key,
)


def img(v: int, h: int = 16, w: int = 16) -> np.ndarray:
    return np.full((h, w, 3), v % 256, np.uint8)


def test_as_of_never_future_and_max_age() -> None:
    al = Aligner(["front", "wrist"], "front", fps=10, cfg=QualityConfig(max_age=0.08), delay=0.05)
    al.reset(0.0)
    for k in range(20):  # joint states at 100 Hz, stamps k/100 + 0.003
        al.add_state(k / 100 + 0.003, np.full(7, k, np.float32))
    al.add_image("wrist", 0.095, img(1))
    al.add_image("wrist", 0.105, img(2))  # after the reference frame: must not be used for it
    al.add_image("front", 0.1, img(3), arrival=0.11)
    assert al.pop_ready(0.12) == []  # waits `delay` for late streams
    al.add_state(0.1, np.full(7, 99, np.float32))  # exactly at the frame time: allowed (stamp <= t)
    (s,) = al.pop_ready(0.16)
    assert s.stamp == 0.1 and s.state_stamp == 0.1 and s.state[0] == 99
    assert s.image_stamps["wrist"] == 0.095 and s.images["wrist"][0, 0, 0] == 1
    # a reference frame whose other streams are too old -> stale, frame has None
    al.add_image("front", 0.3, img(4), arrival=0.31)
    (s2,) = al.flush()
    assert s2.state is None and s2.images["wrist"] is None
    assert al.report.counts["stale"] == 2
    assert al.report.counts["dropped"] == 1  # 0.1 -> 0.3 at 10 fps: one frame missing


def test_drop_duplicate_late_frozen_and_downsample() -> None:
    cfg = QualityConfig(frozen_frames=3)
    al = Aligner(["front"], "front", fps=10, cfg=cfg)
    al.reset(0.0)
    t = [0.1, 0.15, 0.2, 0.2, 0.3, 0.6, 0.7]  # 0.15 faster than fps (down-sampled), 0.2 twice, 0.3 -> 0.6 gap
    vals = [1, 2, 3, 3, 5, 5, 5]  # 0.3, 0.6, 0.7 identical content -> frozen
    for ti, v in zip(t, vals, strict=True):
        al.add_image("front", ti, img(v), arrival=ti + (0.5 if ti == 0.7 else 0.01))
    samples = al.flush()
    assert [s.stamp for s in samples] == [0.1, 0.2, 0.3, 0.6, 0.7]
    c = al.report.counts
    assert c["duplicated"] == 1 and c["dropped"] == 2 and c["late"] == 1 and c["frozen"] == 1
    assert al.report.verdict(cfg) == "marked"
    assert al.report.verdict(QualityConfig(mode="refuse")) == "refused"
    assert json.loads(al.report.notes(cfg))["recorder"]["counts"]["dropped"] == 2
    clean = Aligner(["front"], "front", fps=10, cfg=cfg)
    for k in range(1, 10):
        clean.add_state(k / 10 - 0.002, np.zeros(7))
        clean.add_image("front", k / 10, img(k), arrival=k / 10)
    assert len(clean.flush()) == 9 and clean.report.verdict(cfg) == "ok"


def test_chunk_setpoint_interpolates_latest_chunk() -> None:
    ct = ChunkTracker()
    times = np.array([0.0, 0.1, 0.2])
    ct.add(Chunk(1.0, times, np.array([[0.0], [1.0], [2.0]]), "v1"))
    ct.add(Chunk(1.15, times, np.array([[10.0], [11.0], [12.0]]), "v2"))
    assert ct.at(0.99) is None  # nothing executed before the first chunk's stamp
    q, c = ct.at(1.05)
    assert c.version == "v1" and q[0] == pytest.approx(0.5)
    q, c = ct.at(1.15)
    assert c.version == "v2" and q[0] == pytest.approx(10.0)  # newest chunk with stamp <= t wins
    assert ct.at(2.0)[0][0] == pytest.approx(12.0)  # past the end: hold the last point
    with pytest.raises(ValueError):
        ct.add(Chunk(2.0, np.array([0.1, 0.1]), np.zeros((2, 1)), "x"))


def test_state_machine_transitions_and_invalid() -> None:
    sm = EpisodeStateMachine(time_limit=5.0)
    assert sm.state == IDLE and sm.control == "teleop"
    assert not sm.stop(0.0) and not sm.label_request(True, 0.0) and not sm.discard(0.0)
    assert not sm.takeover_request(True, 0.0) and not sm.reset_done(0.0)
    assert sm.start(1.0) and sm.state == RUNNING and sm.control == "policy" and sm.episode == 0
    assert not sm.start(1.5).ok and "RUNNING" in sm.start(1.5).message
    assert sm.takeover_request(True, 2.0) and sm.control == "teleop" and sm.control_since == 2.0
    assert sm.takeover_request(False, 3.0) and sm.control == "policy"
    assert sm.stop(4.0) and sm.state == LABEL and sm.terminal and sm.status(9.0)["elapsed"] == 3.0
    assert not sm.start(4.1)
    assert sm.label_request(False, 4.2) and sm.state == RESET and sm.label is False
    assert sm.start(5.0) and sm.episode == 1 and sm.label is None  # start in RESET = reset done + start
    assert sm.tick(9.9) is None and sm.tick(10.0) and sm.state == LABEL and not sm.terminal
    assert sm.discard(10.1) and sm.state == RESET and sm.discarded
    assert sm.stop(11.0) and sm.state == IDLE
    sm.start(12.0)
    assert sm.discard(12.5) and sm.state == RESET and sm.discarded  # discard straight from RUNNING
    sm.reset_done(13.0)
    sm.start(14.0)
    assert sm.sim_success(15.0) and sm.state == RESET and sm.label is True and sm.label_source == "auto"
    assert sm.terminal and sm.status(16.0)["end_reason"] == "success"
    auto = EpisodeStateMachine(time_limit=1.0, auto_label_timeout=True)
    auto.start(0.0)
    auto.tick(1.0)
    assert auto.state == RESET and auto.label is False and auto.label_source == "auto"
    with pytest.raises(ValueError):
        EpisodeStateMachine(time_limit=0)


def test_joy_mapping_deadman_and_jogger_clamps() -> None:
    m = JoyMapping(axes=[0, 1, -1], scale=[1.0, 0.5, 0.02], deadman_button=2, gripper_open_button=0,
                   gripper_close_button=1, gripper_speed=0.02, deadzone=0.1)
    assert m.velocity([1.0, 1.0], [0, 0, 0]) is None  # deadman not held
    assert m.velocity([1.0], []) is None  # no buttons at all
    v = m.velocity([1.0, -0.05], [1, 0, 1])
    assert v[0] == pytest.approx(1.0) and v[1] == 0.0 and v[2] == pytest.approx(0.02)
    assert m.velocity([float("nan"), 2.0], [0, 1, 1]).tolist() == pytest.approx([0.0, 0.5, -0.02])
    j = Jogger(np.array([-1.0, -1.0, 0.0]), np.array([1.0, 1.0, 0.04]), np.array([0.5, 0.5, 0.01]))
    with pytest.raises(RuntimeError):
        j.step(np.zeros(3), 0.1)
    j.anchor(np.array([0.95, 0.0, 0.0]))
    q = j.step(np.array([10.0, -10.0, -1.0]), 0.1)
    assert q.tolist() == pytest.approx([1.0, -0.05, 0.0])  # position clamp, velocity clamp, gripper lower limit
    assert parse_key("3") == ("select", 2) and parse_key("s") == ("success", None) and parse_key("?") is None


def test_recorder_core_writes_aligned_episode(tmp_path) -> None:
    """The writer thread path without ROS: frames, actions from chunks, takeover flags, last-frame reward/done."""
    buf = ReplayBuffer.create(tmp_path / "ds", fps=10, cameras={"front": (16, 16)})
    rec = EpisodeRecorder(buf, "front", QualityConfig(), delay=0.05, default_task="stack")
    try:
        rec.set_version("v7")
        rec.on_status({"state": RUNNING, "episode": 0, "t_start": 1.0, "control": "policy", "control_since": 1.0})
        rec.add_chunk(1.0, np.array([0.0, 1.0]), np.zeros((2, 7)) + np.array([[0.0], [1.0]]))
        for k in range(10):
            t = 1.0 + k / 10
            rec.add_state(t - 0.01, np.full(7, k, np.float32))
            rec.add_image("front", t, img(10 * k), arrival=t)
        rec.on_status({"state": RUNNING, "episode": 0, "t_start": 1.0, "control": "teleop", "control_since": 1.55,
                       "takeover": True})
        rec.poll(1.5)
        rec.on_status({"state": LABEL, "episode": 0, "t_start": 1.0, "t_end": 1.75, "control": "teleop",
                       "control_since": 1.75, "label": None})
        assert rec.poll(3.0) >= 0 and rec.episode == 0  # waits for the label
        rec.on_status({"state": RESET, "episode": 0, "t_start": 1.0, "t_end": 1.75, "control": "teleop",
                       "control_since": 1.75, "label": True, "label_source": "operator", "terminal": True})
        rec.poll(3.0)
    finally:
        rec.close()
    assert rec.results and rec.results[0]["status"] == "committed", rec.results
    r = ReplayReader(tmp_path / "ds", decode_images=False)
    assert r.num_frames == 8  # t = 1.0 .. 1.7 (<= t_end 1.75)
    np.testing.assert_allclose(r.stamp, 1.0 + np.arange(8) / 10)
    np.testing.assert_allclose(r.action[:, 0], np.arange(8) / 10, atol=1e-6)  # interpolated chunk setpoint
    np.testing.assert_allclose(r.state[:, 0], np.arange(8))
    assert r.is_intervention.tolist() == [False] * 6 + [True] * 2
    assert list(r.policy_version) == ["v7"] * 6 + ["teleop"] * 2
    assert r.done.tolist() == [False] * 7 + [True] and r.reward.tolist() == [0.0] * 7 + [1.0]
    assert r.episodes[0]["success"] is True and r.episodes[0]["label_source"] == "operator"
    assert json.loads(r.episodes[0]["notes"])["recorder"]["verdict"] == "ok"


def test_recorder_core_next_episode_before_final_frames_due(tmp_path) -> None:
    """Sim: success -> reset -> next start can arrive within align_delay; the ended episode is still committed,
    and an episode superseded before it was labelled is dropped (never merged into the next)."""
    buf = ReplayBuffer.create(tmp_path / "ds", fps=10, cameras={"front": (16, 16)})
    rec = EpisodeRecorder(buf, "front", QualityConfig(), delay=0.5, default_task="push")
    base = {"control": "policy", "control_since": 0.0}
    try:
        for ep, t0 in enumerate([1.0, 3.0, 5.0]):
            rec.on_status({**base, "state": RUNNING, "episode": ep, "t_start": t0})
            rec.add_chunk(t0, np.array([0.0]), np.full((1, 7), ep, float))
            for k in range(5):
                rec.add_state(t0 + k / 10, np.full(7, k, np.float32))
                rec.add_image("front", t0 + k / 10, img(k), arrival=t0 + k / 10)
            rec.poll(t0 + 0.45)  # the last frames are not due yet (delay 0.5 s)
            if ep == 0:
                rec.on_status({**base, "state": RESET, "episode": 0, "t_start": t0, "t_end": t0 + 0.45, "label": True,
                               "label_source": "auto", "terminal": True, "end_reason": "success"})
            elif ep == 1:
                pass  # never labelled: superseded by episode 2
            else:
                rec.on_status({**base, "state": RESET, "episode": 2, "t_start": t0, "t_end": t0 + 0.45, "label": False,
                               "label_source": "auto", "terminal": False, "end_reason": "timeout"})
                rec.poll(t0 + 1.0)
    finally:
        rec.close()
    assert [r["status"] for r in rec.results][:1] == ["committed"] and rec.results[-1]["status"] == "committed"
    assert any("superseded" in r["status"] for r in rec.results), rec.results
    r = ReplayReader(tmp_path / "ds", decode_images=False)
    assert len(r.episodes) == 2 and r.num_frames == 10
    np.testing.assert_allclose(r.action[:5, 0], 0.0) and np.testing.assert_allclose(r.action[5:, 0], 2.0)
    assert r.done.tolist() == [False] * 4 + [True] + [False] * 5  # timeout: truncated, not terminal
    assert r.reward.tolist() == [0.0] * 4 + [1.0] + [0.0] * 5


def test_reused_as_of_image_is_stale_not_frozen_and_timeline_bounded() -> None:
    from qvgm.recording import Timeline

    al = Aligner(["front", "wrist"], "front", fps=10, cfg=QualityConfig(max_age=0.5, frozen_frames=2))
    al.reset(0.0)
    al.add_image("wrist", 0.05, img(7))  # one wrist image, reused by three reference frames (wrist camera slow)
    for k in range(1, 4):
        al.add_state(k / 10, np.zeros(7))
        al.add_image("front", k / 10, img(k), arrival=k / 10)
    assert len(al.flush()) == 3 and al.report.counts["frozen"] == 0
    al.add_image("wrist", 0.35, img(7))  # a NEW wrist message with identical content: frozen camera
    al.add_state(0.4, np.zeros(7))
    al.add_image("front", 0.4, img(4), arrival=0.4)
    al.flush()
    assert al.report.counts["frozen"] == 1
    tl = Timeline("teleop")
    for i in range(10_000):
        tl.set(float(i), "policy" if i % 2 else "teleop")
        tl.set(float(i), "policy" if i % 2 else "teleop")  # repeats are ignored
    assert len(tl.stamps) <= 4096 and tl.at(9999.5) == "policy" and tl.at(9998.5) == "teleop"


def test_recorder_core_full_queue_refuses_frames_without_blocking(tmp_path) -> None:
    import time

    buf = ReplayBuffer.create(tmp_path / "ds", fps=10, cameras={"front": (16, 16)})
    rec = EpisodeRecorder(buf, "front", QualityConfig(mode="refuse"), delay=0.0, queue_size=0)  # nothing fits
    try:
        rec.on_status({"state": RUNNING, "episode": 0, "t_start": 1.0, "control": "policy", "control_since": 1.0})
        for k in range(5):
            rec.add_state(1.0 + k / 10, np.zeros(7))
            rec.add_image("front", 1.0 + k / 10, img(k), arrival=1.0 + k / 10)
        t = time.perf_counter()
        assert rec.poll(2.0) == 0
        assert rec.aligner.report.counts["queue_overflow"] == 5
        rec.on_status({"state": RESET, "episode": 0, "t_start": 1.0, "t_end": 1.45, "control": "teleop",
                       "control_since": 1.45, "label": True, "label_source": "operator", "terminal": True})
        rec.poll(3.0)
        assert time.perf_counter() - t < 1.0  # the caller (ROS executor) never waits on the writer
    finally:
        rec.close()
    assert rec.results[-1]["status"].startswith("refused") and "queue_overflow" in rec.results[-1]["status"]
    assert ReplayReader(tmp_path / "ds", decode_images=False).num_frames == 0
