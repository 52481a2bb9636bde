"""SFT success rate in the sim: few-shot SFT from 10 / 20 noisy expert demos, closed-loop evaluation.

For each task and demo count: record `n` noisy-expert demos (scene seeds DEMO_SEED0 + k), train the policy with
`critic_trainer.sft` for several training seeds, and roll it out on held-out scene seeds (EVAL_SEED0 + j, never a
demo seed). Reports per training seed the success rate, and pooled over seeds the mean with a 95 % Wilson
interval (episodes pooled) and a 95 % bootstrap interval over training seeds. Prints one JSON object and writes
it to --out. Usage::

    .venv/bin/python bench/sft_success.py --config state --steps 1000 --seeds 3 --episodes 20 --out sft.json
    .venv/bin/python bench/sft_success.py --config pi05-small --tasks push --demos 10 --seeds 1 --steps 200 ...
    .venv/bin/python bench/sft_success.py --tasks push --override delta_actions=true --override tool_features=true
    python3 bench/sft_success.py --config pi05-small --override delta_actions=true --device cuda ...  (a GPU)

The script puts its own checkout first on sys.path: from a git worktree it runs that worktree's `qvgm`, not the
shared venv's install (the main checkout).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, when run as a script
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.report import emit, machine  # noqa: E402
from critic_trainer.demos import collect_demos  # noqa: E402
from critic_trainer.sft import (  # noqa: E402
    DemoData,
    SFTConfig,
    heldout_flow_loss,
    load_demo_data,
    pose_readout_error,
    rollout,
    train_sft,
)
from qvgm.data.video import sim_video  # noqa: E402
from qvgm.devices import resolve_device  # noqa: E402

DEMO_SEED0 = 0
EVAL_SEED0 = 100_000
HELDOUT_DEMO_SEED0 = 200_000  # fresh expert demos for the open-loop held-out flow loss (--heldout-demos)
POSE_SCENE_SEED0 = 600_000  # extra scripted episodes whose frames feed only the pose readout (--pose-scenes)
GROUNDING_SCENE_SEED0 = 650_000  # extra scripted episodes whose frames feed only keypoint_aux (--grounding-scenes)
RECOVERY_SEED0 = 700_000  # recovery demos: the trained policy leads, the expert takes over (--recovery-demos)
BASE_DEMO_SEED0 = 800_000  # demos of the other tasks a base policy is pretrained on (--base-tasks)


class PoseOffset(gym.ObservationWrapper):
    """Evaluation of a policy told the object poses, with those poses wrong by a constant horizontal offset per
    object and episode (x, y ~ N(0, sigma_m) m each, drawn from default_rng([reset seed, 11])): how precisely must a
    pose estimate (e.g. read from pixels) locate the objects? `privileged` is 7 values per role, xyz first (m)."""

    def __init__(self, env: gym.Env, sigma_m: float) -> None:
        super().__init__(env)
        self.sigma_m = float(sigma_m)
        self._offset = np.zeros((0, 2))

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        n_roles = self.env.observation_space["privileged"].shape[0] // 7
        self._offset = np.random.default_rng([int(seed or 0), 11]).normal(0.0, self.sigma_m, (n_roles, 2))
        return super().reset(seed=seed, options=options)

    def observation(self, obs: dict) -> dict:
        priv = np.array(obs["privileged"], dtype=np.float32).reshape(-1, 7)
        priv[:, :2] += self._offset.astype(np.float32)
        return {**obs, "privileged": priv.reshape(-1)}


class FailureTrace(gym.Wrapper):
    """Why closed-loop episodes fail: tracks, per step, the finger pads' midpoint and every cube's position (m), and
    classifies the finished episode (`classify`). A cube counts as reached when the midpoint comes within REACH_M
    of its centre, as lifted when its centre rises LIFT_M above its resting height."""

    REACH_M = 0.03
    LIFT_M = 0.02

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.trace: dict[str, list[float]] = {}
        self.grasp_step: int | None = None  # trace index of the first closing gripper command
        self.target_xy0 = np.zeros(2)

    def _record(self) -> None:
        from qvgm.sim.robot import FINGER_LINKS

        u = self.env.unwrapped
        m = u.model
        pads = [g for g in range(m.ngeom) if m.body(m.geom_bodyid[g]).name in FINGER_LINKS]
        mid = np.mean(u.data.geom_xpos[pads], axis=0)  # between the finger pads' centres
        for axis, v in zip("xyz", mid, strict=True):
            self.trace.setdefault(f"mid.{axis}", []).append(float(v))
        for role, pose in u.object_poses().items():
            if role.endswith("cube") or role.startswith("distractor"):
                self.trace.setdefault(f"{role}.dist", []).append(float(np.linalg.norm(mid - pose[:3])))
                self.trace.setdefault(f"{role}.z", []).append(float(pose[2]))

    def reset(self, **kw):
        out = super().reset(**kw)
        self.trace, self.grasp_step = {}, None
        self.target_xy0 = np.asarray(self.env.unwrapped.object_poses()["target_cube"][:2], dtype=np.float64)
        self._record()
        return out

    def step(self, action):
        from qvgm.sim.robot import GRIPPER_OPEN

        out = super().step(action)
        self._record()
        if self.grasp_step is None and float(action[-1]) < GRIPPER_OPEN / 2:
            self.grasp_step = len(self.trace["mid.x"]) - 1
        return out

    def aim(self) -> dict:
        """Where the episode tried to grasp: the finger pads' midpoint x/y (m) at the first closing gripper command
        ("grasp"), or, with none, where the midpoint was lowest ("lowest"); and the target cube's x/y at reset."""
        tr = self.trace
        i, how = (self.grasp_step, "grasp") if self.grasp_step is not None else (int(np.argmin(tr["mid.z"])), "lowest")
        return {"target_xy": [round(float(v), 4) for v in self.target_xy0],
                "aim_xy": [round(tr["mid.x"][i], 4), round(tr["mid.y"][i], 4)], "how": how}

    def classify(self, success: bool) -> str:
        """success | wrong cube lifted | went for the wrong cube | never reached the target | reached, not lifted |
        lifted, not placed (checked in this order)."""
        if success:
            return "success"
        tr = self.trace
        others = [k[:-5] for k in tr if k.endswith(".dist") and k != "target_cube.dist"]

        def lifted(r: str) -> bool:
            return max(tr[f"{r}.z"]) - tr[f"{r}.z"][0] > self.LIFT_M

        def reached(r: str) -> bool:
            return min(tr[f"{r}.dist"]) < self.REACH_M

        if any(lifted(r) for r in others) and not lifted("target_cube"):
            return "wrong cube lifted"
        if not reached("target_cube"):
            return "went for the wrong cube" if any(reached(r) for r in others) else "never reached the target"
        return "lifted, not placed" if lifted("target_cube") else "reached, not lifted"


