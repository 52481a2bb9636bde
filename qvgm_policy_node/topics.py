"""Topic and service names of the stack (DESIGN.md); the profile's `topics` section lists the same."""

JOINT_STATES = "/joint_states"
TRAJECTORY = "/arm_controller/joint_trajectory"
TASK = "/qvgm/task"
SUCCESS = "/qvgm/sim/success"
OBJECTS = "/qvgm/sim/objects"
DIAGNOSTICS = "/diagnostics"
ESTOP = "/qvgm/estop"  # std_msgs/Bool: true = hold until cleared
POLICY_VERSION = "/qvgm/policy/version"  # std_msgs/String, transient-local: version that produced the latest chunk
POLICY_ENABLE = "/qvgm/policy/enable"  # std_msgs/Bool, transient-local: false = policy muted (publishes nothing)


def camera_image(name: str) -> str:
    return f"/camera/{name}/color/image_raw"


def camera_info(name: str) -> str:
    return f"/camera/{name}/color/camera_info"


def optical_frame(name: str) -> str:
    """REP-103 optical frame id of a camera (realsense-ros naming)."""
    return f"{name}_color_optical_frame"
