"""Frame health: frozen content, repeated frame numbers, stale stamps, fps/drops/age statistics.

Pure bookkeeping on host-clock nanoseconds; the node decides what to publish from the verdict.
"""

from __future__ import annotations

import enum
import hashlib
from collections import deque
from dataclasses import dataclass

import numpy as np


class Verdict(enum.Enum):
    OK = "ok"
    REPEATED = "repeated"  # same frame number as the previous frame: a duplicate delivery, dropped
    FROZEN = "frozen"  # identical content for `frozen_frames` frames in a row: the stream is stuck
    STALE = "stale"  # stamp older than `stale_s` at reception, or not after the previous stamp


@dataclass(frozen=True)
class HealthConfig:
    """frozen_frames: identical consecutive images that make a stream frozen (>= 2);
    stale_s: largest accepted age (reception host time - stamp) in seconds; window_s: fps averaging window."""

    frozen_frames: int = 10
    stale_s: float = 0.5
    window_s: float = 2.0

    def __post_init__(self) -> None:
        if self.frozen_frames < 2:
            raise ValueError("frozen_frames must be >= 2")
        if self.stale_s <= 0 or self.window_s <= 0:
            raise ValueError("stale_s and window_s must be > 0")


def content_hash(image: np.ndarray) -> bytes:
    """8-byte BLAKE2b digest of the whole image buffer (about 1 ms for 640x480x3)."""
    return hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=8).digest()


class FrameHealth:
    """Feed every received frame to `check`; read `stats()` for diagnostics. Thread-safe enough for one
    writer (capture thread) and one reader (diagnostics timer): readers only see plain ints/floats."""

    def __init__(self, config: HealthConfig | None = None) -> None:
        self.config = config or HealthConfig()
        self._last_hash: bytes | None = None
        self._same_count = 0
        self._last_number: int | None = None
        self._last_stamp_ns: int | None = None
        self._published: deque[int] = deque()
        self.frames = 0
        self.published = 0
        self.drops = 0
        self.repeated = 0
        self.stale = 0
        self.frozen_frames = 0
        self.frozen = False
        self.frozen_since_ns: int | None = None
        self.last_age_s = float("nan")
        self.last_publish_host_ns: int | None = None

    def reset_stream(self) -> None:
        """Forget frame numbers and stamps (after a reconnect). Counters and the content history are kept: a
        stream still frozen after reopening stays frozen rather than republishing the same image."""
        self._last_number = None
        self._last_stamp_ns = None

    def check(self, image: np.ndarray, frame_number: int | None, stamp_ns: int, host_now_ns: int) -> Verdict:
        """Classify one frame. stamp_ns: its ROS stamp; host_now_ns: reception time on the same clock."""
        self.frames += 1
        if frame_number is not None and self._last_number is not None:
            if frame_number == self._last_number:
                self.repeated += 1
                return Verdict.REPEATED
            gap = frame_number - self._last_number - 1
            if 0 < gap < 10_000:  # backwards or huge jumps are device resets, not drops
                self.drops += gap
        if frame_number is not None:
            self._last_number = frame_number
        digest = content_hash(image)
        self._same_count = self._same_count + 1 if digest == self._last_hash else 1
        self._last_hash = digest
        if self._same_count >= self.config.frozen_frames:
            if not self.frozen:
                self.frozen_since_ns = host_now_ns
            self.frozen = True
            self.frozen_frames += 1
            return Verdict.FROZEN
        self.frozen = False
        self.frozen_since_ns = None
        self.last_age_s = (host_now_ns - stamp_ns) * 1e-9
        if self.last_age_s > self.config.stale_s or (
                self._last_stamp_ns is not None and stamp_ns <= self._last_stamp_ns):
            self.stale += 1
            return Verdict.STALE
        self._last_stamp_ns = stamp_ns
        return Verdict.OK

    def mark_published(self, host_now_ns: int) -> None:
        self.published += 1
        self.last_publish_host_ns = host_now_ns
        self._published.append(host_now_ns)

    def fps(self, host_now_ns: int) -> float:
        """Published frames per second over the last `window_s`."""
        horizon = host_now_ns - int(self.config.window_s * 1e9)
        while self._published and self._published[0] < horizon:
            self._published.popleft()
        return len(self._published) / self.config.window_s
