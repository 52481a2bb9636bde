"""Same-backbone, same-critic baselines of METHOD.md §5, on the FlowPolicy protocol.

Flow-time convention (openpi): t = 1 noise, t = 0 clean chunk, x_t = t * eps + (1 - t) * a, Euler with
dt = -1/K from t = 1. Chunks are normalised [B, H, D]; the critic sees critic_action(chunk, n_exec, real)
through q_fn: [B, n_exec * real] -> aggregated Q [B] (see critic_trainer.qvgm.bind_critic).

- best_of_n:          test time, sample N chunks from the policy, keep the highest-Q one per observation.
- q_guided_sample:    test time, add a Q-gradient to every sampling step; weights unchanged.
- q_distill_loss:     training, flow-match the policy onto critic-improved terminal chunks: Q-VGM's own keep-best
                      ascent (projection to the action box, clipping, trust region max_shift around the reference's
                      sample).
- diffusion_ql_loss:  training, BC flow loss + eta * (-Q(s, sample(s))) / mean|Q| with backprop through all K steps,
                      the sample clamped to the action box before the critic (Wang et al. 2023).
"""

from __future__ import annotations

from typing import Any

import torch

from critic_trainer.critic import critic_action
from critic_trainer.qvgm import Box, QFunction, QVGMConfig, q_ascent
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


