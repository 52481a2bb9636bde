"""RL token (METHOD.md §2): a compact critic feature read from the frozen VLM's final-layer prefix embeddings.

Encoder: z_1..M (final-norm prefix embeddings [B, M, width], invalid tokens masked) projected to `dim`, plus
position embeddings, with one learned token appended LAST; a bidirectional transformer; its output at that
token, layer-normed, is z_rl [B, dim].
Decoder: causal transformer over [z_rl, z_1..M-1] (teacher forcing; position i predicts z_{i+1}, i.e. output i
reconstructs z_i counting z_rl as position 0) -> Linear(dim -> width); loss = per-token MSE to sg(z_1..M) over
valid tokens. Context dropout: during training each decoder context token z_1..M-1 is replaced by a learned
mask embedding with probability `context_dropout`, so reconstruction must lean on z_rl.
Trained once with the VLA frozen, then frozen itself; saved inside the policy checkpoint (config field
`rl_token` + `rl_token.*` weights in model.safetensors). Quality: held-out mean per-token cosine similarity of
the teacher-forced reconstruction (bar: > 0.95 on real data). Not related to flow time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RLTokenConfig:
    """width: VLM width (input/reconstruction size); max_len: prefix length M; dim: z_rl size."""

    width: int
    max_len: int
    dim: int = 256
    heads: int = 4
    enc_layers: int = 2
    dec_layers: int = 2
    mlp_ratio: int = 4
    context_dropout: float = 0.3

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RLTokenConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"rl_token config has unknown fields {sorted(unknown)}")
        return cls(**d)


def _stack(cfg: RLTokenConfig, layers: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, cfg.dim * cfg.mlp_ratio, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class RLToken(nn.Module):
    """Encoder/decoder pair; `encode` gives z_rl [B, dim], `reconstruct` the teacher-forced z_hat [B, M, width]."""

    def __init__(self, cfg: RLTokenConfig) -> None:
        super().__init__()
        if cfg.dim % cfg.heads:
            raise ValueError(f"rl_token dim {cfg.dim} must be divisible by heads {cfg.heads}")
        if not 0.0 <= cfg.context_dropout < 1.0:
            raise ValueError(f"context_dropout must be in [0, 1), got {cfg.context_dropout}")
        self.cfg = cfg
        self.in_norm = nn.LayerNorm(cfg.width)
        self.in_proj = nn.Linear(cfg.width, cfg.dim)
        self.enc_pos = nn.Parameter(torch.randn(cfg.max_len + 1, cfg.dim) * 0.02)
        self.query = nn.Parameter(torch.randn(cfg.dim) * 0.02)
        self.encoder = _stack(cfg, cfg.enc_layers)
        self.out_norm = nn.LayerNorm(cfg.dim)
        self.dec_in = nn.Linear(cfg.dim, cfg.dim)
        self.dec_pos = nn.Parameter(torch.randn(cfg.max_len, cfg.dim) * 0.02)
        self.mask_emb = nn.Parameter(torch.randn(cfg.dim) * 0.02)
        self.decoder = _stack(cfg, cfg.dec_layers)
        self.dec_norm = nn.LayerNorm(cfg.dim)
        self.out_proj = nn.Linear(cfg.dim, cfg.width)

    def _check(self, z: torch.Tensor, mask: torch.Tensor) -> None:
        if z.ndim != 3 or z.shape[1] != self.cfg.max_len or z.shape[2] != self.cfg.width:
            raise ValueError(f"prefix embeddings {tuple(z.shape)}, expected [B, {self.cfg.max_len}, {self.cfg.width}]")
        if mask.shape != z.shape[:2]:
            raise ValueError(f"prefix mask {tuple(mask.shape)} does not match embeddings {tuple(z.shape[:2])}")

    def encode(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """z [B, M, width] final-norm prefix embeddings, mask [B, M] bool (True = valid) -> z_rl [B, dim]."""
        self._check(z, mask)
        b = z.shape[0]
        x = self.in_proj(self.in_norm(z.to(self.in_proj.weight.dtype)))
        x = torch.cat([x, self.query.expand(b, 1, -1)], dim=1) + self.enc_pos[None]
        pad = torch.cat([~mask.bool(), torch.zeros(b, 1, dtype=torch.bool, device=z.device)], dim=1)
        return self.out_norm(self.encoder(x, src_key_padding_mask=pad)[:, -1])

    def reconstruct(self, z: torch.Tensor, mask: torch.Tensor, z_rl: torch.Tensor | None = None,
                    generator: torch.Generator | None = None, drop_context: bool = False) -> torch.Tensor:
        """Teacher-forced reconstruction z_hat [B, M, width] of z from [z_rl, z_1..M-1] (causal). In training mode
        context tokens are dropped (-> mask embedding) with probability cfg.context_dropout; `drop_context`
        drops all of them (reconstruction from z_rl alone, a diagnostic)."""
        self._check(z, mask)
        b, m = z.shape[:2]
        if z_rl is None:
            z_rl = self.encode(z, mask)
        ctx = self.in_proj(self.in_norm(z[:, :-1].to(self.in_proj.weight.dtype)))
        if drop_context:
            ctx = self.mask_emb.expand_as(ctx)
        elif self.training and self.cfg.context_dropout > 0:
            drop = torch.rand(b, m - 1, 1, generator=generator, device=z.device) < self.cfg.context_dropout
            ctx = torch.where(drop, self.mask_emb.expand_as(ctx), ctx)
        x = torch.cat([self.dec_in(z_rl)[:, None], ctx], dim=1) + self.dec_pos[None]
        pad = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=z.device), ~mask[:, :-1].bool()], dim=1)
        causal = torch.triu(torch.ones(m, m, dtype=torch.bool, device=z.device), diagonal=1)
        h = self.decoder(x, mask=causal, src_key_padding_mask=pad, is_causal=True)
        return self.out_proj(self.dec_norm(h))

    def loss(self, z: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-token MSE (mean over features, then over valid tokens) between z_hat and sg(z)."""
        target = z.detach().float()
        err = (self.reconstruct(target, mask, generator=generator) - target).pow(2).mean(-1)
        m = mask.to(err.dtype)
        return (err * m).sum() / m.sum().clamp_min(1.0)

    @torch.no_grad()
    def cosine(self, z: torch.Tensor, mask: torch.Tensor, drop_context: bool = False) -> torch.Tensor:
        """Mean cosine similarity between z_hat and z over valid tokens, per sample [B] (teacher forced, no random
        context dropout; `drop_context` = from z_rl alone)."""
        was = self.training
        self.eval()
        try:
            zf = z.float()
            cos = F.cosine_similarity(self.reconstruct(zf, mask, drop_context=drop_context), zf, dim=-1)
        finally:
            self.train(was)
        m = mask.to(cos.dtype)
        return (cos * m).sum(1) / m.sum(1).clamp_min(1.0)


