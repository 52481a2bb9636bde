"""The one safety layer for the sim and the real robot: joint limits from the URDF, step limits, hold rules.

Pure numpy, no ROS. Units: positions rad (revolute) or m (prismatic, the gripper), velocities rad/s or m/s,
efforts N*m or N, times s. Every check returns a `Verdict` (ok + a short machine-readable reason + a human
detail) so nodes can log it and count reasons in /diagnostics; nothing here raises on bad *data*, only on a
bad *configuration* (e.g. a URDF without the joints asked for).

Reasons (stable strings, used as /diagnostics keys):
    "ok", "wrong_length", "non_finite", "position_limit", "workspace", "stale_observation", "no_observation"
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# A workspace hook gets joint positions [n] and returns None when fine, or a reason detail string.
WorkspaceCheck = Callable[[np.ndarray], "str | None"]


@dataclass(frozen=True)
class Verdict:
    """Outcome of a safety check. `command` is the (possibly clamped) joint target to send, or None."""

    ok: bool
    reason: str = "ok"
    detail: str = ""
    command: np.ndarray | None = None

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class SafetyLimits:
    """Per-joint limits in `joint_names` order: lower/upper position, max |velocity|, max |effort|.

    Continuous joints have lower = -inf, upper = +inf. Arrays are float64[n].
    """

    joint_names: tuple[str, ...]
    lower: np.ndarray
    upper: np.ndarray
    velocity: np.ndarray
    effort: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.joint_names)
        for name in ("lower", "upper", "velocity", "effort"):
            arr = np.asarray(getattr(self, name), dtype=np.float64)
            if arr.shape != (n,):
                raise ValueError(f"SafetyLimits.{name} has shape {arr.shape}, expected ({n},)")
            object.__setattr__(self, name, arr)
        if np.any(self.lower > self.upper):
            raise ValueError("SafetyLimits: lower > upper for some joint")
        if np.any(~(self.velocity > 0)):
            raise ValueError("SafetyLimits: every joint needs a positive velocity limit")

    @property
    def n(self) -> int:
        return len(self.joint_names)

    @classmethod
    def from_urdf(cls, path: str | Path, joint_names: Sequence[str] | None = None) -> SafetyLimits:
        """Parse <joint><limit lower upper velocity effort/> from a URDF (xml.etree, no ROS).

        joint_names selects and orders the joints; None takes every non-fixed, non-mimic joint in file order.
        Raises ValueError for a missing joint or a movable joint without a velocity limit.
        """
        root = ET.parse(str(path)).getroot()
        found: dict[str, tuple[float, float, float, float]] = {}
        order: list[str] = []
        for joint in root.iter("joint"):
            name = joint.get("name")
            jtype = joint.get("type", "")
            if name is None or jtype in ("fixed", "floating", "planar"):
                continue
            limit = joint.find("limit")
            if jtype == "continuous":
                lo, hi = -math.inf, math.inf
            else:
                if limit is None or limit.get("lower") is None or limit.get("upper") is None:
                    raise ValueError(f"URDF joint {name!r} ({jtype}) has no position limits")
                lo, hi = float(limit.get("lower")), float(limit.get("upper"))
            if limit is None or limit.get("velocity") is None:
                raise ValueError(f"URDF joint {name!r} has no velocity limit")
            vel = float(limit.get("velocity"))
            eff = float(limit.get("effort", "inf"))
            found[name] = (lo, hi, vel, eff)
            if joint.find("mimic") is None:
                order.append(name)
        names = list(joint_names) if joint_names is not None else order
        missing = [j for j in names if j not in found]
        if missing:
            raise ValueError(f"URDF {path} lacks joints {missing}; it has {sorted(found)}")
        rows = np.array([found[j] for j in names], dtype=np.float64).reshape(len(names), 4)
        return cls(tuple(names), rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3])

    # -- checks -------------------------------------------------------------------------------------------
    def check_vector(self, q: np.ndarray | Sequence[float], tol: float = 1e-6) -> Verdict:
        """Length, finiteness and position limits (with tolerance `tol`) of one joint vector [n]."""
        arr = np.asarray(q, dtype=np.float64)
        if arr.shape != (self.n,):
            return Verdict(False, "wrong_length", f"expected {self.n} values, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            bad = [self.joint_names[i] for i in np.flatnonzero(~np.isfinite(arr))]
            return Verdict(False, "non_finite", f"non-finite value for {bad}")
        out = (arr < self.lower - tol) | (arr > self.upper + tol)
        if np.any(out):
            i = int(np.flatnonzero(out)[0])
            return Verdict(False, "position_limit", f"{self.joint_names[i]}={arr[i]:.4f} outside "
                           f"[{self.lower[i]:.4f}, {self.upper[i]:.4f}]")
        return Verdict(True, command=arr)

    def clamp(self, q: np.ndarray) -> np.ndarray:
        """Clip positions [n] into [lower, upper]."""
        return np.clip(np.asarray(q, dtype=np.float64), self.lower, self.upper)

    def max_step(self, dt: float, velocity_scale: float = 1.0) -> np.ndarray:
        """Largest allowed |target change| per tick of `dt` seconds: velocity limit * scale * dt, float64[n]."""
        return self.velocity * float(velocity_scale) * float(dt)


@dataclass
class SafetyLayer:
    """Filters every joint target before it reaches the robot (sim or real).

    velocity_scale: fraction of the URDF velocity limit a target may move per second (rate limit).
    max_obs_age: observations older than this (s) make `filter` hold position.
    workspace: optional hook (joint positions -> None or reason detail), e.g. an FK box check.
    """

    limits: SafetyLimits
    velocity_scale: float = 1.0
    max_obs_age: float = 0.5
    workspace: WorkspaceCheck | None = None
    counters: dict[str, int] = field(default_factory=dict)

    def count(self, reason: str) -> None:
        self.counters[reason] = self.counters.get(reason, 0) + 1

    def check_target(self, q: np.ndarray | Sequence[float]) -> Verdict:
        """Reject (never clamp) a commanded target: length, finite, position limits, workspace hook."""
        verdict = self.limits.check_vector(q)
        if not verdict.ok:
            return verdict
        if self.workspace is not None:
            detail = self.workspace(verdict.command)
            if detail:
                return Verdict(False, "workspace", str(detail))
        return verdict

    def filter(self, current: np.ndarray, target: np.ndarray | None, dt: float,
               obs_age: float | None = 0.0) -> Verdict:
        """One control tick: the command to send given the last command `current` [n] and a desired `target`.

        Holds `current` (ok=False, command=current) when the target is missing/invalid or the observation is
        stale (obs_age > max_age or None); otherwise returns the target clamped to limits and rate-limited to
        max_step(dt, velocity_scale) away from `current`. Counts non-ok reasons in `counters`.
        """
        hold = np.asarray(current, dtype=np.float64).copy()
        if obs_age is None:
            self.count("no_observation")
            return Verdict(False, "no_observation", "no observation yet", hold)
        if not obs_age <= self.max_obs_age:  # also catches NaN ages
            self.count("stale_observation")
            return Verdict(False, "stale_observation", f"observation age {obs_age:.3f}s > {self.max_obs_age}s",
                           hold)
        if target is None:
            return Verdict(True, "ok", "hold", hold)
        verdict = self.check_target(target)
        if not verdict.ok:
            self.count(verdict.reason)
            return Verdict(False, verdict.reason, verdict.detail, hold)
        step = self.limits.max_step(dt, self.velocity_scale)
        cmd = hold + np.clip(verdict.command - hold, -step, step)
        return Verdict(True, "ok", "", self.limits.clamp(cmd))


def box_workspace(fk: Callable[[np.ndarray], np.ndarray], lower: Sequence[float],
                  upper: Sequence[float]) -> WorkspaceCheck:
    """Workspace hook: the tool position fk(q) (float[3], m, robot base frame) must lie in the box [lower, upper].

    fk gets the full joint vector [n] (it picks the arm joints itself). Returns None or a reason detail.
    """
    lo, hi = np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64)
    if lo.shape != (3,) or hi.shape != (3,) or np.any(lo > hi):
        raise ValueError(f"workspace box needs lower <= upper, 3 values each; got {lower}, {upper}")

    def check(q: np.ndarray) -> str | None:
        p = np.asarray(fk(q), dtype=np.float64)
        if not np.all(np.isfinite(p)) or np.any(p < lo) or np.any(p > hi):
            return f"tool at {np.round(p, 4).tolist()} outside workspace box {lo.tolist()}..{hi.tolist()}"
        return None

    return check
