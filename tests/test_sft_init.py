"""SFT from a checkpoint (`SFTConfig.init`, `critic_trainer sft --init`): a base pi05-tiny SFT'd on push demos,
built with the pick_place prompt words in its vocabulary (`SFTConfig.vocabulary`), is fine-tuned on pick_place
demos. The fine-tune starts from the base's weights (not fresh ones), keeps its tokenizer, names it as parent, takes
its norm stats from the new data (the base never closed the gripper) and learns the new data; data or settings that
do not fit the base, and a corrupt base, are refused with a message that names the problem. Real sim demos, real
training, real checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from critic_trainer.cli import main
from critic_trainer.demos import collect_demos
from critic_trainer.sft import SFTConfig, build_policy_for, heldout_flow_loss, load_demo_data, train_sft
from qvgm.policy import load_policy
from qvgm.policy.checkpoint_io import CheckpointError

torch.set_num_threads(1)  # 2 shared CPU cores
PICK_WORDS = "pick up the cube and put it in the bowl"
COMMON = dict(config="pi05-tiny", batch_size=4, checkpoint_every=1000, warmup=2, overrides={"delta_actions": True})


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("init")
    collect_demos("push", 2, root / "push", noise=0.005, seed=0, image_size=(32, 32))
    collect_demos("pick_place", 2, root / "pick", noise=0.005, seed=10, image_size=(32, 32))
    train_sft(SFTConfig(datasets=[str(root / "push")], out=str(root / "base"), steps=4, seed=0,
                        vocabulary=[PICK_WORDS], version="base-push", **COMMON), progress=False)
    train_sft(SFTConfig(datasets=[str(root / "push")], out=str(root / "base_novocab"), steps=1, seed=0, **COMMON),
              progress=False)
    return {"root": root, "push": root / "push", "pick": root / "pick", "base": root / "base",
            "base_novocab": root / "base_novocab"}


def test_fine_tune_starts_from_the_base_keeps_its_tokenizer_and_takes_the_datas_norm_stats(
        base: dict[str, Path]) -> None:
    pick = load_demo_data([base["pick"]], horizon=10, with_images=True)
    b = load_policy(base["base"])
    # one step at a vanishing learning rate: the weights are still the base's, far from a fresh init of this seed
    res = train_sft(SFTConfig(datasets=[str(base["pick"])], out=str(base["root"] / "ft0"), steps=1, seed=5, lr=1e-12,
                              init=str(base["base"]), **COMMON), data=pick, progress=False)
    ft = load_policy(base["root"] / "ft0")
    bw, fw = b.state_dict(), ft.state_dict()
    assert set(bw) == set(fw)
    assert max((fw[k].float() - bw[k].float()).abs().max().item() for k in bw) < 1e-6
    torch.manual_seed(5)
    fresh = build_policy_for(pick, SFTConfig(datasets=[str(base["pick"])], seed=5, **COMMON)).state_dict()
    same = [k for k in bw if k in fresh and fresh[k].shape == bw[k].shape]  # (the vocabularies differ)
    assert len(same) > 0.9 * len(bw)
    assert max((fresh[k].float() - bw[k].float()).abs().max().item() for k in same) > 1e-2
    # the tokenizer travels with the weights; the norm stats are the pick_place data's (push never closes the
    # gripper: with the base's stats its action range is ~0 and the pick_place actions would normalise to ~1e8)
    assert ft.processor.tokenizer.get_vocab() == b.processor.tokenizer.get_vocab()
    assert "bowl" in b.processor.tokenizer.get_vocab()  # SFTConfig.vocabulary reached the fresh tokenizer
    own = build_policy_for(pick, SFTConfig(datasets=[str(base["pick"])], **COMMON)).processor.norm_stats
    for name in ("state_q01", "state_q99", "action_q01", "action_q99"):
        np.testing.assert_allclose(getattr(ft.processor.norm_stats, name), getattr(own, name), rtol=1e-6)
    bs = b.processor.norm_stats
    assert bs.action_q99[-1] - bs.action_q01[-1] < 1e-3 < 1e-2 < own.action_q99[-1] - own.action_q01[-1]  # gripper
    m = res["manifest"]
    assert m["parent"] == "base-push" and m["summary"]["init_version"] == "base-push"
    assert m["summary"]["init"] == str(base["base"])
    # and it learns: 30 steps at a real learning rate lower the flow loss on the pick_place frames
    ft30 = train_sft(SFTConfig(datasets=[str(base["pick"])], out=str(base["root"] / "ft30"), steps=30, seed=5,
                               lr=1e-3, init=str(base["base"]), **COMMON), data=pick, progress=False)["policy"]
    before = heldout_flow_loss(load_policy(base["root"] / "ft0"), pick, seed=0)  # base weights, pick's stats
    after = heldout_flow_loss(ft30, pick, seed=0)
    assert after < 0.8 * before, (before, after)


def test_what_does_not_fit_the_base_is_refused(base: dict[str, Path]) -> None:
    pick = load_demo_data([base["pick"]], horizon=10, with_images=True)

    def ft(name: str, data=pick, **kw) -> None:
        cfg = {**COMMON, **kw}
        train_sft(SFTConfig(datasets=[str(base["pick"])], out=str(base["root"] / name), steps=1, **cfg), data=data,
                  progress=False)

    with pytest.raises(ValueError, match=r"does not know the prompt words \[.*'bowl'.*\]"):
        ft("x1", init=str(base["base_novocab"]))
    with pytest.raises(ValueError, match="its delta_actions is True, not False"):
        ft("x2", init=str(base["base"]), overrides={"delta_actions": False})
    with pytest.raises(ValueError, match="brings its own"):
        ft("x3", init=str(base["base"]), vocabulary=["more words"])
    with pytest.raises(ValueError, match="is a pi05 policy"):
        ft("x4", init=str(base["base"]), config="state", overrides={})
    front = base["root"] / "pick_front"
    collect_demos("pick_place", 1, front, noise=0.005, seed=10, image_size=(32, 32), cameras=("front",))
    with pytest.raises(ValueError, match=r"does not fit the data: cameras \['front', 'wrist'\], the data \['front'\]"):
        ft("x5", data=load_demo_data([front], horizon=10, with_images=True), init=str(base["base"]))
    bad = base["root"] / "corrupt"
    shutil.copytree(base["base"], bad)
    raw = bytearray((bad / "model.safetensors").read_bytes())
    raw[-8] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256"):
        ft("x6", init=str(bad))
    assert not any((base["root"] / f"x{i}").exists() for i in range(1, 7))  # nothing written for a refused run


def test_cli_init_takes_the_config_from_the_base_and_keys_resume_by_its_weights(
        base: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ck"
    assert main(["sft", "--dataset", str(base["pick"]), "--init", str(base["base"]), "--out", str(out), "--steps", "2",
                 "--batch-size", "4", "--no-progress", "--threads", "1", "--delta-actions"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    m = json.loads((out / "manifest.json").read_text())
    assert m["parent"] == "base-push" and m["summary"]["config"] == "pi05-tiny"
    sha = json.loads((base["base"] / "manifest.json").read_text())["files"]["model.safetensors"]
    key = SFTConfig(datasets=["d"], init=str(base["base"]), **COMMON).training_key()
    assert key["init"] == sha  # a resume refuses another base, wherever it lies
    assert "init" not in SFTConfig(datasets=["d"], **COMMON).training_key()  # older training states still resume
    assert "vocabulary" not in SFTConfig(datasets=["d"], **COMMON).training_key()
