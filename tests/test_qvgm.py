"""Q-VGM actor update (METHOD.md §4): convention, safeguards, no backprop through the chain, and the sign.

The policy is a small real flow-matching model (critic_trainer.toy.ToyFlowPolicy) fitted by SFT here; the
critic is an analytic module Q(A) = -||A - A*||^2, so the right direction of improvement is known.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from critic_trainer.critic import CriticConfig, QEnsemble, critic_action
from critic_trainer.qvgm import (
    QVGMConfig,
    bind_critic,
    gate_weights,
    q_ascent,
    qvgm_loss,
    qvgm_update,
    residual_target,
)
from critic_trainer.toy import ToyFlowPolicy, fit_toy_policy

OBS, H, D, R, N_EXEC = 6, 4, 4, 3, 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TargetQ(torch.nn.Module):
    """Analytic critic Q(A) = -||A - A*||^2 on critic actions [B, A] (state independent)."""

    def __init__(self, a_star: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a_star", a_star)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return -((a - self.a_star) ** 2).sum(-1)


@pytest.fixture(scope="module")
def sft_policy() -> ToyFlowPolicy:
    """Toy flow policy fitted by flow matching on chunks a = 0.5 tanh(W s) + 0.1 noise (padding dims 0)."""
    torch.set_num_threads(1)
    policy, loss = fit_toy_policy(OBS, H, D, R, noise=0.1, steps=400)
    assert loss < 0.5
    return policy


def eval_samples(policy: ToyFlowPolicy, seed: int = 123, b: int = 512) -> torch.Tensor:
    """Chunks [b, H, D] from fixed states and fixed noise (common random numbers across policies)."""
    g = torch.Generator().manual_seed(seed)
    s, noise = torch.randn(b, OBS, generator=g), torch.randn(b, H, D, generator=g)
    with torch.no_grad():
        return policy.sample(policy.encode({"state": s}), num_steps=10, noise=noise)


def count_param_uses(root: torch.Tensor, param: torch.Tensor) -> int:
    """How many times `param` enters the autograd graph of `root` (one edge per forward use)."""
    seen, stack, uses = set(), [root.grad_fn], 0
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        for nxt, _ in fn.next_functions:
            if nxt is None:
                continue
            if getattr(nxt, "variable", None) is param:
                uses += 1
            else:
                stack.append(nxt)
    return uses


def test_euler_path_convention(sft_policy):
    ctx = sft_policy.encode({"state": torch.randn(3, OBS)})
    noise = torch.randn(3, H, D)
    out, path = sft_policy.sample(ctx, num_steps=5, noise=noise, return_path=True)
    assert path.x.shape == (6, 3, H, D)
    torch.testing.assert_close(path.t, torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0]))
    assert torch.equal(path.x[0], noise) and torch.equal(path.x[-1], out)
    # x_{k+1} = x_k + dt * v(x_k, t_k), dt = -1/K
    v = sft_policy.velocity(path.x[2], path.t[2].expand(3), ctx)
    torch.testing.assert_close(path.x[3], path.x[2] - 0.2 * v)


def test_residual_target_reaches_improved_action():
    """Convention check: the actor's one-step estimate x - t (v_base + h) equals A_Q."""
    torch.manual_seed(0)
    x, v_base, a_q = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 6)
    for t in (1.0, 0.5, 0.1):
        a_base = x - t * v_base
        h = residual_target(a_q, a_base, t)
        torch.testing.assert_close(x - t * (v_base + h), a_q)


def test_gates_weigh_late_low_noise_steps():
    t = torch.linspace(1.0, 0.0, 11)[:-1]  # t_k = 1, 0.9, ..., 0.1
    m = gate_weights(t, QVGMConfig(gate="last_m", gate_last_m=5))
    assert m.tolist() == [0.0] * 5 + [1.0] * 5  # t <= 0.5
    ms = gate_weights(t, QVGMConfig(gate="smooth", gate_power=2.0))
    torch.testing.assert_close(ms, (1 - t) ** 2)
    assert ms[0] == 0.0 and torch.all(ms[1:] > ms[:-1])
    with pytest.raises(ValueError):
        gate_weights(t, QVGMConfig(gate="early"))  # type: ignore[arg-type]


