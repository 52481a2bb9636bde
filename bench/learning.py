"""Learning benchmark (`state` and `pixels` tiers): SFT from few noisy demos, one fixed buffer of SFT rollouts, then
every method trained from the same buffer and the same critic, evaluated closed-loop on held-out scene seeds.

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
`--sft-candidates K` trains K SFT policies per training seed on the same demos (SFT init / batch-order seeds s,
s + SFT_INIT_STRIDE, ...), evaluates each on --tune-episodes TUNING scenes and keeps the best for steps 3-6 (ties:
the first); pixel SFT lands far apart on different seeds of the same recipe (docs/RESULTS.md), and this is the
selection a user makes on validation scenes. Every candidate's tuning record is in the JSON (seed -> "sft_selection").
`--calibrate` instead trains SFT for each --demos value and evaluates it on TUNING seeds (TUNE0 + j) only, to pick
N and the expert noise so SFT lands at 40-75 % success without looking at evaluation seeds.
SFT settings (N demos, demo noise, SFT steps, `state` config flags, weight EMA) default per task to the
calibrated table critic_trainer/recipes.py (SFT_DEFAULTS here);
--demos / --demo-noise / --sft-steps / --state-flags / --ema override it.
Tiers: `state` (the `state` backbone on privileged object poses, no cameras) and `pixels` (a pi05 config, default
pi05-small, through the full stack: demos, the rollout buffer and every evaluation episode are rendered by MuJoCo at
--image-size for --cameras, the policy reads the images; SFT, features, critic and methods run on --device). Pixel-tier
work files carry the prefix `pixels-<config>-<H>x<W>-<cameras>-` (state-tier names unchanged, so runs never collide);
its critic reads the z_rl of an RL token trained for --rl-token-steps N (default 1000) on the fixed buffer with the
VLA frozen (METHOD.md §2; between steps 3 and 4), or with --critic-features pooled the mean final-layer prefix
embedding (no token), and every
observation handed to a pixel policy is checked to carry a rendered, non-blank frame per camera (CameraCheck).
--sft-init CKPT (pixels) makes the SFT a fine-tune of a pretrained checkpoint, e.g. a base trained on the other tasks
by bench/sft_success.py --base-tasks (the few-shot SFT of a pretrained policy, as pi0.5 is used).
--buffer-demos starts the fixed buffer as a copy of the SFT demos (the loop's layout) with the rollouts appended, so
a critic can rank even when SFT never succeeds (off by default).
Output: one JSON (stdout + --out): per task, per method, success rate, 95 % Wilson CI (episodes pooled over
training seeds), per-seed rates, wall time (training + evaluation), plus all seeds and settings. Usage::

    .venv/bin/python bench/learning.py --tier state --tasks push --demos 5 --train-seeds 1 --rollouts 60 \
        --eval-episodes 50 --out learning_state.json
    .venv/bin/python bench/learning.py --tier pixels --config pi05-small --device cuda --tasks pick_place \
        --train-seeds 3 --eval-episodes 100 --threads 4 --work work_pixels --out learning_pixels.json
    .venv/bin/python bench/learning.py --tier state --tasks push --calibrate --demos 3 5 10 --tune-episodes 30
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, when run as a script
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import report  # noqa: E402
from critic_trainer import pipeline as P  # noqa: E402
from critic_trainer.demos import collect_demos  # noqa: E402
from critic_trainer.recipes import FALLBACK_RECIPE, SFT_RECIPES, qvgm_ascent_lr  # noqa: E402
from critic_trainer.sft import SFTConfig, init_weights_sha256, load_demo_data, train_sft  # noqa: E402
from qvgm.devices import DEVICE_CHOICES_HELP, resolve_device  # noqa: E402
from qvgm.policy import load_policy, save_policy  # noqa: E402

DEMO0, TUNE0, ROLL0, EVAL0 = 0, 200_000, 300_000, 900_000
SFT_INIT_STRIDE = 1_000_000  # --sft-candidates: candidate j trains with torch seed s + j * SFT_INIT_STRIDE (j = 0: s)
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
# options added with the pixel tier: left out of a `state` run's JSON settings when unset, so its output is unchanged
NEW_OPTIONS = ("config", "device", "image_size", "cameras", "sft_batch", "sft_lr", "critic_features", "buffer_demos",
               "delta_actions", "colors", "policy_override", "sft_warmup", "sft_option", "rl_token_steps", "sft_init")
PIXEL_ONLY = ("config", "device", "image_size", "cameras", "sft_batch", "sft_lr", "sft_warmup", "delta_actions",
              "colors", "policy_override", "sft_option", "rl_token_steps", "sft_init")
# SFTConfig fields --sft-option may set (pixel tier): the training aids; the rest are the bench's own settings
SFT_OPTIONS = ("image_shift", "camera_dropout", "keypoint_aux", "keypoint_aux_cameras")
PIXEL_SFT_BATCH, PIXEL_SFT_LR = 32, 5e-4  # the pi05-small pixel SFT of docs/RESULTS.md (bench/sft_success.py)
# pixel SFT lr warm-up steps: keypoint-token SFT (Pi05Config.keypoint_tokens) succeeds in 65 % of fixed-colour
# pick_place episodes with 100 and 20 % with 50 (docs/RESULTS.md, "Where does the pixel policy aim?")
PIXEL_SFT_WARMUP = 100
# the pixel tier trains an RL token this many steps on the fixed buffer unless --critic-features pooled
PIXEL_RL_TOKEN_STEPS = 1000


def is_pixels(args: argparse.Namespace) -> bool:
    return getattr(args, "tier", "state") == "pixels"


def tier_prefix(args: argparse.Namespace) -> str:
    """Prefix of every work-dir name: '' for `state` (names of earlier runs unchanged), else
    'pixels-<config>-<H>x<W>-<cam+cam>-' (+ 'fixedcolors-' with --colors fixed) so state and pixel runs (and other
    configs / sizes / colours) never collide."""
    if not is_pixels(args):
        return ""
    h, w = args.image_size
    colors = "" if args.colors in (None, "random") else f"{args.colors}colors-"
    return f"pixels-{args.config}-{h}x{w}-{'+'.join(args.cameras)}-{colors}"


def override_tag(overrides: dict[str, Any]) -> str:
    """Work-name suffix of --policy-override: '-<key><value>' per override, sorted, path-safe ('' without any)."""
    return "".join("-" + re.sub(r"[^A-Za-z0-9_.]", "", f"{k}{json.dumps(v)}") for k, v in sorted(overrides.items()))


def render_settings(args: argparse.Namespace) -> dict[str, Any]:
    """collect_rollouts keyword arguments of the tier: {} for `state`, cameras + image size (H, W) for `pixels`."""
    return {"render": True, "cameras": tuple(args.cameras), "image_size": tuple(args.image_size),
            "colors": args.colors} if is_pixels(args) else {}


def eval_settings(args: argparse.Namespace) -> dict[str, Any]:
    """pipeline.evaluate keyword arguments of the tier ({} for `state`: no cameras)."""
    return {"render": True, "image_size": tuple(args.image_size), "colors": args.colors} if is_pixels(args) else {}


class CameraCheck:
    """Actor wrapper of the pixel tier: every observation must carry, for each camera the policy reads, a rendered
    uint8 [H, W, 3] frame at the tier's image size that is not constant (a failed render); else RuntimeError. A pi05
    policy masks missing cameras, so without this check a broken renderer would silently evaluate a blind policy.
    Counts inferences and checked frames (summary())."""

    def __init__(self, actor: Any, image_size: tuple[int, int]) -> None:
        self.actor = actor
        self.policy = getattr(actor, "policy", actor)  # pipeline.evaluate reads the cameras from policy.config
        self.cameras = tuple(self.policy.config.camera_names or ())
        if not self.cameras:
            raise ValueError("the pixel tier needs a policy that reads cameras (config.camera_names is empty)")
        self.shape = (int(image_size[0]), int(image_size[1]), 3)
        self.version = getattr(actor, "version", "policy")
        self.inferences = 0
        self.frames = dict.fromkeys(self.cameras, 0)

    def act(self, observations: list[dict[str, Any]], *rest: Any, **kw: Any) -> np.ndarray:
        """Check the observations' images, then the wrapped actor's chunks [B, H, real] (robot units)."""
        for o in observations:
            imgs = o.get("images") or {}
            for c in self.cameras:
                if c not in imgs:
                    raise RuntimeError(f"pixel tier: an observation has no {c!r} image (has {sorted(imgs)}): the env "
                                       "does not render the policy's cameras")
                a = np.asarray(imgs[c])
                if a.shape != self.shape or a.dtype != np.uint8:
                    raise RuntimeError(f"pixel tier: {c!r} frame is {a.dtype} {a.shape}, expected uint8 {self.shape}")
                if int(a.max()) == int(a.min()):
                    raise RuntimeError(f"pixel tier: {c!r} frame is constant ({int(a.min())}): rendering failed")
                self.frames[c] += 1
        self.inferences += 1
        return self.actor.act(observations, *rest, **kw)

    def summary(self) -> dict[str, Any]:
        return {"cameras": list(self.cameras), "frame_shape": list(self.shape), "inferences": self.inferences,
                "frames_checked": dict(self.frames)}


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


def ascent_lr(task: str, args: argparse.Namespace) -> float:
    """Q-VGM's ascent step for `task`: --ascent-lr when given, else the task's (critic_trainer.recipes)."""
    return qvgm_ascent_lr(task) if args.ascent_lr is None else float(args.ascent_lr)


def sft_settings(task: str, args: argparse.Namespace) -> dict[str, Any]:
    """SFT settings of `task`: SFT_DEFAULTS[task] with every CLI value given replacing its entry.
    demos and demo_noise are lists (several only with --calibrate)."""
    d = dict(SFT_DEFAULTS.get(task, FALLBACK_SFT))
    flags = parse_flags(args.state_flags)
    return {"demos": list(args.demos) if args.demos else [d["demos"]],
            "success_only": bool(d.get("success_only", False) if args.success_only is None else args.success_only),
            "demo_noise": list(args.demo_noise) if args.demo_noise else [d["demo_noise"]],
            "sft_steps": int(args.sft_steps or d["sft_steps"]),
            "state_flags": {} if is_pixels(args) else dict(d["state_flags"]) if flags is None else flags,
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
    if is_pixels(args):
        return root, collect_demos(task, n_demos, root, noise=noise, seed=demo_seeds(seed, n_demos)[0], render=True,
                                   image_size=tuple(args.image_size), cameras=tuple(args.cameras),
                                   colors=args.colors)
    if getattr(args, "env_spec", None) is None:
        return root, collect_demos(task, n_demos, root, noise=noise, seed=demo_seeds(seed, n_demos)[0], render=False)
    from critic_trainer.env_demos import collect_env_demos
    from qvgm.envs import load_env_spec

    spec = load_env_spec(args.env_spec)
    if spec.dataset_path() is not None:
        return spec.dataset_path(), {"seeds": [], "successes": None, "dataset": str(spec.dataset_path())}
    return root, collect_env_demos(spec, n_demos, root, noise=noise, seed=demo_seeds(seed, n_demos)[0], render=False,
                                   max_episode_steps=args.max_episode_steps)


def demo_dir(task: str, n_demos: int, noise: float, seed: int, work: Path, args: argparse.Namespace) -> Path:
    """Where the SFT demos of (task, seed, n, noise) are recorded in --work (an --env-spec dataset: its path)."""
    if getattr(args, "env_spec", None) is not None:
        from qvgm.envs import load_env_spec

        path = load_env_spec(args.env_spec).dataset_path()
        if path is not None:
            return Path(path)
    return work / f"{tier_prefix(args)}demos-{task}-s{seed}-n{n_demos}-noise{noise}"


def init_tag(init: int) -> str:
    """Checkpoint-name suffix of SFT candidate `init` (--sft-candidates): '' for the first (names unchanged)."""
    return f"-init{init}" if init else ""


def reused_demos(root: Path, seed: int, n_demos: int, init: int) -> dict[str, Any] | None:
    """SFT candidate `init` > 0 trains on candidate 0's demos, recorded in `root` before it (select_sft trains the
    candidates in order): their summary, or None when the demos are to be recorded (candidate 0, or none yet)."""
    if init and (root / "meta" / "info.json").exists():
        return {"seeds": demo_seeds(seed, n_demos), "successes": None, "reused": True}
    return None


def train_sft_policy(task: str, n_demos: int, noise: float, seed: int, work: Path, args: argparse.Namespace,
                     st: dict[str, Any], init: int = 0):
    """Record n noisy demos and SFT a `state` policy on them (steps, config flags, EMA and success-only from `st`,
    see sft_settings); returns (policy, checkpoint dir, info). Pixel tier: rendered demos, SFT of args.config.
    `init` j > 0: the same demos, SFT seeded seed + j * SFT_INIT_STRIDE (another init and batch order)."""
    if is_pixels(args):
        return train_pixel_sft(task, n_demos, noise, seed, work, args, st, init)
    t0 = time.perf_counter()
    root = work / f"demos-{task}-s{seed}-n{n_demos}-noise{noise}"
    ck = work / f"sft-{task}-s{seed}-n{n_demos}-noise{noise}-steps{st['sft_steps']}{sft_tag(st)}{init_tag(init)}"
    info_path = work / f"{ck.name}.info.json"
    if (ck / "manifest.json").exists() and info_path.exists():  # resumed --work: same seeds and settings
        return load_policy(ck), ck, {**json.loads(info_path.read_text()), "reused": True}
    demo = reused_demos(root, seed, n_demos, init)
    if demo is None:
        root, demo = record_demos(task, n_demos, noise, seed, root, args)
    data = load_demo_data([root], 10, with_images=False, max_episodes=n_demos,
                          success_only=st.get("success_only", False))
    cfg = SFTConfig(datasets=[str(root)], config="state", out=str(ck), steps=st["sft_steps"],
                    seed=seed + init * SFT_INIT_STRIDE,
                    batch_size=64, lr=1e-3, checkpoint_every=st["sft_steps"], version=f"sft-{task}-s{seed}",
                    overrides=dict(st["state_flags"]), ema_decay=st["ema"],
                    success_only=st.get("success_only", False))
    cfg.overrides.update(spec_policy_overrides(args))
    res = train_sft(cfg, data=data, progress=False)
    info = {"demo_seeds": demo["seeds"], "demo_successes": demo["successes"], "frames": len(data),
            "sft_seed": cfg.seed, "sft_steps": st["sft_steps"], "state_flags": st["state_flags"], "ema": st["ema"],
            "success_only": st.get("success_only", False), "episodes_used": int(len(np.unique(data.episode))),
            "final_loss": round(res["final_loss"], 4), "wall_s": round(time.perf_counter() - t0, 1)}
    info_path.write_text(json.dumps(info))
    return res["policy"].eval(), ck, info


def train_pixel_sft(task: str, n_demos: int, noise: float, seed: int, work: Path, args: argparse.Namespace,
                    st: dict[str, Any], init: int = 0):
    """Pixel tier: n noisy demos rendered at args.image_size for args.cameras, SFT of args.config (a pi05 config:
    images + prompt + state) on args.device with batch args.sft_batch and peak lr args.sft_lr (steps, EMA and
    success-only from `st`); returns (policy on args.device, checkpoint dir, info). A finished checkpoint in
    --work with the same name (tier, config, image size, cameras, seed, demos, noise, steps, batch, lr, init) is
    reused. `init` as train_sft_policy."""
    t0 = time.perf_counter()
    root = demo_dir(task, n_demos, noise, seed, work, args)
    ck = work / (f"{tier_prefix(args)}sft-{task}-s{seed}-n{n_demos}-noise{noise}-steps{st['sft_steps']}"
                 f"-b{args.sft_batch}-lr{args.sft_lr}{'-delta' if args.delta_actions else ''}{sft_tag(st)}"
                 f"{'' if args.sft_warmup == 50 else f'-wu{args.sft_warmup}'}{override_tag(args.policy_override)}"
                 f"{'-sft' + override_tag(args.sft_option) if args.sft_option else ''}{init_tag(init)}"
                 f"{'-from' + init_weights_sha256(args.sft_init)[:10] if args.sft_init else ''}")
    info_path = work / f"{ck.name}.info.json"
    if (ck / "manifest.json").exists() and info_path.exists():  # resumed --work: same seeds and settings
        return load_policy(ck, device=args.device), ck, {**json.loads(info_path.read_text()), "reused": True}
    shutil.rmtree(ck, ignore_errors=True)
    demo = reused_demos(root, seed, n_demos, init)
    if demo is None:
        shutil.rmtree(root, ignore_errors=True)  # a half-recorded dataset of an interrupted run
        root, demo = record_demos(task, n_demos, noise, seed, root, args)
    t_demos = time.perf_counter() - t0
    from qvgm.policy.config import get_config

    data = load_demo_data([root], get_config(args.config).horizon, with_images=True, max_episodes=n_demos,
                          success_only=st.get("success_only", False))
    cfg = SFTConfig(datasets=[str(root)], config=args.config, out=str(ck), steps=st["sft_steps"],
                    seed=seed + init * SFT_INIT_STRIDE,
                    batch_size=args.sft_batch, lr=args.sft_lr, warmup=args.sft_warmup, checkpoint_every=st["sft_steps"],
                    version=f"sft-{task}-s{seed}", ema_decay=st["ema"], success_only=st.get("success_only", False),
                    device=args.device, overrides={**({"delta_actions": True} if args.delta_actions else {}),
                                                   **args.policy_override}, **args.sft_option,
                    init=str(args.sft_init) if args.sft_init else None)
    t1 = time.perf_counter()
    res = train_sft(cfg, data=data, progress=False)
    info = {"demo_seeds": demo["seeds"], "demo_successes": demo["successes"], "frames": len(data),
            "images": {c: list(v.shape[1:]) for c, v in sorted(data.images.items())}, "sft_seed": cfg.seed,
            "config": args.config, "device": args.device, "delta_actions": bool(args.delta_actions),
            "colors": args.colors, "policy_override": args.policy_override, "sft_option": args.sft_option,
            "sft_steps": st["sft_steps"], "batch": args.sft_batch, "warmup": args.sft_warmup,
            "lr": args.sft_lr, "ema": st["ema"], "success_only": st.get("success_only", False),
            **({"init": str(args.sft_init), "init_version": res["manifest"]["parent"]} if args.sft_init else {}),
            "episodes_used": int(len(np.unique(data.episode))), "final_loss": round(res["final_loss"], 4),
            "demos_s": round(t_demos, 1), "sft_train_s": round(time.perf_counter() - t1, 1),
            "wall_s": round(time.perf_counter() - t0, 1)}
    info_path.write_text(json.dumps(info))
    # the policy as a resumed run loads it: checkpoint-manifest identity, so the feature cache key stays the same
    return load_policy(ck, device=args.device), ck, info


def evaluate_sft(pol: Any, task: str, seeds: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """pipeline.evaluate of an SFT policy on scene `seeds` with the tier's settings (pixels: through CameraCheck)."""
    return P.evaluate(CameraCheck(pol, args.image_size) if is_pixels(args) else pol, task, seeds, n_exec=args.n_exec,
                      max_episode_steps=args.max_episode_steps, **gym_env(args), **eval_settings(args))


