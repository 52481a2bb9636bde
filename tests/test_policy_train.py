"""pi05-tiny trains end to end: the flow loss falls on a tiny batch and, once the zero-initialised adaRMS
gates open, gradients reach every part (action expert, Gemma prefix, SigLIP)."""

from __future__ import annotations

import numpy as np
import torch

from qvgm.policy import NormStats, make_policy

torch.set_num_threads(1)  # 2 shared CPU cores


def test_flow_loss_decreases_and_gradients_reach_the_prefix() -> None:
    torch.manual_seed(0)
    tasks = ["pick up the red cube", "open the drawer"]
    pol = make_policy("pi05-tiny", NormStats.identity(7, 7), tasks=tasks)
    rng = np.random.default_rng(0)
    obs = [{"images": {c: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for c in ("base", "wrist")},
            "state": rng.uniform(-1, 1, 7), "prompt": p} for p in tasks * 2]
    inp = pol.preprocess(obs)
    acts = pol.processor.normalize_actions(rng.uniform(-0.8, 0.8, (4, 10, 7)))
    g = torch.Generator().manual_seed(0)
    eval_noise, eval_t = torch.randn(4, 10, 32, generator=g), torch.tensor([0.1, 0.4, 0.7, 0.95])

    def eval_loss() -> float:
        with torch.no_grad():
            return pol.flow_loss(inp, acts, noise=eval_noise, time=eval_t).item()

    before = eval_loss()
    opt = torch.optim.AdamW(pol.parameters(), lr=1e-3)
    for _ in range(30):
        loss = pol.flow_loss(inp, acts, noise=torch.randn(4, 10, 32, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.85 * before, (before, after)
    m = pol.model
    for name, p in [("expert q_proj", m.gemma_expert.model.layers[0].self_attn.q_proj.weight),
                    ("expert adaRMS", m.gemma_expert.model.layers[0].input_layernorm.dense.weight),
                    ("gemma k_proj", m.paligemma.model.language_model.layers[0].self_attn.k_proj.weight),
                    ("gemma embed", m.paligemma.model.language_model.embed_tokens.weight),
                    ("siglip patch", m.paligemma.model.vision_tower.embeddings.patch_embedding.weight)]:
        assert p.grad is not None and p.grad.abs().max() > 0, f"no gradient reaches {name}"