def test_ascent_safeguards():
    a_star = torch.full((6,), 2.0)  # optimum outside the action box
    q = TargetQ(a_star)
    a0 = torch.zeros(3, 6)
    a_q, gain = q_ascent(q, a0, QVGMConfig(ascent_steps=4, ascent_lr=0.05))
    # clipped gradient (|grad| = 4 > 1): each step moves exactly alpha per coordinate
    torch.testing.assert_close(a_q, torch.full((3, 6), 0.2))
    assert torch.all(gain > 0)
    # projection to [-1, 1]
    a_q, _ = q_ascent(q, a0, QVGMConfig(ascent_steps=4, ascent_lr=1.0))
    assert a_q.max() == 1.0
    a_q, _ = q_ascent(q, a0, QVGMConfig(ascent_steps=4, ascent_lr=1.0, project=False))
    assert a_q.max() > 1.0
    # keep-best: a huge step overshoots and lowers Q -> A_base is kept; without keep-best Q drops
    q0 = TargetQ(torch.zeros(6))
    start = torch.full((2, 6), 0.1)
    cfg = QVGMConfig(ascent_steps=2, ascent_lr=5.0, clip_grad=False, project=False)
    a_q, gain = q_ascent(q0, start, cfg)
    assert torch.equal(a_q, start) and torch.all(gain == 0)
    a_q, gain = q_ascent(q0, start, QVGMConfig(ascent_steps=2, ascent_lr=5.0, clip_grad=False, project=False,
                                               keep_best=False))
    assert torch.all(gain < 0)


def test_no_backprop_through_the_chain(sft_policy):
    actor = copy.deepcopy(sft_policy).requires_grad_(True)
    reference = sft_policy
    q_fn = TargetQ(torch.full((N_EXEC * R,), 0.5))
    calls = []
    hook = actor.net.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    inputs = {"state": torch.randn(8, OBS)}
    ctx = actor.encode(inputs)
    with torch.no_grad():
        ref_ctx = reference.encode(inputs)
    cfg = QVGMConfig(n_exec=N_EXEC, num_steps=10)
    loss, info = qvgm_loss(actor, reference, ctx, ref_ctx, q_fn, cfg)
    hook.remove()
    # K rollout calls without grad, then exactly K calls with grad (one per loss term)
    assert calls.count(False) == 10 and calls.count(True) == 10
    w_out = actor.net[-1].weight
    terms = info["step_losses"]
    assert len(terms) == 10
    for term in terms:
        assert count_param_uses(term, w_out) == 1
    assert count_param_uses(loss, w_out) == 10
    loss.backward()
    assert all(p.grad is None for p in reference.parameters())
    assert all(p.grad is not None for p in actor.parameters())
    # the counter does detect a backprop-through-chain loss (Diffusion-QL style): K uses in ONE term
    out = actor.sample(actor.encode(inputs), num_steps=10)
    chain_loss = -q_fn(critic_action(out, N_EXEC, R)).mean()
    assert count_param_uses(chain_loss, w_out) == 10


def test_bc_term_and_bad_config(sft_policy):
    actor = copy.deepcopy(sft_policy).requires_grad_(True)
    q_fn = TargetQ(torch.zeros(N_EXEC * R))
    inputs = {"state": torch.randn(4, OBS)}
    ctx = actor.encode(inputs)
    with pytest.raises(ValueError):
        qvgm_loss(actor, sft_policy, ctx, sft_policy.encode(inputs), q_fn, QVGMConfig(n_exec=N_EXEC, bc_weight=1.0))
    opt = torch.optim.Adam(actor.parameters(), 1e-3)
    info = qvgm_update(actor, sft_policy, opt, inputs, q_fn, QVGMConfig(n_exec=N_EXEC, bc_weight=1.0),
                       bc_actions=torch.zeros(4, H, D))
    assert info["bc_loss"] > 0 and torch.isfinite(torch.tensor(info["loss"]))


