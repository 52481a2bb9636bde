"""Policy backends for policy_node, chosen by name (parameter `backend`). No rclpy here.

A backend implements qvgm.policy.interface.PolicyBackend: observation dict in, ActionChunk out. Register a new
one (e.g. the learned FlowPolicy) with `@register_backend("flow")`; its factory gets `BackendConfig`.
The observation is the interface's dict; for sim-only backends the policy node adds the privileged extras
`objects` ({role: float64[7] xyz + quat wxyz}, from /qvgm/sim/objects) and `task` (task name).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qvgm.policy.interface import ActionChunk, Observation, PolicyBackend


@dataclass
class BackendConfig:
    """What every backend factory receives. dt: s between chunk steps; horizon: steps per chunk."""

    joint_names: list[str]
    horizon: int
    dt: float
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BackendEntry:
    factory: Callable[[BackendConfig], PolicyBackend]
    needs_objects: bool  # True: the node must subscribe to privileged object poses (sim only)


_REGISTRY: dict[str, BackendEntry] = {}


def register_backend(name: str, needs_objects: bool = False) -> Callable[[Callable], Callable]:
    def deco(factory: Callable[[BackendConfig], PolicyBackend]) -> Callable[[BackendConfig], PolicyBackend]:
        _REGISTRY[name] = BackendEntry(factory, needs_objects)
        return factory

    return deco


def backend_names() -> list[str]:
    return sorted(_REGISTRY)


def backend_entry(name: str) -> BackendEntry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown policy backend {name!r}; known: {backend_names()}")
    return _REGISTRY[name]


def make_backend(name: str, config: BackendConfig) -> PolicyBackend:
    return backend_entry(name).factory(config)


@register_backend("expert", needs_objects=True)
class ExpertBackend:
    """The scripted IK expert of qvgm.sim (sim only): needs obs["task"] and obs["objects"].

    options: noise (float, expert noise knob), expert_seed (int; < 0 or None = unseeded).
    """

    name = "expert"

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.noise = float(config.options.get("noise", 0.0))
        seed = config.options.get("expert_seed")
        self.seed = None if seed is None or int(seed) < 0 else int(seed)
        self._expert: Any = None
        self._task: str | None = None

    def reset(self, prompt: str | None = None) -> None:
        """New episode: the expert is rebuilt for the task seen in the next observation."""
        self._expert = None

    def infer(self, observation: Observation) -> ActionChunk:
        from qvgm.sim import make_expert

        task = observation.get("task")
        objects = observation.get("objects")
        if not task or objects is None:
            raise ValueError("expert backend needs observation['task'] and observation['objects'] (sim only)")
        if self._expert is None or task != self._task:
            self._expert = make_expert(task, noise=self.noise, seed=self.seed)
            self._expert.reset()
            self._task = task
        state = np.asarray(observation["state"], dtype=np.float64)
        chunk = np.asarray(self._expert.act_chunk(state, objects, self.config.horizon), dtype=np.float64)
        if chunk.shape != (self.config.horizon, len(self.config.joint_names)):
            raise ValueError(f"expert chunk has shape {chunk.shape}")
        return ActionChunk(positions=chunk, dt=self.config.dt, joint_names=list(self.config.joint_names),
                           stamp=float(observation["stamp"]), version="expert")


@register_backend("hold")
class HoldBackend:
    """Holds the observed joint positions: a chunk of H copies of obs["state"] (bring-up without a policy)."""

    name = "hold"

    def __init__(self, config: BackendConfig) -> None:
        self.config = config

    def reset(self, prompt: str | None = None) -> None:
        return None

    def infer(self, observation: Observation) -> ActionChunk:
        state = np.asarray(observation["state"], dtype=np.float64)
        if state.shape != (len(self.config.joint_names),):
            raise ValueError(f"state has shape {state.shape}, expected ({len(self.config.joint_names)},)")
        return ActionChunk(positions=np.repeat(state[None], self.config.horizon, axis=0), dt=self.config.dt,
                           joint_names=list(self.config.joint_names), stamp=float(observation["stamp"]),
                           version="hold")


@register_backend("flow")
def make_flow_backend(config: BackendConfig) -> PolicyBackend:
    """A learned FlowPolicy (pi0.5 or `state`) from a checkpoint directory (qvgm.policy.load_policy: sha256-
    verified safetensors, no pickle), wrapped by qvgm.policy.backend.FlowPolicyBackend; or, with the option
    `checkpoint_store`, a `StoreFlowBackend` serving (and hot-reloading) the store's current version.

    options: checkpoint (directory) or checkpoint_store (CheckpointStore root), device ("cpu", "cuda", "cuda:N",
    "auto"), cuda_graphs (on CUDA: replay a captured graph of the K Euler steps; default true), num_steps
    (Euler steps K, flow time t = 1 noise -> 0 clean), seed (< 0 = unseeded sampling noise), noise_scale (x_1 =
    noise_scale * eps; 1 = the trained distribution, 0 = deterministic). The chunk
    length is the policy's horizon; the checkpoint must have real_action_dim == len(joint_names). Policies with
    privileged_dim > 0 (sim `state` backbone) get obs["privileged"] from /qvgm/sim/objects.
    """
    from qvgm.policy import load_policy
    from qvgm.policy.backend import FlowPolicyBackend

    if config.options.get("checkpoint_store"):
        return StoreFlowBackend(config)
    ckpt = str(config.options.get("checkpoint") or "")
    if not ckpt:
        raise ValueError("the flow backend needs the parameter `checkpoint` (a checkpoint directory) or "
                         "`checkpoint_store` (a checkpoint store root)")
    policy = load_policy(ckpt, expect={"real_action_dim": len(config.joint_names)},
                         device=str(config.options.get("device", "cpu")))
    seed = int(config.options.get("seed", -1))
    backend = FlowPolicyBackend(policy, list(config.joint_names), dt=config.dt,
                                num_steps=int(config.options.get("num_steps", 10)), seed=seed if seed >= 0 else None,
                                cuda_graphs=bool(config.options.get("cuda_graphs", True)),
                                noise_scale=float(config.options.get("noise_scale", 1.0)))
    backend.needs_objects = int(getattr(policy.config, "privileged_dim", 0) or 0) > 0
    backend.version = str(policy.version)
    return backend


class NoPolicyError(RuntimeError):
    """No validated checkpoint is serving yet (the robot holds)."""


def synthetic_observation(policy: Any, state_dim: int) -> Observation:
    """A neutral observation for a dry run when the robot has not sent one yet: zero state, black 224x224
    images for the policy's cameras, zero privileged state (float32), empty prompt, stamp 0."""
    cfg = policy.config
    size = int(getattr(cfg, "image_size", 224))
    obs: Observation = {"images": {c: np.zeros((size, size, 3), np.uint8) for c in getattr(cfg, "camera_names", [])},
                        "state": np.zeros(state_dim, np.float32), "prompt": "", "stamp": 0.0}
    priv = int(getattr(cfg, "privileged_dim", 0) or 0)
    if priv:
        obs["privileged"] = np.zeros(priv, np.float32)
    return obs


