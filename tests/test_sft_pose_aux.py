"""Sim-only SFT aid `SFTConfig.pose_aux` (`critic_trainer sft --pose-aux W`): a training-only head reads the sim's
object state from the image tokens a pi05 feeds its LM, so a vision tower trained from scratch learns where the
objects are. The head (`PoseReadout`) pools the tokens with one softmax attention per output value; it is never
saved in the checkpoint: the policy that is saved, loaded and deployed sees pixels only. Real sim renders, real
training, real checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from critic_trainer.cli import main
from critic_trainer.demos import collect_demos
from critic_trainer.sft import (
    PoseReadout,
    SFTConfig,
    build_policy_for,
    encode_inputs,
    load_demo_data,
    pose_pretrain,
    pose_readout_error,
    pose_targets,
    train_sft,
)
from qvgm.policy import load_policy

torch.set_num_threads(1)  # 2 shared CPU cores


def test_pose_readout_learns_where_a_token_is_and_ignores_masked_ones() -> None:
    """Tokens = a fixed per-position code + a marker on one token; the target is that token's position. The
    attention pool has to find the marked token and read its position code, as the real head reads an object's."""
    torch.manual_seed(0)  # the head's init
    g = torch.Generator().manual_seed(0)
    t, width, b = 16, 32, 64
    pos_code = torch.randn(t, width, generator=g)
    marker = torch.randn(width, generator=g) * 3
    head = PoseReadout(width, 1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, t, (b,), generator=g)
        x = pos_code.expand(b, t, width).clone()
        x[torch.arange(b), idx] += marker
        return x, (idx.float() / (t - 1) * 2 - 1)[:, None]

    valid = torch.ones(b, t, dtype=torch.bool)
    x, y = batch()
    with torch.no_grad():
        before = float(((head(x, valid) - y) ** 2).mean())
    for _ in range(300):
        x, y = batch()
        loss = ((head(x, valid) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = batch()
    with torch.no_grad():
        after = float(((head(x, valid) - y) ** 2).mean())
    assert after < 0.01 < 0.1 < before and after < 0.03 * float(y.var())  # located, not the mean guess
    # masked tokens (a missing camera) do not change the output, whatever they hold
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[:, t // 2:] = False
    x2 = x.clone()
    x2[:, t // 2:] = torch.randn(b, t - t // 2, width, generator=g) * 10
    torch.testing.assert_close(head(x, valid), head(x2, valid))


def test_sft_with_pose_aux_trains_the_vision_and_saves_a_pixels_only_policy(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = tmp_path / "cam"
    collect_demos("pick_place", 2, ds, noise=0.005, seed=0, image_size=(32, 32))
    data = load_demo_data([ds], horizon=10, with_images=True)
    assert data.privileged is not None
    common = dict(datasets=[str(ds)], config="pi05-tiny", steps=60, seed=3, batch_size=8, checkpoint_every=30,
                  warmup=5, lr=1e-3, log_every=1, overrides={"delta_actions": True})
    aux = train_sft(SFTConfig(out=str(tmp_path / "aux"), pose_aux=1.0, **common), data=data, progress=False)
    plain = train_sft(SFTConfig(out=str(tmp_path / "plain"), **common), data=data, progress=False)
    assert aux["manifest"]["summary"]["pose_aux"] == 1.0 and "pose_aux" not in plain["manifest"]["summary"]
    # the auxiliary gradient reached the vision tower
    a, p = aux["policy"].state_dict(), plain["policy"].state_dict()
    vision = [k for k in a if "vision_tower" in k]
    assert vision and any(not torch.equal(a[k], p[k]) for k in vision)
    # pose_datasets: frames of other scenes feed the readout (not the action loss) and change what is learnt
    extra = tmp_path / "extra"
    collect_demos("pick_place", 1, extra, noise=0.005, seed=600_000, image_size=(32, 32))
    more = train_sft(SFTConfig(out=str(tmp_path / "more"), pose_aux=1.0, pose_datasets=[str(extra)], **common),
                     data=data, progress=False)
    m = more["policy"].state_dict()
    assert any(not torch.equal(m[k], a[k]) for k in vision)
    assert more["manifest"]["summary"]["data_sha256"] != aux["manifest"]["summary"]["data_sha256"]
    # pose_probe: the readout learns from detached tokens (here with the extra scenes too), so the policy is
    # exactly the plain run's, and the readout still learns (it measures what plain SFT's image tokens hold)
    probe = train_sft(SFTConfig(out=str(tmp_path / "probe"), pose_aux=1.0, pose_probe=True,
                                pose_datasets=[str(extra)], **common), data=data, progress=False)
    q = probe["policy"].state_dict()
    assert all(torch.equal(q[k], p[k]) for k in p)
    assert probe["manifest"]["summary"]["pose_probe"] is True
    probe_rows = [json.loads(line) for line in (tmp_path / "probe.work" / "scalars.jsonl").read_text().splitlines()]
    probe_pose = [r["pose_loss"] for r in probe_rows if "pose_loss" in r]
    assert np.mean(probe_pose[-10:]) < np.mean(probe_pose[:10])
    # the pose loss is logged next to the flow loss and falls; the trained head beats predicting the mean
    rows = [json.loads(line) for line in (tmp_path / "aux.work" / "scalars.jsonl").read_text().splitlines()]
    pose = [r["pose_loss"] for r in rows if "pose_loss" in r]
    assert len(pose) == 60 and np.mean(pose[-10:]) < 0.3 * np.mean(pose[:10])
    targets = np.clip(2 * (data.privileged - aux["pose_quantiles"][0])
                      / np.maximum(aux["pose_quantiles"][1] - aux["pose_quantiles"][0], 1e-8) - 1, -1, 1)
    err = pose_readout_error(aux["policy"], aux["pose_readout"], data, aux["pose_quantiles"])
    assert err < 0.3 * float(targets.var(axis=0).mean())  # measured: 0.05 vs 0.58
    # the checkpoint holds the same tensors as a plain SFT's: no readout, no hook; it loads and acts on pixels
    keys = {}
    for name in ("aux", "plain"):
        with safe_open(str(tmp_path / name / "model.safetensors"), "pt") as f:
            keys[name] = set(f.keys())
    assert keys["aux"] == keys["plain"]
    pol = load_policy(tmp_path / "aux")
    obs = data.observations([0, 5])
    for o in obs:
        o.pop("privileged", None)  # deployed: no object state
    assert pol.act(obs).shape == (2, 10, 7)
    # interrupted + resumed ends bit-identical (the readout and its Adam moments are in the training state)
    cfg = SFTConfig(out=str(tmp_path / "resumed"), pose_aux=1.0, **common)
    assert train_sft(cfg, data=data, stop_after=30, progress=False)["manifest"] is None
    with pytest.raises(ValueError, match="pose_aux"):  # resuming with another weight is refused
        train_sft(SFTConfig(out=str(tmp_path / "resumed"), work_dir=str(cfg.work), pose_aux=0.5, **common),
                  data=data, resume=True, progress=False)
    resumed = train_sft(cfg, data=data, resume=True, progress=False)
    r = resumed["policy"].state_dict()
    assert all(torch.equal(r[k], a[k]) for k in a)
    ro, ra = resumed["pose_readout"].state_dict(), aux["pose_readout"].state_dict()
    assert all(torch.equal(ro[k], ra[k]) for k in ra)
    # the CLI flag
    assert main(["sft", "--dataset", str(ds), "--config", "pi05-tiny", "--out", str(tmp_path / "cli"), "--steps",
                 "3", "--batch-size", "4", "--no-progress", "--threads", "1", "--pose-aux", "0.5"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 3
    assert json.loads((tmp_path / "cli" / "manifest.json").read_text())["summary"]["pose_aux"] == 0.5


def test_pose_aux_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pose_aux"):
        SFTConfig(datasets=["x"], pose_aux=-1.0)
    with pytest.raises(ValueError, match="pose_aux"):
        SFTConfig(datasets=["x"], pose_aux=float("nan"))
    with pytest.raises(ValueError, match="pose_aux > 0"):
        SFTConfig(datasets=["x"], pose_probe=True)
    with pytest.raises(ValueError, match="pose_aux > 0"):
        SFTConfig(datasets=["x"], pose_datasets=["y"])
    assert "pose_aux" not in SFTConfig(datasets=["x"]).training_key()  # old training states still resume
    ds = tmp_path / "cam"
    collect_demos("push", 1, ds, noise=0.005, seed=0, image_size=(32, 32))
    data = load_demo_data([ds], horizon=10, with_images=True)
    with pytest.raises(ValueError, match="pi05 backbone"):  # the state backbone has no image tokens
        train_sft(SFTConfig(datasets=[str(ds)], config="state", out=str(tmp_path / "s"), steps=2, pose_aux=1.0),
                  data=load_demo_data([ds], horizon=10, with_images=False), progress=False)
    no_priv = type(data)(**{**data.__dict__, "privileged": None})
    with pytest.raises(ValueError, match="privileged"):
        train_sft(SFTConfig(datasets=[str(ds)], config="pi05-tiny", out=str(tmp_path / "p"), steps=2, pose_aux=1.0),
                  data=no_priv, progress=False)
    front_only = tmp_path / "front_only"  # extra scenes must be seen by the same cameras
    collect_demos("push", 1, front_only, noise=0.005, seed=600_000, image_size=(32, 32), cameras=("front",))
    with pytest.raises(ValueError, match="cameras"):
        train_sft(SFTConfig(datasets=[str(ds)], config="pi05-tiny", out=str(tmp_path / "c"), steps=2, pose_aux=1.0,
                            pose_datasets=[str(front_only)]), data=data, progress=False)
    assert not any((tmp_path / n).exists() for n in ("s", "p", "c"))


def test_pose_pretraining_trains_only_the_vision_and_resumes(tmp_path: Path) -> None:
    ds = tmp_path / "cam"
    collect_demos("pick_place", 2, ds, noise=0.005, seed=0, image_size=(32, 32))
    data = load_demo_data([ds], horizon=10, with_images=True)
    cfg = SFTConfig(datasets=[str(ds)], config="pi05-tiny", out=str(tmp_path / "pre"), steps=20, seed=1,
                    batch_size=8, checkpoint_every=10, warmup=2, lr=1e-3, pose_aux=1.0, pose_pretrain_steps=60,
                    overrides={"delta_actions": True})
    torch.manual_seed(0)
    policy = build_policy_for(data, cfg)
    inputs = encode_inputs(policy, data)
    targets, quantiles = pose_targets(data)
    readout = PoseReadout(policy.model.paligemma.model.multi_modal_projector.linear.out_features, targets.shape[1])
    before_w = {k: v.clone() for k, v in policy.state_dict().items()}
    before = pose_readout_error(policy, readout, data, quantiles)
    pose_pretrain(policy, readout, [(inputs, targets)], cfg)
    after = pose_readout_error(policy, readout, data, quantiles)
    assert after < 0.5 * before
    changed = {k for k, v in policy.state_dict().items() if not torch.equal(v, before_w[k])}
    assert changed and all("vision_tower" in k or "multi_modal_projector" in k for k in changed)
    # inside SFT: logged as its own stage, recorded in the summary; a resume after it ends bit-identical
    full = train_sft(cfg, data=data, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "pre.work" / "scalars.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["stage"] == "pose_pretrain"][-1] == 60
    summary = full["manifest"]["summary"]
    assert summary["pose_pretrain_steps"] == 60 and summary["pose_pretrain_final_loss"] > 0
    part = SFTConfig(**{**cfg.__dict__, "out": str(tmp_path / "part")})
    assert train_sft(part, data=data, stop_after=10, progress=False)["manifest"] is None
    resumed = train_sft(part, data=data, resume=True, progress=False)
    a, r = full["policy"].state_dict(), resumed["policy"].state_dict()
    assert all(torch.equal(a[k], r[k]) for k in a)
    with pytest.raises(ValueError, match="pose_probe"):
        SFTConfig(datasets=["x"], pose_aux=1.0, pose_probe=True, pose_pretrain_steps=5)
    with pytest.raises(ValueError, match=">= 0"):
        SFTConfig(datasets=["x"], pose_aux=1.0, pose_pretrain_steps=-1)


def test_prefix_readout_on_positions_reads_the_prompt_aware_prefix(tmp_path: Path) -> None:
    """pose_readout="prefix": the head reads the LM's final prefix embeddings (images + prompt), so the gradient of
    "where is the object the prompt names" reaches the LM too; pose_values="xyz" keeps the positions only."""
    ds = tmp_path / "cam"
    collect_demos("pick_place", 2, ds, noise=0.005, seed=0, image_size=(32, 32))
    extra = tmp_path / "extra"
    collect_demos("pick_place", 1, extra, noise=0.005, seed=600_000, image_size=(32, 32))
    data = load_demo_data([ds], horizon=10, with_images=True)
    common = dict(datasets=[str(ds)], config="pi05-tiny", steps=40, seed=2, batch_size=8, checkpoint_every=20,
                  warmup=4, lr=1e-3, log_every=1, pose_aux=1.0, overrides={"delta_actions": True})
    image = train_sft(SFTConfig(out=str(tmp_path / "image"), pose_values="xyz", **common), data=data, progress=False)
    prefix = train_sft(SFTConfig(out=str(tmp_path / "prefix"), pose_values="xyz", pose_readout="prefix",
                                 pose_datasets=[str(extra)], **common), data=data, progress=False)
    assert prefix["pose_readout"].out.out_features == 9  # 3 roles x xyz
    a, b = image["policy"].state_dict(), prefix["policy"].state_dict()
    lm = [k for k in a if "language_model" in k and "embed" not in k]
    assert any(not torch.equal(a[k], b[k]) for k in lm)
    rows = [json.loads(line) for line in (tmp_path / "prefix.work" / "scalars.jsonl").read_text().splitlines()]
    pose = [r["pose_loss"] for r in rows if "pose_loss" in r]
    assert np.mean(pose[-8:]) < 0.7 * np.mean(pose[:8])
    err = pose_readout_error(prefix["policy"], prefix["pose_readout"], data, prefix["pose_quantiles"],
                             where="prefix", values="xyz")
    assert np.isfinite(err) and err < 1.0
    # resumes bit-identically, and the saved policy is a plain one
    cfg = SFTConfig(out=str(tmp_path / "resumed"), pose_values="xyz", pose_readout="prefix",
                    pose_datasets=[str(extra)], **common)
    assert train_sft(cfg, data=data, stop_after=20, progress=False)["manifest"] is None
    r = train_sft(cfg, data=data, resume=True, progress=False)["policy"].state_dict()
    assert all(torch.equal(r[k], b[k]) for k in b)
    assert load_policy(tmp_path / "prefix").act(data.observations([0])).shape == (1, 10, 7)
    with pytest.raises(ValueError, match="image\\|prefix"):
        SFTConfig(datasets=["x"], pose_aux=1.0, pose_readout="lm")
    with pytest.raises(ValueError, match="vision only"):
        SFTConfig(datasets=["x"], pose_aux=1.0, pose_readout="prefix", pose_pretrain_steps=10)
