"""Any Gymnasium environment as a qvgm task: the env-spec contract (docs/gym_envs.md) and its adapter.

An ``EnvSpec`` (a YAML/JSON file, ``load_env_spec``) names a registered Gymnasium env and says how its observation
maps onto the stack's observation dict (qvgm/policy/interface.py)::

    {"state": float32[ds], "privileged": float32[dp], "images": {cam: uint8[H, W, 3]}, "prompt": str,
     "stamp": float s since reset}

how the policy's action (its `real_action_dim` dims, in env units) maps onto the env's Box action space (bounds for
clipping; the dataset stores actions in env units, the policy normalises them itself), what counts as success, and
where demonstrations come from (a scripted expert ``module:function`` / ``file.py:function``, or a dataset).

``GymEnvAdapter`` wraps the env with the ``TabletopEnv`` conventions the trainer relies on: ``reset(seed=,
options={"task": name})``, ``step(action)`` with a SPARSE reward 1.0 and ``terminated=True`` on the success step
(the env's own reward is in ``info["env_reward"]``), ``truncated=True`` at the time limit or when the env
terminates without success (``info["env_terminated"]``), and ``prompt`` / ``control_hz`` / ``state_names`` /
``action_names``. So critic_trainer's ``evaluate`` / ``collect_rollouts`` / ``run_episode`` (``env=`` argument),
``collect_env_demos``, SFT and ``improve`` run on it unchanged. This module never imports rclpy.
"""

from __future__ import annotations

import difflib
import gc
import importlib
import importlib.util
import json
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

SUCCESS_KINDS = ("info_key", "predicate", "return_threshold")
_PART = re.compile(r"^(?P<key>[A-Za-z_][\w./-]*)?(?:\[(?P<idx>[^\]]*)\])?$")


class EnvSpecError(ValueError):
    """A spec that cannot describe its environment (bad field, unknown env id, key not in the obs space...)."""


# ---------------------------------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class ObsPart:
    """One piece of a flat vector: observation key (None for a Box observation) and an index into it.

    index: None (the whole, flattened), a slice, or a tuple of ints. Written ``KEY[a:b]``, ``[a:b]``, ``KEY``,
    ``KEY[0,3,4]`` in a spec file.
    """

    key: str | None
    index: slice | tuple[int, ...] | None
    text: str

    @staticmethod
    def parse(text: Any) -> ObsPart:
        if not isinstance(text, str) or not text.strip():
            raise EnvSpecError(f"observation part must be a string like 'KEY', 'KEY[0:4]' or '[2:5]', got {text!r}")
        m = _PART.match(text.strip())
        if m is None or (m.group("key") is None and m.group("idx") is None):
            raise EnvSpecError(f"observation part {text!r}: expected 'KEY', 'KEY[a:b]', 'KEY[i,j,...]' or '[a:b]'")
        idx_s = m.group("idx")
        index: slice | tuple[int, ...] | None = None
        try:
            if idx_s is not None and ":" in idx_s:
                bits = [b.strip() for b in idx_s.split(":")]
                if len(bits) > 3:
                    raise ValueError
                index = slice(*[int(b) if b else None for b in bits])
            elif idx_s is not None:
                index = tuple(int(b) for b in idx_s.split(","))
        except ValueError:
            raise EnvSpecError(f"observation part {text!r}: bad index [{idx_s}]") from None
        return ObsPart(m.group("key"), index, text.strip())

    def take(self, obs: Any) -> np.ndarray:
        """The part of a raw observation as float64 [n] (flattened)."""
        v = obs[self.key] if self.key is not None else obs
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        return v if self.index is None else v[list(self.index) if isinstance(self.index, tuple) else self.index]


