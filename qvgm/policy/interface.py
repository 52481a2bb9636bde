"""The one policy interface used by the policy node, the trainer and every baseline.

Observation (the same dict from sim, ROS nodes and the dataset reader):
    {"images": {camera_name: uint8[H, W, 3] RGB}, "state": float32[d] (joint positions rad + gripper m),
     "prompt": str, "stamp": float seconds, optional "privileged": float32[k] (sim object state, `state`
     backbone and scripted experts only)}

Flow-time convention (openpi): t = 1 is pure noise, t = 0 is the clean action chunk.
    x_t = t * eps + (1 - t) * a,   target velocity u = eps - a,
    sampling integrates x <- x + dt * v(x, t) with dt = -1/K from t = 1 down to t = 0.
A DenoisePath keeps every integration state: path.x[i] is the state at flow time path.t[i], with
path.t[0] = 1 (noise) decreasing to path.t[K] = 0 (the returned chunk). Actions inside the model are
normalised (quantile stats, [-1, 1]) and padded to `action_dim`; only the first `real_action_dim` are real.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

Observation = dict[str, Any]


@dataclass
class DenoisePath:
    """x: [K+1, B, H, action_dim] integration states; t: [K+1] flow times, t[0] = 1 (noise) ... t[K] = 0."""

    x: torch.Tensor
    t: torch.Tensor


@runtime_checkable
class FlowPolicy(Protocol):
    horizon: int  # H, action steps per chunk
    action_dim: int  # padded model width D
    real_action_dim: int  # robot action dims (7 for the tabletop arm: 6 joints + gripper)

    def preprocess(self, observations: list[Observation]) -> dict[str, torch.Tensor]:
        """Observation dicts -> model inputs (resized/padded images in [-1, 1], normalised state, tokens)."""

    def encode(self, inputs: dict[str, torch.Tensor]) -> Any:
        """Run the prefix once; the returned context (e.g. cached K/V) is reused by every velocity call."""

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, context: Any) -> torch.Tensor:
        """v(x_t, t | context): x_t [B, H, D] normalised, t [B] flow time (1 = noise) -> [B, H, D]."""

    def sample(self, context: Any, num_steps: int = 10, noise: torch.Tensor | None = None,
               return_path: bool = False) -> torch.Tensor | tuple[torch.Tensor, DenoisePath]:
        """Euler-integrate from t=1 (noise [B, H, D]) to t=0; returns normalised chunks [B, H, D]."""

    def flow_loss(self, inputs: dict[str, torch.Tensor], actions: torch.Tensor) -> torch.Tensor:
        """Flow-matching MSE on valid dims; actions [B, H, D] normalised. t ~ Beta(1.5, 1) * 0.999 + 0.001."""

    def critic_features(self, context: Any) -> torch.Tensor:
        """[B, F] critic state features (RL token for pi05, encoder embedding for `state`)."""

    def postprocess(self, actions: torch.Tensor) -> np.ndarray:
        """Normalised [B, H, D] -> robot units float64 [B, H, real_action_dim]."""


@dataclass
class ActionChunk:
    """What a policy backend hands the policy node: absolute joint targets in robot units.

    positions: float64[H, n_joints] (rad for revolute joints, m for the gripper), step k is meant for
    stamp + k * dt (k = 0 is the first point after the observation); joint_names orders the columns.
    """

    positions: np.ndarray
    dt: float
    joint_names: list[str]
    stamp: float  # observation time (s) the chunk was computed from
    version: str  # policy/checkpoint version that produced it ("expert" for the scripted expert)


@runtime_checkable
class PolicyBackend(Protocol):
    """Observation dict in, action chunk out. Implementations: scripted expert (sim), learned FlowPolicy."""

    name: str

    def reset(self, prompt: str | None = None) -> None: ...

    def infer(self, observation: Observation) -> ActionChunk: ...