class StoreFlowBackend:
    """Serves the current version of a CheckpointStore and hot-reloads new ones (qvgm.reload.HotReloader).

    A new version is verified (sha256 manifest, no pickle), loaded with load_policy(expect = the profile's action
    and state dims) on a background thread, validated (cameras it needs are in the profile, no privileged state
    unless `privileged` is allowed, finite weights, a dry-run inference on `observation_source()` -- the node's
    latest observation -- within `reload_budget_s`) and handed over by `poll_swap()`, which the node calls only
    at a chunk boundary and which never blocks. Until the first version is swapped in, `ready` is False and
    `infer` raises NoPolicyError. options: checkpoint_store, device, num_steps, seed, noise_scale, cameras (profile
    camera names), privileged (bool), reload_budget_s, reload_watch ("auto" | "inotify" | "poll"), reload_poll_s,
    reload_yield_s (s the loader pauses between stages, HotReloader.yield_s), reload_pace_s (the loader waits at
    most min(this, 2 chunk intervals; default 0.25) before load and before the dry run for the next chunk
    boundary, `note_boundary()`; 0 disables), reload_nice
    (niceness added to the loader thread; default 0: a niced loader thread that the OS deschedules while it
    holds the GIL stalls the control thread -- measured, docs/RESULTS.md).

    Keeping the control loop on time during a reload: the files are hashed once (load_policy reuses the manifest
    the reloader verified), the dry run pre-warms the new model on the loader thread (its first inference and
    lazy allocations happen there, `warm_thread` records where), and the swapped-out model is released on the
    loader thread (HotReloader.retire), not at the chunk boundary.
    """

    name = "flow"

    def __init__(self, config: BackendConfig) -> None:
        from qvgm.checkpoints import CheckpointStore
        from qvgm.policy.flow import check_noise_scale
        from qvgm.reload import HotReloader

        self.config = config
        opts = config.options
        self.device = str(opts.get("device", "cpu"))
        self.num_steps = int(opts.get("num_steps", 10))
        self.cuda_graphs = bool(opts.get("cuda_graphs", True))
        self.noise_scale = check_noise_scale(opts.get("noise_scale", 1.0))  # refused here, not at the first reload
        seed = int(opts.get("seed", -1))
        self.seed = seed if seed >= 0 else None
        self.cameras = set(opts.get("cameras") or [])
        self.budget_s = float(opts.get("reload_budget_s", 0.5))
        self.needs_objects = bool(opts.get("privileged", False))
        self.observation_source: Callable[[], Observation | None] = lambda: None
        self.store = CheckpointStore(str(opts["checkpoint_store"]), keep_last=None)
        self.current: Any = None  # FlowPolicyBackend serving now
        self.version: str | None = None
        self.prompt: str | None = None
        self.last_dry_run_s: float | None = None
        self.loader_nice = int(opts.get("reload_nice", 0))
        self.pace_s = float(opts.get("reload_pace_s", 0.25))
        self._boundary_period: float | None = None  # s between chunk boundaries (smoothed)
        self._boundary = threading.Event()
        self._last_boundary = -np.inf  # time.monotonic() of the last note_boundary()
        self.paced = 0  # loader stages that waited for a chunk boundary
        self.warm_thread: str | None = None  # thread that ran the dry run (pre-warm) of the last validated version
        self._niced: set[int] = set()
        self.reloader = HotReloader(self.store, self._load, self._validate,
                                    required_files=("config.json", "model.safetensors", "norm_stats.json"),
                                    watch=str(opts.get("reload_watch", "auto")),
                                    poll_interval_s=float(opts.get("reload_poll_s", 0.5)),
                                    yield_s=float(opts.get("reload_yield_s", 0.002)), pace=self._wait_for_boundary)
        self.reloader.start()

    # -- loader thread ----------------------------------------------------------------------------------
    def _load(self, path: Any, manifest: dict[str, Any]) -> Any:
        from qvgm.policy import load_policy
        from qvgm.policy.backend import FlowPolicyBackend

        self._lower_loader_priority()
        n = len(self.config.joint_names)
        policy = load_policy(path, expect={"real_action_dim": n, "state_dim": n}, device=self.device,
                             verified_manifest=manifest)  # HotReloader verified every sha256 under its lease
        return FlowPolicyBackend(policy, list(self.config.joint_names), dt=self.config.dt,
                                 num_steps=self.num_steps, seed=self.seed, cuda_graphs=self.cuda_graphs,
                                 noise_scale=self.noise_scale)

    def _lower_loader_priority(self) -> None:
        """Linux nice values are per thread: make the loader thread yield the CPU to the control loop and the
        inference worker (raising niceness needs no privilege). Once per thread; best effort."""
        if self.loader_nice <= 0 or threading.get_native_id() in self._niced:
            return
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + self.loader_nice))
            self._niced.add(tid)
        except (OSError, AttributeError):
            pass

    def _wait_for_boundary(self) -> None:
        """Loader thread, between stages: while a model serves and chunks are flowing, wait (at most `pace_s`)
        for the control loop's next `note_boundary()`, so the next stage (module construction, the dry run) runs
        in the idle gap after a chunk went out instead of competing with an inference for the GIL and CPU."""
        limit = self.pace_s if self._boundary_period is None else min(self.pace_s, 2.0 * self._boundary_period)
        if limit <= 0 or self.current is None or time.monotonic() - self._last_boundary > limit:
            return  # nothing serves yet (start-up) or the robot is idle: load at once
        self._boundary.clear()
        if self._boundary.wait(limit):
            self.paced += 1

    def _validate(self, backend: Any, manifest: dict[str, Any]) -> None:
        from qvgm.reload import ValidationError, check_finite, timed_dry_run

        cfg = backend.policy.config
        missing = sorted(set(getattr(cfg, "camera_names", [])) - self.cameras)
        if missing:
            raise ValidationError(f"checkpoint needs cameras {missing} the robot profile lacks "
                                  f"(profile: {sorted(self.cameras)})")
        if int(getattr(cfg, "privileged_dim", 0) or 0) > 0 and not self.needs_objects:
            raise ValidationError("checkpoint needs privileged sim state (privileged_dim > 0); "
                                  "set the node parameter `privileged: true` (sim only)")
        check_finite(backend.policy.state_dict())
        obs = self.observation_source() or synthetic_observation(backend.policy, len(self.config.joint_names))
        # the untimed warm-up run is the pre-warm: first inference + lazy allocations happen here, not after the swap
        self.last_dry_run_s = timed_dry_run(lambda: backend.infer(obs).positions, self.budget_s)
        self.warm_thread = threading.current_thread().name

    # -- control side -----------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.current is not None

    def poll_swap(self) -> str | None:
        """At a chunk boundary: swap in a newly validated version (returns it) or None. Never blocks."""
        got = self.reloader.poll_swap()
        if got is None:
            return None
        old = self.current
        self.current, self.version = got
        self.current.reset(self.prompt)
        self.current.set_noise_scale(self.noise_scale)  # loaded before a set_noise_scale? serve the current scale
        self.reloader.retire(old)  # freed on the loader thread; this (control) thread keeps no reference
        del old
        return self.version

    def note_boundary(self) -> None:
        """Control side, after a chunk was published: the next inference is an interval away (wakes the loader)."""
        now = time.monotonic()
        gap = now - self._last_boundary
        if gap < 5.0:  # the period between chunks, smoothed; a pause (estop, new episode) is not a period
            self._boundary_period = gap if self._boundary_period is None else 0.8 * self._boundary_period + 0.2 * gap
        self._last_boundary = now
        self._boundary.set()

    def reset(self, prompt: str | None = None) -> None:
        self.prompt = prompt
        if self.current is not None:
            self.current.reset(prompt)

    def set_noise_scale(self, scale: float) -> None:
        """Sampling-noise scale of the serving version and of every version swapped in later."""
        from qvgm.policy.flow import check_noise_scale

        self.noise_scale = check_noise_scale(scale)
        current = self.current
        if current is not None:
            current.set_noise_scale(self.noise_scale)

    def infer(self, observation: Observation, **prefix: Any) -> ActionChunk:
        """The serving FlowPolicyBackend's chunk; `prefix` keywords (prefix, prefix_len, weights) pass through."""
        backend = self.current
        if backend is None:
            raise NoPolicyError("no validated checkpoint serving yet")
        return backend.infer(observation, **prefix)

    def diagnostic_values(self) -> dict[str, str]:
        values = {f"reload.{k}": v for k, v in self.reloader.diagnostic_values().items()}
        values["reload.last_dry_run_s"] = "" if self.last_dry_run_s is None else f"{self.last_dry_run_s:.4f}"
        values["reload.paced_stages"] = str(self.paced)  # loader stages that waited for a chunk boundary
        values["reload.released_models"] = str(self.reloader.released)  # old models freed on the loader thread
        return values

    def close(self) -> None:
        self.reloader.stop()
