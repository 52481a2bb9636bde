"""Where one action-expert step of a pi05 config spends GPU time: torch.profiler over K eager expert passes on a
cached prefix; prints JSON (kernel count per step, summed CUDA time per step, top ops by CUDA time).

    python3 bench/profile_expert.py --config pi05 --dtype bfloat16 --cameras 1
The eager wall time per step minus the summed kernel time is launch/Python overhead (what a CUDA graph removes);
the summed kernel time is the floor for a graph replay of the same kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="pi05")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--cameras", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    from qvgm.policy.config import get_config
    from qvgm.policy.pi05 import Pi05Policy
    from qvgm.policy.processor import NormStats, build_tokenizer

    dev = torch.device("cuda")
    cfg = get_config(args.config)
    cfg.camera_names = cfg.camera_names[: args.cameras]
    torch.manual_seed(0)
    with dev:
        pol = Pi05Policy(cfg, build_tokenizer(["pick up the red cube"]), NormStats.identity(cfg.state_dim,
                                                                                              cfg.real_action_dim))
    pol = pol.to(getattr(torch, args.dtype)).eval()
    rng = np.random.default_rng(0)
    obs = [{"images": {c: rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for c in cfg.camera_names},
            "state": rng.uniform(-1, 1, cfg.state_dim).astype(np.float32), "prompt": "pick up the red cube"}]
    with torch.inference_mode():
        ctx = pol.encode(pol.preprocess(obs))
        x = torch.randn(1, cfg.horizon, cfg.action_dim, device=dev)
        t = torch.full((1,), 0.5, device=dev)
        for _ in range(3):
            pol.velocity(x, t, ctx)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            pol.velocity(x, t, ctx)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / args.steps
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                pol.velocity(x, t, ctx)
            torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_us = sum(e.device_time for e in events) / args.steps
    rows = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)[: args.top]
    print(json.dumps({"bench": "profile_expert", "config": args.config, "dtype": args.dtype, "gpu":
                      torch.cuda.get_device_name(), "torch": torch.__version__, "eager_step_ms": wall * 1000,
                      "kernels_per_step": len(events) / args.steps, "kernel_ms_per_step": kernel_us / 1000,
                      "top_ops": [{"name": e.key[:80], "calls_per_step": e.count / args.steps,
                                   "cuda_ms_per_step": e.device_time_total / 1000 / args.steps} for e in rows]},
                     indent=1))


if __name__ == "__main__":
    main()
