"""Pure logic of episode recording and teleop-reset collection (no rclpy; the nodes in qvgm_policy_node wrap it).

- `Aligner`: samples every stream "as-of" the frames of a reference camera at the dataset fps: for a reference
  frame stamped t, each other stream contributes its latest message with stamp <= t and t - stamp <= max_age
  (never a future message). It detects dropped, late, duplicated and frozen frames; `QualityReport` decides
  whether the episode is marked (kept, flags in the episode notes) or refused.
- `ChunkTracker`: the action of a frame = the setpoint of the trajectory being executed at the frame's time:
  the most recent chunk (JointTrajectory) whose header stamp <= t, interpolated linearly over its points'
  `time_from_start` (JTC semantics; before the first point its first point, after the last point the last).
- `EpisodeStateMachine`: IDLE -> RUNNING (policy drives) -> LABEL -> RESET (teleop drives) -> IDLE, operator
  takeover during RUNNING, time limit, auto labels from the sim success signal.
- `JoyMapping` / `Jogger`: sensor_msgs/Joy axes/buttons -> joint/gripper jog targets with a deadman, per-step and
  joint-limit clamps.

Times are seconds on the robot (ROS node) clock; joint positions rad, gripper m; vectors ordered as the
dataset's state/action names. (Actions here are absolute joint targets in robot units, not flow-time chunks:
the flow-time convention of qvgm/policy/interface.py does not enter this module.)
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------------------------- alignment


def image_digest(img: np.ndarray) -> bytes:
    """Cheap content fingerprint of an image (for frozen-frame detection): blake2b of a strided subsample."""
    a = np.ascontiguousarray(np.asarray(img)[::4, ::4])
    return hashlib.blake2b(a.tobytes(), digest_size=16).digest()


@dataclass
class QualityConfig:
    """Thresholds of the frame checks. `mode` "mark" keeps a flawed episode (flags in its notes), "refuse"
    drops it. An episode is flawed when any count exceeds its tolerance (default 0 = any event)."""

    mode: str = "mark"
    max_age: float = 0.1  # s, oldest acceptable as-of message for a non-reference stream
    max_latency: float = 0.2  # s, arrival time - stamp above which a reference frame is "late"
    gap_factor: float = 1.5  # a gap > gap_factor / fps between sampled reference frames counts dropped frames
    frozen_frames: int = 3  # this many consecutive identical images (distinct stamps) = frozen
    tolerance: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in ("mark", "refuse"):
            raise ValueError(f"quality mode must be 'mark' or 'refuse', got {self.mode!r}")
        if not (self.max_age > 0 and self.max_latency > 0 and self.gap_factor > 1 and self.frozen_frames >= 2):
            raise ValueError("max_age, max_latency > 0, gap_factor > 1, frozen_frames >= 2 required")


QUALITY_EVENTS = ("dropped", "late", "duplicated", "frozen", "stale", "queue_overflow", "no_action")


@dataclass
class QualityReport:
    """Counts of each event in one episode, plus the first few details (for the notes)."""

    counts: dict[str, int] = field(default_factory=lambda: {k: 0 for k in QUALITY_EVENTS})
    details: list[str] = field(default_factory=list)

    def add(self, event: str, detail: str, n: int = 1) -> None:
        self.counts[event] = self.counts.get(event, 0) + n
        if len(self.details) < 20:
            self.details.append(f"{event}: {detail}")

    def flawed(self, cfg: QualityConfig) -> list[str]:
        """Events whose count exceeds the tolerance."""
        return [k for k, v in self.counts.items() if v > cfg.tolerance.get(k, 0)]

    def verdict(self, cfg: QualityConfig) -> str:
        """"ok", "marked" or "refused"."""
        if not self.flawed(cfg):
            return "ok"
        return "refused" if cfg.mode == "refuse" else "marked"

    def notes(self, cfg: QualityConfig, **extra: Any) -> str:
        return json.dumps({"recorder": {"verdict": self.verdict(cfg), "flawed": self.flawed(cfg),
                                        "counts": self.counts, "details": self.details, **extra}})


@dataclass
class Sample:
    """One aligned dataset frame: reference stamp t, the as-of message of each stream (None if missing)."""

    stamp: float
    images: dict[str, np.ndarray]
    state: np.ndarray | None
    state_stamp: float | None
    image_stamps: dict[str, float]


class StreamHistory:
    """Time-sorted recent messages of one stream (stamp, value); as-of queries by stamp."""

    def __init__(self, horizon: float = 5.0) -> None:
        self.stamps: list[float] = []
        self.values: list[Any] = []
        self.horizon = horizon

    def add(self, stamp: float, value: Any) -> bool:
        """Insert in stamp order; returns False (ignored) for an exact duplicate stamp."""
        i = bisect.bisect_right(self.stamps, stamp)
        if i > 0 and self.stamps[i - 1] == stamp:
            return False
        self.stamps.insert(i, stamp)
        self.values.insert(i, value)
        cut = bisect.bisect_left(self.stamps, self.stamps[-1] - self.horizon)
        if cut > 1:  # keep one message older than the horizon for as-of lookups
            del self.stamps[:cut - 1]
            del self.values[:cut - 1]
        return True

    def as_of(self, t: float) -> tuple[float, Any] | None:
        """Latest (stamp, value) with stamp <= t, or None."""
        i = bisect.bisect_right(self.stamps, t)
        return (self.stamps[i - 1], self.values[i - 1]) if i else None


class Aligner:
    """Aligns cameras and joint states to the reference camera at `fps`.

    Feed messages with `add_image(cam, stamp, img, arrival)` / `add_state(stamp, q)`; reference frames wait in a
    queue until `now >= stamp + delay` (so late joint states/other cameras can still arrive), then
    `pop_ready(now)` returns Samples. Reference frames closer than 1/fps (minus `slack`) to the previous sampled
    frame are skipped (down-sampling a faster camera), not counted as events.
    """

    def __init__(self, cameras: list[str], reference: str, fps: float, cfg: QualityConfig,
                 delay: float = 0.05) -> None:
        if reference not in cameras:
            raise ValueError(f"reference camera {reference!r} not in cameras {cameras}")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.cameras, self.reference, self.fps, self.cfg, self.delay = list(cameras), reference, fps, cfg, delay
        self.period = 1.0 / fps
        # images are big (0.9 MB at 640x480): keep only what an as-of lookup can still use
        img_horizon = max(1.0, 2.0 * (cfg.max_age + delay))
        self.images = {c: StreamHistory(img_horizon) for c in cameras if c != reference}
        self.states = StreamHistory()
        self.report = QualityReport()
        self._pending: deque[tuple[float, np.ndarray]] = deque()
        self._last_ref_stamp: float | None = None  # last reference stamp received
        self._last_sampled: float | None = None
        self._digests: dict[str, tuple[bytes, int]] = {}  # camera -> (digest, run length)
        self._as_of_stamp: dict[str, float] = {}
        self.start: float = -math.inf  # ignore frames before (episode start)

    def reset(self, start: float) -> None:
        """New episode starting at `start` (s): new report, forget the sampling phase and pending frames."""
        self.report = QualityReport()
        self._pending.clear()
        self._last_sampled = None
        self._digests.clear()
        self.start = start

    def _frozen_check(self, cam: str, stamp: float, img: np.ndarray) -> None:
        d = image_digest(img)
        prev = self._digests.get(cam)
        run = prev[1] + 1 if prev is not None and prev[0] == d else 1
        self._digests[cam] = (d, run)
        if run == self.cfg.frozen_frames:
            self.report.add("frozen", f"{cam}: {run} identical images up to t={stamp:.3f}")
        elif run > self.cfg.frozen_frames:
            self.report.counts["frozen"] += 1

    def add_image(self, cam: str, stamp: float, img: np.ndarray, arrival: float | None = None) -> None:
        """A camera image (uint8[H, W, 3]) stamped `stamp` (s), received at `arrival` (s, same clock)."""
        if cam == self.reference:
            if self._last_ref_stamp is not None and stamp <= self._last_ref_stamp:
                if stamp >= self.start:
                    self.report.add("duplicated", f"{cam}: stamp {stamp:.3f} <= previous {self._last_ref_stamp:.3f}")
                return
            self._last_ref_stamp = stamp
            if stamp < self.start:
                return
            if arrival is not None and arrival - stamp > self.cfg.max_latency:
                self.report.add("late", f"{cam}: t={stamp:.3f} arrived {arrival - stamp:.3f}s late")
            self._pending.append((stamp, img))
        elif cam in self.images:
            if not self.images[cam].add(stamp, img) and stamp >= self.start:
                self.report.add("duplicated", f"{cam}: stamp {stamp:.3f} repeated")
        # unknown cameras are ignored

    def add_state(self, stamp: float, q: np.ndarray) -> None:
        """A joint-state vector (robot units) stamped `stamp`."""
        self.states.add(stamp, np.asarray(q, dtype=np.float32))

    def pop_ready(self, now: float) -> list[Sample]:
        """Samples for pending reference frames with stamp + delay <= now."""
        out: list[Sample] = []
        while self._pending and self._pending[0][0] + self.delay <= now:
            stamp, img = self._pending.popleft()
            s = self._sample(stamp, img)
            if s is not None:
                out.append(s)
        return out

    def flush(self) -> list[Sample]:
        """Samples for every pending frame (episode end)."""
        return self.pop_ready(math.inf)

    def _sample(self, stamp: float, img: np.ndarray) -> Sample | None:
        slack = 0.25 * self.period
        if self._last_sampled is not None:
            gap = stamp - self._last_sampled
            if gap < self.period - slack:
                return None  # faster camera: down-sample
            if gap > self.cfg.gap_factor * self.period:
                missing = int(round(gap / self.period)) - 1
                self.report.add("dropped", f"{missing} frame(s) missing before t={stamp:.3f} (gap {gap:.3f}s)",
                                n=max(missing, 1))
        self._last_sampled = stamp
        self._frozen_check(self.reference, stamp, img)
        images = {self.reference: img}
        image_stamps = {self.reference: stamp}
        for cam, hist in self.images.items():
            got = hist.as_of(stamp)
            if got is None or stamp - got[0] > self.cfg.max_age:
                self.report.add("stale", f"{cam}: no image within {self.cfg.max_age}s before t={stamp:.3f}")
                images[cam] = None  # type: ignore[assignment]
                continue
            images[cam], image_stamps[cam] = got[1], got[0]
            if self._as_of_stamp.get(cam) != got[0]:  # the same message reused is staleness, not a frozen camera
                self._as_of_stamp[cam] = got[0]
                self._frozen_check(cam, got[0], got[1])
        got = self.states.as_of(stamp)
        if got is None or stamp - got[0] > self.cfg.max_age:
            self.report.add("stale", f"joint_states: none within {self.cfg.max_age}s before t={stamp:.3f}")
            return Sample(stamp, images, None, None, image_stamps)
        return Sample(stamp, images, got[1], got[0], image_stamps)


# ---------------------------------------------------------------------------------------------- actions


@dataclass
class Chunk:
    """A received trajectory: absolute targets positions[H, n] (robot units) at stamp + times[k] (s)."""

    stamp: float
    times: np.ndarray
    positions: np.ndarray
    version: str
    source: str = "policy"


class ChunkTracker:
    """The setpoint being executed at time t (see module doc). Chunks must use the dataset's joint order."""

    def __init__(self, horizon: float = 30.0) -> None:
        self.chunks: list[Chunk] = []
        self.horizon = horizon

    def add(self, chunk: Chunk) -> None:
        if chunk.positions.ndim != 2 or len(chunk.positions) == 0 or len(chunk.times) != len(chunk.positions):
            raise ValueError("chunk needs positions[H>=1, n] and times[H]")
        if np.any(np.diff(chunk.times) <= 0) or not np.all(np.isfinite(chunk.positions)):
            raise ValueError("chunk times must increase strictly and positions be finite")
        stamps = [c.stamp for c in self.chunks]
        i = bisect.bisect_right(stamps, chunk.stamp)
        self.chunks.insert(i, chunk)
        while len(self.chunks) > 2 and self.chunks[1].stamp < self.chunks[-1].stamp - self.horizon:
            self.chunks.pop(0)

    def clear(self) -> None:
        self.chunks.clear()

    def at(self, t: float) -> tuple[np.ndarray, Chunk] | None:
        """(setpoint float32[n], its chunk) at time t, or None when no chunk with stamp <= t exists."""
        i = bisect.bisect_right([c.stamp for c in self.chunks], t)
        if i == 0:
            return None
        c = self.chunks[i - 1]
        rel = t - c.stamp
        times, pos = c.times, c.positions
        if rel <= times[0]:
            q = pos[0]
        elif rel >= times[-1]:
            q = pos[-1]
        else:
            k = int(np.searchsorted(times, rel, side="right")) - 1
            w = (rel - times[k]) / (times[k + 1] - times[k])
            q = (1 - w) * pos[k] + w * pos[k + 1]
        return np.asarray(q, dtype=np.float32), c