def test_nan_critic_stops_without_step(sft_policy):
    actor = copy.deepcopy(sft_policy).requires_grad_(True)
    before = [p.clone() for p in actor.parameters()]
    opt = torch.optim.Adam(actor.parameters(), 1e-3)
    with pytest.raises(FloatingPointError):
        qvgm_update(actor, sft_policy, opt, {"state": torch.randn(4, OBS)}, lambda a: a.sum(-1) * float("nan"),
                    QVGMConfig(n_exec=N_EXEC))
    assert all(torch.equal(b, p) for b, p in zip(before, actor.parameters(), strict=True))


def test_bind_critic_aggregates_a_real_ensemble():
    torch.manual_seed(0)
    critic = QEnsemble(CriticConfig(feature_dim=5, proprio_dim=2, n_exec=N_EXEC, real_action_dim=R, hidden=(16,)))
    z, p, a = torch.randn(3, 5), torch.randn(3, 2), torch.rand(3, N_EXEC * R)
    for how in ("mean", "min", "lcb"):
        q_fn = bind_critic(critic, z, p, how)
        assert q_fn(a).shape == (3,)
    torch.testing.assert_close(bind_critic(critic, z, p, "min")(a), critic(z, p, a).min(0).values)
    a_q, gain = q_ascent(bind_critic(critic, z, p), a, QVGMConfig())
    assert torch.all(gain >= 0) and a_q.abs().max() <= 1.0


def run_qvgm(base: ToyFlowPolicy, a_star: torch.Tensor, h_sign: float, updates: int) -> ToyFlowPolicy:
    torch.manual_seed(1)
    actor = copy.deepcopy(base).requires_grad_(True)
    opt = torch.optim.Adam(actor.parameters(), 1e-3)
    cfg = QVGMConfig(n_exec=N_EXEC, h_sign=h_sign)
    q_fn = TargetQ(a_star)
    for _ in range(updates):
        info = qvgm_update(actor, base, opt, {"state": torch.randn(32, OBS)}, q_fn, cfg)
    assert all(g >= 0 for g in info["ascent_gain"])  # keep-best never lowers Q
    return actor


def test_sign_qvgm_moves_samples_toward_the_optimum(sft_policy):
    a_star = torch.full((N_EXEC * R,), 0.8)

    def dist(chunks: torch.Tensor) -> float:
        return (critic_action(chunks, N_EXEC, R) - a_star).norm(dim=-1).mean().item()

    base_chunks = eval_samples(sft_policy)
    d_base = dist(base_chunks)
    good = eval_samples(run_qvgm(sft_policy, a_star, h_sign=1.0, updates=100))
    bad = eval_samples(run_qvgm(sft_policy, a_star, h_sign=-1.0, updates=100))
    d_good, d_bad = dist(good), dist(bad)
    assert d_good < 0.8 * d_base, (d_base, d_good)
    assert d_bad > 1.15 * d_base, (d_base, d_bad)  # the sign bug is caught: samples move away
    # the anchor keeps what the critic does not see: the later steps' real dims barely move
    moved_c = (critic_action(good, N_EXEC, R) - critic_action(base_chunks, N_EXEC, R)).abs().mean()
    moved_o = (good[:, N_EXEC:, :R] - base_chunks[:, N_EXEC:, :R]).abs().mean()
    assert moved_o < 0.5 * moved_c, (moved_o, moved_c)


def test_reference_actions_for_the_critic(sft_policy):
    from critic_trainer.critic import reference_actions

    ctx = sft_policy.encode({"state": torch.randn(5, OBS)})
    ref = reference_actions(sft_policy, ctx, num_samples=3, n_exec=N_EXEC)
    assert ref.shape == (5, 3, N_EXEC * R) and not ref.requires_grad
    assert not torch.allclose(ref[:, 0], ref[:, 1])  # independent noise per sample


