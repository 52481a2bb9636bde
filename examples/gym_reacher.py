"""Scripted expert for Gymnasium's MuJoCo ``Reacher-v5`` (not defined in this repository), used by
``examples/reacher_v5.yaml`` as the demo source of the env-spec contract (docs/gym_envs.md).

Reacher-v5 observation float64[10]: cos q0, cos q1, sin q0, sin q1 (joint angles, rad), target x, y (m),
q0', q1' (rad/s), fingertip - target x, y (m). Action float32[2]: joint torques, normalised to [-1, 1].
The expert is a resolved-rate controller: a damped-least-squares inverse of the planar 2-link Jacobian turns the
Cartesian error into a desired joint velocity, and a velocity loop turns that into torques.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

L0, L1 = 0.1, 0.11  # link lengths (m): shoulder -> elbow, elbow -> fingertip (reacher.xml)


def jacobian(q: np.ndarray) -> np.ndarray:
    """d(fingertip xy)/d(q0, q1) [2, 2] of the planar arm at joint angles q [2] (rad)."""
    s0, c0 = np.sin(q[0]), np.cos(q[0])
    s01, c01 = np.sin(q[0] + q[1]), np.cos(q[0] + q[1])
    return np.array([[-L0 * s0 - L1 * s01, -L1 * s01], [L0 * c0 + L1 * c01, L1 * c01]])


def expert_action(obs: np.ndarray, gain: float = 20.0, vel_gain: float = 0.2, damping: float = 1e-3) -> np.ndarray:
    """Reacher-v5 observation [10] (or a Dict holding it under "state", e.g. AddRenderObservation) -> torques
    float32[2] in [-1, 1]."""
    obs = np.asarray(obs["state"] if isinstance(obs, dict) else obs, dtype=np.float64)
    q = np.arctan2(obs[2:4], obs[0:2])
    qd = obs[6:8]
    err = obs[8:10]  # fingertip - target (m)
    j = jacobian(q)
    qd_des = -gain * j.T @ np.linalg.solve(j @ j.T + damping * np.eye(2), err)
    qd_des = np.clip(qd_des, -8.0, 8.0)
    return np.clip(vel_gain * (qd_des - qd), -1.0, 1.0).astype(np.float32)


def make_expert(env: Any, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """Env-spec expert factory: (gym env, episode seed) -> callable(raw observation) -> env action.
    Deterministic; the demo collector adds the spec's exploration noise."""
    del env, seed
    return expert_action


def reached(obs: np.ndarray, reward: float, info: dict[str, Any], radius: float = 0.02) -> bool:
    """Success predicate (``module:function`` form): fingertip within `radius` m of the target."""
    del reward, info
    obs = obs["state"] if isinstance(obs, dict) else obs
    return bool(np.linalg.norm(np.asarray(obs)[8:10]) < radius)
