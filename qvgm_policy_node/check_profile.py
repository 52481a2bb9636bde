"""`qvgm check PROFILE`: validate a bring-up profile statically (schema, URDF, consistency between nodes) and
against a LIVE ROS graph (topics and types, /joint_states joint names, rates, controller subscriber,
camera_info). Every problem is one line of plain text; no problems = OK.

`static_problems(profile)` needs no ROS; `live_problems(profile, ...)` spins its own rclpy context.
Rates are wall-clock receive rates (Hz) over a measuring window (s).
"""

from __future__ import annotations

import importlib
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import yaml

from qvgm_policy_node.profile import (
    DEFAULT_TRAJECTORY,
    load_profile,
    node_specs,
    package_file,
    trajectory_topic,
)

TOP_KEYS = {"profile", "description", "robot", "cameras", "topics", "nodes", "dds", "modes"}
REQUIRED_TOP = ("profile", "robot", "cameras", "nodes")
ROBOT_KEYS = {"urdf", "joint_names", "controller", "gripper", "joint_state_hz", "name"}
GRIPPER_KEYS = {"interface", "joint", "action"}
GRIPPER_INTERFACES = ("joint", "action", "none")
DDS_KEYS = {"ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_STATIC_PEERS", "RMW_IMPLEMENTATION",
            "CYCLONEDDS_URI", "FASTRTPS_DEFAULT_PROFILES_FILE", "ZENOH_ROUTER_CONFIG_URI"}
DISCOVERY_RANGES = ("SUBNET", "LOCALHOST", "OFF", "SYSTEM_DEFAULT")
NODE_KEYS = {"executable", "package", "namespace", "parameters", "modes"}
TOPIC_KEYS = {"joint_states", "trajectory", "task", "success", "objects", "diagnostics", "camera_image",
              "camera_info", "joy", "robot_description", "estop", "policy_version", "policy_enable"}
# executable -> module holding its parameter defaults (DEFAULTS or PARAMETERS)
NODE_DEFAULTS = {
    "sim_node": "qvgm_policy_node.sim_node:DEFAULTS",
    "policy_node": "qvgm_policy_node.policy_node:DEFAULTS",
    "recorder_node": "qvgm_policy_node.recorder_node:DEFAULTS",
    "episode_manager": "qvgm_policy_node.episode_manager:DEFAULTS",
    "teleop_node": "qvgm_policy_node.teleop_node:DEFAULTS",
    "camera_node": "qvgm_policy_node.camera_node:PARAMETERS",
}
EXTERNAL_NODES = {("robot_state_publisher", "robot_state_publisher")}  # (package, executable) launch-only
JOINT_STATE = "sensor_msgs/msg/JointState"
TRAJECTORY = "trajectory_msgs/msg/JointTrajectory"
IMAGE = "sensor_msgs/msg/Image"
CAMERA_INFO = "sensor_msgs/msg/CameraInfo"
ROBOT_DESCRIPTION = "/robot_description"  # std_msgs/String, transient-local (robot_state_publisher)


def node_defaults(executable: str) -> dict[str, Any]:
    module, attr = NODE_DEFAULTS[executable].split(":")
    return getattr(importlib.import_module(module), attr)


