"""Baselines on the same protocol (METHOD.md §5): each raises Q over plain sampling on the toy problem."""

from __future__ import annotations

import copy

import pytest
import torch

from critic_trainer.baselines import best_of_n, diffusion_ql_loss, q_distill_loss, q_guided_sample
from critic_trainer.critic import critic_action
from critic_trainer.qvgm import QVGMConfig
from critic_trainer.toy import ToyFlowPolicy, fit_toy_policy

OBS, H, D, R, N_EXEC = 6, 4, 4, 3, 2
A_STAR = torch.full((N_EXEC * R,), 0.8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def q_fn(a: torch.Tensor) -> torch.Tensor:
    """Analytic critic Q(A) = -||A - A*||^2."""
    return -((a - A_STAR) ** 2).sum(-1)


@pytest.fixture(scope="module")
def policy() -> ToyFlowPolicy:
    """Toy flow policy fitted on chunks a = 0.5 tanh(W s) + 0.3 noise: a spread that selection can exploit."""
    torch.set_num_threads(1)
    return fit_toy_policy(OBS, H, D, R, noise=0.3, steps=300)[0]


def batch(seed: int = 7, b: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, OBS, generator=g), torch.randn(b, H, D, generator=g)


def mean_q(chunks: torch.Tensor) -> float:
    return q_fn(critic_action(chunks, N_EXEC, R)).mean().item()


def test_best_of_n_raises_q(policy):
    states, noise = batch()
    ctx = policy.encode({"state": states})
    with torch.no_grad():
        plain = policy.sample(ctx, noise=noise)
    noises = torch.cat([noise[None], torch.randn(7, *noise.shape)])  # candidate 0 is the plain sample
    chunks, q = best_of_n(policy, ctx, q_fn, n=8, n_exec=N_EXEC, noise=noises)
    assert chunks.shape == plain.shape
    torch.testing.assert_close(q, q_fn(critic_action(chunks, N_EXEC, R)))
    per_obs_plain = q_fn(critic_action(plain, N_EXEC, R))
    assert torch.all(q >= per_obs_plain)  # never worse per observation than its own first candidate
    assert mean_q(chunks) > mean_q(plain) + 0.3
    one, _ = best_of_n(policy, ctx, q_fn, n=1, n_exec=N_EXEC, noise=noise[None])
    torch.testing.assert_close(one, plain)
    with pytest.raises(ValueError):
        best_of_n(policy, ctx, q_fn, n=0, n_exec=N_EXEC)


def test_q_guidance_raises_q_and_zero_scale_is_plain(policy):
    states, noise = batch()
    ctx = policy.encode({"state": states})
    with torch.no_grad():
        plain = policy.sample(ctx, noise=noise)
    torch.testing.assert_close(q_guided_sample(policy, ctx, q_fn, 0.0, N_EXEC, noise), plain)
    guided = q_guided_sample(policy, ctx, q_fn, 0.5, N_EXEC, noise)
    assert mean_q(guided) > mean_q(plain) + 0.3
    # guidance only touches the critic's coordinates' velocity; padding dims follow the same policy drift
    assert not any(p.grad is not None for p in policy.parameters())


@pytest.mark.parametrize("method", ["q_distill", "diffusion_ql"])
def test_training_baselines_raise_q(policy, method):
    torch.manual_seed(3)
    actor = copy.deepcopy(policy).requires_grad_(True)
    opt = torch.optim.Adam(actor.parameters(), 1e-3)
    cfg = QVGMConfig(n_exec=N_EXEC)
    for _ in range(40):
        inputs = {"state": torch.randn(32, OBS)}
        if method == "q_distill":
            loss, info = q_distill_loss(actor, inputs, q_fn, cfg)
        else:
            loss, info = diffusion_ql_loss(actor, inputs, q_fn, N_EXEC, eta=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    states, noise = batch()
    with torch.no_grad():
        before = mean_q(policy.sample(policy.encode({"state": states}), noise=noise))
        after = mean_q(actor.sample(actor.encode({"state": states}), noise=noise))
    assert after > before + 1.0, (before, after)
