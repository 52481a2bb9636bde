"""SFT random-shift image augmentation (`SFTConfig.image_shift`, `critic_trainer sft --image-shift`): the shift
itself (every output is an edge-repeated translation of its input by at most `pad` px, drawn reproducibly from the
generator), and a pi05-tiny SFT on real rendered sim demos that uses it, saves it in the checkpoint summary and
resumes bit-identically. Real sim, real training, real checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from critic_trainer.cli import main
from critic_trainer.demos import collect_demos
from critic_trainer.sft import SFTConfig, load_demo_data, random_shift, train_sft
from qvgm.policy import load_policy

torch.set_num_threads(1)  # 2 shared CPU cores


def _translations(img: torch.Tensor, pad: int) -> list[torch.Tensor]:
    """Every edge-repeated translation of one [C, S, S] image by (dy, dx) in [-pad, pad]^2 (reference, slow)."""
    s = img.shape[-1]
    out = []
    for dy in range(-pad, pad + 1):
        for dx in range(-pad, pad + 1):
            r = (torch.arange(s) + dy).clamp(0, s - 1)
            c = (torch.arange(s) + dx).clamp(0, s - 1)
            out.append(img[:, r][:, :, c])
    return out


def test_random_shift_is_an_edge_repeated_translation() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 3, 12, 12) * 2 - 1  # [B, n_cam, C, S, S]
    x[1, 1] = -1.0  # a masked camera: constant
    y, moves = random_shift(x, 2, g)
    assert y.shape == x.shape and y.dtype == x.dtype and moves.shape == (3, 2, 2)
    assert torch.equal(y[1, 1], x[1, 1])  # constant stays constant
    shifted = 0
    for b in range(3):
        for c in range(2):
            refs = _translations(x[b, c], 2)
            match = [i for i, r in enumerate(refs) if torch.equal(r, y[b, c])]
            assert match, f"image {b},{c} is not a translation by <= 2 px"
            # the reported move: reference i shows the input at (+dy, +dx), i.e. its content moved by (-dx, -dy)
            if len(match) == 1:  # (the constant image matches every translation)
                assert (-(match[0] % 5 - 2), -(match[0] // 5 - 2)) == tuple(moves[b, c].tolist())
            shifted += 12 not in match  # index 12 of 25 = (0, 0)
    assert shifted >= 3  # 6 images, each unshifted with probability 1/25
    # a bright pixel lands where the move says (away from the edges)
    dot = torch.full((1, 1, 12, 12), -1.0)
    dot[0, 0, 5, 6] = 1.0
    for seed in range(5):
        moved, (dx, dy) = (t[0] for t in random_shift(dot, 2, torch.Generator().manual_seed(seed)))
        assert moved[0, 5 + dy, 6 + dx] == 1.0 and moved.sum() == dot.sum()
    # reproducible from the generator, identity at pad 0, and larger pads reach further
    assert torch.equal(random_shift(x, 2, torch.Generator().manual_seed(0))[0], y)
    assert not torch.equal(random_shift(x, 2, torch.Generator().manual_seed(1))[0], y)
    same, none = random_shift(x, 0, g)
    assert same is x and not none.any() and none.shape == (3, 2, 2)
    big, _ = random_shift(x[:1, :1].expand(64, 1, 3, 12, 12).contiguous(), 4, torch.Generator().manual_seed(2))
    refs4 = _translations(x[0, 0], 4)
    far = {next(i for i, r in enumerate(refs4) if torch.equal(r, im[0])) for im in big}
    assert any(abs(i // 9 - 4) > 2 or abs(i % 9 - 4) > 2 for i in far)
    with pytest.raises(ValueError, match="image_shift"):
        SFTConfig(datasets=["x"], image_shift=-1)


def test_sft_with_image_shift_trains_saves_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = tmp_path / "cam"
    collect_demos("push", 2, ds, noise=0.005, seed=0, image_size=(32, 32))
    data = load_demo_data([ds], horizon=10, with_images=True)
    common = dict(datasets=[str(ds)], config="pi05-tiny", steps=8, seed=3, batch_size=4, checkpoint_every=4,
                  warmup=2, overrides={"delta_actions": True})
    shifted = train_sft(SFTConfig(out=str(tmp_path / "shift"), image_shift=2, **common), data=data, progress=False)
    plain = train_sft(SFTConfig(out=str(tmp_path / "plain"), **common), data=data, progress=False)
    assert shifted["manifest"]["summary"]["image_shift"] == 2
    assert plain["manifest"]["summary"]["image_shift"] == 0
    a, b = shifted["policy"].state_dict(), plain["policy"].state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the augmentation changed what was trained on
    # the training key: unchanged for runs without it (old training states resume), part of it otherwise
    assert "image_shift" not in SFTConfig(**common).training_key()
    assert SFTConfig(image_shift=2, **common).training_key()["image_shift"] == 2
    # interrupted + resumed ends bit-identical (the shifts come from the saved generator state)
    cfg = SFTConfig(out=str(tmp_path / "resumed"), image_shift=2, **common)
    assert train_sft(cfg, data=data, stop_after=4, progress=False)["manifest"] is None
    with pytest.raises(ValueError, match="image_shift"):  # resuming with another shift is refused
        train_sft(SFTConfig(out=str(tmp_path / "resumed"), work_dir=str(cfg.work), image_shift=3, **common),
                  data=data, resume=True, progress=False)
    resumed = train_sft(cfg, data=data, resume=True, progress=False)
    r = resumed["policy"].state_dict()
    assert all(torch.equal(r[k], a[k]) for k in a)
    # the CLI flag, and the checkpoint loads and acts
    assert main(["sft", "--dataset", str(ds), "--config", "pi05-tiny", "--out", str(tmp_path / "cli"), "--steps",
                 "3", "--batch-size", "4", "--no-progress", "--threads", "1", "--image-shift", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 3
    pol = load_policy(tmp_path / "cli")
    assert pol.act(data.observations([0, 3])).shape == (2, 10, 7)
