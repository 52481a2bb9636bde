"""Test-session environment: DDS on loopback with a free per-run domain, MuJoCo offscreen via EGL.

Set here, at import time, before any test module imports rclpy or mujoco; subprocesses inherit it.
"""

import os

from qvgm_policy_node.ros_env import apply_loopback_env

apply_loopback_env()
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")


import pytest  # noqa: E402


@pytest.fixture
def one_torch_thread():
    """torch at one intra-op thread for the test (2 shared cores), restored afterwards.
    Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
