"""critic_trainer.pipeline: feature extraction + cache invalidation, `critic_trainer qvgm` end to end on a tiny
replay buffer written here (real files, real safetensors, real CheckpointStore), every --method, the evaluation
CI math, closed-loop evaluation in the MuJoCo sim, and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from critic_trainer import pipeline as P
from critic_trainer.demos import write_privileged
from qvgm.data import ReplayBuffer
from qvgm.policy import NormStats, load_policy, make_policy, save_policy

torch.set_num_threads(1)
JOINTS = [f"j{i}" for i in range(7)]
TINY = {"hidden": 32, "embed_dim": 16, "head_hidden": 64, "head_depth": 2, "time_dim": 16, "horizon": 6}
FAST = ["--critic-steps", "30", "--actor-steps", "3", "--critic-hidden", "32", "32", "--no-progress",
        "--threads", "1"]


def write_buffer(root: Path, outcomes: list[bool], length: int = 24, action_dim: int = 7, seed: int = 0,
                 priv_dim: int = 21) -> Path:
    """A state-only buffer: episode k succeeds (reward 1 + done on its last frame) iff outcomes[k]."""
    rng = np.random.default_rng(seed)
    buf = ReplayBuffer.create(root, fps=10, cameras={}, state_names=JOINTS, action_names=JOINTS[:action_dim]
                              if action_dim <= 7 else [f"a{i}" for i in range(action_dim)])
    try:
        for ok in outcomes:
            ep = buf.begin_episode(task="push the red cube", start_stamp=0.0)
            goal = rng.uniform(-0.5, 0.5, action_dim)
            for i in range(length):
                last = i == length - 1
                state = (goal[:7] if action_dim >= 7 else np.r_[goal, np.zeros(7 - action_dim)]) * i / length
                ep.add_frame({"images": {}, "state": state.astype(np.float32) + 0.01 * rng.normal(size=7),
                              "prompt": "push the red cube", "stamp": i * 0.1},
                             (goal + (0.0 if ok else 0.3) + 0.01 * rng.normal(size=action_dim)).astype(np.float32),
                             reward=float(ok and last), done=bool(ok and last), policy_version="sft")
            idx = ep.finish(success=ok, label_source="auto")
            write_privileged(root, idx, rng.normal(size=(length, priv_dim)).astype(np.float32))
    finally:
        buf.close()
    return root


def tiny_policy(tmp: Path, name: str = "sft", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    stats = NormStats.compute(rng.uniform(-0.5, 0.5, (64, 7)), rng.uniform(-0.8, 0.8, (64, 7)))
    pol = make_policy("state", stats, state_dim=7, privileged_dim=21, **TINY)
    save_policy(pol, tmp / name, version=f"{name}-v1", summary={"kind": "sft"})
    return tmp / name


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe")
    return {"buffer": write_buffer(tmp / "buf", [True, False, True, False, False, True]),
            "policy": tiny_policy(tmp), "tmp": tmp}


def cli(argv: list[str]) -> int:
    """`critic_trainer ARGV` through the real entry point."""
    from critic_trainer import cli as C

    return C.main(argv)


def test_extract_features_and_cache_invalidation(data, tmp_path):
    pol = load_policy(data["policy"])
    buf = P.load_buffer(data["buffer"], pol.horizon)
    assert len(buf) == 6 * 24 and buf.success.sum() == 3 * 24
    cache, why = P.extract_features(pol, buf, tmp_path / "feat", n_exec=3, num_ref=2)
    assert why is not None  # first build
    assert cache["z_rl"].shape == (len(buf), 16) and cache["proprio"].shape == (len(buf), 7)
    assert cache["ref_actions"].shape == (len(buf), 2, 3 * 7)
    # z_rl is the policy's critic_features of the frame's encoded observation
    with torch.no_grad():
        inp = pol.preprocess(buf.demo.observations([5, 77]))
        np.testing.assert_allclose(cache["z_rl"][[5, 77]], pol.critic_features(pol.encode(inp)).numpy(), atol=1e-5)
        np.testing.assert_allclose(cache["proprio"][[5, 77]], inp["state"].numpy(), atol=1e-6)
    # same checkpoint: reused; a new checkpoint (other weights) rebuilds it
    again, why2 = P.extract_features(load_policy(data["policy"]), buf, tmp_path / "feat", n_exec=3, num_ref=2)
    assert why2 is None and again.key == cache.key
    other = load_policy(tiny_policy(tmp_path, "sft2", seed=1))
    rebuilt, why3 = P.extract_features(other, buf, tmp_path / "feat", n_exec=3, num_ref=2)
    assert why3 is not None and "stale" in why3 and rebuilt.key != cache.key
    assert not np.allclose(rebuilt["z_rl"][:10], cache["z_rl"][:10])


def test_cli_qvgm_out_dir_end_to_end(data, tmp_path):
    out = tmp_path / "new"
    rc = cli(["qvgm", "--dataset", str(data["buffer"]), "--policy", str(data["policy"]), "--out", str(out),
              "--n-exec", "3", *FAST])
    assert rc == 0
    pol = load_policy(out)  # verifies sha256 of every file, safetensors only
    m = pol.manifest
    assert m["parent"] == "sft-v1" and m["summary"]["method"] == "qvgm"
    s = m["summary"]
    assert set(s["critic"]["eval"]) >= {"mc_corr", "q_data", "mc_return"}
    assert {"q_policy_before", "q_policy_after", "actor_final", "action_shift"} <= set(s["actor"])
    assert "critic.safetensors" in m["files"]
    critic, meta = P.load_critic(out)
    assert critic.cfg.action_dim == 3 * 7 and meta["config"]["num_q"] == 2
    # weights moved, scalars logged
    base = load_policy(data["policy"])
    assert any(not torch.equal(a, b) for a, b in zip(pol.state_dict().values(), base.state_dict().values(),
                                                     strict=True))
    lines = [json.loads(x) for x in (Path(str(out) + ".work") / "scalars.jsonl").read_text().splitlines()]
    assert {ln["stage"] for ln in lines} >= {"critic", "critic_eval", "actor_qvgm", "actor_eval"}
    # the same scalars as TensorBoard events (tensorboard is a pinned dependency)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(Path(str(out) + ".work") / "tb"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert any(t.startswith("critic/") for t in tags) and any(t.startswith("actor_qvgm/") for t in tags), tags


def test_cli_publishes_into_store_with_parent(data, tmp_path):
    from qvgm.checkpoints import CheckpointStore

    store = tmp_path / "store"
    rc = cli(["qvgm", "--dataset", str(data["buffer"]), "--policy", str(data["policy"]), "--store", str(store),
              "--n-exec", "3", "--ensemble", "3", "--aggregate", "lcb", "--gate", "smooth", "--no-projection",
              "--no-clipping", "--no-keep-best", "--critic-objective", "cql", *FAST])
    assert rc == 0
    st = CheckpointStore(store)
    vs = st.versions()
    assert len(vs) == 2  # the input (published first, not current) and the improved version
    new = st.current()
    assert new == vs[-1].version and vs[-1].parent == vs[0].version
    assert vs[0].manifest["summary"]["kind"] == "sft"
    s = st.manifest(new)["summary"]
    assert s["init_version"] == "sft-v1" and s["config"]["ensemble"] == 3 and s["config"]["gate"] == "smooth"
    assert s["config"]["project"] is False and s["config"]["critic_objective"] == "cql"
    load_policy(st.path(new))
    # an input already in the store is its own parent, nothing else is published
    rc = cli(["qvgm", "--dataset", str(data["buffer"]), "--policy", str(st.path(new)), "--store", str(store),
              "--n-exec", "3", "--method", "sft", *FAST])
    assert rc == 0
    vs2 = CheckpointStore(store).versions()
    assert len(vs2) == 3 and vs2[-1].parent == new


@pytest.mark.parametrize("method", ["qdistill", "dql", "filtered-bc", "sft"])
def test_every_method_trains_and_saves(data, tmp_path, method):
    pol = load_policy(data["policy"])
    buf = P.load_buffer(data["buffer"], pol.horizon)
    cfg = P.ImproveConfig(method=method, n_exec=3, critic_steps=20, critic_hidden=(32, 32), actor_steps=3,
                          actor_batch=16, actor_lr=1e-3, num_steps=4)
    actor, critic, summary = P.improve(pol, buf, cfg, work=tmp_path / "w")
    assert (critic is not None) == (method in P.CRITIC_METHODS)
    assert summary["actor"]["action_shift"] > 0  # the weights moved and change the sampled chunks
    assert np.isfinite(summary["actor"]["actor_final"]["loss"])
    m = P.publish(actor, critic, summary, data["policy"], out=tmp_path / "ck")
    assert m["parent"] == "sft-v1"
    assert load_policy(tmp_path / "ck").manifest["summary"]["method"] == method


def test_dql_backpropagates_through_the_chain(data):
    """FlowPolicyBase.sample is no_grad; the pipeline's DQL must still get a Q gradient through all K steps."""
    from critic_trainer.baselines import diffusion_ql_loss

    pol = load_policy(data["policy"]).train().requires_grad_(True)
    inputs = pol.preprocess(P.load_buffer(data["buffer"], pol.horizon).demo.observations(range(8)))
    target = torch.full((3 * 7,), 0.5)

    def q_fn(a: torch.Tensor) -> torch.Tensor:
        return -((a - target) ** 2).sum(-1)

    loss, _ = diffusion_ql_loss(P.DifferentiableSampler(pol), inputs, q_fn, 3, num_steps=4)  # no BC term
    loss.backward()
    head = [p.grad for n, p in pol.named_parameters() if n.startswith("head.")]
    assert all(g is not None for g in head) and sum(float(g.abs().sum()) for g in head) > 0
    with pytest.raises(RuntimeError):  # the plain policy gives the Q term no graph at all
        diffusion_ql_loss(pol, inputs, q_fn, 3, num_steps=4)[0].backward()


