"""pi0.5 backbone: attention pattern (prefix never sees suffix, cache == recompute), masking, flow-time
convention, real-size parameter counts (meta device)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qvgm.policy.config import get_config
from qvgm.policy.interface import FlowPolicy
from qvgm.policy.pi05 import AdaRMSNorm, Pi05Model, Pi05Policy
from qvgm.policy.processor import NormStats, build_tokenizer

torch.set_num_threads(1)  # 2 shared CPU cores

TASKS = ["pick up the red cube", "open the drawer", "push the blue block to the left"]


def randomize_adarms(policy: torch.nn.Module, std: float = 0.2, seed: int = 0) -> None:
    """adaRMS dense layers are zero-init (expert layers are identity at init); give them weights so the
    suffix actually reads the prefix in these tests."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in policy.modules():
            if isinstance(m, AdaRMSNorm):
                m.dense.weight.copy_(torch.randn(m.dense.weight.shape, generator=g) * std)
                m.dense.bias.copy_(torch.randn(m.dense.bias.shape, generator=g) * std)


@pytest.fixture(scope="module")
def policy() -> Pi05Policy:
    torch.manual_seed(0)
    pol = Pi05Policy(get_config("pi05-tiny"), build_tokenizer(TASKS), NormStats.identity(7, 7)).eval()
    randomize_adarms(pol)
    return pol


def make_obs(seed: int, prompt: str = "pick up the red cube", wrist: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    images = {"base": rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)}
    if wrist:
        images["wrist"] = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return {"images": images, "state": rng.uniform(-1, 1, 7).astype(np.float32), "prompt": prompt, "stamp": 0.0}


def test_is_flow_policy(policy: Pi05Policy) -> None:
    assert isinstance(policy, FlowPolicy)
    assert (policy.horizon, policy.action_dim, policy.real_action_dim) == (10, 32, 7)