class Timeline:
    """Piecewise-constant value over time (e.g. who controls the robot): value as of t."""

    def __init__(self, initial: Any) -> None:
        self.stamps: list[float] = [-math.inf]
        self.values: list[Any] = [initial]

    def set(self, stamp: float, value: Any) -> None:
        """value holds from `stamp` on (a repeat of the current value is ignored; the history is bounded)."""
        if self.at(stamp) == value:
            return
        i = bisect.bisect_right(self.stamps, stamp)
        self.stamps.insert(i, stamp)
        self.values.insert(i, value)
        if len(self.stamps) > 4096:
            del self.stamps[1:2048], self.values[1:2048]
            self.stamps[0] = -math.inf

    def at(self, t: float) -> Any:
        return self.values[bisect.bisect_right(self.stamps, t) - 1]


# ---------------------------------------------------------------------------------------------- episodes

IDLE, RUNNING, LABEL, RESET = "IDLE", "RUNNING", "LABEL", "RESET"


@dataclass
class Transition:
    """Result of a state-machine request: ok, message (for the service response)."""

    ok: bool
    message: str

    def __bool__(self) -> bool:
        return self.ok


class EpisodeStateMachine:
    """IDLE -> RUNNING -> LABEL -> RESET -> IDLE.

    - start (IDLE, or RESET = reset finished + start): new episode, policy drives.
    - takeover(on) (RUNNING): teleop drives, steps flagged is_intervention; off gives control back.
    - stop (RUNNING -> LABEL, terminal); time limit (RUNNING -> LABEL, truncated, auto failure label when
      `auto_label_timeout`); sim success (RUNNING -> LABEL with auto label success -> RESET).
    - label(success) (LABEL -> RESET); discard (RUNNING or LABEL -> RESET, episode discarded).
    - reset_done (RESET -> IDLE; the operator's `stop` in RESET, or the sim reset completing).
    Invalid requests return Transition(False, reason) and change nothing. `now` is seconds (node clock).
    """

    def __init__(self, time_limit: float = 60.0, auto_label_timeout: bool = False) -> None:
        if not time_limit > 0:
            raise ValueError(f"time_limit must be > 0 s, got {time_limit}")
        self.time_limit = time_limit
        self.auto_label_timeout = auto_label_timeout
        self.state = IDLE
        self.episode = -1  # index of the current/last episode (manager count, not the buffer index)
        self.t_start: float | None = None
        self.t_end: float | None = None
        self.takeover = False
        self.control_since = 0.0
        self.label: bool | None = None
        self.label_source: str | None = None
        self.discarded = False
        self.terminal = False  # the episode ended in a real terminal state (success or operator stop)
        self.end_reason: str | None = None
        self.seq = 0

    @property
    def control(self) -> str:
        """Who may command the robot: "policy" or "teleop"."""
        return "policy" if self.state == RUNNING and not self.takeover else "teleop"

    def _bump(self, now: float, control_before: str) -> None:
        self.seq += 1
        if self.control != control_before:
            self.control_since = now

    def start(self, now: float) -> Transition:
        if self.state == RESET:
            self.reset_done(now)
        if self.state != IDLE:
            return Transition(False, f"cannot start in state {self.state} (label or discard the episode first)")
        c = self.control
        self.state, self.episode, self.t_start, self.t_end = RUNNING, self.episode + 1, now, None
        self.takeover, self.label, self.label_source, self.discarded = False, None, None, False
        self.terminal, self.end_reason = False, None
        self._bump(now, c)
        return Transition(True, f"episode {self.episode} started")

    def stop(self, now: float) -> Transition:
        if self.state == RESET:
            return self.reset_done(now)
        if self.state != RUNNING:
            return Transition(False, f"cannot stop in state {self.state}")
        return self._end(now, "stopped", terminal=True)

    def _end(self, now: float, reason: str, terminal: bool) -> Transition:
        c = self.control
        self.state, self.t_end, self.end_reason, self.terminal = LABEL, now, reason, terminal
        self.takeover = False
        self._bump(now, c)
        return Transition(True, f"episode {self.episode} {reason}; waiting for a label")

    def takeover_request(self, on: bool, now: float) -> Transition:
        if self.state != RUNNING:
            return Transition(False, f"takeover only while RUNNING (state {self.state})")
        if self.takeover == on:
            return Transition(True, f"takeover already {'on' if on else 'off'}")
        c = self.control
        self.takeover = on
        self._bump(now, c)
        return Transition(True, f"takeover {'on: teleop drives' if on else 'off: policy drives'}")

    def label_request(self, success: bool, now: float, source: str = "operator") -> Transition:
        if self.state != LABEL:
            return Transition(False, f"cannot label in state {self.state} (stop the episode first)")
        c = self.control
        self.label, self.label_source, self.state = bool(success), source, RESET
        self._bump(now, c)
        return Transition(True, f"episode {self.episode} labelled {'success' if success else 'failure'} "
                                f"({source}); reset the scene")

    def discard(self, now: float) -> Transition:
        if self.state == RUNNING:
            self._end(now, "discarded", terminal=False)
        if self.state != LABEL:
            return Transition(False, f"cannot discard in state {self.state}")
        c = self.control
        self.discarded, self.state = True, RESET
        self._bump(now, c)
        return Transition(True, f"episode {self.episode} discarded; reset the scene")

    def reset_done(self, now: float) -> Transition:
        if self.state != RESET:
            return Transition(False, f"no reset in progress (state {self.state})")
        c = self.control
        self.state = IDLE
        self._bump(now, c)
        return Transition(True, "reset done; ready")

    def tick(self, now: float) -> Transition | None:
        """Enforce the time limit; returns the transition when it fired."""
        if self.state == RUNNING and self.t_start is not None and now - self.t_start >= self.time_limit:
            tr = self._end(now, "timeout", terminal=False)
            if self.auto_label_timeout:
                self.label_request(False, now, source="auto")
            return tr
        return None

    def sim_success(self, now: float) -> Transition | None:
        """The sim reports success: end the episode (terminal) and label it success automatically."""
        if self.state != RUNNING:
            return None
        self._end(now, "success", terminal=True)
        return self.label_request(True, now, source="auto")

    def status(self, now: float) -> dict[str, Any]:
        """The JSON-able status published on /qvgm/episode/status."""
        elapsed = 0.0
        if self.t_start is not None:
            elapsed = (self.t_end if self.t_end is not None else now) - self.t_start
        return {"seq": self.seq, "state": self.state, "episode": self.episode, "elapsed": round(elapsed, 4),
                "takeover": self.takeover, "control": self.control, "control_since": self.control_since,
                "t_start": self.t_start, "t_end": self.t_end, "end_reason": self.end_reason,
                "terminal": self.terminal, "label": self.label, "label_source": self.label_source,
                "discarded": self.discarded, "time_limit": self.time_limit}


