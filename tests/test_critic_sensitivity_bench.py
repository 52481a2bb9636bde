"""bench/critic_action_sensitivity.py on a work dir written here (a real saved critic + feature arrays)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch

from critic_trainer.critic import CriticConfig, QEnsemble
from critic_trainer.pipeline import save_critic

ROOT = Path(__file__).resolve().parents[1]


def test_sensitivity_splits_state_and_action_variance(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("cas", ROOT / "bench" / "critic_action_sensitivity.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    critic = QEnsemble(CriticConfig(feature_dim=8, proprio_dim=3, n_exec=2, real_action_dim=2, num_q=2,
                                    hidden=(16, 16)))
    (tmp_path / "critic-push-s0-abc").mkdir()
    save_critic(critic, tmp_path / "critic-push-s0-abc")
    f = tmp_path / "features-push-s0"
    f.mkdir()
    rng = np.random.default_rng(0)
    np.save(f / "z_rl.npy", rng.normal(size=(300, 8)).astype(np.float32))
    np.save(f / "proprio.npy", rng.normal(size=(300, 3)).astype(np.float32))
    np.save(f / "ref_actions.npy", rng.uniform(-1, 1, (300, 4, 4)).astype(np.float32))
    r = mod.sensitivity(tmp_path, "push", 0, frames=200, sigma=0.1)
    assert r["frames"] == 200
    assert all(math.isfinite(v) and v > 0 for v in r.values())
    assert r["within_over_across"] == r["q_var_within_state_policy_samples"] / r["q_var_across_states"]
    # the same critic with every action input weight zeroed: Q is a function of the state alone
    adim = critic.cfg.action_dim
    with torch.no_grad():
        for layer in (critic.hidden[0], critic.hidden[1], critic.out):
            layer.weight[:, -adim:] = 0.0
    (tmp_path / "critic-push-s1-abc").mkdir()
    save_critic(critic, tmp_path / "critic-push-s1-abc")
    (tmp_path / "features-push-s1").symlink_to(f)
    r0 = mod.sensitivity(tmp_path, "push", 1, frames=200, sigma=0.1)
    assert r0["q_var_across_states"] > 0 and r0["q_var_within_state_policy_samples"] < 1e-12
    assert r0["q_var_within_state_perturbed_0.1"] < 1e-12
