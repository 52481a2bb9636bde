"""Shared flow-matching machinery for every backbone.

Flow-time convention (openpi): t = 1 is noise, t = 0 is the clean chunk. x_t = t * eps + (1 - t) * a,
target velocity u = eps - a; sampling integrates x <- x + dt * v(x, t), dt = -1/K, from t = 1 to t = 0.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from qvgm.policy.interface import DenoisePath, Observation
from qvgm.policy.processor import _EPS, NormStats, Processor


def sinusoidal_time_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3,
                              max_period: float = 4.0) -> torch.Tensor:
    """t [B] flow time -> [B, dim] = [sin(2 pi t / p_i), cos(2 pi t / p_i)], periods log-spaced min..max."""
    if dim % 2:
        raise ValueError(f"time embedding dim {dim} must be even")
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    arg = t.to(torch.float64)[:, None] * (2.0 * math.pi / period)[None]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1).to(torch.float32)


def check_noise_scale(scale: float) -> float:
    """A sampling-noise scale (x_1 = scale * eps) as float; ValueError unless finite and >= 0."""
    value = float(scale)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"noise scale must be finite and >= 0, got {scale}")
    return value


def sample_flow_time(batch: int, generator: torch.Generator | None = None, device: Any = None) -> torch.Tensor:
    """Training flow times t ~ Beta(1.5, 1) * 0.999 + 0.001 (t = 1 noise), shape [B]."""
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    # Beta(1.5, 1) has CDF t^1.5 -> inverse-CDF sampling t = u^(2/3); avoids torch.distributions RNG coupling.
    t = u ** (2.0 / 3.0)
    return (t * 0.999 + 0.001).to(torch.float32).to(device)


def batch_time(t: torch.Tensor | float, batch: int, device: Any) -> torch.Tensor:
    """Flow time as float32 [B]: a float, 0-d or [1] tensor is broadcast; [B] passes through."""
    t = torch.as_tensor(t, dtype=torch.float32, device=device)
    if t.ndim == 0 or t.shape == (1,):
        return t.reshape(1).expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"flow time shape {tuple(t.shape)}, expected [{batch}]")
    return t


def delta_anchor_affine(norm_stats: NormStats, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) [dims]: normalised state s -> the same joint value in normalised ACTION units, c = s * scale +
    shift, for the first `dims` state/action dims (the arm joints, both quantile-normalised to [-1, 1]).

    A joint whose commanded range is far narrower than its measured one (e.g. held ~constant) would get an anchor
    amplifying state noise by s_rng / a_rng: such dims get scale = shift = 0 (they stay absolute)."""
    ns, k = norm_stats, dims
    s_rng = np.maximum(np.asarray(ns.state_q99[:k]) - np.asarray(ns.state_q01[:k]), _EPS)
    a_rng = np.maximum(np.asarray(ns.action_q99[:k]) - np.asarray(ns.action_q01[:k]), _EPS)
    # normalised state s -> robot units (s + 1) / 2 * s_rng + s_q01 -> normalised action units
    scale = s_rng / a_rng
    shift = 2.0 * (np.asarray(ns.state_q01[:k]) - np.asarray(ns.action_q01[:k])) / a_rng + scale - 1.0
    keep = (scale > 0.5) & (scale < 2.0)
    return np.where(keep, scale, 0.0), np.where(keep, shift, 0.0)


