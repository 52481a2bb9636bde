"""Damped-least-squares inverse kinematics of tool0, on a MuJoCo model of the arm compiled from the URDF.

Positions in m in the base_link frame (= MuJoCo world frame of the robot-only model), orientations as 3x3
rotation matrices, joint angles in rad.
"""

from __future__ import annotations

from pathlib import Path

import mujoco
import numpy as np

from qvgm.sim.robot import ARM_JOINTS, TOOL_FRAME, load_joint_limits, robot_spec


def top_down_rotation(yaw: float) -> np.ndarray:
    """Rotation of tool0 pointing straight down (tool z = world -z) with the finger axis (tool y) at ``yaw``
    rad from world +y about world z (yaw 0 is reached with joint_1 = joint_6 = 0). Returns 3x3."""
    c, s = np.cos(yaw), np.sin(yaw)
    rz = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    ry_pi = np.array([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]])
    return rz @ ry_pi


class ArmIK:
    """Kinematics of the 6 arm joints: ``fk(q6)`` and ``solve(pos, rot, q_init)`` (damped least squares)."""

    def __init__(self, urdf: str | Path | None = None) -> None:
        self.model = robot_spec(urdf, with_actuators=False).compile()
        self.data = mujoco.MjData(self.model)
        self._qadr = np.array([self.model.joint(n).qposadr[0] for n in ARM_JOINTS])
        self._dadr = np.array([self.model.joint(n).dofadr[0] for n in ARM_JOINTS])
        self._body = self.model.body(TOOL_FRAME).id
        lim = load_joint_limits(urdf)
        self.lower, self.upper = lim.lower[:6], lim.upper[:6]
        self._jacp = np.zeros((3, self.model.nv))
        self._jacr = np.zeros((3, self.model.nv))

    def fk(self, q6: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """tool0 position [3] (m) and rotation [3,3] in base_link for arm joints q6 [6] (rad)."""
        self.data.qpos[self._qadr] = q6
        mujoco.mj_kinematics(self.model, self.data)
        return self.data.xpos[self._body].copy(), self.data.xmat[self._body].reshape(3, 3).copy()

    def solve(self, pos: np.ndarray, rot: np.ndarray, q_init: np.ndarray, iters: int = 60, tol: float = 1e-4,
              damping: float = 0.03, rot_weight: float = 0.5) -> tuple[np.ndarray, float]:
        """Joint angles q6 [6] (rad, within URDF limits) that put tool0 at ``pos`` [3] with rotation ``rot``
        [3,3], iterating from ``q_init`` [6]. Returns (q6, residual position error in m)."""
        q = np.clip(np.asarray(q_init, dtype=np.float64)[:6].copy(), self.lower, self.upper)
        target_quat = np.zeros(4)
        mujoco.mju_mat2Quat(target_quat, np.ascontiguousarray(rot, dtype=np.float64).reshape(9))
        cur_quat = np.zeros(4)
        err_rot = np.zeros(3)
        w = np.array([1.0, 1.0, 1.0, rot_weight, rot_weight, rot_weight])
        for _ in range(iters):
            p, r = self.fk(q)
            err_p = pos - p
            mujoco.mju_mat2Quat(cur_quat, r.reshape(9))
            mujoco.mju_subQuat(err_rot, target_quat, cur_quat)  # world-frame rotation error (rad)
            err_rot_w = r @ err_rot
            err = np.concatenate([err_p, err_rot_w]) * w
            if np.linalg.norm(err_p) < tol and np.linalg.norm(err_rot) < 10 * tol:
                break
            mujoco.mj_comPos(self.model, self.data)  # cdof, needed by the Jacobian
            mujoco.mj_jacBody(self.model, self.data, self._jacp, self._jacr, self._body)
            jac = np.vstack([self._jacp[:, self._dadr], self._jacr[:, self._dadr]]) * w[:, None]
            dq = jac.T @ np.linalg.solve(jac @ jac.T + damping**2 * np.eye(6), err)
            step = np.max(np.abs(dq))
            if step > 0.3:
                dq *= 0.3 / step
            q = np.clip(q + dq, self.lower, self.upper)
        p, _ = self.fk(q)
        return q, float(np.linalg.norm(pos - p))
