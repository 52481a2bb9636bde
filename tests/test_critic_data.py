"""Chunk transitions from frame columns (by hand) and the memory-mapped critic feature cache (real files)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from critic_trainer.critic import CriticConfig, CriticTrainConfig, CriticTrainer, QEnsemble
from critic_trainer.features import FeatureCache, FeatureCacheError
from critic_trainer.transitions import chunk_transitions, critic_batch, monte_carlo_returns


def two_episodes():
    """Episode 0: 5 frames, success reward 1 on the terminal last frame. Episode 1: 4 frames, time-out."""
    ep = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])
    actions = np.arange(18, dtype=np.float32).reshape(9, 2) / 100
    reward = np.array([0, 0, 0, 0, 1, 0, 0.5, 0, 0], dtype=np.float32)
    done = np.array([0, 0, 0, 0, 1, 0, 0, 0, 0], dtype=bool)
    return ep, actions, reward, done


def test_monte_carlo_returns_by_hand():
    ep, _, reward, _ = two_episodes()
    g = monte_carlo_returns(ep, reward, 0.5)
    np.testing.assert_allclose(g, [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 0.25, 0.5, 0, 0])


def test_chunk_transitions_by_hand():
    ep, actions, reward, done = two_episodes()
    tr = chunk_transitions(ep, actions, reward, done, n_exec=2, gamma=0.5)
    # ep 0: starts 0..4 (3 full, frame 3 ends on the terminal, frame 4 is the terminal alone);
    # ep 1 (frames 5-8, not terminal): starts 5, 6; starts 7 and 8 have no s' inside the episode: dropped
    assert tr.index.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert tr.next_index.tolist() == [2, 3, 4, 3, 4, 7, 8]
    assert tr.done.tolist() == [0, 0, 0, 1, 1, 0, 0]
    assert tr.n_steps.tolist() == [2, 2, 2, 2, 1, 2, 2]
    np.testing.assert_allclose(tr.rewards[3], [0, 1])
    np.testing.assert_allclose(tr.rewards[4], [1, 0])  # zero after the terminal step
    np.testing.assert_allclose(tr.rewards[6], [0.5, 0])
    np.testing.assert_allclose(tr.actions[0], [0.00, 0.01, 0.02, 0.03])
    np.testing.assert_allclose(tr.actions[4], [0.08, 0.09, 0.08, 0.09])  # last action held after the end
    np.testing.assert_allclose(tr.mc_return, [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 0.25, 0.5])
    assert chunk_transitions(ep, actions, reward, done, n_exec=2, gamma=0.5, stride=2).index.tolist() == [0, 2, 4, 5]
    assert tr.next_index.max() < len(ep)


def test_chunk_transitions_bad_input():
    ep, actions, reward, done = two_episodes()
    with pytest.raises(ValueError, match="empty"):
        chunk_transitions(ep[:0], actions[:0], reward[:0], done[:0], 2, 0.9)
    with pytest.raises(ValueError, match="shapes"):
        chunk_transitions(ep, actions[:-1], reward, done, 2, 0.9)
    bad = reward.copy()
    bad[2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        chunk_transitions(ep, actions, bad, done, 2, 0.9)
    with pytest.raises(ValueError, match="contiguous"):
        chunk_transitions(np.array([0, 1, 0]), actions[:3], reward[:3], done[:3], 1, 0.9)
    early = done.copy()
    early[1] = True
    with pytest.raises(ValueError, match="after a terminal"):
        chunk_transitions(ep, actions, reward, early, 2, 0.9)
    with pytest.raises(ValueError, match="no chunk transitions"):
        chunk_transitions(ep[5:], actions[5:], reward[5:], done[5:], n_exec=8, gamma=0.9)


def test_feature_cache_roundtrip_stale_corrupt(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"z_rl": rng.standard_normal((9, 4)).astype(np.float32),
              "proprio": rng.standard_normal((9, 3)).astype(np.float32)}
    path = tmp_path / "features"
    cache = FeatureCache.write(path, "sha-A", arrays)
    assert isinstance(cache["z_rl"], np.memmap) and not cache["z_rl"].flags.writeable
    np.testing.assert_array_equal(cache["proprio"], arrays["proprio"])
    assert cache.fields == ["proprio", "z_rl"] and cache.num_rows == 9
    with pytest.raises(KeyError):
        cache["nope"]
    assert not list(tmp_path.glob(".features.*"))  # no temporary directory left behind
    # a new encoder (other key) makes it stale
    with pytest.raises(FeatureCacheError, match="stale"):
        FeatureCache.open(path, "sha-B")
    # flip one byte of the data: corrupt
    f = path / "z_rl.npy"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(FeatureCacheError, match="sha256"):
        FeatureCache.open(path, "sha-A")
    # rebuild on corruption, then plain reuse
    built = []
    cache, reason = FeatureCache.load_or_build(path, "sha-A", lambda: built.append(1) or arrays)
    assert built == [1] and "sha256" in reason
    np.testing.assert_array_equal(cache["z_rl"], arrays["z_rl"])
    cache, reason = FeatureCache.load_or_build(path, "sha-A", lambda: built.append(1) or arrays)
    assert reason is None and built == [1]
    # garbage meta, truncated file, missing cache
    (path / "meta.json").write_text("{not json")
    with pytest.raises(FeatureCacheError, match="meta.json"):
        FeatureCache.open(path, "sha-A")
    FeatureCache.write(path, "sha-A", arrays)
    meta = json.loads((path / "meta.json").read_text())
    (path / "proprio.npy").write_bytes((path / "proprio.npy").read_bytes()[:100])
    with pytest.raises(FeatureCacheError, match="corrupt"):
        FeatureCache.open(path, "sha-A", verify=False)
    assert meta["key"] == "sha-A"
    with pytest.raises(FeatureCacheError, match="no feature cache"):
        FeatureCache.open(tmp_path / "absent", "sha-A")
    with pytest.raises(FeatureCacheError):
        FeatureCache.write(tmp_path / "x", "k", {"a": np.zeros((3, 2)), "b": np.zeros((4, 2))})
    with pytest.raises(FeatureCacheError):
        FeatureCache.write(tmp_path / "x", "k", {"a": np.full((3, 2), np.nan)})


def test_cache_to_critic_update_end_to_end(tmp_path):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ep, actions, reward, done = two_episodes()
    tr = chunk_transitions(ep, actions, reward, done, n_exec=2, gamma=0.9)
    rng = np.random.default_rng(1)
    feats = {"z_rl": rng.standard_normal((9, 4)).astype(np.float32),
             "proprio": rng.standard_normal((9, 3)).astype(np.float32),
             "ref_actions": rng.uniform(-1, 1, (9, 5, 4)).astype(np.float32)}
    cache = FeatureCache.write(tmp_path / "f", "sha", feats)
    batch = critic_batch(cache, tr, np.array([0, 3, 6, 4]))
    assert batch.z.shape == (4, 4) and batch.ref_next_actions.shape == (4, 5, 4)
    torch.testing.assert_close(batch.z_next[0], torch.from_numpy(feats["z_rl"][2]))
    torch.testing.assert_close(batch.z_next[1], batch.z[1])  # terminal: s' = s
    critic = QEnsemble(CriticConfig(feature_dim=4, proprio_dim=3, n_exec=2, real_action_dim=2, hidden=(16,)))
    trainer = CriticTrainer(critic, CriticTrainConfig(gamma=0.9))
    metrics = [trainer.update(critic_batch(cache, tr, np.arange(len(tr)))) for _ in range(3)]
    assert all(np.isfinite(m["loss"]) for m in metrics)


def test_fit_critic_from_frames_to_monte_carlo_returns(tmp_path):
    """Frame-level episodes -> transitions -> feature cache on disk -> fitted critic that tracks MC returns."""
    from critic_trainer.critic import critic_action
    from critic_trainer.fit import evaluate_critic, fit_critic, grad_a_check

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    episodes, length, n, real, gamma = 24, 8, 2, 2, 0.95
    goals = rng.standard_normal((episodes, 3)).astype(np.float32)
    ep = np.repeat(np.arange(episodes), length)
    step = np.tile(np.arange(length), episodes)
    actions = rng.uniform(-1, 1, (episodes * length, real)).astype(np.float32)
    reward = np.where((step == length - 1) & (goals[ep, 0] > 0), 1.0, 0.0).astype(np.float32)
    done = step == length - 1
    tr = chunk_transitions(ep, actions, reward, done, n_exec=n, gamma=gamma)
    z = np.concatenate([goals[ep], (step / length)[:, None].astype(np.float32)], axis=1)
    # reference samples per frame: the behaviour's own next n actions, jittered
    own = np.stack([actions[np.minimum(i + np.arange(n), (ep[i] + 1) * length - 1)].reshape(-1)
                    for i in range(len(ep))])
    ref = np.clip(own[:, None] + 0.2 * rng.standard_normal((len(ep), 4, n * real)), -1, 1).astype(np.float32)
    cache = FeatureCache.write(tmp_path / "f", "sha-enc", {"z_rl": z, "ref_actions": ref})
    critic = QEnsemble(CriticConfig(feature_dim=4, proprio_dim=0, n_exec=n, real_action_dim=real, hidden=(64, 64)))
    before = evaluate_critic(critic, cache, tr)
    trainer = CriticTrainer(critic, CriticTrainConfig(gamma=gamma, reg_weight=0.0, target_tau=0.05, lr=3e-3))
    logged = []
    history = fit_critic(trainer, cache, tr, steps=300, batch_size=64, log=lambda s, m: logged.append(s))
    after = evaluate_critic(critic, cache, tr)
    assert len(history) == 300 and logged[-1] == 299
    assert after["mc_corr"] > 0.85 and after["mc_mae"] < 0.5 * before["mc_mae"], (before, after)
    assert "q_ref" in after and after["ensemble_std"] >= 0
    b = critic_batch(cache, tr, np.arange(6))
    assert grad_a_check(critic, b.z, b.p, b.actions) < 1e-5
    assert critic_action(torch.zeros(1, 3, 2), n, real).shape == (1, 4)


def test_fit_refuses_unlearnable_data(tmp_path):
    from critic_trainer.fit import check_training_data, fit_critic

    ep, actions, reward, done = two_episodes()
    tr = chunk_transitions(ep, actions, reward, done, n_exec=2, gamma=0.9)
    critic = QEnsemble(CriticConfig(feature_dim=4, proprio_dim=0, n_exec=2, real_action_dim=2, hidden=(8,)))
    check_training_data(critic, tr)  # fine: returns vary
    wrong = QEnsemble(CriticConfig(feature_dim=4, proprio_dim=0, n_exec=2, real_action_dim=7, hidden=(8,)))
    with pytest.raises(ValueError, match="action space"):
        check_training_data(wrong, tr)
    no_success = chunk_transitions(ep, actions, np.zeros_like(reward), done, n_exec=2, gamma=0.9)
    with pytest.raises(ValueError, match="both"):
        fit_critic(CriticTrainer(critic), {"z_rl": np.zeros((9, 4), np.float32)}, no_success, steps=1)
