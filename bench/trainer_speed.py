"""critic_trainer update speed on CPU or a CUDA GPU (issue 5 "Measured"): prints JSON.

Per policy config (`state`, `pi05-small`; randomly initialised, the cost does not depend on the weights):
  critic_updates_per_s   one CriticTrainer.update (Cal-QL, ensemble of 2, per-layer injection, batch
                         --critic-batch, 10 uniform + 4 reference + 4 next-reference samples per state) on cached
                         features (training never touches images), with --threads
  critic                 the same per thread count in --critic-threads: updates/s of this tree's critic and, with
                         --critic-before REV, of critic_trainer/critic.py at git revision REV (loaded from git, same
                         batch, repetitions interleaved), the speed-up, and the 1-min load average around each
  qvgm_update_s          one Q-VGM actor update (critic_trainer.qvgm.qvgm_update): encode + K=10 no-grad rollout +
                         K reference velocities + J=4 batched ascent steps + K graph-holding actor velocities
  qvgm_s{S}_update_s     the same with steps_per_sample S (--steps-per-sample): S drawn steps per sample in the
                         gated and in the anchor-only set (2 + 2 velocity evaluations per sample for S = 2)
  dql_update_s           one Diffusion-QL update at the same batch and K: backprop through all K Euler steps + BC
                         (critic_trainer.baselines.diffusion_ql_loss through pipeline.DifferentiableSampler)
  dql_over_qvgm          ratio of the medians (the headline: > 1 means Q-VGM is cheaper); dql_over_qvgm_s{S} likewise
  sft_update_s           one supervised flow-matching step (what SFT does) at the same batch, for scale
  peak_mem_mb_*          CUDA only: torch.cuda.max_memory_allocated per method (reset before each)
  peak_rss_mb_*          process peak RSS after each phase (ru_maxrss; monotone, so phases run cheapest first)
  load_avg_*             the 1-min load average before / after each phase (the machine is shared)
  phases (--phases)      median seconds of an actor update's pieces: prefix encode with / without grad, one no-grad
                         velocity, encode + 1 or 4 graph-holding velocities forward + backward
Medians over --reps timed repetitions after --warmup untimed ones, Q-VGM (all variants) and DQL repetitions
interleaved (same machine load for the ratio); torch threads --threads. --parts critic skips the actor updates.
--device cuda runs everything on the GPU (timings synchronise the device); --amp bf16 wraps the actor updates in
bf16 autocast (fp32 master weights and Adam state, the usual mixed-precision training). A method that runs out of
GPU memory is reported as "oom" instead of a time.

    .venv/bin/python bench/trainer_speed.py --configs pi05 --device cuda --amp bf16 --actor-batch 8 --parts actor

    .venv/bin/python bench/trainer_speed.py [--configs state pi05-small] [--actor-batch 32] [--critic-batch 256]
        [--critic-threads 1 2] [--critic-before REV] [--steps-per-sample 2] [--parts critic actor] [--phases]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from critic_trainer.baselines import diffusion_ql_loss  # noqa: E402
from critic_trainer.critic import CriticBatch, CriticConfig, CriticTrainConfig, CriticTrainer, QEnsemble  # noqa: E402
from critic_trainer.features import critic_state_features  # noqa: E402
from critic_trainer.pipeline import DifferentiableSampler  # noqa: E402
from critic_trainer.qvgm import QVGMConfig, bind_critic, qvgm_update  # noqa: E402
from qvgm.devices import resolve_device  # noqa: E402
from qvgm.policy.factory import make_policy  # noqa: E402
from qvgm.policy.processor import NormStats  # noqa: E402

PROMPT = "push the red cube to the green target"
N_EXEC, REAL, PRIV = 5, 7, 21


def load() -> float:
    return round(os.getloadavg()[0], 2)


def critic_module_at(rev: str) -> Any:
    """critic_trainer/critic.py as of git revision `rev`, imported under another name (the 'before' critic)."""
    root = Path(__file__).resolve().parents[1]
    text = subprocess.run(["git", "show", f"{rev}:critic_trainer/critic.py"], cwd=root, check=True,
                          capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(text)
    spec = importlib.util.spec_from_file_location(f"critic_before_{rev}", f.name)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    os.unlink(f.name)
    return mod


def critic_speed(mods: dict[str, Any], feature_dim: int, proprio_dim: int, args: argparse.Namespace
                 ) -> dict[str, Any]:
    """Critic updates/s per implementation (module with QEnsemble etc.) and thread count, interleaved per rep."""
    cb, a = args.critic_batch, N_EXEC * REAL
    g = torch.Generator().manual_seed(1)
    t = {k: torch.randn(cb, d, generator=g) for k, d in (("z", feature_dim), ("p", proprio_dim),
                                                          ("z_next", feature_dim), ("p_next", proprio_dim))}
    fields = dict(actions=torch.rand(cb, a, generator=g) * 2 - 1, rewards=torch.zeros(cb, N_EXEC),
                  done=torch.zeros(cb), mc_return=torch.rand(cb, generator=g),
                  ref_actions=torch.rand(cb, 4, a, generator=g) * 2 - 1,
                  ref_next_actions=torch.rand(cb, 4, a, generator=g) * 2 - 1, **t)
    trainers = {}
    for name, m in mods.items():
        torch.manual_seed(0)  # the same initial weights for every implementation
        critic = m.QEnsemble(m.CriticConfig(feature_dim=feature_dim, proprio_dim=proprio_dim, n_exec=N_EXEC,
                                            real_action_dim=REAL, num_q=2, hidden=tuple(args.critic_hidden)))
        trainers[name] = (m.CriticTrainer(critic, m.CriticTrainConfig(reg_weight=0.1)), m.CriticBatch(**fields))
    out: dict[str, Any] = {}
    threads = torch.get_num_threads()
    for nt in args.critic_threads:
        torch.set_num_threads(nt)
        row: dict[str, Any] = {"load_avg_1min_start": load()}
        times: dict[str, list[float]] = {k: [] for k in trainers}
        for tr, batch in trainers.values():
            timed(lambda tr=tr, batch=batch: tr.update(batch), args.warmup, 0)
        for _ in range(args.reps * 5):
            for name, (tr, batch) in trainers.items():
                times[name] += timed(lambda tr=tr, batch=batch: tr.update(batch), 0, 1)
        for name, ts in times.items():
            row[f"{name}_update_s"] = round(statistics.median(ts), 4)
            row[f"{name}_updates_per_s"] = round(1.0 / statistics.median(ts), 2)
        if "before" in times:
            row["speedup"] = round(statistics.median(times["before"]) / statistics.median(times["now"]), 2)
        row["load_avg_1min_end"] = load()
        out[f"threads_{nt}"] = row
    torch.set_num_threads(threads)
    return out


def actor_phases(actor: Any, reference: Any, inputs: dict[str, torch.Tensor], args: argparse.Namespace
                 ) -> dict[str, float]:
    """Median seconds of the pieces an actor update is made of (where the fixed cost of Q-VGM sits)."""
    b = inputs["state"].shape[0]
    x = torch.randn(b, actor.horizon, actor.action_dim, device=DEVICE)
    t = torch.full((b,), 0.5, device=DEVICE)
    with torch.no_grad():
        ref_ctx = reference.encode(inputs)

    def no_grad(fn: Any) -> Any:
        return lambda: torch.no_grad()(fn)()

    def encode_velocities(k: int) -> None:
        ctx = actor.encode(inputs)
        sum(actor.velocity(x, t, ctx).pow(2).mean() for _ in range(k)).backward()
        actor.zero_grad(set_to_none=True)

    pieces = {"encode_no_grad_s": no_grad(lambda: reference.encode(inputs)),
              "velocity_no_grad_s": no_grad(lambda: reference.velocity(x, t, ref_ctx)),
              "encode_with_grad_forward_s": lambda: actor.encode(inputs),
              "encode_plus_1_velocity_forward_backward_s": lambda: encode_velocities(1),
              "encode_plus_4_velocities_forward_backward_s": lambda: encode_velocities(4)}
    out = {k: round(statistics.median(timed(fn, 1, max(args.reps // 2, 1))), 4) for k, fn in pieces.items()}
    out["load_avg_1min_end"] = load()
    return out


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


DEVICE = torch.device("cpu")  # set by main (--device)


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def timed(fn: Any, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def observations(policy: Any, b: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    cams = list(getattr(policy.config, "camera_names", []) or [])
    size = int(getattr(policy.config, "image_size", 0) or 0)
    obs = []
    for _ in range(b):
        o: dict[str, Any] = {"state": rng.uniform(-1, 1, REAL).astype(np.float32), "prompt": PROMPT,
                             "images": {c: rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for c in cams}}
        if int(getattr(policy.config, "privileged_dim", 0) or 0):
            o["privileged"] = rng.uniform(-0.5, 0.5, PRIV).astype(np.float32)
        obs.append(o)
    return obs


def bench_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    overrides: dict[str, Any] = {"state_dim": REAL, "real_action_dim": REAL}
    if name == "state":
        overrides["privileged_dim"] = PRIV
    else:
        overrides["camera_names"] = ["front", "wrist"]
    with DEVICE:  # built in place (a real-size pi05 is 3.3 B parameters)
        policy = make_policy(name, NormStats.identity(REAL, REAL), tasks=[PROMPT], **overrides)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    actor = policy.train()
    params = sum(p.numel() for p in actor.parameters())
    inputs = actor.preprocess(observations(actor, args.actor_batch, rng))
    with torch.no_grad():
        ctx = reference.encode(inputs)
        z = critic_state_features(reference, ctx, inputs, "rl-token" if name == "state" else "pooled")
    p = inputs["state"].float()
    out: dict[str, Any] = {"config": name, "device": str(DEVICE), "amp": args.amp, "params": params,
                           "actor_batch": args.actor_batch,
                           "critic_batch": args.critic_batch, "critic_hidden": list(args.critic_hidden),
                           "critic_feature_dim": int(z.shape[-1])}
    if "critic" in args.parts:
        mods = {"now": sys.modules[CriticTrainer.__module__]}
        if args.critic_before:
            mods["before"] = critic_module_at(args.critic_before)
        out["critic"] = critic_speed(mods, int(z.shape[-1]), int(p.shape[-1]), args)
        if args.critic_before:
            out["critic_before_rev"] = args.critic_before
    critic = QEnsemble(CriticConfig(feature_dim=z.shape[-1], proprio_dim=p.shape[-1], n_exec=N_EXEC,
                                    real_action_dim=REAL, num_q=2, hidden=tuple(args.critic_hidden))).to(DEVICE)
    trainer = CriticTrainer(critic, CriticTrainConfig(reg_weight=0.1))
    cb, a = args.critic_batch, N_EXEC * REAL
    g = torch.Generator().manual_seed(1)
    batch = CriticBatch(z=torch.randn(cb, z.shape[-1], generator=g), p=torch.randn(cb, p.shape[-1], generator=g),
                        actions=torch.rand(cb, a, generator=g) * 2 - 1, rewards=torch.zeros(cb, N_EXEC),
                        done=torch.zeros(cb), z_next=torch.randn(cb, z.shape[-1], generator=g),
                        p_next=torch.randn(cb, p.shape[-1], generator=g), mc_return=torch.rand(cb, generator=g),
                        ref_actions=torch.rand(cb, 4, a, generator=g) * 2 - 1,
                        ref_next_actions=torch.rand(cb, 4, a, generator=g) * 2 - 1)
    batch = CriticBatch(**{f.name: None if getattr(batch, f.name) is None else getattr(batch, f.name).to(DEVICE)
                           for f in dataclasses.fields(batch)})
    out["load_avg_1min_before_critic"] = load()
    critic_t = timed(lambda: trainer.update(batch), args.warmup, args.reps * 5)
    out["critic_updates_per_s"] = round(1.0 / statistics.median(critic_t), 1)
    out["load_avg_1min_after_critic"] = load()
    out["peak_rss_mb_after_critic"] = round(rss_mb())
    if "actor" not in args.parts:
        return out

    q_fn = bind_critic(critic, z.to(DEVICE), p.to(DEVICE))
    opt = torch.optim.AdamW(actor.parameters(), lr=1e-5)
    qcfg = QVGMConfig(n_exec=N_EXEC, num_steps=10)
    chunks = torch.rand(args.actor_batch, actor.horizon, actor.action_dim, generator=g) * 2 - 1
    chunks[..., REAL:] = 0.0
    chunks = chunks.to(DEVICE)

    def amp() -> Any:
        if args.amp == "bf16":
            return torch.autocast(DEVICE.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def qvgm_step(cfg: QVGMConfig = qcfg) -> None:
        with amp():
            qvgm_update(actor, reference, opt, inputs, q_fn, cfg)

    sampled = {s: dataclasses.replace(qcfg, steps_per_sample=s) for s in args.steps_per_sample}

    def dql_step() -> None:
        opt.zero_grad(set_to_none=True)
        with amp():
            loss, _ = diffusion_ql_loss(DifferentiableSampler(actor), inputs, q_fn, N_EXEC, num_steps=10,
                                        bc_actions=chunks)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(actor.parameters(), 1.0)
        opt.step()

    def sft_step() -> None:
        opt.zero_grad(set_to_none=True)
        with amp():
            loss = actor.flow_loss(inputs, chunks)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(actor.parameters(), 1.0)
        opt.step()

    steps: dict[str, Any] = {"qvgm": qvgm_step}
    steps.update({f"qvgm_s{s}": (lambda c=c: qvgm_step(c)) for s, c in sampled.items()})
    steps.update({"dql": dql_step, "sft": sft_step})
    times: dict[str, list[float]] = {k: [] for k in steps}
    failed: dict[str, str] = {}

    def attempt(key: str, warmup: int) -> None:
        """Time one repetition of `key`; a CUDA out-of-memory marks it failed (reported, not raised)."""
        if key in failed:
            return
        try:
            times[key] += timed(steps[key], warmup, 1)
        except torch.OutOfMemoryError:
            failed[key] = "oom"
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    # Q-VGM first (peak RSS is monotone), then all interleaved so every variant sees the same machine load
    out["load_avg_1min_before_actor"] = load()
    for key in steps:
        if DEVICE.type == "cuda":
            torch.cuda.reset_peak_memory_stats(DEVICE)
        attempt(key, args.warmup)
        if DEVICE.type == "cuda" and key not in failed:
            out[f"peak_mem_mb_{key}"] = round(torch.cuda.max_memory_allocated(DEVICE) / 2**20)
        if key == "qvgm":
            rss_qvgm = rss_mb()
    for _ in range(args.reps - 1):
        for key in steps:
            attempt(key, 0)
    rss_dql = rss_mb()
    if failed:
        out["failed"] = failed
    med = statistics.median

    def m(key: str) -> float:
        return med(times[key]) if times[key] else float("nan")

    sampled_t = {s: times[f"qvgm_s{s}"] for s in sampled}
    if args.phases:
        out["phases"] = actor_phases(actor, reference, inputs, args)
    out.update({"qvgm_update_s": round(m("qvgm"), 4), "qvgm_updates_per_s": round(1.0 / m("qvgm"), 2),
                "dql_update_s": round(m("dql"), 4), "dql_updates_per_s": round(1.0 / m("dql"), 2),
                "dql_over_qvgm": round(m("dql") / m("qvgm"), 2), "sft_update_s": round(m("sft"), 4),
                "qvgm_over_sft": round(m("qvgm") / m("sft"), 2)})
    for s in sampled_t:
        out[f"qvgm_s{s}_update_s"] = round(m(f"qvgm_s{s}"), 4)
        out[f"dql_over_qvgm_s{s}"] = round(m("dql") / m(f"qvgm_s{s}"), 2)
        out[f"qvgm_over_qvgm_s{s}"] = round(m("qvgm") / m(f"qvgm_s{s}"), 2)
    out.update({"load_avg_1min_after_actor": load(), "peak_rss_mb_after_qvgm": round(rss_qvgm),
                "peak_rss_mb_after_dql": round(rss_dql)})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["state", "pi05-small"])
    ap.add_argument("--actor-batch", type=int, default=32)
    ap.add_argument("--critic-batch", type=int, default=256)
    ap.add_argument("--critic-hidden", type=int, nargs="+", default=[256, 256])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--critic-threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--critic-before", default=None, help="git revision whose critic.py to time interleaved")
    ap.add_argument("--steps-per-sample", type=int, nargs="*", default=[2],
                    help="Q-VGM steps_per_sample values timed besides all K")
    ap.add_argument("--phases", action="store_true", help="also time the pieces of an actor update")
    ap.add_argument("--parts", nargs="+", default=["critic", "actor"], choices=["critic", "actor"])
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--amp", default="none", choices=["none", "bf16"], help="bf16 autocast for the actor updates")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    result = {"bench": "trainer_speed", "machine": platform.machine(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "threads": args.threads, "device": str(DEVICE),
              "gpu": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else None,
              "load_avg_1min_start": round(os.getloadavg()[0], 2),
              "results": [bench_config(c, args) for c in args.configs],
              "load_avg_1min_end": round(os.getloadavg()[0], 2)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
