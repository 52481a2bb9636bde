"""The real-robot profiles: launch file and `qvgm up` describe the same graph (node list, names, parameters,
remappings); parameters match the nodes' declarations; `qvgm up` instantiates the real graph in-process."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from qvgm_policy_node.check_profile import NODE_DEFAULTS, node_defaults
from qvgm_policy_node.cli import NODE_CLASSES
from qvgm_policy_node.profile import (
    DEFAULT_TRAJECTORY,
    REPO_ROOT,
    launch_parameters,
    load_profile,
    node_specs,
    resolve_profile,
    ros_params_yaml,
)

PROFILES = ["tabletop_sim", "tabletop_real"] + [
    f"robots/{p.stem}" for p in sorted((REPO_ROOT / "config" / "robots").glob("*.yaml"))]


def load_launch_module():
    spec = importlib.util.spec_from_file_location("tabletop_launch", REPO_ROOT / "launch" / "tabletop.launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_aliases() -> None:
    assert resolve_profile("real") == resolve_profile("tabletop_real") == REPO_ROOT / "config/tabletop_real.yaml"
    assert resolve_profile("sim") == REPO_ROOT / "config/tabletop_sim.yaml"
    assert load_profile("real") == load_profile("tabletop_real")
    with pytest.raises(FileNotFoundError):
        resolve_profile("no_such_profile")
    assert len(PROFILES) >= 5  # sim, real, ur5e, fr3, xarm6


def test_real_profile_graph() -> None:
    launch = load_launch_module()
    specs = node_specs(load_profile("tabletop_real"))
    assert launch.describe("real") == launch.describe("tabletop_real") == specs
    assert [s.name for s in specs] == ["front", "wrist", "robot_state_publisher", "policy_node", "recorder_node",
                                       "episode_manager", "teleop_node"]
    by = {s.name: s for s in specs}
    for cam in ("front", "wrist"):
        assert (by[cam].executable, by[cam].namespace, by[cam].parameters["camera_name"]) == ("camera_node",
                                                                                             "camera", cam)
    rsp = by["robot_state_publisher"]
    assert rsp.external and rsp.package == "robot_state_publisher"
    desc = launch_parameters(rsp, load_profile("real"))["robot_description"]
    assert desc == (REPO_ROOT / "urdf/tabletop_arm.urdf").read_text() and "<robot" in desc
    assert all(not s.remappings for s in specs)  # arm_controller is the stack's default topic
    assert all(s.executable in NODE_CLASSES for s in specs if not s.external)
    params = ros_params_yaml(specs)
    assert "/camera/front:" in params and "policy_node:" in params


@pytest.mark.parametrize("name", ["tabletop_real", "robots/ur5e", "robots/fr3", "robots/xarm6"])
def test_modes(name: str) -> None:
    launch = load_launch_module()
    prof = load_profile(name)
    everything = [s.name for s in node_specs(prof)]
    assert [s.name for s in node_specs(prof, mode="collect")] == everything
    assert launch.describe(name, mode="deploy") == node_specs(prof, mode="deploy")
    deploy = [s.name for s in node_specs(prof, mode="deploy")]
    assert [n for n in everything if n not in deploy] == ["recorder_node", "episode_manager", "teleop_node"]
    assert "policy_node" in deploy and "front" in deploy and "wrist" in deploy
    with pytest.raises(ValueError, match="mode 'teleop' is not one of the profile's modes"):
        node_specs(prof, mode="teleop")


@pytest.mark.parametrize("name", PROFILES)
def test_profile_parameters_match_node_declarations(name: str) -> None:
    for spec in node_specs(load_profile(name)):
        if spec.external:
            continue
        defaults = node_defaults(spec.executable)
        assert set(spec.parameters) <= set(defaults), (name, spec.name, set(spec.parameters) - set(defaults))
        for key, value in spec.parameters.items():
            assert type(value) is type(defaults[key]), (name, spec.name, key)  # rclpy rejects type changes
    assert set(NODE_DEFAULTS) <= set(NODE_CLASSES)


def test_controller_remapping() -> None:
    specs = {s.name: s for s in node_specs(load_profile("robots/ur5e"))}
    traj = "/scaled_joint_trajectory_controller/joint_trajectory"
    assert specs["policy_node"].remappings == ((DEFAULT_TRAJECTORY, traj),)
    assert specs["policy_node"].ros_args() == ["--ros-args", "-r", f"{DEFAULT_TRAJECTORY}:={traj}"]
    assert specs["teleop_node"].parameters["trajectory_topic"] == traj


def test_launch_file_builds_real_launch_ros_nodes() -> None:
    pytest.importorskip("launch_ros")
    from launch import LaunchContext

    launch = load_launch_module()
    context = LaunchContext()
    for entity in launch.generate_launch_description().entities:
        entity.visit(context)  # declares profile and mode with their defaults
    context.launch_configurations["profile"] = "real"
    nodes = launch._nodes(context)
    specs = node_specs(load_profile("real"))
    assert [n.node_executable for n in nodes] == [s.executable for s in specs]
    assert [n.node_package for n in nodes] == [s.package for s in specs]


def test_qvgm_up_instantiates_the_real_graph(tmp_path: Path) -> None:
    """The real profile's qvgm nodes in one process (no hardware: the cameras retry a missing device), with
    the controller remapping of the UR5e profile applied to the policy node's publisher."""
    pytest.importorskip("rclpy")
    from qvgm_policy_node.graph import Graph

    missing = str(tmp_path / "no_camera.mp4")
    cam = {"backend": "opencv", "device": missing, "reconnect_period_s": 1.0}
    overrides = {"front": cam, "wrist": cam, "recorder_node": {"root": str(tmp_path / "buffer")},
                 "policy_node": {"device": "cpu"}}
    specs = node_specs(load_profile("robots/ur5e"), overrides)
    with Graph([s for s in specs if not s.external]) as g:
        names = {(n.get_namespace(), n.get_name()) for n in g.nodes.values()}
        assert names == {("/camera", "front"), ("/camera", "wrist"), ("/", "policy_node"), ("/", "recorder_node"),
                         ("/", "episode_manager"), ("/", "teleop_node")}
        io = g.node("real_graph_probe")
        traj = "/scaled_joint_trajectory_controller/joint_trajectory"
        assert g.spin_until(lambda: io.count_publishers(traj) >= 2, 10.0), io.count_publishers(traj)
        assert io.count_publishers(DEFAULT_TRAJECTORY) == 0  # policy and teleop both remapped
        assert g.nodes["policy_node"].get_parameter("joint_names").value[0] == "shoulder_pan_joint"