def select_sft(task: str, s: int, args: argparse.Namespace, work: Path, st: dict[str, Any]):
    """--sft-candidates K: K SFT policies of training seed s on the same demos (train_sft_policy init 0..K-1), each
    evaluated on the TUNING scenes TUNE0 + j (j < --tune-episodes; the result is cached next to its checkpoint), the
    one with the most successes kept (ties: the lowest init). Returns train_sft_policy's (policy, checkpoint dir,
    info), info["selection"] holding every candidate's checkpoint, SFT seed and tuning outcomes."""
    tune = [TUNE0 + j for j in range(args.tune_episodes)]
    n, noise = st["demos"][0], st["demo_noise"][0]
    records, best = [], None
    for init in range(args.sft_candidates):
        pol, ck, info = train_sft_policy(task, n, noise, s, work, args, st, init)
        cache = work / f"{ck.name}.tuning{args.tune_episodes}.json"
        judged = {"n_exec": args.n_exec, "max_episode_steps": args.max_episode_steps}  # what else decides the record
        r = json.loads(cache.read_text()) if cache.exists() else {}
        if r.get("judged") != judged:
            r = evaluate_sft(pol, task, tune, args)
            r = {"judged": judged, **{k: r[k] for k in ("success_rate", "successes", "episodes", "outcomes", "wall_s")}}
            cache.write_text(json.dumps(r))
        records.append({"init": init, "checkpoint": ck.name, "sft_seed": s + init * SFT_INIT_STRIDE,
                        "final_loss": info.get("final_loss"), "tuning": r})
        print(json.dumps({"task": task, "seed": s, "sft_candidate": init, "tuning_successes": r["successes"],
                          "episodes": r["episodes"]}), flush=True)
        if best is None or r["successes"] > best[3]:
            best = (pol, ck, info, r["successes"], init)
    pol, ck, info, _, chosen = best
    return pol, ck, {**info, "selection": {"tuning_seeds": f"{TUNE0}..{TUNE0 + args.tune_episodes - 1}",
                                           "chosen": chosen, "candidates": records}}


