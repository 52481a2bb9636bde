"""Tabletop tasks: the scene added around the URDF arm, randomised layouts and colours, prompts, success.

World frame = base_link of the arm; the table top is the plane z = 0 (m). Object poses are xyz (m) + quaternion
(w, x, y, z). Cubes are 4 cm. Every object is addressed by its ROLE (body name = role name).
"""

from __future__ import annotations

from dataclasses import dataclass

import mujoco
import numpy as np

from qvgm.sim.robot import ARM_LINKS, CAMERA_IN_LINK_QUAT, FINGER_LINKS, FRONT_CAMERA_LINK, WRIST_CAMERA_LINK

TASKS: tuple[str, ...] = ("pick_place", "push", "stack")
CUBE_HALF = 0.02
BOWL_HALF = 0.08  # outer half width of the (square) bowl, m
BOWL_INNER = 0.07  # inner half width, m
BOWL_FLOOR = 0.01  # floor thickness, m
BOWL_WALL_TOP = 0.055  # wall top above the bowl origin, m
BOWL_REST_TOL = 0.01  # the bowl origin (its bottom) rests at z = 0 on the table; higher = lifted or on something, m
BOWL_UPRIGHT_COS = 0.94  # cos(~20 deg): the bowl's axis within ~20 deg of vertical
GOAL_RADIUS = 0.045  # push target pad radius, m
COLORS: dict[str, tuple[float, float, float, float]] = {
    "red": (0.85, 0.08, 0.08, 1.0),
    "green": (0.1, 0.7, 0.15, 1.0),
    "blue": (0.1, 0.25, 0.9, 1.0),
    "yellow": (0.95, 0.85, 0.1, 1.0),
    "purple": (0.55, 0.15, 0.75, 1.0),
}
ROLES: dict[str, tuple[str, ...]] = {
    "pick_place": ("target_cube", "distractor_0", "bowl"),
    "push": ("target_cube", "distractor_0", "goal"),
    "stack": ("target_cube", "base_cube", "distractor_0"),
}
# The instruction per task; {0}, {1}, {2} are the colours of ROLES[task]'s first three roles in sample_layout's order.
PROMPTS: dict[str, str] = {
    "pick_place": "pick up the {0} cube and put it in the bowl",
    "push": "push the {0} cube onto the {2} target",
    "stack": "stack the {0} cube on the {1} cube",
}
TIME_LIMIT_S: dict[str, float] = {"pick_place": 25.0, "push": 25.0, "stack": 25.0}
# colours="fixed": every scene paints the roles alike (the prompt is then the same for every scene of a task), so
# a policy need not ground the colour word in the image. A diagnostic / curriculum variant; "random" is the task.
FIXED_COLORS: dict[str, str] = {"target_cube": "red", "distractor_0": "green", "base_cube": "blue", "goal": "blue"}
COLOR_MODES: tuple[str, ...] = ("random", "fixed")
WORKSPACE_X = (0.30, 0.52)
WORKSPACE_Y = (-0.20, 0.20)

# Collision groups: arm geoms (contype 2, conaffinity 1) touch the table and objects (contype 1,
# conaffinity 3) but not each other.
_ARM_TYPE, _ARM_AFF = 2, 1
_OBJ_TYPE, _OBJ_AFF = 1, 3
_CUBE_FRICTION = (1.0, 0.01, 0.001)
_FINGER_FRICTION = (1.5, 0.02, 0.002)


