"""Ground truth for the critic's action ranking at FIXED states, from the MuJoCo sim; JSON to stdout (+ --out).

Question: at one state, how much does the choice among the SFT policy's own chunk samples change the success
probability (is there room for a critic-guided policy at all?), and does the trained critic rank those chunks the
way the simulator does?

Per training seed s of a learning-benchmark work dir (bench/learning.py --work: sft-<task>-s<s>-*, critic-<task>-
s<s>-*, for --qvgm also buffer-... and features-<task>-s<s>) and per scene j:
 1. record: the SFT policy runs scene seed TUNE0 + j (tuning scenes only, never 900000+) with
    critic_trainer.pipeline.run_episode's conventions (a chunk every n_exec steps, its first n_exec actions
    executed, sampling noise from the torch RNG seeded with the scene seed, as `evaluate`); the executed actions
    are kept. A branch point b = n_exec * k is drawn (seeded) among the chunk boundaries of the first --frac of
    the episode.
 2. restore: reset(scene seed) and re-execute the recorded actions[:b] (deterministic replay; `check_replay`
    verifies that replaying a whole episode reproduces every observation bit for bit). The replayed state is
    then copied (MjData + servo targets + step counter) into one env per continuation; every state records that
    the copy equals the replay bit for bit (`snapshot_max_abs` = 0), so the R * N continuations skip R * N replays.
 3. candidates: N chunks sampled from the SFT policy at the branch state (distinct noise, seeded); for each,
    R continuations: from the branch state, execute the candidate's first n_exec actions, then the SFT policy
    (fresh noise per continuation from its own seeded torch.Generator; the policy batched over continuations)
    until success or the episode's time limit (the same limit as the recorded episode: the step counter is
    restored too). p_i = successes / R.
 4. the critic's ensemble-mean Q of each candidate (the critic sees the first n_exec steps, normalised, as
    BestOfNPolicy); optionally (--qvgm) the Q-VGM actor of the seed (retrained with the benchmark's settings,
    deterministic: train_actor seeds itself) sampled with candidate 0's noise, judged the same way.
Per state: p std, max - mean (oracle best-of-N gain), its split-half cross-validated version, the
binomial-corrected variance, Spearman(Q, p), p[argmax Q] - mean p (best-of-N with this critic). Aggregates:
means over states with seeded bootstrap 95 % CIs (resampling states) and a permutation test of "all candidates
equal at every state". `--combine A.json B.json` pools result files. `--rescore A.json --work W` judges
another critic (W's, trained on other data with the same SFT checkpoint) on the stored states: the candidates are
re-drawn (checked to reproduce) and the stored outcomes judge its Q, no continuations.
`--candidate-offset S` widens the candidates: each SFT chunk plus a seeded constant N(0, S^2) offset in the
normalised action space (a wider proposal than the policy's own). Results: docs/RESULTS.md.

    .venv/bin/python bench/critic_ground_truth.py --work /tmp/gt/w --seeds 0 --states 10 --n 8 --reps 4

Flow-time convention (openpi): t = 1 noise, t = 0 clean; chunks are sampled from noise [1, H, D] at t = 1.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.report import emit, machine  # noqa: E402
from critic_trainer.critic import QEnsemble, critic_action  # noqa: E402
from critic_trainer.features import critic_state_features  # noqa: E402
from critic_trainer.pipeline import constant_action_offsets, policy_observation, run_episode, run_from  # noqa: E402
from critic_trainer.qvgm import bind_critic  # noqa: E402

TUNE0 = 200_000  # tuning scene seeds (bench/learning.py); evaluation scenes start at 900_000 and are refused
EVAL0 = 900_000


# ------------------------------------------------------------------------------------------------ seeds, obs
def sub_seed(*parts: int) -> int:
    """A 63-bit seed derived from integer parts (np.random.SeedSequence), for torch.manual_seed / Generator."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def sim_state(env: Any) -> np.ndarray:
    """The full physics state of a TabletopEnv as float64 [n]: time, qpos, qvel, act, ctrl, mocap, warm start."""
    d = env.data
    return np.concatenate([[d.time], d.qpos, d.qvel, d.act, d.ctrl, d.mocap_pos.ravel(), d.mocap_quat.ravel(),
                           d.qacc_warmstart]).astype(np.float64)


# ------------------------------------------------------------------------------------------------ episodes
def record_episode(policy: Any, env: Any, task: str, seed: int, n_exec: int = 5,
                   noise_seed: int | None = None) -> dict[str, Any]:
    """One closed-loop episode exactly as critic_trainer.pipeline.run_episode (torch RNG seeded with noise_seed,
    default the scene seed; a chunk per n_exec steps). Returns actions float32 [T, 7] (robot units, as executed),
    states float32 [T + 1, 7] and privileged float32 [T + 1, k] (observations before each step and the last),
    final sim_state, success, steps."""
    start = env.reset(seed=seed, options={"task": task})[0]  # run_episode resets again: same seed, same scene
    acts: list[np.ndarray] = []
    states, priv = [start["state"]], [start["privileged"]]

    def keep(a: np.ndarray, obs: dict[str, Any]) -> None:
        acts.append(a)
        states.append(obs["state"])
        priv.append(obs["privileged"])

    ok = run_episode(policy, env, task, seed, n_exec=n_exec, noise_seed=seed if noise_seed is None else noise_seed,
                     on_step=keep)["success"]
    return {"seed": seed, "actions": np.stack(acts), "states": np.stack(states), "privileged": np.stack(priv),
            "final": sim_state(env), "success": ok, "steps": len(acts)}


