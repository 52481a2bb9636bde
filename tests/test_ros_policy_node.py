"""policy_node over real DDS: observation assembly, per-stream max age (stale -> no chunk), chunk format."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("rclpy")
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rcl_interfaces.msg import SetParametersResult  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import Image, JointState  # noqa: E402
from std_msgs.msg import String  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

from qvgm_policy_node import topics  # noqa: E402
from qvgm_policy_node.graph import Graph  # noqa: E402
from qvgm_policy_node.policy_node import image_to_array  # noqa: E402
from qvgm_policy_node.profile import NodeSpec  # noqa: E402
from qvgm_policy_node.sim_node import TRANSIENT_LOCAL, from_time_msg  # noqa: E402

NAMES = ["joint_1", "joint_2", "joint_3", "joint_4", "joint_5", "joint_6", "gripper_finger_joint"]


def make_image(h: int = 8, w: int = 6, encoding: str = "rgb8") -> Image:
    img = (np.arange(h * w * 3) % 251).astype(np.uint8).reshape(h, w, 3)
    return Image(height=h, width=w, encoding=encoding, step=w * 3, data=img.tobytes())


def test_image_to_array_roundtrip_and_errors() -> None:
    msg = make_image()
    arr = image_to_array(msg)
    assert arr.shape == (8, 6, 3) and arr.dtype == np.uint8 and arr[0, 1, 2] == 5
    with pytest.raises(ValueError):
        image_to_array(make_image(encoding="bgr8"))
    bad = make_image()
    bad.height = 9
    with pytest.raises(ValueError):
        image_to_array(bad)


def test_policy_node_publishes_chunks_only_with_fresh_observations() -> None:
    params = {"backend": "hold", "control_hz": 20.0, "chunk_dt": 0.1, "horizon": 5, "cameras": ["cam_a"],
              "max_state_age": 0.3, "max_image_age": 0.3}
    chunks: list[JointTrajectory] = []
    with Graph([NodeSpec("policy_node", "policy_node", params)]) as g:
        policy = g.nodes["policy_node"]
        io = g.node("policy_test_io")
        io.create_subscription(JointTrajectory, topics.TRAJECTORY, chunks.append, 10)
        pub_js = io.create_publisher(JointState, topics.JOINT_STATES, 10)
        pub_img = io.create_publisher(Image, topics.camera_image("cam_a"), 10)
        pub_task = io.create_publisher(String, topics.TASK, TRANSIENT_LOCAL)
        q = np.linspace(-0.3, 0.3, 7)

        def publish_js(names=NAMES, pos=q):
            msg = JointState(name=list(names), position=[float(x) for x in pos])
            msg.header.stamp = io.get_clock().now().to_msg()
            pub_js.publish(msg)
            return msg

        # state + task but no image: nothing goes out
        pub_task.publish(String(data="pick the red cube"))
        for _ in range(10):
            publish_js()
            g.spin_for(0.05)
        assert not chunks and policy.skipped["no_image.cam_a"] > 0

        # bad messages are ignored, counted, and the node lives on
        pub_img.publish(make_image(encoding="bgr8"))
        publish_js(names=NAMES[:3], pos=q[:3])
        publish_js(pos=np.full(7, np.nan))
        g.spin_for(0.2)
        assert policy.skipped["bad_image"] >= 1 and policy.skipped["bad_joint_state"] >= 2
        assert not chunks

        # all streams fresh: chunks of H copies of the (reordered) state, stamped with the observation time
        last = None
        for _ in range(10):
            pub_img.publish(make_image())
            last = publish_js(names=NAMES[::-1], pos=q[::-1])
            g.spin_for(0.05)
        assert g.spin_until(lambda: len(chunks) >= 3, timeout=5.0)
        msg = chunks[-1]
        assert msg.joint_names == NAMES and len(msg.points) == 5
        np.testing.assert_allclose(msg.points[3].positions, q)
        tfs = [p.time_from_start.sec + p.time_from_start.nanosec * 1e-9 for p in msg.points]
        np.testing.assert_allclose(tfs, [0.0, 0.1, 0.2, 0.3, 0.4])
        assert from_time_msg(msg.header.stamp) <= from_time_msg(last.header.stamp)
        assert from_time_msg(msg.header.stamp) > 0

        # joint states stop: after max_state_age no more chunks (the robot holds its last trajectory)
        g.spin_for(0.5)
        n = len(chunks)
        g.spin_for(0.5)
        assert len(chunks) == n and policy.skipped["stale_state"] > 0
        # the skip reasons are counted in /diagnostics
        diag: list[DiagnosticArray] = []
        io.create_subscription(DiagnosticArray, topics.DIAGNOSTICS, diag.append, 10)
        assert g.spin_until(lambda: any(st.name == "qvgm/policy_node" for d in diag for st in d.status), 5)
        status = next(st for d in diag for st in d.status if st.name == "qvgm/policy_node")
        values = {kv.key: kv.value for kv in status.values}
        assert int(values["skipped.stale_state"]) > 0 and int(values["published_chunks"]) >= 3
        assert values["backend"] == "hold"


def test_unknown_backend_is_a_clear_error() -> None:
    from qvgm_policy_node.backends import backend_names

    assert {"expert", "hold"} <= set(backend_names())
    with pytest.raises(ValueError, match="unknown policy backend 'pi0'"):
        with Graph([NodeSpec("policy_node", "policy_node", {"backend": "pi0"})]):
            pass


def save_tiny_checkpoint(path) -> None:
    """A tiny, untrained `state` FlowPolicy (7 joints, horizon 6) saved as a real checkpoint directory, v-test."""
    import torch

    from qvgm.policy import NormStats, make_policy, save_policy

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    stats = NormStats.compute(rng.normal(size=(64, 7)), rng.normal(size=(64, 7)) * 0.1)
    save_policy(make_policy("state", stats, state_dim=7, real_action_dim=7, horizon=6, hidden=32, embed_dim=16,
                            head_hidden=32, head_depth=1), path, version="v-test")


def test_flow_backend_from_a_checkpoint_publishes_chunks(tmp_path) -> None:
    """The learned-policy path: a (tiny, untrained) `state` FlowPolicy saved as a real checkpoint directory,
    loaded by policy_node's `flow` backend, chunks published over DDS."""
    pytest.importorskip("torch")
    save_tiny_checkpoint(tmp_path / "ckpt")
    params = {"backend": "flow", "checkpoint": str(tmp_path / "ckpt"), "num_steps": 3, "seed": 0,
              "cameras": [], "control_hz": 20.0}
    chunks: list[JointTrajectory] = []
    with Graph([NodeSpec("policy_node", "policy_node", params)]) as g:
        policy = g.nodes["policy_node"]
        assert policy.backend.name == "flow" and not policy.needs_objects
        io = g.node("flow_test_io")
        io.create_subscription(JointTrajectory, topics.TRAJECTORY, chunks.append, 10)
        pub_js = io.create_publisher(JointState, topics.JOINT_STATES, 10)
        pub_task = io.create_publisher(String, topics.TASK, TRANSIENT_LOCAL)
        pub_task.publish(String(data="push the red cube onto the target"))
        for _ in range(40):
            msg = JointState(name=NAMES, position=[0.1] * 7)
            msg.header.stamp = io.get_clock().now().to_msg()
            pub_js.publish(msg)
            g.spin_for(0.03)
            if len(chunks) >= 2:
                break
        assert len(chunks) >= 2, dict(policy.skipped)
        pos = np.array([p.positions for p in chunks[-1].points])
        assert pos.shape == (6, 7) and np.all(np.isfinite(pos)) and chunks[-1].joint_names == NAMES
        assert policy.last_chunk.version == "v-test"
    with pytest.raises(ValueError, match="checkpoint"):
        with Graph([NodeSpec("policy_node", "policy_node", {"backend": "flow"})]):
            pass