def test_paired_comparison_by_hand():
    r = P.paired_comparison([1, 1, 1, 0, 1, 0], [0, 0, 1, 0, 1, 1])
    assert (r["wins"], r["losses"]) == (2, 1)
    assert r["p_value"] == pytest.approx(1.0)  # 3 discordant: 2 * P(X <= 1 | n 3) = 2 * 4/8 -> capped at 1
    r = P.paired_comparison([1] * 10 + [0] * 5, [0] * 10 + [0] * 5)
    assert (r["wins"], r["losses"]) == (10, 0) and r["p_value"] == pytest.approx(2 / 2**10)
    assert P.paired_comparison([0, 1], [0, 1]) == {"wins": 0, "losses": 0, "p_value": 1.0}
    with pytest.raises(ValueError, match="same scenes"):
        P.paired_comparison([1], [1, 0])


def test_wilson_interval_math():
    lo, hi = P.wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    lo, hi = P.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = P.wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)
    assert P.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        P.wilson_interval(5, 3)


def test_evaluate_closed_loop_and_test_time_wrappers(data, tmp_path):
    """Real MuJoCo episodes; seeds fixed -> reproducible; the wrappers act through the same loop."""
    pol = load_policy(data["policy"])  # 21 privileged dims = push (3 roles x 7)
    from qvgm.sim import TabletopEnv

    env = TabletopEnv(task="push", render=False, max_episode_steps=12)
    try:
        r1 = P.evaluate(pol, "push", [3, 4], n_exec=3, env=env)
        r2 = P.evaluate(pol, "push", [3, 4], n_exec=3, env=env)
        assert r1["episodes"] == 2 and r1["mean_steps"] == 12 and r1["successes"] == 0
        assert r1["ci95"] == list(P.wilson_interval(0, 2)) and r1["success_rate"] == r2["success_rate"]
        assert r1["outcomes"] == [0, 0] and r1["outcomes"] == r2["outcomes"]
        out = tmp_path / "ck"
        buf = P.load_buffer(data["buffer"], pol.horizon)
        cfg = P.ImproveConfig(method="qvgm", n_exec=3, critic_steps=10, critic_hidden=(32, 32), actor_steps=1)
        actor, critic, summary = P.improve(pol, buf, cfg, work=tmp_path / "w")
        P.publish(actor, critic, summary, data["policy"], out=out)
        critic, _ = P.load_critic(out)
        for w in (P.BestOfNPolicy(pol, critic, n=3, n_exec=3), P.QGuidedPolicy(pol, critic, scale=0.5, n_exec=3)):
            r = P.evaluate(w, "push", [5], n_exec=3, env=env)
            assert r["episodes"] == 1 and r["mean_steps"] == 12
    finally:
        env.close()
    # best-of-N picks the highest-Q candidate among the same noises
    obs = buf.demo.observations([0])
    noise = torch.randn(4, 1, pol.horizon, pol.action_dim)
    bon = P.BestOfNPolicy(pol, critic, n=4, n_exec=3)
    chosen = bon.act(obs, noise=noise)
    with torch.no_grad():
        inp = pol.preprocess(obs)
        ctx = pol.encode(inp)
        cands = [pol.sample(ctx, noise=noise[i]) for i in range(4)]
        from critic_trainer.critic import critic_action

        qs = [float(critic(pol.critic_features(ctx), inp["state"], critic_action(c, 3, 7)).mean()) for c in cands]
    np.testing.assert_allclose(chosen, pol.postprocess(cands[int(np.argmax(qs))]), atol=1e-6)


