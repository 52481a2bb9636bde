"""The critic's within-state contrast term (critic_trainer.critic.contrast_loss) and its batches of branch groups
(critic_trainer.fit.fit_critic(groups=...)): by hand, invariances, and in a real fit."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from critic_trainer.critic import CriticConfig, CriticTrainConfig, CriticTrainer, QEnsemble, contrast_loss
from critic_trainer.fit import fit_critic
from critic_trainer.transitions import ChunkTransitions

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_contrast_loss_by_hand_and_blind_to_state_offsets() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 7, generator=g, dtype=torch.float64)
    ret = torch.rand(7, generator=g, dtype=torch.float64)
    group = torch.tensor([0, 0, 0, -1, 1, 1, -1])
    pairs = [(i, j) for i, j in itertools.permutations(range(7), 2) if group[i] == group[j] >= 0]
    assert len(pairs) == 3 * 2 + 2
    want = sum(sum(((q[n, i] - q[n, j]) - (ret[i] - ret[j])) ** 2 for i, j in pairs) / len(pairs) for n in range(2))
    assert contrast_loss(q, ret, group).item() == pytest.approx(want.item(), rel=1e-12)
    # a per-state constant added to Q or to the returns (the state value) changes nothing: only contrasts count
    shift = torch.tensor([5.0, 5.0, 5.0, 9.0, -3.0, -3.0, 1.0], dtype=torch.float64)
    assert contrast_loss(q + shift, ret, group).item() == pytest.approx(want.item(), rel=1e-9)
    assert contrast_loss(q, ret - shift, group).item() == pytest.approx(want.item(), rel=1e-9)
    assert contrast_loss(q, ret, torch.tensor([0, 1, 2, -1, -1, 3, 4])) is None  # no pair: no term


def grouped_problem(states: int = 48, per: int = 6, a_dim: int = 6, seed: int = 0):
    """Terminal one-chunk transitions, `per` actions at each of `states` states (a branch group each): the return
    is a large per-state value (std 3) plus a small action effect 0.5 a0 - 0.3 a1 (the ranking to learn)."""
    rng = np.random.default_rng(seed)
    z = np.repeat(rng.normal(size=(states, 8)), per, axis=0).astype(np.float32)
    a = rng.uniform(-1, 1, (states * per, a_dim)).astype(np.float32)
    effect = 0.5 * a[:, 0] - 0.3 * a[:, 1]
    ret = (np.repeat(3.0 * rng.normal(size=states), per) + effect).astype(np.float32)
    m = states * per
    idx = np.arange(m)
    tr = ChunkTransitions(index=idx, next_index=idx, actions=a, rewards=ret[:, None].copy(),
                          done=np.ones(m, np.float32), n_steps=np.ones(m, np.int64), mc_return=ret)
    feats = {"z_rl": z, "ref_actions": np.repeat(a[:, None], 2, axis=1)}
    return feats, tr, np.repeat(np.arange(states), per), effect


def within_state_rank_corr(q: np.ndarray, effect: np.ndarray, per: int) -> float:
    """Mean over states of Spearman(Q, true effect) among that state's actions."""
    def ranks(x: np.ndarray) -> np.ndarray:
        r = np.argsort(np.argsort(x.reshape(-1, per), axis=1), axis=1).astype(float)
        return r - r.mean(1, keepdims=True)
    rq, re = ranks(q), ranks(effect)
    return float(((rq * re).sum(1) / np.sqrt((rq ** 2).sum(1) * (re ** 2).sum(1))).mean())


def fit(weight: float) -> float:
    feats, tr, groups, effect = grouped_problem()
    torch.manual_seed(0)
    critic = QEnsemble(CriticConfig(feature_dim=8, proprio_dim=0, n_exec=2, real_action_dim=3, hidden=(64, 64)))
    trainer = CriticTrainer(critic, CriticTrainConfig(reg_weight=0.0, lr=1e-3, contrast_weight=weight))
    # the same rows per update either way: 24 uniform + 4 whole groups of 6, or 48 uniform
    kw = {"groups": groups, "groups_per_batch": 4, "batch_size": 24} if weight else {"batch_size": 48}
    hist = fit_critic(trainer, feats, tr, steps=250, seed=0, **kw)
    assert all(("contrast" in h) == bool(weight) for h in hist)  # every batch carried whole groups
    with torch.no_grad():
        q = critic(torch.as_tensor(feats["z_rl"]), None, torch.as_tensor(tr.actions)).mean(0).numpy()
    return within_state_rank_corr(q, effect, 6)


def test_contrast_term_learns_the_within_state_ranking_that_td_is_slow_to_see() -> None:
    """The state value dominates the returns (std 3 against an action effect of ~0.3): after the same updates on
    the same number of rows, the critic with the contrast term ranks each state's actions better than TD alone."""
    td_only, with_contrast = fit(0.0), fit(1.0)
    assert with_contrast > 0.7 and with_contrast > td_only + 0.2, (with_contrast, td_only)  # 0.78 vs 0.43 (seed 0)


def test_group_batches_are_checked() -> None:
    feats, tr, groups, _ = grouped_problem(states=4, per=3)
    critic = QEnsemble(CriticConfig(feature_dim=8, proprio_dim=0, n_exec=2, real_action_dim=3, hidden=(16,)))
    trainer = CriticTrainer(critic, CriticTrainConfig(contrast_weight=1.0))
    with pytest.raises(ValueError, match="one id per transition"):
        fit_critic(trainer, feats, tr, steps=1, groups=groups[:-1])
    with pytest.raises(ValueError, match="groups_per_batch"):
        fit_critic(trainer, feats, tr, steps=1, groups=groups, groups_per_batch=0)
    with pytest.raises(ValueError, match="contrast_weight"):
        CriticTrainer(critic, CriticTrainConfig(contrast_weight=float("nan")))
    # singletons (a group cut to one transition) never form a pair; all-singleton groups give no contrast
    hist = fit_critic(trainer, feats, tr, steps=2, groups=np.arange(len(groups)))
    assert all("contrast" not in h for h in hist)