def distill_targets(actor: FlowPolicy, inputs: dict[str, torch.Tensor], q_fn: QFunction, cfg: QVGMConfig,
                    reference: FlowPolicy | None = None, noise: torch.Tensor | None = None,
                    box: Box | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Critic-improved terminal chunks for Q-distillation -> (target [B, H, D], Q gain [B] >= 0, centre [B, n*r]).

    1. A_0 = the current actor's own sample (no grad) from noise [B, H, D] (t = 1; drawn if None).
    2. Its critic coordinates (first n_exec steps x real dims) are improved by Q-VGM's own keep-best ascent
       (critic_trainer.qvgm.q_ascent, unchanged: cfg.ascent_steps J, ascent_lr, gradient clipping, every step
       projected to `box` (lo, hi) per critic coordinate, None = [-1, 1]; keep-best, trust region cfg.max_shift).
       With a frozen `reference` the trust region is centred on the reference policy's sample from the SAME noise,
       so repeated distillation cannot compound: the target stays within max_shift (RMS over the critic
       coordinates, normalised units) of the reference's output however far the actor has moved, and the target's
       other coordinates are the reference's sample.
       Without a reference everything is centred on the actor's own sample (a per-update bound only).
       As in Q-VGM the start itself is not clamped: buffer actions lie outside [-1, 1] on 10-40 % of the
       coordinates on pick_place (quantile stats of the demos; hence the pipeline's data-derived box), and
       keep-best keeps such a start when every projected step lowers Q. `centre` is the region's centre (critic
       coordinates, flattened).
    """
    n, r = cfg.n_exec, actor.real_action_dim
    with torch.no_grad():
        chunk, path = actor.sample(actor.encode(inputs), num_steps=cfg.num_steps, noise=noise, return_path=True)
        base = chunk if reference is None else reference.sample(reference.encode(inputs), num_steps=cfg.num_steps,
                                                                 noise=path.x[0])  # the same starting noise
    start = critic_action(chunk, n, r)
    centre = critic_action(base, n, r)
    a_q, gain = q_ascent(q_fn, start, cfg, origin=centre if reference is not None else None, box=box)
    target = base.detach().clone()
    target[:, :n, :r] = a_q.reshape(-1, n, r)
    return target, gain, centre


def q_distill_loss(actor: FlowPolicy, inputs: dict[str, torch.Tensor], q_fn: QFunction, cfg: QVGMConfig,
                   reference: FlowPolicy | None = None, bc_actions: torch.Tensor | None = None,
                   bc_mask: torch.Tensor | None = None, bc_weight: float = 0.0, noise: torch.Tensor | None = None,
                   box: Box | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Q-distillation: flow-matching loss onto critic-improved terminal chunks (terminal labels only), + BC.

    loss = flow_loss(actor; distill_targets(...)) + bc_weight * flow_loss(actor; buffer chunks bc_actions
    [B, H, D], valid steps bc_mask [B, H] bool or None). See distill_targets for the targets (Q-VGM's ascent with
    projection onto `box`, clipping, keep-best and trust region). Returns (loss, info with ascent_gain = mean Q gain
    of the targets over their starts, target_shift = mean RMS distance of the targets' critic coordinates from the
    trust region's centre).
    """
    target, gain, centre = distill_targets(actor, inputs, q_fn, cfg, reference=reference, noise=noise, box=box)
    n, r = cfg.n_exec, actor.real_action_dim
    loss = actor.flow_loss(inputs, target)
    shift = (target[:, :n, :r].flatten(1) - centre).pow(2).mean(-1).sqrt().mean()
    info = {"distill_loss": loss.item(), "ascent_gain": gain.mean().item(), "target_shift": shift.item()}
    if bc_weight > 0:
        if bc_actions is None:
            raise ValueError("bc_weight > 0 needs bc_actions")
        bc = _bc_loss(actor, inputs, bc_actions, bc_mask)
        loss = loss + bc_weight * bc
        info["bc_loss"] = bc.item()
    info["loss"] = loss.item()
    return loss, info


def diffusion_ql_loss(actor: FlowPolicy, inputs: dict[str, torch.Tensor], q_fn: QFunction, n_exec: int,
                      num_steps: int = 10, eta: float = 1.0, bc_actions: torch.Tensor | None = None,
                      bc_mask: torch.Tensor | None = None, project: bool = True, box_weight: float = 10.0,
                      box: tuple[torch.Tensor, torch.Tensor] | None = None, noise: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, dict[str, float]]:
    """Diffusion-QL (Wang et al. 2023): BC flow loss + eta * (-Q(s, a_pi)) / mean|Q|, backprop through all K steps.

    a_pi is the actor's own K-step Euler sample (openpi: noise [B, H, D] at t = 1 -> t = 0; `actor.sample` must
    keep the graph, see pipeline.DifferentiableSampler), its critic coordinates projected (clamped) to the action
    box when `project`: the paper clips its samples to the action range, and a critic queried outside the data's
    box extrapolates without bound (the unprojected version drove Q to 1e10 on pick_place). box = (lo, hi), each
    broadcastable to [B, n_exec * real] (normalised units; default [-1, 1]; the pipeline passes the buffer's own
    per-dimension range, since 10-40 % of pick_place's buffer actions lie outside [-1, 1]). The clamp hides an
    overshoot from the critic but does not undo it (its gradient is 0 outside), and the paper's sampler cannot
    overshoot at all; so with `project` the part of the sample outside the box is also pulled back:
    + box_weight * mean_b sum_j dist(a_j, [lo_j, hi_j])^2 (0 inside the box: there the loss is exactly the paper's).
    mean|Q| is the batch's, detached: the paper's normalisation that makes eta (the paper's alpha) independent of
    the reward scale. bc_actions [B, H, D] normalised buffer chunks for the BC flow-matching term with valid steps
    bc_mask [B, H] (skipped if bc_actions is None). Gradient clipping is the caller's (the optimiser step).
    """
    context = actor.encode(inputs)
    chunk = actor.sample(context, num_steps=num_steps, noise=noise)  # gradient flows through the whole chain
    a = critic_action(chunk, n_exec, actor.real_action_dim)
    lo, hi = (-torch.ones_like(a), torch.ones_like(a)) if box is None else (box[0].to(a), box[1].to(a))
    outside = (lo - a).clamp_min(0.0) + (a - hi).clamp_min(0.0)  # [B, n_exec * real], distance to the box
    if project:
        a = torch.minimum(torch.maximum(a, lo), hi)
    q = q_fn(a)
    q_loss = -q.mean() / q.detach().abs().mean().clamp_min(1e-6)
    loss = eta * q_loss
    info = {"q": q.mean().item(), "q_loss": q_loss.item(), "outside_box": (outside > 0).float().mean().item()}
    if project and box_weight > 0:
        box = outside.pow(2).sum(-1).mean()
        loss = loss + box_weight * box
        info["box_loss"] = box.item()
    if bc_actions is not None:
        bc = _bc_loss(actor, inputs, bc_actions, bc_mask)
        loss = loss + bc
        info["bc_loss"] = bc.item()
    info["loss"] = loss.item()
    return loss, info


def _bc_loss(actor: FlowPolicy, inputs: dict[str, torch.Tensor], actions: torch.Tensor,
             mask: torch.Tensor | None) -> torch.Tensor:
    """Flow-matching loss on buffer chunks [B, H, D]; mask [B, H] bool of valid steps (policies that take one)."""
    if mask is None:
        return actor.flow_loss(inputs, actions)
    return actor.flow_loss(inputs, actions, action_mask=mask)  # type: ignore[call-arg]

