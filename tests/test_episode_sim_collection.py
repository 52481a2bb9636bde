"""Unattended collection through ROS 2: sim_node + the expert policy_node (profile tabletop_sim) + episode_manager
(sim mode: auto labels from /qvgm/sim/success, resets through /sim_node/reset, auto start) + recorder_node.
The episodes land in the buffer labelled, with actions from the executed chunks and the last frame terminal only
on success."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytest.importorskip("mujoco")

from rclpy.parameter import Parameter  # noqa: E402
from std_srvs.srv import SetBool  # noqa: E402

from qvgm.data import ReplayReader  # noqa: E402
from qvgm_policy_node.episode_manager import EpisodeManager  # noqa: E402
from qvgm_policy_node.graph import Graph  # noqa: E402
from qvgm_policy_node.profile import load_profile, node_specs  # noqa: E402
from qvgm_policy_node.recorder_node import RecorderNode  # noqa: E402

LIGHT = {"sim_node": {"cameras": ["front"], "image_width": 64, "image_height": 48, "camera_hz": 5.0, "task": "push"},
         "policy_node": {"cameras": ["front"], "max_image_age": 1.0}}


def params(**kw: object) -> list[Parameter]:
    return [Parameter(k, value=v) for k, v in kw.items()]


def test_sim_collects_labelled_episodes_unattended(tmp_path) -> None:
    root = str(tmp_path / "buffer")
    with Graph(node_specs(load_profile("tabletop_sim"), LIGHT)) as g:
        rec = g.add(RecorderNode(context=g.context, parameter_overrides=params(
            root=root, fps=5, cameras=["front"], reference_camera="front", image_height=48, image_width=64,
            max_age=0.25, max_latency=1.0, align_delay=0.2)))
        g.add(EpisodeManager(context=g.context, parameter_overrides=params(
            time_limit=6.0, sim=True, sim_reset_service="/sim_node/reset", auto_start=True, auto_label_timeout=True)))
        # operator takeover for ~1 s in the first episode (through the real service): those frames are flagged
        takeover = g.node("operator").create_client(SetBool, "/qvgm/episode/takeover")
        assert g.spin_until(lambda: rec.core.episode == 0 and rec.core.frames_queued >= 3, timeout=30.0)
        assert g.call(takeover, SetBool.Request(data=True)).success
        g.spin_for(1.0)
        assert g.call(takeover, SetBool.Request(data=False)).success
        assert g.spin_until(lambda: len(rec.core.results) >= 2, timeout=60.0), rec.core.results
        results = list(rec.core.results)
    assert [r["status"] for r in results[:2]] == ["committed", "committed"], results
    r = ReplayReader(root, decode_images=False, include_discarded=True)
    assert len(r.episodes) >= 2
    for e, row in enumerate(r.episodes[:2]):
        s, t = int(r.ep_start[e]), int(r.ep_end[e])
        assert row["label_source"] == "auto" and row["success"] in (True, False)
        assert t - s >= 5  # at 5 fps, at least a second of data
        stamps = r.stamp[s:t]
        assert np.all(np.diff(stamps) > 0.1)  # one frame per camera image at 5 Hz, in order
        assert np.all(np.isfinite(r.state[s:t])) and np.all(np.isfinite(r.action[s:t]))
        n_int = int(r.is_intervention[s:t].sum())
        if e == 0:  # ~1 s of takeover at 5 fps
            assert 3 <= n_int <= 7 and row["num_intervention_frames"] == n_int, n_int
            assert set(r.policy_version[s:t][r.is_intervention[s:t]]) == {"teleop"}
        else:
            assert n_int == 0
        notes = json.loads(row["notes"])["recorder"]
        assert notes["end_reason"] in ("success", "timeout")
        # the expert's chunks move the arm: actions are not just the held state
        assert np.abs(r.action[s:t] - r.state[s:t]).max() > 1e-3
        if row["success"]:
            assert r.done[t - 1] and r.reward[t - 1] == 1.0 and r.reward[s:t - 1].sum() == 0
        else:
            assert not r.done[s:t].any() and r.reward[s:t].sum() == 0  # timeout = truncation, not terminal