def restore(env: Any, task: str, seed: int, actions: np.ndarray) -> dict[str, Any]:
    """Deterministic replay: reset(seed) and execute `actions` [b, 7]; returns the observation after them.
    Raises RuntimeError if the episode ends during the replay (a branch point must lie before the end)."""
    obs, _ = env.reset(seed=seed, options={"task": task})
    for k, a in enumerate(actions):
        obs, _, term, trunc, _ = env.step(a)
        if (term or trunc) and k < len(actions) - 1:
            raise RuntimeError(f"episode {seed} ended at replay step {k + 1} of {len(actions)}")
    return obs


def check_replay(env: Any, task: str, ep: dict[str, Any]) -> dict[str, Any]:
    """Replay a recorded episode's actions from reset(seed): max |difference| of every observation (state,
    privileged) and of the final full physics state; `exact` when all are 0 (bit-for-bit)."""
    obs, _ = env.reset(seed=ep["seed"], options={"task": task})
    d_state = float(np.max(np.abs(obs["state"] - ep["states"][0])))
    d_priv = float(np.max(np.abs(obs["privileged"] - ep["privileged"][0])))
    ok = False
    for k, a in enumerate(ep["actions"]):
        obs, _, term, _, _ = env.step(a)
        d_state = max(d_state, float(np.max(np.abs(obs["state"] - ep["states"][k + 1]))))
        d_priv = max(d_priv, float(np.max(np.abs(obs["privileged"] - ep["privileged"][k + 1]))))
        ok = bool(term)
    d_final = float(np.max(np.abs(sim_state(env) - ep["final"])))
    return {"steps": int(len(ep["actions"])), "max_abs_state": d_state, "max_abs_privileged": d_priv,
            "max_abs_final_sim_state": d_final, "success_reproduced": ok == ep["success"],
            "exact": d_state == 0.0 and d_priv == 0.0 and d_final == 0.0 and ok == ep["success"]}


def continue_episode(policy: Any, env: Any, obs: dict[str, Any], first: np.ndarray, n_exec: int,
                     noise_seed: int) -> tuple[bool, int]:
    """One continuation, unbatched, for any actor with act([obs]) -> [1, H, 7] (e.g. a scripted expert): from
    the env's current state (obs) execute `first` [n, 7] (robot units), then the actor (global torch RNG seeded
    with noise_seed; a chunk per n_exec steps) until success or the env's time limit.
    Returns (success, steps executed here). The bench itself uses continue_batch."""
    torch.manual_seed(noise_seed)
    obs, steps, end = execute(env, obs, first)
    if end is not None:
        return end, steps
    rest = run_from(policy, env, obs, n_exec=n_exec)
    return rest["success"], steps + rest["steps"]


