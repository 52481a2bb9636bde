"""`qvgm check`: static validation of every profile in config/ (and broken copies), and the live checks over
real DDS: the sim graph (`qvgm up sim` in a subprocess) passes for the sim profile AND for the real profile
(the sim node standing in for the robot driver + cameras); a robot graph of real rclpy publishers with a wrong
joint name, a missing camera, no controller subscriber and slow joint states fails with exact messages."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from qvgm_policy_node.check_profile import live_problems, run_check, static_problems
from qvgm_policy_node.cli import main
from qvgm_policy_node.profile import REPO_ROOT, load_profile

PROFILES = ["tabletop_sim", "tabletop_real"] + [
    f"robots/{p.stem}" for p in sorted((REPO_ROOT / "config" / "robots").glob("*.yaml"))]
JOINTS = ["joint_1", "joint_2", "joint_3", "joint_4", "joint_5", "joint_6", "gripper_finger_joint"]


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_is_valid(name: str) -> None:
    assert static_problems(load_profile(name)) == []


def broken(mutate) -> dict[str, Any]:
    prof = copy.deepcopy(load_profile("tabletop_real"))
    mutate(prof)
    return prof


def test_broken_copies_fail_with_exact_messages() -> None:
    cases = [
        (lambda p: p.update(colour="x"), "profile: unknown key 'colour' (known: "),
        (lambda p: p.pop("cameras"), "profile: missing field 'cameras'"),
        (lambda p: p["robot"].pop("urdf"), "robot: missing field 'urdf'"),
        (lambda p: p["robot"].update(joint_names=[*JOINTS[:5], "joint_66", JOINTS[6]]),
         "robot.joint_names: 'joint_66' is not a movable joint of urdf/tabletop_arm.urdf"),
        (lambda p: p["robot"].update(joint_names=[*JOINTS[:5], "tool0_joint", JOINTS[6]]),
         "robot.joint_names: 'tool0_joint' is not a movable joint"),  # fixed joint
        (lambda p: p["robot"]["gripper"].update(interface="action"),
         "robot.gripper.interface: 'action' (GripperActionController"),
        (lambda p: p["robot"]["gripper"].update(joint="finger"), "robot.gripper.joint: 'finger' must be one of"),
        (lambda p: p["nodes"]["wrist"]["parameters"].update(camera_name="hand"),
         "nodes.wrist: a camera node is named after its camera: key 'wrist' needs parameters.camera_name: wrist"),
        (lambda p: p["nodes"]["policy_node"]["parameters"].update(cameras=["front", "side"]),
         "nodes.policy_node.parameters.cameras: 'side' is not in the profile's cameras ['front', 'wrist']"),
        (lambda p: p.update(cameras=["front", "wrist", "side"]),
         "cameras: ['side'] have no camera_node (or sim_node camera) publishing them"),
        (lambda p: p["nodes"]["policy_node"]["parameters"].update(control_hz=10),
         "nodes.policy_node.parameters.control_hz: int 10, policy_node declares it as float"),
        (lambda p: p["nodes"]["policy_node"]["parameters"].update(rate=10.0),
         "nodes.policy_node.parameters: unknown parameter 'rate' for policy_node"),
        (lambda p: p["nodes"]["teleop_node"]["parameters"].update(joint_names=JOINTS[:6]),
         "nodes.teleop_node.parameters.joint_names: "),
        (lambda p: p["nodes"]["wrist"]["parameters"].update(serial_no="000000000001"),
         "camera nodes: 2 RealSense cameras need distinct serial_no values"),
        (lambda p: p["nodes"]["recorder_node"]["parameters"].update(trajectory_topic="/x/joint_trajectory"),
         "nodes.recorder_node.parameters.trajectory_topic: /x/joint_trajectory but the controller listens on"),
        (lambda p: p["nodes"].update(rviz={"executable": "rviz2", "package": "rviz2"}),
         "nodes.rviz: unknown external node rviz2/rviz2"),
        (lambda p: p["nodes"].update(arm={"executable": "arm_driver"}), "nodes.arm: unknown executable 'arm_driver'"),
        (lambda p: p["nodes"]["recorder_node"].update(modes=["record"]),
         "nodes.recorder_node.modes: 'record' is not one of the profile's modes ['collect', 'deploy']"),
        (lambda p: p["dds"].update(ROS_DOMAIN_ID="300"), "dds.ROS_DOMAIN_ID: '300' is not a domain id 0..232"),
        (lambda p: p["dds"].update(ROS_LOCALHOST_ONLY="1"), "dds: unknown variable 'ROS_LOCALHOST_ONLY'"),
        (lambda p: p["robot"].update(controller="scaled_joint_trajectory_controller"),
         "topics.trajectory: /arm_controller/joint_trajectory but robot.controller "
         "'scaled_joint_trajectory_controller' listens on /scaled_joint_trajectory_controller/joint_trajectory"),
    ]
    for mutate, message in cases:
        problems = static_problems(broken(mutate))
        assert any(p.startswith(message) for p in problems), (message, problems)
    ur = copy.deepcopy(load_profile("robots/ur5e"))
    ur["nodes"]["policy_node"]["parameters"]["backend"] = "flow"
    assert static_problems(ur) == [
        "nodes.policy_node.parameters.urdf: backend flow's safety layer reads the limits of ['shoulder_pan_joint', "
        "'shoulder_lift_joint', 'elbow_joint', 'wrist_1_joint', 'wrist_2_joint', 'wrist_3_joint'] from the tabletop "
        "arm URDF, which lacks them: set this arm's URDF"]


def test_cli_static_prints_one_line_per_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prof = broken(lambda p: (p.update(colour="x"), p["robot"].update(joint_state_hz=-1)))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(prof))
    assert main(["check", str(path), "--static"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("profile: unknown key 'colour'")
    assert lines[1] == "robot.joint_state_hz: must be a positive number (Hz)"
    assert main(["check", "real", "--static"]) == 0
    assert capsys.readouterr().out.strip() == "OK: real (static)"
    path.write_text("nodes: [1, 2")
    assert run_check(str(path), static_only=True) == 1
    assert capsys.readouterr().out.startswith(f"qvgm check {path}: ")
    assert main(["check", "no_such_profile", "--static"]) == 1


def test_the_sim_graph_passes_the_sim_and_real_checks() -> None:
    """`qvgm up sim` (subprocess): `qvgm check sim` passes; so does the real profile, whose robot driver and
    cameras the sim node stands in for (same topics, joint names, controller topic)."""
    pytest.importorskip("mujoco")
    sets = ["sim_node.image_width=64", "sim_node.image_height=48", "sim_node.camera_hz=5.0",
            "policy_node.max_image_age=1.0"]
    cmd = [sys.executable, "-m", "qvgm_policy_node.cli", "up", "sim", "--duration", "90"]
    proc = subprocess.Popen(cmd + [x for s in sets for x in ("--set", s)], env=dict(os.environ), cwd=str(REPO_ROOT))
    try:
        from qvgm_policy_node.cli import parse_overrides

        sim = load_profile("sim")
        # rates: >= 30 % of the profile's (the default is 50 %): the sim shares 2 loaded CPU cores here
        assert live_problems(sim, parse_overrides(sets), timeout=45.0, window=2.0, min_rate_fraction=0.3) == []
        real = copy.deepcopy(load_profile("real"))
        real["robot"]["joint_state_hz"] = 50.0  # the sim's rate; real cameras would be 30 fps, the sim's are 5
        assert live_problems(real, {"front": {"fps": 5}, "wrist": {"fps": 5}}, timeout=10.0, window=2.0,
                             min_rate_fraction=0.3) == []
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=20)


class FakeRobot:
    """A robot driver's graph made of real rclpy publishers/subscribers in its own context, spun in a thread:
    /joint_states at `js_hz`, camera image + camera_info for `cameras`, optionally the controller's subscriber."""

    def __init__(self, joint_names: list[str], js_hz: float, cameras: list[str], controller: bool,
                 urdf: str = "") -> None:
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
        from sensor_msgs.msg import CameraInfo, Image, JointState
        from std_msgs.msg import String
        from trajectory_msgs.msg import JointTrajectory

        from qvgm_policy_node.graph import Graph

        self.graph = Graph().__enter__()
        node = self.graph.node("fake_robot_driver")
        js = node.create_publisher(JointState, "/joint_states", 10)

        def pub_js() -> None:
            js.publish(JointState(name=joint_names, position=[0.0] * len(joint_names)))

        node.create_timer(1.0 / js_hz, pub_js)
        for cam in cameras:
            img = node.create_publisher(Image, f"/camera/{cam}/color/image_raw", qos_profile_sensor_data)
            info = node.create_publisher(CameraInfo, f"/camera/{cam}/color/camera_info", 10)

            def pub_cam(img=img, info=info) -> None:
                img.publish(Image(height=2, width=2, encoding="rgb8", step=6, data=bytes(12)))
                info.publish(CameraInfo(height=2, width=2))

            node.create_timer(0.1, pub_cam)
        # the policy node's publisher: the topic exists whether or not the controller listens
        node.create_publisher(JointTrajectory, "/arm_controller/joint_trajectory", 10)
        if urdf:  # what robot_state_publisher latches
            latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                                 durability=DurabilityPolicy.TRANSIENT_LOCAL)
            self._desc = node.create_publisher(String, "/robot_description", latched)
            self._desc.publish(String(data=urdf))
        if controller:
            node.create_subscription(JointTrajectory, "/arm_controller/joint_trajectory", lambda m: None, 10)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        while not self._stop.is_set():
            self.graph.spin_once(0.01)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.graph.close()


