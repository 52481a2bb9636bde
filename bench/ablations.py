"""Critic quality and Q-VGM ablations on ONE task from ONE shared buffer, tuning seeds only (never 900000+).

Two modes, both printing JSON (stdout + --out):

* `--mode critic`: for each variant (ImproveConfig overrides), fit the critic on the buffer's training episodes and
  measure it on held-out episodes (`--holdout` of them, stratified by outcome): Pearson correlation of Q(s, a_data)
  with the Monte-Carlo return, calibration (mean Q vs mean MC return, MAE), ensemble spread, and the AUC of Q for
  "this transition's episode succeeds" (sparse 0/1 reward: ranking successes above failures is what the actor
  needs).
* `--mode qvgm`: Q-VGM variants (METHOD.md §5: RL token vs pooled features, no per-layer injection, single critic
  head, gate variants, safeguards) trained from the same SFT policy and buffer; critics are shared between variants
  whose critic settings agree. Each is evaluated closed-loop on tuning seeds 200000 + j next to SFT (Wilson 95 %
  intervals). With `--diagnose`, the sign/scale diagnostic of the Q-VGM target on held-out transitions is added
  (see `target_diagnostic`).

The SFT policy and buffer come from bench/learning.py's recipe (`--demos`, `--demo-noise`, `--sft-steps`,
`--rollouts`, seeds DEMO0 + k / ROLL0 + k) and are reused from `--work` when present. Usage::

    .venv/bin/python bench/ablations.py --mode critic --task push --work /tmp/abl --variants \\
        'calql-w1={"reg_weight": 1.0}' 'calql-w0.1={"reg_weight": 0.1}'
    .venv/bin/python bench/ablations.py --mode qvgm --task push --work /tmp/abl --tune-episodes 40
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # bench/, repo root
import learning as L  # noqa: E402

from bench.report import emit, machine  # noqa: E402
from critic_trainer import pipeline as P  # noqa: E402
from critic_trainer.critic import QEnsemble, critic_action  # noqa: E402
from critic_trainer.qvgm import bind_critic, q_ascent  # noqa: E402
from critic_trainer.sft import batch_inputs, encode_inputs  # noqa: E402

# critic settings: variants that agree on these share one fitted critic
CRITIC_KEYS = ("critic_features", "critic_objective", "ensemble", "critic_hidden", "critic_steps", "critic_batch",
               "critic_lr", "reg_weight", "num_ref", "per_layer_injection", "critic_layer_norm", "critic_dropout",
               "gamma", "n_exec", "seed", "holdout")

# METHOD.md §5 ablations (+ the safeguards of this work), as ImproveConfig overrides of --base
QVGM_VARIANTS: dict[str, dict[str, Any]] = {
    "qvgm": {},
    "pooled-features": {"critic_features": "pooled"},
    "no-per-layer-injection": {"per_layer_injection": False},
    "single-critic-head": {"ensemble": 1},
    "gate-smooth": {"gate": "smooth"},
    "gate-last-2": {"gate_last_m": 2},
    "safeguarded": {"aggregate": "lcb", "lcb_beta": 1.0, "max_shift": 0.05, "trust_origin": "reference",
                    "actor_eval_every": 25, "actor_patience": 3},
}


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve of `score` for bool `label` (Mann-Whitney, ties count half); nan if one class."""
    pos, neg = score[label], score[~label]
    if not len(pos) or not len(neg):
        return float("nan")
    order = np.argsort(np.r_[pos, neg], kind="mergesort")
    ranks = np.empty(len(order))
    allv = np.r_[pos, neg][order]
    ranks[order] = np.arange(1, len(order) + 1)
    for v in np.unique(allv):  # average ranks of ties
        idx = order[allv == v]
        ranks[idx] = ranks[idx].mean()
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


@torch.no_grad()
def outcome_auc(critic: QEnsemble, features: Any, tr: Any, success: np.ndarray) -> float:
    """AUC of ensemble-mean Q(s, a_data) for "the transition's episode succeeded" (success: bool per frame)."""
    from critic_trainer.transitions import critic_batch

    b = critic_batch(features, tr, np.arange(len(tr)))
    q = critic(b.z, b.p, b.actions).mean(0).numpy()
    return auc(q, success[tr.index])


