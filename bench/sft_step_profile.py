"""Where one pi05 SFT step (forward + backward + AdamW, batch as SFT uses) spends its time, per config; JSON.

Records a few noisy push demos at the model's image size (or reads --dataset), preprocesses every frame once
(decoded frames cached in memory, as critic_trainer.sft does), then times per config: the whole step, the vision
tower (fwd+bwd), the prefix embedding (vision + projector + text embedding), the prefix LM layers and the rest
(action expert, loss, optimizer). Also reports the prompt token lengths vs the budget and tokens per image.
`pi05-small-v1` is the previous 22.5 M pi05-small (qvgm.policy.config, kept for the comparison). Usage::

    PYTHONPATH=. .venv/bin/python bench/sft_step_profile.py --configs pi05-small-v1,pi05-small --out prof.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, when run as a script
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])

import torch  # noqa: E402

from bench.report import emit, machine  # noqa: E402
from critic_trainer.demos import collect_demos  # noqa: E402
from critic_trainer.sft import SFTConfig, batch_inputs, build_policy_for, encode_inputs, load_demo_data  # noqa: E402
from qvgm.policy.flow import sample_flow_time  # noqa: E402


def _best(fn, reps: int) -> float:
    """Median wall time (s) of `reps` calls after one warm-up call."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _cpu(fn, reps: int) -> float:
    """Median CPU time (s) of this process per call: with 1 torch thread it is the compute cost without the time
    spent descheduled, so it compares configs fairly on a shared machine."""
    ts = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        ts.append(time.process_time() - t0)
    return statistics.median(ts)


def profile(name: str, data, batch: int, reps: int) -> dict:
    torch.manual_seed(0)
    pol = build_policy_for(data, SFTConfig(datasets=["-"], config=name))
    pol.train()
    t0 = time.perf_counter()
    inputs = encode_inputs(pol, data)
    t_pre = time.perf_counter() - t0
    acts = pol.processor.normalize_actions(data.actions)
    valid = torch.from_numpy(data.valid)
    opt = torch.optim.AdamW(pol.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    rows = torch.arange(batch) % len(data)
    inp = batch_inputs(inputs, rows, pol.device)
    m = pol.model
    pm = m.paligemma.model

    def step() -> None:
        loss = pol.flow_loss(inp, acts[rows], noise=torch.randn(batch, pol.horizon, pol.action_dim, generator=gen),
                             time=sample_flow_time(batch, generator=gen), action_mask=valid[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def vision() -> None:
        pm.vision_tower(pixel_values=inp["images"].flatten(0, 1)).last_hidden_state.sum().backward()

    def embed() -> None:
        m.embed_prefix(inp["images"], inp["image_masks"], inp["tokens"], inp["token_mask"])[0].sum().backward()

    def prefix() -> None:
        m.encode_prefix(inp["images"], inp["image_masks"], inp["tokens"], inp["token_mask"]).prefix_out.sum().backward()

    t_step, t_vis, t_emb, t_pre_all = (_best(f, reps) for f in (step, vision, embed, prefix))
    cpu_step = _cpu(step, reps)
    cfg = pol.config
    lens = inputs["token_mask"].sum(1)
    return {"config": name, "params_M": round(sum(p.numel() for p in pol.parameters()) / 1e6, 2),
            "image_size": cfg.image_size, "patch_size": cfg.patch_size,
            "tokens_per_image": (cfg.image_size // cfg.patch_size) ** 2, "cameras": len(cfg.camera_names),
            "token_budget": cfg.max_token_len, "prompt_tokens_max": int(lens.max()),
            "prefix_tokens": len(cfg.camera_names) * (cfg.image_size // cfg.patch_size) ** 2 + cfg.max_token_len,
            "lm": f"{cfg.depth}x{cfg.width} mlp {cfg.mlp}", "vision": f"{cfg.vision_depth}x{cfg.vision_width}",
            "expert": f"{cfg.depth}x{cfg.expert_width} mlp {cfg.expert_mlp}", "batch": batch,
            "preprocess_all_frames_s": round(t_pre, 2), "step_s": round(t_step, 3), "step_cpu_s": round(cpu_step, 3),
            "vision_tower_fwdbwd_s": round(t_vis, 3), "prefix_embed_fwdbwd_s": round(t_emb, 3),
            "prefix_lm_layers_fwdbwd_s": round(t_pre_all - t_emb, 3),
            "expert_loss_optimizer_s": round(t_step - t_pre_all, 3)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="pi05-small-v1,pi05-small")
    ap.add_argument("--dataset", default=None, help="replay-buffer dataset (default: record 4 push demos)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="sft_prof_") as tmp:
        ds = args.dataset
        if ds is None:
            ds = str(Path(tmp) / "push")
            collect_demos("push", 4, ds, noise=0.01, seed=0, image_size=(64, 64))
        t0 = time.perf_counter()
        data = load_demo_data([ds], 10, with_images=True)
        t_load = time.perf_counter() - t0
        rows = [profile(c, data, args.batch_size, args.reps) for c in args.configs.split(",")]
    out = {"bench": "sft_step_profile", "frames": len(data), "load_and_decode_video_s": round(t_load, 2),
           "threads": args.threads, "results": rows,
           "machine": machine(args.threads)}
    return emit(out, args.out)


if __name__ == "__main__":
    main()