def urdf_movable_joints(path: Path) -> list[str]:
    """Names of the non-fixed joints of a URDF file (ValueError if it does not parse)."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise ValueError(f"robot.urdf {path}: cannot parse ({exc})") from None
    return [j.get("name", "") for j in root.iter("joint") if j.get("type") != "fixed"]


def _nodes_by_exec(profile: dict[str, Any], executable: str) -> list[tuple[str, dict[str, Any]]]:
    return [(n, node.get("parameters") or {}) for n, node in (profile.get("nodes") or {}).items()
            if isinstance(node, dict) and node.get("executable") == executable and node.get("package", "qvgm")
            == "qvgm"]


def static_problems(profile: dict[str, Any]) -> list[str]:
    """Schema and consistency problems of a loaded profile (one message each; [] = valid)."""
    out: list[str] = []
    if not isinstance(profile, dict):
        return ["profile: not a mapping"]
    out += [f"profile: unknown key {k!r} (known: {sorted(TOP_KEYS)})" for k in profile if k not in TOP_KEYS]
    out += [f"profile: missing field {k!r}" for k in REQUIRED_TOP if k not in profile]
    dds = profile.get("dds") or {}
    if not isinstance(dds, dict):
        out.append("dds: must be a mapping of environment variables")
        dds = {}
    out += [f"dds: unknown variable {k!r} (known: {sorted(DDS_KEYS)})" for k in dds if k not in DDS_KEYS]
    out += [f"dds.{k}: must be a string (an environment variable's value)" for k, v in dds.items()
            if not isinstance(v, str)]
    if dds.get("ROS_AUTOMATIC_DISCOVERY_RANGE", "SUBNET") not in DISCOVERY_RANGES:
        out.append(f"dds.ROS_AUTOMATIC_DISCOVERY_RANGE: one of {list(DISCOVERY_RANGES)}")
    domain = str(dds.get("ROS_DOMAIN_ID", "0"))
    if not domain.isdigit() or not 0 <= int(domain) <= 232:
        out.append(f"dds.ROS_DOMAIN_ID: {domain!r} is not a domain id 0..232")
    robot = profile.get("robot") or {}
    if not isinstance(robot, dict):
        return out + ["robot: must be a mapping"]
    out += [f"robot: unknown key {k!r} (known: {sorted(ROBOT_KEYS)})" for k in robot if k not in ROBOT_KEYS]
    joints = robot.get("joint_names")
    if not isinstance(joints, list) or not joints or not all(isinstance(j, str) and j for j in joints):
        out.append("robot.joint_names: missing or not a non-empty list of joint names")
        joints = []
    elif len(set(joints)) != len(joints):
        out.append(f"robot.joint_names: duplicates in {joints}")
    if "urdf" not in robot:
        out.append("robot: missing field 'urdf' (path to the URDF, or \"\" when the robot driver publishes it)")
    elif robot["urdf"]:
        try:
            urdf = Path(robot["urdf"]) if Path(robot["urdf"]).is_absolute() else package_file(robot["urdf"])
            movable = urdf_movable_joints(urdf)
            out += [f"robot.joint_names: {j!r} is not a movable joint of {robot['urdf']} (has {movable})"
                    for j in joints if j not in movable]
        except (FileNotFoundError, ValueError) as exc:
            out.append(f"robot.urdf: {exc}")
    controller = robot.get("controller")
    if controller is not None and (not isinstance(controller, str) or not controller.strip("/")):
        out.append("robot.controller: must be the JointTrajectoryController's name, e.g. arm_controller")
    if "joint_state_hz" in robot and not (isinstance(robot["joint_state_hz"], int | float)
                                          and robot["joint_state_hz"] > 0):
        out.append("robot.joint_state_hz: must be a positive number (Hz)")
    gripper = robot.get("gripper") or {"interface": "none"}
    if not isinstance(gripper, dict):
        out.append("robot.gripper: must be a mapping {interface: joint|action|none, ...}")
        gripper = {}
    out += [f"robot.gripper: unknown key {k!r} (known: {sorted(GRIPPER_KEYS)})" for k in gripper
            if k not in GRIPPER_KEYS]
    interface = gripper.get("interface", "none")
    if interface not in GRIPPER_INTERFACES:
        out.append(f"robot.gripper.interface: {interface!r} is not one of {list(GRIPPER_INTERFACES)}")
    elif interface == "joint" and gripper.get("joint") not in joints:
        out.append(f"robot.gripper.joint: {gripper.get('joint')!r} must be one of robot.joint_names "
                   "(the gripper is commanded as a joint of the same JointTrajectoryController)")
    elif interface == "action":
        out.append("robot.gripper.interface: 'action' (GripperActionController, control_msgs/action/GripperCommand "
                   f"on {gripper.get('action') or '/<controller>/gripper_cmd'}) is not supported: control_msgs is "
                   "not installed (no ros-kilted-control-msgs wheel); use interface: joint")
    cameras = profile.get("cameras")
    if not isinstance(cameras, list) or not all(isinstance(c, str) and c for c in cameras):
        out.append("cameras: must be a list of camera names")
        cameras = []
    elif len(set(cameras)) != len(cameras):
        out.append(f"cameras: duplicates in {cameras}")
    topics = profile.get("topics") or {}
    out += [f"topics: unknown key {k!r} (known: {sorted(TOPIC_KEYS)})" for k in topics if k not in TOPIC_KEYS]
    traj = trajectory_topic(profile)
    if controller and topics.get("trajectory", traj) != traj:
        out.append(f"topics.trajectory: {topics['trajectory']} but robot.controller {controller!r} listens on {traj}")
    if topics.get("joint_states", "/joint_states") != "/joint_states":
        out.append("topics.joint_states: the stack reads /joint_states (joint_state_broadcaster's topic)")
    out += _node_problems(profile, joints, cameras, traj)
    return out


def _node_problems(profile: dict[str, Any], joints: list[str], cameras: list[str], traj: str) -> list[str]:
    out: list[str] = []
    nodes = profile.get("nodes")
    if not isinstance(nodes, dict) or not nodes:
        return ["nodes: missing or empty"]
    for name, node in nodes.items():
        where = f"nodes.{name}"
        if not isinstance(node, dict):
            out.append(f"{where}: must be a mapping")
            continue
        out += [f"{where}: unknown key {k!r} (known: {sorted(NODE_KEYS)})" for k in node if k not in NODE_KEYS]
        modes = profile.get("modes") or []
        out += [f"{where}.modes: {m!r} is not one of the profile's modes {modes}" for m in node.get("modes") or []
                if m not in modes]
        exe, package = node.get("executable"), node.get("package", "qvgm")
        if package != "qvgm":
            if (package, exe) not in EXTERNAL_NODES:
                out.append(f"{where}: unknown external node {package}/{exe} (known: {sorted(EXTERNAL_NODES)})")
            elif not (profile.get("robot") or {}).get("urdf"):
                out.append(f"{where}: robot_state_publisher needs robot.urdf")
            continue
        if exe not in NODE_DEFAULTS:
            out.append(f"{where}: unknown executable {exe!r} (known: {sorted(NODE_DEFAULTS)})")
            continue
        params = node.get("parameters") or {}
        if not isinstance(params, dict):
            out.append(f"{where}.parameters: must be a mapping")
            continue
        defaults = node_defaults(exe)
        for key, value in params.items():
            if key not in defaults:
                out.append(f"{where}.parameters: unknown parameter {key!r} for {exe}")
            elif type(value) is not type(defaults[key]):
                out.append(f"{where}.parameters.{key}: {type(value).__name__} {value!r}, {exe} declares it as "
                           f"{type(defaults[key]).__name__} (e.g. {defaults[key]!r})")
        if exe == "camera_node":
            cam = params.get("camera_name")
            if cam != name or node.get("namespace") != "camera":
                out.append(f"{where}: a camera node is named after its camera: key {name!r} needs "
                           f"parameters.camera_name: {name} and namespace: camera (node /camera/{name})")
            if cam not in cameras:
                out.append(f"{where}: camera {cam!r} is not in the profile's cameras {cameras}")
        if "joint_names" in params and params["joint_names"] != joints:
            out.append(f"{where}.parameters.joint_names: {params['joint_names']} != robot.joint_names {joints}")
        for key in ("cameras",):
            if key in params and isinstance(params[key], list):
                out += [f"{where}.parameters.cameras: {c!r} is not in the profile's cameras {cameras}"
                        for c in params[key] if c not in cameras]
        if exe == "recorder_node" and params.get("reference_camera", "front") not in params.get(
                "cameras", defaults["cameras"]):
            out.append(f"{where}.parameters.reference_camera: {params.get('reference_camera', 'front')!r} is not "
                       "one of its cameras")
        if "trajectory_topic" in params and params["trajectory_topic"] not in (traj, DEFAULT_TRAJECTORY):
            out.append(f"{where}.parameters.trajectory_topic: {params['trajectory_topic']} but the controller "
                       f"listens on {traj}")
        if exe == "policy_node" and params.get("backend", defaults["backend"]) == "flow":
            urdf_param = str(params.get("urdf", ""))
            try:
                path = Path(urdf_param) if urdf_param else package_file("urdf/tabletop_arm.urdf")
                movable = urdf_movable_joints(path)
                bad = [j for j in params.get("joint_names", defaults["joint_names"]) if j not in movable]
                if bad:
                    out.append(f"{where}.parameters.urdf: backend flow's safety layer reads the limits of {bad} "
                               f"from {urdf_param or 'the tabletop arm URDF'}, which lacks them: set this arm's URDF")
            except (FileNotFoundError, ValueError) as exc:
                out.append(f"{where}.parameters.urdf: {exc}")
        if exe == "teleop_node":
            n = len(params.get("joint_names", defaults["joint_names"]))
            out += [f"{where}.parameters.{key}: {len(params.get(key, defaults[key]))} entries, joint_names has {n}"
                    for key in ("lower", "upper", "max_velocity", "axes", "scale")
                    if len(params.get(key, defaults[key])) != n]
    realsense = [(n, str(p.get("serial_no", ""))) for n, p in _nodes_by_exec(profile, "camera_node")
                 if p.get("backend", "realsense") == "realsense"]
    serials = [s for _n, s in realsense]
    if len(realsense) > 1 and ("" in serials or len(set(serials)) != len(serials)):
        out.append(f"camera nodes: {len(realsense)} RealSense cameras need distinct serial_no values, got "
                   f"{dict(realsense)}")
    cams_from_nodes = [p.get("camera_name") for _n, p in _nodes_by_exec(profile, "camera_node")]
    sims = _nodes_by_exec(profile, "sim_node")
    for _n, p in sims:
        cams_from_nodes += list(p.get("cameras", []))
    missing = [c for c in cameras if c not in cams_from_nodes]
    if missing:
        out.append(f"cameras: {missing} have no camera_node (or sim_node camera) publishing them")
    return out


def expected_rates(profile: dict[str, Any], overrides: dict[str, dict[str, Any]] | None = None
                   ) -> tuple[float | None, dict[str, float | None]]:
    """(joint_states Hz, {camera: image Hz}) the profile promises (None = unknown): robot.joint_state_hz or
    the sim node's joint_state_hz; camera_node fps or the sim node's camera_hz * real_time_factor."""
    specs = node_specs(profile, overrides)
    js_hz = (profile.get("robot") or {}).get("joint_state_hz")
    cams: dict[str, float | None] = {c: None for c in profile.get("cameras") or []}
    for spec in specs:
        p = spec.parameters
        if spec.executable == "sim_node" and not spec.external:
            rtf = float(p.get("real_time_factor", 1.0))
            js_hz = js_hz or p.get("joint_state_hz")
            for c in p.get("cameras", []):
                if "camera_hz" in p:
                    cams[c] = float(p["camera_hz"]) * rtf
        if spec.executable == "camera_node":
            cams[str(p.get("camera_name"))] = float(p.get("fps", 30))
    return (float(js_hz) if js_hz else None), cams


def published_cameras(profile: dict[str, Any], overrides: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """The cameras the profile's nodes publish (after overrides), in the profile's order first."""
    names: list[str] = []
    for spec in node_specs(profile, overrides):
        if spec.external:
            continue
        if spec.executable == "camera_node":
            names.append(str(spec.parameters.get("camera_name")))
        elif spec.executable == "sim_node":
            names += [str(c) for c in spec.parameters.get("cameras", [])]
    order = list(profile.get("cameras") or [])
    return sorted(dict.fromkeys(names), key=lambda c: order.index(c) if c in order else len(order))


def live_problems(profile: dict[str, Any], overrides: dict[str, dict[str, Any]] | None = None, *,
                  timeout: float = 10.0, window: float = 3.0, min_rate_fraction: float = 0.5) -> list[str]:
    """Check the live graph (this process's DDS domain): waits up to `timeout` s for the topics, then
    measures rates over `window` s. Returns one message per problem."""
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import CameraInfo, Image, JointState

    from qvgm_policy_node.graph import Graph

    traj = trajectory_topic(profile)
    cameras = published_cameras(profile, overrides)
    topics = profile.get("topics") or {}
    img_fmt = topics.get("camera_image", "/camera/{name}/color/image_raw")
    info_fmt = topics.get("camera_info", "/camera/{name}/color/camera_info")
    required = {"/joint_states": JOINT_STATE, traj: TRAJECTORY}
    for c in cameras:
        required[img_fmt.format(name=c)] = IMAGE
        required[info_fmt.format(name=c)] = CAMERA_INFO
    js_hz, cam_hz = expected_rates(profile, overrides)
    joints = list((profile.get("robot") or {}).get("joint_names") or [])
    out: list[str] = []
    deadline = time.monotonic() + timeout
    with Graph() as g:
        node = g.node("qvgm_check_profile")

        def graph_types() -> dict[str, list[str]]:
            return dict(node.get_topic_names_and_types())

        def ready() -> bool:
            types = graph_types()
            return (all(t in types for t in required) and node.count_subscribers(traj) > 0
                    and all(node.count_publishers(t) > 0 for t, want in required.items() if want != TRAJECTORY))

        g.spin_until(ready, timeout)
        types = graph_types()
        inputs: dict[str, str] = {}
        for topic, want in required.items():
            if topic not in types:
                out.append(f"{topic}: missing (no publisher or subscriber of {want})")
            elif want not in types[topic]:
                out.append(f"{topic}: type {', '.join(types[topic])}, the profile expects {want}")
            elif want == TRAJECTORY:
                if node.count_subscribers(traj) == 0:
                    out.append(f"{traj}: no subscriber (is the JointTrajectoryController "
                               f"{traj.strip('/').split('/')[0]!r} loaded and active?)")
            elif node.count_publishers(topic) == 0:
                out.append(f"{topic}: no publisher of {want} (only subscribers)")
            else:
                inputs[topic] = want
        stamps: dict[str, list[float]] = {t: [] for t in inputs}
        received: dict[str, int] = dict.fromkeys(inputs, 0)
        last_js: list[JointState] = []

        def record(topic: str):
            def cb(msg: Any) -> None:
                stamps[topic].append(time.monotonic())
                received[topic] += 1
                if isinstance(msg, JointState):
                    last_js[:] = [msg]
            return cb

        qos = qos_profile_sensor_data  # best effort: matches reliable and best-effort publishers
        classes = {JOINT_STATE: JointState, IMAGE: Image, CAMERA_INFO: CameraInfo}
        for topic, want in inputs.items():
            node.create_subscription(classes[want], topic, record(topic), qos)
        descriptions: list[str] = []
        if "std_msgs/msg/String" in types.get(ROBOT_DESCRIPTION, []):  # the driver's URDF (latched)
            from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
            from std_msgs.msg import String

            latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                                 durability=DurabilityPolicy.TRANSIENT_LOCAL)
            node.create_subscription(String, ROBOT_DESCRIPTION, lambda m: descriptions.append(m.data), latched)
        # warm-up: every stream delivers 3 messages (publishers that just started), then the measuring window
        g.spin_until(lambda: min(received.values(), default=3) >= 3, max(deadline - time.monotonic(), window))
        for ts in stamps.values():
            ts.clear()
        g.spin_for(window)

        def rate(topic: str) -> float:
            ts = stamps.get(topic, [])
            return 0.0 if len(ts) < 2 else (len(ts) - 1) / max(ts[-1] - ts[0], 1e-9)

        def silent(topic: str) -> bool:
            return topic in inputs and received[topic] == 0

        js = "/joint_states"
        if silent(js):
            out.append(f"{js}: no message (publisher present) in {max(timeout, window):.1f} s")
        elif js in inputs:
            names = list(last_js[0].name)
            missing = [j for j in joints if j not in names]
            if missing:
                out.append(f"{js}: joints {missing} of the profile are not published (published: {names})")
            r = rate(js)
            if js_hz and r < min_rate_fraction * js_hz:
                out.append(f"{js}: {r:.1f} Hz, expected >= {min_rate_fraction * js_hz:.1f} Hz "
                           f"(profile: {js_hz:.1f} Hz)")
        for c in cameras:
            img, info = img_fmt.format(name=c), info_fmt.format(name=c)
            if silent(img):
                out.append(f"camera {c}: no image on {img} in {max(timeout, window):.1f} s")
            elif img in inputs:
                r, want_hz = rate(img), cam_hz.get(c)
                if want_hz and r < min_rate_fraction * want_hz:
                    out.append(f"camera {c}: {img} {r:.1f} Hz, expected >= {min_rate_fraction * want_hz:.1f} Hz "
                               f"(profile: {want_hz:.1f} Hz)")
            if silent(info):
                out.append(f"camera {c}: no camera_info on {info} in {max(timeout, window):.1f} s")
        if descriptions:
            try:
                movable = [j.get("name", "") for j in ET.fromstring(descriptions[-1]).iter("joint")
                           if j.get("type") != "fixed"]
                missing = [j for j in joints if j not in movable]
                if missing:
                    out.append(f"{ROBOT_DESCRIPTION}: joints {missing} of the profile are not movable joints of "
                               f"the robot's URDF (has {movable})")
            except ET.ParseError as exc:
                out.append(f"{ROBOT_DESCRIPTION}: not a parseable URDF ({exc})")
    return out


def run_check(name: str, overrides: dict[str, dict[str, Any]] | None = None, *, timeout: float = 10.0,
              window: float = 3.0, min_rate_fraction: float = 0.5, static_only: bool = False) -> int:
    """The `qvgm check` command: prints one line per problem (exit 1) or `OK` (exit 0)."""
    try:
        profile = load_profile(name)
    except (FileNotFoundError, ValueError, OSError, yaml.YAMLError) as exc:
        print(f"qvgm check {name}: {exc}", flush=True)
        return 1
    problems = static_problems(profile)
    if not problems and not static_only:
        problems = live_problems(profile, overrides, timeout=timeout, window=window,
                                 min_rate_fraction=min_rate_fraction)
    for p in problems:
        print(p, flush=True)
    if not problems:
        print(f"OK: {name} ({'static' if static_only else 'static + live graph'})", flush=True)
    return 1 if problems else 0
