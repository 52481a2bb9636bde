"""Replay-buffer commit cost against the number of committed episodes; prints JSON.

A camera-less buffer (state, action, reward, done, stamps: the columns of a state-tier rollout buffer) takes
`--episodes` short episodes; every finish() (the atomic commit: data file, episode index, info and stats) is timed.
Reported: the median commit time over the first and the last `--window` episodes and their ratio
(1 = the commit does not grow with the buffer). To compare two versions in one run:

    PYTHONPATH=. .venv/bin/python bench/buffer_commit.py --episodes 2000
    PYTHONPATH=/path/to/other/checkout .venv/bin/python bench/buffer_commit.py --episodes 2000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from qvgm.data import ReplayBuffer


def run(episodes: int, frames: int, window: int) -> dict:
    rng = np.random.default_rng(0)
    commit_s = []
    with tempfile.TemporaryDirectory(prefix="qvgm_commit_") as tmp:
        root = Path(tmp) / "buf"
        with ReplayBuffer.create(root, fps=10, cameras={}) as buf:
            for e in range(episodes):
                ep = buf.begin_episode("put the red cube in the bowl")
                for i in range(frames):
                    obs = {"images": {}, "state": rng.normal(size=7).astype(np.float32), "stamp": e * 100 + i / 10}
                    ep.add_frame(obs, rng.normal(size=7).astype(np.float32), reward=float(i == frames - 1),
                                 done=i == frames - 1, policy_version="v0")
                t = time.perf_counter()
                ep.finish(success=bool(e % 2), label_source="auto")
                commit_s.append(time.perf_counter() - t)
        index_files = len(list((root / "meta/episodes").rglob("*.parquet")))
    first, last = np.median(commit_s[:window]), np.median(commit_s[-window:])
    return {"episodes": episodes, "frames_per_episode": frames, "window": window, "episode_index_files": index_files,
            "commit_ms_median_first": round(1000 * float(first), 2),
            "commit_ms_median_last": round(1000 * float(last), 2),
            "last_over_first": round(float(last / first), 2),
            "commit_s_total": round(float(np.sum(commit_s)), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=2000)
    ap.add_argument("--frames", type=int, default=20, help="frames per episode")
    ap.add_argument("--window", type=int, default=100, help="episodes in each median window")
    args = ap.parse_args()
    import qvgm

    src = Path(qvgm.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip() or None
    except OSError:
        commit = None
    print(json.dumps({"bench": "buffer_commit", "host": platform.node(), "cpu_count": os.cpu_count(),
                      "source": str(src), "commit": commit,
                      **run(args.episodes, args.frames, args.window)}, indent=2))


if __name__ == "__main__":
    main()
