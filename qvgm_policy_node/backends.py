"""Policy backends for policy_node, chosen by name (parameter `backend`). No rclpy here.

A backend implements qvgm.policy.interface.PolicyBackend: observation dict in, ActionChunk out. Register a new
one (e.g. the learned FlowPolicy) with `@register_backend("flow")`; its factory gets `BackendConfig`.
The observation is the interface's dict; for sim-only backends the policy node adds the privileged extras
`objects` ({role: float64[7] xyz + quat wxyz}, from /qvgm/sim/objects) and `task` (task name).
"""

from __future__ import annotations

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
    verified safetensors, no pickle), wrapped by qvgm.policy.backend.FlowPolicyBackend.

    options: checkpoint (directory, required), device ("cpu"/"cuda"), num_steps (Euler steps K, flow time
    t = 1 noise -> 0 clean), seed (< 0 = unseeded sampling noise). The chunk length is the policy's horizon; the
    checkpoint must have real_action_dim == len(joint_names). Policies with privileged_dim > 0 (sim `state`
    backbone) get obs["privileged"] from /qvgm/sim/objects.
    """
    from qvgm.policy import load_policy
    from qvgm.policy.backend import FlowPolicyBackend

    ckpt = str(config.options.get("checkpoint") or "")
    if not ckpt:
        raise ValueError("the flow backend needs the parameter `checkpoint` (a checkpoint directory)")
    policy = load_policy(ckpt, expect={"real_action_dim": len(config.joint_names)},
                         device=str(config.options.get("device", "cpu")))
    seed = int(config.options.get("seed", -1))
    backend = FlowPolicyBackend(policy, list(config.joint_names), dt=config.dt,
                                num_steps=int(config.options.get("num_steps", 10)), seed=seed if seed >= 0 else None)
    backend.needs_objects = int(getattr(policy.config, "privileged_dim", 0) or 0) > 0
    return backend
