"""bench/critic_ground_truth.py: replay determinism of the MuJoCo env, branch-state outcomes that are real sim
outcomes (a scripted expert's own chunk vs a chunk that drives the arm away, under a tight time limit), the
per-state statistics by hand, and the whole per-state measurement on a tiny `state` policy + tiny critic built
here (well-formed, reproducible in a fresh env, equal to an independent re-run of one continuation)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from critic_trainer.critic import CriticConfig, QEnsemble
from critic_trainer.pipeline import save_critic
from qvgm.policy import NormStats, make_policy, save_policy
from qvgm.sim import TabletopEnv
from qvgm.sim.expert import make_expert
from qvgm.sim.tasks import ROLES

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]
TINY = {"hidden": 32, "embed_dim": 16, "head_hidden": 64, "head_depth": 2, "time_dim": 16, "horizon": 6}
N_EXEC = 3


def load_bench():
    spec = importlib.util.spec_from_file_location("cgt", ROOT / "bench" / "critic_ground_truth.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["cgt"] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


G = load_bench()


def tiny_policy(seed: int = 0):
    """An untrained tiny `state` policy for push (3 roles x 7 privileged dims), actions around the home pose."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    home = np.array([0.0, -0.6, 1.2, 0.0, 1.0, 0.0, 0.02])
    stats = NormStats.compute(home + rng.uniform(-0.2, 0.2, (64, 7)), home + rng.uniform(-0.2, 0.2, (64, 7)))
    return make_policy("state", stats, state_dim=7, privileged_dim=21, **TINY).eval()


def tiny_critic(seed: int = 0) -> QEnsemble:
    torch.manual_seed(seed)
    return QEnsemble(CriticConfig(feature_dim=TINY["embed_dim"], proprio_dim=7, n_exec=N_EXEC, real_action_dim=7,
                                  num_q=2, hidden=(16, 16))).eval().requires_grad_(False)


class ExpertActor:
    """The scripted push expert behind the policy's act() protocol: [obs] -> [1, H, 7] absolute targets."""

    def __init__(self, task: str, horizon: int = 6) -> None:
        self.task, self.horizon, self.expert = task, horizon, make_expert(task)

    def act(self, observations: list[dict]) -> np.ndarray:
        o = observations[0]
        objs = {r: o["privileged"][7 * i: 7 * i + 7] for i, r in enumerate(ROLES[self.task])}
        return self.expert.act_chunk(o["state"], objs, self.horizon, commit=N_EXEC)[None]


def test_replay_reproduces_the_episode_bit_for_bit() -> None:
    pol = tiny_policy()
    env = TabletopEnv(task="push", render=False, max_episode_steps=20)
    other = TabletopEnv(task="push", render=False, max_episode_steps=20)
    try:
        ep = G.record_episode(pol, env, "push", 200_003, N_EXEC)
        assert ep["steps"] == 20 and ep["actions"].shape == (20, 7) and ep["states"].shape == (21, 7)
        assert np.ptp(ep["states"][:, :6], axis=0).max() > 1e-3  # the arm moved: a real trajectory
        for e in (env, other):  # the same env and a fresh one
            chk = G.check_replay(e, "push", ep)
            assert chk["exact"], chk
        obs = G.restore(other, "push", 200_003, ep["actions"][:9])
        assert np.array_equal(obs["state"], ep["states"][9]) and np.array_equal(obs["privileged"],
                                                                                 ep["privileged"][9])
        assert other.elapsed_steps == 9  # the time limit counts from the reset, as in the recorded episode
        # the recording follows pipeline.run_episode exactly (same seeds -> same number of steps and outcome)
        from critic_trainer.pipeline import run_episode

        r = run_episode(pol, env, "push", 200_003, n_exec=N_EXEC, noise_seed=200_003)
        assert r["steps"] == ep["steps"] and r["success"] == ep["success"]
        assert np.array_equal(env.data.qpos[env._qadr].astype(np.float32), ep["states"][-1])
    finally:
        env.close()
        other.close()


