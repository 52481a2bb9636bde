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
    for node, spec in zip(nodes, specs, strict=True):
        assert node._Node__parameters[0] == spec.parameters
