"""Critic ensemble (METHOD.md §3): gradients, chunk TD targets, the Cal-QL regulariser, regression on returns."""

from __future__ import annotations

import math

import pytest
import torch

from critic_trainer.critic import (
    CriticBatch,
    CriticConfig,
    CriticTrainConfig,
    CriticTrainer,
    QEnsemble,
    aggregate,
    calql_regulariser,
    critic_action,
    td_target,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_cfg(**kw) -> CriticConfig:
    base = dict(feature_dim=6, proprio_dim=3, n_exec=2, real_action_dim=3, num_q=3, hidden=(16, 8),
                proprio_proj_dim=4)
    base.update(kw)
    return CriticConfig(**base)


def test_critic_action_takes_first_steps_and_real_dims():
    chunk = torch.arange(2 * 5 * 4, dtype=torch.float32).reshape(2, 5, 4)  # B=2, H=5, D=4
    a = critic_action(chunk, n_exec=2, real_action_dim=3)
    assert a.shape == (2, 6)
    assert torch.equal(a[0], torch.tensor([0.0, 1, 2, 4, 5, 6]))
    with pytest.raises(ValueError):
        critic_action(chunk, n_exec=6, real_action_dim=3)


@pytest.mark.parametrize("per_layer", [True, False])
def test_grad_a_matches_finite_differences(per_layer: bool):
    torch.manual_seed(0)
    critic = QEnsemble(small_cfg(per_layer_injection=per_layer)).double()
    z, p = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    a = (torch.rand(4, 6, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    q = critic(z, p, a)  # [N, B]
    assert q.shape == (3, 4)
    (grad,) = torch.autograd.grad(q.sum(), a)
    eps = 1e-6
    fd = torch.zeros_like(a)
    with torch.no_grad():
        for j in range(a.shape[1]):
            d = torch.zeros_like(a)
            d[:, j] = eps
            fd[:, j] = (critic(z, p, a + d).sum(0) - critic(z, p, a - d).sum(0)) / (2 * eps)
    assert grad.abs().max() > 1e-3  # the gradient is not trivially zero
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)
    assert torch.autograd.gradcheck(lambda x: critic(z, p, x), (a,))


def test_action_reaches_every_layer_and_members_differ():
    torch.manual_seed(1)
    critic = QEnsemble(small_cfg())
    z, p, a = torch.randn(5, 6), torch.randn(5, 3), torch.rand(5, 6) * 2 - 1
    q = critic(z, p, a)
    assert not torch.allclose(q[0], q[1])  # independent members
    # multi-sample layout equals the single-sample one
    a_multi = torch.stack([a, -a], dim=1)
    q_multi = critic(z, p, a_multi)
    assert q_multi.shape == (3, 5, 2)
    torch.testing.assert_close(q_multi[:, :, 0], q)
    torch.testing.assert_close(q_multi[:, :, 1], critic(z, p, -a))
    # zero the action weights of the FIRST layer: with per-layer injection Q still depends on A
    with torch.no_grad():
        critic.hidden[0].weight[:, -6:, :] = 0.0
    assert not torch.allclose(critic(z, p, a), critic(z, p, -a))
    # without injection past layer 0 the same surgery removes A entirely
    plain = QEnsemble(small_cfg(per_layer_injection=False))
    with torch.no_grad():
        plain.hidden[0].weight[:, -6:, :] = 0.0
    torch.testing.assert_close(plain(z, p, a), plain(z, p, -a))


def test_state_is_layernormed_and_shapes_checked():
    critic = QEnsemble(small_cfg())
    s = critic.encode_state(torch.randn(4, 6) * 100 + 7, torch.randn(4, 3))
    assert s.shape == (3, 4, 6 + 4)
    torch.testing.assert_close(s.mean(-1), torch.zeros(3, 4), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        critic(torch.randn(4, 6), torch.randn(4, 3), torch.randn(4, 5))
    with pytest.raises(ValueError):
        critic(torch.randn(4, 6), None, torch.randn(4, 6))


def test_td_target_by_hand():
    gamma = 0.9
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.5]])
    done = torch.tensor([0.0, 1.0, 0.0])
    next_q = torch.tensor([10.0, 10.0, -4.0])
    y = td_target(rewards, done, next_q, gamma)
    expected = torch.tensor([
        1.0 + 0.0 * 0.9 + 2.0 * 0.81 + 0.729 * 10.0,  # bootstraps with gamma^3
        0.9,  # terminal: no bootstrap
        0.5 * (1 + 0.9 + 0.81) + 0.729 * -4.0,
    ])
    torch.testing.assert_close(y, expected)
    # truncated chunk: only 2 steps executed -> gamma^2 bootstrap
    y2 = td_target(rewards[:1, :2], torch.zeros(1), torch.tensor([10.0]), gamma, n_steps=torch.tensor([2]))
    torch.testing.assert_close(y2, torch.tensor([1.0 + 0.81 * 10.0]))


