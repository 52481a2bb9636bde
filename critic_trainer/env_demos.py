"""Demo collection for any Gymnasium env described by an env spec (qvgm.envs, docs/gym_envs.md).

    critic_trainer demos --env-spec examples/reacher_v5.yaml --episodes 20 --noise 0.1 --seed 0 --out data/reach

The same dataset layout as `critic_trainer demos --task` (critic_trainer.demos): episode k uses env seed
`seed + k` and expert seed `seed + k`; the spec's expert factory (env, seed) -> callable(raw_obs) -> env action
drives the env, Gaussian noise of std `noise` x the action half-range (per controlled dim) is added to its action,
which is clipped to the spec bounds; the recorded action is the executed one on the controlled dims (env units);
`observation.state` is the spec's state vector; the spec's `privileged` vector goes to the side files
`meta/qvgm_privileged/` (read back by `load_privileged`, used by the `state` backbone); cameras are the spec's
images. next.reward is the adapter's sparse success reward, next.done set on success, the success label "auto".
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from critic_trainer.demos import demo_seeds, write_privileged
from qvgm.data import ReplayBuffer
from qvgm.data import layout as L
from qvgm.data.video import sim_video
from qvgm.envs import EnvSpec, EnvSpecError, load_env_spec


def collect_env_demos(spec: EnvSpec | str | Path, episodes: int, out: str | Path, noise: float | None = None,
                      seed: int = 0, append: bool = False, render: bool = True,
                      max_episode_steps: int | None = None, video: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run `episodes` noisy expert episodes of the spec's env and write them to the dataset at `out`.

    video: ReplayBuffer.create's pix_fmt / crf for rendered cameras (default qvgm.data.video.sim_video()).

    noise: std as a fraction of the action half-range (default the spec's demos.noise, else 0). render=False
    records no cameras. Returns {task, env_id, episodes, successes, frames, seeds, noise, state_dim,
    privileged_dim, action_dim, wall_s}. `out` must not hold a dataset unless `append`.
    """
    spec = spec if isinstance(spec, EnvSpec) else load_env_spec(spec)
    if "expert" not in spec.demos:
        raise EnvSpecError(f"env spec {spec.name!r} has no demos.expert to collect demos with"
                           + (f" (its demos come from the dataset {spec.dataset_path()})" if spec.demos else ""))
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    noise = float(spec.demos.get("noise", 0.0) if noise is None else noise)
    if not (noise >= 0 and np.isfinite(noise)):
        raise ValueError(f"noise must be a finite std >= 0 (fraction of the action half-range), got {noise}")
    out = Path(out)
    exists = (out / L.INFO_PATH).exists()
    if exists and not append:
        raise FileExistsError(f"{out} already holds a dataset; pass --append to add episodes")
    env = spec.make(max_episode_steps=max_episode_steps)
    buf = None
    try:
        cams: dict[str, tuple[int, int]] = {}
        if render and spec.images:
            first, _ = env.reset(seed=seed)
            cams = {c: tuple(int(v) for v in im.shape[:2]) for c, im in first["images"].items()}
            odd = {c: hw for c, hw in cams.items() if hw[0] % 2 or hw[1] % 2}
            if odd:
                raise EnvSpecError(f"camera images must have even height and width for video encoding, got {odd}")
        if exists:
            buf = ReplayBuffer.open(out)
            feats = buf.features
            if (buf.cameras != cams or buf.fps != env.control_hz
                    or feats["observation.state"]["shape"][0] != env.state_dim
                    or feats["action"]["shape"][0] != env.real_action_dim):
                raise ValueError(f"{out}: existing dataset does not match the spec (cameras {buf.cameras} at "
                                 f"{buf.fps} Hz vs {cams} at {env.control_hz} Hz, or state/action dims)")
        else:
            buf = ReplayBuffer.create(out, fps=env.control_hz, cameras=cams, state_names=env.state_names,
                                      action_names=env.action_names, robot_type=spec.env_id,
                                      **(sim_video() if video is None else video))
        half = (env.action_high - env.action_low) / 2.0
        t0 = time.perf_counter()
        summary: dict[str, Any] = {"task": spec.name, "env_id": spec.env_id, "episodes": episodes, "successes": 0,
                                   "frames": 0, "seeds": demo_seeds(seed, episodes), "noise": noise,
                                   "state_dim": env.state_dim, "privileged_dim": env.privileged_dim,
                                   "action_dim": env.real_action_dim}
        for s in summary["seeds"]:
            expert = env.make_expert(s)
            rng = np.random.default_rng(s)
            obs, _ = env.reset(seed=s)
            ep = buf.begin_episode(task=env.prompt, start_stamp=0.0)
            priv = []
            try:
                while True:
                    full = np.asarray(expert(env.raw_obs), dtype=np.float64).reshape(-1)
                    if full.shape != env.env.action_space.shape or not np.isfinite(full).all():
                        raise EnvSpecError(f"expert {spec.demos['expert']} returned {full.tolist()}, want finite "
                                           f"float{list(env.env.action_space.shape)}")
                    a = full[env.action_dims] + noise * half * rng.standard_normal(env.real_action_dim)
                    a = np.clip(a, env.action_low, env.action_high).astype(np.float32)
                    frame = {"images": obs.get("images", {}) if cams else {}, "state": obs["state"],
                             "prompt": obs["prompt"], "stamp": obs["stamp"]}
                    priv.append(obs["privileged"])
                    obs, reward, terminated, truncated, _ = env.step(a)
                    ep.add_frame(frame, a, reward=reward, done=terminated, policy_version="expert")
                    if terminated or truncated:
                        break
            except BaseException:
                ep.abort()
                raise
            index = ep.finish(success=bool(terminated), label_source="auto")
            write_privileged(out, index, np.stack(priv))
            summary["successes"] += int(terminated)
            summary["frames"] += len(priv)
    finally:
        if buf is not None:
            buf.close()
        env.close()
    summary["wall_s"] = round(time.perf_counter() - t0, 2)
    return summary


__all__ = ["collect_env_demos"]
