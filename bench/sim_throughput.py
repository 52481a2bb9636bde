"""Throughput of the MuJoCo tabletop (qvgm.sim): physics steps/s and rendered frames/s per camera.

Prints one JSON object: medians over ``--repeats`` runs, for 224x224 and 640x480 (height x width 480x640),
plus the machine (platform, CPU count, mujoco version, MUJOCO_GL). Usage::

    MUJOCO_GL=egl .venv/bin/python bench/sim_throughput.py [--repeats 5] [--task pick_place]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import mujoco  # noqa: E402
import numpy as np  # noqa: E402

from qvgm.sim import CAMERAS, TabletopEnv  # noqa: E402


def _rate(fn, n: int, repeats: int) -> dict[str, float]:
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(n)
        rates.append(n / (time.perf_counter() - t0))
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--task", default="pick_place")
    ap.add_argument("--physics-steps", type=int, default=5000)
    ap.add_argument("--frames", type=int, default=50)
    args = ap.parse_args()

    env = TabletopEnv(task=args.task, render=False)
    env.reset(seed=0)
    home = env.joint_state()[0]
    amp = np.array([0.4, 0.2, -0.2, 0.3, 0.2, 0.5, -0.02])

    def physics(n: int) -> None:
        """n physics steps driven like the 10 Hz controller: a new (moving) target every n_substeps."""
        done = 0
        while done < n:
            env.set_joint_targets(home + amp * np.sin(0.5 * env.time))
            k = min(env.n_substeps, n - done)
            env.step_physics(k)
            done += k

    def raw(n: int) -> None:
        for _ in range(n):
            mujoco.mj_step(env.model, env.data)

    out: dict = {
        "bench": "sim_throughput",
        "task": args.task,
        "physics_dt_s": env.physics_dt,
        "physics_steps_per_s": _rate(physics, args.physics_steps, args.repeats),
        "raw_mj_step_per_s": _rate(raw, args.physics_steps, args.repeats),
        "render_fps": {},
    }
    out["realtime_factor"] = out["physics_steps_per_s"]["median"] * env.physics_dt
    for h, w in ((224, 224), (480, 640)):
        renv = TabletopEnv(task=args.task, image_size=(h, w))
        renv.reset(seed=0)
        per_cam = {}
        for cam in CAMERAS:
            renv.render_camera(cam)  # warm up the GL context

            def frames(n: int, cam: str = cam, renv: TabletopEnv = renv) -> None:
                for _ in range(n):
                    renv.step_physics(1)
                    renv.render_camera(cam)

            per_cam[cam] = _rate(frames, args.frames, args.repeats)
        out["render_fps"][f"{w}x{h}"] = per_cam
        renv.close()
    out["machine"] = {"platform": platform.platform(), "processor": platform.processor(),
                      "cpu_count": os.cpu_count(), "python": platform.python_version(),
                      "mujoco": mujoco.__version__, "MUJOCO_GL": os.environ.get("MUJOCO_GL")}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