@dataclass
class EnvSpec:
    """A Gymnasium env described as a qvgm task (see the module docstring and docs/gym_envs.md).

    env_id: registered id (``imports`` are imported first so third-party suites register theirs); env_kwargs:
    gym.make keyword arguments; name: the task name (buffer task / evaluate ``task``); prompt: instruction text;
    state / privileged: observation parts concatenated into float32 vectors; images: camera name -> observation
    key of a uint8 [H, W, 3] Box, or "render" (env.render() with render_mode rgb_array); action_dims: which env
    action dims the policy controls (default all), the others get `action_fill`; action_low / action_high:
    clipping bounds in env units (default the Box bounds; must be finite); success: {"info_key": K [, "above": x |
    "below": x]} | {"predicate": "module:function"} ((raw_obs, env_reward, info) -> bool) | {"return_threshold":
    R} (cumulative env reward >= R); demos: {"expert": "module:function", "noise": std as a fraction of the
    action half-range} or {"dataset": path}; max_episode_steps: time limit in control steps (default the env's);
    control_hz: dataset fps (default round(1 / env.unwrapped.dt), else metadata render_fps); policy: policy config
    overrides for SFT in the benchmark (e.g. {"privileged_norm": true}: standardise privileged state whose units are
    not ~1, see qvgm.policy.config.StateConfig). `base_dir`: where
    relative paths (``file.py:function``, dataset) resolve (the spec file's folder).
    """

    env_id: str
    name: str = ""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    imports: list[str] = field(default_factory=list)
    prompt: str = ""
    state: list[str] = field(default_factory=list)
    privileged: list[str] = field(default_factory=list)
    images: dict[str, str] = field(default_factory=dict)
    action_dims: list[int] | None = None
    action_fill: list[float] | float = 0.0
    action_low: list[float] | None = None
    action_high: list[float] | None = None
    success: dict[str, Any] = field(default_factory=dict)
    demos: dict[str, Any] = field(default_factory=dict)
    max_episode_steps: int | None = None
    control_hz: int | None = None
    policy: dict[str, Any] = field(default_factory=dict)
    base_dir: str = "."

    def __post_init__(self) -> None:
        if not isinstance(self.env_id, str) or not self.env_id:
            raise EnvSpecError("env_id must be a non-empty Gymnasium id string")
        self.name = self.name or self.env_id
        self.prompt = self.prompt or self.name
        if not self.state:
            raise EnvSpecError("observation.state must list at least one observation part")
        self.state_parts = [ObsPart.parse(p) for p in self.state]
        self.privileged_parts = [ObsPart.parse(p) for p in self.privileged]
        for cam, src in self.images.items():
            if not isinstance(cam, str) or not re.match(r"^\w+$", cam) or not isinstance(src, str):
                raise EnvSpecError(f"images: camera {cam!r} -> {src!r}; want name -> observation key or 'render'")
        kinds = [k for k in SUCCESS_KINDS if k in self.success]
        if len(kinds) != 1:
            raise EnvSpecError(f"success must give exactly one of {SUCCESS_KINDS}, got {sorted(self.success)}")
        unknown = set(self.success) - set(SUCCESS_KINDS) - {"above", "below"}
        if unknown:
            raise EnvSpecError(f"success: unknown fields {sorted(unknown)}")
        if ("above" in self.success or "below" in self.success) and kinds[0] != "info_key":
            raise EnvSpecError("success.above / success.below only go with success.info_key")
        for k in ("above", "below", "return_threshold"):
            if k in self.success and not isinstance(self.success[k], int | float):
                raise EnvSpecError(f"success.{k} must be a number, got {self.success[k]!r}")
        if "noise" in self.demos and not isinstance(self.demos["noise"], int | float):
            raise EnvSpecError(f"demos.noise must be a number, got {self.demos['noise']!r}")
        if self.demos and ("expert" in self.demos) == ("dataset" in self.demos):
            raise EnvSpecError("demos must give exactly one of 'expert' (module:function) and 'dataset' (path)")
        if "noise" in self.demos and not (float(self.demos["noise"]) >= 0 and np.isfinite(float(self.demos["noise"]))):
            raise EnvSpecError(f"demos.noise must be a finite number >= 0, got {self.demos['noise']}")
        if self.max_episode_steps is not None and (not isinstance(self.max_episode_steps, int)
                                                   or self.max_episode_steps < 1):
            raise EnvSpecError(f"max_episode_steps must be >= 1, got {self.max_episode_steps}")
        if self.control_hz is not None and (int(self.control_hz) != self.control_hz or self.control_hz < 1):
            raise EnvSpecError(f"control_hz must be a whole number of Hz >= 1 (dataset fps), got {self.control_hz}")

    @property
    def success_kind(self) -> str:
        return next(k for k in SUCCESS_KINDS if k in self.success)

    def dataset_path(self) -> Path | None:
        """The demo dataset (resolved against base_dir) when the demo source is a dataset, else None."""
        if "dataset" not in self.demos:
            return None
        p = Path(self.demos["dataset"]).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    def make(self, max_episode_steps: int | None = None) -> GymEnvAdapter:
        """A new adapter over a fresh env (``max_episode_steps`` overrides the spec's time limit)."""
        return GymEnvAdapter(self, max_episode_steps=max_episode_steps)