def real_profile_for_fake() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    prof = copy.deepcopy(load_profile("real"))
    prof["robot"]["joint_state_hz"] = 20.0
    return prof, {"front": {"fps": 10}, "wrist": {"fps": 10}}


def test_a_good_fake_robot_passes() -> None:
    pytest.importorskip("rclpy")
    urdf = (REPO_ROOT / "urdf/tabletop_arm.urdf").read_text()
    robot = FakeRobot(JOINTS, 20.0, ["front", "wrist"], controller=True, urdf=urdf)
    try:
        prof, overrides = real_profile_for_fake()
        assert live_problems(prof, overrides, timeout=10.0, window=1.5) == []
    finally:
        robot.close()


def test_a_broken_robot_graph_fails_with_exact_messages() -> None:
    pytest.importorskip("rclpy")
    wrong = [*JOINTS[:5], "joint_six", JOINTS[6]]
    urdf = (REPO_ROOT / "urdf/tabletop_arm.urdf").read_text().replace('name="joint_6"', 'name="joint_six"')
    robot = FakeRobot(wrong, 4.0, ["front"], controller=False, urdf=urdf)
    try:
        prof, overrides = real_profile_for_fake()
        problems = live_problems(prof, overrides, timeout=3.0, window=1.5)
    finally:
        robot.close()
    assert problems[:3] == [
        "/arm_controller/joint_trajectory: no subscriber (is the JointTrajectoryController 'arm_controller' "
        "loaded and active?)",
        "/camera/wrist/color/image_raw: missing (no publisher or subscriber of sensor_msgs/msg/Image)",
        "/camera/wrist/color/camera_info: missing (no publisher or subscriber of sensor_msgs/msg/CameraInfo)",
    ], problems
    assert problems[3] == (f"/joint_states: joints ['joint_6'] of the profile are not published (published: "
                           f"{wrong})")
    assert re.fullmatch(r"/joint_states: [0-9.]+ Hz, expected >= 10\.0 Hz \(profile: 20\.0 Hz\)", problems[4])
    assert problems[5].startswith("/robot_description: joints ['joint_6'] of the profile are not movable joints of "
                                  "the robot's URDF (has ['joint_1', "), problems
    assert len(problems) == 6, problems
