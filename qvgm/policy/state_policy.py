"""`state` backbone: a compact FlowPolicy over normalised proprio + privileged object state (no images).

Encoder: MLP([state_norm, privileged]) -> embedding e [B, embed_dim] (the context and the critic features).
Flow head: MLP([x_t real dims flattened, time embedding, e]) -> v on the real dims; padded dims get v = 0.
Flow-time convention (openpi): t = 1 noise, t = 0 clean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qvgm.policy.config import StateConfig
from qvgm.policy.flow import FlowPolicyBase, batch_time, sinusoidal_time_embedding
from qvgm.policy.processor import NormStats, Processor


@dataclass
class StateContext:
    """embedding: [B, embed_dim] encoder output."""

    embedding: torch.Tensor


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class StatePolicy(FlowPolicyBase):
    """FlowPolicy over low-dimensional state; inputs need `state` [B, state_dim] (+ `privileged` [B, k])."""

    def __init__(self, cfg: StateConfig, norm_stats: NormStats) -> None:
        super().__init__()
        self.config = cfg
        self.horizon = cfg.horizon
        self.action_dim = cfg.action_dim
        self.real_action_dim = cfg.real_action_dim
        self.processor = Processor(camera_names=[], image_size=0, state_dim=cfg.state_dim,
                                   real_action_dim=cfg.real_action_dim, action_dim=cfg.action_dim,
                                   norm_stats=norm_stats, tokenizer=None, privileged_dim=cfg.privileged_dim)
        self.encoder = nn.Sequential(_mlp([cfg.state_dim + cfg.privileged_dim, cfg.hidden, cfg.hidden, cfg.embed_dim]),
                                     nn.LayerNorm(cfg.embed_dim))
        self.time_proj = nn.Linear(cfg.time_dim, cfg.time_dim)
        flat = cfg.horizon * cfg.real_action_dim
        self.head = _mlp([flat + cfg.time_dim + cfg.embed_dim] + [cfg.head_hidden] * cfg.head_depth + [flat])

    def encode(self, inputs: dict[str, torch.Tensor]) -> StateContext:
        """state [B, state_dim] normalised (+ privileged [B, k]) -> StateContext(embedding [B, embed_dim])."""
        x = inputs["state"]
        if self.config.privileged_dim:
            if "privileged" not in inputs:
                raise ValueError("state backbone configured with privileged_dim > 0 but inputs have no 'privileged'")
            x = torch.cat([x, inputs["privileged"]], dim=-1)
        return StateContext(self.encoder(x.to(self.time_proj.weight.dtype)))

    def batch_size(self, context: StateContext) -> int:
        return context.embedding.shape[0]

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, context: StateContext) -> torch.Tensor:
        """x_t [B, H, D] normalised, t [B] (1 = noise) -> v [B, H, D] (zero on padded dims)."""
        b = x_t.shape[0]
        r = self.real_action_dim
        t = batch_time(t, b, x_t.device)
        temb = F.silu(self.time_proj(sinusoidal_time_embedding(t, self.config.time_dim).to(x_t.dtype)))
        v = self.head(torch.cat([x_t[..., :r].reshape(b, -1), temb, context.embedding], dim=-1))
        return F.pad(v.view(b, self.horizon, r), (0, self.action_dim - r))

    def critic_features(self, context: StateContext) -> torch.Tensor:
        """[B, embed_dim] encoder embedding."""
        return context.embedding