# ---------------------------------------------------------------------------------------------- teleop


@dataclass
class JoyMapping:
    """Joy -> jog velocities. axes[j] = Joy axis index driving joint j (-1: none), scale[j] in rad/s (m/s for the
    gripper) at full deflection, deadzone on |axis|. The gripper (last joint) may also be driven by two buttons
    at `gripper_speed` m/s. The deadman button must be held for any motion."""

    axes: list[int]
    scale: list[float]
    deadman_button: int = 4
    gripper_open_button: int = -1
    gripper_close_button: int = -1
    gripper_speed: float = 0.02
    deadzone: float = 0.1

    def __post_init__(self) -> None:
        if len(self.axes) != len(self.scale) or not self.axes:
            raise ValueError(f"axes ({len(self.axes)}) and scale ({len(self.scale)}) must have one entry per joint")

    def velocity(self, axes: list[float], buttons: list[int]) -> np.ndarray | None:
        """Jog velocity float64[n] (robot units/s), or None when the deadman is not held (or missing)."""
        if not (0 <= self.deadman_button < len(buttons)) or not buttons[self.deadman_button]:
            return None
        v = np.zeros(len(self.axes))
        for j, (a, s) in enumerate(zip(self.axes, self.scale, strict=True)):
            if 0 <= a < len(axes):
                x = float(axes[a])
                if math.isfinite(x) and abs(x) > self.deadzone:
                    x = max(-1.0, min(1.0, x))
                    v[j] = s * math.copysign((abs(x) - self.deadzone) / (1 - self.deadzone), x)
        ob, cb = self.gripper_open_button, self.gripper_close_button
        if 0 <= ob < len(buttons) and buttons[ob]:
            v[-1] += self.gripper_speed
        if 0 <= cb < len(buttons) and buttons[cb]:
            v[-1] -= self.gripper_speed
        return v