def test_collect_rollouts_writes_a_trainable_buffer(data, tmp_path):
    pol = load_policy(data["policy"])
    out = tmp_path / "roll"
    res = P.collect_rollouts(pol, "push", [1, 2], out, n_exec=3, max_episode_steps=8)
    assert res["episodes"] == 2 and res["frames"] == 16
    buf = P.load_buffer(out, pol.horizon)
    assert len(buf) == 16 and buf.demo.privileged.shape == (16, 21)
    assert not buf.success.any() and (buf.reward == 0).all()  # an untrained policy times out
    # the recorded actions are the policy's chunks executed in the sim (robot units, inside the joint limits)
    assert np.isfinite(buf.action).all() and buf.action.shape == (16, 7)


def test_branch_reps_continue_each_branch_chunk_several_times(data, tmp_path):
    """branch_reps=3: every branch chunk is continued three times, the first chunk shared bit for bit, fresh noise
    after it; all 1 + 2 x 3 episodes of a state form one branch group."""
    from qvgm.data.buffer import read_episode_rows

    pol = load_policy(data["policy"])
    res = P.collect_rollouts(pol, "push", [1], tmp_path / "b", n_exec=3, max_episode_steps=15, branches=2,
                             branch_reps=3, branch_frac=0.3)
    assert res["branch_episodes"] == 6 and res["branch_reps"] == 3
    rows = read_episode_rows(tmp_path / "b")
    notes = [json.loads(r["notes"]) for r in rows[1:]]
    assert [(n["branch"], n["rep"]) for n in notes] == [(i, r) for i in (1, 2) for r in (1, 2, 3)]
    buf = P.load_buffer(tmp_path / "b", pol.horizon)
    acts = {(n["branch"], n["rep"]): buf.action[buf.episode == k + 1] for k, n in enumerate(notes)}
    for i in (1, 2):
        for r in (2, 3):
            np.testing.assert_array_equal(acts[(i, r)][:3], acts[(i, 1)][:3])  # the same chunk at the state
            assert not np.allclose(acts[(i, r)][3:6], acts[(i, 1)][3:6])  # then its own continuation
    assert not np.allclose(acts[(1, 1)][:3], acts[(2, 1)][:3])  # two branches: two different chunks
    assert np.bincount(buf.branch_group[buf.branch_group >= 0]).tolist() == [7]
    # branch_reps=1 is the plain branch: the same buffer as before the option existed
    plain = P.collect_rollouts(pol, "push", [1], tmp_path / "p", n_exec=3, max_episode_steps=15, branches=2,
                               branch_frac=0.3)
    pbuf = P.load_buffer(tmp_path / "p", pol.horizon)
    np.testing.assert_array_equal(pbuf.action[pbuf.episode == 1], acts[(1, 1)])
    np.testing.assert_array_equal(pbuf.action[pbuf.episode == 2], acts[(2, 1)])
    assert "branch_reps" not in plain
    with pytest.raises(ValueError, match="branch_reps"):
        P.collect_rollouts(pol, "push", [1], tmp_path / "x", branches=1, branch_reps=0)


