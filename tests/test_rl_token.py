"""RL token (METHOD.md §2): causal teacher-forced decoder, training with the VLA frozen on real sim frames, saved
inside the checkpoint, and critic_features returning z_rl after load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from critic_trainer.cli import main
from critic_trainer.demos import collect_demos
from critic_trainer.sft import SFTConfig, build_policy_for, load_demo_data
from qvgm.policy import load_policy, save_policy
from qvgm.policy.rl_token import RLToken, RLTokenConfig

torch.set_num_threads(1)  # 2 shared CPU cores


def test_decoder_is_causal_and_encoder_sees_every_valid_token() -> None:
    torch.manual_seed(0)
    mod = RLToken(RLTokenConfig(width=16, max_len=6, dim=32, heads=2, enc_layers=1, dec_layers=1)).eval()
    z = torch.randn(2, 6, 16)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    z_rl = mod.encode(z, mask)
    assert z_rl.shape == (2, 32)
    out = mod.reconstruct(z, mask, z_rl=z_rl)
    assert out.shape == (2, 6, 16)
    z2 = z.clone()
    z2[:, 3] = torch.randn(2, 16) * 3  # output j is predicted from [z_rl, z_0..z_{j-1}]: outputs 0..3 must not change
    out2 = mod.reconstruct(z2, mask, z_rl=z_rl)
    assert torch.allclose(out[:, :4], out2[:, :4], atol=1e-5)
    assert not torch.allclose(out[0, 4:], out2[0, 4:], atol=1e-3)
    assert not torch.allclose(mod.encode(z2, mask), z_rl, atol=1e-3)  # the token reads every valid token
    z3 = z.clone()
    z3[1, 4:] = torch.randn(2, 16) * 10  # ... and ignores masked ones
    assert torch.allclose(mod.encode(z3, mask)[1], z_rl[1], atol=1e-5)
    # context dropout only in training mode; drop_context reconstructs from z_rl alone
    mod.train()
    g = torch.Generator().manual_seed(0)
    assert not torch.allclose(mod.reconstruct(z, mask, z_rl=z_rl, generator=g), out, atol=1e-4)
    mod.eval()
    zrl_only = mod.reconstruct(z, mask, z_rl=z_rl, drop_context=True)
    assert torch.allclose(zrl_only, mod.reconstruct(z2, mask, z_rl=z_rl, drop_context=True), atol=1e-5)
    with pytest.raises(ValueError, match="prefix embeddings"):
        mod.encode(torch.randn(2, 5, 16), mask[:, :5])


def test_rl_token_training_on_sim_frames_saved_in_checkpoint(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    ds = tmp_path / "demos"
    collect_demos("push", 4, ds, noise=0.01, seed=0, image_size=(32, 32))
    data = load_demo_data([ds], horizon=10, with_images=True)
    torch.manual_seed(0)
    policy = build_policy_for(data, SFTConfig(datasets=[str(ds)], config="pi05-tiny"))
    save_policy(policy, tmp_path / "base", version="base-v1")
    frozen = {k: v.clone() for k, v in policy.state_dict().items()}
    rc = main(["rl-token", "--policy", str(tmp_path / "base"), "--dataset", str(ds), "--out", str(tmp_path / "rl"),
               "--steps", "100", "--dim", "64", "--heads", "2", "--layers", "1", "--batch-size", "16", "--lr", "1e-3",
               "--threads", "1"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out)
    # held-out episodes: reconstruction cosine rises well above the untrained token's (~0; measured ~0.75 here)
    assert rep["heldout_cosine_untrained"] < 0.3
    assert rep["heldout_cosine"] > rep["heldout_cosine_untrained"] + 0.4, rep
    pol = load_policy(tmp_path / "rl")
    assert pol.version == "base-v1+rltok" and pol.manifest["parent"] == "base-v1"
    summary = pol.manifest["summary"]
    assert summary["kind"] == "rl_token" and summary["heldout_frames"] > 0
    assert summary["heldout_cosine"] == pytest.approx(rep["heldout_cosine"])
    assert pol.config.rl_token["dim"] == 64
    # the VLA was frozen: every original weight is unchanged; the token's weights live in model.safetensors
    sd = pol.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in frozen.items())
    assert any(k.startswith("rl_token.") for k in sd)
    obs = data.observations([0, 10, 20])
    with torch.no_grad():
        ctx = pol.encode(pol.preprocess(obs))
        feats = pol.critic_features(ctx)
        again = pol.rl_token.encode(ctx.prefix_out.float(), ctx.prefix_mask)
    assert feats.shape == (3, 64) and torch.allclose(feats, again)
    assert np.isfinite(feats.numpy()).all() and feats.std(0).mean() > 1e-3  # differs across observations
    # without a token, critic_features stays the pooled prefix embedding [B, width]
    base = load_policy(tmp_path / "base")
    with torch.no_grad():
        assert base.critic_features(base.encode(base.preprocess(obs))).shape == (3, base.config.width)
    # a second token on the same checkpoint, or a state checkpoint, is refused clearly
    assert main(["rl-token", "--policy", str(tmp_path / "rl"), "--dataset", str(ds), "--out",
                 str(tmp_path / "rl2"), "--steps", "1"]) == 2
    assert "already has an RL token" in capsys.readouterr().err
    assert not (tmp_path / "rl2").exists()


def test_lr_schedule_and_precomputed_prefix() -> None:
    from critic_trainer.rl_token import lr_at, prefix_embeddings, train_rl_token
    from qvgm.policy import NormStats, make_policy

    assert lr_at(0, 1000, 1e-3, 100, "cosine") == pytest.approx(1e-5)  # linear warm-up
    assert lr_at(99, 1000, 1e-3, 100, "cosine") == pytest.approx(1e-3)
    assert lr_at(999, 1000, 1e-3, 100, "cosine") == pytest.approx(5e-5, rel=1e-2)  # cosine down to 5 %
    assert lr_at(5, 20, 1e-3, 100, "cosine") == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi * 3 / 18)) * 0.95
                                                              + 5e-5)  # warm-up capped at steps // 10
    assert lr_at(500, 1000, 3e-4, 100, "constant") == 3e-4
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, 10, 1e-3, 1, "linear")
    torch.manual_seed(0)
    pol = make_policy("pi05-tiny", NormStats.identity(7, 7), tasks=["push the red cube"])
    rng = np.random.default_rng(0)
    obs = [{"images": {c: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for c in pol.config.camera_names},
            "state": rng.uniform(-1, 1, 7).astype(np.float32), "prompt": "push the red cube"} for _ in range(12)]
    prefix = prefix_embeddings(pol, obs)
    episode = np.repeat(np.arange(4), 3)
    with pytest.raises(ValueError, match="schedule"):
        train_rl_token(pol, None, episode, prefix=prefix, steps=2, schedule="step")
    rep = train_rl_token(pol, None, episode, prefix=prefix, steps=5, dim=32, heads=2, layers=1)
    assert rep["schedule"] == "cosine" and rep["heldout_frames"] == 3 and np.isfinite(rep["heldout_cosine"])
    assert pol.config.rl_token["dim"] == 32
