"""PolicyBackend over a learned FlowPolicy: one observation dict in, one ActionChunk (robot units) out."""

from __future__ import annotations

import numpy as np
import torch

from qvgm.policy.flow import FlowPolicyBase, check_noise_scale
from qvgm.policy.interface import ActionChunk, Observation
from qvgm.policy.prefix import sample_with_prefix


class NonFiniteActionError(RuntimeError):
    """The policy produced NaN/inf actions; the caller must hold position."""


class FlowPolicyBackend:
    """Wraps a FlowPolicy for the policy node. `joint_names` order the chunk columns (len = real_action_dim),
    `dt` is the control period in s; chunks are absolute joint targets (rad, gripper m) as in the dataset.
    Bad observations raise processor.ObservationError; non-finite output raises NonFiniteActionError.
    `cuda_graphs`: on a CUDA policy, chunks without an inpainting prefix replay a captured CUDA graph of the K
    Euler steps (the first inference per batch shape captures it: the hot-reload dry run does that off the
    control thread). `noise_scale` multiplies the flow's starting noise x_1 (FlowPolicyBase.initial_noise):
    1 samples the trained distribution, 0 is deterministic (docs/RESULTS.md measures what it does to success)."""

    name = "flow"

    def __init__(self, policy: FlowPolicyBase, joint_names: list[str], dt: float, num_steps: int = 10,
                 seed: int | None = None, cuda_graphs: bool = True, noise_scale: float = 1.0) -> None:
        if len(joint_names) != policy.real_action_dim:
            raise ValueError(f"{len(joint_names)} joint names for a policy with {policy.real_action_dim} action dims")
        self.noise_scale = check_noise_scale(noise_scale)
        self.policy = policy.eval()
        self.policy.cuda_graphs = bool(cuda_graphs)  # only acts on a CUDA policy (FlowPolicyBase.act)
        self.joint_names = list(joint_names)
        self.dt = float(dt)
        self.num_steps = num_steps
        self.prompt: str | None = None
        self._gen = torch.Generator().manual_seed(seed) if seed is not None else None

    def reset(self, prompt: str | None = None) -> None:
        """New episode; `prompt` is used for observations that carry none."""
        self.prompt = prompt

    def set_noise_scale(self, scale: float) -> None:
        """Change the sampling-noise scale for the next inference (ValueError unless finite and >= 0)."""
        self.noise_scale = check_noise_scale(scale)

    @torch.no_grad()
    def infer(self, observation: Observation, prefix: np.ndarray | None = None, prefix_len: int | None = None,
              weights: str = "hard") -> ActionChunk:
        """Observation -> chunk (robot units). With `prefix` float[P, real_action_dim] (robot units, rad / m; step
        k meant for the observation stamp + k * dt, P <= horizon) the chunk is inpainted on it
        (qvgm.policy.prefix.sample_with_prefix): the first `prefix_len` (default P) steps are held hard, and with
        weights="exp" the remaining P - prefix_len steps are pulled with a decaying soft mask."""
        obs = dict(observation)
        if not obs.get("prompt"):
            obs["prompt"] = self.prompt or ""
        p = self.policy
        noise = None
        if self._gen is not None:
            noise = p.initial_noise(1, generator=self._gen)
        if prefix is None:
            positions = p.act([obs], num_steps=self.num_steps, noise=noise, noise_scale=self.noise_scale)[0]
        else:
            pre = np.asarray(prefix, dtype=np.float64)
            if pre.ndim != 2 or pre.shape[0] > p.horizon:
                raise ValueError(f"prefix shape {pre.shape}, expected [P <= {p.horizon}, {p.real_action_dim}]")
            d = pre.shape[0] if prefix_len is None else int(prefix_len)
            pre_n = p.processor.normalize_actions(pre)[None].to(p.device)  # [1, P, D] normalised, padded
            ctx = p.encode(p.preprocess([obs]))
            noise = p.initial_noise(1, noise, self.noise_scale)
            positions = p.postprocess(sample_with_prefix(p, ctx, pre_n, d, num_steps=self.num_steps, noise=noise,
                                                         weights=weights))[0]
        if not np.isfinite(positions).all():
            raise NonFiniteActionError(f"policy {p.version} produced non-finite actions")
        return ActionChunk(positions=positions, dt=self.dt, joint_names=self.joint_names,
                           stamp=float(obs.get("stamp", 0.0)), version=str(p.version))