def test_backward_each_step_gives_the_same_gradients(sft_policy):
    """The memory-saving mode (one velocity graph alive at a time) computes the same gradient, BC term included."""
    grads = []
    for each in (False, True):
        actor = copy.deepcopy(sft_policy).requires_grad_(True)
        opt = torch.optim.SGD(actor.parameters(), lr=0.0)
        torch.manual_seed(5)
        info = qvgm_update(actor, sft_policy, opt, {"state": torch.randn(6, OBS)}, TargetQ(torch.zeros(N_EXEC * R)),
                           QVGMConfig(n_exec=N_EXEC, bc_weight=0.5), bc_actions=torch.zeros(6, H, D),
                           backward_each_step=each, max_grad_norm=None)
        grads.append(([p.grad.clone() for p in actor.parameters()], info["loss"]))
    for g0, g1 in zip(grads[0][0], grads[1][0], strict=True):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-7)
    assert grads[0][1] == pytest.approx(grads[1][1], rel=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# steps_per_sample: the loss at S drawn flow steps per sample, an unbiased estimate of the all-K loss
# ------------------------------------------------------------------------------------------------------------------
def _loss_at(actor, reference, inputs, noise, cfg, seed):
    ctx = actor.encode(inputs)
    with torch.no_grad():
        ref_ctx = reference.encode(inputs)
    torch.manual_seed(seed)
    return qvgm_loss(actor, reference, ctx, ref_ctx, TargetQ(torch.full((N_EXEC * R,), 0.6)), cfg, noise=noise)


def _perturbed(policy: ToyFlowPolicy) -> ToyFlowPolicy:
    """An actor that differs from the reference (so both the match and the anchor terms are non-zero)."""
    actor = copy.deepcopy(policy).requires_grad_(True)
    with torch.no_grad():
        g = torch.Generator().manual_seed(9)
        for p in actor.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return actor


def test_sampled_steps_draws_distinct_steps_per_stratum():
    from critic_trainer.qvgm import sampled_steps

    t = torch.linspace(1.0, 0.1, 10)
    gate = gate_weights(t, QVGMConfig(gate_last_m=5))
    steps, w, n_gated = sampled_steps(gate, 64, 2, generator=torch.Generator().manual_seed(0))
    assert steps.shape == (64, 4) and n_gated == 2 and w.tolist() == [2.5, 2.5, 2.5, 2.5]
    assert (steps[:, :2] >= 5).all() and (steps[:, 2:] < 5).all()  # gated = the last 5, anchor-only = the first 5
    assert (steps[:, 0] != steps[:, 1]).all() and (steps[:, 2] != steps[:, 3]).all()
    assert len({tuple(r) for r in steps[:, :2].sort(-1).values.tolist()}) > 5  # varies per sample
    full, w_full, _ = sampled_steps(gate, 3, 10)
    assert sorted(full[0].tolist()) == list(range(10)) and (w_full == 1).all()
    smooth = gate_weights(t, QVGMConfig(gate="smooth"))  # t_0 = 1 has m = 0: |G| = 9, |U| = 1
    s, w, n_gated = sampled_steps(smooth, 5, 3)
    assert n_gated == 3 and w.tolist() == [3.0, 3.0, 3.0, 1.0] and (s[:, 3] == 0).all()
    with pytest.raises(ValueError):
        sampled_steps(gate, 4, 0)


@pytest.mark.parametrize("gate", ["last_m", "smooth"])
def test_steps_per_sample_k_is_exact_and_s_below_k_is_unbiased(sft_policy, gate):
    actor = _perturbed(sft_policy)
    inputs = {"state": torch.randn(8, OBS, generator=torch.Generator().manual_seed(3))}
    noise = torch.randn(8, H, D, generator=torch.Generator().manual_seed(4))
    base = QVGMConfig(n_exec=N_EXEC, num_steps=10, gate=gate)
    exact, info = _loss_at(actor, sft_policy, inputs, noise, base, 0)
    full, info_full = _loss_at(actor, sft_policy, inputs, noise, replace(base, steps_per_sample=10), 0)
    assert torch.equal(exact, full) and "steps" not in info_full  # S = K: the same computation, bit for bit
    (g_exact,) = torch.autograd.grad(exact, actor.net[-1].weight)
    cfg = replace(base, steps_per_sample=2)
    losses, grads = [], []
    for seed in range(300):
        loss, info = _loss_at(actor, sft_policy, inputs, noise, cfg, seed)
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, actor.net[-1].weight)[0])
    losses, grads = torch.stack(losses), torch.stack(grads)
    assert losses.std() > 1e-3 * losses.mean()  # the draws differ: it is an estimate, not the exact loss
    assert len(info["step_losses"]) == (4 if gate == "last_m" else 3)
    se = losses.std() / len(losses) ** 0.5
    assert abs(losses.mean() - exact.detach()) < 4 * se, (losses.mean().item(), exact.item(), se.item())
    # the gradient estimate is unbiased too: its mean is within 4 standard errors elementwise (bar a few)
    z = (grads.mean(0) - g_exact) / (grads.std(0) / len(grads) ** 0.5 + 1e-12)
    assert (z.abs() < 4).float().mean() > 0.97, z.abs().max()
    rel = (grads.mean(0) - g_exact).norm() / g_exact.norm()
    assert rel < 0.1, rel