class Jogger:
    """Integrates jog velocities into absolute targets with clamps: per-step |dq| <= max_velocity*dt and
    lower <= q <= upper (simple clamps; qvgm.safety is applied downstream by the robot/sim node)."""

    def __init__(self, lower: np.ndarray, upper: np.ndarray, max_velocity: np.ndarray) -> None:
        self.lower, self.upper = np.asarray(lower, float), np.asarray(upper, float)
        self.max_velocity = np.asarray(max_velocity, float)
        if not (self.lower.shape == self.upper.shape == self.max_velocity.shape) or np.any(self.lower > self.upper):
            raise ValueError("lower/upper/max_velocity must have equal shapes with lower <= upper")
        self.target: np.ndarray | None = None

    def anchor(self, q: np.ndarray) -> None:
        """Start jogging from the measured position q (robot units)."""
        self.target = np.clip(np.asarray(q, float), self.lower, self.upper)

    def step(self, velocity: np.ndarray, dt: float) -> np.ndarray:
        """Advance the target by velocity*dt (clamped); returns the new target float64[n]."""
        if self.target is None:
            raise RuntimeError("jogger has no anchor (no joint state yet)")
        v = np.clip(np.nan_to_num(np.asarray(velocity, float)), -self.max_velocity, self.max_velocity)
        self.target = np.clip(self.target + v * dt, self.lower, self.upper)
        return self.target.copy()