def test_outcomes_are_real_sim_outcomes() -> None:
    """Under a time limit just above what the expert needs, the expert's own first chunk then the expert
    succeeds; driving the arm away for n_exec steps first fails; a second run gives the same outcomes."""
    task, seed = "push", 1
    long_env = TabletopEnv(task=task, render=False)
    try:
        obs, _ = long_env.reset(seed=seed)
        ok, need = G.continue_episode(ExpertActor(task), long_env, obs, np.zeros((0, 7)), N_EXEC, 0)
        assert ok and need < 80
    finally:
        long_env.close()
    env = TabletopEnv(task=task, render=False, max_episode_steps=need + 2)
    try:
        obs = G.restore(env, task, seed, np.zeros((0, 7), np.float32))
        good = ExpertActor(task).act([G.policy_observation(obs)])[0][:N_EXEC]
        away = np.tile(obs["state"], (N_EXEC, 1))
        away[:, 0] += 1.2  # base joint swung far from the scene, at the velocity limit
        runs = []
        for _ in range(2):
            res = {}
            for name, first in (("good", good), ("away", away)):
                o = G.restore(env, task, seed, np.zeros((0, 7), np.float32))
                res[name] = G.continue_episode(ExpertActor(task), env, o, first, N_EXEC, 0)
            runs.append(res)
        assert runs[0]["good"][0] and not runs[0]["away"][0], runs[0]
        assert runs[0]["away"][1] == need + 2  # ran into the time limit
        assert runs[0] == runs[1]
    finally:
        env.close()


