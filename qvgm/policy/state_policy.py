"""`state` backbone: a compact FlowPolicy over normalised proprio + privileged object state (no images).

Encoder: MLP([state_norm, privileged]) -> embedding e [B, embed_dim] (the context and the critic features).
Flow head: MLP([x_t real dims flattened, time embedding, e]) -> v on the real dims; padded dims get v = 0.
Flow-time convention (openpi): t = 1 noise, t = 0 clean.

`delta_actions`: the arm joints are modelled relative to the current joint state (FlowPolicyBase.delta_anchor,
the same mechanism as pi05's). `privileged_norm`: privileged object state is
standardised with buffers `priv_mean` / `priv_std` (set from the SFT data by `set_privileged_stats`).
`tool_features`: the encoder also sees the tool0 pose from forward kinematics of the arm joints (the URDF's arm
model, qvgm.sim.ik) — position (m) and the top-left 2x2 of its rotation — and, per privileged role (7 values:
xyz m + quat wxyz), the object position minus the tool position in dm (x10), so reaching is a near-linear map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qvgm.policy.config import StateConfig
from qvgm.policy.flow import FlowPolicyBase, batch_time, sinusoidal_time_embedding
from qvgm.policy.processor import _EPS, NormStats, Processor


@dataclass
class StateContext:
    """embedding: [B, embed_dim] encoder output; anchor: [B, 1, action_dim] current joint state in normalised action
    units on the delta dims (zero elsewhere), or None without `delta_actions`."""

    embedding: torch.Tensor
    anchor: torch.Tensor | None = None


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class _AdaRMS(nn.Module):
    """RMSNorm whose scale/shift/gate come from the time embedding (zero-initialised: identity norm, closed gate at
    the start), as pi05's expert norms: y = norm(x) * (1 + scale) + shift; the residual adds gate * f(y)."""

    def __init__(self, width: int, cond: int) -> None:
        super().__init__()
        self.mod = nn.Linear(cond, 3 * width)
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift, gate = self.mod(temb)[:, None].chunk(3, dim=-1)
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return y * (1 + scale) + shift, gate


