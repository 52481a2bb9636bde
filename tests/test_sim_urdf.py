"""urdf/tabletop_arm.urdf: parses in urdfdom (the parser robot_state_publisher uses), is a proper tree with the
agreed frames and joint names, and the MuJoCo model built from it carries the same limits."""

import os
import subprocess
import sysconfig
import xml.etree.ElementTree as ET
from pathlib import Path

import mujoco
import numpy as np
import pytest

from qvgm.sim import JOINT_NAMES, TabletopEnv, load_joint_limits, urdf_path
from qvgm.sim.robot import robot_spec

EXPECTED_JOINTS = ("joint_1", "joint_2", "joint_3", "joint_4", "joint_5", "joint_6", "gripper_finger_joint")


def _cmeel_prefix() -> Path:
    return Path(sysconfig.get_paths()["purelib"]) / "cmeel.prefix"


def test_urdfdom_check_urdf_parses_the_tree():
    prefix = _cmeel_prefix()
    tool = prefix / "bin" / "check_urdf"
    assert tool.is_file(), "cmeel-urdfdom (urdfdom's check_urdf) must be installed: see requirements.txt"
    env = dict(os.environ, LD_LIBRARY_PATH=f"{prefix / 'lib'}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    out = subprocess.run([str(tool), str(urdf_path())], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Successfully Parsed XML" in out.stdout
    assert "root Link: base_link" in out.stdout
    for frame in ("tool0", "wrist_camera_link", "wrist_color_optical_frame", "front_color_optical_frame"):
        assert frame in out.stdout


def test_urdfdom_rejects_a_broken_urdf(tmp_path):
    """The check above is not vacuous: urdfdom fails on a joint whose child link does not exist."""
    prefix = _cmeel_prefix()
    broken = urdf_path().read_text().replace('<child link="tool0"/>', '<child link="no_such_link"/>')
    p = tmp_path / "broken.urdf"
    p.write_text(broken)
    env = dict(os.environ, LD_LIBRARY_PATH=f"{prefix / 'lib'}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    out = subprocess.run([str(prefix / "bin" / "check_urdf"), str(p)], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode != 0


def test_tree_joint_names_limits_inertias():
    root = ET.parse(urdf_path()).getroot()
    links = {link.get("name") for link in root.findall("link")}
    joints = root.findall("joint")
    children = [j.find("child").get("link") for j in joints]
    assert len(children) == len(set(children)), "a link has two parents"
    roots = links - set(children)
    assert roots == {"base_link"}
    for frame in ("tool0", "wrist_camera_link"):
        assert frame in links
    movable = [j.get("name") for j in joints if j.get("type") in ("revolute", "prismatic")]
    assert movable[:6] == list(EXPECTED_JOINTS[:6])
    assert "gripper_finger_joint" in movable
    assert tuple(JOINT_NAMES) == EXPECTED_JOINTS
    mimic = [j for j in joints if j.find("mimic") is not None]
    assert len(mimic) == 1 and mimic[0].find("mimic").get("joint") == "gripper_finger_joint"
    lim = load_joint_limits()
    assert np.all(lim.velocity > 0) and np.all(lim.effort > 0) and np.all(lim.lower < lim.upper)
    assert lim.lower[6] == 0.0 and lim.upper[6] == pytest.approx(0.04)
    for link in root.findall("link"):
        inertial = link.find("inertial")
        if inertial is None:
            continue
        assert float(inertial.find("mass").get("value")) > 0
        i = inertial.find("inertia")
        ixx, iyy, izz = (float(i.get(k)) for k in ("ixx", "iyy", "izz"))
        assert min(ixx, iyy, izz) > 0
        assert ixx + iyy >= izz and iyy + izz >= ixx and ixx + izz >= iyy, link.get("name")


def test_reach_about_0p6_m_at_table_height():
    """tool0 pointing down reaches the far edge of the workspace (0.6 m radius) at cube height."""
    from qvgm.sim.ik import ArmIK, top_down_rotation

    ik = ArmIK()
    q = np.array([0.0, 0.2, 1.7, 0.0, 1.2, 0.0])
    for x, y in ((0.6, 0.0), (0.42, 0.42), (0.25, -0.2)):
        sol, err = ik.solve(np.array([x, y, 0.02]), top_down_rotation(np.arctan2(y, x)), q, iters=200)
        assert err < 1e-3, (x, y, err)


def test_mujoco_model_limits_match_urdf():
    lim = load_joint_limits()
    spec = robot_spec()
    model = spec.compile()
    for i, name in enumerate(JOINT_NAMES):
        j = model.joint(name)
        assert j.range == pytest.approx([lim.lower[i], lim.upper[i]])
        act = model.actuator(f"{name}_position")
        assert act.ctrlrange == pytest.approx([lim.lower[i], lim.upper[i]])
        assert act.forcerange == pytest.approx([-lim.effort[i], lim.effort[i]])
    # the mimic finger is an equality constraint coupling the two finger joints 1:1
    eq = [k for k in range(model.neq) if model.eq_type[k] == mujoco.mjtEq.mjEQ_JOINT]
    assert len(eq) == 1
    names = {model.joint(model.eq_obj1id[eq[0]]).name, model.joint(model.eq_obj2id[eq[0]]).name}
    assert names == {"gripper_finger_joint", "gripper_right_finger_joint"}
    assert model.eq_data[eq[0], :2] == pytest.approx([0.0, 1.0])
    # masses and inertias come from the URDF
    root = ET.parse(urdf_path()).getroot()
    for link in root.findall("link"):
        inertial = link.find("inertial")
        if inertial is not None:
            assert model.body(link.get("name")).mass[0] == pytest.approx(float(inertial.find("mass").get("value")))


def test_targets_clipped_and_velocity_limited():
    env = TabletopEnv(task="stack", render=False)
    env.reset(seed=3)
    lim = env.limits
    far = lim.upper + 10.0
    env.set_joint_targets(far)
    top_speed = np.zeros(7)
    for _ in range(40):
        env.step_physics(5)
        _, vel, effort = env.joint_state()
        top_speed = np.maximum(top_speed, np.abs(vel))
        assert np.all(np.abs(effort) <= lim.effort + 1e-9)
    assert np.all(env.data.ctrl[env._act] <= lim.upper + 1e-12)
    assert np.all(top_speed <= lim.velocity * 1.15), (top_speed, lim.velocity)
    assert top_speed[0] > 0.5 * lim.velocity[0]  # it did move toward the (clipped) target
    for bad in (np.zeros(6), np.full(7, np.nan), np.array([0, 0, 0, 0, 0, np.inf, 0.0])):
        before = env._target.copy()
        with pytest.raises(ValueError):
            env.set_joint_targets(bad)
        assert np.array_equal(env._target, before)