def test_qvgm_up_real_skips_robot_state_publisher(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("rclpy")
    from qvgm_policy_node.cli import main

    missing = str(tmp_path / "no_camera.mp4")
    sets = ["front.backend=opencv", f"front.device={missing}", "wrist.backend=opencv", f"wrist.device={missing}",
            f"recorder_node.root={tmp_path / 'buffer'}", "policy_node.device=cpu"]
    assert main(["up", "real", "--duration", "0.5", *[x for s in sets for x in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    assert "qvgm up real: skipping robot_state_publisher (robot_state_publisher/robot_state_publisher is not a " \
           "Python node" in out
    assert "nodes ['front', 'wrist', 'policy_node', 'recorder_node', 'episode_manager', 'teleop_node']" in out


def test_real_profile_as_separate_processes(tmp_path: Path) -> None:
    """What `ros2 launch ... profile:=robots/ur5e` does without launch: a camera node and the policy node as
    their own processes, parameters from ros_params_yaml, node name/namespace and the controller remapping as
    ROS arguments; the graph shows /camera/front and the policy's chunks go to the UR controller's topic."""
    pytest.importorskip("rclpy")
    import os
    import subprocess
    import sys

    from qvgm_policy_node.graph import Graph

    missing = str(tmp_path / "no_camera.mp4")
    overrides = {"front": {"backend": "opencv", "device": missing}, "policy_node": {"device": "cpu"}}
    specs = {s.name: s for s in node_specs(load_profile("robots/ur5e"), overrides)}
    params = tmp_path / "params.yaml"
    params.write_text(ros_params_yaml(list(specs.values())))
    procs = []
    for name in ("front", "policy_node"):
        s = specs[name]
        args = ["--ros-args", "-r", f"__node:={s.name}", "--params-file", str(params)]
        if s.namespace:
            args += ["-r", f"__ns:=/{s.namespace}"]
        procs.append(subprocess.Popen([sys.executable, "-m", f"qvgm_policy_node.{s.executable}", *args,
                                       *s.ros_args()], env=dict(os.environ), cwd=str(REPO_ROOT)))
    traj = "/scaled_joint_trajectory_controller/joint_trajectory"
    try:
        with Graph() as g:
            io = g.node("separate_real_probe")

            def nodes() -> set[tuple[str, str]]:
                return {(ns, n) for n, ns in io.get_node_names_and_namespaces()}

            assert g.spin_until(lambda: {("/camera", "front"), ("/", "policy_node")} <= nodes()
                                and io.count_publishers(traj) == 1, 40.0), (nodes(), [p.poll() for p in procs])
            assert io.count_publishers("/camera/front/color/image_raw") == 1  # camera_name from the params file
            assert io.count_publishers(DEFAULT_TRAJECTORY) == 0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=20)
