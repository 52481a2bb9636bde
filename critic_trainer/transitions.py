"""Frame-level replay-buffer columns -> chunk-level critic transitions (METHOD.md §3).

Buffer semantics (LeRobotDataset v3 + RL fields, see DESIGN.md): frame i holds observation o_i, the executed
action a_i (robot units; the caller normalises), next.reward r_i received after a_i and next.done d_i (the
episode terminated after a_i). A chunk transition starting at frame i covers the n = n_exec executed steps
i .. i+n-1:
    critic action A = normalised a_i .. a_{i+n-1} flattened [n * real_action_dim],
    rewards [n] = r_i .. (zero after a terminal step), done = a terminal step inside the window,
    n_steps = steps actually executed (<= n), s' = frame i+n (only meaningful when not done),
    mc_return = sum_{j >= i} gamma^(j-i) r_j to the end of the episode (per-step discount).
In an episode that did NOT terminate (time-out, operator stop) a window whose s' = frame i+n lies past the
episode's last frame has no s' and is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ChunkTransitions:
    """M chunk transitions; `index`/`next_index` are frame rows of s and s' (next_index = index when done)."""

    index: np.ndarray  # int64 [M]
    next_index: np.ndarray  # int64 [M]
    actions: np.ndarray  # float32 [M, n * real_action_dim], normalised
    rewards: np.ndarray  # float32 [M, n]
    done: np.ndarray  # float32 [M]
    n_steps: np.ndarray  # int64 [M]
    mc_return: np.ndarray  # float32 [M]

    def __len__(self) -> int:
        return int(self.index.shape[0])


def monte_carlo_returns(episode_index: np.ndarray, reward: np.ndarray, gamma: float) -> np.ndarray:
    """Discounted return-to-go per frame, float64 [T]; frames of one episode must be contiguous and in order."""
    g = np.zeros(reward.shape[0], dtype=np.float64)
    running = 0.0
    for i in range(reward.shape[0] - 1, -1, -1):
        if i == reward.shape[0] - 1 or episode_index[i + 1] != episode_index[i]:
            running = 0.0
        running = float(reward[i]) + gamma * running
        g[i] = running
    return g


def chunk_transitions(episode_index: np.ndarray, actions: np.ndarray, reward: np.ndarray, done: np.ndarray,
                      n_exec: int, gamma: float, stride: int = 1) -> ChunkTransitions:
    """Build chunk transitions from frame columns.

    episode_index int [T] (contiguous episodes, frames in order), actions float [T, real_action_dim]
    normalised, reward float [T] (next.reward), done bool [T] (next.done). A window starts every `stride`
    frames. Raises ValueError on an empty buffer, mismatched lengths, non-finite values or a frame after a
    terminal step inside the same episode.
    """
    episode_index = np.asarray(episode_index)
    actions = np.asarray(actions, dtype=np.float32)
    reward = np.asarray(reward, dtype=np.float64)
    done = np.asarray(done).astype(bool)
    t = episode_index.shape[0]
    if t == 0:
        raise ValueError("the replay buffer is empty")
    if actions.ndim != 2 or actions.shape[0] != t or reward.shape != (t,) or done.shape != (t,):
        raise ValueError(f"column shapes disagree: episode_index {episode_index.shape}, actions {actions.shape}, "
                         f"reward {reward.shape}, done {done.shape}")
    if not (np.all(np.isfinite(actions)) and np.all(np.isfinite(reward))):
        raise ValueError("actions or rewards contain NaN/inf")
    if n_exec < 1 or stride < 1:
        raise ValueError("n_exec and stride must be >= 1")
    starts = np.flatnonzero(np.r_[True, episode_index[1:] != episode_index[:-1]])
    ends = np.r_[starts[1:], t]  # exclusive
    if len(np.unique(episode_index[starts])) != len(starts):
        raise ValueError("frames of each episode must be contiguous")
    for s, e in zip(starts, ends, strict=True):
        term = np.flatnonzero(done[s:e])
        if term.size and term[0] != e - s - 1:
            raise ValueError(f"episode {episode_index[s]}: frames continue after a terminal step")
    mc = monte_carlo_returns(episode_index, reward, gamma)
    real = actions.shape[1]
    idx, nxt, acts, rews, dn, ns, ret = [], [], [], [], [], [], []
    for s, e in zip(starts, ends, strict=True):
        for i in range(s, e, stride):
            steps = min(n_exec, e - i)
            terminal = bool(done[i:i + steps].any())
            if not terminal and i + n_exec >= e:
                continue  # the episode stopped without terminating: s' = frame i+n is not in it
            a = np.zeros((n_exec, real), dtype=np.float32)
            a[:steps] = actions[i:i + steps]
            a[steps:] = actions[i + steps - 1]  # hold the last action after a terminal step
            r = np.zeros(n_exec, dtype=np.float32)
            r[:steps] = reward[i:i + steps]
            idx.append(i)
            nxt.append(i if terminal else i + n_exec)
            acts.append(a.reshape(-1))
            rews.append(r)
            dn.append(float(terminal))
            ns.append(steps)
            ret.append(mc[i])
    if not idx:
        raise ValueError(f"no chunk transitions: every episode is shorter than n_exec={n_exec} and not terminal")
    return ChunkTransitions(index=np.asarray(idx, dtype=np.int64), next_index=np.asarray(nxt, dtype=np.int64),
                            actions=np.stack(acts), rewards=np.stack(rews), done=np.asarray(dn, dtype=np.float32),
                            n_steps=np.asarray(ns, dtype=np.int64), mc_return=np.asarray(ret, dtype=np.float32))


def critic_batch(features, transitions: ChunkTransitions, rows: np.ndarray, device: str | None = None):
    """Gather a CriticBatch for transition rows [b] from frame-level features.

    features: mapping (e.g. a FeatureCache) with "z_rl" [T, F], optional "proprio" [T, P] and
    "ref_actions" [T, S, n_exec * real] (frozen reference-policy critic actions sampled once per frame).
    For terminal transitions s' = s, so the "a_ref(s')" samples of the Cal-QL term are those at s.
    """
    import torch

    from critic_trainer.critic import CriticBatch

    def col(name: str, frames: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(features[name][frames]), device=device)

    def has(name: str) -> bool:
        try:
            features[name]
        except KeyError:
            return False
        return True

    i, j = transitions.index[rows], transitions.next_index[rows]
    proprio = has("proprio")
    ref = has("ref_actions")

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, device=device)

    return CriticBatch(
        z=col("z_rl", i), p=col("proprio", i) if proprio else None, actions=t(transitions.actions[rows]),
        rewards=t(transitions.rewards[rows]), done=t(transitions.done[rows]), z_next=col("z_rl", j),
        p_next=col("proprio", j) if proprio else None, mc_return=t(transitions.mc_return[rows]),
        ref_actions=col("ref_actions", i) if ref else None, ref_next_actions=col("ref_actions", j) if ref else None,
        n_steps=t(transitions.n_steps[rows]))
