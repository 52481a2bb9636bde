"""Same-backbone, same-critic baselines of METHOD.md §5, on the FlowPolicy protocol.

Flow-time convention (openpi): t = 1 noise, t = 0 clean chunk, x_t = t * eps + (1 - t) * a, Euler with
dt = -1/K from t = 1. Chunks are normalised [B, H, D]; the critic sees critic_action(chunk, n_exec, real)
through q_fn: [B, n_exec * real] -> aggregated Q [B] (see critic_trainer.qvgm.bind_critic).

- best_of_n:          test time, sample N chunks from the policy, keep the highest-Q one per observation.
- q_guided_sample:    test time, add a Q-gradient to every sampling step; weights unchanged.
- q_distill_loss:     training, flow-match the policy onto critic-improved terminal chunks.
- diffusion_ql_loss:  training, maximise Q(s, sample(s)) by backprop through all K steps, plus a BC flow loss.
"""

from __future__ import annotations

from typing import Any

import torch

from critic_trainer.critic import critic_action
from critic_trainer.qvgm import QFunction, QVGMConfig, q_ascent
from qvgm.policy.interface import FlowPolicy


@torch.no_grad()
def best_of_n(policy: FlowPolicy, context: Any, q_fn: QFunction, n: int, n_exec: int,
              num_steps: int = 10, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample n chunks per observation and keep the one with the highest Q.

    noise: optional [n, B, H, D] starting noises (t = 1). Returns (chunks [B, H, D], their Q [B]).
    """
    if n < 1:
        raise ValueError(f"best_of_n needs n >= 1, got {n}")
    best, best_q = None, None
    for i in range(n):
        eps = noise[i] if noise is not None else None
        chunk = policy.sample(context, num_steps=num_steps, noise=eps)
        q = q_fn(critic_action(chunk, n_exec, policy.real_action_dim))
        if best is None:
            best, best_q = chunk, q
        else:
            better = q > best_q
            best = torch.where(better[:, None, None], chunk, best)
            best_q = torch.where(better, q, best_q)
    assert best is not None and best_q is not None
    return best, best_q


def q_guided_sample(policy: FlowPolicy, context: Any, q_fn: QFunction, scale: float, n_exec: int,
                    noise: torch.Tensor, num_steps: int = 10, grad_clip: float | None = 1.0) -> torch.Tensor:
    """Euler sampling with test-time Q guidance; returns chunks [B, H, D].

    At each step the one-step clean estimate A_hat = x_t - t v(x_t, t) is scored by the critic and the velocity
    on the critic's coordinates becomes v - scale * grad_A Q(A_hat) (grad clipped elementwise), which moves
    A_hat by + t * scale * grad (openpi convention: dt < 0, so lowering v raises x). The gradient is taken at
    A_hat, not back through v (cheap; no policy Jacobian). scale = 0 is plain sampling.
    noise [B, H, D] at t = 1.
    """
    r = policy.real_action_dim
    b = noise.shape[0]
    times = torch.linspace(1.0, 0.0, num_steps + 1, dtype=noise.dtype, device=noise.device)
    dt = -1.0 / num_steps
    x = noise
    for k in range(num_steps):
        t = times[k]
        with torch.no_grad():
            v = policy.velocity(x, t.expand(b), context)
        if scale != 0.0:
            a_hat = critic_action(x - t * v, n_exec, r).detach().requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(q_fn(a_hat).sum(), a_hat)
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
            if grad_clip is not None:
                grad = grad.clamp(-grad_clip, grad_clip)
            v = v.clone()
            v[:, :n_exec, :r] -= scale * grad.reshape(b, n_exec, r)
        x = x + dt * v
    return x.detach()


def q_distill_loss(actor: FlowPolicy, inputs: dict[str, torch.Tensor], q_fn: QFunction, cfg: QVGMConfig,
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """Q-distillation: flow-matching loss onto critic-improved terminal chunks (terminal labels only).

    Samples A_0 from the current actor (no grad), improves its critic coordinates by the same keep-best ascent
    as Q-VGM (cfg.ascent_steps, ascent_lr, clip, projection), and regresses the actor on the improved chunk.
    """
    with torch.no_grad():
        chunk = actor.sample(actor.encode(inputs), num_steps=cfg.num_steps)
    n, r = cfg.n_exec, actor.real_action_dim
    a_q, gain = q_ascent(q_fn, critic_action(chunk, n, r), cfg)
    target = chunk.clone()
    target[:, :n, :r] = a_q.reshape(-1, n, r)
    loss = actor.flow_loss(inputs, target)
    return loss, {"loss": loss.item(), "ascent_gain": gain.mean().item()}


def diffusion_ql_loss(actor: FlowPolicy, inputs: dict[str, torch.Tensor], q_fn: QFunction, n_exec: int,
                      num_steps: int = 10, eta: float = 1.0, bc_actions: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, dict[str, float]]:
    """Diffusion-QL style: -eta * Q(s, sample(s)) / mean|Q| with backprop through all K Euler steps (+ BC).

    bc_actions [B, H, D] normalised buffer chunks for the flow-matching BC term (skipped if None).
    """
    context = actor.encode(inputs)
    chunk = actor.sample(context, num_steps=num_steps)  # gradient flows through the whole chain
    q = q_fn(critic_action(chunk, n_exec, actor.real_action_dim))
    loss = -eta * q.mean() / q.detach().abs().mean().clamp_min(1e-6)
    info = {"q": q.mean().item()}
    if bc_actions is not None:
        bc = actor.flow_loss(inputs, bc_actions)
        loss = loss + bc
        info["bc_loss"] = bc.item()
    info["loss"] = loss.item()
    return loss, info
