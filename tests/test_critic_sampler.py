"""critic_trainer.fit.batch_sampler: uniform critic batches by default, or a fixed share of every batch from the
emphasised transitions (the loop: the policy's own rollouts next to many scripted demos)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from critic_trainer.critic import CriticConfig, CriticTrainConfig, CriticTrainer, QEnsemble
from critic_trainer.fit import batch_sampler, fit_critic
from critic_trainer.transitions import ChunkTransitions


def test_uniform_is_the_old_sampler() -> None:
    """fraction 0 (or no mask) draws exactly what the uniform sampler drew before: same rows for the same seed."""
    a = batch_sampler(100, 32, np.random.default_rng(3))()
    b = np.random.default_rng(3).integers(0, 100, size=32)
    assert np.array_equal(a, b)
    mask = np.zeros(100, bool)
    mask[:5] = True
    assert np.array_equal(batch_sampler(100, 32, np.random.default_rng(3), mask, 0.0)(), b)


def test_fraction_of_every_batch_comes_from_the_emphasised_rows() -> None:
    mask = np.zeros(1000, bool)
    mask[990:] = True  # 1 % of the transitions, e.g. the few rollouts beside many demos
    sample = batch_sampler(1000, 256, np.random.default_rng(0), mask, 0.5)
    for _ in range(20):
        rows = sample()
        assert rows.shape == (256,) and rows.min() >= 0 and rows.max() < 1000
        assert int(mask[rows].sum()) == 128  # exactly round(0.5 * 256), not ~1 % as uniform sampling gives
    seen = np.concatenate([sample() for _ in range(50)])
    assert set(np.flatnonzero(mask)) <= set(seen.tolist())  # every emphasised row gets drawn
    assert len(set(seen[~mask[seen]].tolist())) > 500  # and the rest still covers the other rows


def test_one_group_empty_falls_back_to_uniform_and_bad_settings_are_refused() -> None:
    rng = np.random.default_rng(1)
    for mask in (np.zeros(50, bool), np.ones(50, bool)):
        rows = batch_sampler(50, 64, rng, mask, 0.5)()
        assert rows.shape == (50,)  # batch = min(batch_size, n), like the uniform sampler
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        batch_sampler(50, 16, rng, np.zeros(50, bool), 1.0)
    with pytest.raises(ValueError, match="entries"):
        batch_sampler(50, 16, rng, np.zeros(49, bool), 0.5)


def rare_outcome_fit(fraction: float) -> float:
    """Fit a real critic (Cal-QL, 150 updates of 32) on 400 successful one-step transitions (reward 1) and 20 failed
    ones (reward 0, recognisable states); returns the mean |Q - return| over the failed ones."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    m, f, a_dim = 420, 8, 4
    fail = np.zeros(m, bool)
    fail[400:] = True
    z = rng.normal(size=(m, f)).astype(np.float32)
    z[fail, 0] += 3.0
    ret = np.where(fail, 0.0, 1.0).astype(np.float32)
    feats = {"z_rl": z, "proprio": np.zeros((m, 2), np.float32),
             "ref_actions": rng.uniform(-1, 1, (m, 2, a_dim)).astype(np.float32)}
    idx = np.arange(m)
    tr = ChunkTransitions(index=idx, next_index=idx, actions=rng.uniform(-1, 1, (m, a_dim)).astype(np.float32),
                          rewards=ret[:, None].copy(), done=np.ones(m, np.float32), n_steps=np.ones(m, np.int64),
                          mc_return=ret)
    critic = QEnsemble(CriticConfig(feature_dim=f, proprio_dim=2, n_exec=1, real_action_dim=a_dim, num_q=2,
                                    hidden=(32, 32)))
    trainer = CriticTrainer(critic, CriticTrainConfig(reg_weight=0.1, lr=3e-3))
    hist = fit_critic(trainer, feats, tr, steps=150, batch_size=32, emphasis=fail, emphasis_fraction=fraction)
    assert len(hist) == 150 and all(np.isfinite(h["loss"]) for h in hist)
    with torch.no_grad():
        q = critic(torch.as_tensor(z), torch.zeros(m, 2), torch.as_tensor(tr.actions)).mean(0).numpy()
    return float(np.abs(q[fail] - ret[fail]).mean())


def test_emphasis_fits_the_rare_outcome_better() -> None:
    """The knob works in a real fit: with half of every batch from the 5 % rare (failed) transitions, their Q is
    closer to their return than with uniform batches after the same number of updates."""
    torch.set_num_threads(1)
    uniform, emphasised = rare_outcome_fit(0.0), rare_outcome_fit(0.5)
    assert emphasised < 0.75 * uniform, (emphasised, uniform)