def setup(args: argparse.Namespace, work: Path):
    """SFT policy + rollout buffer of bench/learning.py's recipe (reused from `work`)."""
    largs = argparse.Namespace(sft_steps=args.sft_steps)
    pol, ck, info = L.train_sft_policy(args.task, args.demos, args.demo_noise, 0, work, largs)
    buf_dir = work / f"buffer-{ck.name}-r{args.rollouts}"
    if (buf_dir / "roll_info.json").exists():
        roll = json.loads((buf_dir / "roll_info.json").read_text())
    else:
        roll = P.collect_rollouts(pol, args.task, [L.ROLL0 + k for k in range(args.rollouts)], buf_dir,
                                  n_exec=args.n_exec, noise_seed=7, max_episode_steps=args.max_episode_steps)
        (buf_dir / "roll_info.json").write_text(json.dumps(roll))
    buf = P.load_buffer(buf_dir, pol.horizon)
    return pol, buf, {"sft": info, "rollouts": {k: v for k, v in roll.items() if k != "seeds"}}


def fit(pol, buf, cfg: P.ImproveConfig, work: Path) -> tuple[QEnsemble, dict[str, Any], Any, Any, Any]:
    """Features (cached per kind) -> critic on training episodes -> (critic, info, features, train tr, held tr)."""
    tr = P.buffer_transitions(pol, buf, cfg.n_exec, cfg.gamma)
    feats, _ = P.extract_features(pol, buf, work / f"features-{cfg.critic_features}", cfg.n_exec,
                                  num_ref=cfg.num_ref, num_steps=cfg.num_steps, seed=cfg.seed,
                                  features=cfg.critic_features)
    held = P.holdout_episodes(buf, cfg.holdout, cfg.seed)
    tr_fit, tr_held = P.split_transitions(buf, tr, held)
    t0 = time.perf_counter()
    critic, info = P.train_critic(pol, feats, tr_fit, cfg, heldout=tr_held)
    info["fit_s"] = round(time.perf_counter() - t0, 1)
    info["heldout_episodes"] = held.tolist()
    if tr_held is not None:
        info["heldout"]["outcome_auc"] = outcome_auc(critic, feats, tr_held, buf.success)
    info["eval"]["outcome_auc"] = outcome_auc(critic, feats, tr_fit, buf.success)
    return critic, info, feats, tr_fit, tr_held