_TOP = {"env_id", "name", "env_kwargs", "imports", "prompt", "observation", "action", "success", "demos",
        "max_episode_steps", "control_hz", "policy"}


def env_spec_from_dict(doc: dict[str, Any], base_dir: str | Path = ".") -> EnvSpec:
    """Spec from a parsed file: top-level fields of EnvSpec, with ``observation: {state, privileged, images}`` and
    ``action: {dims, fill, low, high}`` grouped. Unknown fields are errors (typos must not pass silently)."""
    if not isinstance(doc, dict):
        raise EnvSpecError(f"an env spec must be a mapping, got {type(doc).__name__}")
    unknown = set(doc) - _TOP
    if unknown:
        raise EnvSpecError(f"unknown env spec fields {sorted(unknown)}; known: {sorted(_TOP)}")
    if "env_id" not in doc:
        raise EnvSpecError("env spec has no env_id")
    obs = doc.get("observation") or {}
    act = doc.get("action") or {}
    if not isinstance(obs, dict) or set(obs) - {"state", "privileged", "images"}:
        raise EnvSpecError(f"observation must be a mapping with state / privileged / images, got {obs!r}")
    for k in ("env_kwargs", "success", "demos", "policy"):
        if not isinstance(doc.get(k) or {}, dict):
            raise EnvSpecError(f"{k} must be a mapping, got {doc[k]!r}")
    if not isinstance(act, dict) or set(act) - {"dims", "fill", "low", "high"}:
        raise EnvSpecError(f"action must be a mapping with dims / fill / low / high, got {act!r}")

    def strs(v: Any, what: str) -> list[str]:
        v = [v] if isinstance(v, str) else (v or [])
        if not isinstance(v, list):
            raise EnvSpecError(f"{what} must be a list of observation parts, got {v!r}")
        return v

    try:
        return _env_spec(doc, obs, act, strs, base_dir)
    except (TypeError, ValueError) as e:
        if isinstance(e, EnvSpecError):
            raise
        raise EnvSpecError(f"bad field value ({e})") from None


def _env_spec(doc: dict[str, Any], obs: dict[str, Any], act: dict[str, Any], strs: Callable[[Any, str], list[str]],
              base_dir: str | Path) -> EnvSpec:
    return EnvSpec(env_id=doc["env_id"], name=str(doc.get("name") or ""), env_kwargs=dict(doc.get("env_kwargs") or {}),
                   imports=list(doc.get("imports") or []), prompt=str(doc.get("prompt") or ""),
                   state=strs(obs.get("state"), "observation.state"),
                   privileged=strs(obs.get("privileged"), "observation.privileged"),
                   images=dict(obs.get("images") or {}), action_dims=act.get("dims"), action_fill=act.get("fill", 0.0),
                   action_low=act.get("low"), action_high=act.get("high"), success=dict(doc.get("success") or {}),
                   demos=dict(doc.get("demos") or {}), max_episode_steps=doc.get("max_episode_steps"),
                   control_hz=doc.get("control_hz"), policy=dict(doc.get("policy") or {}), base_dir=str(base_dir))