def test_no_backprop_through_the_chain_with_sampled_steps(sft_policy):
    actor = copy.deepcopy(sft_policy).requires_grad_(True)
    calls = []
    hook = actor.net.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    inputs = {"state": torch.randn(8, OBS)}
    ctx = actor.encode(inputs)
    with torch.no_grad():
        ref_ctx = sft_policy.encode(inputs)
    cfg = QVGMConfig(n_exec=N_EXEC, num_steps=10, steps_per_sample=2)
    loss, info = qvgm_loss(actor, sft_policy, ctx, ref_ctx, TargetQ(torch.full((N_EXEC * R,), 0.5)), cfg)
    hook.remove()
    # K rollout calls without grad, then 2 gated + 2 anchor-only calls with grad (one per loss term)
    assert calls.count(False) == 10 and calls.count(True) == 4
    w_out = actor.net[-1].weight
    assert len(info["step_losses"]) == 4
    for term in info["step_losses"]:
        assert count_param_uses(term, w_out) == 1
    assert count_param_uses(loss, w_out) == 4
    loss.backward()
    assert all(p.grad is None for p in sft_policy.parameters())
    assert all(p.grad is not None for p in actor.parameters())


def test_sampled_steps_backward_each_step_gives_the_same_gradients(sft_policy):
    grads = []
    for each in (False, True):
        actor = _perturbed(sft_policy)
        opt = torch.optim.SGD(actor.parameters(), lr=0.0)
        torch.manual_seed(5)
        qvgm_update(actor, sft_policy, opt, {"state": torch.randn(6, OBS)}, TargetQ(torch.zeros(N_EXEC * R)),
                    QVGMConfig(n_exec=N_EXEC, steps_per_sample=3), backward_each_step=each, max_grad_norm=None)
        grads.append([p.grad.clone() for p in actor.parameters()])
    for g0, g1 in zip(*grads, strict=True):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-6)


def test_sign_with_two_steps_per_sample(sft_policy):
    a_star = torch.full((N_EXEC * R,), 0.8)

    def dist(chunks: torch.Tensor) -> float:
        return (critic_action(chunks, N_EXEC, R) - a_star).norm(dim=-1).mean().item()

    d_base = dist(eval_samples(sft_policy))
    out = {}
    for sign in (1.0, -1.0):
        torch.manual_seed(1)
        actor = copy.deepcopy(sft_policy).requires_grad_(True)
        opt = torch.optim.Adam(actor.parameters(), 1e-3)
        cfg = QVGMConfig(n_exec=N_EXEC, h_sign=sign, steps_per_sample=2)
        for _ in range(100):
            info = qvgm_update(actor, sft_policy, opt, {"state": torch.randn(32, OBS)}, TargetQ(a_star), cfg)
        assert all(g >= 0 for g in info["ascent_gain"])
        out[sign] = dist(eval_samples(actor))
    assert out[1.0] < 0.8 * d_base, (d_base, out)
    assert out[-1.0] > 1.15 * d_base, (d_base, out)


def test_steps_per_sample_config_and_cli():
    import argparse

    from critic_trainer.pipeline import ImproveConfig, add_arguments

    assert ImproveConfig().qvgm().steps_per_sample is None
    assert ImproveConfig(steps_per_sample=2).qvgm().steps_per_sample == 2
    with pytest.raises(ValueError, match="steps_per_sample"):
        ImproveConfig(steps_per_sample=0)
    p = argparse.ArgumentParser()
    add_arguments(p)
    req = ["--policy", "x", "--dataset", "y", "--out", "z"]
    assert p.parse_args([*req, "--steps-per-sample", "3"]).steps_per_sample == 3
    assert p.parse_args(req).steps_per_sample is None
