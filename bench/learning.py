"""Learning benchmark, `state` tier: SFT from few noisy demos, one fixed buffer of SFT rollouts, then every method
trained from the same buffer and the same critic, evaluated closed-loop on held-out scene seeds.

Per task and training seed s:
  1. demos:    N noisy-expert episodes (critic_trainer.demos), scene/expert seeds DEMO0 + 1000 s + k;
  2. SFT:      `state` policy by critic_trainer.sft (seed s);
  3. buffer:   R rollouts of the SFT policy (scene seeds ROLL0 + 1000 s + k), recorded as a replay buffer;
  4. critic:   one Cal-QL ensemble on features of the frozen SFT policy (critic_trainer.pipeline);
  5. methods:  qvgm, qdistill, dql, filtered-bc trained from the SFT weights on that buffer and critic; sft (the
               SFT policy itself); best-of-n and q-guided (test-time wrappers around SFT + critic); qvgm-nocritic
               and qvgm-shuffled (Q-VGM's controls: no ascent / a critic bound to other states; METHOD_OVERRIDES);
  6. eval:     E episodes on scene seeds EVAL0 + j (the same for every method and training seed; disjoint from
               all demo / rollout / tuning seeds, checked).
`--calibrate` instead trains SFT for each --demos value and evaluates it on TUNING seeds (TUNE0 + j) only, to pick
N and the expert noise so SFT lands at 40-75 % success without looking at evaluation seeds.
SFT settings (N demos, demo noise, SFT steps, `state` config flags, weight EMA) default per task to the
calibrated table critic_trainer/recipes.py (SFT_DEFAULTS here);
--demos / --demo-noise / --sft-steps / --state-flags / --ema override it.
Output: one JSON (stdout + --out): per task, per method, success rate, 95 % Wilson CI (episodes pooled over
training seeds), per-seed rates, wall time (training + evaluation), plus all seeds and settings. Usage::

    .venv/bin/python bench/learning.py --tier state --tasks push --demos 5 --train-seeds 1 --rollouts 60 \
        --eval-episodes 50 --out learning_state.json
    .venv/bin/python bench/learning.py --tier state --tasks push --calibrate --demos 3 5 10 --tune-episodes 30
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import numpy as np  # noqa: E402
import torch  # noqa: E402

from critic_trainer import pipeline as P  # noqa: E402
from critic_trainer.demos import collect_demos  # noqa: E402
from critic_trainer.recipes import FALLBACK_RECIPE, SFT_RECIPES  # noqa: E402
from critic_trainer.sft import SFTConfig, load_demo_data, train_sft  # noqa: E402
from qvgm.policy import load_policy  # noqa: E402

DEMO0, TUNE0, ROLL0, EVAL0 = 0, 200_000, 300_000, 900_000
ALL_METHODS = ("sft", "qvgm", "qvgm-nocritic", "qvgm-shuffled", "qdistill", "dql", "filtered-bc", "best-of-n",
               "q-guided")
# Q-VGM's controls. qvgm-nocritic: the same update with J = 0 ascent steps, so A_Q = A_base and the target residual
# h = 0: the actor only re-distils the frozen reference (+ anchor) on its own rollouts (with bc_weight 0 the loss and
# its gradient are exactly 0 at the reference: the control IS the SFT policy). qvgm-shuffled: the critic bound to
# other frames' states (permuted within each batch): targets move as far as Q-VGM's, in directions that carry no
# information about the state. A gap between qvgm and these controls is the critic's contribution.
METHOD_OVERRIDES: dict[str, dict[str, Any]] = {"qvgm-nocritic": {"method": "qvgm", "ascent_steps": 0},
                                               "qvgm-shuffled": {"method": "qvgm", "shuffle_critic_states": True}}

# Per-task SFT defaults: critic_trainer.recipes (the same table the loop uses; chosen on tuning seeds only).
SFT_DEFAULTS = SFT_RECIPES
FALLBACK_SFT = FALLBACK_RECIPE


def parse_flags(items: list[str] | None) -> dict[str, Any] | None:
    """["delta_actions=1", "head_hidden=768"] -> {"delta_actions": True, "head_hidden": 768}; bools as 0/1."""
    if items is None:
        return None
    out: dict[str, Any] = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not k:
            raise SystemExit(f"--state-flags wants KEY=VALUE, got {it!r}")
        out[k] = (v == "1") if v in ("0", "1") else (int(v) if v.lstrip("-").isdigit() else float(v))
    return out


def sft_settings(task: str, args: argparse.Namespace) -> dict[str, Any]:
    """SFT settings of `task`: SFT_DEFAULTS[task] with every CLI value given replacing its entry.
    demos and demo_noise are lists (several only with --calibrate)."""
    d = dict(SFT_DEFAULTS.get(task, FALLBACK_SFT))
    flags = parse_flags(args.state_flags)
    return {"demos": list(args.demos) if args.demos else [d["demos"]],
            "success_only": bool(d.get("success_only", False) if args.success_only is None else args.success_only),
            "demo_noise": list(args.demo_noise) if args.demo_noise else [d["demo_noise"]],
            "sft_steps": int(args.sft_steps or d["sft_steps"]),
            "state_flags": dict(d["state_flags"]) if flags is None else flags,
            "ema": float(d["ema"] if args.ema is None else args.ema)}


def sft_tag(st: dict[str, Any]) -> str:
    """Checkpoint-name suffix for non-default config flags / EMA ('' when none: names of older runs unchanged)."""
    parts = [f"{k}{int(v) if isinstance(v, bool) else v}" for k, v in sorted(st["state_flags"].items())]
    if st["ema"]:
        parts.append(f"ema{st['ema']}")
    if st.get("success_only"):
        parts.append("success")
    return ("-" + "-".join(parts)) if parts else ""


def demo_seeds(s: int, n: int) -> list[int]:
    return [DEMO0 + 1000 * s + k for k in range(n)]


_GYM_ENVS: dict[tuple[str, Any], Any] = {}


def gym_env(args: argparse.Namespace) -> dict[str, Any]:
    """{"env": the --env-spec env (qvgm.envs.GymEnvAdapter, one per run)} or {} for the built-in TabletopEnv."""
    if getattr(args, "env_spec", None) is None:
        return {}
    key = (str(args.env_spec), args.max_episode_steps)
    if key not in _GYM_ENVS:
        from qvgm.envs import load_env_spec

        _GYM_ENVS[key] = load_env_spec(args.env_spec).make(max_episode_steps=args.max_episode_steps)
    return {"env": _GYM_ENVS[key]}


def spec_policy_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The --env-spec's `policy` config overrides for SFT ({} for the built-in sim)."""
    if getattr(args, "env_spec", None) is None:
        return {}
    from qvgm.envs import load_env_spec

    return dict(load_env_spec(args.env_spec).policy)