def branch_point(steps: int, n_exec: int, frac: float, rng: np.random.Generator) -> int:
    """A chunk boundary b = n_exec * k (k uniform) with b < frac * steps and b < steps (0 when none other)."""
    k_max = max(0, min(int(np.floor(frac * steps / n_exec)), (steps - 1) // n_exec))
    return int(n_exec * rng.integers(0, k_max + 1))


# ------------------------------------------------------------------------------------------------ candidates
@torch.no_grad()
def sample_candidates(policy: Any, obs: dict[str, Any], noises: torch.Tensor, n_exec: int,
                      critic: QEnsemble | None = None, features: str = "rl-token",
                      offsets: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Chunks of `policy` at one observation from noises [N, 1, H, D] (t = 1): robot-unit chunks float64
    [N, H, real], normalised critic actions float32 [N, n_exec * real] and, with a critic, its ensemble-mean Q
    float32 [N] (critic state features of `policy`, as BestOfNPolicy). offsets [N, 1, 1, D] (optional): added
    to each sampled chunk in the policy's normalised action space, the same at every step (wider candidates)."""
    inputs = policy.preprocess([policy_observation(obs)])
    ctx = policy.encode(inputs)
    chunks = [policy.sample(ctx, noise=eps) for eps in noises]
    if offsets is not None:
        chunks = [c + off.to(c.dtype) for c, off in zip(chunks, offsets, strict=True)]
    crit = torch.cat([critic_action(c, n_exec, policy.real_action_dim) for c in chunks]).float()
    out = {"robot": np.concatenate([policy.postprocess(c) for c in chunks]), "critic_action": crit.numpy()}
    if critic is not None:
        q_fn = bind_critic(critic, critic_state_features(policy, ctx, inputs, features), inputs["state"], how="mean")
        out["q"] = q_fn(crit[None])[0].numpy()
    return out


def candidate_offsets(policy: Any, n: int, sigma: float, train_seed: int, scene: int) -> torch.Tensor | None:
    """--candidate-offset: N(0, sigma^2) offsets [N, 1, 1, D] in the policy's normalised action space, one per
    candidate, constant over the chunk, zero on padded dims; seeded by (train seed, scene), apart from the sampling
    noise (so sigma = 0 gives the plain candidates exactly). None for sigma = 0."""
    if not sigma:
        return None
    return constant_action_offsets(n, policy.action_dim, policy.real_action_dim, sigma, sub_seed(train_seed, scene, 5))


@torch.no_grad()
def critic_q(policy: Any, critic: QEnsemble, obs: dict[str, Any], crit_actions: np.ndarray,
             features: str = "rl-token") -> np.ndarray:
    """Ensemble-mean Q float32 [M] of normalised critic actions [M, n_exec * real] at one observation, with the
    state features of `policy` (the critic's own encoder: the SFT policy)."""
    inputs = policy.preprocess([policy_observation(obs)])
    ctx = policy.encode(inputs)
    q_fn = bind_critic(critic, critic_state_features(policy, ctx, inputs, features), inputs["state"], how="mean")
    return q_fn(torch.as_tensor(crit_actions, dtype=torch.float32)[None])[0].numpy()


@dataclass
class Snapshot:
    """A branch point: the env's complete dynamic state (qvgm.sim.SimState: MjData copy, servo targets, step counter)
    and the observation there. Load it only into an env reset to the same task and scene seed (layout / prompt
    come from the reset)."""

    state: Any
    obs: dict[str, Any]


def take_snapshot(env: Any, obs: dict[str, Any]) -> Snapshot:
    """Snapshot of `env` now (obs: its current observation)."""
    return Snapshot(env.get_sim_state(), copy.deepcopy(obs))


def load_snapshot(env: Any, task: str, seed: int, snap: Snapshot) -> dict[str, Any]:
    """reset(seed) (layout, colours, prompt) then overwrite the physics with the snapshot; returns its obs.
    The bench checks that this equals restore-by-replay bit for bit (sim_state) at every branch state."""
    env.reset(seed=seed, options={"task": task})
    env.set_sim_state(snap.state)
    return copy.deepcopy(snap.obs)


def execute(env: Any, obs: dict[str, Any], actions: Any) -> tuple[dict[str, Any], int, bool | None]:
    """Step `env` through `actions` [n, 7] (robot units) from observation `obs` until the episode ends ->
    (last observation, steps taken, True = success / False = time limit / None = still running)."""
    for k, a in enumerate(actions):
        obs, _, term, trunc, _ = env.step(np.asarray(a, dtype=np.float32))
        if term or trunc:
            return obs, k + 1, bool(term)
    return obs, len(actions), None


@torch.no_grad()
def continue_batch(policy: Any, envs: list[Any], task: str, seed: int, snap: Snapshot, firsts: list[np.ndarray],
                   noise_seeds: list[int], n_exec: int) -> tuple[np.ndarray, np.ndarray]:
    """M continuations from one branch state in lockstep, continuation m in envs[m]: load the snapshot, execute
    firsts[m] [n, 7] (robot units), then `policy` (a chunk per n_exec steps, its noise [1, H, D] at t = 1 drawn
    from a torch.Generator seeded with noise_seeds[m] per chunk, so each continuation's noise does not depend on
    the batch) until success or the time limit; the policy runs batched over the continuations still going.
    Returns (success bool [M], steps int [M] executed after the snapshot)."""
    m_all = len(firsts)
    if len(envs) < m_all or len(noise_seeds) != m_all:
        raise ValueError(f"{m_all} continuations need as many envs (got {len(envs)}) and noise seeds")
    ok = np.zeros(m_all, dtype=bool)
    steps = np.zeros(m_all, dtype=np.int64)
    active, obs = [], {}
    for m in range(m_all):
        o, n, end = execute(envs[m], load_snapshot(envs[m], task, seed, snap), firsts[m])
        steps[m] += n
        if end is None:
            active.append(m)
            obs[m] = o
        else:
            ok[m] = end
    gens = {m: torch.Generator().manual_seed(int(noise_seeds[m])) for m in active}
    while active:
        noise = torch.cat([torch.randn(1, policy.horizon, policy.action_dim, generator=gens[m]) for m in active])
        chunks = policy.act([policy_observation(obs[m]) for m in active], noise=noise)
        still = []
        for row, m in enumerate(active):
            obs[m], n, end = execute(envs[m], obs[m], chunks[row][: max(1, n_exec)])
            steps[m] += n
            if end is None:
                still.append(m)
            else:
                ok[m] = end
        active = still
    return ok, steps


def evaluate_state(policy: Any, critic: QEnsemble | None, envs: list[Any], task: str, ep: dict[str, Any], b: int,
                   n: int, reps: int, n_exec: int, train_seed: int, features: str = "rl-token",
                   extra_actors: dict[str, Any] | None = None, offset: float = 0.0) -> dict[str, Any]:
    """One branch state (episode `ep`, branch step b), restored by replay in envs[0]: N SFT candidates (noise
    seeded by the train seed and scene), R continuations each (continue_batch; needs (N + extras) * R envs)
    -> outcomes [N, R], Q [N]; each of `extra_actors` (name -> policy) samples one chunk with candidate 0's noise
    and is judged the same way (outcomes [R], Q of its chunk by the same critic). `snapshot_max_abs`: max |diff|
    of the snapshot-loaded vs the replayed physics state (0 = bit-exact)."""
    seed = int(ep["seed"])
    prefix = ep["actions"][:b]
    obs = restore(envs[0], task, seed, prefix)
    replayed = sim_state(envs[0])
    snap = take_snapshot(envs[0], obs)
    load_snapshot(envs[-1], task, seed, snap)
    snap_diff = float(np.max(np.abs(sim_state(envs[-1]) - replayed)))
    gen = torch.Generator().manual_seed(sub_seed(train_seed, seed, 1))
    noises = torch.randn(n, 1, policy.horizon, policy.action_dim, generator=gen)
    cand = sample_candidates(policy, obs, noises, n_exec, critic, features,
                             candidate_offsets(policy, n, offset, train_seed, seed))
    firsts = [cand["robot"][i][:n_exec] for i in range(n) for _ in range(reps)]
    seeds = [sub_seed(train_seed, seed, 2, i, r) for i in range(n) for r in range(reps)]
    extras = {}
    for k, (name, actor) in enumerate((extra_actors or {}).items()):
        extras[name] = sample_candidates(actor, obs, noises[:1], n_exec)
        firsts += [extras[name]["robot"][0][:n_exec]] * reps
        seeds += [sub_seed(train_seed, seed, 3, k, r) for r in range(reps)]
    ok, _ = continue_batch(policy, envs, task, seed, snap, firsts, seeds, n_exec)
    outcomes = ok[: n * reps].reshape(n, reps).astype(np.int8)
    res: dict[str, Any] = {"scene_seed": seed, "branch_step": b, "episode_steps": int(ep["steps"]),
                           "episode_success": bool(ep["success"]), "snapshot_max_abs": snap_diff,
                           "outcomes": outcomes.tolist(),
                           "q": None if critic is None else [float(x) for x in cand["q"]],
                           "candidate_spread": float(cand["critic_action"].std(0).mean())}
    res.update(state_stats(outcomes, None if critic is None else cand["q"]))
    for k, (name, ch) in enumerate(extras.items()):
        o = ok[(n + k) * reps: (n + k + 1) * reps].astype(np.int8)
        q = None if critic is None else float(critic_q(policy, critic, obs, ch["critic_action"], features)[0])
        shift = float(np.sqrt(np.mean((ch["critic_action"][0] - cand["critic_action"][0]) ** 2)))
        p = float(o.mean())
        res[name] = {"outcomes": o.tolist(), "q": q, "rms_shift_vs_candidate0": shift, "p": p,
                     "gain_vs_mean": p - res["p_mean"], "gain_vs_candidate0": p - res["p"][0]}
    return res


# ------------------------------------------------------------------------------------------------ statistics
def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties averaged (as scipy.stats.rankdata 'average')."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i: j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rank correlation (Pearson of average ranks); None when either side is constant."""
    ra, rb = rankdata(a), rankdata(b)
    if np.ptp(ra) == 0 or np.ptp(rb) == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _gain_at(select: np.ndarray, judge: np.ndarray) -> float:
    """judge at the argmax set of `select` (ties averaged) minus the mean of judge."""
    top = select == select.max()
    return float(judge[top].mean() - judge.mean())


def state_stats(outcomes: np.ndarray, q: np.ndarray | None) -> dict[str, Any]:
    """Per-state numbers from outcomes int [N, R] (1 = success) and the critic's Q [N] (or None).

    p = outcomes.mean(1). var_corrected = Var(p, ddof 1) - mean(p (1 - p) / (R - 1)): unbiased for the variance of
    the TRUE success probabilities across candidates (the binomial noise of R rollouts removed). split_half_cov:
    Cov(p_A, p_B) over candidates of the two halves of the rollouts, another unbiased estimate of it.
    oracle_gain = max p - mean p (biased up by the noise); oracle_gain_cv: choose by one half, judge on the other
    (both ways, averaged; ties averaged): unbiased for a best-of-N oracle with R/2 rollouts per candidate;
    spearman_halves: rank correlation of the two halves' p (the ranking's own reproducibility, a noise ceiling).
    critic_gain = p at argmax Q (ties averaged) - mean p; spearman_q_p: within-state rank correlation (None when
    p or Q is constant)."""
    o = np.asarray(outcomes, dtype=np.float64)
    n, r = o.shape
    p = o.mean(1)
    out: dict[str, Any] = {"p": p.tolist(), "p_mean": float(p.mean()), "p_std": float(p.std()),
                           "oracle_gain": float(p.max() - p.mean()), "all_fail": bool(p.max() == 0.0),
                           "all_success": bool(p.min() == 1.0), "p_constant": bool(np.ptp(p) == 0.0)}
    if n > 1 and r > 1:
        out["var_observed"] = float(p.var(ddof=1))
        out["var_corrected"] = float(p.var(ddof=1) - np.mean(p * (1 - p) / (r - 1)))
    if n > 1 and r >= 2:
        h = r // 2
        pa, pb = o[:, :h].mean(1), o[:, h: 2 * h].mean(1)
        out["split_half_cov"] = float(np.cov(pa, pb, ddof=1)[0, 1])
        out["oracle_gain_cv"] = 0.5 * (_gain_at(pa, pb) + _gain_at(pb, pa))
        out["spearman_halves"] = spearman(pa, pb)  # how reproducible the candidates' ranking is at this R
    if q is not None:
        q = np.asarray(q, dtype=np.float64)
        out["q_std"] = float(q.std())
        out["critic_gain"] = _gain_at(q, p)
        out["spearman_q_p"] = spearman(q, p)
    return out


def bootstrap_mean(x: list[float], rng: np.random.Generator, n_boot: int = 2000) -> dict[str, Any]:
    """Mean of x with a percentile bootstrap 95 % CI (resampling the values); n; None-s dropped."""
    v = np.asarray([t for t in x if t is not None], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "ci95": None, "n": 0}
    idx = rng.integers(0, v.size, size=(n_boot, v.size))
    m = v[idx].mean(1)
    return {"mean": float(v.mean()), "ci95": [float(np.percentile(m, 2.5)), float(np.percentile(m, 97.5))],
            "n": int(v.size)}


def homogeneity_test(states: list[dict[str, Any]], rng: np.random.Generator, n_perm: int = 2000) -> dict[str, Any]:
    """Permutation test of H0 "at every state all candidates have the same success probability": the statistic
    is the sum over states of the across-candidate variance of p; under H0 the N * R outcomes of a state are
    exchangeable, so they are shuffled within each state. Returns the statistic, its mean under H0 and the
    one-sided p-value (add-one)."""
    mats = [np.asarray(s["outcomes"], dtype=np.float64) for s in states if not s["p_constant"]]
    if not mats:
        return {"stat": 0.0, "null_mean": 0.0, "p_value": 1.0, "states": 0}
    stat = float(sum(m.mean(1).var() for m in mats))
    null = np.zeros(n_perm)
    for m in mats:
        flat = m.ravel()
        perm = np.argsort(rng.random((n_perm, flat.size)), axis=1)
        null += flat[perm].reshape(n_perm, *m.shape).mean(2).var(1)
    return {"stat": stat, "null_mean": float(null.mean()), "p_value": float((1 + np.sum(null >= stat)) / (1 + n_perm)),
            "states": len(mats)}


AGG_KEYS = ("p_mean", "p_std", "oracle_gain", "oracle_gain_cv", "var_observed", "var_corrected", "split_half_cov",
            "spearman_halves", "q_std", "critic_gain", "spearman_q_p")


def aggregate(states: list[dict[str, Any]], seed: int = 0, n_boot: int = 2000,
              extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Means over states with bootstrap 95 % CIs (seeded), counts of no-room states, the across-state variance
    of the mean success probability (compare with the within-state var_corrected), and per extra actor its p
    gain over the candidates' mean and over candidate 0 (same noise)."""
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"states": len(states),
                           "all_fail": int(sum(s["all_fail"] for s in states)),
                           "all_success": int(sum(s["all_success"] for s in states)),
                           "p_constant": int(sum(s["p_constant"] for s in states))}
    for k in AGG_KEYS:
        if any(k in s for s in states):
            out[k] = bootstrap_mean([s.get(k) for s in states], rng, n_boot)
    out["homogeneity_test"] = homogeneity_test(states, rng, n_boot)
    pm = np.asarray([s["p_mean"] for s in states])
    out["var_across_states_of_p_mean"] = float(pm.var(ddof=1)) if len(pm) > 1 else None
    room = [s for s in states if not s["p_constant"]]
    if room and "critic_gain" in room[0]:
        out["critic_gain_states_with_room"] = bootstrap_mean([s["critic_gain"] for s in room], rng, n_boot)
        out["oracle_gain_cv_states_with_room"] = bootstrap_mean([s.get("oracle_gain_cv") for s in room], rng, n_boot)
    for name in extra:
        out[name] = {"gain_vs_mean": bootstrap_mean([s[name]["gain_vs_mean"] for s in states], rng, n_boot),
                     "gain_vs_candidate0": bootstrap_mean([s[name]["gain_vs_candidate0"] for s in states], rng,
                                                          n_boot),
                     "p": bootstrap_mean([s[name]["p"] for s in states], rng, n_boot)}
    return out


# ------------------------------------------------------------------------------------------------ work dirs
def find_one(work: Path, pattern: str) -> Path:
    """The one directory of `work` matching the glob (not *.info.json / *.work); SystemExit naming it if none."""
    hits = sorted(p for p in work.glob(pattern) if p.is_dir() and not p.name.endswith((".work", ".tmp")))
    if not hits:
        raise SystemExit(f"no {pattern} in {work} (a bench/learning.py --work directory)")
    return hits[-1]


def critic_features_kind(cdir: Path, meta: dict[str, Any]) -> str:
    """The critic state features the critic was trained on (critic.json / critic_info.json), default rl-token."""
    if meta.get("features"):
        return str(meta["features"])
    info = cdir / "critic_info.json"
    return str(json.loads(info.read_text()).get("features", "rl-token")) if info.is_file() else "rl-token"


def qvgm_actor(work: Path, task: str, seed: int, sft_dir: Path, critic: QEnsemble, n_exec: int) -> Any:
    """The Q-VGM actor of training seed `seed`: retrained from the cached buffer, features and critic with
    bench/learning.py's defaults (train_actor seeds itself, so this is the benchmark's actor), cached as
    WORK/gt-qvgm-<task>-s<seed>.safetensors (safetensors; reloaded into the SFT architecture)."""
    from safetensors.torch import load_file, save_file

    from critic_trainer import pipeline as P
    from qvgm.policy import load_policy

    cache = work / f"gt-qvgm-{task}-s{seed}.safetensors"
    actor = load_policy(sft_dir).eval()
    if cache.is_file():
        actor.load_state_dict(load_file(str(cache)), strict=True)
        return actor.eval()
    buf_dir = find_one(work, f"buffer-{sft_dir.name}-r*")
    buf = P.load_buffer(buf_dir, actor.horizon)
    cfg = P.ImproveConfig(method="qvgm", n_exec=n_exec, seed=seed, critic_steps=3000)
    trained, _, _ = P.improve(actor, buf, cfg, work=work / f"gt-run-{task}-s{seed}-qvgm",
                              cache_dir=work / f"features-{task}-s{seed}", critic=critic)
    save_file({k: v.detach().cpu().contiguous() for k, v in trained.state_dict().items()}, str(cache))
    return trained.eval()


# ------------------------------------------------------------------------------------------------ main
def run_seed(work: Path, task: str, seed: int, args: argparse.Namespace, log: Any) -> dict[str, Any]:
    """Every branch state of one training seed -> {"states": [...], "replay": [...], "aggregate": ...}."""
    from critic_trainer.pipeline import load_critic
    from qvgm.policy import load_policy
    from qvgm.sim import TabletopEnv

    sft_dir = find_one(work, f"sft-{task}-s{seed}-*")
    policy = load_policy(sft_dir).eval()
    cdir = find_one(work, f"critic-{task}-s{seed}-*")
    critic, meta = load_critic(cdir)
    kind = critic_features_kind(cdir, meta)
    extra = {"qvgm": qvgm_actor(work, task, seed, sft_dir, critic, args.n_exec)} if args.qvgm else {}
    envs = [TabletopEnv(task=task, render=False, max_episode_steps=args.max_episode_steps)
            for _ in range((args.n + len(extra)) * args.reps)]
    env = envs[0]
    states, replay = [], []
    try:
        for j in range(args.first_scene, args.first_scene + args.states):
            t0 = time.perf_counter()
            scene = TUNE0 + j
            ep = record_episode(policy, env, task, scene, args.n_exec)
            if j - args.first_scene < args.check_replay:
                replay.append({"scene_seed": scene, **check_replay(env, task, ep)})
                if not replay[-1]["exact"]:
                    log(f"WARNING: replay of scene {scene} is not bit-exact: {replay[-1]}")
            b = branch_point(ep["steps"], args.n_exec, args.frac, np.random.default_rng([seed, scene, 4]))
            st = evaluate_state(policy, critic, envs, task, ep, b, args.n, args.reps, args.n_exec, seed, kind, extra,
                                getattr(args, "candidate_offset", 0.0))
            st["wall_s"] = round(time.perf_counter() - t0, 2)
            states.append(st)
            log(json.dumps({"seed": seed, "scene": scene, "b": b, "steps": ep["steps"], "p": st["p"],
                            "spearman": st.get("spearman_q_p"), "critic_gain": st.get("critic_gain"),
                            **({"qvgm_p": st["qvgm"]["p"]} if args.qvgm else {}), "wall_s": st["wall_s"]}))
    finally:
        for e in envs:
            e.close()
    return {"sft": sft_dir.name, "critic": cdir.name, "critic_features": kind, "replay": replay, "states": states,
            "aggregate": aggregate(states, seed, args.boot, tuple(extra))}


def combine(paths: list[Path], boot: int = 2000) -> dict[str, Any]:
    """Pool the states of several result files (same N and R): per-state statistics recomputed from the stored
    outcomes and Q, aggregates per (file, seed) and pooled."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    nr = {(r["settings"]["n"], r["settings"]["reps"]) for r in runs}
    if len(nr) != 1:
        raise SystemExit(f"combine needs the same --n and --reps in every file, got {sorted(nr)}")
    per, pooled = {}, []
    extra = ("qvgm",) if all(r["settings"].get("qvgm") for r in runs) else ()
    for path, r in zip(paths, runs, strict=True):
        for seed, sr in r["seeds"].items():
            states = []
            for st in sr["states"]:
                st = {**st, **state_stats(np.asarray(st["outcomes"]), None if st["q"] is None else np.asarray(st["q"]))}
                states.append(st)
            per[f"{Path(path).name}:s{seed}"] = aggregate(states, int(seed), boot, extra)
            pooled += states
    return {"bench": "critic_ground_truth", "combined": [str(p) for p in paths], "n_reps": list(sorted(nr)[0]),
            "per_run_seed": per, "pooled": aggregate(pooled, 12345, boot, extra)}


def stored_sft(work: Path, path: Path, task: str, seed: int, sr: dict[str, Any]) -> Path:
    """The SFT checkpoint of `work` for training seed `seed`; it must be the one result file `path` measured."""
    sft_dir = find_one(work, f"sft-{task}-s{seed}-*")
    if sft_dir.name != sr["sft"]:
        raise SystemExit(f"{path}: seed {seed} was measured with {sr['sft']}, {work} holds {sft_dir.name}")
    return sft_dir


def redraw_stored(policy: Any, r: dict[str, Any], seed: int, states: list[dict[str, Any]], critic: Any = None,
                  features: str = "rl-token") -> Iterator[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """For each stored state of result file `r` (training seed `seed`, its SFT `policy`): re-record the scene's
    episode, restore the branch step by replay and draw the same N candidates (same seeded noise and offsets),
    checking that the episode and the candidate spread reproduce (else SystemExit). Yields (stored state,
    observation there, sample_candidates' dict; with Q when `critic` is given)."""
    from qvgm.sim import TabletopEnv

    task, n_exec = r["task"], int(r["settings"]["n_exec"])
    env = TabletopEnv(task=task, render=False, max_episode_steps=r["settings"].get("max_episode_steps"))
    try:
        for st in states:
            scene, b = int(st["scene_seed"]), int(st["branch_step"])
            ep = record_episode(policy, env, task, scene, n_exec)
            if ep["steps"] != st["episode_steps"] or ep["success"] != st["episode_success"]:
                raise SystemExit(f"scene {scene}: the episode does not reproduce ({ep['steps']} steps, "
                                 f"success {ep['success']}; stored {st['episode_steps']}, "
                                 f"{st['episode_success']}): another SFT checkpoint or simulator")
            obs = restore(env, task, scene, ep["actions"][:b])
            gen = torch.Generator().manual_seed(sub_seed(seed, scene, 1))
            noises = torch.randn(len(st["outcomes"]), 1, policy.horizon, policy.action_dim, generator=gen)
            offsets = candidate_offsets(policy, len(st["outcomes"]), r["settings"].get("candidate_offset", 0.0),
                                        seed, scene)
            cand = sample_candidates(policy, obs, noises, n_exec, critic, features, offsets)
            spread = float(cand["critic_action"].std(0).mean())
            if abs(spread - st["candidate_spread"]) > 1e-5:
                raise SystemExit(f"scene {scene}: candidates do not reproduce (spread {spread} vs "
                                 f"{st['candidate_spread']})")
            yield st, obs, cand
    finally:
        env.close()


def rescore(paths: list[Path], work: Path, boot: int = 2000, log: Any = print) -> dict[str, Any]:
    """Judge ANOTHER critic on the states of earlier result files, without new continuations: per training seed
    of each file, the SFT policy of `work` (it must be the file's SFT checkpoint, by name; the recorded episode,
    branch step and candidate spread are checked to reproduce) and the one critic-<task>-s<seed>-* of `work`;
    each state's episode is re-recorded, restored to its branch step by replay, the same N candidates are drawn
    (same seeded generator) and scored by the new critic; the stored outcomes judge them (state_stats). Returns
    the per-seed and pooled aggregates of the new critic next to the stored critic's on the same states."""
    from critic_trainer.pipeline import load_critic
    from qvgm.policy import load_policy

    runs = [json.loads(Path(p).read_text()) for p in paths]
    new_states, old_states, per, critics = [], [], {}, {}
    for path, r in zip(paths, runs, strict=True):
        task = r["task"]
        for seed_key, sr in r["seeds"].items():
            seed = int(seed_key)
            sft_dir = stored_sft(work, path, task, seed, sr)
            hits = sorted(h for h in work.glob(f"critic-{task}-s{seed}-*") if h.is_dir() and h.suffix != ".tmp")
            if len(hits) != 1:
                raise SystemExit(f"rescore wants exactly one critic-{task}-s{seed}-* in {work}, found "
                                 f"{[h.name for h in hits]}")
            policy = load_policy(sft_dir).eval()
            critic, meta = load_critic(hits[0])
            kind = critic_features_kind(hits[0], meta)
            critics[f"s{seed}"] = hits[0].name
            mine, theirs = [], []
            for st, _, cand in redraw_stored(policy, r, seed, sr["states"], critic, kind):
                outcomes = np.asarray(st["outcomes"])
                mine.append({"scene_seed": int(st["scene_seed"]), "branch_step": int(st["branch_step"]),
                             "outcomes": st["outcomes"], "q": [float(x) for x in cand["q"]], "q_stored": st["q"],
                             **state_stats(outcomes, cand["q"])})
                theirs.append({**st, **state_stats(outcomes, None if st["q"] is None else np.asarray(st["q"]))})
                log(json.dumps({"seed": seed, "scene": mine[-1]["scene_seed"], "spearman": mine[-1].get("spearman_q_p"),
                                "critic_gain": mine[-1]["critic_gain"], "stored": theirs[-1].get("critic_gain")}))
            per[f"{Path(path).name}:s{seed}"] = {"new": aggregate(mine, seed, boot),
                                                  "stored": aggregate(theirs, seed, boot)}
            new_states += mine
            old_states += theirs
    paired = [a["critic_gain"] - b["critic_gain"] for a, b in zip(new_states, old_states, strict=True)
              if b.get("critic_gain") is not None]
    return {"bench": "critic_ground_truth", "rescored": [str(p) for p in paths], "work": str(work),
            "critics": critics, "per_run_seed": per,
            "pooled": {"new": aggregate(new_states, 12345, boot), "stored": aggregate(old_states, 12345, boot),
                       "critic_gain_new_minus_stored": bootstrap_mean(paired, np.random.default_rng(7), boot)},
            "states": new_states}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="a bench/learning.py --work dir (read only; a copy)")
    ap.add_argument("--combine", type=Path, nargs="+", default=None,
                    help="instead of measuring: pool the states of these result files (same --n / --reps)")
    ap.add_argument("--rescore", type=Path, nargs="+", default=None,
                    help="instead of measuring: judge the critic of --work on these result files' states (their "
                         "stored outcomes; the same SFT checkpoint; no continuations)")
    ap.add_argument("--task", default="pick_place")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds")
    ap.add_argument("--states", type=int, default=10, help="branch states (one per tuning scene) per seed")
    ap.add_argument("--first-scene", type=int, default=0, help="scenes TUNE0 + first .. + states - 1")
    ap.add_argument("--n", type=int, default=8, help="candidate chunks per state")
    ap.add_argument("--reps", type=int, default=4, help="continuations per candidate")
    ap.add_argument("--n-exec", type=int, default=5)
    ap.add_argument("--candidate-offset", type=float, default=0.0,
                    help="wider candidates: each SFT chunk plus a constant N(0, s^2) offset in the normalised action "
                         "space (seeded; 0 = the policy's own chunks)")
    ap.add_argument("--frac", type=float, default=0.7, help="branch points within the first FRAC of the episode")
    ap.add_argument("--qvgm", action="store_true", help="also judge the seed's Q-VGM actor (retrained, cached)")
    ap.add_argument("--max-episode-steps", type=int, default=None, help="time limit (default: the task's)")
    ap.add_argument("--check-replay", type=int, default=3, help="replay-determinism checks per seed (first scenes)")
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.combine:
        res = combine(args.combine, args.boot)
        text = json.dumps(res, indent=1)
        print(text)
        if args.out:
            args.out.write_text(text)
        return res
    if args.rescore:
        if args.work is None:
            raise SystemExit("--rescore needs --work DIR (the SFT checkpoint and the critic to judge)")
        torch.set_num_threads(args.threads)
        res = rescore(args.rescore, args.work, args.boot, log=lambda m: print(m, file=sys.stderr, flush=True))
        text = json.dumps(res, indent=1)
        print(json.dumps({k: v for k, v in res.items() if k != "states"}, indent=1))
        if args.out:
            args.out.write_text(text)
        return res
    if args.work is None or not args.seeds:
        raise SystemExit("give --work DIR and --seeds S ... (or --combine FILES)")
    if args.n < 2 or args.reps < 2 or args.states < 1:
        raise SystemExit("need --n >= 2, --reps >= 2, --states >= 1")
    if TUNE0 + args.first_scene + args.states > EVAL0 or args.first_scene < 0:
        raise SystemExit("branch states must come from tuning scenes 200000 .. 899999 (never evaluation scenes)")
    torch.set_num_threads(args.threads)
    t0, load0 = time.perf_counter(), os.getloadavg()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    seeds = {s: run_seed(args.work, args.task, s, args, log) for s in args.seeds}
    all_states = [st for r in seeds.values() for st in r["states"]]
    extra = ("qvgm",) if args.qvgm else ()
    out = {"bench": "critic_ground_truth", "task": args.task,
           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "seed_scheme": {"scenes": f"{TUNE0} + j (tuning)", "episode_noise": "torch.manual_seed(scene)",
                           "branch": "default_rng([train_seed, scene, 4])",
                           "candidates": "Generator(sub_seed(train_seed, scene, 1))",
                           "continuations": "manual_seed(sub_seed(train_seed, scene, 2, i, r))"},
           "machine": machine(args.threads, load_avg_start=load0),
           "seeds": seeds, "pooled": aggregate(all_states, 12345, args.boot, extra),
           "wall_s": round(time.perf_counter() - t0, 1)}
    out["machine"]["load_avg_end"] = os.getloadavg()
    return emit(out, args.out)


if __name__ == "__main__":
    main()
