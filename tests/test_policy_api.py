"""Public API of qvgm.policy (lazy exports, make_policy) and the latency benchmark on pi05-tiny."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)  # 2 shared CPU cores


def test_interface_import_stays_light() -> None:
    code = "import sys, qvgm.policy.interface; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_make_policy_with_robot_profile() -> None:
    from qvgm.policy import NormStats, make_policy

    pol = make_policy("pi05-tiny", NormStats.identity(6, 5), tasks=["stack the cubes"], state_dim=6,
                      real_action_dim=5, camera_names=["top"])
    out = pol.act([{"images": {"top": np.zeros((16, 16, 3), np.uint8)}, "state": np.zeros(6),
                    "prompt": "stack the cubes"}], num_steps=2)
    assert out.shape == (1, 10, 5) and np.isfinite(out).all()
    st = make_policy("state", NormStats.identity(6, 5), state_dim=6, real_action_dim=5, horizon=4)
    assert st.act([{"state": np.zeros(6)}]).shape == (1, 4, 5)


def test_latency_bench_reports_json_fields() -> None:
    spec = importlib.util.spec_from_file_location("policy_latency", ROOT / "bench" / "policy_latency.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.bench_one("pi05-tiny", "cpu", "float32", steps=3, runs=3, warmup=1, cameras=1)
    assert res["config"] == "pi05-tiny" and res["num_steps"] == 3 and res["cameras"] == ["base"]
    assert 0 < res["latency_ms_p50"] <= res["latency_ms_p95"]
    assert res["uncached_model_ms_p50"] > 0 and res["cache_speedup"] > 0 and res["peak_rss_mb"] > 0


def test_flow_backend_gives_action_chunks() -> None:
    from qvgm.policy import NormStats, make_policy
    from qvgm.policy.backend import FlowPolicyBackend
    from qvgm.policy.interface import PolicyBackend
    from qvgm.policy.processor import ObservationError

    rng = np.random.default_rng(0)
    stats = NormStats.compute(rng.normal(size=(50, 3)), rng.normal(0.5, 0.1, size=(50, 2)))
    pol = make_policy("state", stats, state_dim=3, real_action_dim=2, horizon=4)
    be = FlowPolicyBackend(pol, ["j1", "gripper"], dt=0.1, num_steps=5, seed=0)
    assert isinstance(be, PolicyBackend)
    be.reset("stack")
    chunk = be.infer({"state": np.zeros(3), "stamp": 12.5})
    assert chunk.positions.shape == (4, 2) and chunk.positions.dtype == np.float64
    assert chunk.stamp == 12.5 and chunk.version == "untrained" and chunk.joint_names == ["j1", "gripper"]
    again = FlowPolicyBackend(pol, ["j1", "gripper"], dt=0.1, num_steps=5, seed=0).infer({"state": np.zeros(3)})
    np.testing.assert_array_equal(again.positions, chunk.positions)
    with pytest.raises(ObservationError, match="state"):
        be.infer({"state": np.zeros(2)})


def _state_policy(horizon: int = 4):
    from qvgm.policy import NormStats, make_policy

    rng = np.random.default_rng(0)
    stats = NormStats.compute(rng.normal(size=(50, 3)), rng.normal(0.5, 0.1, size=(50, 2)))
    return make_policy("state", stats, state_dim=3, real_action_dim=2, horizon=horizon)


def test_noise_scale_sets_where_the_flow_starts() -> None:
    """x_1 = scale * eps: scale 1 is the default sampling draw for draw, 0 the deterministic flow from x_1 = 0,
    0.5 the flow from half the noise; a negative or non-finite scale is refused."""
    pol = _state_policy()
    obs = [{"state": np.full(3, 0.2)}, {"state": np.full(3, -0.4)}]
    torch.manual_seed(3)
    plain = pol.act(obs, num_steps=4)
    torch.manual_seed(3)
    np.testing.assert_array_equal(pol.act(obs, num_steps=4, noise_scale=1.0), plain)
    zeros = torch.zeros(2, pol.horizon, pol.action_dim)
    det = pol.postprocess(pol.sample(pol.encode(pol.preprocess(obs)), num_steps=4, noise=zeros))
    for seed in (1, 2):
        torch.manual_seed(seed)
        np.testing.assert_array_equal(pol.act(obs, num_steps=4, noise_scale=0.0), det)
    assert not np.allclose(det, plain)  # the noise mattered at scale 1
    eps = torch.randn(2, pol.horizon, pol.action_dim)
    np.testing.assert_array_equal(pol.act(obs, num_steps=4, noise=eps, noise_scale=0.5),
                                  pol.act(obs, num_steps=4, noise=0.5 * eps))
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="noise scale"):
            pol.act(obs, noise_scale=bad)
    with pytest.raises(ValueError, match="noise shape"):
        pol.act(obs, noise=torch.zeros(1, pol.horizon, pol.action_dim), noise_scale=0.5)


def test_backend_and_evaluation_wrapper_apply_the_noise_scale() -> None:
    """FlowPolicyBackend(noise_scale=0) serves the deterministic chunk on both paths (plain and inpainted on a
    committed prefix), seeded or not; pipeline.ScaledNoisePolicy is the same policy for evaluate()."""
    from critic_trainer.pipeline import ScaledNoisePolicy
    from qvgm.policy.backend import FlowPolicyBackend
    from qvgm.policy.prefix import sample_with_prefix

    pol = _state_policy()
    obs = {"state": np.full(3, 0.3), "prompt": "push"}
    zeros = torch.zeros(1, pol.horizon, pol.action_dim)
    ctx = pol.encode(pol.preprocess([obs]))
    det = pol.postprocess(pol.sample(ctx, num_steps=5, noise=zeros))[0]
    prefix = det[:2] + 0.05
    pre_n = pol.processor.normalize_actions(prefix)[None]
    det_prefix = pol.postprocess(sample_with_prefix(pol, ctx, pre_n, 2, num_steps=5, noise=zeros))[0]
    for seed in (None, 0, 1):
        be = FlowPolicyBackend(pol, ["j1", "gripper"], dt=0.1, num_steps=5, seed=seed, noise_scale=0.0)
        torch.manual_seed(7 if seed is None else 8)
        np.testing.assert_allclose(be.infer(obs).positions, det, rtol=0, atol=1e-12)
        np.testing.assert_allclose(be.infer(obs, prefix=prefix).positions, det_prefix, rtol=0, atol=1e-12)
    half = FlowPolicyBackend(pol, ["j1", "gripper"], dt=0.1, num_steps=5, seed=4, noise_scale=0.5)
    eps = torch.randn(1, pol.horizon, pol.action_dim, generator=torch.Generator().manual_seed(4))
    np.testing.assert_allclose(half.infer(obs).positions, pol.postprocess(pol.sample(ctx, 5, noise=0.5 * eps))[0],
                               rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="noise scale"):
        FlowPolicyBackend(pol, ["j1", "gripper"], dt=0.1, noise_scale=-1.0)
    wrapped = ScaledNoisePolicy(pol, 0.0)
    assert wrapped.version == "untrained@noise-0" and wrapped.policy is pol
    torch.manual_seed(5)
    np.testing.assert_array_equal(wrapped.act([obs]), pol.act([obs], noise=zeros))
    with pytest.raises(ValueError, match="noise scale"):
        ScaledNoisePolicy(pol, float("nan"))
