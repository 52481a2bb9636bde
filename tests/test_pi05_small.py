"""pi05-small sizing (CPU pixel SFT): image tokens, prompt budget that fits every sim prompt without truncation,
and checkpoints of the previous (22.5 M) pi05-small still loading through their own config.json."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from qvgm.policy import load_policy, save_policy
from qvgm.policy.config import get_config
from qvgm.policy.pi05 import Pi05Policy
from qvgm.policy.processor import NormStats, build_tokenizer
from qvgm.policy.rl_token import prefix_length
from qvgm.sim.tasks import TASKS, sample_layout

torch.set_num_threads(1)  # 2 shared CPU cores

def _sim_prompts(n: int = 30) -> list[str]:
    rng = np.random.default_rng(0)
    return [sample_layout(task, rng).prompt for task in TASKS for _ in range(n)]


def test_pi05_small_prefix_is_short_and_every_sim_prompt_fits_the_budget() -> None:
    cfg = get_config("pi05-small")
    assert (cfg.image_size // cfg.patch_size) ** 2 == 16  # tokens per camera
    assert prefix_length(cfg) == 2 * 16 + cfg.max_token_len == 64
    prompts = _sim_prompts()
    torch.manual_seed(0)
    pol = Pi05Policy(cfg, build_tokenizer(prompts), NormStats.identity(7, 7)).eval()
    rng = np.random.default_rng(1)
    obs = [{"images": {c: rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for c in cfg.camera_names},
            "state": rng.uniform(-3, 3, 7).astype(np.float32), "prompt": p} for p in prompts]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a truncated prompt warns: none may be truncated
        inp = pol.preprocess(obs)
    used = inp["token_mask"].sum(1)
    assert int(used.max()) <= cfg.max_token_len - 4, int(used.max())  # headroom for longer colour names
    assert int(used.min()) >= 20  # template + task words + 7 state bins really are tokenised
    with torch.no_grad():
        ctx = pol.encode({k: v[:4] for k, v in inp.items()})
        chunk = pol.sample(ctx, num_steps=2)
    assert ctx.prefix_out.shape == (4, 64, cfg.width)
    assert chunk.shape == (4, cfg.horizon, cfg.action_dim) and torch.isfinite(chunk).all()


def test_previous_pi05_small_checkpoint_loads_by_its_own_config(tmp_path: Path) -> None:
    cfg = get_config("pi05-small-v1")
    prompts = _sim_prompts(3)
    torch.manual_seed(0)
    old = Pi05Policy(cfg, build_tokenizer(prompts), NormStats.identity(7, 7)).eval()
    save_policy(old, tmp_path / "v1", version="pi05-small-v1")
    loaded = load_policy(tmp_path / "v1")
    assert loaded.config.to_dict() == old.config.to_dict()
    assert loaded.config.patch_size == 8 and loaded.config.width == 384 and get_config("pi05-small").width == 256
    rng = np.random.default_rng(0)
    obs = [{"images": {c: rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for c in cfg.camera_names},
            "state": rng.uniform(-1, 1, 7).astype(np.float32), "prompt": prompts[0]}]
    noise = torch.randn(1, cfg.horizon, cfg.action_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = old.sample(old.encode(old.preprocess(obs)), num_steps=3, noise=noise)
        b = loaded.sample(loaded.encode(loaded.preprocess(obs)), num_steps=3, noise=noise)
        assert loaded.encode(loaded.preprocess(obs)).prefix_out.shape[1] == 2 * 64 + 64
    assert torch.allclose(a, b, atol=1e-5)
