"""Policy inference latency benchmark; prints JSON.

For each config: observation -> action chunk latency (preprocess + prefix encode + K Euler steps + postprocess) p50/p95,
the prefix-caching speed-up (K steps recomputing the prefix every step vs encode once + K cached expert
passes), and peak memory (CPU: process max RSS, each config measured in its own subprocess; CUDA:
torch.cuda.max_memory_allocated). Weights are random (latency does not depend on their values).
On CUDA, --cuda-graphs also times the same observation -> chunk with the K Euler steps replayed from a captured
CUDA graph (qvgm.policy.cuda_graph, what the policy node does on a GPU), interleaved with the eager runs:
graph_latency_ms_p50/p95, graph_sample_ms_p50 (the K steps) and graph_speedup (eager / graph latency, medians).
--compile expert|all (experiment, pi05 configs): torch.compile the expert step (and with "all" the prefix encoder);
every figure is then of the compiled model, compile_s is the wall time of the first (compiling) calls, and a
failed compile is reported as compile_error (the run goes on eagerly).

    .venv/bin/python bench/policy_latency.py                       # pi05-tiny, pi05-small on CPU
    .venv/bin/python bench/policy_latency.py --configs pi05 --device cuda --dtype bfloat16 --cuda-graphs
    .venv/bin/python bench/policy_latency.py --configs pi05-small-v1,pi05-small  # previous vs current pi05-small
`pi05-small-v1` is the previous 22.5 M pi05-small (qvgm.policy.config), for same-load comparisons.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TASKS = ["pick up the red cube and place it in the bowl", "open the drawer", "push the blue block to the left"]


def _obs(cfg, rng: np.random.Generator) -> dict:
    return {"images": {c: rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for c in cfg.camera_names},
            "state": rng.uniform(-1, 1, cfg.state_dim).astype(np.float32), "prompt": TASKS[0], "stamp": 0.0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def bench_one(name: str, device: str, dtype: str, steps: int, runs: int, warmup: int, cameras: int,
              cuda_graphs: bool = False, compile_model: str = "") -> dict:
    from qvgm.policy.config import get_config
    from qvgm.policy.pi05 import Pi05Policy
    from qvgm.policy.processor import NormStats, build_tokenizer

    dev = torch.device(device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = get_config(name)
    cfg.camera_names = cfg.camera_names[:cameras]
    torch.manual_seed(0)
    with dev:
        pol = Pi05Policy(cfg, build_tokenizer(TASKS), NormStats.identity(cfg.state_dim, cfg.real_action_dim))
    pol = pol.to(getattr(torch, dtype)).eval()
    n_params = sum(p.numel() for p in pol.parameters())
    rng = np.random.default_rng(0)
    obs = [_obs(cfg, rng)]
    compiled: dict = {}
    if compile_model:
        eager_encode, eager_suffix = pol.model.encode_prefix, pol.model.suffix_velocity
        if compile_model == "all":
            pol.model.encode_prefix = torch.compile(eager_encode)
        pol.model.suffix_velocity = torch.compile(eager_suffix)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                pol.sample(pol.encode(pol.preprocess(obs)), num_steps=steps)
            _sync(dev)
            compiled["compile_s"] = time.perf_counter() - t0
        except Exception as e:  # an experiment: report why, measure eagerly
            compiled["compile_error"] = f"{type(e).__name__}: {e}"[:500]
            pol.model.encode_prefix, pol.model.suffix_velocity = eager_encode, eager_suffix
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    lat, pre, enc, step, uncached, g_lat, g_sample = [], [], [], [], [], [], []
    graphs = cuda_graphs and dev.type == "cuda"
    with torch.inference_mode():
        for i in range(warmup + runs):
            _sync(dev)
            t0 = time.perf_counter()
            inputs = pol.preprocess(obs)
            _sync(dev)
            tp = time.perf_counter()
            ctx = pol.encode(inputs)
            _sync(dev)
            t1 = time.perf_counter()
            chunk = pol.sample(ctx, num_steps=steps)
            actions = pol.postprocess(chunk)
            _sync(dev)
            t2 = time.perf_counter()
            assert actions.shape == (1, cfg.horizon, cfg.real_action_dim)
            # Reference without the cache: every Euler step reruns prefix + suffix jointly.
            x = torch.randn(1, cfg.horizon, cfg.action_dim, device=dev)
            _sync(dev)
            t3 = time.perf_counter()
            for k in range(steps):
                t = torch.full((1,), 1.0 - k / steps, device=dev)
                x = x - pol.velocity_uncached(inputs, x, t) / steps
            _sync(dev)
            t4 = time.perf_counter()
            if graphs:  # the same observation -> chunk, the K steps replayed from a CUDA graph
                _sync(dev)
                t5 = time.perf_counter()
                g_ctx = pol.encode(pol.preprocess(obs))
                _sync(dev)
                t6 = time.perf_counter()
                g_actions = pol.postprocess(pol._graphed_sample(g_ctx, steps, None))
                _sync(dev)
                t7 = time.perf_counter()
                assert g_actions.shape == actions.shape
                if i >= warmup:
                    g_lat.append(t7 - t5)
                    g_sample.append(t7 - t6)
            if i >= warmup:
                lat.append(t2 - t0)
                pre.append(tp - t0)
                enc.append(t1 - tp)
                step.append((t2 - t1) / steps)
                uncached.append(t4 - t3)
    cached_total = [e + s * steps for e, s in zip(enc, step, strict=True)]
    ms = 1000.0
    res = {
        "config": name, "device": device, "dtype": dtype, "compiled": compile_model if "compile_s" in compiled else "",
        **compiled, "params": n_params, "cameras": cfg.camera_names,
        "image_size": cfg.image_size, "prefix_tokens": int(ctx.prefix_mask.shape[1]), "horizon": cfg.horizon,
        "num_steps": steps, "runs": runs,
        "latency_ms_p50": _pct(lat, 50) * ms, "latency_ms_p95": _pct(lat, 95) * ms,
        "preprocess_ms_p50": _pct(pre, 50) * ms, "encode_ms_p50": _pct(enc, 50) * ms,
        "expert_step_ms_p50": _pct(step, 50) * ms,
        "cached_model_ms_p50": _pct(cached_total, 50) * ms, "uncached_model_ms_p50": _pct(uncached, 50) * ms,
        # (K joint prefix+suffix passes) / (1 prefix encode + K cached expert passes); preprocessing excluded
        "cache_speedup": statistics.median(uncached) / statistics.median(cached_total),
    }
    if graphs:
        res.update({"graph_latency_ms_p50": _pct(g_lat, 50) * ms, "graph_latency_ms_p95": _pct(g_lat, 95) * ms,
                    "graph_sample_ms_p50": _pct(g_sample, 50) * ms,
                    "graph_speedup": statistics.median(lat) / statistics.median(g_lat)})
    if dev.type == "cuda":
        res["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        res["gpu"] = torch.cuda.get_device_name()
    else:
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        res["peak_rss_mb"] = rss1 / 1024
        res["peak_rss_above_imports_mb"] = (rss1 - rss0) / 1024
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="pi05-tiny,pi05-small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cameras", type=int, default=2, help="use the first N cameras of the config")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (more than free cores slows it down)")
    ap.add_argument("--cuda-graphs", action="store_true", help="also time the CUDA-graph sampling path (CUDA only)")
    ap.add_argument("--compile", default="", choices=["", "expert", "all"],
                    help="torch.compile the expert step (expert) or also the prefix encoder (all); pi05 configs")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:  # child process: one config, JSON on stdout
        print(json.dumps(bench_one(args.one, args.device, args.dtype, args.steps, args.runs, args.warmup,
                                   args.cameras, args.cuda_graphs, args.compile)))
        return
    results = []
    for name in args.configs.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--device", args.device, "--dtype", args.dtype,
               "--steps", str(args.steps), "--runs", str(args.runs), "--warmup", str(args.warmup),
               "--cameras", str(args.cameras), "--threads", str(args.threads)]
        if args.cuda_graphs:
            cmd.append("--cuda-graphs")
        if args.compile:
            cmd += ["--compile", args.compile]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy())
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps({"bench": "policy_latency", "torch": torch.__version__, "threads": args.threads,
                      "cpu": platform.processor() or platform.machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
