"""Demo collection: the noisy scripted expert in the MuJoCo tabletop, recorded in the replay-buffer format.

    critic_trainer demos --task push --episodes 20 --noise 0.01 --seed 0 --out data/push_demos

Episode k uses scene seed `seed + k` and expert RNG seed `seed + k`, so a dataset is reproducible and
evaluation can pick env seeds that never appear in it (see `demo_seeds`). Every frame is written with
`policy_version="expert"`; the episode's success label comes from the sim's success detector (`label_source
"auto"`); next.reward is the sim's sparse reward (1.0 on the success step), next.done is set on success.

The replay buffer stores only the robot state; the `state` backbone also reads the privileged object state
(float32[7 * n_roles]: xyz m + quat wxyz per role). It is kept in a side file per episode,
`meta/qvgm_privileged/episode-XXXXXX.parquet` (columns frame_index int64, privileged list<float32>), which
LeRobot's reader ignores; `load_privileged` reads it back aligned with the reader's global frame index.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qvgm.data import DatasetError, ReplayBuffer, ReplayReader
from qvgm.data import layout as L
from qvgm.data.video import PIX_FMTS, sim_video

PRIVILEGED_DIR = "meta/qvgm_privileged"
HELP = "record noisy scripted-expert demos from the sim into a replay-buffer dataset"


def privileged_path(root: Path, episode_index: int) -> Path:
    return Path(root) / PRIVILEGED_DIR / f"episode-{episode_index:06d}.parquet"


def write_privileged(root: Path, episode_index: int, privileged: np.ndarray) -> None:
    """Atomically write one episode's privileged state float32 [L, k]."""
    p = np.asarray(privileged, dtype=np.float32)
    table = pa.table({"frame_index": pa.array(np.arange(len(p), dtype=np.int64)),
                      "privileged": pa.FixedSizeListArray.from_arrays(pa.array(p.reshape(-1)), p.shape[1])})
    path = privileged_path(root, episode_index)
    path.parent.mkdir(parents=True, exist_ok=True)
    L.atomic_write_parquet(path, table)


def load_privileged(reader: ReplayReader) -> np.ndarray | None:
    """Privileged state float32 [num_frames, k] aligned with the reader's global index, or None when any
    committed episode lacks its side file (e.g. a dataset recorded on the real robot)."""
    parts = []
    for row in reader.episodes:
        path = privileged_path(reader.root, row["episode_index"])
        if not path.exists():
            return None
        col = pq.read_table(path, columns=["privileged"]).column("privileged").combine_chunks()
        arr = col.values.to_numpy(zero_copy_only=False).reshape(len(col), -1).astype(np.float32)
        if len(arr) != row["length"]:
            raise DatasetError(f"{path}: {len(arr)} privileged frames, episode has {row['length']}")
        parts.append(arr)
    if not parts:
        return None
    if len({p.shape[1] for p in parts}) != 1:
        raise DatasetError(f"{reader.root}: privileged state width differs between episodes")
    return np.concatenate(parts)


def demo_seeds(seed: int, episodes: int) -> list[int]:
    """Scene seeds used by `collect_demos(seed=seed, episodes=episodes)`."""
    return [seed + k for k in range(episodes)]


