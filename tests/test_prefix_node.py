"""policy_node boundary_mode=inpaint over real DDS: the next chunk is inpainted on the committed prefix of the
published one, so the raw joint jump at chunk boundaries vanishes (vs. blend mode on the same checkpoint)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("rclpy")
torch = pytest.importorskip("torch")

from test_policy_node import Robot, checkpoint, params  # noqa: E402

from qvgm_policy_node.graph import Graph  # noqa: E402
from qvgm_policy_node.profile import NodeSpec  # noqa: E402

torch.set_num_threads(1)


def run_mode(ckpt: Path, **extra: object) -> tuple[list[float], list[float], int]:
    with Graph([NodeSpec("policy_node", "policy_node", params(ckpt, blend_steps=0, **extra))]) as g:
        policy = g.nodes["policy_node"]
        robot = Robot(g)
        robot.run(1.5)
        return list(policy.jumps_raw), list(policy.jumps_blended), policy.published


def test_inpaint_removes_the_boundary_jump(tmp_path: Path) -> None:
    ckpt = checkpoint(tmp_path / "ckpt")
    raw_b, _, n_b = run_mode(ckpt, boundary_mode="blend")
    raw_i, pub_i, n_i = run_mode(ckpt, boundary_mode="inpaint", inpaint_steps=3)
    assert n_b >= 3 and n_i >= 3 and len(raw_b) >= 2 and len(raw_i) >= 2
    assert max(raw_b) > 1e-3  # the untrained policy jumps between independent chunks
    assert max(raw_i) < 1e-4 and max(pub_i) < 1e-4  # rad: float32 normalisation round trip only
    raw_e, _, _ = run_mode(ckpt, boundary_mode="inpaint", inpaint_steps=2, inpaint_weights="exp")
    assert len(raw_e) >= 2 and max(raw_e) < 1e-4