def aim_summary(aims: list[dict]) -> dict:
    """How much the grasp point follows the target over episodes (FailureTrace.aim): per axis the least-squares
    slope and correlation of aim on target x/y (1 / 1: aims where the cube is; 0: the same place whatever the
    scene), the median aim error (m) and, for scale, the median error of always aiming at the targets' mean."""
    t = np.array([a["target_xy"] for a in aims], dtype=np.float64)
    p = np.array([a["aim_xy"] for a in aims], dtype=np.float64)
    out: dict = {"episodes": len(aims), "grasp_attempts": sum(a["how"] == "grasp" for a in aims)}
    if len(aims) >= 3:
        tc, pc = t - t.mean(0), p - p.mean(0)
        out["slope_xy"] = [round(float((tc[:, i] @ pc[:, i]) / max(tc[:, i] @ tc[:, i], 1e-12)), 3) for i in (0, 1)]
        out["corr_xy"] = [round(float(np.corrcoef(t[:, i], p[:, i])[0, 1]), 3) if pc[:, i].std() > 0 else 0.0
                          for i in (0, 1)]
    out["aim_error_m_median"] = round(float(np.median(np.linalg.norm(p - t, axis=1))), 4)
    out["mean_target_error_m_median"] = round(float(np.median(np.linalg.norm(t - t.mean(0), axis=1))), 4)
    return out


class ImageAblation(gym.ObservationWrapper):
    """Closed-loop evaluation with the camera images altered, to see whether (and which) images the policy reads
    once the arm moves. Modes, each for every camera or for one (`MODE:CAM`): "frozen" holds the image of the reset
    frame for the whole episode; "blank" replaces it by mid grey (128)."""

    MODES = ("frozen", "blank")

    def __init__(self, env: gym.Env, spec: str) -> None:
        super().__init__(env)
        mode, _, cam = spec.partition(":")
        if mode not in self.MODES:
            raise ValueError(f"image ablation {spec!r}: mode must be one of {self.MODES} (optionally MODE:CAMERA)")
        cams = tuple(env.unwrapped.cameras)
        if cam and cam not in cams:
            raise ValueError(f"image ablation {spec!r}: no camera {cam!r} (cameras: {', '.join(cams)})")
        self.mode, self.cams = mode, (cam,) if cam else cams
        self._first: dict[str, np.ndarray] = {}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self._first = {}
        return super().reset(seed=seed, options=options)

    def observation(self, obs: dict) -> dict:
        images = dict(obs["images"])
        for c in self.cams:
            if self.mode == "blank":
                images[c] = np.full_like(images[c], 128)
            else:
                images[c] = self._first.setdefault(c, images[c].copy())
        return {**obs, "images": images}