def collect_demos(task: str, episodes: int, out: str | Path, noise: float = 0.01, seed: int = 0,
                  image_size: tuple[int, int] = (224, 224), cameras: tuple[str, ...] = ("front", "wrist"),
                  control_hz: int = 10, append: bool = False, render: bool = True,
                  video: dict[str, Any] | None = None, colors: str = "random", lead_policy: Any = None,
                  lead_chunks: int = 6, n_exec: int = 5) -> dict[str, Any]:
    """Run `episodes` noisy expert episodes of `task` and write them to the dataset at `out`.

    image_size: (height, width) px, both even (video encoding). noise: expert noise std in m (qvgm.sim.expert).
    video: ReplayBuffer.create's pix_fmt / crf (default qvgm.data.video.sim_video(): near-lossless, so the frames
    trained on are the frames the policy sees at run time); ignored with `append` (the dataset's own settings).
    render=False records no cameras (state-only dataset, much faster). colors: TabletopEnv's "random" (the task) or
    "fixed" (same colour per role in every scene, a diagnostic). Returns a summary dict
    {task, episodes, successes, frames, seeds, colors, wall_s}.

    lead_policy (a FlowPolicy; recovery demos, sim only): each episode first runs this policy for k chunks (k uniform
    in 1..lead_chunks from default_rng([scene seed, 13]); n_exec steps each, sampling noise seeded by the scene
    seed), unrecorded; then a fresh expert plans from wherever the arm is and only its part is recorded. The demos
    then start in states the policy itself reaches (DAgger-style data, labelled by the expert). Episodes the policy
    ends (success or time limit) before the hand-over are skipped (summary["skipped"]).
    `out` must not hold a dataset unless `append`.
    """
    from qvgm.sim import TASKS, TabletopEnv, make_expert

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {TASKS}")
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if noise < 0 or not np.isfinite(noise):
        raise ValueError(f"noise must be a finite std >= 0 (m), got {noise}")
    h, w = int(image_size[0]), int(image_size[1])
    if render and (h < 2 or w < 2 or h % 2 or w % 2):
        raise ValueError(f"image size must be even and >= 2 px for video encoding, got {h}x{w}")
    out = Path(out)
    exists = (out / L.INFO_PATH).exists()
    if exists and not append:
        raise FileExistsError(f"{out} already holds a dataset; pass --append to add episodes")
    cams = tuple(cameras) if render else ()
    env = TabletopEnv(task=task, cameras=cams or ("front",), image_size=(h, w), control_hz=float(control_hz),
                      render=render, colors=colors)
    if exists:
        buf = ReplayBuffer.open(out)
        want = {c: (h, w) for c in cams}
        if buf.cameras != want or buf.fps != int(control_hz):
            buf.close()
            raise ValueError(f"{out}: existing dataset has cameras {buf.cameras} at {buf.fps} Hz, "
                             f"requested {want} at {control_hz} Hz")
    else:
        buf = ReplayBuffer.create(out, fps=int(control_hz), cameras={c: (h, w) for c in cams},
                                  state_names=env.joint_names, action_names=env.joint_names,
                                  **(sim_video() if video is None else video))
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"task": task, "episodes": episodes, "successes": 0, "frames": 0,
                               "seeds": demo_seeds(seed, episodes), "noise": noise,
                               "colors": colors}
    try:
        for s in summary["seeds"]:
            expert = make_expert(task, noise=noise, seed=s, control_hz=float(control_hz))
            obs, _ = env.reset(seed=s)
            if lead_policy is not None:
                obs = _lead(lead_policy, env, obs, s, lead_chunks, n_exec)
                if obs is None:
                    summary["skipped"] = summary.get("skipped", 0) + 1
                    continue
            ep = buf.begin_episode(task=env.prompt, start_stamp=float(obs["stamp"]))
            priv = []
            while True:
                action = expert.act(obs["state"], env.object_poses()).astype(np.float32)
                frame = {"images": obs.get("images", {}), "state": obs["state"], "prompt": obs["prompt"],
                         "stamp": obs["stamp"]}
                priv.append(obs["privileged"])
                obs, reward, terminated, truncated, _ = env.step(action)
                ep.add_frame(frame, action, reward=reward, done=terminated, policy_version="expert")
                if terminated or truncated:
                    break
            index = ep.finish(success=bool(terminated), label_source="auto")
            write_privileged(out, index, np.stack(priv))
            summary["successes"] += int(terminated)
            summary["frames"] += len(priv)
    finally:
        buf.close()
        env.close()
    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    return summary


def _lead(policy: Any, env: Any, obs: dict[str, Any], seed: int, lead_chunks: int,
          n_exec: int) -> dict[str, Any] | None:
    """Run `policy` for k in 1..lead_chunks chunks (collect_demos' lead_policy); the observation after it, or None
    when the episode ended first."""
    import torch

    from critic_trainer.sft import sample_chunk

    k = int(np.random.default_rng([seed, 13]).integers(1, lead_chunks + 1))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(k):
        for a in sample_chunk(policy, obs, gen)[: max(1, n_exec)]:
            obs, _, term, trunc, _ = env.step(np.asarray(a, dtype=np.float32))
            if term or trunc:
                return None
    return obs


