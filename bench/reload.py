"""Hot-reload benchmark: prints JSON.

For each watch mode (inotify, polling) a separate publisher process publishes `--reloads` checkpoints of a
few-MB MLP (safetensors) into a CheckpointStore while this process runs a control loop at `--hz`: every tick
calls HotReloader.poll_swap() and runs the serving model once. Reported per mode:
  publish_to_ready_s   publish (CURRENT switched) -> validated model available to poll_swap
  publish_to_swap_s    publish -> swapped in at a tick boundary (adds up to one tick period)
  load_s               verify (sha256) + load + validate (finite weights, timed dry run) on the loader thread
  tick_duration_ms     work per tick (poll_swap + one inference), p50 / p99 / max
  tick_lateness_ms     how late each tick started versus its schedule; missed_ticks = ticks late by > 1 period
plus `baseline_no_reload`: the same tick loop without reloader or publisher (the machine's own jitter).
Usage: .venv/bin/python bench/reload.py [--hz 10] [--reloads 10] [--hidden 1024] [--poll-interval 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from qvgm.checkpoints import CheckpointStore  # noqa: E402
from qvgm.reload import HotReloader, check_finite, timed_dry_run  # noqa: E402

OBS_DIM, ACT_DIM = 64, 7


def build(hidden: int) -> torch.nn.Sequential:
    """obs [B, 64] -> action [B, 7]."""
    return torch.nn.Sequential(torch.nn.Linear(OBS_DIM, hidden), torch.nn.Tanh(),
                               torch.nn.Linear(hidden, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, ACT_DIM))


def write_checkpoint(d: Path, hidden: int, seed: int) -> None:
    torch.manual_seed(seed)
    net = build(hidden)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"hidden": hidden, "seed": seed}))


def load_fn(path: Path, manifest: dict[str, Any]) -> torch.nn.Sequential:
    cfg = json.loads((path / "config.json").read_text())
    with torch.device("meta"):  # no throw-away random init: the weights come from the file
        net = build(cfg["hidden"])
    net.load_state_dict(load_file(str(path / "model.safetensors")), assign=True)
    return net.eval()


def validate_fn(net: torch.nn.Sequential, manifest: dict[str, Any]) -> None:
    check_finite(net.state_dict())
    with torch.no_grad():
        timed_dry_run(lambda: net(torch.zeros(1, OBS_DIM)), budget_s=0.05)


def publisher(root: str, count: int, interval: float, hidden: int, seed0: int) -> None:
    """Child process: publish `count` versions `interval` s apart; one JSON line per publish."""
    store = CheckpointStore(root, keep_last=3)
    for i in range(count):
        time.sleep(interval)
        with store.writing(summary={"bench": i}) as staged:
            write_checkpoint(staged.path, hidden, seed0 + i)
        pointer = store.read_pointer()  # switched_at: the wall time CURRENT was replaced (the publish instant)
        assert pointer is not None and pointer["version"] == staged.version
        print(json.dumps({"version": staged.version, "published": pointer["switched_at"]}), flush=True)


def stats(xs: list[float], scale: float = 1.0) -> dict[str, float | None]:
    if not xs:
        return {"n": 0, "p50": None, "p99": None, "max": None, "mean": None}
    a = np.asarray(xs) * scale
    return {"n": len(xs), "p50": round(float(np.percentile(a, 50)), 4), "p99": round(float(np.percentile(a, 99)), 4),
            "max": round(float(a.max()), 4), "mean": round(float(a.mean()), 4)}


def run_baseline(args: argparse.Namespace) -> dict[str, Any]:
    """The same tick loop with no reloader and no publisher: the machine's own jitter, for comparison."""
    net = build(args.hidden).eval()
    obs = torch.zeros(1, OBS_DIM)
    period = 1.0 / args.hz
    durations, lateness = [], []
    next_t = time.monotonic()
    deadline = next_t + args.baseline_s
    while time.monotonic() < deadline:
        now = time.monotonic()
        lateness.append(now - next_t)
        with torch.no_grad():
            net(obs)
        durations.append(time.monotonic() - now)
        next_t += period
        time.sleep(max(0.0, next_t - time.monotonic()))
    return {"ticks": len(durations), "tick_duration_ms": stats(durations, 1e3),
            "tick_lateness_ms": stats(lateness, 1e3), "missed_ticks": int(sum(x > period for x in lateness))}


