"""A small but real flow-matching policy on a state vector, implementing the FlowPolicy protocol.

Used by the critic / Q-VGM tests and small CPU experiments: a conditional velocity MLP
v(x_t, t | z) over the flattened chunk, a time embedding and an encoded observation feature z.

Flow-time convention (openpi, as in qvgm/policy/interface.py): t = 1 is noise, t = 0 the clean chunk,
x_t = t * eps + (1 - t) * a, target velocity u = eps - a, Euler from t = 1 with dt = -1/K.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from qvgm.policy.interface import DenoisePath, Observation

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def euler_sample(velocity: VelocityFn, noise: torch.Tensor, num_steps: int = 10,
                 return_path: bool = False) -> torch.Tensor | tuple[torch.Tensor, DenoisePath]:
    """Integrate x <- x + dt * v(x, t) with dt = -1/K from t = 1 (x = noise [B, H, D]) to t = 0.

    velocity(x [B, H, D], t [B]) -> [B, H, D]. Returns the clean chunk x(t=0) [B, H, D] and optionally the
    DenoisePath (x [K+1, B, H, D] at t [K+1], t[0] = 1 ... t[K] = 0).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    b = noise.shape[0]
    times = torch.linspace(1.0, 0.0, num_steps + 1, dtype=noise.dtype, device=noise.device)
    dt = -1.0 / num_steps
    x = noise
    xs = [x]
    for k in range(num_steps):
        v = velocity(x, times[k].expand(b))
        x = x + dt * v
        xs.append(x)
    if return_path:
        return x, DenoisePath(x=torch.stack(xs), t=times)
    return x


def _time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of flow time t [B] in [0, 1] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), half, dtype=t.dtype, device=t.device))
    ang = t[:, None] * freqs[None, :] * math.pi
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)


class ToyFlowPolicy(nn.Module):
    """State-conditioned flow policy: observation["state"] float32[obs_dim] -> chunks [B, H, D].

    Actions are already normalised (identity postprocess, [-1, 1] is the nominal range); dims past
    `real_action_dim` are padding. The context is the encoded state feature z [B, feature_dim], which is also
    returned by `critic_features`.
    """

    def __init__(self, obs_dim: int, horizon: int = 4, action_dim: int = 4, real_action_dim: int = 3,
                 feature_dim: int = 32, hidden: int = 128, time_dim: int = 16) -> None:
        super().__init__()
        if not 0 < real_action_dim <= action_dim:
            raise ValueError("need 0 < real_action_dim <= action_dim")
        self.obs_dim = obs_dim
        self.horizon = horizon
        self.action_dim = action_dim
        self.real_action_dim = real_action_dim
        self.time_dim = time_dim
        self.encoder = nn.Sequential(nn.Linear(obs_dim, feature_dim), nn.SiLU(), nn.Linear(feature_dim, feature_dim))
        flat = horizon * action_dim
        self.net = nn.Sequential(
            nn.Linear(flat + time_dim + feature_dim, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, flat),
        )

    # --- FlowPolicy protocol -------------------------------------------------------------------------------
    def preprocess(self, observations: list[Observation]) -> dict[str, torch.Tensor]:
        """Observation dicts -> {"state": float32 [B, obs_dim]}; raises ValueError on a wrong shape."""
        if not observations:
            raise ValueError("preprocess needs at least one observation")
        states = []
        for i, obs in enumerate(observations):
            s = np.asarray(obs["state"], dtype=np.float32).reshape(-1)
            if s.shape[0] != self.obs_dim or not np.all(np.isfinite(s)):
                raise ValueError(f"observation {i}: state must be {self.obs_dim} finite floats, got {s.shape}")
            states.append(s)
        p = next(self.parameters())
        return {"state": torch.as_tensor(np.stack(states), dtype=p.dtype, device=p.device)}

    def encode(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """{"state": [B, obs_dim]} -> context z [B, feature_dim]."""
        return self.encoder(inputs["state"])

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """v(x_t, t | z): x_t [B, H, D], t [B] (1 = noise) -> [B, H, D]."""
        b = x_t.shape[0]
        h = torch.cat([x_t.reshape(b, -1), _time_embedding(t.to(x_t.dtype), self.time_dim), context], dim=-1)
        return self.net(h).reshape(b, self.horizon, self.action_dim)

    def sample(self, context: torch.Tensor, num_steps: int = 10, noise: torch.Tensor | None = None,
               return_path: bool = False) -> torch.Tensor | tuple[torch.Tensor, DenoisePath]:
        """Euler from t = 1 (noise [B, H, D]) to t = 0; returns normalised chunks [B, H, D] (and the path)."""
        if noise is None:
            noise = torch.randn(context.shape[0], self.horizon, self.action_dim, dtype=context.dtype,
                                device=context.device)
        return euler_sample(lambda x, t: self.velocity(x, t, context), noise, num_steps, return_path)

    def flow_loss(self, inputs: dict[str, torch.Tensor], actions: torch.Tensor) -> torch.Tensor:
        """Flow-matching MSE on the real dims; actions [B, H, D] normalised; t ~ Beta(1.5, 1) * 0.999 + 0.001."""
        context = self.encode(inputs)
        b = actions.shape[0]
        t = torch.distributions.Beta(1.5, 1.0).sample((b,)).to(actions) * 0.999 + 0.001
        eps = torch.randn_like(actions)
        tt = t[:, None, None]
        x_t = tt * eps + (1.0 - tt) * actions
        u = eps - actions
        v = self.velocity(x_t, t, context)
        r = self.real_action_dim
        return ((v[..., :r] - u[..., :r]) ** 2).mean()

    def critic_features(self, context: torch.Tensor) -> torch.Tensor:
        """[B, feature_dim] encoder embedding."""
        return context

    def postprocess(self, actions: torch.Tensor) -> np.ndarray:
        """Normalised [B, H, D] -> float64 [B, H, real_action_dim] (identity normalisation)."""
        return actions[..., : self.real_action_dim].detach().cpu().double().numpy()


def fit_toy_policy(obs_dim: int, horizon: int, action_dim: int, real_action_dim: int, *, noise: float,
                   steps: int, hidden: int = 64, seed: int = 0) -> tuple[ToyFlowPolicy, float]:
    """A ToyFlowPolicy fitted by flow matching on chunks a = 0.5 tanh(W s) + noise * eps (padding dims 0).

    Returns the frozen policy (requires_grad False) and the last training loss. Deterministic under `seed`.
    """
    torch.manual_seed(seed)
    policy = ToyFlowPolicy(obs_dim, horizon, action_dim, real_action_dim, hidden=hidden)
    w = torch.randn(obs_dim, horizon * action_dim) * 0.5
    opt = torch.optim.Adam(policy.parameters(), 1e-3)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        s = torch.randn(128, obs_dim)
        a = (0.5 * torch.tanh(s @ w)).reshape(-1, horizon, action_dim) + noise * torch.randn(128, horizon, action_dim)
        a[..., real_action_dim:] = 0.0
        loss = policy.flow_loss({"state": s}, a)
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.zero_grad(set_to_none=True)
    return policy.requires_grad_(False), float(loss.item())