@torch.no_grad()
def test_prefix_never_attends_to_suffix(policy: Pi05Policy) -> None:
    inp = policy.preprocess([make_obs(0), make_obs(1, "open the drawer")])
    m = policy.model
    args = (inp["images"], inp["image_masks"], inp["tokens"], inp["token_mask"])
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(2, 10, 32, generator=g), 5 * torch.randn(2, 10, 32, generator=g)
    p1, v1 = m.joint_forward(*args, x1, torch.tensor([0.9, 0.2]))
    p2, v2 = m.joint_forward(*args, x2, torch.tensor([0.1, 0.7]))
    assert torch.equal(p1, p2), "prefix outputs changed when only the suffix changed"
    assert not torch.allclose(v1, v2)
    ctx = policy.encode(inp)
    torch.testing.assert_close(ctx.prefix_out, p1, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_cached_equals_uncached_and_suffix_reads_prefix(policy: Pi05Policy) -> None:
    inp = policy.preprocess([make_obs(2), make_obs(3, "push the blue block to the left")])
    ctx = policy.encode(inp)
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(2))
    for tv in (1.0, 0.55, 0.0):
        t = torch.full((2,), tv)
        torch.testing.assert_close(policy.velocity(x, t, ctx), policy.velocity_uncached(inp, x, t),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(policy.velocity(x, torch.tensor(tv), ctx), policy.velocity(x, t, ctx))
    # The suffix attends to the prefix: another prompt/image gives another velocity for the same x_t, t.
    other = policy.encode(policy.preprocess([make_obs(4, "open the drawer"), make_obs(3)]))
    t = torch.full((2,), 0.5)
    v_a, v_b = policy.velocity(x, t, ctx), policy.velocity(x, t, other)
    assert (v_a[0] - v_b[0]).abs().max() > 1e-4
    # The suffix attends to itself: changing one action token changes the others' velocity.
    x2 = x.clone()
    x2[:, 0] += 1.0
    assert (policy.velocity(x2, t, ctx)[:, 1:] - v_a[:, 1:]).abs().max() > 1e-5


@torch.no_grad()
def test_missing_camera_is_masked(policy: Pi05Policy) -> None:
    inp = policy.preprocess([make_obs(5, wrist=False)])
    assert inp["image_masks"].tolist() == [[True, False]]
    x, t = torch.randn(1, 10, 32), torch.full((1,), 0.3)
    v = policy.velocity(x, t, policy.encode(inp))
    inp2 = dict(inp)
    inp2["images"] = inp["images"].clone()
    inp2["images"][:, 1] = torch.rand_like(inp2["images"][:, 1]) * 2 - 1  # garbage in the masked camera
    torch.testing.assert_close(policy.velocity(x, t, policy.encode(inp2)), v, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_sample_follows_flow_time_convention(policy: Pi05Policy) -> None:
    inp = policy.preprocess([make_obs(6)])
    ctx = policy.encode(inp)
    noise = torch.randn(1, 10, 32, generator=torch.Generator().manual_seed(3))
    chunk, path = policy.sample(ctx, num_steps=4, noise=noise, return_path=True)
    assert path.x.shape == (5, 1, 10, 32)
    torch.testing.assert_close(path.t, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert torch.equal(path.x[0], noise) and torch.equal(path.x[-1], chunk)
    for k in range(4):  # x_{k+1} = x_k + dt * v(x_k, t_k), dt = -1/K, t_0 = 1 is noise
        want = path.x[k] - 0.25 * policy.velocity(path.x[k], path.t[k].expand(1), ctx)
        torch.testing.assert_close(path.x[k + 1], want)
    acts = policy.postprocess(chunk)
    assert acts.shape == (1, 10, 7) and acts.dtype == np.float64


def test_flow_loss_target_is_eps_minus_action(policy: Pi05Policy) -> None:
    inp = policy.preprocess([make_obs(7), make_obs(8)])
    g = torch.Generator().manual_seed(4)
    a, eps = torch.rand(2, 10, 32, generator=g) * 2 - 1, torch.randn(2, 10, 32, generator=g)
    t = torch.tensor([0.8, 0.3])
    loss = policy.flow_loss(inp, a, noise=eps, time=t)
    x_t = t[:, None, None] * eps + (1 - t[:, None, None]) * a
    with torch.no_grad():
        v = policy.velocity(x_t, t, policy.encode(inp))
    torch.testing.assert_close(loss.detach(), ((v - (eps - a))[..., :7] ** 2).mean(), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert policy.model.action_in_proj.weight.grad is not None
    policy.zero_grad(set_to_none=True)


def _count(name: str, vocab: int | None = None) -> tuple[int, Pi05Model]:
    cfg = get_config(name)
    if vocab is not None:
        cfg.vocab_size = vocab
    with torch.device("meta"):
        m = Pi05Model(cfg)
    return sum(p.numel() for p in m.parameters()), m


def test_real_size_pi05_shapes_on_meta_device() -> None:
    n, m = _count("pi05")
    lm = m.paligemma.model.language_model
    assert len(lm.layers) == 18 and len(m.gemma_expert.model.layers) == 18
    assert lm.embed_tokens.weight.shape == (257152, 2048)
    assert lm.layers[0].self_attn.q_proj.weight.shape == (2048, 2048)
    assert lm.layers[0].self_attn.k_proj.weight.shape == (256, 2048)
    assert lm.layers[0].mlp.gate_proj.weight.shape == (16384, 2048)
    ex = m.gemma_expert.model.layers[0]
    assert ex.self_attn.q_proj.weight.shape == (2048, 1024) and ex.self_attn.k_proj.weight.shape == (256, 1024)
    assert ex.mlp.up_proj.weight.shape == (4096, 1024)
    assert ex.input_layernorm.dense.weight.shape == (3 * 1024, 1024)
    assert len(m.paligemma.model.vision_tower.vision_model.encoder.layers
               if hasattr(m.paligemma.model.vision_tower, "vision_model")
               else m.paligemma.model.vision_tower.encoder.layers) == 27
    assert m.action_in_proj.weight.shape == (1024, 32)
    assert 3.0e9 < n < 3.8e9, n  # PaliGemma-2B (~2.9B) + ~0.43B action expert with adaRMS


def test_small_and_tiny_sizes() -> None:
    n_small, _ = _count("pi05-small", vocab=600)
    n_tiny, _ = _count("pi05-tiny", vocab=300)
    assert 8e6 <= n_small <= 15e6, n_small  # sized for CPU pixel SFT (bench/results/pi05small_profile.json)
    assert n_tiny <= 3e6, n_tiny