def run_mode(mode: str, args: argparse.Namespace, seed0: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="qvgm-bench-reload-") as tmp:
        store = CheckpointStore(Path(tmp) / "store", keep_last=3)
        with store.writing() as staged:
            write_checkpoint(staged.path, args.hidden, seed0 - 1)
        model_bytes = (store.current_path() / "model.safetensors").stat().st_size
        rl = HotReloader(store, load_fn, validate_fn, watch=mode, poll_interval_s=args.poll_interval,
                         required_files=("config.json", "model.safetensors")).start()
        try:
            got = rl.wait_for_swap(30)
            assert got is not None, rl.status()
            model, _ = got
            env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
            proc = subprocess.Popen([sys.executable, __file__, "--publisher", str(store.root), str(args.reloads),
                                     str(args.interval), str(args.hidden), str(seed0)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            period = 1.0 / args.hz
            obs = torch.zeros(1, OBS_DIM)
            durations, lateness, swaps = [], [], {}
            next_t = time.monotonic()
            deadline = next_t + args.reloads * (args.interval + 5) + 30
            while time.monotonic() < deadline:
                now = time.monotonic()
                lateness.append(now - next_t)
                got = rl.poll_swap()
                if got is not None:
                    model, version = got
                    swaps[version] = time.time()
                with torch.no_grad():
                    model(obs)
                durations.append(time.monotonic() - now)
                if proc.poll() is not None and rl.serving == store.current() and rl.status()["loading"] is None \
                        and rl.status()["pending"] is None:
                    break
                next_t += period
                time.sleep(max(0.0, next_t - time.monotonic()))
            out, err = proc.communicate(timeout=60)
            if proc.returncode != 0:
                raise RuntimeError(f"publisher failed: {err}")
            published = {(r := json.loads(line))["version"]: r["published"] for line in out.splitlines()}
            ready = {e.version: (e.wall_time, e.load_s) for e in rl.history if e.event == "ready"}
            status = rl.status()
        finally:
            rl.stop()
    to_ready = [ready[v][0] - t for v, t in published.items() if v in ready]
    to_swap = [swaps[v] - t for v, t in published.items() if v in swaps]
    return {
        "watch": rl.watch_mode, "model_bytes": model_bytes, "published": len(published),
        "swapped": sum(v in swaps for v in published), "refused": status["refused"],
        "superseded": status["superseded"],
        "publish_to_ready_s": stats(to_ready), "publish_to_swap_s": stats(to_swap),
        "load_s": stats([ready[v][1] for v in published if v in ready]),
        "ticks": len(durations), "tick_duration_ms": stats(durations, 1e3), "tick_lateness_ms": stats(lateness, 1e3),
        "missed_ticks": int(sum(x > period for x in lateness)),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--publisher":
        root, count, interval, hidden, seed0 = sys.argv[2:7]
        publisher(root, int(count), float(interval), int(hidden), int(seed0))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hz", type=float, default=10.0, help="control tick rate")
    p.add_argument("--reloads", type=int, default=10, help="consecutive reloads per watch mode")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between publishes")
    p.add_argument("--hidden", type=int, default=1024, help="MLP width (1024 -> ~4.5 MB of float32 weights)")
    p.add_argument("--poll-interval", type=float, default=0.5, help="HotReloader poll interval (poll mode), s")
    p.add_argument("--modes", default="inotify,poll")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--baseline-s", type=float, default=5.0, help="seconds of ticks with no reloads (0: skip)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "bench": "reload", "hz": args.hz, "reloads": args.reloads, "publish_interval_s": args.interval,
        "poll_interval_s": args.poll_interval, "torch_threads": args.threads,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "modes": {},
    }
    if args.baseline_s > 0:
        result["baseline_no_reload"] = run_baseline(args)
    for i, mode in enumerate(args.modes.split(",")):
        result["modes"][mode] = run_mode(mode, args, seed0=1000 * (i + 1))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
