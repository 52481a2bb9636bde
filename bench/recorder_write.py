"""Replay buffer write/read throughput; prints JSON.

For each resolution, two cameras of synthetic moving scenes (smooth pattern + sensor noise) are written into
a fresh buffer in a temporary directory: frames/s through EpisodeWriter.add_frame (h264 encode included),
finish() (commit) time, bytes per frame, CPU seconds per wall second, and read-back windows/s for the trainer
(random 5-step chunk windows with both cameras decoded).

    .venv/bin/python bench/recorder_write.py [--frames 150] [--episodes 2] [--fps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from qvgm.data import ReplayBuffer, ReplayReader
from qvgm.data.video import probe


def scene(h: int, w: int, i: int, cam: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = w * (0.3 + 0.4 * np.sin(i / 20.0 + cam)), h * (0.5 + 0.3 * np.cos(i / 15.0))
    blob = 120 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.02 * w * h))
    base = 60 + 40 * np.sin(xx / 23.0 + cam) + 30 * np.cos(yy / 17.0)
    img = np.stack([base + blob, base * 0.8 + 0.5 * blob, base * 0.6], -1)
    img += rng.normal(0, 3, img.shape).astype(np.float32)  # sensor noise
    return np.clip(img, 0, 255).astype(np.uint8)


def run(h: int, w: int, frames: int, episodes: int, fps: int, preset: str, threads: int) -> dict:
    rng = np.random.default_rng(0)
    cams = {"front": (h, w), "wrist": (h, w)}
    # pre-render a loop of frames so the benchmark times the recorder, not the scene generator
    loop = [{c: scene(h, w, i, k, rng) for k, c in enumerate(cams)} for i in range(min(frames, 60))]
    with tempfile.TemporaryDirectory(prefix="qvgm_bench_") as tmp:
        root = Path(tmp) / "buf"
        buf = ReplayBuffer.create(root, fps=fps, cameras=cams, preset=preset, threads=threads)
        add_s, finish_s = 0.0, []
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for e in range(episodes):
            ep = buf.begin_episode("bench task")
            for i in range(frames):
                obs = {"images": loop[i % len(loop)], "state": np.zeros(7, np.float32), "prompt": "bench task",
                       "stamp": i / fps}
                t = time.perf_counter()
                ep.add_frame(obs, np.zeros(7, np.float32), reward=0.0, done=i == frames - 1, policy_version="b")
                add_s += time.perf_counter() - t
            t = time.perf_counter()
            ep.finish(success=bool(e % 2), label_source="auto")
            finish_s.append(time.perf_counter() - t)
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        buf.close()
        total = frames * episodes
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        codec = probe(next((root / "videos").rglob("*.mp4")))
        reader = ReplayReader(root)
        windows = reader.window_starts(5)
        pick = np.random.default_rng(1).choice(windows, size=min(40, len(windows)))
        t = time.perf_counter()
        for g in pick:
            reader.chunk_window(int(g), 5)
        read_s = time.perf_counter() - t
        reader.close()
    return {
        "resolution": f"{w}x{h}", "cameras": 2, "frames": total, "episodes": episodes,
        "write_frames_per_s": round(total / (add_s + sum(finish_s)), 1),
        "add_frame_ms_mean": round(1000 * add_s / total, 2),
        "finish_s_mean": round(float(np.mean(finish_s)), 3),
        "realtime_factor_at_fps": round(total / fps / wall, 2),
        "cpu_s_per_wall_s": round(cpu / wall, 2),
        "bytes_per_frame_2cams": int(size / total),
        "codec": codec["codec"], "pix_fmt": codec["pix_fmt"], "x264_preset": preset, "encoder_threads": threads,
        "read_windows_per_s_2cams_decoded": round(len(pick) / read_s, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=150, help="frames per episode")
    ap.add_argument("--episodes", type=int, default=2)
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--preset", default="ultrafast", help="x264 preset (the buffer default is ultrafast)")
    ap.add_argument("--threads", type=int, default=2, help="encoder threads per camera")
    args = ap.parse_args()
    results = [run(h, w, args.frames, args.episodes, args.fps, args.preset, args.threads)
               for h, w in ((224, 224), (480, 640))]
    print(json.dumps({"bench": "recorder_write", "host": platform.node(), "cpu_count": os.cpu_count(),
                      "fps_target": args.fps, "results": results}, indent=2))


if __name__ == "__main__":
    main()
