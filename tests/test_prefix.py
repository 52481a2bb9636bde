"""Real-time-chunking-style prefix inpainting (qvgm.policy.prefix) on real tiny untrained policies (`state` and
pi05-tiny), and the FlowPolicyBackend path that takes a committed prefix in robot units."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qvgm.policy import NormStats, make_policy
from qvgm.policy.backend import FlowPolicyBackend
from qvgm.policy.prefix import prefix_weights, sample_with_prefix

torch.set_num_threads(1)  # 2 shared CPU cores

H, D_REAL = 8, 3


def state_policy(seed: int = 0, stats: NormStats | None = None):
    torch.manual_seed(seed)
    return make_policy("state", stats or NormStats.identity(4, D_REAL), state_dim=4, real_action_dim=D_REAL,
                       horizon=H).eval()


def context(pol, state: np.ndarray | None = None):
    s = np.linspace(-0.5, 0.5, 4) if state is None else state
    return pol.encode(pol.preprocess([{"state": s, "prompt": "x"}]))


def test_prefix_weights_hard_and_exp_monotone() -> None:
    hard = prefix_weights(H, 3, 4, "hard")
    assert hard.tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    soft = prefix_weights(H, 2, 4, "exp")
    assert soft[:2].tolist() == [1, 1] and soft[6:].tolist() == [0, 0]
    assert torch.all(soft[1:] <= soft[:-1]) and torch.all((soft[2:6] > 0) & (soft[2:6] < 1))
    assert torch.all(prefix_weights(5, 0, 20, "exp").diff() <= 0)  # cut off at the horizon, still monotone
    with pytest.raises(ValueError, match="weights"):
        prefix_weights(H, 1, 0, "linear")


def test_hard_inpainting_holds_the_prefix_and_conditions_the_rest() -> None:
    pol = state_policy()
    ctx = context(pol)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, H, pol.action_dim, generator=g)
    prefix = torch.zeros(1, 3, pol.action_dim)
    prefix[..., :D_REAL] = torch.tensor([[0.3, -0.2, 0.7], [0.35, -0.25, 0.6], [0.4, -0.3, 0.5]])
    out = sample_with_prefix(pol, ctx, prefix, 3, num_steps=10, noise=noise)
    assert out.shape == (1, H, pol.action_dim)
    torch.testing.assert_close(out[:, :3], prefix, atol=1e-6, rtol=0)
    free = pol.sample(ctx, num_steps=10, noise=noise)
    assert not torch.allclose(free[:, :3], prefix, atol=1e-3)  # the prefix is not what the policy does alone
    assert (out[:, 3:, :D_REAL] - free[:, 3:, :D_REAL]).abs().max() > 1e-4  # the rest is generated against it
    # a [P, D] prefix is broadcast over the batch; prefix_len < P with hard weights ignores the tail
    out2 = sample_with_prefix(pol, ctx, prefix[0], 2, num_steps=10, noise=noise)
    torch.testing.assert_close(out2[:, :2], prefix[:, :2], atol=1e-6, rtol=0)


def test_prefix_len_zero_is_bit_identical_to_sample() -> None:
    pol = state_policy(2)
    ctx = context(pol)
    noise = torch.randn(1, H, pol.action_dim, generator=torch.Generator().manual_seed(3))
    ref = pol.sample(ctx, num_steps=7, noise=noise)
    for prefix in (torch.zeros(1, 0, pol.action_dim), torch.ones(1, 4, pol.action_dim)):
        out = sample_with_prefix(pol, ctx, prefix, 0, num_steps=7, noise=noise, weights="hard")
        assert torch.equal(out, ref)


def test_exp_weights_hold_the_hard_part_and_pull_the_soft_part() -> None:
    pol = state_policy(4)
    ctx = context(pol)
    noise = torch.randn(1, H, pol.action_dim, generator=torch.Generator().manual_seed(5))
    prefix = torch.zeros(1, 6, pol.action_dim)
    prefix[..., :D_REAL] = 0.8
    hard = sample_with_prefix(pol, ctx, prefix, 2, noise=noise, weights="hard")
    soft = sample_with_prefix(pol, ctx, prefix, 2, noise=noise, weights="exp")
    torch.testing.assert_close(soft[:, :2], prefix[:, :2], atol=1e-6, rtol=0)
    # step 2 has the largest soft weight (~0.7): pulled toward the prefix compared with hard-only inpainting
    d_soft = (soft[0, 2, :D_REAL] - 0.8).abs().mean()
    d_hard = (hard[0, 2, :D_REAL] - 0.8).abs().mean()
    assert d_soft < d_hard


def test_bad_prefix_is_refused() -> None:
    pol = state_policy()
    ctx = context(pol)
    with pytest.raises(ValueError, match="prefix shape"):
        sample_with_prefix(pol, ctx, torch.zeros(1, H + 1, pol.action_dim), 1)
    with pytest.raises(ValueError, match="prefix shape"):
        sample_with_prefix(pol, ctx, torch.zeros(1, 2, D_REAL), 1)
    with pytest.raises(ValueError, match="prefix_len"):
        sample_with_prefix(pol, ctx, torch.zeros(1, 2, pol.action_dim), 3)
    with pytest.raises(ValueError, match="NaN"):
        sample_with_prefix(pol, ctx, torch.full((1, 2, pol.action_dim), float("nan")), 1)


def test_pi05_tiny_hard_inpainting() -> None:
    torch.manual_seed(0)
    pol = make_policy("pi05-tiny", NormStats.identity(4, D_REAL), tasks=["push"], state_dim=4,
                      real_action_dim=D_REAL, camera_names=["front"]).eval()
    obs = {"images": {"front": np.zeros((32, 32, 3), np.uint8)}, "state": np.zeros(4), "prompt": "push"}
    ctx = pol.encode(pol.preprocess([obs]))
    noise = torch.randn(1, pol.horizon, pol.action_dim, generator=torch.Generator().manual_seed(0))
    prefix = torch.zeros(1, 2, pol.action_dim)
    prefix[..., :D_REAL] = 0.5
    out = sample_with_prefix(pol, ctx, prefix, 2, num_steps=3, noise=noise)
    torch.testing.assert_close(out[:, :2], prefix, atol=1e-6, rtol=0)
    assert torch.equal(sample_with_prefix(pol, ctx, prefix, 0, num_steps=3, noise=noise),
                       pol.sample(ctx, num_steps=3, noise=noise))


def test_backend_prefix_in_robot_units() -> None:
    rng = np.random.default_rng(0)
    stats = NormStats.compute(rng.normal(size=(50, 4)), rng.normal([0.5, -1.0, 0.02], [0.3, 0.5, 0.01], (50, 3)))
    pol = state_policy(6, stats)
    be = FlowPolicyBackend(pol, ["j1", "j2", "gripper"], dt=0.1, num_steps=5, seed=0)
    obs = {"state": np.zeros(4), "stamp": 3.0, "prompt": "x"}
    committed = np.array([[0.6, -0.9, 0.025], [0.62, -0.95, 0.024], [0.64, -1.0, 0.023]])
    chunk = be.infer(obs, prefix=committed)
    assert chunk.positions.shape == (H, 3) and chunk.stamp == 3.0
    np.testing.assert_allclose(chunk.positions[:3], committed, atol=1e-5)
    plain = FlowPolicyBackend(pol, ["j1", "j2", "gripper"], dt=0.1, num_steps=5, seed=0).infer(obs)
    assert np.abs(plain.positions[:3] - committed).max() > 1e-3
    soft = FlowPolicyBackend(pol, ["j1", "j2", "gripper"], dt=0.1, num_steps=5, seed=0).infer(
        obs, prefix=committed, prefix_len=1, weights="exp")
    np.testing.assert_allclose(soft.positions[:1], committed[:1], atol=1e-5)
    with pytest.raises(ValueError, match="prefix shape"):
        be.infer(obs, prefix=np.zeros((H + 1, 3)))
    with pytest.raises(ValueError, match="actions"):
        be.infer(obs, prefix=np.zeros((2, 2)))