def calibrate(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    tune = [TUNE0 + j for j in range(args.tune_episodes)]
    rows = []
    for task in args.tasks:
        st = sft_settings(task, args)
        for n in st["demos"]:
            for noise in st["demo_noise"]:
                pol, _, info = train_sft_policy(task, n, noise, 0, work, args, st)
                r = evaluate_sft(pol, task, tune, args)
                rows.append({"task": task, "demos": n, "noise": noise, "sft": info, "tuning": r})
                print(json.dumps({"task": task, "demos": n, "noise": noise, "rate": r["success_rate"],
                                  "ci95": r["ci95"], "sft_s": info["wall_s"], "eval_s": r["wall_s"]}), flush=True)
    return {"mode": "calibrate", "tuning_seeds": f"{TUNE0}..{TUNE0 + args.tune_episodes - 1}", "rows": rows}


CRITIC_KEYS = ("n_exec", "num_steps", "gamma", "seed", "critic_objective", "ensemble", "critic_hidden", "critic_steps",
               "critic_batch", "critic_lr", "reg_weight", "num_ref", "critic_features", "per_layer_injection",
               "critic_layer_norm", "critic_dropout", "holdout")


def critic_dir(work: Path, task: str, s: int, sft_dir: Path, buf_dir: Path, cfg: P.ImproveConfig,
               prefix: str = "") -> Path:
    """WORK/<prefix>critic-<task>-s<seed>-<hash>: the trained critic of one seed, keyed by its SFT policy, its buffer
    and every critic setting, so a resumed --work (e.g. re-running only some methods) reuses it. prefix: the
    tier's (tier_prefix)."""
    key = {"sft": sft_dir.name, "buffer": buf_dir.name, **{k: getattr(cfg, k) for k in CRITIC_KEYS}}
    if cfg.critic_contrast_weight:  # only when on, so the critics of earlier work dirs keep their names
        key.update(critic_contrast_weight=cfg.critic_contrast_weight, critic_contrast_groups=cfg.critic_contrast_groups)
    h = hashlib.sha256(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()[:10]
    return work / f"{prefix}critic-{task}-s{s}-{h}"


def rl_token_policy(sft: Any, buf_dir: Path, buf: Any, task: str, s: int, args: argparse.Namespace,
                    work: Path) -> tuple[Any, Path, dict[str, Any]]:
    """Pixel tier, METHOD.md §2: the SFT policy plus an RL token trained for args.rl_token_steps on the fixed
    buffer's observations with the VLA frozen (critic_trainer.rl_token.train_rl_token, its defaults, seed s; the
    last 20 % of the episodes held out for the reconstruction cosine). Saved as a checkpoint
    WORK/<prefix>rltoken-<task>-s<seed>-<hash of buffer + steps> (one a resumed --work reuses) and loaded from
    there, so the critic features are keyed by its own weight hash. The token changes no action: SFT's outcomes
    are the same with it. Returns (policy, checkpoint dir, report)."""
    from critic_trainer.rl_token import train_rl_token

    key = json.dumps({"buffer": buf_dir.name, "steps": args.rl_token_steps, "seed": s}, sort_keys=True)
    ck = work / f"{tier_prefix(args)}rltoken-{task}-s{s}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    info_path = work / f"{ck.name}.info.json"
    if (ck / "manifest.json").exists() and info_path.exists():
        return load_policy(ck, device=args.device), ck, {**json.loads(info_path.read_text()), "reused": True}
    t0 = time.perf_counter()
    if sft.config.rl_token is not None:
        raise RuntimeError(f"the SFT policy already has an RL token; {ck.name} would replace it")
    report = train_rl_token(sft, buf.demo.observations(range(len(buf))), buf.episode, steps=args.rl_token_steps,
                            seed=s)
    info = {**{k: v for k, v in report.items() if k != "loss_curve"}, "frames": len(buf),
            "wall_s": round(time.perf_counter() - t0, 1)}
    shutil.rmtree(ck, ignore_errors=True)  # a checkpoint without its info file: an interrupted run
    save_policy(sft, ck, version=f"{sft.version}+rltok", parent=sft.version, summary={"kind": "rl_token", **info})
    info_path.write_text(json.dumps(info))
    return load_policy(ck, device=args.device), ck, info


def run_seed(task: str, s: int, args: argparse.Namespace, work: Path, eval_seeds: list[int]) -> dict[str, Any]:
    """One training seed of one task: SFT, buffer, critic, every method, evaluation."""
    torch.manual_seed(s)
    pixels, pre = is_pixels(args), tier_prefix(args)
    guard = (lambda a: CameraCheck(a, args.image_size)) if pixels else (lambda a: a)
    st = sft_settings(task, args)
    if args.sft_candidates > 1:
        sft, sft_dir, sft_info = select_sft(task, s, args, work, st)
    else:
        sft, sft_dir, sft_info = train_sft_policy(task, st["demos"][0], st["demo_noise"][0], s, work, args, st)
    roll_seeds = [ROLL0 + 1000 * s + k for k in range(args.rollouts)]
    assert not (set(eval_seeds) & (set(roll_seeds) | set(sft_info["demo_seeds"])))  # held out from training
    branch = f"-b{args.branches}f{args.branch_frac:g}" if args.branches else ""
    branch += f"x{args.branch_reps}" if args.branches and args.branch_reps > 1 else ""
    branch += f"o{args.branch_offset:g}" if args.branches and args.branch_offset else ""
    buf_dir = work / f"buffer-{sft_dir.name}-r{args.rollouts}{branch}{'-demos' if args.buffer_demos else ''}"
    if (buf_dir / "roll_info.json").exists():  # resumed --work
        roll = {**json.loads((buf_dir / "roll_info.json").read_text()), "reused": True}
    else:
        shutil.rmtree(buf_dir, ignore_errors=True)  # a partial buffer of an interrupted run
        extra: dict[str, Any] = {}
        if args.buffer_demos:  # the buffer starts as a copy of the SFT demos; the rollouts are appended
            demos = demo_dir(task, st["demos"][0], st["demo_noise"][0], s, work, args)
            if not (demos / "meta" / "info.json").exists():
                raise SystemExit(f"--buffer-demos: the SFT demos {demos} are gone from --work; remove {sft_dir} to "
                                 "record them again")
            shutil.copytree(demos, buf_dir)
            extra = {"append": True}
        roller = guard(sft)
        roll = P.collect_rollouts(roller, task, roll_seeds, buf_dir, n_exec=args.n_exec, noise_seed=7 + s,
                                  max_episode_steps=args.max_episode_steps, **gym_env(args), **render_settings(args),
                                  branches=args.branches, branch_frac=args.branch_frac,
                                  branch_reps=args.branch_reps, branch_offset=args.branch_offset, **extra)
        if pixels:
            roll["images_checked"] = roller.summary()
        if args.buffer_demos:
            roll["buffer_demos"] = str(demos)
        (buf_dir / "roll_info.json").write_text(json.dumps(roll))
    print(json.dumps({"task": task, "seed": s, "sft": sft_info, "rollouts": {k: v for k, v in roll.items()
                                                                             if k != "seeds"}}), flush=True)
    t_load = time.perf_counter()
    buf = P.load_buffer(buf_dir, sft.horizon, with_images=True) if pixels else P.load_buffer(buf_dir, sft.horizon)
    if pixels and sorted(buf.demo.images) != sorted(args.cameras):
        raise RuntimeError(f"buffer {buf_dir} holds camera frames {sorted(buf.demo.images)}, the tier records "
                           f"{sorted(args.cameras)}")
    load_s = time.perf_counter() - t_load
    out: dict[str, Any] = {"seed": s, "sft": sft_info, "rollouts": roll, "methods": {}}
    critic_key_dir, feat_dir = sft_dir, work / f"{pre}features-{task}-s{s}"
    needs_critic = any(m in P.CRITIC_METHODS or m in (*METHOD_OVERRIDES, "best-of-n", "q-guided")
                       for m in args.methods)
    if pixels and args.rl_token_steps and needs_critic:  # the critic reads z_rl of a token trained on this buffer
        sft, critic_key_dir, out["rl_token"] = rl_token_policy(sft, buf_dir, buf, task, s, args, work)
        feat_dir = work / f"{pre}features-{task}-s{s}-{critic_key_dir.name.rsplit('-', 1)[-1]}"
        print(json.dumps({"task": task, "seed": s, "rl_token": {k: out["rl_token"][k] for k in
                          ("heldout_cosine_untrained", "heldout_cosine", "wall_s")}}), flush=True)
    base = P.ImproveConfig(method="qvgm", n_exec=args.n_exec, seed=s, critic_steps=args.critic_steps,
                           critic_batch=args.critic_batch, critic_hidden=tuple(args.critic_hidden),
                           reg_weight=args.reg_weight, critic_contrast_weight=args.critic_contrast,
                           actor_steps=args.actor_steps,
                           actor_lr=args.actor_lr, actor_batch=args.actor_batch, ascent_lr=ascent_lr(task, args),
                           aggregate=args.aggregate, bc_weight=args.bc_weight, gate_last_m=args.gate_m,
                           max_shift=args.max_shift, trust_origin=args.trust_origin, **P.baseline_settings(args),
                           **({"critic_features": args.critic_features} if args.critic_features else {}))
    if pixels:
        out["buffer"] = {"frames": len(buf), "episodes": int(len(np.unique(buf.episode))),
                         "successful_episodes": int(len(np.unique(buf.episode[buf.success]))),
                         "images": {c: list(v.shape[1:]) for c, v in sorted(buf.demo.images.items())},
                         "load_s": round(load_s, 1)}
    t0 = time.perf_counter()
    critic = None
    if needs_critic:
        P.check_outcomes(buf)
        tr = P.buffer_transitions(sft, buf, args.n_exec, base.gamma)
        feats, rebuilt = P.extract_features(sft, buf, feat_dir, args.n_exec,
                                            num_ref=base.num_ref, seed=s, features=base.critic_features)
        if pixels:
            out["features"] = {"kind": P.resolve_critic_features(sft, base.critic_features),
                               "dim": int(feats["z_rl"].shape[1]), "reused": rebuilt is None,
                               "wall_s": round(time.perf_counter() - t0, 1)}
        cdir = critic_dir(work, task, s, critic_key_dir, buf_dir, base, prefix=pre)
        if (cdir / "critic_info.json").exists():  # resumed --work: the same critic settings on the same buffer
            critic, _ = P.load_critic(cdir)
            critic = critic.to(sft.device)
            out["critic"] = {**json.loads((cdir / "critic_info.json").read_text()), "reused": True}
        else:
            critic, cinfo = P.train_critic(sft, feats, tr, base, groups=P.transition_groups(buf, tr))
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
            actor = P.BestOfNPolicy(sft, critic, n=args.best_of, n_exec=args.n_exec, aggregate=args.aggregate,
                                    features=base.critic_features)
        elif m == "q-guided":
            actor = P.QGuidedPolicy(sft, critic, scale=args.guidance, n_exec=args.n_exec, aggregate=args.aggregate,
                                    features=base.critic_features)
        else:
            cfg = P.ImproveConfig(**{**base.__dict__, "method": m, **METHOD_OVERRIDES.get(m, {})})
            run_dir = work / f"{pre}run-{task}-s{s}-{m}"
            actor, _, summ = P.improve(sft, buf, cfg, work=run_dir,
                                       cache_dir=feat_dir,  # same key: reused
                                       critic=critic if cfg.method in P.CRITIC_METHODS else None)
            train = summ["actor"]
            if args.keep_policies:  # replaced by every run: the settings live in this run's JSON
                shutil.rmtree(run_dir / "policy", ignore_errors=True)
                save_policy(actor, run_dir / "policy", version=f"{sft.version}+{m}", parent=sft.version,
                            summary={"kind": m, "task": task, "train_seed": s,
                                     "improve": {k: v for k, v in cfg.__dict__.items()
                                                 if isinstance(v, (bool, int, float, str, list, tuple))}})
                train["policy"] = str(run_dir / "policy")
        train_s = time.perf_counter() - t1
        if args.noise_scale != 1.0:  # best-of-n / q-guided are refused with S != 1 (main)
            actor = P.ScaledNoisePolicy(actor, args.noise_scale)
        checked = guard(actor)
        r = P.evaluate(checked, task, eval_seeds, n_exec=args.n_exec, max_episode_steps=args.max_episode_steps,
                       **gym_env(args), **eval_settings(args))
        out["methods"][m] = {"success_rate": r["success_rate"], "ci95": r["ci95"], "successes": r["successes"],
                             "episodes": r["episodes"], "evaluated": str(getattr(actor, "version", "?")),
                             "train_s": round(train_s, 1), "eval_s": r["wall_s"],
                             "mean_steps": r["mean_steps"], "outcomes": r["outcomes"],
                             "train": {k: v for k, v in train.items() if k in ("q_policy_before", "q_policy_after",
                                                                               "action_shift", "actor_final",
                                                                               "action_shift_rms_critic",
                                                                               "policy")}}
        if pixels:
            out["methods"][m]["eval_images"] = checked.summary()
        print(json.dumps({"task": task, "seed": s, "method": m, **{k: out["methods"][m][k] for k in
                          ("success_rate", "ci95", "train_s", "eval_s")}}), flush=True)
    return out


def check_tier_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate the tier's options and fill the pixel tier's defaults (args.device becomes the resolved device name,
    args.image_size [H, W]). Errors exit through ap.error with a message naming the option."""
    if not is_pixels(args):
        given = [f"--{k.replace('_', '-')}" for k in PIXEL_ONLY if getattr(args, k) is not None]
        if given:
            ap.error(f"{', '.join(given)} apply to --tier pixels only")
        return
    from qvgm.policy.config import get_config
    from qvgm.sim.env import CAMERAS

    if args.env_spec is not None:
        ap.error("--env-spec is not supported by --tier pixels (the pixel tier renders the built-in tabletop)")
    if args.state_flags is not None:
        ap.error("--state-flags are `state` backbone flags; --tier pixels trains a pi05 config")
    args.config = args.config or "pi05-small"
    try:
        cfg = get_config(args.config)
    except KeyError as e:
        ap.error(str(e))
    if cfg.backbone != "pi05":
        ap.error(f"--tier pixels needs a pi05 config (pi05-small, pi05-tiny, ...), got {args.config!r}")
    size = args.image_size or [cfg.image_size]
    if len(size) not in (1, 2) or min(size) < 2 or any(v % 2 for v in size):
        ap.error(f"--image-size wants H [W], even numbers >= 2 (video encoding), got {size}")
    args.image_size = [int(size[0]), int(size[-1])]
    args.cameras = list(args.cameras or CAMERAS)
    bad = [c for c in args.cameras if c not in CAMERAS]
    if bad or len(set(args.cameras)) != len(args.cameras):
        ap.error(f"--cameras: unknown or repeated {bad or args.cameras}; the tabletop renders {list(CAMERAS)}")
    args.sft_batch = PIXEL_SFT_BATCH if args.sft_batch is None else args.sft_batch
    args.sft_lr = PIXEL_SFT_LR if args.sft_lr is None else args.sft_lr
    args.sft_warmup = PIXEL_SFT_WARMUP if args.sft_warmup is None else args.sft_warmup
    if args.sft_warmup < 0:
        ap.error("--sft-warmup must be >= 0")
    if args.sft_batch < 1 or not args.sft_lr > 0:
        ap.error("--sft-batch must be >= 1 and --sft-lr > 0")
    if args.sft_init is not None and not (args.sft_init / "manifest.json").is_file():
        ap.error(f"--sft-init {args.sft_init}: not a checkpoint directory (no manifest.json)")
    if args.rl_token_steps is not None:
        if args.rl_token_steps < 1:
            ap.error("--rl-token-steps must be >= 1")
        if args.critic_features == "pooled":
            ap.error("--rl-token-steps trains the RL token the critic reads: drop --critic-features pooled")
        args.critic_features = "rl-token"
    elif args.critic_features != "pooled":  # the tier's critic reads z_rl (docs/RESULTS.md: adopted 2026-11-28)
        args.rl_token_steps = PIXEL_RL_TOKEN_STEPS
        args.critic_features = "rl-token"
    args.colors = args.colors or "random"
    overrides = {}
    for o in args.policy_override or []:
        key, sep, val = o.partition("=")
        try:
            if not sep or not hasattr(cfg, key):
                raise ValueError(f"{key!r} is not a field of the {args.config} config")
            overrides[key] = json.loads(val)
        except ValueError as e:
            ap.error(f"--policy-override {o!r}: want KEY=JSON with KEY a pi05 config field ({e})")
    args.policy_override = overrides
    options: dict[str, Any] = {}
    for o in args.sft_option or []:
        key, sep, val = o.partition("=")
        try:
            if not sep or key not in SFT_OPTIONS:
                raise ValueError(f"{key!r} is not one of {', '.join(SFT_OPTIONS)}")
            options[key] = json.loads(val)
        except ValueError as e:
            ap.error(f"--sft-option {o!r}: want KEY=JSON with KEY an SFT training aid ({e})")
    args.sft_option = options
    try:
        args.device = str(resolve_device(args.device or "auto"))
    except ValueError as e:
        ap.error(str(e))


def build_parser() -> argparse.ArgumentParser:
    """The bench's command line (check_tier_args validates it and fills the tier's defaults)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tier", default="state", choices=["state", "pixels"],
                    help="state: the `state` backbone, no cameras; pixels: a pi05 config on rendered camera images")
    px = ap.add_argument_group("pixels tier (refused with --tier state)")
    px.add_argument("--config", default=None, help="pi05 policy config (default pi05-small; pi05-tiny for tests)")
    px.add_argument("--device", default=None, help=f"SFT, rollouts, critic, methods, evaluation: {DEVICE_CHOICES_HELP} "
                    "(default auto)")
    px.add_argument("--image-size", type=int, nargs="+", default=None, metavar="H [W]",
                    help="rendered camera images in px, even (default: the config's model image size, square)")
    px.add_argument("--cameras", nargs="+", default=None, help="rendered cameras (default: front wrist)")
    px.add_argument("--sft-batch", type=int, default=None, help=f"SFT batch size (default {PIXEL_SFT_BATCH})")
    px.add_argument("--sft-lr", type=float, default=None, help=f"SFT peak learning rate (default {PIXEL_SFT_LR})")
    px.add_argument("--sft-warmup", type=int, default=None,
                    help=f"SFT linear lr warm-up steps (default {PIXEL_SFT_WARMUP})")
    px.add_argument("--colors", default=None, choices=["random", "fixed"],
                    help="scene colours of demos, rollouts and evaluation: random (the task, default) or fixed per "
                         "role (the diagnostic without colour grounding, TabletopEnv(colors='fixed'))")
    px.add_argument("--policy-override", action="append", default=None, metavar="KEY=JSON",
                    help="pi05 config override for SFT, e.g. keypoint_tokens=16 (repeatable)")
    px.add_argument("--sft-option", action="append", default=None, metavar="KEY=JSON",
                    help=f"pixel SFT training aid (critic_trainer.sft.SFTConfig field: {', '.join(SFT_OPTIONS)}), "
                    "e.g. keypoint_aux=1 (repeatable; part of the SFT checkpoint's name)")
    px.add_argument("--delta-actions", action="store_const", const=True, default=None,
                    help="pi05 predicts the arm joints relative to the current joint state (the state tier's "
                    "delta_actions flag; default off)")
    px.add_argument("--sft-init", type=Path, default=None, metavar="CKPT",
                    help="the pixel SFT fine-tunes this checkpoint (SFTConfig.init: e.g. a base pretrained on other "
                    "tasks with bench/sft_success.py --base-tasks) instead of fresh weights; part of its name")
    px.add_argument("--rl-token-steps", type=int, default=None, metavar="N",
                    help="train the RL token (METHOD.md §2) for N steps on the fixed buffer, VLA frozen, and give "
                    f"the critic its z_rl (implies --critic-features rl-token; default {PIXEL_RL_TOKEN_STEPS} unless "
                    "--critic-features pooled)")
    ap.add_argument("--critic-features", default=None, choices=["rl-token", "pooled"],
                    help="critic state features (default rl-token: for state the encoder embedding, for pixels the "
                    "z_rl of a token trained on the buffer; pooled = mean final-layer prefix embedding, no token)")
    ap.add_argument("--buffer-demos", action="store_true",
                    help="the fixed buffer starts as a copy of the SFT demos, rollouts appended (default: rollouts "
                    "only)")
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
    ap.add_argument("--branches", type=int, default=0,
                    help="simulation only: K more episodes from one chunk boundary of each rollout (within-state "
                         "contrasts for the critic; critic_trainer.pipeline.collect_rollouts)")
    ap.add_argument("--branch-reps", type=int, default=1, metavar="R",
                    help="continuations of every branch chunk (its first chunk shared, then fresh noise each)")
    ap.add_argument("--branch-frac", type=float, default=0.7, help="branch points within the first FRAC of an episode")
    ap.add_argument("--branch-offset", type=float, default=0.0, metavar="S",
                    help="exploration for the critic: each branch's first chunk gets a constant N(0, S^2) offset "
                         "in the policy's normalised action space (collect_rollouts branch_offset; needs --branches)")
    ap.add_argument("--eval-episodes", type=int, default=50)
    ap.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    ap.add_argument("--n-exec", type=int, default=5)
    ap.add_argument("--critic-steps", type=int, default=3000)
    ap.add_argument("--critic-hidden", type=int, nargs="+", default=[256, 256])
    ap.add_argument("--critic-batch", type=int, default=256)
    ap.add_argument("--reg-weight", type=float, default=P.ImproveConfig.reg_weight, help="w of the Cal-QL term")
    ap.add_argument("--critic-contrast", type=float, default=0.0, metavar="W",
                    help="weight of the critic's within-state contrast term on the branch groups (needs --branches)")
    ap.add_argument("--actor-steps", type=int, default=300)
    ap.add_argument("--actor-lr", type=float, default=1e-4)
    ap.add_argument("--actor-batch", type=int, default=64)
    ap.add_argument("--ascent-lr", type=float, default=None,
                    help="Q-VGM ascent step alpha (default: the task's, critic_trainer.recipes.qvgm_ascent_lr)")
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
    ap.add_argument("--sft-candidates", type=int, default=1, metavar="K",
                    help="train K SFT policies per training seed (other inits, same demos) and keep the one with the "
                    "most successes on --tune-episodes tuning scenes (default 1: no selection)")
    ap.add_argument("--on-tuning-seeds", action="store_true",
                    help="evaluate on tuning seeds instead of held-out ones (diagnosing step sizes etc.)")
    ap.add_argument("--noise-scale", type=float, default=1.0, metavar="S",
                    help="evaluate the flow policies (sft and the trained methods) from x_1 = S * eps: 1 (default) "
                         "samples as trained, 0 deterministically; the rollout buffer is always collected at 1")
    ap.add_argument("--max-episode-steps", type=int, default=None, help="time limit (default: the task's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None, help="keep intermediate files here (default: temp dir)")
    ap.add_argument("--keep-policies", action="store_true",
                    help="save each trained method's policy as a checkpoint in --work (run-TASK-sS-METHOD/policy, "
                         "parent: the SFT), for analysis or deployment; needs --work")
    ap.add_argument("--out", type=Path, default=None)
    return ap


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = build_parser()
    args = ap.parse_args(argv)
    check_tier_args(ap, args)
    if args.sft_candidates < 1 or (args.sft_candidates > 1 and (args.calibrate or args.tune_episodes < 1)):
        ap.error("--sft-candidates wants K >= 1, and K > 1 needs --tune-episodes >= 1 and no --calibrate")
    if args.branch_reps < 1:
        ap.error("--branch-reps wants R >= 1")
    if not np.isfinite(args.branch_offset) or args.branch_offset < 0 or (args.branch_offset and args.branches < 1):
        ap.error("--branch-offset wants a finite S >= 0, and S > 0 needs --branches K >= 1")
    if args.branch_offset and is_pixels(args):
        ap.error("--branch-offset applies to the state tier: the pixel tier's rollouts go through its camera check, "
                 "which a first-chunk offset would bypass")
    if not np.isfinite(args.noise_scale) or args.noise_scale < 0:
        ap.error("--noise-scale wants a finite S >= 0")
    if args.noise_scale != 1.0 and {"best-of-n", "q-guided"} & set(args.methods):
        ap.error("--noise-scale applies to flow policies; best-of-n and q-guided draw their own samples (give S = 1)")
    if args.keep_policies and args.work is None:
        ap.error("--keep-policies saves into --work: give one")
    if args.critic_contrast < 0 or (args.critic_contrast > 0 and args.branches < 1):
        ap.error("--critic-contrast wants W >= 0, and W > 0 needs --branches K >= 1 (the same-state groups)")
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
                tasks[task] = {"summary": summary, "seeds": seeds, "sft_settings": sft_settings(task, args),
                               "qvgm_ascent_lr": ascent_lr(task, args)}
            result = {"mode": "diagnostic (tuning seeds)" if args.on_tuning_seeds else "benchmark",
                      "eval_seeds": f"{seed0}..{seed0 + args.eval_episodes - 1}",
                      "tasks": tasks}
    while _GYM_ENVS:
        _GYM_ENVS.popitem()[1].close()
    pixels = is_pixels(args)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if pixels or k not in NEW_OPTIONS or v not in (None, False)}  # state: unset new options left out
    tier: dict[str, Any] = {}
    machine: dict[str, Any] = {}
    if pixels:
        tier = {"config": args.config, "device": args.device, "image_size": list(args.image_size),
                "cameras": list(args.cameras), "critic_features": args.critic_features}
        if args.device.startswith("cuda"):
            machine = {"cuda_device": torch.cuda.get_device_name(torch.device(args.device)),
                       "cuda": torch.version.cuda}
    out = {"bench": "learning", "tier": args.tier, **tier, "settings": settings,
           "seed_scheme": {"demos": f"{DEMO0} + 1000*s + k", "tuning": f"{TUNE0} + j",
                           "rollouts": f"{ROLL0} + 1000*s + k", "eval": f"{EVAL0} + j"},
           "machine": report.machine(args.threads, **machine),
           **result, "wall_s": round(time.perf_counter() - t_all, 1)}
    return report.emit(out, args.out)


if __name__ == "__main__":
    main()
