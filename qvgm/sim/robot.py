"""The tabletop arm: URDF location, joint limits read from the URDF, and the MuJoCo robot spec built from it.

Units: m, rad, s, N, N*m. State/action vectors are ordered as ``JOINT_NAMES``:
[joint_1..joint_6 (rad), gripper_finger_joint (m, opening of ONE finger, 0 = closed, 0.04 = open)].
"""

from __future__ import annotations

import os
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import mujoco
import numpy as np

JOINT_NAMES: tuple[str, ...] = (
    "joint_1", "joint_2", "joint_3", "joint_4", "joint_5", "joint_6", "gripper_finger_joint",
)
ARM_JOINTS: tuple[str, ...] = JOINT_NAMES[:6]
GRIPPER_JOINT = "gripper_finger_joint"
MIMIC_JOINT = "gripper_right_finger_joint"
TOOL_FRAME = "tool0"
BASE_LINK = "base_link"
WRIST_CAMERA_LINK = "wrist_camera_link"
FRONT_CAMERA_LINK = "front_camera_link"
GRIPPER_OPEN = 0.04
GRIPPER_CLOSED = 0.0

# Home posture: tool0 at (0.35, 0, 0.25) m in base_link, pointing straight down (finger axis along +y), open.
HOME_Q = np.array([0.0, 0.1971, 1.7080, 0.0, 1.2365, 0.0, GRIPPER_OPEN])

# Servo gains of the simulated position controllers (kp in N*m/rad or N/m, kv in N*m*s/rad or N*s/m).
_KP = {"joint_1": 400.0, "joint_2": 400.0, "joint_3": 300.0, "joint_4": 100.0, "joint_5": 100.0,
       "joint_6": 60.0, GRIPPER_JOINT: 400.0}
_KV = {"joint_1": 40.0, "joint_2": 40.0, "joint_3": 25.0, "joint_4": 6.0, "joint_5": 6.0, "joint_6": 3.0,
       GRIPPER_JOINT: 15.0}
_ARMATURE = {"joint_1": 0.05, "joint_2": 0.05, "joint_3": 0.03, "joint_4": 0.01, "joint_5": 0.01,
             "joint_6": 0.01, GRIPPER_JOINT: 0.01, MIMIC_JOINT: 0.01}
ARM_LINKS: tuple[str, ...] = (
    "shoulder_link", "upper_arm_link", "forearm_link", "wrist_1_link", "wrist_2_link", "wrist_3_link",
    "gripper_base_link", "left_finger_link", "right_finger_link", "wrist_camera_link",
)
FINGER_LINKS: tuple[str, ...] = ("left_finger_link", "right_finger_link")


def urdf_path() -> Path:
    """Path of ``tabletop_arm.urdf``: $QVGM_URDF, the repository's ``urdf/``, the ament share dir of package
    ``qvgm`` (colcon install), or ``<prefix>/share/qvgm/urdf`` (pip install)."""
    env = os.environ.get("QVGM_URDF")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    candidates = [here.parents[2] / "urdf" / "tabletop_arm.urdf"]
    try:  # colcon/ament install: <prefix>/share/qvgm/urdf
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory("qvgm")) / "urdf" / "tabletop_arm.urdf")
    except Exception:  # noqa: BLE001 - not a ROS environment, or qvgm not in the ament index
        pass
    if len(here.parents) > 5:  # <prefix>/lib/pythonX.Y/site-packages/qvgm/sim/robot.py
        candidates.append(here.parents[5] / "share" / "qvgm" / "urdf" / "tabletop_arm.urdf")
    candidates.append(Path(sys.prefix) / "share" / "qvgm" / "urdf" / "tabletop_arm.urdf")
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"tabletop_arm.urdf not found (looked in {[str(c) for c in candidates]}; "
                            "set QVGM_URDF)")


