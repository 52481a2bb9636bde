"""Q-VGM actor update (METHOD.md §4): Q-guided value-gradient matching, no backprop through the chain.

Flow-time convention (openpi, as everywhere in qvgm): t = 1 is noise, t = 0 the clean chunk,
x_t = t * eps + (1 - t) * a, sampling x <- x + dt * v with dt = -1/K from t = 1. The K velocity
evaluations happen at t_k = 1 - k/K, k = 0..K-1 (t_0 = 1 is pure noise, t_{K-1} = 1/K the last, least noisy).

One update, for a batch of observations (context) and a critic bound to their states (q_fn):
  1. roll out the current actor v_theta from noise WITHOUT gradient, keeping every (x_k, t_k);
  2. reference one-step clean estimate A_base = x_k - t_k * v_base(x_k, t_k)   (v_base frozen SFT velocity);
  3. J keep-best gradient-ascent steps on Qbar:  A <- proj_box(A + alpha * clip(grad_A Qbar(s, A)));
     box = (lo, hi) per critic coordinate (normalised units; default [-1, 1], the pipeline passes the buffer's
     per-dim action range: quantile stats of few demos leave 10-40 % of real actions outside [-1, 1]);
  4. residual velocity target  h = -(A_Q - A_base) / t_k
     (so that the actor's one-step estimate x_k - t_k (v_base + h) equals A_Q; in the paper's
     tau = 1 - t convention this reads h = (A_Q - A_base) / (1 - tau_k));
  5. loss = sum_k m_k || (v_theta - v_base)(x_k, t_k) - sg[h] ||^2 on the critic's coordinates
          + anchor_weight * ( sum_k (1 - m_k) || v_theta - v_base ||^2 on the critic's coordinates
                              + sum_k || v_theta - v_base ||^2 on every other coordinate )
          + bc_weight * flow-matching loss on buffer actions (optional).
Each term k of the loss holds exactly one actor velocity evaluation in its autograd graph.

Opt-in `steps_per_sample` S (QVGMConfig): an unbiased estimate of the same loss from S randomly drawn steps
per sample in the gated set and S in the anchor-only set instead of all K, so the graph-holding actor
velocities and the frozen reference's velocities drop from K to min(S, |gated|) + min(S, K - |gated|) per
update (the rollout stays K no-grad steps). See `sampled_steps`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from critic_trainer.critic import Aggregate, QEnsemble, aggregate
from critic_trainer.distributed import average_gradients, finite_on_all_ranks
from qvgm.policy.interface import FlowPolicy

# Critic bound to a batch of states: critic actions [B, A] -> aggregated Q [B], and [B, S, A] -> [B, S]
# (S candidate actions per state; A = n_exec * real_action_dim). Must be differentiable in the actions.
QFunction = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class QVGMConfig:
    """Switches of the Q-VGM actor update (defaults are METHOD.md's)."""

    n_exec: int = 5  # critic coordinates: first n_exec steps x real action dims
    num_steps: int = 10  # K denoising steps
    ascent_steps: int = 4  # J
    ascent_lr: float = 0.05  # alpha, normalised action units per step (after clipping)
    clip_grad: bool = True  # safeguard: clamp grad_A Q elementwise to [-grad_clip, grad_clip]
    grad_clip: float = 1.0
    project: bool = True  # safeguard: project ascent iterates onto the action box (q_ascent's box; default [-1, 1])
    keep_best: bool = True  # safeguard: keep the best iterate by Q (A_base if no step helps)
    max_shift: float | None = None  # safeguard (trust region): RMS per-coordinate bound on A_Q - origin, normalised
    # origin of the trust region: "base" = A_base at the actor's own x_k (per step); "reference" = the frozen
    # reference policy's final sample from the SAME noise. With a late-step gate of M steps, per-step targets
    # compound along the chain (each gated step starts from the already-shifted x_k), so the actor's output can
    # drift up to ~M times max_shift from the reference; "reference" bounds the drift of the output itself.
    trust_origin: Literal["base", "reference"] = "base"
    gate: Literal["last_m", "smooth"] = "last_m"
    gate_last_m: int = 5  # last M of K steps (t_k <= M/K) get m_k = 1
    gate_power: float = 2.0  # smooth gate m_k = (1 - t_k)^p = tau_k^p: late, low-noise steps weigh most
    anchor_weight: float = 1.0
    bc_weight: float = 0.0
    h_sign: float = 1.0  # diagnostic only: -1 reproduces the sign bug of METHOD.md (tests prove they catch it)
    # None: every step k = 0..K-1 (exact). S >= 1: per sample, S steps drawn from the gated set and S from the
    # anchor-only set (each capped at its size), reweighted: an unbiased estimate of the same loss (sampled_steps)
    steps_per_sample: int | None = None


def gate_weights(t: torch.Tensor, cfg: QVGMConfig) -> torch.Tensor:
    """Gate m_k for flow times t [K] (openpi: 1 = noise) -> [K] in [0, 1], large on late low-noise steps."""
    k = t.shape[0]
    if cfg.gate == "last_m":
        m = torch.zeros_like(t)
        m[max(k - cfg.gate_last_m, 0):] = 1.0
        return m
    if cfg.gate == "smooth":
        return (1.0 - t).clamp(0.0, 1.0) ** cfg.gate_power
    raise ValueError(f"unknown gate {cfg.gate!r} (last_m / smooth)")


def bind_critic(critic: QEnsemble, z: torch.Tensor, p: torch.Tensor | None, how: Aggregate = "mean",
                lcb_beta: float = 1.0) -> QFunction:
    """Fix the state (features z [B, F], proprio p [B, P]) of a Q ensemble -> QFunction ([B, (S,) A] -> [B, (S)])."""
    with torch.no_grad():
        s = critic.encode_state(z, p)

    def q_fn(actions: torch.Tensor) -> torch.Tensor:
        return aggregate(critic.q_from_state(s, actions), how, lcb_beta)

    return q_fn


def _autocast_off(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run `fn(q_fn, a, ...)` with autocast disabled on a's device: ascent targets stay in the inputs' precision
    (float32) inside a bf16 AMP region, where the critic would otherwise return bfloat16 Q and gradients."""

    @functools.wraps(fn)
    def wrapped(q_fn: QFunction, a: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(a.device.type, enabled=False):
            return fn(q_fn, a, *args, **kwargs)

    return wrapped


Box = tuple[torch.Tensor, torch.Tensor]  # (lo, hi) per critic coordinate, each broadcastable to [..., A], normalised


def unit_box(a: torch.Tensor) -> Box:
    """The nominal box [-1, 1] for every coordinate of a [..., A] (normalised units)."""
    return -torch.ones_like(a), torch.ones_like(a)


def check_box(box: Box) -> None:
    """Refuse a box with non-finite bounds or lo > hi anywhere (ValueError)."""
    lo, hi = box
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError("the action box has non-finite bounds")
    if (lo > hi).any():
        raise ValueError("the action box has lo > hi on some coordinate")


@_autocast_off
def q_ascent(q_fn: QFunction, a_base: torch.Tensor, cfg: QVGMConfig, origin: torch.Tensor | None = None,
             box: Box | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """J ascent steps on Q from a_base [B, (S,) A] -> (A_Q like a_base, detached; Q gain [B, (S)] >= 0 if keep-best).

    A <- proj_box(A + alpha * clip(grad_A Q(A))) with box = (lo, hi) (each broadcastable to a_base, normalised;
    None = [-1, 1]; only with cfg.project). The start a_base itself is never projected: a coordinate outside the
    box stays where it is unless a step is taken and kept. One critic forward per iterate serves both the keep-best
    bookkeeping and the next gradient (J + 1 forwards, J backwards). With cfg.max_shift every iterate is then
    pulled back toward a_base onto the trust region sqrt(mean_j (A_j - A_base_j)^2) <= max_shift (normalised
    units, mean over the critic coordinates): the ascent stays near the reference policy's support. `origin`
    (broadcastable to a_base) replaces a_base as the centre of that region; the start is then projected into it
    too, so even "no step helps" returns a point inside the region.
    """
    a = a_base.detach()
    lo, hi = unit_box(a) if box is None else (box[0].to(a), box[1].to(a))
    if cfg.project:
        check_box((lo, hi))
    if origin is None:
        origin = a
    elif cfg.max_shift is not None:
        a = trust_region(a, origin.detach(), cfg.max_shift)
    best_a, best_q, q_base = a, None, None
    for j in range(cfg.ascent_steps + 1):
        last = j == cfg.ascent_steps
        with torch.set_grad_enabled(not last):
            a_var = a if last else a.detach().requires_grad_(True)
            q = q_fn(a_var)
        if j == 0:
            if not torch.isfinite(q).all():
                raise FloatingPointError("the critic returned a non-finite Q; refusing to build a Q-VGM target")
            q_base = best_q = q.detach()
        elif cfg.keep_best:
            better = q.detach() > best_q
            best_a = torch.where(better[..., None], a, best_a)
            best_q = torch.where(better, q.detach(), best_q)
        else:
            best_a, best_q = a, q.detach()
        if last:
            break
        (grad,) = torch.autograd.grad(q.sum(), a_var)
        grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)  # a broken gradient makes no step
        if cfg.clip_grad:
            grad = grad.clamp(-cfg.grad_clip, cfg.grad_clip)
        a = a + cfg.ascent_lr * grad
        if cfg.project:
            a = torch.minimum(torch.maximum(a, lo), hi)
        if cfg.max_shift is not None:
            a = trust_region(a, origin, cfg.max_shift)
    assert best_q is not None and q_base is not None
    return best_a.detach(), best_q - q_base


def trust_region(a: torch.Tensor, origin: torch.Tensor, max_shift: float) -> torch.Tensor:
    """Scale a - origin ([..., A]) down so that its RMS over the last dim is <= max_shift (normalised units).

    A convex combination of a and origin: if both lie in a box (any per-coordinate [lo, hi], e.g. the projection
    box of q_ascent) the result does too. An origin outside the box (a reference sample beyond the buffer's
    range) gives no such guarantee: the result lies between a and origin, coordinate by coordinate.
    """
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    d = a - origin
    rms = d.pow(2).mean(-1, keepdim=True).sqrt()
    scale = (max_shift / rms.clamp_min(1e-12)).clamp(max=1.0)
    return origin + d * scale


def sampled_steps(gate: torch.Tensor, b: int, steps_per_sample: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Draw the flow steps each sample's loss is evaluated at -> (steps [B, J] long, weights [J], J_gated).

    gate [K] (gate_weights, t_k = 1 - k/K): the gated set G = {k: m_k > 0}, the anchor-only set U = {k: m_k = 0}.
    Per sample b, independently: s_G = min(S, |G|) distinct steps uniformly from G (columns 0..s_G-1) and
    s_U = min(S, |U|) from U (the rest), with weights |G|/s_G and |U|/s_U. Why unbiased: the full loss of a
    sample is sum_k l_k; each k in G is drawn with probability s_G/|G| (likewise for U), so
    E[|G|/s_G sum_{drawn k in G} l_k + |U|/s_U sum_{drawn k in U} l_k] = sum_k l_k, and since the gradient is
    linear the same holds for it. Every l_k depends only on (x_k, t_k) of the no-grad rollout, which is drawn
    before the steps, and its own ascent target, so evaluating fewer steps changes no term. With S >= |G| and
    S >= |U| every step is drawn once with weight 1 (the exact loss, in another order).
    """
    if steps_per_sample < 1:
        raise ValueError(f"steps_per_sample must be >= 1, got {steps_per_sample}")
    cols, weights = [], []
    for members in (torch.nonzero(gate > 0).flatten(), torch.nonzero(gate <= 0).flatten()):
        n = members.numel()
        if n == 0:
            continue
        s = min(steps_per_sample, n)
        pick = torch.rand(b, n, generator=generator).argsort(dim=-1)[:, :s]  # s distinct per row, uniform
        cols.append(members.to(pick.device)[pick])
        weights += [n / s] * s
    n_gated = cols[0].shape[1] if bool((gate > 0).any()) else 0
    return torch.cat(cols, dim=1), torch.tensor(weights, dtype=gate.dtype), n_gated


def residual_target(a_q: torch.Tensor, a_base: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """h = -(A_Q - A_base) / t (openpi: t = noise level > 0), so x_t - t * (v_base + h) = A_Q.

    a_q, a_base [B, A] clean-action estimates; t scalar or broadcastable flow time. In the paper's tau = 1 - t
    convention the same quantity is (A_Q - A_base) / (1 - tau).
    """
    return -(a_q - a_base) / t


def qvgm_loss(actor: FlowPolicy, reference: FlowPolicy, actor_context: Any, reference_context: Any,
              q_fn: QFunction, cfg: QVGMConfig, noise: torch.Tensor | None = None,
              bc_inputs: dict[str, torch.Tensor] | None = None, bc_actions: torch.Tensor | None = None,
              backward_each_step: bool = False, box: Box | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Q-VGM loss for one batch. Returns (loss, info); info["step_losses"] holds the K per-step terms.

    box: (lo, hi) [n_exec * real] each, the projection box of the ascent (see q_ascent; None = [-1, 1]). Only the
    critic's coordinates (first n_exec steps x real dims) are ever moved by the ascent; the rest is anchored.

    backward_each_step: call backward on every term as soon as it is built (gradients accumulate into .grad,
    only one velocity graph is alive at a time: K times less activation memory); the returned loss is then
    detached and info["step_losses"] is empty. The shared actor context graph is retained across the calls.

    actor/reference: FlowPolicy (reference frozen; its context computed without grad by the caller or here).
    q_fn: QFunction at this batch's states (see bind_critic); called on [B, M, n_exec * real] (M gated steps).
    noise: optional [B, H, D] starting noise (t = 1). bc_inputs/bc_actions: optional buffer batch for the BC term.
    """
    n, r = cfg.n_exec, actor.real_action_dim
    if cfg.trust_origin not in ("base", "reference"):
        raise ValueError(f"unknown trust_origin {cfg.trust_origin!r} (base / reference)")
    # 1. roll out the current actor without gradient, keeping every (x_k, t_k)
    with torch.no_grad():
        _, path = actor.sample(actor_context, num_steps=cfg.num_steps, noise=noise, return_path=True)
    origin = None
    if cfg.max_shift is not None and cfg.trust_origin == "reference":
        with torch.no_grad():  # the reference's own sample from the same noise (path.x[0]): the region's centre
            origin = reference.sample(reference_context, num_steps=cfg.num_steps, noise=path.x[0])
        origin = origin[:, :n, :r].flatten(1)
    xs, ts = path.x[:-1], path.t[:-1]  # K states at t_k = 1, ..., 1/K (t = 0 is the output, never evaluated)
    gate = gate_weights(ts, cfg)
    gate_list = gate.tolist()  # host copy for the branch below
    b = xs.shape[1]
    n_gated = sum(m > 0 for m in gate_list)
    if cfg.steps_per_sample is not None and cfg.steps_per_sample < max(n_gated, cfg.num_steps - n_gated):
        step_losses, info = _sampled_terms(actor, reference, actor_context, reference_context, q_fn, cfg, xs, ts,
                                           gate, origin, backward_each_step, box)
        return _finish(actor, step_losses, info, cfg, bc_inputs, bc_actions, backward_each_step)

    # 2. reference one-step clean estimates A_base = x_k - t_k v_base(x_k, t_k) at every step
    with torch.no_grad():
        v_base = torch.stack([reference.velocity(xs[k], ts[k].expand(b), reference_context)
                              for k in range(cfg.num_steps)])  # [K, B, H, D]
        a_base = (xs - ts[:, None, None, None] * v_base)[:, :, :n, :r].flatten(2)  # [K, B, n*r]
    # 3. keep-best ascent on Qbar, batched over the gated steps (the only ones whose target is used)
    a_q, gain = a_base.clone(), torch.zeros(a_base.shape[:2], dtype=a_base.dtype, device=a_base.device)
    gated = [k for k in range(cfg.num_steps) if gate_list[k] > 0]
    if gated:
        improved, g = q_ascent(q_fn, a_base[gated].transpose(0, 1), cfg,
                               origin=None if origin is None else origin[:, None, :], box=box)  # [B, M, n*r]
        a_q[gated], gain[gated] = improved.transpose(0, 1), g.transpose(0, 1)
    # 4. residual velocity targets (openpi convention: t_k is the noise level, >= 1/K here)
    h = cfg.h_sign * residual_target(a_q, a_base, ts[:, None, None])  # [K, B, n*r]

    # 5. per step: regress the actor's velocity residual on sg[h]; anchor what the critic does not see
    mask = torch.ones_like(xs[0, 0])  # [H, D], 0 on the critic's coordinates
    mask[:n, :r] = 0.0
    step_losses, dv_norms = [], []
    for k in range(cfg.num_steps):
        v_theta = actor.velocity(xs[k], ts[k].expand(b), actor_context)  # the only graph-holding evaluation
        dv = v_theta - v_base[k]
        dv_c = dv[:, :n, :r].flatten(1)
        match = ((dv_c - h[k].detach()) ** 2).sum(-1).mean()
        anchor_c = (dv_c**2).sum(-1).mean()
        anchor_o = ((dv**2) * mask).flatten(1).sum(-1).mean()
        m_k = gate_list[k]
        term = m_k * match + cfg.anchor_weight * ((1.0 - m_k) * anchor_c + anchor_o)
        if backward_each_step:
            term.backward(retain_graph=True)  # frees this step's graph once `term` is dropped
            term = term.detach()
        step_losses.append(term)
        dv_norms.append(dv.detach().flatten(1).norm(dim=-1).mean())
    info: dict[str, Any] = {"ascent_gain": gain.mean(1).tolist(), "dv_norm": torch.stack(dv_norms).tolist(),
                            "h_norm": h.norm(dim=-1).mean(1).tolist(), "gate": gate_list}
    return _finish(actor, step_losses, info, cfg, bc_inputs, bc_actions, backward_each_step)


def _sampled_terms(actor: FlowPolicy, reference: FlowPolicy, actor_context: Any, reference_context: Any,
                   q_fn: QFunction, cfg: QVGMConfig, xs: torch.Tensor, ts: torch.Tensor, gate: torch.Tensor,
                   origin: torch.Tensor | None, backward_each_step: bool,
                   box: Box | None = None) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """The loss terms at cfg.steps_per_sample drawn steps per sample (sampled_steps), one term per column j.

    xs [K, B, H, D], ts [K] the no-grad rollout (openpi: t_k = noise level); column j evaluates sample b at
    step k = steps[b, j] and flow time t_k (a per-sample t [B]): one reference and one graph-holding actor
    velocity per column, the ascent batched over the gated columns. Term j = w_j * mean_b(l_{k_bj, b}).
    """
    n, r = cfg.n_exec, actor.real_action_dim
    b = xs.shape[1]
    steps, weights, n_gated = sampled_steps(gate, b, cfg.steps_per_sample)
    steps = steps.to(xs.device)
    rows = torch.arange(b, device=xs.device)
    x_sel = xs[steps, rows[:, None]]  # [B, J, H, D]
    t_sel = ts[steps]  # [B, J]
    m_sel = gate.to(xs.device)[steps]  # [B, J]
    with torch.no_grad():
        v_base = torch.stack([reference.velocity(x_sel[:, j], t_sel[:, j], reference_context)
                              for j in range(steps.shape[1])], dim=1)  # [B, J, H, D]
        a_base = (x_sel[:, :n_gated] - t_sel[:, :n_gated, None, None] * v_base[:, :n_gated])[:, :, :n, :r]
        a_base = a_base.flatten(2)  # [B, J_gated, n*r]
    gain = a_base.new_zeros(b, 0)
    h = a_base.new_zeros(b, 0, n * r)
    if n_gated:
        a_q, gain = q_ascent(q_fn, a_base, cfg, origin=None if origin is None else origin[:, None, :], box=box)
        h = cfg.h_sign * residual_target(a_q, a_base, t_sel[:, :n_gated, None])  # [B, J_gated, n*r]
    mask = torch.ones_like(xs[0, 0])  # [H, D], 0 on the critic's coordinates
    mask[:n, :r] = 0.0
    step_losses, dv_norms = [], []
    for j in range(steps.shape[1]):
        v_theta = actor.velocity(x_sel[:, j], t_sel[:, j], actor_context)  # the only graph-holding evaluation
        dv = v_theta - v_base[:, j]
        dv_c = dv[:, :n, :r].flatten(1)
        m_j = m_sel[:, j]
        per_sample = cfg.anchor_weight * ((1.0 - m_j) * (dv_c**2).sum(-1) + ((dv**2) * mask).flatten(1).sum(-1))
        if j < n_gated:
            per_sample = per_sample + m_j * ((dv_c - h[:, j].detach()) ** 2).sum(-1)
        term = float(weights[j]) * per_sample.mean()
        if backward_each_step:
            term.backward(retain_graph=True)
            term = term.detach()
        step_losses.append(term)
        dv_norms.append(dv.detach().flatten(1).norm(dim=-1).mean())
    info: dict[str, Any] = {"ascent_gain": gain.mean(0).tolist(), "dv_norm": torch.stack(dv_norms).tolist(),
                            "h_norm": h.norm(dim=-1).mean(0).tolist(), "gate": gate.tolist(),
                            "steps": steps.tolist(), "step_weights": weights.tolist()}
    return step_losses, info


def _finish(actor: FlowPolicy, step_losses: list[torch.Tensor], info: dict[str, Any], cfg: QVGMConfig,
            bc_inputs: dict[str, torch.Tensor] | None, bc_actions: torch.Tensor | None,
            backward_each_step: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """Sum the per-step terms, add the optional BC flow loss, fill info["loss"] / ["step_losses"]."""
    loss = torch.stack(step_losses).sum()
    info["step_losses"] = [] if backward_each_step else step_losses
    if cfg.bc_weight > 0:
        if bc_inputs is None or bc_actions is None:
            raise ValueError("bc_weight > 0 needs bc_inputs and bc_actions")
        bc = actor.flow_loss(bc_inputs, bc_actions)
        if backward_each_step:
            (cfg.bc_weight * bc).backward()
            bc = bc.detach()
        loss = loss + cfg.bc_weight * bc
        info["bc_loss"] = bc.item()
    info["loss"] = loss.item()
    return loss, info


def qvgm_update(actor: FlowPolicy, reference: FlowPolicy, optimizer: torch.optim.Optimizer,
                inputs: dict[str, torch.Tensor], q_fn: QFunction, cfg: QVGMConfig,
                bc_actions: torch.Tensor | None = None, max_grad_norm: float | None = 1.0,
                backward_each_step: bool = False, box: Box | None = None) -> dict[str, Any]:
    """One optimiser step of Q-VGM on a batch of model inputs. Raises FloatingPointError (no step) on NaN.

    backward_each_step: see qvgm_loss (same gradients, K times less activation memory). box: the ascent's
    projection box (lo, hi) per critic coordinate (see q_ascent; None = [-1, 1]).
    Under torchrun gradients are averaged over ranks; the caller starts every rank from the same actor weights
    (critic_trainer.distributed.broadcast_parameters).
    """
    optimizer.zero_grad(set_to_none=True)
    actor_context = actor.encode(inputs)
    with torch.no_grad():
        reference_context = reference.encode(inputs)
    loss, info = qvgm_loss(actor, reference, actor_context, reference_context, q_fn, cfg,
                           bc_inputs=inputs if bc_actions is not None else None, bc_actions=bc_actions,
                           backward_each_step=backward_each_step, box=box)
    if not finite_on_all_ranks(loss):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"Q-VGM loss is not finite (here: {loss.item()}); no step taken")
    if not backward_each_step:
        loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    average_gradients(params)  # data-parallel under torchrun; no-op in one process
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm is not None else float("inf"))
    if not torch.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError("Q-VGM gradient is not finite; no step taken")
    info["grad_norm"] = float(norm)
    optimizer.step()
    del info["step_losses"]
    return info
