"""`state` backbone: FlowPolicy interface, privileged input checks, and an end-to-end check of the flow-time
convention: a few hundred steps of flow matching on a state -> chunk map, then sampling from t=1 noise to t=0
recovers the chunk (a sign error in the target or in dt makes this fail)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qvgm.policy.config import get_config
from qvgm.policy.interface import FlowPolicy
from qvgm.policy.processor import NormStats, ObservationError
from qvgm.policy.state_policy import StatePolicy

torch.set_num_threads(1)  # 2 shared CPU cores


def make_policy(seed: int = 0, head: str = "mlp") -> StatePolicy:
    torch.manual_seed(seed)
    cfg = get_config("state", horizon=4, state_dim=3, real_action_dim=2, privileged_dim=2, hidden=64, embed_dim=32,
                     head_hidden=128, head_depth=2, time_dim=16, head=head, head_width=32, head_layers=2, head_heads=2)
    return StatePolicy(cfg, NormStats.identity(3, 2))


def test_interface_and_privileged_checks() -> None:
    pol = make_policy()
    assert isinstance(pol, FlowPolicy)
    obs = {"state": np.zeros(3), "privileged": np.ones(2), "prompt": "x"}
    inp = pol.preprocess([obs])
    assert inp["privileged"].shape == (1, 2)
    ctx = pol.encode(inp)
    assert pol.critic_features(ctx).shape == (1, 32)
    v = pol.velocity(torch.randn(1, 4, 32), torch.ones(1), ctx)
    assert v.shape == (1, 4, 32) and torch.all(v[..., 2:] == 0)
    with pytest.raises(ObservationError, match="privileged"):
        pol.preprocess([{"state": np.zeros(3)}])
    with pytest.raises(ObservationError, match="privileged"):
        pol.preprocess([{"state": np.zeros(3), "privileged": np.array([np.nan, 0.0])}])
    with pytest.raises(ValueError, match="head"):
        make_policy(head="cnn")


@pytest.mark.parametrize("head", ["mlp", "transformer"])
def test_training_then_sampling_recovers_the_chunk(head: str) -> None:
    pol = make_policy(1, head)
    rng = np.random.default_rng(0)
    states = rng.uniform(-1, 1, (64, 3))
    priv = rng.uniform(-1, 1, (64, 2))
    # target chunk: a deterministic function of state + privileged, in [-1, 1]
    w = rng.normal(0, 0.5, (5, 4 * 2))
    chunks = np.tanh(np.concatenate([states, priv], 1) @ w).reshape(64, 4, 2)
    obs = [{"state": s, "privileged": p} for s, p in zip(states, priv, strict=True)]
    inp = pol.preprocess(obs)
    acts = pol.processor.normalize_actions(chunks)
    opt = torch.optim.Adam(pol.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(600):
        idx = torch.randint(0, 64, (32,), generator=g)
        loss = pol.flow_loss({k: v[idx] for k, v in inp.items()}, acts[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    pol.eval()
    with torch.no_grad():
        out = pol.postprocess(pol.sample(pol.encode(inp), num_steps=10))
    err = np.abs(out - chunks).mean()
    baseline = np.abs(chunks - chunks.mean(0)).mean()  # predicting the mean chunk
    assert err < 0.15 and err < 0.4 * baseline, f"mean abs error {err:.3f} (mean-chunk baseline {baseline:.3f})"