def test_flow_backend_noise_scale_parameter(tmp_path) -> None:
    """The policy node's `noise_scale` reaches the flow backend: at 0 the same observation gives the same chunk
    whatever the torch RNG holds (deterministic sampling); a negative scale stops the node at start-up with a
    message naming it."""
    torch = pytest.importorskip("torch")
    save_tiny_checkpoint(tmp_path / "ckpt")
    params = {"backend": "flow", "checkpoint": str(tmp_path / "ckpt"), "num_steps": 3, "cameras": [],
              "noise_scale": 0.0}
    obs = {"state": np.full(7, 0.1, np.float32), "prompt": "push", "stamp": 0.0}
    with Graph([NodeSpec("policy_node", "policy_node", params)]) as g:
        backend = g.nodes["policy_node"].backend
        assert backend.noise_scale == 0.0
        torch.manual_seed(1)
        first = backend.infer(obs).positions
        torch.manual_seed(2)
        np.testing.assert_array_equal(backend.infer(obs).positions, first)
    with Graph([NodeSpec("policy_node", "policy_node", {**params, "noise_scale": 1.0})]) as g:
        backend = g.nodes["policy_node"].backend
        torch.manual_seed(1)
        a = backend.infer(obs).positions
        torch.manual_seed(2)
        assert not np.allclose(backend.infer(obs).positions, a)  # unseeded sampling noise at scale 1
        # changed at run time through the parameter service (`ros2 param set /policy_node noise_scale 0.0`)
        client = g.node("noise_param_io").create_client(SetParameters, "/policy_node/set_parameters")

        def set_scale(value: float) -> SetParametersResult:
            req = SetParameters.Request(parameters=[Parameter("noise_scale", value=value).to_parameter_msg()])
            return g.call(client, req).results[0]

        assert set_scale(0.0).successful and backend.noise_scale == 0.0
        torch.manual_seed(1)
        np.testing.assert_array_equal(backend.infer(obs).positions, first)  # the deterministic chunk again
        bad = set_scale(-1.0)
        assert not bad.successful and "noise scale" in bad.reason and backend.noise_scale == 0.0
        assert g.nodes["policy_node"].get_parameter("noise_scale").value == 0.0  # the refused value is not kept
    with pytest.raises(ValueError, match="noise scale"):
        with Graph([NodeSpec("policy_node", "policy_node", {**params, "noise_scale": -0.5})]):
            pass