def eval_env(policy: torch.nn.Module, task: str, args: argparse.Namespace) -> gym.Env:
    """The evaluation TabletopEnv of a policy: its cameras (none: state only) at --image-size, --colors."""
    from qvgm.sim import TabletopEnv

    cams = tuple(getattr(policy.config, "camera_names", []) or [])
    return TabletopEnv(task=task, cameras=cams or ("front",), image_size=tuple(args.image_size), render=bool(cams),
                       colors=args.colors, max_episode_steps=getattr(args, "max_episode_steps", None))


def traced_eval(policy: torch.nn.Module, task: str, seeds: list[int], env: gym.Env, args: argparse.Namespace, *,
                trace: bool = True, stop: threading.Event | None = None, compare_expert: bool = False) -> dict:
    """Closed-loop episodes on `seeds` in `env` (closed after), sampling noise seeded by the scene seed. Returns
    {success, outcomes, runs: rollout's dict per episode}; with `trace` (env wrapped in a FailureTrace) also
    failure_modes, aim (aim_summary) and each run's min_target_dist_m (m). A set `stop` event (SIGTERM, see
    _stop_after_episode) ends the loop before the next episode; `compare_expert` adds each run's action_error."""
    if trace:
        env = FailureTrace(env)
    runs, modes, aims = [], {}, []
    try:
        for e in seeds:
            if stop is not None and stop.is_set():
                break
            run = rollout(policy, task, e, n_exec=args.n_exec, env=env, noise_seed=e, compare_expert=compare_expert)
            run["success"] = bool(run["success"])
            if trace:
                mode = env.classify(run["success"])
                modes[mode] = modes.get(mode, 0) + 1
                run["min_target_dist_m"] = round(min(env.trace["target_cube.dist"]), 4)
                aims.append(env.aim())
            runs.append(run)
    finally:
        env.close()
    outcomes = [int(r["success"]) for r in runs]
    return {"success": sum(outcomes), "outcomes": outcomes, "runs": runs,
            **({"failure_modes": modes, "aim": aim_summary(aims)} if trace else {})}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval for k successes out of n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, c - h), min(1.0, c + h))


