"""Test-session environment: DDS on loopback with a free per-run domain, MuJoCo offscreen via EGL.

Set here, at import time, before any test module imports rclpy or mujoco; subprocesses inherit it.
"""

import os

from qvgm_policy_node.ros_env import apply_loopback_env

apply_loopback_env()
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