def load_env_spec(path: str | Path) -> EnvSpec:
    """Read an env spec file (.yaml / .yml / .json). Raises FileNotFoundError, or EnvSpecError naming the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"env spec {path} does not exist")
    try:
        text = path.read_text()
        doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise EnvSpecError(f"env spec {path}: unreadable ({e})") from None
    try:
        return env_spec_from_dict(doc, base_dir=path.resolve().parent)
    except EnvSpecError as e:
        raise EnvSpecError(f"env spec {path}: {e}") from None


def resolve_callable(ref: str, base_dir: str | Path = ".") -> Callable[..., Any]:
    """``package.module:function`` (imported) or ``path/to/file.py:function`` (relative to base_dir) -> callable."""
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise EnvSpecError(f"callable reference must be 'module:function' or 'file.py:function', got {ref!r}")
    mod_name, fn_name = ref.split(":")
    try:
        if mod_name.endswith(".py"):
            p = Path(mod_name).expanduser()
            p = p if p.is_absolute() else Path(base_dir) / p
            if not p.is_file():
                raise EnvSpecError(f"{ref}: file {p} does not exist")
            name = f"qvgm_envspec_{p.stem}_{abs(hash(str(p.resolve())))}"
            mod = sys.modules.get(name)
            if mod is None:
                spec = importlib.util.spec_from_file_location(name, p)
                mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
                sys.modules[name] = mod
                spec.loader.exec_module(mod)  # type: ignore[union-attr]
        else:
            mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise EnvSpecError(f"{ref}: cannot import {mod_name} ({e})") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise EnvSpecError(f"{ref}: {mod_name} has no callable {fn_name!r}")
    return fn


# ---------------------------------------------------------------------------------------------------- adapter
def _subspace(space: spaces.Space, part: ObsPart) -> spaces.Space:
    if part.key is None:
        if isinstance(space, spaces.Dict):
            raise EnvSpecError(f"observation part {part.text!r} needs a key: the observation is a Dict with keys "
                               f"{sorted(space.spaces)}")
        return space
    if not isinstance(space, spaces.Dict):
        raise EnvSpecError(f"observation part {part.text!r} names key {part.key!r}, but the observation is a "
                           f"{type(space).__name__}, not a Dict (write '[a:b]')")
    if part.key not in space.spaces:
        raise EnvSpecError(f"observation key {part.key!r} is not in the observation space; keys: "
                           f"{sorted(space.spaces)}")
    return space.spaces[part.key]


def _part_width(space: spaces.Space, part: ObsPart) -> int:
    sub = _subspace(space, part)
    if not isinstance(sub, spaces.Box):
        raise EnvSpecError(f"observation part {part.text!r} is a {type(sub).__name__}; state parts must be Box")
    n = int(np.prod(sub.shape))
    idx = part.index
    if isinstance(idx, slice) and any(b is not None and abs(b) > n for b in (idx.start, idx.stop)):
        raise EnvSpecError(f"observation part {part.text!r}: index out of range for {n} values")
    try:
        width = len(np.arange(n)[list(idx) if isinstance(idx, tuple) else idx] if idx is not None else np.arange(n))
    except IndexError:
        raise EnvSpecError(f"observation part {part.text!r}: index out of range for {n} values") from None
    if width == 0:
        raise EnvSpecError(f"observation part {part.text!r} selects nothing (of {n} values)")
    return width


class GymEnvAdapter(gym.Env):
    """A Gymnasium env seen through an EnvSpec: stack observation dicts, sparse success reward, policy actions.

    Action: float[real_action_dim] in env units (the `action_dims` of the env's Box), clipped to the spec bounds.
    Raw env observation of the current step: ``raw_obs`` (what spec experts and predicates read).
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, spec: EnvSpec, max_episode_steps: int | None = None) -> None:
        super().__init__()
        self.env_spec = spec
        self.env: gym.Env | None = None
        for mod in spec.imports:
            try:
                importlib.import_module(mod)
            except ImportError as e:
                raise EnvSpecError(f"imports: cannot import {mod!r} ({e})") from None
        if spec.env_id not in gym.registry and ":" not in spec.env_id:
            near = difflib.get_close_matches(spec.env_id, list(gym.registry), n=5, cutoff=0.6)
            raise EnvSpecError(f"unknown Gymnasium env id {spec.env_id!r}" + (f"; similar: {near}" if near else
                               " (is its package installed and listed under `imports`?)"))
        steps = max_episode_steps or spec.max_episode_steps
        kwargs = dict(spec.env_kwargs)
        if steps is not None:
            kwargs["max_episode_steps"] = int(steps)
        try:
            self.env = gym.make(spec.env_id, **kwargs)
        except gym.error.Error as e:
            raise EnvSpecError(f"gym.make({spec.env_id!r}) failed: {e}") from None
        try:
            self._validate()
        except BaseException as e:
            traceback.clear_frames(e.__traceback__)  # the frames' locals must not keep the env alive
            self.close()
            raise
        self.max_episode_steps = int(steps or getattr(self.env.spec, "max_episode_steps", None) or 1000)
        self.raw_obs: Any = None
        self._steps, self._return, self._t = 0, 0.0, 0.0

    def _validate(self) -> None:
        spec, env = self.env_spec, self.env
        osp, asp = env.observation_space, env.action_space
        self.state_dim = sum(_part_width(osp, p) for p in spec.state_parts)
        self.privileged_dim = sum(_part_width(osp, p) for p in spec.privileged_parts)
        if not isinstance(asp, spaces.Box) or len(asp.shape) != 1:
            raise EnvSpecError(f"{spec.env_id}: action space {asp} is not a 1-D Box; only continuous (Box) actions "
                               "are supported")
        n = asp.shape[0]
        dims = list(range(n)) if spec.action_dims is None else [int(d) for d in spec.action_dims]
        if not dims or len(set(dims)) != len(dims) or min(dims) < 0 or max(dims) >= n:
            raise EnvSpecError(f"action.dims {spec.action_dims} must be distinct indices into the {n}-dim action")
        self.action_dims = np.array(dims)
        fill = np.broadcast_to(np.asarray(spec.action_fill, dtype=np.float64), (n,)).copy() \
            if np.ndim(spec.action_fill) == 0 or len(spec.action_fill) == n else None
        if fill is None:
            raise EnvSpecError(f"action.fill must be a number or {n} numbers, got {spec.action_fill}")
        self._fill = fill
        lo = np.asarray(spec.action_low if spec.action_low is not None else asp.low[dims], dtype=np.float64)
        hi = np.asarray(spec.action_high if spec.action_high is not None else asp.high[dims], dtype=np.float64)
        if lo.shape != (len(dims),) or hi.shape != (len(dims),):
            raise EnvSpecError(f"action.low / action.high need {len(dims)} values (one per controlled dim)")
        if not (np.isfinite(lo).all() and np.isfinite(hi).all() and (lo < hi).all()):
            raise EnvSpecError(f"action bounds must be finite with low < high, got low={lo.tolist()} "
                               f"high={hi.tolist()} (give action.low / action.high for an unbounded Box)")
        self.action_low, self.action_high = lo, hi
        self.action_space = spaces.Box(lo.astype(np.float32), hi.astype(np.float32), dtype=np.float32)
        self.image_shapes: dict[str, tuple[int, int]] = {}
        for cam, src in spec.images.items():
            if src == "render":
                if getattr(env, "render_mode", None) != "rgb_array":
                    raise EnvSpecError(f"images.{cam}: 'render' needs env_kwargs.render_mode: rgb_array")
                continue
            sub = _subspace(osp, ObsPart(src, None, src))
            if not isinstance(sub, spaces.Box) or len(sub.shape) != 3 or sub.shape[2] != 3 or sub.dtype != np.uint8:
                raise EnvSpecError(f"images.{cam}: observation key {src!r} is {sub}, not a uint8 [H, W, 3] image")
            self.image_shapes[cam] = (int(sub.shape[0]), int(sub.shape[1]))
        if spec.success_kind == "predicate":
            self._predicate = resolve_callable(spec.success["predicate"], spec.base_dir)
        dt = getattr(env.unwrapped, "dt", None)
        hz = spec.control_hz or (round(1.0 / dt) if dt else env.metadata.get("render_fps"))
        if not hz or int(hz) < 1:
            raise EnvSpecError(f"{spec.env_id}: cannot tell the control rate; give control_hz")
        self.control_hz = int(hz)
        self._dt = float(dt) if dt else 1.0 / self.control_hz
        self.observation_space = spaces.Dict({
            "state": spaces.Box(-np.inf, np.inf, (self.state_dim,), np.float32),
            "privileged": spaces.Box(-np.inf, np.inf, (self.privileged_dim,), np.float32),
            "prompt": spaces.Text(max_length=max(256, len(spec.prompt))),
            "stamp": spaces.Box(0.0, np.inf, shape=(), dtype=np.float64)})

    # ------------------------------------------------------------------------------------------- properties
    @property
    def task(self) -> str:
        return self.env_spec.name

    @property
    def prompt(self) -> str:
        return self.env_spec.prompt

    @property
    def cameras(self) -> tuple[str, ...]:
        return tuple(self.env_spec.images)

    @property
    def real_action_dim(self) -> int:
        return len(self.action_dims)

    @property
    def state_names(self) -> list[str]:
        return [f"state_{i}" for i in range(self.state_dim)]

    @property
    def action_names(self) -> list[str]:
        return [f"action_{int(d)}" for d in self.action_dims]

    @property
    def joint_names(self) -> list[str]:
        """Action dim names (TabletopEnv compatibility; state and action differ here: see state_names)."""
        return self.action_names

    @property
    def elapsed_steps(self) -> int:
        return self._steps

    # ------------------------------------------------------------------------------------------- gym API
    def _obs(self) -> dict[str, Any]:
        raw = self.raw_obs
        obs: dict[str, Any] = {
            "state": np.concatenate([p.take(raw) for p in self.env_spec.state_parts]).astype(np.float32),
            "privileged": (np.concatenate([p.take(raw) for p in self.env_spec.privileged_parts]) if
                           self.env_spec.privileged_parts else np.zeros(0)).astype(np.float32),
            "prompt": self.env_spec.prompt, "stamp": self._t}
        if self.env_spec.images:
            obs["images"] = {cam: self._image(cam, src) for cam, src in self.env_spec.images.items()}
        return obs

    def _image(self, cam: str, src: str) -> np.ndarray:
        img = self.env.render() if src == "render" else self.raw_obs[src]
        img = np.asarray(img)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise EnvSpecError(f"images.{cam}: got {img.dtype} {img.shape}, want uint8 [H, W, 3]")
        return img

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Reset the env (same seed -> same episode). options: {"task": spec name} only (the trainer passes it)."""
        options = dict(options or {})
        if set(options) - {"task"} or options.get("task", self.task) != self.task:
            raise ValueError(f"reset options {options} not supported; this env is task {self.task!r}")
        super().reset(seed=seed)
        self.raw_obs, info = self.env.reset(seed=seed)
        self._steps, self._return, self._t = 0, 0.0, 0.0
        return self._obs(), {**info, "success": False, "task": self.task, "prompt": self.prompt}

    def env_action(self, action: np.ndarray) -> np.ndarray:
        """Policy action [real_action_dim] (env units) -> full env action, clipped. ValueError on bad input."""
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (len(self.action_dims),):
            raise ValueError(f"action must have shape ({len(self.action_dims)},), got {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"action must be finite, got {a.tolist()}")
        full = self._fill.copy()
        full[self.action_dims] = np.clip(a, self.action_low, self.action_high)
        return full.astype(self.env.action_space.dtype)

    def is_success(self, raw_obs: Any, env_reward: float, info: dict[str, Any]) -> bool:
        """The spec's success definition at the current step."""
        s = self.env_spec.success
        kind = self.env_spec.success_kind
        if kind == "info_key":
            if s["info_key"] not in info:
                return False
            v = info[s["info_key"]]
            if "above" in s:
                return bool(float(v) > float(s["above"]))
            if "below" in s:
                return bool(float(v) < float(s["below"]))
            return bool(v)
        if kind == "predicate":
            return bool(self._predicate(raw_obs, env_reward, info))
        return bool(self._return >= float(s["return_threshold"]))

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        """One env step. Reward 1.0 and terminated on success; truncated at the time limit or on an env
        termination without success. info: the env's info + env_reward, env_terminated, success."""
        full = self.env_action(action)
        self.raw_obs, r, term, trunc, info = self.env.step(full)
        self._steps += 1
        self._t += self._dt
        self._return += float(r)
        ok = self.is_success(self.raw_obs, float(r), info)
        truncated = not ok and (bool(term) or bool(trunc) or self._steps >= self.max_episode_steps)
        info = {**info, "env_reward": float(r), "env_terminated": bool(term), "success": ok}
        return self._obs(), float(ok), ok, truncated, info

    def render(self) -> np.ndarray | None:
        return self.env.render()

    def close(self) -> None:
        """Close the env and drop it at once. A closed Gymnasium MuJoCo viewer that is garbage-collected later frees
        its GL objects in whatever EGL context is current then (another env's: its renders turn black)."""
        if self.env is not None:
            self.env.close()
            self.env = None
            gc.collect()

    # ------------------------------------------------------------------------------------------- demos
    def make_expert(self, seed: int) -> Callable[[Any], np.ndarray]:
        """The spec's expert for one episode: callable(raw_obs) -> full env action."""
        if "expert" not in self.env_spec.demos:
            raise EnvSpecError(f"spec {self.env_spec.name!r} has no demos.expert (demo source: {self.env_spec.demos})")
        factory = resolve_callable(self.env_spec.demos["expert"], self.env_spec.base_dir)
        return factory(self.env, int(seed))


__all__ = ["EnvSpec", "EnvSpecError", "GymEnvAdapter", "ObsPart", "env_spec_from_dict", "load_env_spec",
           "resolve_callable"]
