"""The ablation switches of issue 5 reach the code and change what they should: critic features (RL token vs
pooled, for `state` and pi05), critic objective, ensemble size and aggregation, per-layer injection, gate, the
ascent safeguards (projection, clipping, keep-best, trust region), the episode hold-out of the critic and the
actor's early stopping / keep-best by held-out LCB Q. Real policies, real replay buffers on disk, real caches."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_pipeline import tiny_policy, write_buffer

from critic_trainer import pipeline as P
from critic_trainer.features import critic_state_features, resolve_critic_features
from critic_trainer.qvgm import QVGMConfig, q_ascent, trust_region
from critic_trainer.transitions import critic_batch
from qvgm.policy import NormStats, load_policy, make_policy
from qvgm.policy.rl_token import RLToken, RLTokenConfig

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
SMALL = {"n_exec": 3, "critic_steps": 20, "critic_hidden": (32, 32), "critic_batch": 64, "actor_steps": 2,
         "actor_batch": 16, "num_ref": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("switches")
    pol_dir = tiny_policy(tmp)
    pol = load_policy(pol_dir)
    buf = P.load_buffer(write_buffer(tmp / "buf", [True, False, True, False, False, True, False, True]), pol.horizon)
    feats = {k: P.extract_features(pol, buf, tmp / f"feat-{k}", 3, num_ref=2, features=k)[0]
             for k in ("rl-token", "pooled")}
    return {"pol": pol, "dir": pol_dir, "buf": buf, "feats": feats, "tmp": tmp}


def _actor_params(pol, buf, feats, critic, **over) -> torch.Tensor:
    cfg = P.ImproveConfig(method="qvgm", **{**SMALL, **over})
    actor, _ = P.train_actor(pol, buf, cfg, critic, feats)
    return torch.cat([p.detach().flatten() for p in actor.parameters()])


def test_state_features_rl_token_vs_pooled(data):
    pol, buf = data["pol"], data["buf"]
    inputs = pol.preprocess(buf.demo.observations(range(4)))
    ctx = pol.encode(inputs)
    z_tok = critic_state_features(pol, ctx, inputs, "rl-token")
    torch.testing.assert_close(z_tok, pol.critic_features(ctx))  # encoder embedding [B, embed_dim]
    z_pool = critic_state_features(pol, ctx, inputs, "pooled")  # raw normalised state || privileged
    torch.testing.assert_close(z_pool, torch.cat([inputs["state"], inputs["privileged"]], -1).float())
    assert z_tok.shape == (4, 16) and z_pool.shape == (4, 7 + 21)
    with pytest.raises(ValueError, match="unknown critic features"):
        critic_state_features(pol, ctx, inputs, "resnet")
    # cached separately: same buffer, same policy, different keys and widths; a cache of one kind is stale for the
    # other (rebuilt, never silently reused)
    f_tok, f_pool = data["feats"]["rl-token"], data["feats"]["pooled"]
    assert f_tok.key != f_pool.key and '"features": "pooled"' in f_pool.key
    assert f_tok["z_rl"].shape[1] == 16 and f_pool["z_rl"].shape[1] == 28
    np.testing.assert_array_equal(f_tok["proprio"], f_pool["proprio"])
    _, why = P.extract_features(pol, buf, f_tok.path, 3, num_ref=2, features="pooled")
    assert why is not None and "stale" in why


def test_pi05_features_pooled_and_rl_token():
    rng = np.random.default_rng(0)
    stats = NormStats.compute(rng.uniform(-1, 1, (32, 7)), rng.uniform(-1, 1, (32, 7)))
    torch.manual_seed(0)
    pol = make_policy("pi05-tiny", stats, tasks=["push the red cube"], camera_names=["front"]).eval()
    obs = [{"images": {"front": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)}, "state": rng.uniform(-1, 1, 7)
            .astype(np.float32), "prompt": "push the red cube", "stamp": 0.0} for _ in range(2)]
    with torch.no_grad():
        inputs = pol.preprocess(obs)
        ctx = pol.encode(inputs)
        pooled = critic_state_features(pol, ctx, inputs, "pooled")
        m = ctx.prefix_mask.float()[..., None]
        torch.testing.assert_close(pooled, (ctx.prefix_out.float() * m).sum(1) / m.sum(1))  # [B, width]
        assert pooled.shape == (2, 128)
        # no trained RL token: "rl-token" is honestly reported as the pooled fallback
        assert resolve_critic_features(pol, "rl-token") == "pooled (no RL token)"
        pol.rl_token = RLToken(RLTokenConfig(width=128, max_len=ctx.prefix_out.shape[1], dim=32, heads=2,
                                             enc_layers=1, dec_layers=1)).eval()
        assert resolve_critic_features(pol, "rl-token") == "rl-token"
        z_rl = critic_state_features(pol, ctx, inputs, "rl-token")
        assert z_rl.shape == (2, 32)  # the token, not the pooled prefix
        torch.testing.assert_close(critic_state_features(pol, ctx, inputs, "pooled"), pooled)


def test_critic_switches_reach_the_critic(data):
    pol, buf, feats = data["pol"], data["buf"], data["feats"]["rl-token"]
    tr = P.buffer_transitions(pol, buf, 3, 0.99)
    c = P.build_critic(pol, feats, P.ImproveConfig(**SMALL, ensemble=3, per_layer_injection=False,
                                                   critic_layer_norm=True, critic_dropout=0.1))
    assert c.num_q == 3 and not c.cfg.per_layer_injection and c.cfg.layer_norm and c.cfg.dropout == 0.1
    assert c.hidden[1].weight.shape[1] == 32 and c.out.weight.shape[1] == 32  # action enters layer 0 only
    c2 = P.build_critic(pol, feats, P.ImproveConfig(**SMALL))
    assert c2.hidden[1].weight.shape[1] == 32 + 21 and c2.out.weight.shape[1] == 32 + 21
    # dropout acts in training mode only
    b = critic_batch(feats, tr, np.arange(8))
    c.train()
    assert not torch.allclose(c(b.z, b.p, b.actions), c(b.z, b.p, b.actions))
    c.eval()
    torch.testing.assert_close(c(b.z, b.p, b.actions), c(b.z, b.p, b.actions))
    # objectives: Cal-QL and CQL share a seed but differ by the calibration; IQL trains a value net instead
    out = {}
    for obj in ("calql", "cql", "iql"):
        critic, info = P.train_critic(pol, feats, tr, P.ImproveConfig(**SMALL, critic_objective=obj))
        out[obj] = (torch.cat([p.flatten() for p in critic.parameters()]), info["final"])
    assert "reg" in out["calql"][1] and "reg" in out["cql"][1] and "value_loss" in out["iql"][1]
    assert not torch.equal(out["calql"][0], out["cql"][0]) and not torch.equal(out["calql"][0], out["iql"][0])


def test_actor_switches_change_the_update(data):
    """Aggregation, gate, trust region and features each change the trained actor; the same config twice does not."""
    pol, buf, feats = data["pol"], data["buf"], data["feats"]["rl-token"]
    tr = P.buffer_transitions(pol, buf, 3, 0.99)
    critic, _ = P.train_critic(pol, feats, tr, P.ImproveConfig(**SMALL, ensemble=3))
    base = _actor_params(pol, buf, feats, critic)
    torch.testing.assert_close(base, _actor_params(pol, buf, feats, critic))  # deterministic
    for over in ({"aggregate": "min"}, {"aggregate": "lcb", "lcb_beta": 2.0}, {"gate": "smooth"},
                 {"max_shift": 0.0}, {"ascent_lr": 0.5}):
        assert not torch.allclose(base, _actor_params(pol, buf, feats, critic, **over)), over
    # max_shift = 0: A_Q = A_base, so the target residual is zero: the actor only anchors to the reference
    cfg = P.ImproveConfig(method="qvgm", **{**SMALL, "max_shift": 0.0})
    _, summ = P.train_actor(pol, buf, cfg, critic, feats)
    assert summ["actor_final"]["h_norm"] == 0.0 and summ["actor_final"]["ascent_gain"] == 0.0
    # the safeguards map one to one onto the Q-VGM config
    q = P.ImproveConfig(project=False, clip_grad=False, keep_best=False, max_shift=0.1, gate="last-M",
                        gate_last_m=3).qvgm()
    assert (q.project, q.clip_grad, q.keep_best, q.max_shift, q.gate, q.gate_last_m) == \
        (False, False, False, 0.1, "last_m", 3)
    # pooled features: a critic on 28-dim raw state, the actor trains against it
    critic_p, info = P.train_critic(pol, data["feats"]["pooled"], tr,
                                    P.ImproveConfig(**SMALL, critic_features="pooled"))
    assert critic_p.cfg.feature_dim == 28 and info["features"] == "pooled"
    assert not torch.allclose(base, _actor_params(pol, buf, data["feats"]["pooled"], critic_p))
    with pytest.raises(ValueError, match="critic features"):
        P.ImproveConfig(critic_features="resnet")


def test_trust_region_bounds_the_ascent():
    class Linear:
        def __call__(self, a):
            return a.sum(-1)

    a0 = torch.zeros(4, 10)
    a_q, gain = q_ascent(Linear(), a0, QVGMConfig(ascent_steps=4, ascent_lr=0.05, max_shift=0.08))
    rms = (a_q - a0).pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.full((4,), 0.08))  # would be 0.2 without the bound
    assert torch.all(gain > 0)
    x = torch.tensor([[0.9, -0.9, 0.0]])
    o = torch.tensor([[0.5, -0.5, 0.0]])
    assert torch.equal(trust_region(x, o, 10.0), x)  # inside the region: untouched
    y = trust_region(torch.tensor([[1.0, -1.0, 1.0]]), o, 0.1)
    assert y.abs().max() <= 1.0 and float((y - o).pow(2).mean().sqrt()) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        trust_region(x, o, -1.0)


def test_holdout_and_early_stopping_keep_the_best_actor(data):
    pol, buf, feats = data["pol"], data["buf"], data["feats"]["rl-token"]
    held = P.holdout_episodes(buf, 0.25, seed=0)
    ok = set(np.unique(buf.episode[buf.success]).tolist())
    assert len(held) == 2 and any(e in ok for e in held) and any(e not in ok for e in held)  # stratified
    np.testing.assert_array_equal(held, P.holdout_episodes(buf, 0.25, seed=0))
    tr = P.buffer_transitions(pol, buf, 3, 0.99)
    fit_tr, held_tr = P.split_transitions(buf, tr, held)
    assert len(fit_tr) + len(held_tr) == len(tr)
    assert not set(buf.episode[fit_tr.index]) & set(buf.episode[held_tr.index])
    critic, info = P.train_critic(pol, feats, fit_tr, P.ImproveConfig(**SMALL), heldout=held_tr)
    assert info["heldout_transitions"] == len(held_tr) and "mc_corr" in info["heldout"]
    rows = np.flatnonzero(np.isin(buf.episode, held))
    cfg = P.ImproveConfig(method="qvgm", **{**SMALL, "actor_steps": 6, "actor_lr": 3e-3, "actor_eval_every": 2,
                                            "actor_patience": 1, "aggregate": "lcb"})
    actor, summ = P.train_actor(pol, buf, cfg, critic, feats, heldout_rows=rows)
    es = summ["early_stop"]
    lcbs = [c["lcb"] for c in es["curve"]]
    assert es["best_lcb"] == max(lcbs) and es["curve"][0]["step"] == 0 and es["steps_run"] <= 6
    # the returned actor IS the best checkpoint by held-out LCB Q (recomputed with the same rows and noise)
    stop_rows = np.random.default_rng(cfg.seed + 98).choice(rows, size=min(256, len(rows)), replace=False)
    inputs = P.encode_inputs(actor, buf.demo)
    again = P.policy_q_stats(actor, inputs, critic, feats, stop_rows, cfg, seed=4321)
    assert again["lcb"] == pytest.approx(es["best_lcb"], abs=1e-5)
    if es["best_step"] == 0:  # nothing beat the input policy: the input comes back unchanged
        for a, b in zip(actor.parameters(), pol.parameters(), strict=True):
            torch.testing.assert_close(a, b)
    # improve() wires the hold-out into both the critic and the actor
    cfg2 = P.ImproveConfig(method="qvgm", **{**SMALL, "holdout": 0.25, "actor_eval_every": 1})
    _, _, s = P.improve(pol, buf, cfg2, work=data["tmp"] / "imp", cache_dir=feats.path)
    assert s["heldout_episodes"] == held.tolist() and "heldout" in s["critic"] and "early_stop" in s["actor"]
    assert s["features"]["kind"] == "rl-token"


def test_cli_switches_end_to_end(data, tmp_path):
    from critic_trainer.cli import main

    out = tmp_path / "ck"
    rc = main(["qvgm", "--dataset", str(data["buf"].path), "--policy", str(data["dir"]), "--out", str(out),
               "--critic-steps", "10", "--actor-steps", "2", "--critic-hidden", "16", "16", "--n-exec", "3",
               "--no-progress", "--threads", "1", "--critic-features", "pooled", "--no-per-layer-injection",
               "--ensemble", "3", "--aggregate", "lcb", "--lcb-beta", "0.5", "--max-shift", "0.05", "--holdout",
               "0.25", "--actor-eval-every", "1", "--critic-layer-norm"])
    assert rc == 0
    meta = json.loads((out / "critic.json").read_text())
    assert meta["features"] == "pooled" and meta["config"]["feature_dim"] == 28 and meta["aggregate"] == "lcb"
    assert meta["config"]["num_q"] == 3 and not meta["config"]["per_layer_injection"] and meta["config"]["layer_norm"]
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    assert summary["config"]["max_shift"] == 0.05 and summary["config"]["lcb_beta"] == 0.5
    critic, _ = P.load_critic(out)  # test-time wrappers read the same features as the critic was trained on
    w = P.BestOfNPolicy(data["pol"], critic, n=2, n_exec=3, features=meta["features"])
    assert w.act(data["buf"].demo.observations([0])).shape == (1, data["pol"].horizon, 7)


def test_ablation_bench_helpers(data):
    spec = importlib.util.spec_from_file_location("bench_ablations", ROOT / "bench" / "ablations.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True])) == 0.75
    assert mod.auc(np.array([1.0, 1.0]), np.array([True, False])) == 0.5
    pol, buf, feats = data["pol"], data["buf"], data["feats"]["rl-token"]
    cfg = P.ImproveConfig(**SMALL, holdout=0.25)
    critic, info, feats, _, tr_held = mod.fit(pol, buf, cfg, data["tmp"])
    assert 0.0 <= info["heldout"]["outcome_auc"] <= 1.0
    d = mod.target_diagnostic(pol, buf, critic, feats, tr_held, cfg)
    assert d["one_step_max_err"] < 1e-5  # sign and 1/t scale of h: the one-step estimate lands on A_Q
    assert d["q_gain_mean"] >= 0.0 and d["transitions"] == len(tr_held)
    # the sim MC check runs paired episodes (A_base vs A_Q, same continuation noise) from replayed buffer frames
    mc = mod.mc_target_check(pol, buf, critic, feats, tr_held, cfg, "push", list(range(8)), n_states=2, n_cont=1,
                             max_episode_steps=30)
    assert mc["pairs"] == 2 and mc["states"] == 2 and mc["q_wins"] + mc["base_wins"] <= 2
    assert 0.0 <= mc["rate_a_q"] <= 1.0 and mc["ci95_a_q"][0] <= mc["rate_a_q"] <= mc["ci95_a_q"][1]


def test_trust_region_around_the_reference_sample(data):
    """trust_origin="reference": the region is centred on the reference's own sample, so an A_base that already
    drifted (a late-step gate compounds per-step shifts along the chain) is pulled back into it."""

    class Linear:
        def __call__(self, a):
            return a.sum(-1)

    origin = torch.zeros(3, 1, 6)
    drifted = torch.full((3, 2, 6), 0.5)  # [B, M gated steps, A], far outside a 0.1 region
    a_q, _ = q_ascent(Linear(), drifted, QVGMConfig(ascent_steps=2, ascent_lr=0.05, max_shift=0.1), origin=origin)
    assert torch.all((a_q - origin).pow(2).mean(-1).sqrt() <= 0.1 + 1e-6)
    pol, buf, feats = data["pol"], data["buf"], data["feats"]["rl-token"]
    tr = P.buffer_transitions(pol, buf, 3, 0.99)
    critic, _ = P.train_critic(pol, feats, tr, P.ImproveConfig(**SMALL))
    a = _actor_params(pol, buf, feats, critic, max_shift=0.05, actor_lr=3e-3, actor_steps=3)
    b = _actor_params(pol, buf, feats, critic, max_shift=0.05, actor_lr=3e-3, actor_steps=3, trust_origin="reference")
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="trust origin"):
        P.ImproveConfig(trust_origin="data")
