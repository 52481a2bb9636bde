"""Real-time-chunking-style conditioning on a committed prefix: inpainting inside the Euler sampler.

Flow-time convention (openpi, see interface.py): t = 1 is noise, t = 0 the clean chunk,
x_t = t * eps + (1 - t) * a, Euler x <- x + dt * v(x, t) with dt = -1/K from t = 1 to t = 0.

At every step the one-step clean estimate A_hat = x_t - t * v and the implied noise eps_hat = x_t + (1 - t) * v
are pulled toward the committed actions and the sampling noise, with per-step weights W [H] in [0, 1]:
    A'   = A_hat   + W * (prefix - A_hat)
    eps' = eps_hat + W * (eps - eps_hat)
    x_{t+dt} = (t + dt) * eps' + (1 - t - dt) * A'
which is the plain Euler state lerped toward the consistently re-noised prefix (t + dt) * eps + (1 - t - dt) * prefix.
With W = 0 this is exactly policy.sample; with W = 1 (hard) the prefix rows follow the straight noise -> prefix
path and land on the prefix at t = 0, so the velocity field generates the rest of the chunk against it.
The model is not touched: only `policy.velocity(x_t, t, context)` is called. Guidance by the Jacobian of A_hat
(the full RTC / Pi-GDM correction) is not done: this is plain inpainting.
"""

from __future__ import annotations

import math
from typing import Any

import torch

WEIGHT_MODES = ("hard", "exp")


def prefix_weights(horizon: int, prefix_len: int, soft_len: int = 0, mode: str = "hard") -> torch.Tensor:
    """Per-step inpainting weights float32 [horizon], non-increasing in the step index.

    hard: 1 on the first `prefix_len` steps, 0 after. exp (RTC's soft mask): 1 on the first `prefix_len` steps,
    then over the next `soft_len` steps w_i = c * (e^c - 1) / (e - 1) with c = (prefix_len + soft_len - i) /
    (soft_len + 1) decaying from < 1 toward 0, then 0. Steps past `horizon` are cut off.
    """
    if mode not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {WEIGHT_MODES}, got {mode!r}")
    if horizon < 1 or prefix_len < 0 or soft_len < 0:
        raise ValueError(f"bad sizes: horizon {horizon}, prefix_len {prefix_len}, soft_len {soft_len}")
    w = torch.zeros(horizon, dtype=torch.float32)
    w[: min(prefix_len, horizon)] = 1.0
    if mode == "exp":
        for i in range(prefix_len, min(prefix_len + soft_len, horizon)):
            c = (prefix_len + soft_len - i) / (soft_len + 1)
            w[i] = c * (math.exp(c) - 1.0) / (math.e - 1.0)
    return w


@torch.no_grad()
def sample_with_prefix(policy: Any, context: Any, prefix: torch.Tensor, prefix_len: int, num_steps: int = 10,
                       noise: torch.Tensor | None = None, weights: str = "hard") -> torch.Tensor:
    """Euler-sample a chunk [B, H, D] (normalised) whose first steps follow the committed `prefix`.

    policy: a FlowPolicy (uses horizon, action_dim, device, batch_size(context), velocity(x_t, t, context)).
    prefix: [B, P, D] (or [P, D], broadcast over B) committed actions in the policy's NORMALISED, padded action
        space, step k meant for the same time as step k of the new chunk; P <= H.
    prefix_len: d <= P steps held hard (weight 1). weights="hard" ignores prefix[:, d:]; "exp" pulls the
        remaining P - d steps with RTC's exponentially decaying soft mask (see prefix_weights).
    noise: [B, H, D] sampling noise (t = 1); drawn when None. prefix_len 0 with "hard" (or P = 0) gives a result
        bit-identical to policy.sample(context, num_steps, noise).
    """
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    h, d_model = int(policy.horizon), int(policy.action_dim)
    b = int(policy.batch_size(context))
    dev = policy.device
    prefix = torch.as_tensor(prefix, dtype=torch.float32, device=dev)
    if prefix.ndim == 2:
        prefix = prefix.unsqueeze(0).expand(b, -1, -1)
    if prefix.ndim != 3 or prefix.shape[0] != b or prefix.shape[2] != d_model or prefix.shape[1] > h:
        raise ValueError(f"prefix shape {tuple(prefix.shape)}, expected [{b}, P <= {h}, {d_model}]")
    p = int(prefix.shape[1])
    if not 0 <= prefix_len <= p:
        raise ValueError(f"prefix_len {prefix_len} outside [0, {p}] (the prefix has {p} steps)")
    if not torch.isfinite(prefix).all():
        raise ValueError("prefix contains NaN/inf")
    if noise is None:
        noise = torch.randn(b, h, d_model, device=dev)
    if noise.shape != (b, h, d_model):
        raise ValueError(f"noise shape {tuple(noise.shape)} != {(b, h, d_model)}")
    w = prefix_weights(h, prefix_len, p - prefix_len, weights).to(dev)
    n = int((w > 0).sum())  # weights are non-increasing: only the first n steps are pulled
    eps = noise.to(dev, torch.float32)
    target = prefix[:, :n]
    wn = w[:n].view(1, n, 1)
    ts = torch.linspace(1.0, 0.0, num_steps + 1, device=dev)
    dt = -1.0 / num_steps
    x = eps
    for k in range(num_steps):
        v = policy.velocity(x, ts[k].expand(b), context)
        x = x + dt * v
        if n:
            t_next = ts[k + 1]
            renoised = t_next * eps[:, :n] + (1.0 - t_next) * target
            x = torch.cat([torch.lerp(x[:, :n], renoised, wn), x[:, n:]], dim=1)  # lerp: weight 1 -> exact end
    return x
