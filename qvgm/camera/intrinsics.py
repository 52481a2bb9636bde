"""Pinhole intrinsics and the sensor_msgs/CameraInfo fields built from them (as realsense-ros fills them)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def optical_frame_id(camera_name: str, stream: str = "color") -> str:
    """REP-103 optical frame id as realsense-ros names it: `<camera_name>_<stream>_optical_frame`."""
    return f"{camera_name}_{stream}_optical_frame"


@dataclass(frozen=True)
class CameraIntrinsics:
    """Pinhole model in pixels. `coeffs` are the 5 Brown-Conrady (plumb_bob: k1 k2 t1 t2 k3) coefficients."""

    width: int
    height: int
    fx: float
    fy: float
    ppx: float
    ppy: float
    model: str = "plumb_bob"
    coeffs: tuple[float, ...] = field(default=(0.0, 0.0, 0.0, 0.0, 0.0))

    @classmethod
    def from_fov(cls, width: int, height: int, hfov_deg: float) -> CameraIntrinsics:
        """Ideal pinhole with square pixels and the principal point at the image centre (uncalibrated cameras)."""
        if not 1.0 < hfov_deg < 179.0:
            raise ValueError(f"horizontal field of view must be in (1, 179) degrees, got {hfov_deg}")
        f = (width / 2.0) / math.tan(math.radians(hfov_deg) / 2.0)
        return cls(width, height, f, f, (width - 1) / 2.0, (height - 1) / 2.0)

    @classmethod
    def from_realsense(cls, intr: Any) -> CameraIntrinsics:
        """From a `pyrealsense2.intrinsics`. Brown-Conrady-like models map to plumb_bob, Kannala-Brandt to
        equidistant (realsense-ros does the same)."""
        name = str(intr.model).rsplit(".", 1)[-1]
        model = "equidistant" if name == "kannala_brandt4" else "plumb_bob"
        return cls(int(intr.width), int(intr.height), float(intr.fx), float(intr.fy), float(intr.ppx),
                   float(intr.ppy), model, tuple(float(c) for c in intr.coeffs))


def camera_info_dict(intr: CameraIntrinsics, frame_id: str) -> dict[str, Any]:
    """Fields of sensor_msgs/CameraInfo (row-major K 3x3, R 3x3, P 3x4; d as given; no binning, full ROI)."""
    k = [intr.fx, 0.0, intr.ppx, 0.0, intr.fy, intr.ppy, 0.0, 0.0, 1.0]
    p = [intr.fx, 0.0, intr.ppx, 0.0, 0.0, intr.fy, intr.ppy, 0.0, 0.0, 0.0, 1.0, 0.0]
    return {
        "frame_id": frame_id,
        "width": intr.width,
        "height": intr.height,
        "distortion_model": intr.model,
        "d": list(intr.coeffs),
        "k": k,
        "r": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
        "p": p,
    }
