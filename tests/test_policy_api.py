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