def check_task(task: str) -> str:
    """Return ``task`` if known, else raise ValueError naming the known tasks."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {TASKS}")
    return task


def _add_cube(spec: mujoco.MjSpec, name: str) -> None:
    body = spec.worldbody.add_body(name=name, pos=[0.4, 0.0, CUBE_HALF])
    body.add_freejoint(name=f"{name}_free")
    body.add_geom(name=f"{name}_geom", type=mujoco.mjtGeom.mjGEOM_BOX, size=[CUBE_HALF] * 3, mass=0.05,
                  friction=list(_CUBE_FRICTION), condim=4, contype=_OBJ_TYPE, conaffinity=_OBJ_AFF,
                  rgba=[0.5, 0.5, 0.5, 1.0])


def _add_bowl(spec: mujoco.MjSpec, name: str) -> None:
    """A square bowl (tray): floor + 4 walls, origin at the centre of its bottom face."""
    body = spec.worldbody.add_body(name=name, pos=[0.4, 0.0, 0.0])
    body.add_freejoint(name=f"{name}_free")
    rgba = [0.85, 0.85, 0.82, 1.0]
    kw = dict(type=mujoco.mjtGeom.mjGEOM_BOX, contype=_OBJ_TYPE, conaffinity=_OBJ_AFF, rgba=rgba, condim=3,
              friction=[0.8, 0.01, 0.001])
    body.add_geom(name=f"{name}_floor", size=[BOWL_HALF, BOWL_HALF, BOWL_FLOOR / 2], pos=[0, 0, BOWL_FLOOR / 2],
                  mass=0.3, **kw)
    t = BOWL_HALF - BOWL_INNER
    hz = (BOWL_WALL_TOP - BOWL_FLOOR) / 2
    zc = BOWL_FLOOR + hz
    c = BOWL_INNER + t / 2
    for i, (px, py, sx, sy) in enumerate([(c, 0, t / 2, BOWL_HALF), (-c, 0, t / 2, BOWL_HALF),
                                          (0, c, BOWL_INNER, t / 2), (0, -c, BOWL_INNER, t / 2)]):
        body.add_geom(name=f"{name}_wall_{i}", size=[sx, sy, hz], pos=[px, py, zc], mass=0.05, **kw)


def _add_goal(spec: mujoco.MjSpec, name: str) -> None:
    """A flat coloured pad (no collision), a mocap body so its pose lives in MjData."""
    body = spec.worldbody.add_body(name=name, pos=[0.4, 0.0, 0.0], mocap=True)
    body.add_geom(name=f"{name}_geom", type=mujoco.mjtGeom.mjGEOM_CYLINDER, size=[GOAL_RADIUS, 0.0008, 0],
                  pos=[0, 0, 0.0008], contype=0, conaffinity=0, rgba=[0.5, 0.5, 0.5, 1.0])


def add_scene(spec: mujoco.MjSpec, task: str, physics_dt: float, offscreen: tuple[int, int]) -> None:
    """Add table, floor, lights, cameras, the task's objects and physics options to the arm's spec.
    ``offscreen`` = (height, width) of the largest image to render."""
    spec.option.timestep = physics_dt
    spec.option.integrator = mujoco.mjtIntegrator.mjINT_IMPLICITFAST
    spec.option.cone = mujoco.mjtCone.mjCONE_ELLIPTIC
    spec.option.impratio = 10.0
    spec.visual.global_.offheight = max(480, int(offscreen[0]))
    spec.visual.global_.offwidth = max(640, int(offscreen[1]))
    spec.visual.headlight.ambient = [0.35, 0.35, 0.35]
    spec.visual.headlight.diffuse = [0.4, 0.4, 0.4]
    # Offscreen rendering runs on CPU (llvmpipe) on the robot PC / CI: shadows cost ~10x and MSAA ~2.5x per frame
    # at 224x224, so neither is used.
    spec.visual.quality.offsamples = 0
    for g in spec.geoms:
        body = g.parent.name
        if body in ARM_LINKS or body == "base_link":
            g.contype, g.conaffinity = _ARM_TYPE, _ARM_AFF
        if body in FINGER_LINKS:
            g.friction = list(_FINGER_FRICTION)
            g.condim = 4
        if body in ("upper_arm_link", "wrist_1_link"):
            g.rgba = [0.95, 0.5, 0.1, 1.0]
        elif body in ("base_link", "wrist_3_link", "gripper_base_link", "left_finger_link", "right_finger_link",
                      WRIST_CAMERA_LINK):
            g.rgba = [0.15, 0.15, 0.17, 1.0]
        else:
            g.rgba = [0.7, 0.72, 0.75, 1.0]
    wb = spec.worldbody
    wb.add_geom(name="table", type=mujoco.mjtGeom.mjGEOM_BOX, size=[0.45, 0.6, 0.02], pos=[0.3, 0.0, -0.02],
                rgba=[0.62, 0.5, 0.36, 1.0], contype=_OBJ_TYPE, conaffinity=_OBJ_AFF, friction=[0.6, 0.005, 0.0001])
    wb.add_geom(name="floor", type=mujoco.mjtGeom.mjGEOM_PLANE, size=[3, 3, 0.1], pos=[0, 0, -0.75],
                rgba=[0.35, 0.37, 0.4, 1.0], contype=0, conaffinity=0)
    wb.add_light(name="key", pos=[0.3, -0.4, 1.5], dir=[0.0, 0.25, -1.0], diffuse=[0.6, 0.6, 0.6],
                 castshadow=False)
    wb.add_light(name="fill", pos=[1.0, 0.5, 1.2], dir=[-0.6, -0.3, -1.0], diffuse=[0.3, 0.3, 0.3],
                 castshadow=False)
    spec.body(FRONT_CAMERA_LINK).add_camera(name="front", quat=list(CAMERA_IN_LINK_QUAT), fovy=50.0)
    spec.body(WRIST_CAMERA_LINK).add_camera(name="wrist", quat=list(CAMERA_IN_LINK_QUAT), fovy=75.0)
    for role in ROLES[task]:
        if role.endswith("cube") or role.startswith("distractor"):
            _add_cube(spec, role)
        elif role == "bowl":
            _add_bowl(spec, role)
        elif role == "goal":
            _add_goal(spec, role)
        else:  # pragma: no cover - ROLES is static
            raise AssertionError(role)


@dataclass(frozen=True)
class Layout:
    """A sampled scene: role -> (x, y, yaw) in m/rad, role -> colour name, and the prompt."""

    poses: dict[str, tuple[float, float, float]]
    colors: dict[str, str]
    prompt: str


def _sample_xy(rng: np.random.Generator, placed: list[tuple[float, float, float]], min_dist: float,
               margin: float = 0.0) -> tuple[float, float]:
    for _ in range(1000):
        x = rng.uniform(WORKSPACE_X[0] + margin, WORKSPACE_X[1] - margin)
        y = rng.uniform(WORKSPACE_Y[0] + margin, WORKSPACE_Y[1] - margin)
        if all(np.hypot(x - px, y - py) >= max(min_dist, r) for px, py, r in placed):
            return float(x), float(y)
    raise RuntimeError("could not place objects")  # pragma: no cover - workspace is large enough


def _seg_dist(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ab = b - a
    t = float(np.clip(np.dot(p - a, ab) / max(np.dot(ab, ab), 1e-12), 0.0, 1.0))
    return float(np.linalg.norm(p - (a + t * ab)))


def sample_layout(task: str, rng: np.random.Generator, colors: str = "random") -> Layout:
    """Random object poses and colours for ``task`` (all randomness comes from ``rng``).

    colors="fixed": the roles get FIXED_COLORS instead of a random permutation; the rng is consumed the same way,
    so a seed gives the same poses in both modes."""
    if colors not in COLOR_MODES:
        raise ValueError(f"colors must be one of {COLOR_MODES}, got {colors!r}")
    names = list(COLORS)
    perm = [names[i] for i in rng.permutation(len(names))]
    if colors == "fixed":  # ROLES lists the coloured roles in the order they take perm[0], perm[1], ... below
        painted = [FIXED_COLORS[r] for r in ROLES.get(task, ()) if r in FIXED_COLORS]
        perm = painted + perm[len(painted):]
    poses: dict[str, tuple[float, float, float]] = {}
    if task == "pick_place":
        bx, by = _sample_xy(rng, [], 0.0, margin=0.02)
        poses["bowl"] = (bx, by, float(rng.uniform(-np.pi / 4, np.pi / 4)))
        placed = [(bx, by, 0.15)]
        for role in ("target_cube", "distractor_0"):
            x, y = _sample_xy(rng, placed, 0.08)
            poses[role] = (x, y, float(rng.uniform(-np.pi, np.pi)))
            placed.append((x, y, 0.08))
        colors = {"target_cube": perm[0], "distractor_0": perm[1]}
    elif task == "push":
        for _ in range(1000):
            cx, cy = _sample_xy(rng, [], 0.0, margin=0.03)
            gx, gy = _sample_xy(rng, [(cx, cy, 0.10)], 0.10, margin=0.02)
            if np.hypot(gx - cx, gy - cy) <= 0.18:
                break
        dx, dy = _sample_xy(rng, [(cx, cy, 0.09), (gx, gy, 0.09)], 0.09)
        for _ in range(1000):  # keep the distractor off the pushing corridor (incl. the approach behind the cube)
            a, b = np.array([cx, cy]), np.array([gx, gy])
            d = (b - a) / np.linalg.norm(b - a)
            if _seg_dist(np.array([dx, dy]), a - 0.08 * d, b) >= 0.08:
                break
            dx, dy = _sample_xy(rng, [(cx, cy, 0.09), (gx, gy, 0.09)], 0.09)
        poses["target_cube"] = (cx, cy, float(rng.uniform(-np.pi, np.pi)))
        poses["goal"] = (gx, gy, 0.0)
        poses["distractor_0"] = (dx, dy, float(rng.uniform(-np.pi, np.pi)))
        colors = {"target_cube": perm[0], "distractor_0": perm[1], "goal": perm[2]}
    elif task == "stack":
        placed: list[tuple[float, float, float]] = []
        for role in ("target_cube", "base_cube", "distractor_0"):
            x, y = _sample_xy(rng, placed, 0.09)
            poses[role] = (x, y, float(rng.uniform(-np.pi, np.pi)))
            placed.append((x, y, 0.09))
        colors = {"target_cube": perm[0], "base_cube": perm[1], "distractor_0": perm[2]}
    else:
        raise ValueError(f"unknown task {task!r}; known tasks: {TASKS}")
    return Layout(poses=poses, colors=colors, prompt=PROMPTS[task].format(*perm))


def prompt_vocabulary(tasks: tuple[str, ...] | list[str] | None = None) -> list[str]:
    """Texts holding every word any prompt of `tasks` (default: all) can use, every colour included: the
    vocabulary a word-level tokenizer needs to read those tasks later (critic_trainer.sft SFTConfig.vocabulary)."""
    unknown = [t for t in tasks or PROMPTS if t not in PROMPTS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known tasks: {TASKS}")
    return [PROMPTS[t].format(c, c, c) for t in (tasks or PROMPTS) for c in COLORS]


def yaw_quat(yaw: float) -> np.ndarray:
    """Quaternion (w, x, y, z) of a rotation by ``yaw`` rad about z."""
    return np.array([np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)])


def quat_yaw(quat: np.ndarray) -> float:
    """Yaw (rad) about world z of a quaternion (w, x, y, z)."""
    w, x, y, z = quat
    return float(np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z)))


def success(task: str, poses: dict[str, np.ndarray], finger_touching: bool) -> bool:
    """Success detector from object poses (role -> xyz+quat) and whether a finger touches the target cube."""
    cube = poses["target_cube"]
    if task == "pick_place":
        bowl = poses["bowl"]
        yaw = quat_yaw(bowl[3:])
        d = cube[:2] - bowl[:2]
        c, s = np.cos(-yaw), np.sin(-yaw)
        local = np.array([c * d[0] - s * d[1], s * d[0] + c * d[1]])
        # the bowl must rest upright on the table (a bowl lifted or tipped over the cube does not count) and the
        # cube must sit on or above the bowl's floor, below its wall top, inside the walls, released
        upright = 1.0 - 2.0 * (bowl[4] ** 2 + bowl[5] ** 2) > BOWL_UPRIGHT_COS  # bowl z-axis . world z
        dz = cube[2] - bowl[2]
        return bool(np.all(np.abs(local) < BOWL_INNER) and BOWL_FLOOR + CUBE_HALF / 2 < dz < BOWL_WALL_TOP
                    and bowl[2] < BOWL_REST_TOL and upright and not finger_touching)
    if task == "push":
        goal = poses["goal"]
        return bool(np.hypot(*(cube[:2] - goal[:2])) < 0.035 and cube[2] < CUBE_HALF + 0.01)
    if task == "stack":
        base = poses["base_cube"]
        dz = cube[2] - base[2]
        return bool(np.hypot(*(cube[:2] - base[:2])) < 0.025 and abs(dz - 2 * CUBE_HALF) < 0.01
                    and base[2] < CUBE_HALF + 0.01 and not finger_touching)
    raise ValueError(f"unknown task {task!r}; known tasks: {TASKS}")