def test_state_stats_by_hand() -> None:
    o = np.array([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]])
    q = np.array([0.3, 0.9, 0.1])
    s = G.state_stats(o, q)
    p = np.array([1.0, 0.5, 0.0])
    assert s["p"] == p.tolist() and s["p_mean"] == 0.5 and math.isclose(s["p_std"], p.std())
    assert math.isclose(s["oracle_gain"], 0.5)
    assert math.isclose(s["var_observed"], 0.25)
    assert math.isclose(s["var_corrected"], 0.25 - np.mean(p * (1 - p) / 3))
    # halves: A = [1, 0, 0], B = [1, 1, 0]; A picks 0 -> B 1 - 2/3; B ties {0, 1} -> A mean 0.5 - 1/3
    assert math.isclose(s["oracle_gain_cv"], 0.5 * ((1 - 2 / 3) + (0.5 - 1 / 3)))
    assert math.isclose(s["split_half_cov"], float(np.cov([1, 0, 0], [1, 1, 0])[0, 1]))
    assert math.isclose(s["critic_gain"], 0.0) and math.isclose(s["spearman_q_p"], 0.5)
    assert not s["all_fail"] and not s["all_success"] and not s["p_constant"]
    s0 = G.state_stats(np.zeros((3, 4), int), q)
    assert s0["all_fail"] and s0["p_constant"] and s0["spearman_q_p"] is None and s0["critic_gain"] == 0.0
    np.testing.assert_array_equal(G.rankdata([3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0])
    assert math.isclose(G.spearman(np.arange(5), -np.arange(5.0) ** 3), -1.0)
    agg = G.aggregate([{**s, "outcomes": o.tolist()}, {**s0, "outcomes": [[0] * 4] * 3}], seed=0, n_boot=200)
    assert agg["states"] == 2 and agg["all_fail"] == 1 and agg["p_constant"] == 1
    assert agg["spearman_q_p"]["n"] == 1 and math.isclose(agg["p_mean"]["mean"], 0.25)
    lo, hi = agg["p_mean"]["ci95"]
    assert 0.0 <= lo <= 0.25 <= hi <= 0.5
    # a state whose candidates differ (all 8 successes vs all 8 failures) rejects H0; a homogeneous one does not
    rng = np.random.default_rng(0)
    o_split = np.repeat([[1], [1], [0], [0]], 8, axis=1)
    split = {**G.state_stats(o_split, None), "outcomes": o_split.tolist()}
    assert G.homogeneity_test([split], rng, 500)["p_value"] < 0.05
    o_mixed = np.tile([[1, 0]], (4, 4))
    mixed = {**G.state_stats(o_mixed, None), "outcomes": o_mixed.tolist()}
    h = G.homogeneity_test([mixed], rng, 500)
    assert h["stat"] == 0.0 and h["p_value"] > 0.5
    assert G.branch_point(100, 5, 0.7, np.random.default_rng(0)) % 5 == 0
    assert all(G.branch_point(12, 5, 0.7, np.random.default_rng(k)) in (0, 5) for k in range(20))


def pool(n: int, steps: int) -> list[TabletopEnv]:
    return [TabletopEnv(task="push", render=False, max_episode_steps=steps) for _ in range(n)]


def test_snapshot_equals_replay_and_continues_identically() -> None:
    """A state restored by replay and the same state loaded from a snapshot into another env evolve bit for bit
    alike under the same actions (and a batch of continuations matches the same continuations run alone)."""
    pol = tiny_policy()
    a, b = pool(2, 20)
    try:
        ep = G.record_episode(pol, a, "push", 200_001, N_EXEC)
        obs = G.restore(a, "push", 200_001, ep["actions"][:6])
        snap = G.take_snapshot(a, obs)
        G.restore(b, "push", 200_001, ep["actions"][:2])  # b elsewhere first
        o2 = G.load_snapshot(b, "push", 200_001, snap)
        assert np.array_equal(G.sim_state(a), G.sim_state(b)) and np.array_equal(o2["state"], obs["state"])
        for act in ep["actions"][6:]:
            oa, oka = a.step(act)[:2]
            ob, okb = b.step(act)[:2]
            assert np.array_equal(oa["state"], ob["state"]) and np.array_equal(oa["privileged"], ob["privileged"])
        assert np.array_equal(G.sim_state(a), G.sim_state(b)) and a.elapsed_steps == b.elapsed_steps == 20
        first = [ep["actions"][6:6 + N_EXEC]] * 3
        envs = [a, b, *pool(1, 20)]
        ok3, st3 = G.continue_batch(pol, envs, "push", 200_001, snap, first, [5, 6, 7], N_EXEC)
        ok1, st1 = G.continue_batch(pol, envs[2:], "push", 200_001, snap, first[1:2], [6], N_EXEC)
        after3 = G.sim_state(envs[1])
        assert st3.tolist() == [14, 14, 14] and st1.tolist() == [14] and ok1[0] == ok3[1]
        # row 1 of the batch vs the same continuation alone: the batched float32 policy differs from the
        # unbatched one in rounding only (~1e-8), so the trajectories agree closely, not bit for bit
        np.testing.assert_allclose(G.sim_state(envs[2]), after3, atol=1e-5)
        alone = G.sim_state(envs[2])
        ok1b, _ = G.continue_batch(pol, envs[:1], "push", 200_001, snap, first[1:2], [6], N_EXEC)
        assert ok1b[0] == ok1[0] and np.array_equal(G.sim_state(envs[0]), alone)  # same batch: bit for bit
        assert not np.array_equal(G.sim_state(envs[0]), after3)  # other noise seed -> another trajectory
    finally:
        a.close()
        b.close()


def test_evaluate_state_tiny_policy_and_critic(tmp_path: Path) -> None:
    pol, actor, critic = tiny_policy(0), tiny_policy(1), tiny_critic()
    envs = pool(6, 15)  # (N 2 + 1 extra actor) x R 2 continuations
    try:
        eps = [G.record_episode(pol, envs[0], "push", 200_000 + j, N_EXEC) for j in range(2)]
        states = []
        for ep in eps:
            b = G.branch_point(ep["steps"], N_EXEC, 0.7, np.random.default_rng([0, ep["seed"], 4]))
            assert b % N_EXEC == 0 and b < 0.7 * ep["steps"]
            states.append(G.evaluate_state(pol, critic, envs, "push", ep, b, n=2, reps=2, n_exec=N_EXEC,
                                           train_seed=0, extra_actors={"qvgm": actor}))
    finally:
        for e in envs:
            e.close()
    for st in states:
        o = np.asarray(st["outcomes"])
        assert o.shape == (2, 2) and set(o.ravel()) <= {0, 1} and st["snapshot_max_abs"] == 0.0
        assert len(st["q"]) == 2 and all(math.isfinite(x) for x in st["q"]) and st["q"][0] != st["q"][1]
        assert st["p"] == o.mean(1).tolist() and 0.0 <= st["p_mean"] <= 1.0
        assert st["candidate_spread"] > 0  # distinct noise -> distinct chunks
        assert len(st["qvgm"]["outcomes"]) == 2 and math.isfinite(st["qvgm"]["q"])
        assert st["qvgm"]["rms_shift_vs_candidate0"] > 0  # another network, the same noise
    # an independent re-run in fresh envs reproduces every number exactly
    envs2 = pool(6, 15)
    try:
        ep, b = eps[1], states[1]["branch_step"]
        again = G.evaluate_state(pol, critic, envs2, "push", ep, b, n=2, reps=2, n_exec=N_EXEC, train_seed=0,
                                 extra_actors={"qvgm": actor})
        # candidate 1, continuation 0 by hand, unbatched: replay, its first n_exec actions, then the policy
        env = envs2[0]
        obs = G.restore(env, "push", ep["seed"], ep["actions"][:b])
        gen = torch.Generator().manual_seed(G.sub_seed(0, ep["seed"], 1))
        noises = torch.randn(2, 1, pol.horizon, pol.action_dim, generator=gen)
        chunk = pol.act([G.policy_observation(obs)], noise=noises[1])[0]
        steps, term, trunc = 0, False, False
        for a in chunk[:N_EXEC]:
            obs, _, term, trunc, _ = env.step(a.astype(np.float32))
            steps += 1
        g = torch.Generator().manual_seed(G.sub_seed(0, ep["seed"], 2, 1, 0))
        while not (term or trunc):
            noise = torch.randn(1, pol.horizon, pol.action_dim, generator=g)
            for a in pol.act([G.policy_observation(obs)], noise=noise)[0][:N_EXEC]:
                obs, _, term, trunc, _ = env.step(a.astype(np.float32))
                steps += 1
                if term or trunc:
                    break
        assert steps == 15 - b and int(term) == again["outcomes"][1][0]
        np.testing.assert_allclose(G.sim_state(env), G.sim_state(envs2[2]), atol=1e-5)  # batch row (1, 0)
    finally:
        for e in envs2:
            e.close()
    assert json.dumps(again, sort_keys=True) == json.dumps(states[1], sort_keys=True)


def test_cli_on_a_work_dir(tmp_path: Path) -> None:
    """main() on a work dir holding a saved tiny SFT checkpoint and a saved critic (safetensors): JSON with the
    per-seed states, replay checks and pooled aggregates; evaluation scenes are refused."""
    pol = tiny_policy(0)
    save_policy(pol, tmp_path / "sft-push-s0-tiny", version="sft-v1", summary={"kind": "sft"})
    (tmp_path / "critic-push-s0-abc").mkdir()
    save_critic(tiny_critic(), tmp_path / "critic-push-s0-abc", extra={"features": "rl-token"})
    out = tmp_path / "gt.json"
    res = G.main(["--work", str(tmp_path), "--task", "push", "--seeds", "0", "--states", "1", "--n", "2",
                  "--reps", "2", "--n-exec", str(N_EXEC), "--check-replay", "1", "--boot", "50", "--out", str(out),
                  "--max-episode-steps", "12"])
    on_disk = json.loads(out.read_text())
    assert on_disk["pooled"]["states"] == 1 and res["seeds"][0]["replay"][0]["exact"]
    st = on_disk["seeds"]["0"]["states"][0]
    assert st["scene_seed"] == 200_000 and st["episode_steps"] == 12 and len(st["outcomes"]) == 2
    with pytest.raises(SystemExit):
        G.main(["--work", str(tmp_path), "--task", "push", "--seeds", "0", "--first-scene", "700000"])
    pooled = G.main(["--combine", str(out), str(out), "--boot", "50"])
    assert pooled["pooled"]["states"] == 2 and pooled["n_reps"] == [2, 2]
    assert pooled["pooled"]["p_mean"]["mean"] == st["p_mean"]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**on_disk, "settings": {**on_disk["settings"], "reps": 4}}))
    with pytest.raises(SystemExit, match="same --n and --reps"):
        G.main(["--combine", str(out), str(other)])


def mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def test_rescore_judges_another_critic_on_the_stored_states(tmp_path: Path) -> None:
    """--rescore: the same states and stored outcomes, the candidates re-drawn (checked to reproduce), Q from the
    critic of another work dir; the same critic reproduces the stored Q exactly; mismatches are refused."""
    work = tmp_path / "w"
    save_policy(tiny_policy(0), work / "sft-push-s0-tiny", version="sft-v1", summary={"kind": "sft"})
    save_critic(tiny_critic(0), mkdir(work / "critic-push-s0-abc"), extra={"features": "rl-token"})
    out = tmp_path / "gt.json"
    G.main(["--work", str(work), "--task", "push", "--seeds", "0", "--states", "2", "--n", "3", "--reps", "2",
            "--n-exec", str(N_EXEC), "--check-replay", "0", "--boot", "50", "--out", str(out),
            "--max-episode-steps", "12"])
    stored = json.loads(out.read_text())["seeds"]["0"]["states"]
    same = G.main(["--rescore", str(out), "--work", str(work), "--boot", "50"])
    assert [s["q"] for s in same["states"]] == [s["q"] for s in stored]
    assert same["pooled"]["critic_gain_new_minus_stored"]["mean"] == 0.0
    assert [s["outcomes"] for s in same["states"]] == [s["outcomes"] for s in stored]
    other = tmp_path / "w2"
    save_policy(tiny_policy(0), other / "sft-push-s0-tiny", version="sft-v1", summary={"kind": "sft"})
    save_critic(tiny_critic(1), mkdir(other / "critic-push-s0-def"), extra={"features": "rl-token"})
    res = G.main(["--rescore", str(out), "--work", str(other), "--boot", "50", "--out", str(tmp_path / "r.json")])
    assert res["critics"] == {"s0": "critic-push-s0-def"} and res["pooled"]["new"]["states"] == 2
    assert [s["q"] for s in res["states"]] != [s["q"] for s in stored]
    assert json.loads((tmp_path / "r.json").read_text())["states"][0]["q_stored"] == stored[0]["q"]
    save_critic(tiny_critic(2), mkdir(other / "critic-push-s0-ghi"), extra={"features": "rl-token"})
    with pytest.raises(SystemExit, match="exactly one critic"):
        G.main(["--rescore", str(out), "--work", str(other)])
    wrong = tmp_path / "w3"
    save_policy(tiny_policy(1), wrong / "sft-push-s0-tiny", version="sft-v1", summary={"kind": "sft"})
    save_critic(tiny_critic(0), mkdir(wrong / "critic-push-s0-abc"), extra={"features": "rl-token"})
    with pytest.raises(SystemExit, match="do not reproduce"):  # same name, other weights: caught by the replay
        G.main(["--rescore", str(out), "--work", str(wrong)])
    renamed = tmp_path / "w4"
    save_policy(tiny_policy(0), renamed / "sft-push-s0-other", version="sft-v1", summary={"kind": "sft"})
    with pytest.raises(SystemExit, match="was measured with"):
        G.main(["--rescore", str(out), "--work", str(renamed)])


