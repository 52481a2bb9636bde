"""Does a background checkpoint loader delay the control thread, and does lowering its priority help? Prints JSON.

A control thread ticks every `--period` s (a little numpy work per tick, like a control callback) while a loader
thread in the same process repeats what HotReloader's loader does for a reload of a tiny `state` FlowPolicy
(qvgm.policy.load_policy from a CheckpointStore version, check_finite, timed_dry_run = pre-warm + timed dry run),
pausing `--gap` s between reloads. Modes, run one after the other (`--modes`, each `--seconds` long):
  none     no loader (the machine's own jitter)
  nice0    loader at the control thread's priority
  nice10   loader thread at nice +10 (what StoreFlowBackend did before): the OS deschedules it while it holds the
           GIL, and the control thread waits for it (priority inversion)
Reported per mode: tick lateness (ms) p50 / p99 / p99.9 / max and ticks later than 20 and 33 ms (one 30 Hz
control period), the 1-min load average. Sensitive to the machine's load: compare modes of the same run.
Usage: .venv/bin/python bench/reload_gil.py [--modes none nice0 nice10 nice0 nice10] [--seconds 15]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from qvgm.checkpoints import CheckpointStore  # noqa: E402
from qvgm.policy import NormStats, load_policy, make_policy  # noqa: E402
from qvgm.policy.backend import FlowPolicyBackend  # noqa: E402
from qvgm.policy.checkpoint_io import write_policy_files  # noqa: E402
from qvgm.reload import check_finite, timed_dry_run  # noqa: E402

HOME = np.array([0.0, -0.4, 0.9, 0.0, 0.9, 0.0, 0.02])


def publish(store: CheckpointStore, seed: int, hidden: int) -> str:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    stats = NormStats.compute(HOME + rng.normal(size=(256, 7)) * 0.05, HOME + rng.normal(size=(256, 7)) * 0.03)
    policy = make_policy("state", stats, state_dim=7, real_action_dim=7, horizon=10, hidden=hidden,
                         embed_dim=hidden // 2, head_hidden=hidden, head_depth=2)
    with store.writing() as staged:
        write_policy_files(policy, staged.path)
    assert staged.version is not None
    return staged.version


def reload_once(store: CheckpointStore, version: str) -> None:
    """The loader thread's work for one reload: verify + load, finite weights, pre-warm + timed dry run."""
    policy = load_policy(store.path(version), expect={"real_action_dim": 7, "state_dim": 7})
    backend = FlowPolicyBackend(policy, [f"j{i}" for i in range(7)], dt=1 / 30, num_steps=10, seed=0)
    check_finite(policy.state_dict())
    obs = {"images": {}, "state": HOME.astype(np.float32), "prompt": "", "stamp": 0.0}
    timed_dry_run(lambda: backend.infer(obs).positions, 1.0)


def run_mode(mode: str, store: CheckpointStore, versions: list[str], args: argparse.Namespace) -> dict:
    stop = threading.Event()
    reloads = [0]

    def loader() -> None:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + int(mode[4:]))
        while not stop.is_set():
            reload_once(store, versions[reloads[0] % len(versions)])
            reloads[0] += 1
            stop.wait(args.gap)

    thread = None if mode == "none" else threading.Thread(target=loader, name="loader", daemon=True)
    if thread is not None:
        thread.start()
    late: list[float] = []
    x = np.zeros(64)
    nxt = time.perf_counter() + args.period
    end = time.perf_counter() + args.seconds
    while time.perf_counter() < end:
        time.sleep(max(0.0, nxt - time.perf_counter()))
        late.append(time.perf_counter() - nxt)
        for _ in range(50):  # the tick's own (GIL-holding) work
            x = x + 1.0
        nxt = max(nxt + args.period, time.perf_counter())
    stop.set()
    if thread is not None:
        thread.join()
    ms = np.array(late) * 1e3
    return {"mode": mode, "reloads": reloads[0], "ticks": len(ms), "load_avg_1min": round(os.getloadavg()[0], 2),
            "late_ms": {"p50": round(float(np.median(ms)), 2), "p99": round(float(np.percentile(ms, 99)), 2),
                        "p999": round(float(np.percentile(ms, 99.9)), 2), "max": round(float(ms.max()), 2)},
            "ticks_late_over_20ms": int((ms > 20).sum()), "ticks_late_over_33ms": int((ms > 33.3).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=["none", "nice0", "nice10", "nice0", "nice10"],
                    choices=["none", "nice0", "nice10"])
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--period", type=float, default=0.008, help="control tick period (s)")
    ap.add_argument("--gap", type=float, default=0.05, help="s between two reloads")
    ap.add_argument("--hidden", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        store = CheckpointStore(tmp, keep_last=None)
        versions = [publish(store, s, args.hidden) for s in (1, 2)]
        results = [run_mode(m, store, versions, args) for m in args.modes]
    print(json.dumps({"bench": "reload_gil", "cpus": os.cpu_count(), "period_s": args.period, "gap_s": args.gap,
                      "hidden": args.hidden, "results": results}, indent=2))


if __name__ == "__main__":
    main()
