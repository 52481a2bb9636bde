"""qvgm.sim: the MuJoCo tabletop built from urdf/tabletop_arm.urdf (Gymnasium API), tasks and scripted experts."""

from qvgm.sim.env import CAMERAS, TabletopEnv
from qvgm.sim.robot import HOME_Q, JOINT_NAMES, JointLimits, load_joint_limits, urdf_path
from qvgm.sim.tasks import TASKS

__all__ = ["CAMERAS", "HOME_Q", "JOINT_NAMES", "TASKS", "JointLimits", "TabletopEnv", "load_joint_limits",
           "make_expert", "urdf_path"]


def make_expert(task: str, noise: float = 0.0, seed: int | None = None):  # noqa: ANN201 - see qvgm.sim.expert
    """Scripted IK expert for ``task`` (see ``qvgm.sim.expert.make_expert``)."""
    from qvgm.sim.expert import make_expert as _make

    return _make(task, noise=noise, seed=seed)