@dataclass(frozen=True)
class JointLimits:
    """Limits of the 7 controlled joints, ordered as ``names``; lower/upper in rad or m, velocity in rad/s or m/s,
    effort in N*m or N."""

    names: tuple[str, ...]
    lower: np.ndarray
    upper: np.ndarray
    velocity: np.ndarray
    effort: np.ndarray

    def clip(self, q: np.ndarray) -> np.ndarray:
        """Clip a position vector [7] to [lower, upper]."""
        return np.clip(q, self.lower, self.upper)


def load_joint_limits(path: str | Path | None = None, names: tuple[str, ...] = JOINT_NAMES) -> JointLimits:
    """Parse position/velocity/effort limits of ``names`` from a URDF (plain XML, no ROS needed)."""
    root = ET.parse(path or urdf_path()).getroot()
    found: dict[str, tuple[float, float, float, float]] = {}
    for j in root.findall("joint"):
        lim = j.find("limit")
        if lim is None or j.get("type") not in ("revolute", "prismatic"):
            continue
        found[j.get("name", "")] = (float(lim.get("lower", "nan")), float(lim.get("upper", "nan")),
                                    float(lim.get("velocity", "nan")), float(lim.get("effort", "nan")))
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"URDF lacks limits for joints {missing}")
    arr = np.array([found[n] for n in names], dtype=np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr[:, 0] >= arr[:, 1]) or np.any(arr[:, 2:] <= 0):
        raise ValueError(f"URDF joint limits invalid: {arr.tolist()}")
    return JointLimits(tuple(names), arr[:, 0].copy(), arr[:, 1].copy(), arr[:, 2].copy(), arr[:, 3].copy())


def _quat_from_mat(mat: np.ndarray) -> np.ndarray:
    q = np.zeros(4)
    mujoco.mju_mat2Quat(q, np.ascontiguousarray(mat, dtype=np.float64).reshape(9))
    return q


# A MuJoCo camera looks along its -z with +y up; a REP-103 camera link looks along +x with +z up.
# Columns: camera x (right) = -y_link, camera y (up) = +z_link, camera z (backwards) = -x_link.
CAMERA_IN_LINK_QUAT = _quat_from_mat(np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))


def robot_spec(path: str | Path | None = None, with_actuators: bool = True) -> mujoco.MjSpec:
    """MjSpec of the arm compiled from the URDF: fixed frames kept as bodies, gravity-compensated links,
    position actuators (ctrlrange = URDF position limits, forcerange = URDF effort), the mimic finger as an
    equality constraint (MuJoCo's URDF importer turns <mimic> into one; checked here)."""
    path = Path(path or urdf_path())
    spec = mujoco.MjSpec.from_file(str(path))
    spec.compiler.fusestatic = False
    spec.compiler.discardvisual = False  # URDF visuals were already dropped at parse; keep scene-only visuals
    limits = load_joint_limits(path)
    if not any(e.type == mujoco.mjtEq.mjEQ_JOINT for e in spec.equalities):
        eq = spec.add_equality()
        eq.type = mujoco.mjtEq.mjEQ_JOINT
        eq.name1, eq.name2 = MIMIC_JOINT, GRIPPER_JOINT
        eq.data[:5] = [0.0, 1.0, 0.0, 0.0, 0.0]
    for name in ARM_LINKS:
        spec.body(name).gravcomp = 1.0
    for name, arm in _ARMATURE.items():
        spec.joint(name).armature = arm
    if with_actuators:
        for i, name in enumerate(JOINT_NAMES):
            act = spec.add_actuator()
            act.name = f"{name}_position"
            act.target = name
            act.trntype = mujoco.mjtTrn.mjTRN_JOINT
            act.set_to_position(kp=_KP[name], kv=_KV[name])
            act.ctrllimited = mujoco.mjtLimited.mjLIMITED_TRUE
            act.ctrlrange = [limits.lower[i], limits.upper[i]]
            act.forcelimited = mujoco.mjtLimited.mjLIMITED_TRUE
            act.forcerange = [-limits.effort[i], limits.effort[i]]
    return spec