def bootstrap(rates: list[float], iters: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean of per-seed success rates."""
    r = np.asarray(rates, dtype=np.float64)
    if len(r) < 2:
        return (float(r.mean()), float(r.mean()))
    rng = np.random.default_rng(seed)
    means = r[rng.integers(0, len(r), size=(iters, len(r)))].mean(1)
    return (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))


@contextlib.contextmanager
def _stop_after_episode():
    """While active, SIGTERM sets the yielded event instead of killing the process: the evaluation loop stops
    after the episode in progress and the seed is reported on the episodes done so far (the held-out seeds run in
    a fixed order, so a prefix of them is still an unbiased sample). Outside it SIGTERM kills as usual."""
    stop = threading.Event()
    old = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, old)
        if stop.is_set():
            print(json.dumps({"warning": "SIGTERM: evaluation stopped early"}), flush=True)


def summarise(task: str, demos: int, frames: int, per_seed: list[dict]) -> dict:
    """One (task, demos) row: episodes pooled over training seeds (Wilson) and per-seed rates (bootstrap)."""
    k_all = sum(p["success"] for p in per_seed)
    n_all = sum(p["episodes"] for p in per_seed)
    return {"task": task, "demos": demos, "frames": frames, "success_mean": k_all / n_all,
            "wilson95": wilson(k_all, n_all), "bootstrap95_over_seeds": bootstrap([p["rate"] for p in per_seed]),
            "per_seed": per_seed}


def shuffled_variants(policy: torch.nn.Module, heldout: DemoData, seed: int) -> list[tuple[str, DemoData]]:
    """The held-out frames with one input permuted across frames (one permutation, seeded): the object state
    (`privileged`, for a policy that reads it), all cameras together (two or more) and each camera alone. A model
    that uses an input loses accuracy on its variant; a constant input gives back the plain loss exactly."""
    perm = np.random.default_rng(seed).permutation(len(heldout))
    out = []
    if getattr(policy.config, "privileged_dim", 0):
        out.append(("privileged", dataclasses.replace(heldout, privileged=heldout.privileged[perm])))
    cams = list(getattr(policy.config, "camera_names", None) or [])
    for name, which in ([("images", cams)] if len(cams) > 1 else []) + [(c, [c]) for c in cams]:
        out.append((name, dataclasses.replace(heldout, images={c: v[perm] if c in which else v
                                                               for c, v in heldout.images.items()})))
    return out


def heldout_probe(policy: torch.nn.Module, train: DemoData, heldout: DemoData, seed: int) -> dict[str, float]:
    """Open-loop flow loss (fixed noise and flow-time draws) on the training frames, on fresh demos, and on the fresh
    demos with each input shuffled (`heldout_loss_shuffled_<input>`, see shuffled_variants): higher than
    `heldout_loss` when the model uses that input."""
    out = {"train_loss": round(heldout_flow_loss(policy, train, seed=seed, samples=1), 4),
           "heldout_loss": round(heldout_flow_loss(policy, heldout, seed=seed), 4)}
    for name, shuffled in shuffled_variants(policy, heldout, seed):
        out[f"heldout_loss_shuffled_{name}"] = round(heldout_flow_loss(policy, shuffled, seed=seed), 4)
    return out


def base_policy(root: Path, args: argparse.Namespace, overrides: dict) -> tuple[str | None, dict]:
    """The checkpoint every SFT of the run fine-tunes (SFTConfig.init): --init as given, or with --base-tasks a base
    pretrained here on --base-demos noisy demos of each base task (scene seeds BASE_DEMO_SEED0 + k, the run's
    render size, colours, config, overrides and SFT aids; --base-steps steps, seed --base-seed), its tokenizer
    knowing every word of the evaluated tasks' prompts; with --keep it stays in `root` for later runs' --init.
    Returns (checkpoint dir or None, what to record in the JSON)."""
    from qvgm.sim.tasks import prompt_vocabulary

    if args.init is not None:
        return str(args.init), {"init": str(args.init)}
    if not args.base_tasks:
        return None, {}
    ck = root / f"base-{'+'.join(args.base_tasks)}-n{args.base_demos}-steps{args.base_steps}-s{args.base_seed}"
    info = {"init": str(ck), "base_tasks": list(args.base_tasks), "base_demos": args.base_demos,
            "base_steps": args.base_steps, "base_seed": args.base_seed, "base_demo_seeds": f"{BASE_DEMO_SEED0}+k"}
    t0 = time.perf_counter()
    datasets = []
    for task in args.base_tasks:
        path = root / f"base-{task}-demos"
        collect_demos(task, args.base_demos, path, noise=args.noise, seed=BASE_DEMO_SEED0,
                      image_size=tuple(args.image_size), render=args.config != "state", colors=args.colors)
        datasets.append(str(path))
    cfg = SFTConfig(datasets=datasets, config=args.config, out=str(ck), steps=args.base_steps, seed=args.base_seed,
                    batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, checkpoint_every=args.base_steps,
                    overrides=overrides, device=args.device, image_shift=args.image_shift,
                    camera_dropout=args.camera_dropout, keypoint_aux=args.keypoint_aux,
                    keypoint_aux_cameras=list(args.keypoint_aux_cameras), vocabulary=prompt_vocabulary(args.tasks),
                    version=f"base-{'+'.join(args.base_tasks)}")
    res = train_sft(cfg, progress=False)
    info.update(base_final_loss=round(res["final_loss"], 4), base_train_s=round(time.perf_counter() - t0, 1))
    print(json.dumps({"base": info}), flush=True)
    return str(ck), info


def extra_scenes(task: str, kind: str, n: int, seed0: int, root: Path, args: argparse.Namespace) -> list[str]:
    """[dataset dir] of n more scripted episodes of `task` (scene seeds seed0+, the demos' noise, render size and
    colours) for an SFT aid (pose_aux / keypoint_aux scenes), or [] for n = 0."""
    if not n:
        return []
    path = root / f"{task}-{kind}-scenes"
    collect_demos(task, n, path, noise=args.noise, seed=seed0, image_size=tuple(args.image_size), render=True,
                  colors=args.colors)
    return [str(path)]


POOLED_SETTINGS = ("config", "steps", "batch_size", "lr", "warmup", "policy", "demo_noise_m", "n_exec", "eval_seeds",
                   "image_shift", "camera_dropout", "render_size", "pose_aux", "pose_probe", "pose_scenes",
                   "pose_pretrain_steps", "pose_readout", "pose_values", "keypoint_aux", "keypoint_aux_cameras",
                   "grounding_scenes", "init", "max_episode_steps")
# settings added after runs were recorded: a JSON without the key ran with this value
POOLED_DEFAULTS = {"keypoint_aux": 0.0, "keypoint_aux_cameras": None, "grounding_scenes": 0, "init": None,
                   "max_episode_steps": None}


def pool(runs: list[dict]) -> dict:
    """Merge outputs of one setting run as separate processes (e.g. one per training seed). Refuses runs whose
    settings differ or that repeat a (task, demos, seed); rows are re-summarised over all their seeds."""
    if not runs:
        raise ValueError("nothing to pool")
    for r in runs[1:]:
        diff = [k for k in POOLED_SETTINGS
                if r.get(k, POOLED_DEFAULTS.get(k)) != runs[0].get(k, POOLED_DEFAULTS.get(k))]
        if diff:
            raise ValueError(f"cannot pool runs with different settings: {diff}")
    rows: dict[tuple[str, int], dict] = {}
    for r in runs:
        for row in r["results"]:
            cur = rows.setdefault((row["task"], row["demos"]), {"frames": row["frames"], "per_seed": []})
            if cur["frames"] != row["frames"]:
                raise ValueError(f"{row['task']}/{row['demos']}: runs trained on different data "
                                 f"({cur['frames']} vs {row['frames']} frames)")
            seen = {p["seed"] for p in cur["per_seed"]}
            dup = seen & {p["seed"] for p in row["per_seed"]}
            if dup:
                raise ValueError(f"{row['task']}/{row['demos']}: training seed(s) {sorted(dup)} appear twice")
            cur["per_seed"] += row["per_seed"]
    results = [summarise(t, n, v["frames"], sorted(v["per_seed"], key=lambda p: p["seed"]))
               for (t, n), v in sorted(rows.items())]
    return {**{k: runs[0][k] for k in runs[0] if k not in ("results", "wall_s")}, "results": results,
            "pooled_from": len(runs), "wall_s": [r.get("wall_s") for r in runs]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="state")
    ap.add_argument("--tasks", nargs="+", default=["pick_place", "push", "stack"])
    ap.add_argument("--demos", nargs="+", type=int, default=[10, 20])
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per (task, demos)")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="training seeds are first-seed .. first-seed + seeds - 1 (one process per seed, then --pool)")
    ap.add_argument("--episodes", type=int, default=20, help="evaluation episodes per training seed")
    ap.add_argument("--max-episode-steps", type=int, default=None,
                    help="time limit of each evaluation episode in control steps (default: the task's own)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--noise", type=float, default=0.01, help="demo expert noise std (m)")
    ap.add_argument("--n-exec", type=int, default=5, help="actions executed per chunk")
    ap.add_argument("--image-size", type=int, nargs=2, default=(64, 64))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto", help="SFT device: auto (CUDA when present), cpu, cuda, cuda:N; "
                    "evaluation runs the policy where it trained")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=JSON",
                    help="policy config override, e.g. delta_actions=true (repeatable)")
    ap.add_argument("--warmup", type=int, default=50, help="linear lr warm-up steps")
    ap.add_argument("--image-shift", type=int, default=0, metavar="PX",
                    help="SFT random-shift image augmentation, up to PX px at the model's resolution (0 = off)")
    ap.add_argument("--camera-dropout", type=float, default=0.0, metavar="P",
                    help="SFT camera dropout: each sample's cameras masked with probability P "
                         "(SFTConfig.camera_dropout)")
    ap.add_argument("--keypoint-aux", type=float, default=0.0, metavar="W",
                    help="sim-only: + W x the squared distance of the first prompt-query keypoint (per camera) from "
                         "the projected target cube (SFTConfig.keypoint_aux; needs --override "
                         "keypoint_prompt_queries=Q and square renders)")
    ap.add_argument("--keypoint-aux-cameras", nargs="+", default=["front"], metavar="CAM",
                    help="with --keypoint-aux: cameras whose first query keypoint is supervised (default front)")
    ap.add_argument("--pose-aux", type=float, default=0.0, metavar="W",
                    help="sim-only SFT aid: weight of the auxiliary loss reading the object state from the image "
                         "tokens (SFTConfig.pose_aux; the head is not saved, evaluation sees pixels only)")
    ap.add_argument("--pose-probe", action="store_true",
                    help="with --pose-aux: train the readout on detached tokens (plain SFT + a localisation probe)")
    ap.add_argument("--grounding-scenes", type=int, default=0, metavar="N",
                    help=f"with --keypoint-aux: N more scripted episodes (scene seeds {GROUNDING_SCENE_SEED0}+) whose "
                         "frames feed only the grounding loss (SFTConfig.grounding_datasets)")
    ap.add_argument("--pose-scenes", type=int, default=0, metavar="N",
                    help="with --pose-aux: N more scripted episodes (scene seeds 600000+) whose frames feed only the "
                         "pose readout, never the action loss (SFTConfig.pose_datasets)")
    ap.add_argument("--pose-readout", choices=["image", "prefix"], default="image",
                    help="with --pose-aux: what the readout reads (SFTConfig.pose_readout)")
    ap.add_argument("--pose-values", choices=["all", "xyz"], default="all",
                    help="with --pose-aux: xyz + quaternion per role, or positions only (SFTConfig.pose_values)")
    ap.add_argument("--pose-pretrain-steps", type=int, default=0, metavar="N",
                    help="with --pose-aux: N vision-only steps on the pose targets before SFT "
                         "(SFTConfig.pose_pretrain_steps)")
    ap.add_argument("--colors", choices=["random", "fixed"], default="random",
                    help="sim object colours for demos, pose scenes and evaluation: random per scene and named in "
                         "the prompt (the task), or fixed per role (a diagnostic: no colour grounding needed)")
    ap.add_argument("--failure-modes", action="store_true",
                    help="classify each evaluation episode (FailureTrace: wrong cube, never reached, reached but not "
                         "lifted, lifted but not placed) and count the classes per training seed")
    ap.add_argument("--recovery-demos", type=int, default=0, metavar="N",
                    help="after each evaluation: N recovery demos (scenes 700000+: the trained policy runs 1..K "
                         "chunks, a fresh expert takes over and only its part is recorded), SFT again from scratch on "
                         "demos + recovery demos, and evaluate that on the same scenes (one DAgger-style round)")
    ap.add_argument("--recovery-chunks", type=int, default=6, metavar="K")
    ap.add_argument("--told-pose-noise", type=float, nargs="+", default=[], metavar="M",
                    help="policies told the object poses: also evaluate each on the same scenes with the poses "
                         "offset by N(0, M) m in x and y per object and episode (PoseOffset)")
    ap.add_argument("--image-ablation", nargs="+", default=[], metavar="MODE[:CAM]",
                    help="also evaluate a pixel policy on the same scenes with its images altered: frozen (the reset "
                         "frame held) or blank (mid grey), for every camera or one (e.g. blank:wrist); with failure "
                         "modes and where it aims")
    ap.add_argument("--heldout-demos", type=int, default=0, metavar="N",
                    help="also report the flow loss on N fresh expert demos (scene seeds 200000+), open loop; for a "
                         "model told the object state (privileged_dim) also with those values shuffled across "
                         "frames (how much the model uses them)")
    ap.add_argument("--action-error", action="store_true",
                    help="also report the mean |policy - noiseless expert| action error (rad / m) of each rollout")
    ap.add_argument("--init", type=Path, default=None, metavar="CKPT",
                    help="every SFT fine-tunes this checkpoint (SFTConfig.init) instead of fresh weights")
    ap.add_argument("--base-tasks", nargs="+", default=[], metavar="TASK",
                    help="first pretrain a base policy on demos of these tasks (same recipe and aids; scene seeds "
                         f"{BASE_DEMO_SEED0}+), then fine-tune it on each --tasks (the few-shot SFT of a pretrained "
                         "policy); with --keep it stays there for later runs' --init")
    ap.add_argument("--base-demos", type=int, default=75, metavar="N", help="with --base-tasks: demos per base task")
    ap.add_argument("--base-steps", type=int, default=3000, metavar="N", help="with --base-tasks: SFT steps")
    ap.add_argument("--base-seed", type=int, default=0, help="with --base-tasks: the base's SFT seed")
    ap.add_argument("--keep", type=Path, default=None,
                    help="keep demos, checkpoints and SFT logs (scalars.jsonl) in this directory")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--pool", type=Path, nargs="+", default=None, metavar="JSON",
                    help="instead of running: merge these outputs of one setting (per-seed processes) into one")
    args = ap.parse_args(argv)
    if args.init is not None and args.base_tasks:
        ap.error("--init and --base-tasks both name the checkpoint to fine-tune: give one")
    if set(args.base_tasks) & set(args.tasks):
        ap.error(f"--base-tasks {sorted(set(args.base_tasks) & set(args.tasks))} are also evaluated: a base must not "
                 "have seen the task it is fine-tuned on")
    if args.pool:
        return emit(pool([json.loads(f.read_text()) for f in args.pool]), args.out)
    torch.set_num_threads(args.threads)
    overrides = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.override)}
    state_only = args.config == "state"
    t_all = time.perf_counter()
    results = []
    policy_flags: dict = {}
    stopped = False  # a SIGTERM during an evaluation: report what is done, train nothing more
    with tempfile.TemporaryDirectory(prefix="sft_bench_") as tmp:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            tmp = str(args.keep)
        init, base_info = base_policy(Path(tmp), args, overrides)
        for task in args.tasks:
            if stopped:
                break
            root = Path(tmp) / task
            demo = collect_demos(task, max(args.demos), root, noise=args.noise, seed=DEMO_SEED0,
                                 image_size=tuple(args.image_size), render=not state_only,
                             colors=args.colors)
            print(json.dumps({"demos": demo}), flush=True)
            heldout = None
            if args.heldout_demos:
                hroot = Path(tmp) / f"{task}-heldout"
                collect_demos(task, args.heldout_demos, hroot, noise=args.noise, seed=HELDOUT_DEMO_SEED0,
                              image_size=tuple(args.image_size), render=not state_only, colors=args.colors)
                heldout = load_demo_data([hroot], 10, with_images=not state_only)
            pose_datasets = extra_scenes(task, "pose", args.pose_scenes, POSE_SCENE_SEED0, Path(tmp), args)
            grounding_datasets = extra_scenes(task, "grounding", args.grounding_scenes, GROUNDING_SCENE_SEED0,
                                              Path(tmp), args)
            eval_seeds = [EVAL_SEED0 + j for j in range(args.episodes)]
            assert not set(eval_seeds) & set(demo["seeds"])
            for n in args.demos:
                if stopped:
                    break
                data = load_demo_data([root], 10, with_images=not state_only, max_episodes=n)
                per_seed = []
                for s in range(args.first_seed, args.first_seed + args.seeds):
                    if stopped:
                        break
                    t0 = time.perf_counter()
                    ck = str(Path(tmp) / f"ck-{task}-{n}-{s}")
                    cfg = SFTConfig(datasets=[str(root)], config=args.config, out=ck,
                                    steps=args.steps, seed=s, batch_size=args.batch_size, lr=args.lr,
                                    warmup=args.warmup,
                                    checkpoint_every=args.steps, max_episodes=n, overrides=overrides,
                                    device=args.device, image_shift=args.image_shift, pose_aux=args.pose_aux,
                                    camera_dropout=args.camera_dropout,
                                    pose_probe=args.pose_probe, pose_datasets=pose_datasets,
                                    pose_pretrain_steps=args.pose_pretrain_steps,
                                    pose_readout=args.pose_readout, pose_values=args.pose_values,
                                    keypoint_aux=args.keypoint_aux,
                                    keypoint_aux_cameras=list(args.keypoint_aux_cameras),
                                    grounding_datasets=grounding_datasets, init=init)
                    res = train_sft(cfg, data=data, progress=False)
                    t_train = time.perf_counter() - t0
                    probe = heldout_probe(res["policy"], data, heldout, s) if heldout is not None else {}
                    if args.keypoint_aux:
                        probe["final_keypoint_aux_loss"] = round(res["final_keypoint_aux_loss"], 4)
                    if "pose_readout" in res:  # how well the image tokens locate the objects, train / fresh scenes
                        probe["final_pose_loss"] = round(res["final_pose_loss"], 4)
                        if heldout is not None:
                            probe["heldout_pose_mse"] = round(pose_readout_error(
                                res["policy"], res["pose_readout"], heldout, res["pose_quantiles"],
                                where=args.pose_readout, values=args.pose_values), 4)
                    cfg_d = res["policy"].config.to_dict()
                    policy_flags = {k: cfg_d[k] for k in ("delta_actions", "privileged_norm", "tool_features",
                                                          "hidden", "head_hidden", "head_depth", "image_size",
                                                          "privileged_dim", "ordinal_state_bins", "continuous_state",
                                                          "state_film", "zero_padded_actions", "head",
                                                          "head_width", "head_layers", "encoder", "camera_names",
                                                          "keypoint_tokens", "keypoint_film", "keypoint_per_token",
                                                          "patch_token_dropout", "keypoint_prompt_queries")
                                    if k in cfg_d}
                    if cfg_d.get("backbone") == "pi05" and cfg_d.get("privileged_dim"):  # told the poses
                        policy_flags["privileged_quantiles"] = (
                            res["policy"].processor.norm_stats.privileged_q01 is not None)
                    with _stop_after_episode() as stop:  # SIGTERM (a time limit) ends the evaluation early
                        print(json.dumps({"evaluating": task, "demos": n, "seed": s, "episodes": len(eval_seeds)}),
                              flush=True)
                        ev = traced_eval(res["policy"], task, eval_seeds, eval_env(res["policy"], task, args), args,
                                         trace=args.failure_modes, stop=stop, compare_expert=args.action_error)
                        runs = ev["runs"]
                        stopped = stop.is_set()
                    if not runs:
                        raise SystemExit(f"{task}/{n} seed {s}: stopped before the first evaluation episode")
                    offset_evals = {}
                    if args.told_pose_noise and not getattr(res["policy"].config, "privileged_dim", 0):
                        raise SystemExit("--told-pose-noise needs a policy told the poses (privileged_dim)")
                    for sigma in args.told_pose_noise:  # the same scenes and sampling noise, poses offset
                        ev_off = traced_eval(res["policy"], task, eval_seeds[:len(runs)],
                                             PoseOffset(eval_env(res["policy"], task, args), sigma), args, trace=False)
                        outcomes = ev_off["outcomes"]
                        offset_evals[str(sigma)] = {"success": sum(outcomes), "outcomes": outcomes}
                        print(json.dumps({"pose_offset_m": sigma, "success": sum(outcomes)}), flush=True)
                    ablations = {}
                    if args.image_ablation and not getattr(res["policy"].config, "camera_names", None):
                        raise SystemExit("--image-ablation needs a policy that reads images")
                    for spec in args.image_ablation:  # the same scenes and sampling noise, images altered
                        abl = traced_eval(res["policy"], task, eval_seeds[:len(runs)],
                                          ImageAblation(eval_env(res["policy"], task, args), spec), args)
                        ablations[spec] = {k: v for k, v in abl.items() if k != "runs"}
                        print(json.dumps({"image_ablation": spec, "success": ablations[spec]["success"],
                                          "aim": ablations[spec]["aim"]}), flush=True)
                    k = sum(r["success"] for r in runs)
                    errs = [r["action_error"] for r in runs if r["action_error"] is not None]
                    per_seed.append({"seed": s, "success": k, "episodes": len(runs), "rate": k / len(runs),
                                     "outcomes": [int(bool(r["success"])) for r in runs],
                                     **({"stopped_early": True} if len(runs) < len(eval_seeds) else {}),
                                     "final_loss": round(res["final_loss"], 4), "train_s": round(t_train, 1),
                                     "eval_s": round(time.perf_counter() - t0 - t_train, 1),
                                     **({"action_error_mean": round(float(np.mean(errs)), 4)} if errs else {}),
                                     **({"success_with_pose_offset_m": offset_evals} if offset_evals else {}),
                                     **({"failure_modes": ev["failure_modes"],
                                         "min_target_dist_m": [r["min_target_dist_m"] for r in runs],
                                         "aim": ev["aim"]}
                                        if args.failure_modes else {}),
                                     **({"image_ablation": ablations} if ablations else {}),
                                     **probe})
                    if args.recovery_demos and not stopped:
                        rroot = Path(tmp) / f"{task}-recovery-{n}-{s}"
                        rec = collect_demos(task, args.recovery_demos, rroot, noise=args.noise, seed=RECOVERY_SEED0,
                                            image_size=tuple(args.image_size), render=not state_only,
                                            colors=args.colors, lead_policy=res["policy"].eval(),
                                            lead_chunks=args.recovery_chunks, n_exec=args.n_exec)
                        print(json.dumps({"recovery_demos": {k: v for k, v in rec.items() if k != "seeds"}}),
                              flush=True)
                        data2 = load_demo_data([root, rroot], 10, with_images=not state_only, max_episodes=n)
                        res2 = train_sft(dataclasses.replace(cfg, datasets=[str(root), str(rroot)], out=ck + "-rec"),
                                         data=data2, progress=False)
                        out2 = traced_eval(res2["policy"], task, eval_seeds, eval_env(res2["policy"], task, args),
                                           args, trace=False)["outcomes"]
                        per_seed[-1]["recovery"] = {
                            "demos": {k: v for k, v in rec.items() if k != "seeds"}, "frames": len(data2),
                            "success": sum(out2), "episodes": len(out2), "outcomes": out2,
                            "final_loss": round(res2["final_loss"], 4),
                            **({"heldout_loss": round(heldout_flow_loss(res2["policy"], heldout, seed=s), 4)}
                               if heldout is not None else {})}
                    print(json.dumps({"task": task, "demos": n, **per_seed[-1]}), flush=True)
                if per_seed:
                    results.append(summarise(task, n, len(data), per_seed))
    device = resolve_device(args.device)
    out = {"bench": "sft_success", "config": args.config, "steps": args.steps, "batch_size": args.batch_size,
           "lr": args.lr, "warmup": args.warmup, "policy": policy_flags, "demo_noise_m": args.noise,
           "image_shift": args.image_shift, "camera_dropout": args.camera_dropout, "pose_aux": args.pose_aux,
           "pose_probe": args.pose_probe, "keypoint_aux": args.keypoint_aux,
           **({"keypoint_aux_cameras": list(args.keypoint_aux_cameras)} if args.keypoint_aux else {}),
           "grounding_scenes": args.grounding_scenes, **base_info,
           **({"grounding_scene_seeds": f"{GROUNDING_SCENE_SEED0}+k"} if args.grounding_scenes else {}),
           "pose_scenes": args.pose_scenes, "pose_pretrain_steps": args.pose_pretrain_steps,
           "pose_readout": args.pose_readout, "pose_values": args.pose_values, "colors": args.colors,
           **({"pose_scene_seeds": f"{POSE_SCENE_SEED0}+k"} if args.pose_scenes else {}),
           "render_size": list(args.image_size), "heldout_demos": args.heldout_demos,
           "max_episode_steps": args.max_episode_steps,
           "demo_video": None if state_only else sim_video(),
           "n_exec": args.n_exec, "device": str(device),
           "demo_seeds": f"{DEMO_SEED0}+k",
           "eval_seeds": f"{EVAL_SEED0}..{EVAL_SEED0 + args.episodes - 1}", "threads": args.threads,
           "machine": machine(args.threads, **({"cuda_device": torch.cuda.get_device_name(device)}
                                               if device.type == "cuda" else {})),
           "results": results, "wall_s": round(time.perf_counter() - t_all, 1)}
    return emit(out, args.out)


if __name__ == "__main__":
    main()