def test_aggregations():
    q = torch.tensor([[1.0, 4.0], [3.0, 0.0]])
    torch.testing.assert_close(aggregate(q, "mean"), torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(aggregate(q, "min"), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(aggregate(q, "lcb", 1.0), aggregate(q, "min"))  # N = 2: mean - std = min
    torch.testing.assert_close(aggregate(q, "lcb", 0.5), torch.tensor([1.5, 1.0]))
    with pytest.raises(ValueError):
        aggregate(q, "max")  # type: ignore[arg-type]


def test_calql_regulariser_by_hand_and_calibration_bound():
    q_data = torch.tensor([[0.5]])
    q_unif = torch.tensor([[[-1.0, 0.0]]])
    q_ref = torch.tensor([[[0.2, 3.0]]], requires_grad=True)
    q_ref_next = torch.tensor([[[-2.0, 1.5]]], requires_grad=True)
    mc = torch.tensor([1.0])
    reg = calql_regulariser(q_data, q_unif, q_ref, q_ref_next, mc, calibrate=True)
    # reference samples below the MC return (0.2, -2.0) are raised to it; uniform ones (-1, 0) are not
    by_hand = math.log(math.exp(-1) + math.exp(0) + math.exp(1.0) + math.exp(3.0) + math.exp(1.0) + math.exp(1.5)) - 0.5
    assert reg.item() == pytest.approx(by_hand, rel=1e-6)
    reg.sum().backward()
    # the calibration bound: the regulariser exerts no downward push on reference Q values below the MC return
    assert q_ref.grad[0, 0, 0] == 0.0 and q_ref_next.grad[0, 0, 0] == 0.0
    assert q_ref.grad[0, 0, 1] > 0.0 and q_ref_next.grad[0, 0, 1] > 0.0
    # CQL (no calibration) uses the raw values
    cql = calql_regulariser(q_data, q_unif, q_ref.detach(), q_ref_next.detach(), None, calibrate=False)
    raw = math.log(math.exp(-1) + 1 + math.exp(0.2) + math.exp(3.0) + math.exp(-2.0) + math.exp(1.5)) - 0.5
    assert cql.item() == pytest.approx(raw, rel=1e-6)
    with pytest.raises(ValueError):
        calql_regulariser(q_data, q_unif, q_ref, q_ref_next, None, calibrate=True)


def chain_buffer(seed: int = 0, episodes: int = 32, length: int = 4, n: int = 2, r: int = 3, gamma: float = 0.95):
    """Episodes of `length` chunks (n steps each); reward 1 on the last step iff the goal's first coord > 0.

    Returns tensors with the exact discounted Monte-Carlo return-to-go of every transition.
    """
    g = torch.Generator().manual_seed(seed)
    goals = torch.randn(episodes, 4, generator=g)
    success = (goals[:, 0] > 0).float()
    acts = torch.rand(episodes, length, n * r, generator=g) * 2 - 1
    eye = torch.eye(length)
    z, a, rew, done, z_next, a_next, mc = [], [], [], [], [], [], []
    for e in range(episodes):
        for i in range(length):
            last = i == length - 1
            j = min(i + 1, length - 1)
            z.append(torch.cat([goals[e], eye[i]]))
            z_next.append(torch.cat([goals[e], eye[j]]))
            a.append(acts[e, i])
            a_next.append(acts[e, j])
            rr = torch.zeros(n)
            if last:
                rr[-1] = success[e]
            rew.append(rr)
            done.append(float(last))
            mc.append(success[e] * gamma ** (n * (length - 1 - i) + n - 1))
    return dict(z=torch.stack(z), a=torch.stack(a), rewards=torch.stack(rew), done=torch.tensor(done),
                z_next=torch.stack(z_next), a_next=torch.stack(a_next), mc=torch.stack(mc), gamma=gamma)


def make_batch(buf, idx: torch.Tensor, g: torch.Generator) -> CriticBatch:
    """Reference policy = the behaviour policy plus noise (sample 0 at s' is the exact next data action)."""
    b, d = idx.shape[0], buf["a"].shape[1]
    ref = (buf["a"][idx, None] + 0.3 * torch.randn(b, 4, d, generator=g)).clamp(-1, 1)
    ref_next = buf["a_next"][idx, None].repeat(1, 4, 1)
    ref_next[:, 1:] = (ref_next[:, 1:] + 0.3 * torch.randn(b, 3, d, generator=g)).clamp(-1, 1)
    return CriticBatch(z=buf["z"][idx], p=None, actions=buf["a"][idx], rewards=buf["rewards"][idx],
                       done=buf["done"][idx], z_next=buf["z_next"][idx], p_next=None, mc_return=buf["mc"][idx],
                       ref_actions=ref, ref_next_actions=ref_next)


@pytest.mark.parametrize("objective,reg_weight,max_mae,min_corr", [
    ("calql", 0.0, 0.12, 0.95),  # plain chunk TD: Q converges to the MC returns
    ("iql", 0.0, 0.15, 0.9),
])
def test_q_regression_approaches_monte_carlo_returns(objective, reg_weight, max_mae, min_corr):
    torch.manual_seed(0)
    buf = chain_buffer()
    critic = QEnsemble(CriticConfig(feature_dim=8, proprio_dim=0, n_exec=2, real_action_dim=3, hidden=(64, 64)))
    # a faster EMA than the default 5e-3 so the 4-chunk chain propagates in a few hundred steps
    trainer = CriticTrainer(critic, CriticTrainConfig(objective=objective, gamma=buf["gamma"], reg_weight=reg_weight,
                                                      target_tau=0.05, lr=3e-3, value_hidden=(64, 64)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        mae0 = (critic(buf["z"], None, buf["a"]).mean(0) - buf["mc"]).abs().mean().item()
    for _ in range(400):
        idx = torch.randint(0, buf["z"].shape[0], (64,), generator=g)
        metrics = trainer.update(make_batch(buf, idx, g))
    assert all(math.isfinite(v) for v in metrics.values())
    with torch.no_grad():
        q = critic(buf["z"], None, buf["a"])
    err = (q - buf["mc"]).abs().mean().item()
    corr = torch.corrcoef(torch.stack([q.mean(0), buf["mc"]]))[0, 1].item()
    assert err < max_mae and err < 0.6 * mae0, (err, mae0)
    assert corr > min_corr
    # the target network trails the online one (EMA), it is not a copy
    assert not torch.equal(trainer.target.out.weight, critic.out.weight)


def test_nan_loss_raises_without_step():
    torch.manual_seed(0)
    buf = chain_buffer(episodes=4)
    critic = QEnsemble(CriticConfig(feature_dim=8, proprio_dim=0, n_exec=2, real_action_dim=3, hidden=(8,)))
    trainer = CriticTrainer(critic)
    batch = make_batch(buf, torch.arange(8), torch.Generator().manual_seed(0))
    batch.rewards = batch.rewards.clone()
    batch.rewards[0, 0] = float("nan")
    before = [p.detach().clone() for p in critic.parameters()]
    with pytest.raises(FloatingPointError):
        trainer.update(batch)
    assert all(torch.equal(b, p) for b, p in zip(before, critic.parameters(), strict=True))
    batch.ref_actions = None
    with pytest.raises(ValueError):
        trainer.loss(batch)
    with pytest.raises(ValueError):
        CriticTrainer(critic, CriticTrainConfig(objective="awac"))  # type: ignore[arg-type]


def test_ema_target_update():
    critic = QEnsemble(small_cfg())
    trainer = CriticTrainer(critic, CriticTrainConfig(target_tau=0.25))
    with torch.no_grad():
        for p in critic.parameters():
            p.add_(1.0)
    old = [p.clone() for p in trainer.target.parameters()]
    trainer.update_target()
    for o, t, p in zip(old, trainer.target.parameters(), critic.parameters(), strict=True):
        torch.testing.assert_close(t, 0.75 * o + 0.25 * p)


def _fit_with_mirrored_reference(objective: str, buf) -> tuple[torch.Tensor, torch.Tensor]:
    """Train with a reference policy that is NOT the behaviour (mirrored actions); return Q(s, a_data), Q(s, a_ref)."""
    torch.manual_seed(0)
    critic = QEnsemble(CriticConfig(feature_dim=8, proprio_dim=0, n_exec=2, real_action_dim=3, hidden=(64, 64)))
    trainer = CriticTrainer(critic, CriticTrainConfig(objective=objective, gamma=buf["gamma"], reg_weight=1.0,
                                                      target_tau=0.05, lr=3e-3))
    ref, ref_next = -buf["a"], -buf["a_next"]
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        idx = torch.randint(0, buf["z"].shape[0], (64,), generator=g)
        trainer.update(CriticBatch(z=buf["z"][idx], p=None, actions=buf["a"][idx], rewards=buf["rewards"][idx],
                                   done=buf["done"][idx], z_next=buf["z_next"][idx], p_next=None,
                                   mc_return=buf["mc"][idx], ref_actions=ref[idx, None].repeat(1, 4, 1),
                                   ref_next_actions=ref_next[idx, None].repeat(1, 4, 1)))
    with torch.no_grad():
        return critic(buf["z"], None, buf["a"]).mean(0), critic(buf["z"], None, ref).mean(0)


def test_calql_calibration_keeps_reference_q_far_above_cql():
    """CQL pushes the reference policy's Q far below the data's MC returns; Cal-QL's calibration stops that."""
    buf = chain_buffer()
    q_data_cal, q_ref_cal = _fit_with_mirrored_reference("calql", buf)
    q_data_cql, q_ref_cql = _fit_with_mirrored_reference("cql", buf)
    gap_cal = (q_ref_cal - buf["mc"]).mean().item()
    gap_cql = (q_ref_cql - buf["mc"]).mean().item()
    assert gap_cal > gap_cql + 3.0, (gap_cal, gap_cql)
    assert (q_data_cal - buf["mc"]).abs().mean() < (q_data_cql - buf["mc"]).abs().mean()