def test_first_chunk_offset_moves_only_the_first_chunk(data):
    """FirstChunkOffset: a zero offset is the plain actor bit for bit; a nonzero one is the same sample plus the
    offset in the normalised action space, on the first chunk only; a non-flow actor is refused."""
    from qvgm.sim import TabletopEnv

    pol = load_policy(data["policy"])
    env = TabletopEnv(task="push", render=False, max_episode_steps=12)
    try:
        obs = [P.policy_observation(env.reset(seed=1)[0])]
    finally:
        env.close()
    d, real = pol.action_dim, pol.real_action_dim
    torch.manual_seed(3)
    plain = pol.act(obs)
    torch.manual_seed(3)
    np.testing.assert_array_equal(P.FirstChunkOffset(pol, torch.zeros(1, 1, d)).act(obs), plain)
    off = P.constant_action_offsets(1, d, real, 0.3, 5)[0]
    assert off.shape == (1, 1, d) and off.abs().sum() > 0
    torch.manual_seed(3)
    actor = P.FirstChunkOffset(pol, off)
    moved = actor.act(obs)
    torch.manual_seed(3)
    with torch.no_grad():
        want = pol.postprocess(pol.sample(pol.encode(pol.preprocess(obs))) + off)
    np.testing.assert_array_equal(moved, want)
    assert not np.allclose(moved, plain)
    torch.manual_seed(4)
    second = actor.act(obs)  # the offset is spent: later chunks are the actor's own
    torch.manual_seed(4)
    np.testing.assert_array_equal(second, pol.act(obs))

    class ActOnly:
        def act(self, observations):
            return plain

    with pytest.raises(ValueError, match="flow policy"):
        P.FirstChunkOffset(ActOnly(), off)
    # the offsets: seeded, N(0, sigma^2) on the real dims, zero on the padded ones
    many = P.constant_action_offsets(4000, 9, 7, 0.2, 11)
    assert many.shape == (4000, 1, 1, 9) and (many[..., 7:] == 0).all()
    assert float(many[..., :7].std()) == pytest.approx(0.2, rel=0.03)
    assert torch.equal(many, P.constant_action_offsets(4000, 9, 7, 0.2, 11))
    assert not torch.equal(many, P.constant_action_offsets(4000, 9, 7, 0.2, 12))