class _TokenBlock(nn.Module):
    def __init__(self, width: int, heads: int, cond: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = _AdaRMS(width, cond), _AdaRMS(width, cond)
        self.cond_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.kv_cond = nn.Linear(width, 2 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        self.mlp = _mlp([width, 4 * width, width])

    def forward(self, a: torch.Tensor, c: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        b, h, w = a.shape
        y, gate = self.norm1(a, temb)
        q, k, v = self.qkv(y).chunk(3, dim=-1)
        kc, vc = self.kv_cond(self.cond_norm(c)).chunk(2, dim=-1)
        k, v = torch.cat([kc, k], 1), torch.cat([vc, v], 1)  # tokens attend to the conditioning token and each other

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, -1, self.heads, w // self.heads).transpose(1, 2)

        att = F.scaled_dot_product_attention(split(q), split(k), split(v))
        a = a + gate * self.out(att.transpose(1, 2).reshape(b, h, w))
        y, gate = self.norm2(a, temb)
        return a + gate * self.mlp(y)


class TokenFlowHead(nn.Module):
    """Flow head with pi05's expert shape: x_t real dims [B, H, r] -> tokens [B, H, width] (+ learned position),
    `head_layers` blocks of adaRMS(time) + attention over [conditioning token, tokens] + MLP, final adaRMS, linear
    -> v [B, H, r]. The conditioning token is a projection of the encoder embedding [B, embed_dim]."""

    def __init__(self, cfg: StateConfig) -> None:
        super().__init__()
        w = cfg.head_width
        if w % cfg.head_heads:
            raise ValueError(f"head_width {w} must be a multiple of head_heads {cfg.head_heads}")
        self.inp = nn.Linear(cfg.real_action_dim, w)
        self.pos = nn.Parameter(torch.randn(cfg.horizon, w) * 0.02)
        self.cond = nn.Linear(cfg.embed_dim, w)
        self.blocks = nn.ModuleList(_TokenBlock(w, cfg.head_heads, cfg.time_dim) for _ in range(cfg.head_layers))
        self.final = _AdaRMS(w, cfg.time_dim)
        self.outp = nn.Linear(w, cfg.real_action_dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        a = self.inp(x) + self.pos
        c = self.cond(embedding)[:, None]
        for blk in self.blocks:
            a = blk(a, c, temb)
        y, _ = self.final(a, temb)
        return self.outp(y)


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
        self.n_roles = cfg.privileged_dim // 7 if cfg.tool_features else 0
        extra = 7 + 3 * self.n_roles if cfg.tool_features else 0
        self._ik = None
        if cfg.tool_features:
            from qvgm.sim.ik import ArmIK

            self._ik = ArmIK()
            self._s_q01 = np.asarray(norm_stats.state_q01, dtype=np.float64)
            self._s_rng = np.maximum(np.asarray(norm_stats.state_q99, dtype=np.float64) - self._s_q01, _EPS)
        n_in = cfg.state_dim + cfg.privileged_dim + extra
        if cfg.encoder == "mlp":
            self.encoder = nn.Sequential(_mlp([n_in, cfg.hidden, cfg.hidden, cfg.embed_dim]),
                                         nn.LayerNorm(cfg.embed_dim))
        elif cfg.encoder == "linear":
            self.encoder = nn.Sequential(nn.Linear(n_in, cfg.embed_dim))
        else:
            raise ValueError(f"StateConfig.encoder must be 'mlp' or 'linear', got {cfg.encoder!r}")
        self.time_proj = nn.Linear(cfg.time_dim, cfg.time_dim)
        flat = cfg.horizon * cfg.real_action_dim
        if cfg.head == "mlp":
            self.head = _mlp([flat + cfg.time_dim + cfg.embed_dim] + [cfg.head_hidden] * cfg.head_depth + [flat])
        elif cfg.head == "transformer":
            self.head = TokenFlowHead(cfg)
        else:
            raise ValueError(f"StateConfig.head must be 'mlp' or 'transformer', got {cfg.head!r}")
        self.init_delta_anchor(cfg.delta_actions, cfg.state_dim, norm_stats)
        if cfg.privileged_norm and cfg.privileged_dim:
            self.register_buffer("priv_mean", torch.zeros(cfg.privileged_dim))
            self.register_buffer("priv_std", torch.ones(cfg.privileged_dim))

    @torch.no_grad()
    def set_privileged_stats(self, privileged: np.ndarray, min_std: float = 1e-2) -> None:
        """Standardisation of privileged state from samples [N, privileged_dim] (m / quaternion units); std is
        floored at `min_std` so constant dims (upright cubes' quaternions) stay finite. No-op unless
        `privileged_norm`."""
        if not hasattr(self, "priv_mean"):
            return
        p = np.asarray(privileged, dtype=np.float64).reshape(-1, self.config.privileged_dim)
        if not len(p) or not np.isfinite(p).all():
            raise ValueError("privileged stats need finite samples [N, privileged_dim], N >= 1")
        self.priv_mean.copy_(torch.from_numpy(p.mean(0)))
        self.priv_std.copy_(torch.from_numpy(np.maximum(p.std(0), min_std)))

    def encode(self, inputs: dict[str, torch.Tensor]) -> StateContext:
        """state [B, state_dim] normalised (+ privileged [B, k]) -> StateContext(embedding [B, embed_dim])."""
        x = inputs["state"]
        if self.config.privileged_dim:
            if "privileged" not in inputs:
                raise ValueError("state backbone configured with privileged_dim > 0 but inputs have no 'privileged'")
            p = inputs["privileged"]
            if self._ik is not None:
                x = torch.cat([x, self._tool_features(inputs["state"], p)], dim=-1)
            if hasattr(self, "priv_mean"):
                p = (p - self.priv_mean) / self.priv_std
            x = torch.cat([x, p], dim=-1)
        emb = self.encoder(x.to(self.time_proj.weight.dtype))
        return StateContext(emb, self.delta_anchor(inputs["state"], emb.dtype))

    @torch.no_grad()
    def _tool_features(self, state_norm: torch.Tensor, privileged: torch.Tensor) -> torch.Tensor:
        """[B, 7 + 3 * n_roles]: tool xyz (m), rot[:2, :2], (object xyz - tool xyz) * 10 per role."""
        q = ((state_norm.double().cpu().numpy() + 1.0) / 2.0 * self._s_rng + self._s_q01)[:, :6]
        feats = np.zeros((len(q), 7), dtype=np.float64)
        for i, qi in enumerate(q):
            pos, rot = self._ik.fk(qi)
            feats[i, :3] = pos
            feats[i, 3:] = rot[:2, :2].reshape(-1)
        tool = torch.from_numpy(feats).to(privileged.device, torch.float32)
        obj = privileged[:, : 7 * self.n_roles].reshape(-1, self.n_roles, 7)[..., :3]
        rel = (obj - tool[:, None, :3]) * 10.0
        return torch.cat([tool, rel.reshape(len(q), -1)], dim=-1)

    def batch_size(self, context: StateContext) -> int:
        return context.embedding.shape[0]

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, context: StateContext) -> torch.Tensor:
        """x_t [B, H, D] normalised, t [B] (1 = noise) -> v [B, H, D] (zero on padded dims)."""
        b = x_t.shape[0]
        r = self.real_action_dim
        t = batch_time(t, b, x_t.device)
        temb = F.silu(self.time_proj(sinusoidal_time_embedding(t, self.config.time_dim).to(x_t.dtype)))
        x_t = self.anchored_input(x_t, t, context.anchor)  # delta actions: flow on a - c (FlowPolicyBase)
        if isinstance(self.head, TokenFlowHead):
            v = self.head(x_t[..., :r], temb, context.embedding)
        else:
            v = self.head(torch.cat([x_t[..., :r].reshape(b, -1), temb, context.embedding], dim=-1))
        v = F.pad(v.reshape(b, self.horizon, r), (0, self.action_dim - r))
        return self.anchored_output(v, context.anchor)

    def critic_features(self, context: StateContext) -> torch.Tensor:
        """[B, embed_dim] encoder embedding."""
        return context.embedding
