"""Device timestamps -> ROS time (nanoseconds since the epoch, the ROS system clock).

Follows realsense-ros: `global_time` and `system_time` stamps are already host wall time in milliseconds and
are used as they are; `hardware_clock` stamps (device ticks in milliseconds, arbitrary origin) are mapped as
ros_base + (device - device_base), with both bases taken at the first frame and again whenever the device
clock jumps backwards or by more than `rebase_jump_s` (device reset, wrap-around).
"""

from __future__ import annotations

HOST_DOMAINS = ("global_time", "system_time")
HARDWARE_DOMAIN = "hardware_clock"


class TimestampMapper:
    """Stateful mapping for one stream. Not thread-safe: call from the capture thread only."""

    def __init__(self, rebase_jump_s: float = 5.0) -> None:
        self.rebase_jump_s = rebase_jump_s
        self._device_base_ms: float | None = None
        self._ros_base_ns = 0
        self._last_device_ms: float | None = None
        self.rebases = 0

    def to_ros_ns(self, device_ms: float, domain: str, host_now_ns: int) -> int:
        """ROS time in ns (whole microseconds) for a frame stamped `device_ms` (milliseconds) in `domain`,
        received at host_now_ns."""
        if domain in HOST_DOMAINS:
            return int(round(device_ms * 1e3)) * 1000  # a double holds epoch ms to ~0.2 us: keep whole us
        if domain != HARDWARE_DOMAIN:
            raise ValueError(f"unknown timestamp domain {domain!r}")
        last = self._last_device_ms
        if (self._device_base_ms is None or last is None or device_ms < last
                or device_ms - last > self.rebase_jump_s * 1e3):
            if self._device_base_ms is not None:
                self.rebases += 1
            self._device_base_ms = device_ms
            self._ros_base_ns = host_now_ns
        self._last_device_ms = device_ms
        return self._ros_base_ns + int(round((device_ms - self._device_base_ms) * 1e3)) * 1000
