"""Bring-up: the profile, `qvgm up` and the launch file describe the same graph."""

from __future__ import annotations

import importlib.util

import pytest

from qvgm_policy_node import topics
from qvgm_policy_node.cli import NODE_CLASSES, parse_overrides
from qvgm_policy_node.profile import REPO_ROOT, load_profile, node_specs


def load_launch_module():
    spec = importlib.util.spec_from_file_location("tabletop_launch", REPO_ROOT / "launch" / "tabletop.launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launch_and_cli_describe_the_same_graph() -> None:
    launch = load_launch_module()
    specs = node_specs(load_profile("tabletop_sim"))
    assert launch.describe("tabletop_sim") == specs
    assert [s.name for s in specs] == ["sim_node", "policy_node"]
    for spec in specs:
        assert spec.executable in NODE_CLASSES  # `qvgm up` can instantiate every node in-process


def test_profile_parameters_match_node_declarations() -> None:
    from qvgm_policy_node import policy_node, sim_node

    specs = {s.name: s for s in node_specs(load_profile("tabletop_sim"))}
    assert set(specs["sim_node"].parameters) == set(sim_node.DEFAULTS)
    assert set(specs["policy_node"].parameters) == set(policy_node.DEFAULTS)
    for name, defaults in (("sim_node", sim_node.DEFAULTS), ("policy_node", policy_node.DEFAULTS)):
        for key, value in specs[name].parameters.items():
            assert type(value) is type(defaults[key]), (name, key)  # rclpy rejects type changes


def test_profile_topics_are_the_ones_the_nodes_use() -> None:
    prof = load_profile("tabletop_sim")
    t = prof["topics"]
    assert (t["joint_states"], t["trajectory"], t["task"], t["success"], t["objects"], t["diagnostics"]) == (
        topics.JOINT_STATES, topics.TRAJECTORY, topics.TASK, topics.SUCCESS, topics.OBJECTS, topics.DIAGNOSTICS)
    for cam in prof["cameras"]:
        assert t["camera_image"].format(name=cam) == topics.camera_image(cam)
        assert t["camera_info"].format(name=cam) == topics.camera_info(cam)


def test_overrides() -> None:
    ov = parse_overrides(["sim_node.seed=3", "policy_node.cameras=[front]"])
    assert ov == {"sim_node": {"seed": 3}, "policy_node": {"cameras": ["front"]}}
    specs = {s.name: s for s in node_specs(load_profile("tabletop_sim"), ov)}
    assert specs["sim_node"].parameters["seed"] == 3 and specs["policy_node"].parameters["cameras"] == ["front"]
    with pytest.raises(ValueError):
        parse_overrides(["seed=3"])
    with pytest.raises(ValueError):
        node_specs(load_profile("tabletop_sim"), {"nope": {}})


def test_launch_file_builds_launch_ros_nodes() -> None:
    pytest.importorskip("launch_ros")
    from launch_ros.actions import Node

    from launch import LaunchContext

    launch = load_launch_module()
    ld = launch.generate_launch_description()
    context = LaunchContext()
    for entity in ld.entities:
        entity.visit(context)  # declares the profile argument with its default
    nodes = launch._nodes(context)
    specs = node_specs(load_profile("tabletop_sim"))
    assert all(isinstance(n, Node) for n in nodes)
    assert [n.node_executable for n in nodes] == [s.executable for s in specs]
    from launch_ros.utilities import evaluate_parameters

    def plain(params: dict) -> dict:
        return {str(k): list(v) if isinstance(v, list | tuple) else v for k, v in params.items()}

    for node, spec in zip(nodes, specs, strict=True):
        evaluated = evaluate_parameters(context, node._Node__parameters)  # what the node process would get
        assert len(evaluated) == 1 and plain(evaluated[0]) == plain(spec.parameters)


def test_qvgm_up_runs_the_graph_in_one_process() -> None:
    """`qvgm up tabletop_sim` in a subprocess; this process sees its topics over DDS (loopback, same domain)."""
    pytest.importorskip("rclpy")
    pytest.importorskip("mujoco")
    import os
    import subprocess
    import sys

    from sensor_msgs.msg import JointState
    from std_msgs.msg import String
    from trajectory_msgs.msg import JointTrajectory

    from qvgm_policy_node.graph import Graph
    from qvgm_policy_node.sim_node import TRANSIENT_LOCAL

    cmd = [sys.executable, "-m", "qvgm_policy_node.cli", "up", "tabletop_sim", "--duration", "60",
           "--set", "sim_node.cameras=[front]", "--set", "sim_node.image_width=64",
           "--set", "sim_node.image_height=48", "--set", "sim_node.camera_hz=5.0",
           "--set", "policy_node.cameras=[front]", "--set", "policy_node.max_image_age=1.0"]
    proc = subprocess.Popen(cmd, env=dict(os.environ), cwd=str(REPO_ROOT))
    js: list[JointState] = []
    prompts: list[String] = []
    chunks: list[JointTrajectory] = []
    try:
        with Graph() as g:
            io = g.node("qvgm_up_test_io")
            io.create_subscription(JointState, topics.JOINT_STATES, js.append, 10)
            io.create_subscription(String, topics.TASK, prompts.append, TRANSIENT_LOCAL)
            io.create_subscription(JointTrajectory, topics.TRAJECTORY, chunks.append, 10)
            assert g.spin_until(lambda: len(js) >= 10 and prompts and len(chunks) >= 3, 45.0), (
                len(js), len(prompts), len(chunks), proc.poll())
            def names() -> set[str]:
                return {n for n, _ns in io.get_node_names_and_namespaces()}

            assert g.spin_until(lambda: {"sim_node", "policy_node"} <= names(), 15.0), names()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert "pick" in prompts[-1].data and len(chunks[-1].points) == 10


def test_executables_run_the_profile_as_separate_processes(tmp_path) -> None:
    """What `ros2 launch` does without launch: each node its own process, parameters from the profile
    (as a --params-file); the graph works across processes over DDS."""
    pytest.importorskip("rclpy")
    pytest.importorskip("mujoco")
    import os
    import subprocess
    import sys

    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image, JointState
    from trajectory_msgs.msg import JointTrajectory

    from qvgm_policy_node.graph import Graph
    from qvgm_policy_node.profile import ros_params_yaml

    overrides = {"sim_node": {"cameras": ["front"], "image_width": 64, "image_height": 48, "camera_hz": 5.0},
                 "policy_node": {"cameras": ["front"], "max_image_age": 1.0}}
    specs = node_specs(load_profile("tabletop_sim"), overrides)
    params = tmp_path / "params.yaml"
    params.write_text(ros_params_yaml(specs))
    procs = [subprocess.Popen([sys.executable, "-m", f"qvgm_policy_node.{s.executable}", "--ros-args",
                               "-r", f"__node:={s.name}", "--params-file", str(params)],
                              env=dict(os.environ), cwd=str(REPO_ROOT)) for s in specs]
    js: list[JointState] = []
    chunks: list[JointTrajectory] = []
    images: list[Image] = []
    try:
        with Graph() as g:
            io = g.node("exec_test_io")
            io.create_subscription(JointState, topics.JOINT_STATES, js.append, 10)
            io.create_subscription(JointTrajectory, topics.TRAJECTORY, chunks.append, 10)
            io.create_subscription(Image, topics.camera_image("front"), images.append, qos_profile_sensor_data)
            assert g.spin_until(lambda: len(js) >= 10 and len(chunks) >= 3 and images, 45.0), (
                len(js), len(chunks), [p.poll() for p in procs])
            # the params file took effect: 64x48 images, no wrist camera publisher
            assert (images[-1].width, images[-1].height) == (64, 48)
            assert io.count_publishers(topics.camera_image("wrist")) == 0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=20)
    assert len(chunks[-1].points) == specs[1].parameters["horizon"]
