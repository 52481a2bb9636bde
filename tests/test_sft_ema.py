"""SFT weight EMA (`SFTConfig.ema_decay`): the averaging rule, the checkpoint holding the EMA weights, and an
interrupted + resumed EMA run ending bit-identical to an uninterrupted one. Real sim demos, real training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from critic_trainer.demos import collect_demos
from critic_trainer.sft import SFTConfig, WeightEMA, load_demo_data, train_sft
from qvgm.policy import load_policy

torch.set_num_threads(1)  # 2 shared CPU cores


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("sft_ema") / "push"
    collect_demos("push", 3, root, noise=0.005, seed=0, render=False)
    return load_demo_data([root], horizon=10, with_images=False)


def test_weight_ema_rule() -> None:
    lin = torch.nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.fill_(0.0)
        lin.bias.fill_(0.0)
    ema = WeightEMA(lin, decay=0.9)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema.update(lin)  # warm start: d = min(0.9, 1/10) = 0.1 -> 0.1 * 0 + 0.9 * 1
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 0.9))
    for _ in range(200):
        ema.update(lin)
    assert torch.allclose(ema.shadow["weight"], torch.ones(1, 2), atol=1e-6)
    with torch.no_grad():
        lin.weight.fill_(3.0)
    ema.update(lin)  # late: d = 0.9 -> 0.9 * 1 + 0.1 * 3
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 1.2))
    ema.copy_to(lin)
    assert torch.allclose(lin.weight, torch.full((1, 2), 1.2))
    with pytest.raises(ValueError, match="ema_decay"):
        SFTConfig(datasets=["x"], ema_decay=1.0)


def test_ema_checkpoint_and_resume(data, tmp_path: Path) -> None:
    common = dict(datasets=["push"], steps=30, seed=1, batch_size=16, checkpoint_every=10, warmup=5, ema_decay=0.9)
    full = train_sft(SFTConfig(out=str(tmp_path / "full"), **common), data=data, progress=False)
    plain = train_sft(SFTConfig(out=str(tmp_path / "plain"), **{**common, "ema_decay": 0.0}), data=data,
                      progress=False)
    # same seed and data: the EMA run's saved weights are the average, not the last iterate
    a, b = full["policy"].state_dict(), plain["policy"].state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert full["manifest"]["summary"]["ema_decay"] == 0.9
    loaded = load_policy(tmp_path / "full").state_dict()
    assert all(torch.equal(loaded[k], a[k]) for k in a)
    cfg = SFTConfig(out=str(tmp_path / "resumed"), **common)
    assert train_sft(cfg, data=data, stop_after=20, progress=False)["manifest"] is None
    res = train_sft(cfg, data=data, resume=True, progress=False)
    c = res["policy"].state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)
    # the run without EMA keeps the training key of runs saved before the field existed
    assert "ema_decay" not in SFTConfig(datasets=["x"]).training_key()
    assert SFTConfig(datasets=["x"], ema_decay=0.99).training_key()["ema_decay"] == 0.99
