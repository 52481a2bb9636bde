"""Camera core (no rclpy): frame sources (RealSense, OpenCV), frame health, timestamp mapping, camera_info.

Nodes in `qvgm_policy_node.camera_node` are thin adapters over this package.
"""

from qvgm.camera.health import FrameHealth, HealthConfig, Verdict
from qvgm.camera.intrinsics import CameraIntrinsics, camera_info_dict, optical_frame_id
from qvgm.camera.sources import Frame, FrameSource, OpenCVSource, RealSenseSource, SourceDisconnected
from qvgm.camera.timestamps import TimestampMapper

__all__ = [
    "CameraIntrinsics",
    "Frame",
    "FrameHealth",
    "FrameSource",
    "HealthConfig",
    "OpenCVSource",
    "RealSenseSource",
    "SourceDisconnected",
    "TimestampMapper",
    "Verdict",
    "camera_info_dict",
    "optical_frame_id",
]