def parse_variants(items: list[str] | None, default: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    if not items:
        return dict(default)
    out = {}
    for it in items:
        name, _, js = it.partition("=")
        out[name] = json.loads(js) if js else dict(default.get(name, {}))
    return out


def make_cfg(base: dict[str, Any], over: dict[str, Any]) -> P.ImproveConfig:
    kw = {**base, **over}
    if "critic_hidden" in kw:
        kw["critic_hidden"] = tuple(kw["critic_hidden"])
    return P.ImproveConfig(**kw)


def target_diagnostic(pol, buf, critic: QEnsemble, feats, tr_held, cfg: P.ImproveConfig,
                      max_rows: int = 512) -> dict[str, Any]:
    """Is the Q-VGM target's sign/scale right on real held-out data?

    On held-out transitions (episodes the critic never saw): A_base = the SFT policy's clean chunk (fixed noise),
    A_Q = keep-best ascent from it (cfg's alpha, J, safeguards). Reports
      * gain: Qbar(A_Q) - Qbar(A_base) (what the actor is asked to chase) and the RMS shift ||A_Q - A_base||;
      * toward_data: cosine of (A_Q - A_base) with (a_data - A_base), split by the episode's outcome. If the
        critic's gradient carries real information, ascent moves toward the executed actions of SUCCESSFUL episodes
        (positive cosine) more than toward those of failed ones;
      * one_step: the residual target h = -(A_Q - A_base)/t_k at the last step (t = 1/K) makes the actor's one-step
        estimate equal A_Q exactly (|x - t (v_base + h) - A_Q| max, should be ~1e-7): sign and 1/t scale.
    """
    rows = np.arange(len(tr_held))
    if len(rows) > max_rows:
        rows = np.random.default_rng(0).choice(rows, size=max_rows, replace=False)
    frames = tr_held.index[rows]
    inputs = encode_inputs(pol, buf.demo)
    b_in = batch_inputs(inputs, torch.as_tensor(frames), pol.device)
    ctx = pol.encode(b_in)
    gen = torch.Generator().manual_seed(11)
    noise = torch.randn(len(frames), pol.horizon, pol.action_dim, generator=gen)
    with torch.no_grad():
        _, path = pol.sample(ctx, num_steps=cfg.num_steps, noise=noise, return_path=True)
        k = cfg.num_steps - 1
        x_k, t_k = path.x[k], path.t[k]
        v_base = pol.velocity(x_k, t_k.expand(len(frames)), ctx)
        a_base_full = x_k - t_k * v_base
    a_base = critic_action(a_base_full, cfg.n_exec, pol.real_action_dim)
    z = torch.as_tensor(np.asarray(feats["z_rl"][frames]))
    p = torch.as_tensor(np.asarray(feats["proprio"][frames]))
    q_fn = bind_critic(critic, z, p, how=cfg.aggregate, lcb_beta=cfg.lcb_beta)
    a_q, gain = q_ascent(q_fn, a_base, cfg.qvgm())
    h = -(a_q - a_base) / t_k
    est = x_k[:, : cfg.n_exec, : pol.real_action_dim].flatten(1) - t_k * (
        v_base[:, : cfg.n_exec, : pol.real_action_dim].flatten(1) + h)
    a_data = torch.as_tensor(tr_held.actions[rows])
    d_q, d_data = a_q - a_base, a_data - a_base
    cos = torch.nn.functional.cosine_similarity(d_q, d_data, dim=-1)
    moved = d_q.norm(dim=-1) > 1e-8
    ok = torch.as_tensor(buf.success[frames])
    dist_gain = (d_data.norm(dim=-1) - (a_data - a_q).norm(dim=-1))  # > 0: A_Q closer to the data than A_base

    def mean(x: torch.Tensor, m: torch.Tensor) -> float | None:
        return float(x[m].mean()) if bool(m.any()) else None

    return {"transitions": len(rows), "moved_frac": float(moved.float().mean()),
            "q_gain_mean": float(gain.mean()), "rms_shift": float(d_q.pow(2).mean(-1).sqrt().mean()),
            "toward_data_cos": {"success": mean(cos, moved & ok), "failure": mean(cos, moved & ~ok)},
            "closer_to_data": {"success": mean(dist_gain, moved & ok), "failure": mean(dist_gain, moved & ~ok)},
            "one_step_max_err": float((est - a_q).abs().max())}


def _continue(pol, env, obs, chunk: np.ndarray, n_exec: int, noise_seed: int) -> bool:
    """Execute the first n_exec actions of `chunk` (robot units [H, real]) from the env's current state, then let
    `pol` act (n_exec steps per chunk, sampling noise from torch seed `noise_seed`) until the episode ends."""
    torch.manual_seed(noise_seed)
    while True:
        for a in chunk[:n_exec]:
            obs, _, term, trunc, _ = env.step(a.astype(np.float32))
            if term or trunc:
                return bool(term)
        o = {"images": {}, "state": obs["state"], "prompt": obs["prompt"], "privileged": obs["privileged"]}
        chunk = pol.act([o])[0]


def mc_target_check(pol, buf, critic: QEnsemble, feats, tr_held, cfg: P.ImproveConfig, task: str,
                    rollout_seeds: list[int], n_states: int = 24, n_cont: int = 2,
                    max_episode_steps: int | None = None) -> dict[str, Any]:
    """Monte-Carlo check of the critic's ascent direction in the real sim (the sim replays bit-exactly).

    For n_states held-out frames: replay the recorded episode (scene seed = its rollout seed) up to the frame,
    then execute either the SFT policy's chunk A_base or the critic-improved A_Q (keep-best ascent on the
    critic coordinates, cfg's alpha / J / safeguards; same sampling noise) for n_exec steps and continue with the
    SFT policy (n_cont continuation noise seeds, shared by the pair). Success of the pair = an MC estimate of
    Q(s, A_Q) vs Q(s, A_base) under the SFT continuation: if the critic's gradient is right, A_Q wins more often.
    """
    from qvgm.sim import TabletopEnv

    # states from the first half of each held-out episode, half of them from successful episodes: uniformly drawn
    # frames come mostly from late in long failed episodes, where no continuation succeeds (0/24 pairs in a first
    # run: no signal either way)
    rng = np.random.default_rng(5)
    first = np.flatnonzero(np.r_[True, buf.episode[1:] != buf.episode[:-1]])
    ep_start = first[np.searchsorted(buf.episode[first], buf.episode[tr_held.index])]
    ep_len = np.bincount(np.searchsorted(np.unique(buf.episode), buf.episode))[
        np.searchsorted(np.unique(buf.episode), buf.episode[tr_held.index])]
    early = (tr_held.index - ep_start) < ep_len / 2
    ok = buf.success[tr_held.index]
    rows = []
    for group in (np.flatnonzero(early & ok), np.flatnonzero(early & ~ok)):
        k = min(len(group), n_states - len(rows) if len(rows) else (n_states + 1) // 2)
        rows += rng.choice(group, size=k, replace=False).tolist() if k > 0 else []
    rows = np.asarray(rows, dtype=np.int64)
    ep_ids = np.unique(buf.episode)
    env = TabletopEnv(task=task, render=False, max_episode_steps=max_episode_steps)
    res = {"a_base": 0, "a_q": 0, "q_wins": 0, "base_wins": 0, "pairs": 0}
    try:
        for r in rows:
            i = int(tr_held.index[r])
            e = buf.episode[i]
            start = int(np.flatnonzero(buf.episode == e)[0])
            seed = rollout_seeds[int(np.searchsorted(ep_ids, e))]
            obs_i = buf.demo.observations([i])
            with torch.no_grad():
                inp = pol.preprocess(obs_i)
                ctx = pol.encode(inp)
                noise = torch.randn(1, pol.horizon, pol.action_dim, generator=torch.Generator().manual_seed(int(r)))
                a_full = pol.sample(ctx, num_steps=cfg.num_steps, noise=noise)
            a_c = critic_action(a_full, cfg.n_exec, pol.real_action_dim)
            z = torch.as_tensor(np.asarray(feats["z_rl"][[i]]))
            p = torch.as_tensor(np.asarray(feats["proprio"][[i]]))
            a_q, _ = q_ascent(bind_critic(critic, z, p, how=cfg.aggregate, lcb_beta=cfg.lcb_beta), a_c, cfg.qvgm())
            q_full = a_full.clone()
            q_full[0, : cfg.n_exec, : pol.real_action_dim] = a_q.view(cfg.n_exec, pol.real_action_dim)
            chunks = {"a_base": pol.postprocess(a_full)[0], "a_q": pol.postprocess(q_full)[0]}
            for c in range(n_cont):
                out = {}
                for name, chunk in chunks.items():
                    obs, _ = env.reset(seed=seed, options={"task": task})
                    for a in buf.action[start:i]:
                        obs, *_ = env.step(a.astype(np.float32))
                    out[name] = _continue(pol, env, obs, chunk, cfg.n_exec, noise_seed=1000 * int(r) + c)
                    res[name] += int(out[name])
                res["q_wins"] += int(out["a_q"] and not out["a_base"])
                res["base_wins"] += int(out["a_base"] and not out["a_q"])
                res["pairs"] += 1
    finally:
        env.close()
    n = res["pairs"]
    res.update(states=len(rows), continuations=n_cont, rate_a_base=res["a_base"] / n, rate_a_q=res["a_q"] / n,
               ci95_a_base=list(P.wilson_interval(res["a_base"], n)), ci95_a_q=list(P.wilson_interval(res["a_q"], n)))
    return res


def run_critic_mode(args, pol, buf, work: Path) -> dict[str, Any]:
    rows = {}
    for name, over in parse_variants(args.variants, {"default": {}}).items():
        cfg = make_cfg(json.loads(args.base), {"holdout": args.holdout, **over})
        _, info, *_ = fit(pol, buf, cfg, work)
        rows[name] = {"overrides": over, "train": info["eval"], "heldout": info.get("heldout"),
                      "fit_s": info["fit_s"], "features": info["features"]}
        print(json.dumps({"variant": name, "heldout": info.get("heldout"), "fit_s": info["fit_s"]}), flush=True)
    return {"mode": "critic", "variants": rows}


def run_qvgm_mode(args, pol, buf, work: Path) -> dict[str, Any]:
    tune = [L.TUNE0 + j for j in range(args.tune_episodes)]
    res: dict[str, Any] = {"mode": "qvgm", "tuning_seeds": f"{tune[0]}..{tune[-1]}", "variants": {}}
    if not args.skip_sft:
        r = P.evaluate(pol, args.task, tune, n_exec=args.n_exec, max_episode_steps=args.max_episode_steps)
        res["sft"] = {k: r[k] for k in ("success_rate", "ci95", "successes", "episodes", "wall_s")}
        print(json.dumps({"variant": "sft", **res["sft"]}), flush=True)
    critics: dict[str, Any] = {}
    for name, over in parse_variants(args.variants, QVGM_VARIANTS).items():
        cfg = make_cfg(json.loads(args.base), {"holdout": args.holdout, "method": "qvgm", **over})
        ckey = json.dumps({k: getattr(cfg, k) for k in CRITIC_KEYS}, sort_keys=True, default=str)
        if ckey not in critics:
            critics[ckey] = fit(pol, buf, cfg, work)
        critic, cinfo, feats, _, tr_held = critics[ckey]
        t0 = time.perf_counter()
        held_rows = np.flatnonzero(np.isin(buf.episode, cinfo["heldout_episodes"]))
        actor, ainfo = P.train_actor(pol, buf, cfg, critic, feats, heldout_rows=held_rows)
        train_s = time.perf_counter() - t0
        ev = P.evaluate(actor, args.task, tune, n_exec=args.n_exec, max_episode_steps=args.max_episode_steps)
        row = {"overrides": over, "success_rate": ev["success_rate"], "ci95": ev["ci95"],
               "successes": ev["successes"], "episodes": ev["episodes"], "train_s": round(train_s, 1),
               "eval_s": ev["wall_s"], "critic_heldout": cinfo.get("heldout"),
               "actor": {k: ainfo.get(k) for k in ("q_policy_before", "q_policy_after", "action_shift",
                                                   "action_shift_rms_critic", "actor_final", "early_stop")}}
        if args.diagnose and tr_held is not None:
            row["target_diagnostic"] = target_diagnostic(pol, buf, critic, feats, tr_held, cfg)
            if args.mc_states > 0:
                row["mc_target_check"] = mc_target_check(
                    pol, buf, critic, feats, tr_held, cfg, args.task, [L.ROLL0 + k for k in range(args.rollouts)],
                    n_states=args.mc_states, n_cont=args.mc_continuations, max_episode_steps=args.max_episode_steps)
                print(json.dumps({"variant": name, "mc_target_check": row["mc_target_check"]}), flush=True)
        res["variants"][name] = row
        if args.out:  # a run stopped early keeps every finished variant
            args.out.with_suffix(".partial.json").write_text(json.dumps(res, indent=1, default=str))
        print(json.dumps({"variant": name, **{k: row[k] for k in ("success_rate", "ci95", "train_s")},
                          "q": [row["actor"]["q_policy_before"], row["actor"]["q_policy_after"]]}), flush=True)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["critic", "qvgm"], default="qvgm")
    ap.add_argument("--task", default="push")
    ap.add_argument("--demos", type=int, default=40)
    ap.add_argument("--demo-noise", type=float, default=0.01)
    ap.add_argument("--sft-steps", type=int, default=3000)
    ap.add_argument("--rollouts", type=int, default=100)
    ap.add_argument("--n-exec", type=int, default=5)
    ap.add_argument("--max-episode-steps", type=int, default=None)
    ap.add_argument("--holdout", type=float, default=0.2, help="fraction of buffer episodes held out of the critic")
    ap.add_argument("--base", default='{"critic_steps": 1500, "critic_hidden": [256, 256], "critic_batch": 256}',
                    help="ImproveConfig fields (JSON) shared by every variant")
    ap.add_argument("--variants", nargs="*", default=None,
                    help="NAME=JSON overrides (or a built-in NAME); default: every built-in variant of the mode")
    ap.add_argument("--tune-episodes", type=int, default=40)
    ap.add_argument("--skip-sft", action="store_true", help="qvgm mode: do not evaluate the SFT policy itself")
    ap.add_argument("--diagnose", action="store_true", help="add the target sign/scale diagnostic (qvgm mode)")
    ap.add_argument("--mc-states", type=int, default=0, help="--diagnose: held-out states of the sim MC check")
    ap.add_argument("--mc-continuations", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    pol, buf, data = setup(args, args.work)
    res = run_critic_mode(args, pol, buf, args.work) if args.mode == "critic" else \
        run_qvgm_mode(args, pol, buf, args.work)
    out = {"bench": "ablations", "task": args.task, "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                                  for k, v in vars(args).items()},
           "data": data, "buffer_episodes": int(len(np.unique(buf.episode))),
           "buffer_successes": int(len(np.unique(buf.episode[buf.success]))),
           "machine": machine(args.threads), **res, "wall_s": round(time.perf_counter() - t0, 1)}
    return emit(out, args.out)


if __name__ == "__main__":
    main()
