"""SFT camera dropout (`SFTConfig.camera_dropout`, `critic_trainer sft --camera-dropout`): the masking itself (each
present camera masked with probability p, never all of a sample's, reproducible from the generator), and a pi05-tiny
SFT on real rendered sim demos that uses it, records it in the checkpoint summary and the training key, and whose
checkpoint acts with a camera missing. Real sim, real training, real checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from critic_trainer.cli import main
from critic_trainer.demos import collect_demos
from critic_trainer.sft import SFTConfig, drop_cameras, load_demo_data, train_sft
from qvgm.policy import load_policy

torch.set_num_threads(1)  # 2 shared CPU cores


def test_drop_cameras_masks_at_rate_and_never_every_camera() -> None:
    masks = torch.ones(4000, 2, dtype=torch.bool)
    masks[:1000, 1] = False  # these samples have one camera only: it is never dropped
    out = drop_cameras(masks, 0.5, torch.Generator().manual_seed(0))
    assert out.shape == masks.shape and out.dtype == torch.bool
    assert not (out & ~masks).any()  # an absent camera stays absent
    assert out.any(dim=1).all()  # every sample keeps a camera
    assert out[:1000, 0].all()
    both = out[1000:]
    # two cameras at p = 0.5: one kept alone 1/4 + 1/4 of the time, both kept 1/4 + 1/4 (all-dropped -> unchanged)
    assert both.all(dim=1).float().mean().item() == pytest.approx(0.5, abs=0.04)
    assert (both[:, 0] & ~both[:, 1]).float().mean().item() == pytest.approx(0.25, abs=0.04)
    assert torch.equal(drop_cameras(masks, 0.5, torch.Generator().manual_seed(0)), out)
    assert not torch.equal(drop_cameras(masks, 0.5, torch.Generator().manual_seed(1)), out)
    assert drop_cameras(masks, 0.0, torch.Generator()) is masks
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="camera_dropout"):
            SFTConfig(datasets=["x"], camera_dropout=bad)


def test_sft_with_camera_dropout_trains_records_and_acts_without_a_camera(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = tmp_path / "cam"
    collect_demos("push", 2, ds, noise=0.005, seed=0, image_size=(32, 32))
    data = load_demo_data([ds], horizon=10, with_images=True)
    assert len(data.images) == 2
    common = dict(datasets=[str(ds)], config="pi05-tiny", steps=6, seed=3, batch_size=4, checkpoint_every=6,
                  warmup=2, overrides={"delta_actions": True})
    dropped = train_sft(SFTConfig(out=str(tmp_path / "drop"), camera_dropout=0.5, **common), data=data,
                        progress=False)
    plain = train_sft(SFTConfig(out=str(tmp_path / "plain"), **common), data=data, progress=False)
    assert dropped["manifest"]["summary"]["camera_dropout"] == 0.5
    assert "camera_dropout" not in plain["manifest"]["summary"]
    a, b = dropped["policy"].state_dict(), plain["policy"].state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the masking changed what was trained on
    assert "camera_dropout" not in SFTConfig(**common).training_key()  # older training states still resume
    assert SFTConfig(camera_dropout=0.5, **common).training_key()["camera_dropout"] == 0.5
    # the CLI flag; the checkpoint acts with both cameras and with the wrist camera missing
    assert main(["sft", "--dataset", str(ds), "--config", "pi05-tiny", "--out", str(tmp_path / "cli"), "--steps",
                 "3", "--batch-size", "4", "--no-progress", "--threads", "1", "--camera-dropout", "0.3"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 3
    pol = load_policy(tmp_path / "cli")
    assert json.loads((tmp_path / "cli" / "manifest.json").read_text())["summary"]["camera_dropout"] == 0.3
    obs = data.observations([0, 3])
    assert pol.act(obs).shape == (2, 10, 7)
    front_only = [{**o, "images": {c: v for c, v in o["images"].items() if c != "wrist"}} for o in obs]
    assert torch.isfinite(torch.as_tensor(pol.act(front_only))).all()