def profile_camera_settings(path: str | Path) -> dict[str, Any]:
    """Camera names, image size (H, W) px and control rate (Hz) of a robot profile YAML (config/tabletop_sim.yaml:
    nodes.sim_node.parameters cameras / image_height / image_width / control_hz). Missing keys are left out."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
        params = (doc.get("nodes") or {}).get("sim_node", {}).get("parameters", {}) or {}
    except (OSError, yaml.YAMLError, AttributeError) as e:
        raise ValueError(f"profile {path}: unreadable ({e})") from None
    out: dict[str, Any] = {}
    cams = params.get("cameras", doc.get("cameras"))
    if cams:
        out["cameras"] = [str(c) for c in cams]
    if "image_height" in params and "image_width" in params:
        out["image_size"] = (int(params["image_height"]), int(params["image_width"]))
    if "control_hz" in params:
        hz = float(params["control_hz"])
        if hz != int(hz):
            raise ValueError(f"profile {path}: control_hz {hz} must be a whole number of Hz (dataset fps)")
        out["hz"] = int(hz)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default=None, help="sim task (pick_place, push, stack); or give --env-spec")
    p.add_argument("--env-spec", default=None, type=Path, help="env spec YAML/JSON of any Gymnasium env (docs/"
                   "gym_envs.md) instead of --task; --noise is then a fraction of the action half-range")
    p.add_argument("--episodes", type=int, required=True)
    p.add_argument("--noise", type=float, default=None, help="expert noise std (m; default 0.01); with --env-spec a "
                   "fraction of the action half-range (default: the spec's demos.noise)")
    p.add_argument("--seed", type=int, default=0, help="episode k uses scene/expert seed SEED + k")
    p.add_argument("--out", required=True, type=Path, help="dataset directory (created)")
    p.add_argument("--profile", default=None, help="robot profile YAML: cameras, resolution and rate come from its "
                   "sim_node parameters (explicit flags win)")
    p.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="camera resolution in px, even numbers (default: profile's, else 224 224)")
    p.add_argument("--cameras", nargs="+", default=None, help="default: profile's, else front wrist")
    p.add_argument("--hz", type=int, default=None, help="control rate = dataset fps (default: profile's, else 10)")
    p.add_argument("--no-render", action="store_true", help="record no cameras (state-only dataset)")
    p.add_argument("--append", action="store_true", help="add episodes to an existing dataset")
    p.add_argument("--colors", choices=["random", "fixed"], default="random",
                   help="object colours: random per scene, named in the prompt (the task), or fixed per role "
                        "(a diagnostic that needs no colour grounding)")
    p.add_argument("--pix-fmt", choices=PIX_FMTS, default=None,
                   help="video pixel format (default yuv444p: the sim renders at model size, where yuv420p's "
                        "half-resolution colour blurs small objects)")
    p.add_argument("--crf", type=int, default=None, help="video quality 0..51 (default 0 = lossless)")


def video_settings(pix_fmt: str | None, crf: int | None) -> dict[str, Any]:
    """--pix-fmt / --crf over the sim defaults (qvgm.data.video.sim_video)."""
    out = sim_video()
    if pix_fmt is not None:
        out["pix_fmt"] = pix_fmt
    if crf is not None:
        out["crf"] = crf
    return out


def run(args: argparse.Namespace) -> int:
    if (args.task is None) == (args.env_spec is None):
        raise ValueError("give exactly one of --task (built-in sim) and --env-spec FILE (any Gymnasium env)")
    if args.env_spec is not None:
        from critic_trainer.env_demos import collect_env_demos

        if args.colors != "random":
            raise ValueError("--colors applies to the built-in sim (--task), not to --env-spec")
        if args.profile or args.image_size or args.cameras or args.hz:
            raise ValueError("--profile/--image-size/--cameras/--hz do not apply to --env-spec: cameras and rate "
                             "come from the spec (observation.images, control_hz)")
        print(json.dumps(collect_env_demos(args.env_spec, args.episodes, args.out, noise=args.noise, seed=args.seed,
                                           append=args.append, render=not args.no_render,
                                           video=video_settings(args.pix_fmt, args.crf))))
        return 0
    prof = profile_camera_settings(args.profile) if args.profile else {}
    image_size = tuple(args.image_size or prof.get("image_size", (224, 224)))
    cameras = tuple(args.cameras or prof.get("cameras", ("front", "wrist")))
    hz = args.hz or prof.get("hz", 10)
    noise = 0.01 if args.noise is None else args.noise
    summary = collect_demos(args.task, args.episodes, args.out, noise=noise, seed=args.seed,
                            image_size=image_size, cameras=cameras, control_hz=hz, append=args.append,
                            render=not args.no_render, video=video_settings(args.pix_fmt, args.crf),
                            colors=args.colors)
    print(json.dumps(summary))
    return 0