def record_demos(task: str, n_demos: int, noise: float, seed: int, root: Path,
                 args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """Demos for SFT -> (dataset dir, collection summary): the sim's noisy expert, the --env-spec expert, or the
    first n_demos episodes of the --env-spec demo dataset (seeds unknown: [])."""
    if getattr(args, "env_spec", None) is None:
        return root, collect_demos(task, n_demos, root, noise=noise, seed=demo_seeds(seed, n_demos)[0], render=False)
    from critic_trainer.env_demos import collect_env_demos
    from qvgm.envs import load_env_spec

    spec = load_env_spec(args.env_spec)
    if spec.dataset_path() is not None:
        return spec.dataset_path(), {"seeds": [], "successes": None, "dataset": str(spec.dataset_path())}
    return root, collect_env_demos(spec, n_demos, root, noise=noise, seed=demo_seeds(seed, n_demos)[0], render=False,
                                   max_episode_steps=args.max_episode_steps)


def train_sft_policy(task: str, n_demos: int, noise: float, seed: int, work: Path, args: argparse.Namespace,
                     st: dict[str, Any]):
    """Record n noisy demos and SFT a `state` policy on them (steps, config flags, EMA and success-only from `st`,
    see sft_settings); returns (policy, checkpoint dir, info)."""
    t0 = time.perf_counter()
    root = work / f"demos-{task}-s{seed}-n{n_demos}-noise{noise}"
    ck = work / f"sft-{task}-s{seed}-n{n_demos}-noise{noise}-steps{st['sft_steps']}{sft_tag(st)}"
    info_path = work / f"{ck.name}.info.json"
    if (ck / "manifest.json").exists() and info_path.exists():  # resumed --work: same seeds and settings
        return load_policy(ck), ck, {**json.loads(info_path.read_text()), "reused": True}
    root, demo = record_demos(task, n_demos, noise, seed, root, args)
    data = load_demo_data([root], 10, with_images=False, max_episodes=n_demos,
                          success_only=st.get("success_only", False))
    cfg = SFTConfig(datasets=[str(root)], config="state", out=str(ck), steps=st["sft_steps"], seed=seed,
                    batch_size=64, lr=1e-3, checkpoint_every=st["sft_steps"], version=f"sft-{task}-s{seed}",
                    overrides=dict(st["state_flags"]), ema_decay=st["ema"],
                    success_only=st.get("success_only", False))
    cfg.overrides.update(spec_policy_overrides(args))
    res = train_sft(cfg, data=data, progress=False)
    info = {"demo_seeds": demo["seeds"], "demo_successes": demo["successes"], "frames": len(data),
            "sft_steps": st["sft_steps"], "state_flags": st["state_flags"], "ema": st["ema"],
            "success_only": st.get("success_only", False), "episodes_used": int(len(np.unique(data.episode))),
            "final_loss": round(res["final_loss"], 4), "wall_s": round(time.perf_counter() - t0, 1)}
    info_path.write_text(json.dumps(info))
    return res["policy"].eval(), ck, info


def calibrate(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    tune = [TUNE0 + j for j in range(args.tune_episodes)]
    rows = []
    for task in args.tasks:
        st = sft_settings(task, args)
        for n in st["demos"]:
            for noise in st["demo_noise"]:
                pol, _, info = train_sft_policy(task, n, noise, 0, work, args, st)
                r = P.evaluate(pol, task, tune, n_exec=args.n_exec, max_episode_steps=args.max_episode_steps,
                               **gym_env(args))
                rows.append({"task": task, "demos": n, "noise": noise, "sft": info, "tuning": r})
                print(json.dumps({"task": task, "demos": n, "noise": noise, "rate": r["success_rate"],
                                  "ci95": r["ci95"], "sft_s": info["wall_s"], "eval_s": r["wall_s"]}), flush=True)
    return {"mode": "calibrate", "tuning_seeds": f"{TUNE0}..{TUNE0 + args.tune_episodes - 1}", "rows": rows}


CRITIC_KEYS = ("n_exec", "num_steps", "gamma", "seed", "critic_objective", "ensemble", "critic_hidden", "critic_steps",
               "critic_batch", "critic_lr", "reg_weight", "num_ref", "critic_features", "per_layer_injection",
               "critic_layer_norm", "critic_dropout", "holdout")


def critic_dir(work: Path, task: str, s: int, sft_dir: Path, buf_dir: Path, cfg: P.ImproveConfig) -> Path:
    """WORK/critic-<task>-s<seed>-<hash>: the trained critic of one seed, keyed by its SFT policy, its buffer and
    every critic setting, so a resumed --work (e.g. re-running only some methods) reuses it."""
    key = {"sft": sft_dir.name, "buffer": buf_dir.name, **{k: getattr(cfg, k) for k in CRITIC_KEYS}}
    h = hashlib.sha256(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()[:10]
    return work / f"critic-{task}-s{s}-{h}"


def run_seed(task: str, s: int, args: argparse.Namespace, work: Path, eval_seeds: list[int]) -> dict[str, Any]:
    """One training seed of one task: SFT, buffer, critic, every method, evaluation."""
    torch.manual_seed(s)
    st = sft_settings(task, args)
    sft, sft_dir, sft_info = train_sft_policy(task, st["demos"][0], st["demo_noise"][0], s, work, args, st)
    roll_seeds = [ROLL0 + 1000 * s + k for k in range(args.rollouts)]
    assert not (set(eval_seeds) & (set(roll_seeds) | set(sft_info["demo_seeds"])))  # held out from training
    buf_dir = work / f"buffer-{sft_dir.name}-r{args.rollouts}"
    if (buf_dir / "roll_info.json").exists():  # resumed --work
        roll = {**json.loads((buf_dir / "roll_info.json").read_text()), "reused": True}
    else:
        roll = P.collect_rollouts(sft, task, roll_seeds, buf_dir, n_exec=args.n_exec, noise_seed=7 + s,
                                  max_episode_steps=args.max_episode_steps, **gym_env(args))
        (buf_dir / "roll_info.json").write_text(json.dumps(roll))
    print(json.dumps({"task": task, "seed": s, "sft": sft_info, "rollouts": {k: v for k, v in roll.items()
                                                                             if k != "seeds"}}), flush=True)
    buf = P.load_buffer(buf_dir, sft.horizon)
    base = P.ImproveConfig(method="qvgm", n_exec=args.n_exec, seed=s, critic_steps=args.critic_steps,
                           critic_batch=args.critic_batch, critic_hidden=tuple(args.critic_hidden),
                           reg_weight=args.reg_weight,
                           actor_steps=args.actor_steps,
                           actor_lr=args.actor_lr, actor_batch=args.actor_batch, ascent_lr=args.ascent_lr,
                           aggregate=args.aggregate, bc_weight=args.bc_weight, gate_last_m=args.gate_m,
                           max_shift=args.max_shift, trust_origin=args.trust_origin, **P.baseline_settings(args))
    out: dict[str, Any] = {"seed": s, "sft": sft_info, "rollouts": roll, "methods": {}}
    t0 = time.perf_counter()
    critic = None
    if any(m in P.CRITIC_METHODS or m in (*METHOD_OVERRIDES, "best-of-n", "q-guided") for m in args.methods):
        P.check_outcomes(buf)
        tr = P.buffer_transitions(sft, buf, args.n_exec, base.gamma)
        feats, _ = P.extract_features(sft, buf, work / f"features-{task}-s{s}", args.n_exec, num_ref=base.num_ref,
                                      seed=s)
        cdir = critic_dir(work, task, s, sft_dir, buf_dir, base)
        if (cdir / "critic_info.json").exists():  # resumed --work: the same critic settings on the same buffer
            critic, _ = P.load_critic(cdir)
            out["critic"] = {**json.loads((cdir / "critic_info.json").read_text()), "reused": True}
        else:
            critic, cinfo = P.train_critic(sft, feats, tr, base)
            out["critic"] = {**cinfo, "wall_s": round(time.perf_counter() - t0, 1), "transitions": len(tr)}
            tmp = cdir.with_name(cdir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            P.save_critic(critic, tmp)
            (tmp / "critic_info.json").write_text(json.dumps(out["critic"], default=float))
            shutil.rmtree(cdir, ignore_errors=True)
            os.replace(tmp, cdir)
        print(json.dumps({"task": task, "seed": s, "critic": out["critic"]["eval"]}), flush=True)
    for m in args.methods:
        t1 = time.perf_counter()
        train: dict[str, Any] = {}
        if m == "sft":
            actor: Any = sft
        elif m == "best-of-n":
            actor = P.BestOfNPolicy(sft, critic, n=args.best_of, n_exec=args.n_exec, aggregate=args.aggregate)
        elif m == "q-guided":
            actor = P.QGuidedPolicy(sft, critic, scale=args.guidance, n_exec=args.n_exec, aggregate=args.aggregate)
        else:
            cfg = P.ImproveConfig(**{**base.__dict__, "method": m, **METHOD_OVERRIDES.get(m, {})})
            actor, _, summ = P.improve(sft, buf, cfg, work=work / f"run-{task}-s{s}-{m}",
                                       cache_dir=work / f"features-{task}-s{s}",  # same key: reused
                                       critic=critic if cfg.method in P.CRITIC_METHODS else None)
            train = summ["actor"]
        train_s = time.perf_counter() - t1
        r = P.evaluate(actor, task, eval_seeds, n_exec=args.n_exec, max_episode_steps=args.max_episode_steps,
                       **gym_env(args))
        out["methods"][m] = {"success_rate": r["success_rate"], "ci95": r["ci95"], "successes": r["successes"],
                             "episodes": r["episodes"], "train_s": round(train_s, 1), "eval_s": r["wall_s"],
                             "mean_steps": r["mean_steps"], "outcomes": r["outcomes"],
                             "train": {k: v for k, v in train.items() if k in ("q_policy_before", "q_policy_after",
                                                                               "action_shift", "actor_final",
                                                                               "action_shift_rms_critic")}}
        print(json.dumps({"task": task, "seed": s, "method": m, **{k: out["methods"][m][k] for k in
                          ("success_rate", "ci95", "train_s", "eval_s")}}), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tier", default="state", choices=["state"], help="only `state` is implemented here")
    ap.add_argument("--tasks", nargs="+", default=["push"])
    ap.add_argument("--env-spec", type=Path, default=None,
                    help="env spec YAML/JSON of any Gymnasium env (docs/gym_envs.md) instead of --tasks")
    ap.add_argument("--demos", nargs="+", type=int, default=None,
                    help="N demos (several only with --calibrate; default: SFT_DEFAULTS per task)")
    ap.add_argument("--demo-noise", nargs="+", type=float, default=None,
                    help="expert noise std (m; default: SFT_DEFAULTS per task, else 0.01); with --env-spec a fraction "
                    "of the action half-range (default: the spec's demos.noise)")
    ap.add_argument("--sft-steps", type=int, default=None, help="default: SFT_DEFAULTS per task")
    ap.add_argument("--state-flags", nargs="*", default=None, metavar="KEY=VALUE",
                    help="StateConfig overrides, e.g. privileged_norm=1 (default: SFT_DEFAULTS per task; none: '')")
    ap.add_argument("--ema", type=float, default=None, help="SFT weight-EMA decay (default: SFT_DEFAULTS per task)")
    ap.add_argument("--success-only", default=None, type=lambda v: v.lower() in ("1", "true", "yes"),
                    metavar="0|1", help="SFT on successful demos only (default: SFT_DEFAULTS per task)")
    ap.add_argument("--train-seeds", type=int, default=1)
    ap.add_argument("--first-seed", type=int, default=0,
                    help="training seeds first..first+N-1 (split one benchmark over processes; pool the JSONs with "
                    "bench/learning_pool.py)")
    ap.add_argument("--rollouts", type=int, default=60, help="SFT rollout episodes in the fixed buffer")
    ap.add_argument("--eval-episodes", type=int, default=50)
    ap.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    ap.add_argument("--n-exec", type=int, default=5)
    ap.add_argument("--critic-steps", type=int, default=3000)
    ap.add_argument("--critic-hidden", type=int, nargs="+", default=[256, 256])
    ap.add_argument("--critic-batch", type=int, default=256)
    ap.add_argument("--reg-weight", type=float, default=P.ImproveConfig.reg_weight, help="w of the Cal-QL term")
    ap.add_argument("--actor-steps", type=int, default=300)
    ap.add_argument("--actor-lr", type=float, default=1e-4)
    ap.add_argument("--actor-batch", type=int, default=64)
    ap.add_argument("--ascent-lr", type=float, default=P.ImproveConfig.ascent_lr, help="Q-VGM ascent step alpha")
    ap.add_argument("--gate-m", type=int, default=5)
    ap.add_argument("--max-shift", type=float, default=P.ImproveConfig.max_shift,
                    help="Q-VGM trust region: RMS bound of A_Q from its origin per critic coordinate (normalised)")
    ap.add_argument("--trust-origin", default=P.ImproveConfig.trust_origin, choices=["base", "reference"])
    ap.add_argument("--aggregate", default="mean", choices=["mean", "min", "lcb"])
    ap.add_argument("--bc-weight", type=float, default=0.0)
    P.add_baseline_arguments(ap)  # --action-box, --dql-eta, --distill-max-shift, --distill-ascent-steps, ...
    ap.add_argument("--best-of", type=int, default=8)
    ap.add_argument("--guidance", type=float, default=0.5)
    ap.add_argument("--calibrate", action="store_true", help="SFT success on tuning seeds for each --demos")
    ap.add_argument("--tune-episodes", type=int, default=30)
    ap.add_argument("--on-tuning-seeds", action="store_true",
                    help="evaluate on tuning seeds instead of held-out ones (diagnosing step sizes etc.)")
    ap.add_argument("--max-episode-steps", type=int, default=None, help="time limit (default: the task's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None, help="keep intermediate files here (default: temp dir)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.env_spec is not None:
        from qvgm.envs import load_env_spec

        spec = load_env_spec(args.env_spec)
        args.tasks = [spec.name]
        args.demo_noise = args.demo_noise or [float(spec.demos.get("noise", 0.0))]
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="learning_bench_") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.calibrate:
            result = calibrate(args, work)
        else:
            if len(args.demos or [0]) != 1 or len(args.demo_noise or [0]) != 1:
                raise SystemExit("give one --demos and one --demo-noise value (several only with --calibrate)")
            seed0 = TUNE0 if args.on_tuning_seeds else EVAL0
            eval_seeds = [seed0 + j for j in range(args.eval_episodes)]
            tasks = {}
            for task in args.tasks:
                train_seeds = range(args.first_seed, args.first_seed + args.train_seeds)
                seeds = [run_seed(task, s, args, work, eval_seeds) for s in train_seeds]
                summary = {}
                for m in args.methods:
                    k = sum(r["methods"][m]["successes"] for r in seeds)
                    n = sum(r["methods"][m]["episodes"] for r in seeds)
                    summary[m] = {"success_rate": k / n, "ci95": list(P.wilson_interval(k, n)), "episodes": n,
                                  "per_seed": [r["methods"][m]["success_rate"] for r in seeds],
                                  "wall_s": round(sum(r["methods"][m]["train_s"] + r["methods"][m]["eval_s"]
                                                      for r in seeds), 1)}
                    if m != "sft" and "sft" in args.methods:  # same scenes per seed: paired vs SFT
                        summary[m]["vs_sft_paired"] = P.paired_comparison(
                            [o for r in seeds for o in r["methods"][m]["outcomes"]],
                            [o for r in seeds for o in r["methods"]["sft"]["outcomes"]])
                tasks[task] = {"summary": summary, "seeds": seeds, "sft_settings": sft_settings(task, args)}
            result = {"mode": "diagnostic (tuning seeds)" if args.on_tuning_seeds else "benchmark",
                      "eval_seeds": f"{seed0}..{seed0 + args.eval_episodes - 1}",
                      "tasks": tasks}
    while _GYM_ENVS:
        _GYM_ENVS.popitem()[1].close()
    out = {"bench": "learning", "tier": args.tier, "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                                for k, v in vars(args).items()},
           "seed_scheme": {"demos": f"{DEMO0} + 1000*s + k", "tuning": f"{TUNE0} + j",
                           "rollouts": f"{ROLL0} + 1000*s + k", "eval": f"{EVAL0} + j"},
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                       "threads": args.threads},
           **result, "wall_s": round(time.perf_counter() - t_all, 1)}
    text = json.dumps(out, indent=1, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o))
    print(text)
    if args.out:
        args.out.write_text(text)
    return out


if __name__ == "__main__":
    main()