def test_branch_offset_explores_at_the_branch_state(data, tmp_path):
    """branch_offset=S: each branch's first chunk (shared by its continuations) is moved by its own seeded offset;
    the buffer records the moved actions at the same state; the notes and the summary say so; bad values refused."""
    from qvgm.data.buffer import read_episode_rows

    pol = load_policy(data["policy"])
    kw = {"n_exec": 3, "max_episode_steps": 15, "branches": 2, "branch_reps": 2, "branch_frac": 0.3}
    plain = P.collect_rollouts(pol, "push", [1], tmp_path / "p", **kw)
    res = P.collect_rollouts(pol, "push", [1], tmp_path / "o", branch_offset=0.3, **kw)
    assert res["branch_offset"] == 0.3 and "branch_offset" not in plain
    notes = [json.loads(r["notes"]) for r in read_episode_rows(tmp_path / "o")[1:]]
    assert [(n["branch"], n["rep"], n["offset"]) for n in notes] == [(i, r, 0.3) for i in (1, 2) for r in (1, 2)]
    pbuf, obuf = P.load_buffer(tmp_path / "p", pol.horizon), P.load_buffer(tmp_path / "o", pol.horizon)
    np.testing.assert_array_equal(obuf.action[obuf.episode == 0], pbuf.action[pbuf.episode == 0])  # the rollout
    for k in range(1, 5):
        o, p = obuf.action[obuf.episode == k], pbuf.action[pbuf.episode == k]
        np.testing.assert_array_equal(obuf.demo.state[obuf.episode == k][0], pbuf.demo.state[pbuf.episode == k][0])
        assert not np.allclose(o[:3], p[:3])  # the same noise, moved by the offset
    first = {k: obuf.action[obuf.episode == k][:3] for k in range(1, 5)}
    np.testing.assert_array_equal(first[1], first[2])  # branch 1's two continuations share its chunk
    np.testing.assert_array_equal(first[3], first[4])
    assert np.bincount(obuf.branch_group[obuf.branch_group >= 0]).tolist() == [5]
    again = P.collect_rollouts(pol, "push", [1], tmp_path / "o2", branch_offset=0.3, **kw)
    np.testing.assert_array_equal(P.load_buffer(tmp_path / "o2", pol.horizon).action, obuf.action)
    assert again["branch_frames"] == res["branch_frames"]
    for bad, match in (({"branch_offset": -0.1, "branches": 1}, "branch_offset"),
                       ({"branch_offset": float("nan"), "branches": 1}, "branch_offset"),
                       ({"branch_offset": 0.1}, "branches")):
        with pytest.raises(ValueError, match=match):
            P.collect_rollouts(pol, "push", [1], tmp_path / "x", **bad)

    class ActOnly:  # an actor without the flow policy's parts the offset is added inside
        def act(self, observations):
            return pol.act(observations)

    with pytest.raises(ValueError, match="flow policy"):
        P.collect_rollouts(ActOnly(), "push", [1], tmp_path / "x", branches=1, branch_offset=0.1)
    assert not (tmp_path / "x").exists()