class FlowPolicyBase(nn.Module):
    """Common FlowPolicy parts: preprocessing, Euler sampling, flow loss, postprocessing.

    Subclasses implement `encode(inputs) -> context` and `velocity(x_t, t, context)`.
    """

    horizon: int
    action_dim: int
    real_action_dim: int
    processor: Processor
    version: str = "untrained"  # set by load_policy from the manifest
    cuda_graphs: bool = False  # act() on CUDA replays captured graphs of the K-step loop (qvgm.policy.cuda_graph)

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return next(self.parameters()).device

    # --- delta actions (opt-in per config: `delta_actions`) -----------------------------------------------------
    # The arm joints (every real action dim but the last, the gripper) are modelled relative to the current joint
    # state c (in normalised action units): the network sees x'_t = x_t - (1 - t) c and its velocity v' is returned
    # as v = v' - c. This is exactly flow matching on a' = a - c (same noise, same t), while the policy keeps the
    # interface's absolute normalised actions in and out (the critic, Q-VGM and every caller see no difference).
    delta_dims: int = 0

    def init_delta_anchor(self, enabled: bool, state_dim: int, norm_stats: NormStats) -> None:
        """Set `delta_dims` and the (non-persistent) anchor buffers from the norm stats; no-op when not enabled."""
        self.delta_dims = min(state_dim, self.real_action_dim - 1) if enabled else 0
        if self.delta_dims:
            scale, shift = delta_anchor_affine(norm_stats, self.delta_dims)
            self.register_buffer("anchor_scale", torch.tensor(scale, dtype=torch.float32), persistent=False)
            self.register_buffer("anchor_shift", torch.tensor(shift, dtype=torch.float32), persistent=False)

    def delta_anchor(self, state: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """state [B, state_dim] normalised -> anchor c [B, 1, action_dim] (zero past the delta dims), or None."""
        if not self.delta_dims:
            return None
        c = state[:, : self.delta_dims].to(dtype) * self.anchor_scale.to(dtype) + self.anchor_shift.to(dtype)
        return nn.functional.pad(c, (0, self.action_dim - self.delta_dims))[:, None, :]

    @staticmethod
    def anchored_input(x_t: torch.Tensor, t: torch.Tensor, anchor: torch.Tensor | None) -> torch.Tensor:
        """x'_t = x_t - (1 - t) c for x_t [B, H, D], t [B] (identity without an anchor)."""
        if anchor is None:
            return x_t
        return x_t - (1.0 - t)[:, None, None].to(x_t.dtype) * anchor.to(x_t.dtype)

    @staticmethod
    def anchored_output(v: torch.Tensor, anchor: torch.Tensor | None) -> torch.Tensor:
        """v = v' - c (identity without an anchor)."""
        return v if anchor is None else v - anchor.to(v.dtype)

    def preprocess(self, observations: list[Observation]) -> dict[str, torch.Tensor]:
        """Observation dicts -> model input tensors on the model's device (see Processor)."""
        dev = self.device
        return {k: v.to(dev) for k, v in self.processor(observations).items()}

    def encode(self, inputs: dict[str, torch.Tensor]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, context: Any) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def batch_size(self, context: Any) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def velocity_uncached(self, inputs: dict[str, torch.Tensor], x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v(x_t, t) recomputing the prefix (reference path); default encodes then calls `velocity`."""
        return self.velocity(x_t, t, self.encode(inputs))

    @torch.no_grad()
    def sample(self, context: Any, num_steps: int = 10, noise: torch.Tensor | None = None,
               return_path: bool = False) -> torch.Tensor | tuple[torch.Tensor, DenoisePath]:
        """Euler-integrate dx/dt = v from t = 1 (noise [B, H, D]) to t = 0 with dt = -1/num_steps.

        Returns the normalised chunk x_0 [B, H, D]; with return_path also DenoisePath(x [K+1, B, H, D], t [K+1]).
        """
        if num_steps < 1:
            raise ValueError("num_steps must be >= 1")
        b = self.batch_size(context)
        dev = self.device
        if noise is None:
            noise = torch.randn(b, self.horizon, self.action_dim, device=dev)
        if noise.shape != (b, self.horizon, self.action_dim):
            raise ValueError(f"noise shape {tuple(noise.shape)} != {(b, self.horizon, self.action_dim)}")
        ts = torch.linspace(1.0, 0.0, num_steps + 1, device=dev)
        dt = -1.0 / num_steps
        x = noise.to(dev, torch.float32)
        xs = [x]
        for k in range(num_steps):
            v = self.velocity(x, ts[k].expand(b), context)
            x = x + dt * v
            xs.append(x)
        if return_path:
            return x, DenoisePath(x=torch.stack(xs), t=ts)
        return x

    @property
    def loss_dims(self) -> int:
        """The leading action dims the flow loss covers: the real ones unless the backbone also denoises padding."""
        return self.real_action_dim

    def flow_loss(self, inputs: dict[str, torch.Tensor], actions: torch.Tensor, noise: torch.Tensor | None = None,
                  time: torch.Tensor | None = None, action_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Flow-matching MSE on the first `loss_dims` action dims (the real ones, or all for a pi05 that denoises its
        padding, Pi05Config.zero_padded_actions False).

        actions [B, H, D] normalised; x_t = t * eps + (1 - t) * actions, target eps - actions, with
        t ~ Beta(1.5, 1) * 0.999 + 0.001 (t = 1 noise) unless `time` [B] is given. `action_mask` [B, H] bool
        marks valid steps (e.g. past an episode's end they are padding).
        """
        b = actions.shape[0]
        dev = actions.device
        eps = torch.randn_like(actions) if noise is None else noise
        t = sample_flow_time(b, device=dev) if time is None else time.to(dev, torch.float32)
        tt = t[:, None, None]
        x_t = tt * eps + (1.0 - tt) * actions
        u = eps - actions
        v = self.velocity_uncached(inputs, x_t, t)
        err = (v - u)[..., : self.loss_dims] ** 2
        if action_mask is None:
            return err.mean()
        m = action_mask.to(err.dtype)[..., None].expand_as(err)
        return (err * m).sum() / m.sum().clamp_min(1.0)

    def postprocess(self, actions: torch.Tensor) -> np.ndarray:
        """Normalised [B, H, D] -> robot units float64 [B, H, real_action_dim]."""
        return self.processor.unnormalize_actions(actions)

    def initial_noise(self, batch: int, noise: torch.Tensor | None = None, scale: float = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """The flow's start x_1 [B, H, D] (float32, on the policy's device): `scale` * (`noise`, or N(0, I) drawn
        from `generator` / the global torch RNG). scale 1 samples the trained distribution; scale 0 is
        deterministic (the Euler flow from x_1 = 0); in between narrows the samples. scale must be finite, >= 0."""
        scale = check_noise_scale(scale)
        shape = (batch, self.horizon, self.action_dim)
        if noise is None:
            noise = torch.randn(*shape, generator=generator) if generator is not None else \
                torch.randn(*shape, device=self.device)
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != {shape}")
        noise = noise.to(self.device, torch.float32)
        return noise if scale == 1.0 else noise * scale

    @torch.no_grad()
    def act(self, observations: list[Observation], num_steps: int = 10,
            noise: torch.Tensor | None = None, noise_scale: float = 1.0) -> np.ndarray:
        """Observation batch -> chunks in robot units float64 [B, H, real_action_dim] (encode once + K steps).

        The flow starts at x_1 = noise_scale * noise (drawn from the global torch RNG when None; see
        `initial_noise`). With `self.cuda_graphs` True on a CUDA device the K steps replay a captured CUDA graph
        (qvgm.policy.cuda_graph; one capture per batch size / K / context shapes, kept for reuse)."""
        ctx = self.encode(self.preprocess(observations))
        noise = self.initial_noise(self.batch_size(ctx), noise, noise_scale)
        if self.cuda_graphs and self.device.type == "cuda":
            return self.postprocess(self._graphed_sample(ctx, num_steps, noise))
        return self.postprocess(self.sample(ctx, num_steps=num_steps, noise=noise))

    def _graphed_sample(self, ctx: Any, num_steps: int, noise: torch.Tensor | None) -> torch.Tensor:
        from qvgm.policy.cuda_graph import CAPTURED, GraphedSampler, context_key

        graphs = CAPTURED.setdefault(self, {})  # outside the module: deepcopy/state_dict never see the graphs
        params = list(self.parameters())  # weights moved or recast since the capture -> a new capture
        ctx_key = context_key(ctx, num_steps)
        key = (ctx_key, len(params), params[0].data_ptr(), params[-1].data_ptr(), params[0].dtype)
        if key not in graphs:
            if len(graphs) >= 4:  # a few signatures at most (batch sizes); drop the oldest capture
                graphs.pop(next(iter(graphs)))
            graphs[key] = GraphedSampler(self, ctx, num_steps)
        b = self.batch_size(ctx)
        if noise is None:
            noise = torch.randn(b, self.horizon, self.action_dim, device=self.device)
        if noise.shape != (b, self.horizon, self.action_dim):
            raise ValueError(f"noise shape {tuple(noise.shape)} != {(b, self.horizon, self.action_dim)}")
        return graphs[key](ctx, noise.to(self.device, torch.float32), key=ctx_key)
