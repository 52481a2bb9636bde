"""``TabletopEnv``: the MuJoCo tabletop built from urdf/tabletop_arm.urdf, with a Gymnasium API.

Action = float32[7] ABSOLUTE joint position targets [joint_1..joint_6 (rad), gripper_finger_joint (m per finger)],
clipped to the URDF position limits; the simulated servos slew their set-points at most at the URDF velocity
limits. Observation (the DESIGN.md observation dict)::

    {"images": {cam: uint8[H, W, 3]}, "state": float32[7] joint positions, "prompt": str,
     "stamp": float sim time in s, "privileged": float32[7 * n_roles] object poses (xyz + quat wxyz per role)}

``images`` is omitted when ``render=False``. ``image_size`` is (height, width) in pixels.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import spaces

from qvgm.sim.robot import (
    FINGER_LINKS,
    GRIPPER_JOINT,
    HOME_Q,
    JOINT_NAMES,
    MIMIC_JOINT,
    load_joint_limits,
    robot_spec,
    urdf_path,
)
from qvgm.sim.tasks import (
    COLOR_MODES,
    COLORS,
    ROLES,
    TIME_LIMIT_S,
    add_scene,
    check_task,
    sample_layout,
    success,
    yaw_quat,
)
from qvgm.sim.tasks import CUBE_HALF as _CUBE_HALF

CAMERAS: tuple[str, ...] = ("front", "wrist")


@dataclass(frozen=True)
class SimState:
    """A TabletopEnv's dynamic state (TabletopEnv.get_sim_state): its task, a copy of the MjData, the servo joint
    targets float[7] (rad) and the control steps since the reset (the time limit counts them)."""

    task: str
    data: Any
    target: np.ndarray
    steps: int


def _release_gl_context() -> None:
    """Unbind the current EGL context from this thread, so the next render may come from any thread (an EGL
    context can be current in one thread only; MuJoCo's Renderer re-binds it at every render)."""
    if os.environ.get("MUJOCO_GL", "").lower() != "egl":
        return
    import mujoco.egl as mj_egl
    from OpenGL import EGL

    if mj_egl.EGL_DISPLAY is not None:
        EGL.eglMakeCurrent(mj_egl.EGL_DISPLAY, EGL.EGL_NO_SURFACE, EGL.EGL_NO_SURFACE, EGL.EGL_NO_CONTEXT)


class TabletopEnv(gym.Env):
    """Tabletop manipulation with the URDF arm; tasks in ``qvgm.sim.TASKS``; sparse reward 1.0 on success."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, task: str = "pick_place", cameras: tuple[str, ...] = CAMERAS,
                 image_size: tuple[int, int] = (224, 224), control_hz: float = 10.0, physics_hz: float = 500.0,
                 max_episode_steps: int | None = None, render: bool = True,
                 render_mode: str | None = "rgb_array", colors: str = "random") -> None:
        """colors: "random" (the task: a random colour per object, named in the prompt) or "fixed" (the same
        colour per role in every scene, qvgm.sim.tasks.FIXED_COLORS: a diagnostic without colour grounding)."""
        super().__init__()
        if colors not in COLOR_MODES:
            raise ValueError(f"colors must be one of {COLOR_MODES}, got {colors!r}")
        self.colors = colors
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be 'rgb_array' or None, got {render_mode!r}")
        self._task = check_task(task)
        unknown = [c for c in cameras if c not in CAMERAS]
        if unknown:
            raise ValueError(f"unknown cameras {unknown}; available: {CAMERAS}")
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"image_size must be (height, width) > 0, got {image_size}")
        if control_hz <= 0 or physics_hz <= 0:
            raise ValueError("control_hz and physics_hz must be > 0")
        n_sub = physics_hz / control_hz
        if abs(n_sub - round(n_sub)) > 1e-9 or round(n_sub) < 1:
            raise ValueError(f"physics_hz ({physics_hz}) must be an integer multiple of control_hz ({control_hz})")
        self.cameras = tuple(cameras)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.control_hz = float(control_hz)
        self._physics_dt = 1.0 / float(physics_hz)
        self.n_substeps = int(round(n_sub))
        self._max_steps_arg = max_episode_steps
        self.render_images = bool(render)
        self.render_mode = render_mode
        self.metadata = {**self.metadata, "render_fps": self.control_hz}
        self._urdf = urdf_path()
        self.limits = load_joint_limits(self._urdf)
        self._models: dict[str, mujoco.MjModel] = {}
        self._renderer: mujoco.Renderer | None = None
        # Serialises physics, rendering and resets for callers on several threads (e.g. a ROS executor).
        self.lock = threading.RLock()
        self.action_space = spaces.Box(self.limits.lower.astype(np.float32), self.limits.upper.astype(np.float32),
                                       dtype=np.float32)
        self._load_task(self._task)
        self._reset_scene(np.random.default_rng(0))

    # ----------------------------------------------------------------------------------------------- model
    def _close_renderers(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    def _load_task(self, task: str) -> None:
        if task not in self._models:
            spec = robot_spec(self._urdf)
            add_scene(spec, task, self._physics_dt, self.image_size)
            self._models[task] = spec.compile()
        self._close_renderers()
        self._task = task
        m = self.model = self._models[task]
        self.data = mujoco.MjData(m)
        self._qadr = np.array([m.joint(n).qposadr[0] for n in JOINT_NAMES])
        self._dadr = np.array([m.joint(n).dofadr[0] for n in JOINT_NAMES])
        self._mimic_qadr = m.joint(MIMIC_JOINT).qposadr[0]
        self._act = np.array([m.actuator(f"{n}_position").id for n in JOINT_NAMES])
        self._roles = ROLES[task]
        self._finger_geoms = {g for g in range(m.ngeom) if m.body(m.geom_bodyid[g]).name in FINGER_LINKS}
        self._target_geom = m.geom("target_cube_geom").id
        self._vmax = self.limits.velocity.copy()
        self._target = HOME_Q.copy()
        steps = self._max_steps_arg
        self.max_episode_steps = int(steps) if steps is not None else int(round(TIME_LIMIT_S[task] * self.control_hz))
        self.observation_space = self._make_obs_space()

    def _make_obs_space(self) -> spaces.Dict:
        h, w = self.image_size
        d: dict[str, spaces.Space] = {
            "state": spaces.Box(self.limits.lower.astype(np.float32), self.limits.upper.astype(np.float32),
                                dtype=np.float32),
            "prompt": spaces.Text(max_length=256, charset="abcdefghijklmnopqrstuvwxyz "),
            "stamp": spaces.Box(0.0, np.inf, shape=(), dtype=np.float64),
            "privileged": spaces.Box(-np.inf, np.inf, shape=(7 * len(self._roles),), dtype=np.float32),
        }
        if self.render_images:
            d["images"] = spaces.Dict({c: spaces.Box(0, 255, (h, w, 3), dtype=np.uint8) for c in self.cameras})
        return spaces.Dict(d)

    def _reset_scene(self, rng: np.random.Generator) -> None:
        m, d = self.model, self.data
        mujoco.mj_resetData(m, d)
        layout = sample_layout(self._task, rng, self.colors)
        q0 = HOME_Q.copy()
        q0[:6] += rng.uniform(-0.03, 0.03, size=6)
        d.qpos[self._qadr] = q0
        d.qpos[self._mimic_qadr] = q0[6]
        d.ctrl[self._act] = q0
        self._target = q0.copy()
        for role, (x, y, yaw) in layout.poses.items():
            body = m.body(role)
            if body.mocapid[0] >= 0:
                d.mocap_pos[body.mocapid[0]] = [x, y, 0.0]
                d.mocap_quat[body.mocapid[0]] = yaw_quat(yaw)
            else:
                adr = m.jnt_qposadr[body.jntadr[0]]
                z = _CUBE_HALF if role != "bowl" else 0.0
                d.qpos[adr:adr + 3] = [x, y, z]
                d.qpos[adr + 3:adr + 7] = yaw_quat(yaw)
        for role, color in layout.colors.items():
            geom = f"{role}_geom"
            m.geom(geom).rgba = COLORS[color]
        self._layout = layout
        self._steps = 0
        mujoco.mj_forward(m, d)

    # ----------------------------------------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Reset to a random scene; same ``seed`` (and task) -> bit-identical MjData and colours.
        ``options={"task": name}`` switches the task. Bad options raise ValueError and change nothing."""
        options = dict(options or {})
        unknown = set(options) - {"task"}
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; supported: ['task']")
        task = check_task(options.get("task", self._task))
        with self.lock:
            super().reset(seed=seed)
            if task != self._task:
                self._load_task(task)
            self._reset_scene(self.np_random)
            return self._obs(), self._info()

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        """Apply absolute joint targets ``action`` float[7] for one control period (1/control_hz s)."""
        with self.lock:
            self.set_joint_targets(action)
            self.step_physics(self.n_substeps)
            self._steps += 1
            ok = self.is_success()
            truncated = self._steps >= self.max_episode_steps and not ok
            return self._obs(), float(ok), ok, truncated, self._info(ok)

    def get_sim_state(self) -> SimState:
        """The complete dynamic state, copied (SimState). Restore it with set_sim_state into an env of the same task
        reset to the same scene seed (layout, colours and prompt come from the reset, not from this state)."""
        with self.lock:
            data = mujoco.MjData(self.model)
            mujoco.mj_copyData(data, self.model, self.data)
            return SimState(self._task, data, self._target.copy(), int(self._steps))

    def set_sim_state(self, state: SimState) -> dict[str, Any]:
        """Overwrite physics, servo targets and step counter with a get_sim_state() copy; returns the observation
        there. Same state + same actions afterwards -> bit-identical trajectories (MuJoCo is deterministic).
        A state of another task or model, or a malformed one, is refused (ValueError) and changes nothing."""
        if not isinstance(state, SimState):
            raise ValueError(f"set_sim_state wants a SimState from get_sim_state(), got {type(state).__name__}")
        if state.task != self._task:
            raise ValueError(f"sim state of task {state.task!r}, this env runs {self._task!r}")
        d = state.data
        sizes = [(n, getattr(d, n).shape, getattr(self.data, n).shape) for n in ("qpos", "qvel", "act", "ctrl",
                                                                              "mocap_pos", "qacc_warmstart")]
        bad = [f"{n} {a} vs {b}" for n, a, b in sizes if a != b]
        target = np.asarray(state.target)
        if bad or target.shape != self._target.shape or not np.isfinite(target).all() or state.steps < 0:
            raise ValueError(f"sim state does not fit this env: {bad or 'bad target / step count'}")
        with self.lock:
            mujoco.mj_copyData(self.data, self.model, d)
            self._target, self._steps = target.copy(), int(state.steps)
            return self._obs()

    def render(self) -> np.ndarray:
        """RGB image uint8[H, W, 3] of the first configured camera."""
        return self._render_one(self.cameras[0] if self.cameras else "front")

    def close(self) -> None:
        with self.lock:
            self._close_renderers()

    # ----------------------------------------------------------------------------------------------- low level
    @property
    def joint_names(self) -> list[str]:
        """The 7 controlled joints, in state/action order."""
        return list(JOINT_NAMES)

    @property
    def physics_dt(self) -> float:
        """Physics time step in s."""
        return self._physics_dt

    @property
    def time(self) -> float:
        """Simulation time in s since reset."""
        return float(self.data.time)

    @property
    def task(self) -> str:
        return self._task

    @property
    def prompt(self) -> str:
        """The language instruction of the current episode (names the target's colour)."""
        return self._layout.prompt

    @property
    def object_colors(self) -> dict[str, str]:
        """Role -> colour name of the current episode."""
        return dict(self._layout.colors)

    @property
    def elapsed_steps(self) -> int:
        return self._steps

    def set_joint_targets(self, q: np.ndarray) -> None:
        """Set absolute position targets float[7] (rad / m), clipped to the URDF position limits.
        Raises ValueError (target unchanged) on a wrong shape or non-finite values."""
        arr = np.asarray(q, dtype=np.float64)
        if arr.shape != (7,):
            raise ValueError(f"joint targets must have shape (7,) ordered {JOINT_NAMES}, got {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"joint targets must be finite, got {arr.tolist()}")
        with self.lock:
            self._target = self.limits.clip(arr)

    def step_physics(self, n: int = 1) -> None:
        """Advance ``n`` physics steps; servo set-points move toward the targets at most at the URDF velocity."""
        n = int(n)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        with self.lock:
            m, d = self.model, self.data
            max_step = self._vmax * self._physics_dt
            start = d.ctrl[self._act].copy()
            diff = self._target - start
            ramp = min(n, int(np.ceil(np.max(np.abs(diff) / max_step)))) if n else 0
            for k in range(1, ramp + 1):  # set-points ramp at the velocity limit ...
                d.ctrl[self._act] = start + np.clip(diff, -k * max_step, k * max_step)
                mujoco.mj_step(m, d)
            if n > ramp:  # ... then hold the target (the remaining steps run inside MuJoCo)
                d.ctrl[self._act] = self._target
                mujoco.mj_step(m, d, n - ramp)

    def joint_state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(position [7] rad|m, velocity [7] rad/s|m/s, effort [7] N*m|N) of the controlled joints, float64."""
        with self.lock:
            d = self.data
            return (d.qpos[self._qadr].copy(), d.qvel[self._dadr].copy(), d.actuator_force[self._act].copy())

    def render_camera(self, cam: str) -> np.ndarray:
        """uint8[H, W, 3] RGB of one camera (``front`` or ``wrist``) at ``image_size``."""
        if cam not in CAMERAS:
            raise ValueError(f"unknown camera {cam!r}; available: {CAMERAS}")
        return self._render_one(cam)

    def _render_one(self, cam: str) -> np.ndarray:
        with self.lock:
            if self._renderer is None:
                self._renderer = mujoco.Renderer(self.model, *self.image_size)
            try:
                self._renderer.update_scene(self.data, camera=cam)
                return self._renderer.render().copy()
            finally:
                _release_gl_context()

    def render_cameras(self) -> dict[str, np.ndarray]:
        """uint8[H, W, 3] RGB per configured camera at ``image_size``."""
        with self.lock:
            return {c: self._render_one(c) for c in self.cameras}

    def camera_info(self, cam: str) -> dict[str, Any]:
        """Pinhole intrinsics (pixels) of camera ``cam`` at ``image_size``; square pixels, principal point at
        the image centre in the ROS convention (pixel centres at integer coordinates)."""
        if cam not in CAMERAS:
            raise ValueError(f"unknown camera {cam!r}; available: {CAMERAS}")
        h, w = self.image_size
        fovy = np.deg2rad(self.model.cam_fovy[self.model.camera(cam).id])
        f = 0.5 * h / np.tan(0.5 * fovy)
        return {"width": w, "height": h, "fx": float(f), "fy": float(f), "cx": (w - 1) / 2.0, "cy": (h - 1) / 2.0,
                "frame_id": f"{cam}_color_optical_frame"}

    def project(self, points: np.ndarray, cam: str, joints: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """World points float[N, 3] (m, base_link frame) -> (pixel coordinates float64[N, 2] (u right, v down; pixel
        centres at integers, as camera_info), depth float64[N] in m along the optical axis (<= 0: behind the camera))
        in camera ``cam`` at ``image_size``. The camera is posed as the arm is now, or, with ``joints`` float[N, 7]
        (joint_1..joint_6 in rad, gripper opening in m: the observation's state), as the arm is in row i for point
        i (forward kinematics on a scratch copy; the simulation is not touched). The front camera is fixed to the
        base; the wrist camera moves with the arm."""
        info = self.camera_info(cam)
        p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        c = self.model.camera(cam).id
        if joints is None:
            with self.lock:
                pos = np.broadcast_to(self.data.cam_xpos[c], p.shape).copy()
                rot = np.broadcast_to(self.data.cam_xmat[c].reshape(3, 3), (len(p), 3, 3)).copy()
        else:
            q = np.asarray(joints, dtype=np.float64).reshape(-1, len(JOINT_NAMES))
            if len(q) != len(p):
                raise ValueError(f"project: {len(p)} points but {len(q)} joint states")
            scratch = mujoco.MjData(self.model)
            with self.lock:
                scratch.qpos[:] = self.data.qpos
            pos, rot = np.empty((len(p), 3)), np.empty((len(p), 3, 3))
            for i, qi in enumerate(q):
                scratch.qpos[self._qadr] = qi
                scratch.qpos[self._mimic_qadr] = qi[6]
                mujoco.mj_kinematics(self.model, scratch)
                mujoco.mj_comPos(self.model, scratch)
                mujoco.mj_camlight(self.model, scratch)  # camera poses (mj_kinematics leaves them)
                pos[i], rot[i] = scratch.cam_xpos[c], scratch.cam_xmat[c].reshape(3, 3)
        local = np.einsum("nk,nkj->nj", p - pos, rot)  # camera frame: x right, y up, looking along -z (MuJoCo)
        depth = -local[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = info["cx"] + info["fx"] * local[:, 0] / depth
            v = info["cy"] - info["fy"] * local[:, 1] / depth
        return np.stack([u, v], axis=1), depth

    def object_poses(self) -> dict[str, np.ndarray]:
        """Role -> float64[7] xyz (m) + quat (w, x, y, z) in the world (= base_link) frame."""
        with self.lock:
            d = self.data
            out = {}
            for role in self._roles:
                b = self.model.body(role).id
                out[role] = np.concatenate([d.xpos[b], d.xquat[b]])
            return out

    def _finger_touching_target(self) -> bool:
        d = self.data
        for i in range(d.ncon):
            c = d.contact[i]
            pair = (int(c.geom1), int(c.geom2))
            if self._target_geom in pair and (pair[0] in self._finger_geoms or pair[1] in self._finger_geoms):
                return True
        return False

    def is_success(self) -> bool:
        """Whether the current state satisfies the task (see ``qvgm.sim.tasks.success``)."""
        return success(self._task, self.object_poses(), self._finger_touching_target())

    def _obs(self) -> dict[str, Any]:
        poses = self.object_poses()
        obs: dict[str, Any] = {
            "state": self.data.qpos[self._qadr].astype(np.float32),
            "prompt": self.prompt,
            "stamp": self.time,
            "privileged": np.concatenate([poses[r] for r in self._roles]).astype(np.float32),
        }
        if self.render_images:
            obs["images"] = self.render_cameras()
        return obs

    def _info(self, ok: bool | None = None) -> dict[str, Any]:
        return {"success": self.is_success() if ok is None else ok, "task": self._task, "prompt": self.prompt,
                "colors": self.object_colors, "roles": self._roles, "gripper_joint": GRIPPER_JOINT}