def test_collect_rollouts_branches_give_within_state_contrasts(data, tmp_path):
    """branches=2: after each episode two more from one of its chunk boundaries, restored bit for bit; each a
    buffer episode of its own with its own actions there; deterministic; refused where the env cannot restore."""
    from qvgm.data.buffer import read_episode_rows

    pol = load_policy(data["policy"])
    res = P.collect_rollouts(pol, "push", [1, 2], tmp_path / "b", n_exec=3, max_episode_steps=12, branches=2)
    assert res["episodes"] == 2 and res["frames"] == 24 and res["branch_episodes"] == 4
    rows = read_episode_rows(tmp_path / "b")
    assert len(rows) == 6 and [r["notes"] is None for r in rows] == [True, False, False, True, False, False]
    buf = P.load_buffer(tmp_path / "b", pol.horizon)
    assert res["branch_frames"] == len(buf) - 24
    for main in (0, 3):
        m_rows = np.flatnonzero(buf.episode == main)
        for k in (1, 2):
            note = json.loads(rows[main + k]["notes"])
            b = note["branch_step"]
            assert note["branch_of"] == main and b % 3 == 0 and b < 0.7 * 12
            assert rows[main + k]["start_stamp"] == pytest.approx(b / 10.0)  # the push env runs at 10 Hz
            br = np.flatnonzero(buf.episode == main + k)
            assert len(br) == 12 - b  # the time limit counts from the episode's start: the step counter is restored
            # the branch starts in the main episode's state at b, bit for bit, and acts differently there
            np.testing.assert_array_equal(buf.demo.state[br[0]], buf.demo.state[m_rows[b]])
            np.testing.assert_array_equal(buf.demo.privileged[br[0]], buf.demo.privileged[m_rows[b]])
            assert not np.allclose(buf.action[br[0]], buf.action[m_rows[b]])
        assert not np.allclose(buf.action[buf.episode == main + 1][0], buf.action[buf.episode == main + 2][0])
    # a held-out split keeps an episode and its branches together (one root of the two: all three episodes)
    assert buf.root.tolist() == [0 if e < 3 else 3 for e in buf.episode]
    # the same-state groups of the critic's contrast term: the root's frame at the branch step + each branch's first
    for gid, main in enumerate((0, 3)):
        b = json.loads(rows[main + 1]["notes"])["branch_step"]
        want = [np.flatnonzero(buf.episode == main)[b], *(np.flatnonzero(buf.episode == main + k)[0] for k in (1, 2))]
        assert np.flatnonzero(buf.branch_group == gid).tolist() == want
        assert len({buf.demo.state[r].tobytes() for r in want}) == 1  # one state, three different actions
    assert (buf.branch_group >= 0).sum() == 6
    tr = P.buffer_transitions(pol, buf, 3, 0.99)
    groups = P.transition_groups(buf, tr)
    assert sorted(np.bincount(groups[groups >= 0]).tolist()) == [3, 3]
    # the contrast term needs those groups: refused on a buffer without branches
    plain = P.collect_rollouts(pol, "push", [1], tmp_path / "plain", n_exec=3, max_episode_steps=12)
    assert plain["episodes"] == 1
    pbuf = P.load_buffer(tmp_path / "plain", pol.horizon)
    assert (pbuf.branch_group == -1).all()
    assert P.transition_groups(pbuf, P.buffer_transitions(pol, pbuf, 3, 0.99)) is None
    with pytest.raises(ValueError, match="branches"):
        P.train_critic(pol, {}, tr, P.ImproveConfig(critic_contrast_weight=1.0), groups=None)
    held = P.holdout_episodes(buf, 0.5, seed=0)
    assert held.tolist() in ([0, 1, 2], [3, 4, 5])
    again = P.collect_rollouts(pol, "push", [1, 2], tmp_path / "b2", n_exec=3, max_episode_steps=12, branches=2)
    np.testing.assert_array_equal(P.load_buffer(tmp_path / "b2", pol.horizon).action, buf.action)
    assert again["branch_frames"] == res["branch_frames"]
    with pytest.raises(ValueError, match="get_sim_state"):
        P.collect_rollouts(pol, "push", [1], tmp_path / "b3", branches=1, env=object())
    with pytest.raises(ValueError, match="branches must be"):
        P.collect_rollouts(pol, "push", [1], tmp_path / "b4", branches=-1)
    assert not (tmp_path / "b3").exists() and not (tmp_path / "b4").exists()


