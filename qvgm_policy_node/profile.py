"""Bring-up profiles (config/<name>.yaml): the one reader shared by launch/tabletop.launch.py and `qvgm up`.

Never imports rclpy or launch: both front ends turn the same `NodeSpec` list into their own node objects.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent


def _share_dir() -> Path | None:
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory("qvgm"))
    except Exception:  # not installed as a ROS package (plain checkout)
        return None


def package_file(relative: str) -> Path:
    """A file shipped with the package (config/, urdf/, launch/): the checkout first, then the ament share."""
    candidate = REPO_ROOT / relative
    if candidate.exists():
        return candidate
    share = _share_dir()
    if share is not None and (share / relative).exists():
        return share / relative
    raise FileNotFoundError(f"{relative} not found in {REPO_ROOT} or the qvgm share directory")


@dataclass(frozen=True)
class NodeSpec:
    """One node of a profile: ROS node name, console-script executable, parameters (plain YAML values)."""

    name: str
    executable: str
    parameters: dict[str, Any] = field(default_factory=dict)
    namespace: str = ""  # e.g. "camera" for camera_node (node /camera/<camera_name>, realsense-ros style)
    package: str = "qvgm"  # another package's node (robot_state_publisher) is started by launch only
    remappings: tuple[tuple[str, str], ...] = ()  # (from, to) topic remappings, e.g. the controller's topic

    @property
    def external(self) -> bool:
        """True for a node of another ROS package (C++, e.g. robot_state_publisher): `qvgm up` skips it."""
        return self.package != "qvgm"

    def ros_args(self) -> list[str]:
        """The remappings as ROS command-line arguments (`--ros-args -r from:=to ...`), [] if none."""
        if not self.remappings:
            return []
        return ["--ros-args", *[x for src, dst in self.remappings for x in ("-r", f"{src}:={dst}")]]


# short names accepted by `qvgm up/check` and `ros2 launch ... profile:=`
PROFILE_ALIASES = {"sim": "tabletop_sim", "real": "tabletop_real"}
DEFAULT_TRAJECTORY = "/arm_controller/joint_trajectory"  # qvgm_policy_node.topics.TRAJECTORY


def resolve_profile(name_or_path: str | Path) -> Path:
    """Profile name (`real`, `tabletop_real`, `robots/ur5e`) or YAML path -> the file (FileNotFoundError)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise FileNotFoundError(f"profile file {path} does not exist")
        return path
    name = PROFILE_ALIASES.get(str(name_or_path), str(name_or_path))
    return package_file(f"config/{name}.yaml")


def trajectory_topic(profile: dict[str, Any]) -> str:
    """The JointTrajectoryController's command topic: `/<robot.controller>/joint_trajectory`."""
    controller = (profile.get("robot") or {}).get("controller")
    if controller:
        return f"/{str(controller).strip('/')}/joint_trajectory"
    return str((profile.get("topics") or {}).get("trajectory", DEFAULT_TRAJECTORY))


def load_profile(name_or_path: str | Path) -> dict[str, Any]:
    """Load config/<name>.yaml (or a path to a YAML file); raises ValueError on a malformed profile."""
    path = resolve_profile(name_or_path)
    with open(path, encoding="utf-8") as f:
        prof = yaml.safe_load(f)
    if not isinstance(prof, dict) or not isinstance(prof.get("nodes"), dict) or not prof["nodes"]:
        raise ValueError(f"profile {path} has no `nodes` mapping")
    for node_name, node in prof["nodes"].items():
        if not isinstance(node, dict) or "executable" not in node:
            raise ValueError(f"profile {path}: node {node_name!r} needs an `executable`")
        if "modes" in node and not (isinstance(node["modes"], list) and all(isinstance(m, str) for m in node["modes"])):
            raise ValueError(f"profile {path}: node {node_name!r}: `modes` must be a list of mode names")
    return prof


def profile_modes(profile: dict[str, Any]) -> list[str]:
    """The profile's `modes` (e.g. ["collect", "deploy"]); [] when it has none."""
    return [str(m) for m in profile.get("modes") or []]


def node_specs(profile: dict[str, Any], overrides: dict[str, dict[str, Any]] | None = None,
               mode: str | None = None) -> list[NodeSpec]:
    """The graph of a profile: one NodeSpec per node, parameters with `overrides[node][param]` applied.

    `mode` (e.g. "deploy"): keep only nodes without a `modes` list or whose `modes` contain it; None = every
    node (the full collection graph). Overrides for nodes the mode leaves out are ignored.

    When the robot's controller topic differs from the stack's default (/arm_controller/joint_trajectory),
    every qvgm node gets the remapping default -> `/<robot.controller>/joint_trajectory`."""
    specs = []
    overrides = overrides or {}
    unknown = set(overrides) - set(profile["nodes"])
    if unknown:
        raise ValueError(f"overrides for nodes not in the profile: {sorted(unknown)}")
    if mode and mode not in profile_modes(profile):
        raise ValueError(f"mode {mode!r} is not one of the profile's modes {profile_modes(profile)}")
    traj = trajectory_topic(profile)
    for node_name, node in profile["nodes"].items():
        if mode and node.get("modes") is not None and mode not in node["modes"]:
            continue
        params = copy.deepcopy(node.get("parameters") or {})
        params.update(overrides.get(node_name, {}))
        package = str(node.get("package", "qvgm"))
        remap = ((DEFAULT_TRAJECTORY, traj),) if traj != DEFAULT_TRAJECTORY and package == "qvgm" else ()
        specs.append(NodeSpec(node_name, node["executable"], params, namespace=str(node.get("namespace", "")),
                              package=package, remappings=remap))
    return specs


def ros_params_yaml(specs: list[NodeSpec]) -> str:
    """The specs' parameters as a ROS 2 parameters file (`--ros-args --params-file`), one section per node
    (keyed by the fully qualified name `/namespace/name` for namespaced nodes)."""
    return yaml.safe_dump({(f"/{s.namespace}/{s.name}" if s.namespace else s.name): {
        "ros__parameters": dict(s.parameters)} for s in specs}, sort_keys=False)


def robot_description(profile: dict[str, Any]) -> str:
    """The URDF text of `robot.urdf` (path relative to the package, or absolute), for robot_state_publisher."""
    urdf = str((profile.get("robot") or {}).get("urdf", ""))
    if not urdf:
        raise ValueError("profile has no robot.urdf: robot_state_publisher needs one")
    path = Path(urdf) if Path(urdf).is_absolute() else package_file(urdf)
    return path.read_text(encoding="utf-8")


def launch_parameters(spec: NodeSpec, profile: dict[str, Any]) -> dict[str, Any]:
    """Parameters a launch file passes to `spec`: the profile's, plus robot_description for
    robot_state_publisher (read from robot.urdf at launch time)."""
    params = dict(spec.parameters)
    if spec.package == "robot_state_publisher":
        params["robot_description"] = robot_description(profile)
    return params
