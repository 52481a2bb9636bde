"""qvgm.sim: the MuJoCo tabletop built from urdf/tabletop_arm.urdf (Gymnasium API), tasks and scripted experts.

Offscreen rendering defaults to EGL (headless robot PCs, CI): MUJOCO_GL/PYOPENGL_PLATFORM are set to ``egl``
here unless already set, which only takes effect if mujoco was not imported before qvgm.sim.
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

from qvgm.sim.env import CAMERAS, SimState, TabletopEnv  # noqa: E402
from qvgm.sim.expert import make_expert  # noqa: E402
from qvgm.sim.robot import HOME_Q, JOINT_NAMES, JointLimits, load_joint_limits, urdf_path  # noqa: E402
from qvgm.sim.tasks import TASKS  # noqa: E402

if "qvgm/Tabletop-v0" not in __import__("gymnasium").registry:
    __import__("gymnasium").register(id="qvgm/Tabletop-v0", entry_point="qvgm.sim.env:TabletopEnv")

__all__ = ["CAMERAS", "HOME_Q", "JOINT_NAMES", "TASKS", "JointLimits", "SimState", "TabletopEnv", "load_joint_limits",
           "make_expert", "urdf_path"]