def test_candidate_offset_widens_the_candidates_and_rescore_redraws_them(tmp_path: Path) -> None:
    """--candidate-offset s: seeded constant offsets in the normalised action space (zero on padded dims; s = 0 is
    no offset at all); the recorded states carry wider candidates, and --rescore re-draws the same ones."""
    pol = tiny_policy(0)
    assert G.candidate_offsets(pol, 3, 0.0, 0, 200_000) is None
    off = G.candidate_offsets(pol, 64, 0.5, 0, 200_000)
    assert off.shape == (64, 1, 1, pol.action_dim)
    assert torch.equal(off, G.candidate_offsets(pol, 64, 0.5, 0, 200_000))
    assert not off[..., pol.real_action_dim:].any() and 0.35 < float(off[..., :pol.real_action_dim].std()) < 0.65
    work = tmp_path / "w"
    save_policy(pol, work / "sft-push-s0-tiny", version="sft-v1", summary={"kind": "sft"})
    save_critic(tiny_critic(0), mkdir(work / "critic-push-s0-abc"), extra={"features": "rl-token"})
    runs = {}
    for s in (0.0, 0.5):
        out = tmp_path / f"gt{s}.json"
        G.main(["--work", str(work), "--task", "push", "--seeds", "0", "--states", "2", "--n", "3", "--reps", "2",
                "--n-exec", str(N_EXEC), "--check-replay", "0", "--boot", "50", "--out", str(out),
                "--max-episode-steps", "12", "--candidate-offset", str(s)])
        runs[s] = out
    plain = json.loads(runs[0.0].read_text())["seeds"]["0"]["states"]
    wide = json.loads(runs[0.5].read_text())["seeds"]["0"]["states"]
    assert [s["branch_step"] for s in plain] == [s["branch_step"] for s in wide]
    assert all(w["candidate_spread"] > p["candidate_spread"] for p, w in zip(plain, wide, strict=True))
    again = G.main(["--rescore", str(runs[0.5]), "--work", str(work), "--boot", "50"])
    assert [s["q"] for s in again["states"]] == [s["q"] for s in wide]