# Keyboard mode: key -> command. Digits select a joint (7 = gripper), '=' / '-' jog it by one step.
KEY_COMMANDS = {"g": "start", "x": "stop", "s": "success", "f": "failure", "d": "discard", "t": "takeover",
                "r": "reset_done", "=": "jog+", "+": "jog+", "-": "jog-"}


def parse_key(ch: str) -> tuple[str, int | None] | None:
    """One keyboard character -> (command, joint) or None. Joint select: ("select", j) for '1'..'9'."""
    if ch.isdigit() and ch != "0":
        return "select", int(ch) - 1
    cmd = KEY_COMMANDS.get(ch)
    return (cmd, None) if cmd else None


# ---------------------------------------------------------------------------------------------- recorder core


@dataclass
class EpisodeOutcome:
    """How a recorded episode ended (from the episode manager's status)."""

    success: bool | None
    label_source: str | None
    discarded: bool
    terminal: bool
    end_reason: str | None


class EpisodeRecorder:
    """Recorder core, independent of ROS: the node feeds messages in (any thread, under one lock) and calls
    `poll(now)` periodically; aligned frames go through a bounded queue to ONE worker thread that owns the
    ReplayBuffer (video encoding + disk I/O never run on the caller's thread).

    Frame i: images/state as-of the reference frame t_i; action a_i = ChunkTracker setpoint at t_i (the held
    state, flagged "no_action", when no chunk exists yet); is_intervention = teleop had control at t_i;
    policy_version = the version tagged on the executed chunk ("teleop" for intervention frames); the last
    frame gets next.done = outcome.terminal and next.reward = 1 on success (0 elsewhere).
    """

    def __init__(self, buffer: Any, reference: str, cfg: QualityConfig, delay: float = 0.05,
                 queue_size: int = 256, default_task: str = "", logger: Any = None) -> None:
        import queue
        import threading

        self.buffer = buffer
        self.cfg = cfg
        self.cameras = list(buffer.cameras)
        self.sizes = dict(buffer.cameras)
        self.aligner = Aligner(self.cameras, reference, buffer.fps, cfg, delay)
        self.chunks = ChunkTracker()
        self.control = Timeline("teleop")
        self.version = ""
        self.task = default_task
        self.lock = threading.RLock()
        self.log = logger
        self.episode: int | None = None  # manager episode id being recorded
        self.t_start: float | None = None
        self.t_end: float | None = None
        self.outcome: EpisodeOutcome | None = None
        self.frames_queued = 0
        self.results: list[dict[str, Any]] = []  # one per finished/refused episode (worker thread appends)
        self.errors: list[str] = []
        self.queue_size = queue_size
        self._q: queue.Queue = queue.Queue()  # bounded for frames by _put; control items never block the caller
        self._worker = threading.Thread(target=self._run, name="recorder-writer", daemon=True)
        self._worker.start()

    # -------------------------------------------------------------- inputs (callback side)
    def add_image(self, cam: str, stamp: float, img: np.ndarray, arrival: float) -> None:
        with self.lock:
            self.aligner.add_image(cam, stamp, img, arrival)

    def add_state(self, stamp: float, q: np.ndarray) -> None:
        with self.lock:
            self.aligner.add_state(stamp, q)

    def add_chunk(self, stamp: float, times: np.ndarray, positions: np.ndarray) -> None:
        with self.lock:
            self.chunks.add(Chunk(stamp, np.asarray(times, float), np.asarray(positions, float), self.version))

    def set_version(self, version: str) -> None:
        with self.lock:
            self.version = version

    def set_task(self, task: str) -> None:
        with self.lock:
            self.task = task

    def on_status(self, st: dict[str, Any]) -> None:
        """Episode-manager status (see EpisodeStateMachine.status)."""
        with self.lock:
            self.control.set(float(st.get("control_since") or 0.0), st.get("control", "teleop"))
            ep, state = int(st["episode"]), st["state"]
            if state == RUNNING and ep != self.episode:
                if self.episode is not None and self.outcome is not None:
                    self._finalize()  # the next episode started before the last one's final frames were due
                elif self.episode is not None:
                    self._abort("superseded by a new episode before it was labelled")
                self.episode, self.t_start, self.t_end, self.outcome = ep, float(st["t_start"]), None, None
                self.aligner.reset(self.t_start)
                self._put(("begin", ep, self.task, self.t_start), force=True)
            elif ep == self.episode and state in (LABEL, RESET, IDLE) and st.get("t_end") is not None:
                self.t_end = float(st["t_end"])
                if st.get("label") is not None or st.get("discarded") or state in (RESET, IDLE):
                    self.outcome = EpisodeOutcome(st.get("label"), st.get("label_source"), bool(st.get("discarded")),
                                                  bool(st.get("terminal")), st.get("end_reason"))

    # -------------------------------------------------------------- sampling
    def poll(self, now: float) -> int:
        """Turn reference frames ready at `now` into frames for the writer; finish an ended episode once its last
        frame is due and its outcome is known. Returns the number of frames queued."""
        with self.lock:
            if self.episode is None:
                self.aligner.pop_ready(now)  # keep the pending queue short between episodes
                return 0
            n = 0
            for s in self.aligner.pop_ready(now):
                if self.t_end is not None and s.stamp > self.t_end:
                    continue
                n += self._frame(s)
            if self.t_end is not None and self.outcome is not None and now >= self.t_end + self.aligner.delay:
                n += self._finalize()
            return n

    def _finalize(self) -> int:
        """Flush the ended episode's remaining frames (stamp <= t_end) and queue its commit or refusal."""
        n = 0
        assert self.t_end is not None and self.outcome is not None
        for s in self.aligner.flush():
            if s.stamp <= self.t_end:
                n += self._frame(s)
        rep = self.aligner.report
        o = self.outcome
        notes = rep.notes(self.cfg, manager_episode=self.episode, end_reason=o.end_reason)
        if rep.verdict(self.cfg) == "refused":
            self._put(("abort", self.episode, f"refused: {rep.flawed(self.cfg)}", notes), force=True)
        else:
            self._put(("finish", self.episode, o, notes, self.t_end - (self.t_start or self.t_end)), force=True)
        self.episode, self.outcome = None, None
        return n

    def _frame(self, s: Sample) -> int:
        rep = self.aligner.report
        if s.state is None or any(v is None for v in s.images.values()):
            return 0  # counted as "stale" by the aligner; the frame is skipped, never misaligned
        got = self.chunks.at(s.stamp)
        teleop = self.control.at(s.stamp) == "teleop"
        if got is None:
            rep.add("no_action", f"no trajectory at t={s.stamp:.3f}; action = held state")
            action, version = s.state.copy(), ""
        else:
            action, version = got[0], got[1].version
        if teleop:
            version = "teleop"
        obs = {"images": s.images, "state": s.state, "prompt": self.task or "unspecified task", "stamp": s.stamp}
        if not self._put(("frame", self.episode, obs, action, teleop, version)):
            rep.add("queue_overflow", f"writer queue full at t={s.stamp:.3f}; frame dropped")
            return 0
        self.frames_queued += 1
        return 1

    def _abort(self, why: str) -> None:
        self._put(("abort", self.episode, why, None), force=True)
        self.episode, self.outcome = None, None

    def _put(self, item: tuple, force: bool = False) -> bool:
        """Never blocks: frames are refused when `queue_size` items wait; control items always go in."""
        if not force and self._q.qsize() >= self.queue_size:
            return False
        self._q.put_nowait(item)
        return True

    # -------------------------------------------------------------- writer thread
    def _run(self) -> None:
        writer = None
        ep_id = None
        last: tuple | None = None  # the newest frame is held back until we know whether it is the last one
        while True:
            item = self._q.get()
            kind = item[0]
            try:
                if kind == "stop":
                    if writer is not None:
                        writer.abort()
                    return
                if kind == "begin":
                    if writer is not None:
                        writer.abort()
                    _, ep_id, task, t0 = item
                    writer = self.buffer.begin_episode(task=task or None, start_stamp=t0)
                    last = None
                elif writer is None or item[1] != ep_id:
                    continue  # the episode was refused/aborted; drop its leftovers
                elif kind == "frame":
                    if last is not None:
                        writer.add_frame(last[0], last[1], is_intervention=last[2], policy_version=last[3])
                    last = item[2:]
                elif kind == "abort":
                    writer.abort()
                    writer = None
                    self.results.append({"episode": ep_id, "index": None, "status": item[2], "notes": item[3]})
                elif kind == "finish":
                    _, _, o, notes, duration = item
                    if last is None:
                        writer.abort()
                        writer = None
                        self.results.append({"episode": ep_id, "index": None, "status": "empty", "notes": notes})
                        continue
                    writer.add_frame(last[0], last[1], reward=1.0 if o.success else 0.0, done=o.terminal,
                                     is_intervention=last[2], policy_version=last[3])
                    w, writer, last = writer, None, None
                    index = w.finish(success=o.success, label_source=o.label_source if o.success is not None else None,
                                     discarded=o.discarded, duration_s=duration, notes=notes)
                    self.results.append({"episode": ep_id, "index": index, "status": "committed", "notes": notes})
            except Exception as exc:  # never let the writer thread die; the episode is refused
                msg = f"episode {ep_id}: {kind} failed: {type(exc).__name__}: {exc}"
                self.errors.append(msg)
                if self.log is not None:
                    self.log(msg)
                if writer is not None and not writer.closed:
                    writer.abort()
                writer = None
                self.results.append({"episode": ep_id, "index": None, "status": f"error: {exc}", "notes": None})

    def pending(self) -> int:
        return self._q.qsize()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the writer thread (an unfinished episode is aborted) and close the buffer."""
        self._q.put(("stop",))
        self._worker.join(timeout)
        self.buffer.close()
