"""Critic fitting loop over cached features, its evaluation, and the pre-actor sanity checks of METHOD.md §3.

Works on frame-level features (a FeatureCache or any mapping with "z_rl", optional "proprio", "ref_actions")
and ChunkTransitions; never touches images. Actions are normalised critic actions [.., n_exec * real].
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import numpy as np
import torch

from critic_trainer.critic import CriticTrainer, QEnsemble
from critic_trainer.transitions import ChunkTransitions, critic_batch


def check_training_data(critic: QEnsemble, transitions: ChunkTransitions) -> None:
    """Refuse data the critic cannot learn from: no transitions, another action space, or returns that never
    vary (only successes or only failures: nothing to rank). Raises ValueError with the reason.
    """
    if len(transitions) == 0:
        raise ValueError("no transitions to fit the critic on")
    if transitions.actions.shape[1] != critic.cfg.action_dim:
        raise ValueError(f"buffer actions have {transitions.actions.shape[1]} critic coordinates, the critic expects "
                         f"{critic.cfg.action_dim} = n_exec {critic.cfg.n_exec} x real {critic.cfg.real_action_dim}: "
                         "incompatible action space or n_exec")
    mc = transitions.mc_return
    if float(np.max(mc) - np.min(mc)) == 0.0:
        raise ValueError(f"every transition has the same Monte-Carlo return ({float(mc[0])}): the buffer needs both "
                         "successful and failed episodes")


def batch_sampler(n: int, batch_size: int, rng: np.random.Generator, emphasis: np.ndarray | None = None,
                  fraction: float = 0.0) -> Callable[[], np.ndarray]:
    """Row sampler for critic batches over n transitions: uniform with replacement, or, with a bool mask
    `emphasis` [n] and 0 < fraction < 1, exactly round(fraction * B) rows per batch drawn uniformly from the
    emphasised transitions (e.g. the policy's own rollouts, where the outcome information is) and the rest from
    the others. Falls back to uniform when either group is empty. B = min(batch_size, n)."""
    b = min(batch_size, n)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the emphasised fraction of a critic batch must be in [0, 1), got {fraction}")
    if emphasis is not None and len(emphasis) != n:
        raise ValueError(f"emphasis mask has {len(emphasis)} entries for {n} transitions")
    if emphasis is None or fraction <= 0.0 or emphasis.all() or not emphasis.any():
        return lambda: rng.integers(0, n, size=b)
    hot, cold = np.flatnonzero(emphasis), np.flatnonzero(~emphasis)
    k = min(b, max(1, int(round(fraction * b))))
    return lambda: np.concatenate([hot[rng.integers(0, len(hot), size=k)],
                                   cold[rng.integers(0, len(cold), size=b - k)]])


def fit_critic(trainer: CriticTrainer, features: Mapping[str, np.ndarray], transitions: ChunkTransitions,
               steps: int, batch_size: int = 256, seed: int = 0, device: str | None = None,
               log: Callable[[int, dict[str, float]], None] | None = None, emphasis: np.ndarray | None = None,
               emphasis_fraction: float = 0.0, groups: np.ndarray | None = None,
               groups_per_batch: int = 16) -> list[dict[str, float]]:
    """Run `steps` critic updates on sampled transitions (batch_sampler: uniform, or `emphasis_fraction` of every
    batch from the transitions where the bool mask `emphasis` [M] is True); returns the per-step metrics.

    groups int [M] (transition_groups: same-state transitions share an id >= 0, else -1): every batch also gets
    all members of `groups_per_batch` groups drawn uniformly, labelled for the trainer's contrast term
    (CriticTrainConfig.contrast_weight); the uniform part is labelled -1.

    Raises FloatingPointError (from CriticTrainer.update) on a non-finite loss or gradient: the critic is left
    as it was before that step.
    """
    check_training_data(trainer.critic, transitions)
    rng = np.random.default_rng(seed)
    sample = batch_sampler(len(transitions), batch_size, rng, emphasis, emphasis_fraction)
    members: list[np.ndarray] = []
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != (len(transitions),):
            raise ValueError(f"groups has shape {groups.shape}, expected ({len(transitions)},): one id per transition")
        order = np.flatnonzero(groups >= 0)
        order = order[np.argsort(groups[order], kind="stable")]
        _, first = np.unique(groups[order], return_index=True)
        members = [m for m in np.split(order, first[1:]) if len(m) >= 2]
        if groups_per_batch < 1:
            raise ValueError(f"groups_per_batch must be >= 1, got {groups_per_batch}")
    history = []
    for step in range(steps):
        rows = sample()
        label = None
        if members:
            pick = rng.integers(0, len(members), size=min(groups_per_batch, len(members)))
            extra = [members[k] for k in pick]
            label = np.concatenate([np.full(len(rows), -1, dtype=np.int64),
                                    *[np.full(len(m), n, dtype=np.int64) for n, m in enumerate(extra)]])
            rows = np.concatenate([rows, *extra])
        batch = critic_batch(features, transitions, rows, device=device)
        if label is not None:
            batch.group = torch.as_tensor(label, device=device)
        metrics = trainer.update(batch)
        history.append(metrics)
        if log is not None:
            log(step, metrics)
    return history


@torch.no_grad()
def evaluate_critic(critic: QEnsemble, features: Mapping[str, np.ndarray], transitions: ChunkTransitions,
                    batch_size: int = 4096, device: str | None = None) -> dict[str, float]:
    """Q of data vs reference-policy actions and agreement with the Monte-Carlo returns, over all transitions.

    Returns q_data, q_ref (mean over ensemble and samples), mc_return (mean), mc_mae, mc_corr (Pearson of
    ensemble-mean Q(s, a_data) with the MC return; nan if either is constant) and ensemble_std.
    """
    q_data, q_ref, std = [], [], []
    for start in range(0, len(transitions), batch_size):
        rows = np.arange(start, min(start + batch_size, len(transitions)))
        b = critic_batch(features, transitions, rows, device=device)
        s = critic.encode_state(b.z, b.p)
        q = critic.q_from_state(s, b.actions)
        q_data.append(q.mean(0))
        std.append(q.std(0, correction=0))
        if b.ref_actions is not None:
            q_ref.append(critic.q_from_state(s, b.ref_actions).mean(dim=(0, 2)))
    qd = torch.cat(q_data).double().cpu()
    mc = torch.as_tensor(transitions.mc_return, dtype=torch.float64)
    corr = float("nan")
    if qd.numel() > 1 and qd.std() > 0 and mc.std() > 0:
        corr = float(torch.corrcoef(torch.stack([qd, mc]))[0, 1])
    out = {"q_data": float(qd.mean()), "mc_return": float(mc.mean()), "mc_mae": float((qd - mc).abs().mean()),
           "mc_corr": corr, "ensemble_std": float(torch.cat(std).mean())}
    if q_ref:
        out["q_ref"] = float(torch.cat(q_ref).mean())
    return out


def grad_a_check(critic: QEnsemble, z: torch.Tensor, p: torch.Tensor | None, actions: torch.Tensor,
                 eps: float = 1e-6) -> float:
    """Max relative error between autograd grad_A sum_i Q_i and central finite differences (float64 copy).

    z [B, F], p [B, P] or None, actions [B, A]. A healthy critic gives ~1e-8; > 1e-4 means a broken graph.
    """
    c = copy.deepcopy(critic).double().requires_grad_(False)
    z, a = z.detach().double(), actions.detach().double().clone().requires_grad_(True)
    p = None if p is None else p.detach().double()
    (grad,) = torch.autograd.grad(c(z, p, a).sum(), a)
    fd = torch.zeros_like(a)
    with torch.no_grad():
        for j in range(a.shape[1]):
            d = torch.zeros_like(a)
            d[:, j] = eps
            fd[:, j] = (c(z, p, a + d).sum(0) - c(z, p, a - d).sum(0)) / (2 * eps)
    scale = fd.abs().max().clamp_min(1e-12)
    return float((grad - fd).abs().max() / scale)