def test_bad_inputs(data, tmp_path):
    # only failures: nothing to rank -> clear error, nothing written
    only_fail = write_buffer(tmp_path / "fail", [False, False])
    out = tmp_path / "o1"
    rc = cli(["qvgm", "--dataset", str(only_fail), "--policy", str(data["policy"]), "--out", str(out), *FAST])
    assert rc == 2 and not out.exists()
    only_succ = write_buffer(tmp_path / "succ", [True, True])
    pol = load_policy(data["policy"])
    with pytest.raises(ValueError, match="both successful and failed"):
        P.improve(pol, P.load_buffer(only_succ, pol.horizon), P.ImproveConfig(critic_steps=2, actor_steps=1),
                  work=tmp_path / "w")
    # another action space
    wide = write_buffer(tmp_path / "wide", [True, False], action_dim=9)
    with pytest.raises(ValueError, match="incompatible action space"):
        P.improve(pol, P.load_buffer(wide, pol.horizon), P.ImproveConfig(), work=tmp_path / "w2")
    # missing dataset, existing output, both/neither destinations, empty buffer
    assert cli(["qvgm", "--dataset", str(tmp_path / "nope"), "--policy", str(data["policy"]), "--out",
                str(tmp_path / "o2"), *FAST]) == 2
    assert cli(["qvgm", "--dataset", str(data["buffer"]), "--policy", str(data["policy"]), "--out",
                str(data["policy"]), *FAST]) == 2
    assert cli(["qvgm", "--dataset", str(data["buffer"]), "--policy", str(data["policy"]), *FAST]) == 2
    empty = tmp_path / "empty"
    ReplayBuffer.create(empty, fps=10, cameras={}, state_names=JOINTS, action_names=JOINTS).close()
    with pytest.raises(ValueError, match="empty"):
        P.load_buffer(empty, 6)
    with pytest.raises(ValueError, match="unknown method"):
        P.ImproveConfig(method="ppo")