def attach_rl_token(policy: nn.Module, cfg: RLTokenConfig) -> RLToken:
    """Give a pi05 policy a fresh RL token (config field + submodule `rl_token`); returns the module."""
    pcfg = getattr(policy, "config", None)
    if getattr(pcfg, "backbone", None) != "pi05":
        raise ValueError("the RL token reads VLM prefix embeddings: only pi05 policies have one "
                         "(the `state` backbone's critic feature is its encoder embedding)")
    mod = RLToken(cfg).to(next(policy.parameters()).device)
    pcfg.rl_token = cfg.to_dict()
    policy.rl_token = mod
    return mod


def prefix_length(pcfg: Any) -> int:
    """Prefix length M of a pi05 config: image tokens of every camera (+ 1 keypoint token each with
    `keypoint_tokens`, + K + Q with `keypoint_per_token`, Q = `keypoint_prompt_queries`) + the token budget (+ 1
    continuous state token with `continuous_state`)."""
    k = int(getattr(pcfg, "keypoint_tokens", 0) or 0)
    k += int(getattr(pcfg, "keypoint_prompt_queries", 0) or 0) if k else 0
    per_camera = (pcfg.image_size // pcfg.patch_size) ** 2 + (k if getattr(pcfg, "keypoint_per_token", False)
                                                                else int(k > 0))
    return (len(pcfg.camera_names) * per_camera + pcfg.max_token_len
            + int(bool(getattr(pcfg, "continuous_state", False))))
