"""Scripted IK experts for the tabletop tasks.

An expert sees only what a ROS node sees: the joint state float[7] ([joint_1..6] rad, gripper m per finger) and
object poses by role (xyz m + quat wxyz, world = base_link frame). It returns ABSOLUTE joint targets float[7]
for the next control tick (10 Hz by default). Internally it moves a tool0 set-point along Cartesian waypoints
(top-down grasps, damped-least-squares IK on the arm model compiled from the URDF).

``noise`` (m): std of Gaussian noise added to every waypoint (sampled once per phase) and, at half that std,
to the per-tick tool set-point; seeded by ``seed``. noise=0 is deterministic.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from qvgm.sim.ik import ArmIK, top_down_rotation
from qvgm.sim.robot import GRIPPER_CLOSED, GRIPPER_OPEN
from qvgm.sim.tasks import CUBE_HALF, TASKS, quat_yaw

_SPEED = 0.30  # tool set-point speed, m/s
_YAW_SPEED = 3.0  # rad/s
_SAFE_Z = 0.16  # transport height of tool0, m


def _wrap(a: float) -> float:
    return float((a + np.pi) % (2 * np.pi) - np.pi)


@dataclass
class _State:
    """Everything that evolves while the expert acts (copied for open-loop chunk prediction)."""

    phase: str = "start"
    q: np.ndarray | None = None  # last IK solution, arm joints [6]
    pos: np.ndarray | None = None  # tool set-point, m [3]
    yaw: float = 0.0  # tool yaw set-point, rad
    grip: float = GRIPPER_OPEN
    ticks: int = 0  # ticks spent in the current phase
    offset: np.ndarray = field(default_factory=lambda: np.zeros(3))  # waypoint noise of this phase
    held_offset: np.ndarray = field(default_factory=lambda: np.zeros(2))  # cube xy - tool xy after grasp
    grasp_yaw: float = 0.0
    retries: int = 0
    stroke_end: np.ndarray = field(default_factory=lambda: np.zeros(2))  # push expert: end of the stroke, m
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))


class _Expert:
    """Base: Cartesian set-point tracking and IK; subclasses define the phase logic in ``_plan``."""

    @property
    def required_roles(self) -> tuple[str, ...]:
        """Object roles this expert reads from ``objects``."""
        return ("target_cube", "goal") if self.task == "push" else (
            ("target_cube", "bowl") if self.task == "pick_place" else ("target_cube", "base_cube"))

    def __init__(self, task: str, noise: float = 0.0, seed: int | None = None, control_hz: float = 10.0) -> None:
        if noise < 0 or not np.isfinite(noise):
            raise ValueError(f"noise must be a finite std >= 0 (m), got {noise}")
        self.task = task
        self.noise = float(noise)
        self.seed = seed
        self.dt = 1.0 / float(control_hz)
        self.ik = ArmIK()
        self._predict = False
        self.reset()

    def reset(self) -> None:
        """Forget the episode (call at every env reset)."""
        self.s = _State(rng=np.random.default_rng(self.seed))

    # -- helpers ---------------------------------------------------------------------------------------
    def _enter(self, phase: str) -> None:
        self.s.phase = phase
        self.s.ticks = 0
        self.s.offset = self.s.rng.normal(0.0, self.noise, size=3) if self.noise > 0 else np.zeros(3)

    def _tool(self, state: np.ndarray) -> np.ndarray:
        return self.ik.fk(np.asarray(state[:6], dtype=np.float64))[0]

    def _move(self, goal: np.ndarray, yaw: float, grip: float) -> bool:
        """Step the set-point toward ``goal`` (+ phase noise); True once the set-point has arrived."""
        s = self.s
        goal = goal + s.offset
        goal[2] = max(goal[2], 0.012)
        d = goal - s.pos
        n = float(np.linalg.norm(d))
        step = _SPEED * self.dt
        s.pos = goal.copy() if n <= step else s.pos + d * (step / n)
        dyaw = _wrap(yaw - s.yaw)
        s.yaw += float(np.clip(dyaw, -_YAW_SPEED * self.dt, _YAW_SPEED * self.dt))
        s.grip = grip
        return n <= step and abs(dyaw) <= _YAW_SPEED * self.dt

    def _nearest_yaw(self, obj_yaw: float, ref: float) -> float:
        """Among obj_yaw + k*pi/2 (cube symmetry), the yaw closest to ``ref``."""
        cands = [obj_yaw + k * np.pi / 2 for k in range(-4, 5)]
        return float(min(cands, key=lambda c: abs(_wrap(c - ref))))

    def _natural_yaw(self, xy: np.ndarray) -> float:
        """Tool yaw with joint_6 near 0 when the arm points at ``xy``."""
        return float(np.arctan2(xy[1], xy[0]))

    # -- API -------------------------------------------------------------------------------------------
    def act(self, state: np.ndarray, objects: dict[str, np.ndarray]) -> np.ndarray:
        """Next absolute joint target float[7] from the joint state float[7] and role -> pose7 (world)."""
        state = np.asarray(state, dtype=np.float64)
        if state.shape != (7,) or not np.all(np.isfinite(state)):
            raise ValueError(f"state must be finite float[7], got shape {state.shape}")
        missing = [r for r in self.required_roles if r not in objects]
        if missing:
            raise ValueError(f"{self.task} expert needs object poses for roles {missing} (got {sorted(objects)})")
        for role in self.required_roles:
            pose = np.asarray(objects[role], dtype=np.float64)
            if pose.shape != (7,) or not np.all(np.isfinite(pose)):
                raise ValueError(f"pose of {role!r} must be finite float[7] (xyz + quat wxyz)")
        s = self.s
        if s.q is None:
            s.q = state[:6].copy()
            s.pos, rot = self.ik.fk(state[:6])
            s.yaw = float(np.arctan2(-rot[0, 1], rot[1, 1]))  # tool y axis = (-sin yaw, cos yaw, 0) top-down
            self._enter("approach")
        self._plan(state, {k: np.asarray(v, dtype=np.float64) for k, v in objects.items()})
        s.ticks += 1
        pos = s.pos.copy()
        if self.noise > 0:
            pos += s.rng.normal(0.0, self.noise / 2, size=3)
        q, _ = self.ik.solve(pos, top_down_rotation(s.yaw), s.q, iters=30)
        s.q = q
        return np.concatenate([q, [s.grip]])

    def act_chunk(self, state: np.ndarray, objects: dict[str, np.ndarray], horizon: int,
                  commit: int = 1) -> np.ndarray:
        """The next ``horizon`` targets float[horizon, 7], predicted open loop (the arm is assumed to reach each
        target, objects are assumed still). Only the first ``commit`` steps advance the expert (1 = call this
        every control tick; ``horizon`` = the whole chunk is executed before the next call)."""
        if horizon < 1 or not 0 <= commit <= horizon:
            raise ValueError(f"need horizon >= 1 and 0 <= commit <= horizon, got {horizon}, {commit}")
        out = np.zeros((horizon, 7))
        cur = np.asarray(state, dtype=np.float64)
        saved: _State | None = None
        for k in range(horizon):
            if k == commit:
                saved = copy.deepcopy(self.s)
                self._predict = True
            out[k] = self.act(cur, objects)
            cur = out[k]
        if saved is not None:
            self.s = saved
        self._predict = False
        return out

    def _plan(self, state: np.ndarray, objects: dict[str, np.ndarray]) -> None:  # pragma: no cover
        raise NotImplementedError


class PickPlaceExpert(_Expert):
    """Top-down pick of ``target_cube`` and place into ``bowl`` (pick_place) or onto ``base_cube`` (stack).
    Re-grasps when the lift shows the cube was not taken."""

    def _place_goal(self, objects: dict[str, np.ndarray]) -> tuple[np.ndarray, float]:
        if self.task == "pick_place":
            b = objects["bowl"]
            return np.array([b[0], b[1], b[2] + 0.01 + CUBE_HALF + 0.025]), float(quat_yaw(b[3:]))
        b = objects["base_cube"]
        return np.array([b[0], b[1], b[2] + 2 * CUBE_HALF + 0.006]), float(quat_yaw(b[3:]))

    def _plan(self, state: np.ndarray, objects: dict[str, np.ndarray]) -> None:
        s = self.s
        cube = objects["target_cube"]
        opening = float(state[6])
        if s.phase == "approach":
            yaw = self._nearest_yaw(quat_yaw(cube[3:]), self._natural_yaw(cube[:2]))
            s.grasp_yaw = yaw
            goal = np.array([cube[0], cube[1], cube[2] + 0.10])
            if self._move(goal, yaw, GRIPPER_OPEN) and np.linalg.norm(self._tool(state) - s.pos) < 0.01:
                self._enter("descend")
        elif s.phase == "descend":
            yaw = self._nearest_yaw(quat_yaw(cube[3:]), s.grasp_yaw)
            goal = np.array([cube[0], cube[1], cube[2] + 0.002])
            arrived = self._move(goal, yaw, GRIPPER_OPEN)
            if arrived and (np.linalg.norm(self._tool(state) - s.pos) < 0.006 or s.ticks > 15):
                self._enter("close")
        elif s.phase == "close":
            self._move(s.pos - s.offset, s.yaw, GRIPPER_CLOSED)
            if s.ticks >= 6:
                s.held_offset = cube[:2] - self._tool(state)[:2]
                self._enter("lift")
        elif s.phase == "lift":
            goal = np.array([s.pos[0], s.pos[1], _SAFE_Z])
            if self._move(goal - s.offset, s.yaw, GRIPPER_CLOSED):
                if self._predict or (opening > 0.008 and cube[2] > 0.08):
                    s.held_offset = cube[:2] - self._tool(state)[:2] if not self._predict else s.held_offset
                    self._enter("transport")
                else:
                    s.retries += 1
                    s.grip = GRIPPER_OPEN
                    self._enter("approach")
        elif s.phase in ("transport", "lower"):
            place, place_yaw = self._place_goal(objects)
            tool_xy = place[:2] - s.held_offset
            yaw = s.yaw
            if self.task == "stack":  # turn the held cube's faces parallel to the base cube's faces
                yaw = self._nearest_yaw(place_yaw, s.yaw)
            if s.phase == "transport":
                if self._move(np.array([tool_xy[0], tool_xy[1], _SAFE_Z]), yaw, GRIPPER_CLOSED):
                    self._enter("lower")
            else:
                arrived = self._move(np.array([tool_xy[0], tool_xy[1], place[2]]), yaw, GRIPPER_CLOSED)
                if arrived and (np.linalg.norm(self._tool(state) - s.pos) < 0.006 or s.ticks > 15):
                    self._enter("release")
            if not self._predict and s.phase in ("transport", "lower") and cube[2] < 0.03 and opening < 0.008:
                s.retries += 1  # dropped it: start over
                self._enter("approach")
        elif s.phase == "release":
            self._move(s.pos - s.offset, s.yaw, GRIPPER_OPEN)
            if s.ticks >= 5:
                self._enter("retreat")
        elif s.phase == "retreat":
            goal = np.array([s.pos[0], s.pos[1], _SAFE_Z])
            if self._move(goal - s.offset, s.yaw, GRIPPER_OPEN):
                self._enter("done")
        else:  # done: hold
            self._move(s.pos - s.offset, s.yaw, GRIPPER_OPEN)


class PushExpert(_Expert):
    """Closed-gripper push of ``target_cube`` onto ``goal`` in short straight strokes: align behind the cube on the
    cube->goal line (flat face of the closed fingers across the line), push, back off, re-align."""

    _CONTACT = CUBE_HALF + 0.011  # tool centre to cube centre at contact (finger pair is 2 cm deep), m
    _GAP = 0.02  # free distance kept while aligning, m
    _Z = 0.022  # tool height while pushing (fingertips ~7 mm above the table), m
    _STROKE = 0.05  # longest push per stroke, m
    _PUSH_SPEED = 0.10  # m/s

    def _across_yaw(self, d: np.ndarray, ref: float) -> float:
        yaw = float(np.arctan2(d[1], d[0])) + np.pi / 2  # finger axis (tool y) across the push direction
        return float(min((yaw + k * np.pi for k in range(-3, 4)), key=lambda c: abs(_wrap(c - ref))))

    def _plan(self, state: np.ndarray, objects: dict[str, np.ndarray]) -> None:
        s = self.s
        cube, goal = objects["target_cube"][:3], objects["goal"][:3]
        to_goal = goal[:2] - cube[:2]
        dist = float(np.linalg.norm(to_goal))
        d = to_goal / max(dist, 1e-9)
        pre = cube[:2] - d * (self._CONTACT + self._GAP)
        if s.phase == "approach":
            yaw = self._across_yaw(d, self._natural_yaw(cube[:2]))
            if self._move(np.array([pre[0], pre[1], 0.10]), yaw, GRIPPER_CLOSED):
                self._enter("lower")
        elif s.phase == "lower":
            arrived = self._move(np.array([pre[0], pre[1], self._Z]), s.yaw, GRIPPER_CLOSED)
            if arrived and (np.linalg.norm(self._tool(state) - s.pos) < 0.008 or s.ticks > 15):
                self._enter("align")
        elif s.phase == "align":
            if dist < 0.01:
                self._enter("retreat")
                return
            yaw = self._across_yaw(d, s.yaw)
            arrived = self._move(np.array([pre[0], pre[1], self._Z]), yaw, GRIPPER_CLOSED)
            if arrived and (np.linalg.norm(self._tool(state)[:2] - s.pos[:2]) < 0.006 or s.ticks > 10):
                s.held_offset = d.copy()  # stroke direction
                s.stroke_end = cube[:2] + d * (min(dist, self._STROKE) - self._CONTACT)
                self._enter("stroke")
        elif s.phase == "stroke":
            step = self._PUSH_SPEED * self.dt
            delta = s.stroke_end - s.pos[:2]
            n = float(np.linalg.norm(delta))
            new = s.stroke_end if n <= step else s.pos[:2] + delta * (step / n)
            s.pos = np.array([new[0], new[1], self._Z])
            s.grip = GRIPPER_CLOSED
            if n <= step:
                self._enter("backoff")
        elif s.phase == "backoff":
            back = s.pos[:2] - s.held_offset * self._GAP
            if self._move(np.array([back[0], back[1], self._Z]) - s.offset, s.yaw, GRIPPER_CLOSED) or s.ticks > 5:
                far = float(np.linalg.norm(s.pos[:2] - cube[:2])) > 0.12
                self._enter("up" if far else "align")
        elif s.phase == "up":
            if self._move(np.array([s.pos[0], s.pos[1], 0.10]) - s.offset, s.yaw, GRIPPER_CLOSED):
                s.retries += 1
                self._enter("approach")
        elif s.phase == "retreat":
            if self._move(np.array([s.pos[0], s.pos[1], 0.12]) - s.offset, s.yaw, GRIPPER_CLOSED):
                self._enter("done")
        else:
            self._move(s.pos - s.offset, s.yaw, GRIPPER_CLOSED)


def make_expert(task: str, noise: float = 0.0, seed: int | None = None, control_hz: float = 10.0) -> _Expert:
    """Scripted expert for ``task`` with ``noise`` (m, see module doc) and RNG ``seed``."""
    if task in ("pick_place", "stack"):
        return PickPlaceExpert(task, noise=noise, seed=seed, control_hz=control_hz)
    if task == "push":
        return PushExpert(task, noise=noise, seed=seed, control_hz=control_hz)
    raise ValueError(f"unknown task {task!r}; known tasks: {TASKS}")
