"""bench/keypoint_probe.py on a real (tiny) keypoint checkpoint trained on rendered sim demos: the open-loop keypoint
statistics per camera and the traced closed loop; refusals for a checkpoint without keypoints."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from critic_trainer.demos import collect_demos
from critic_trainer.sft import SFTConfig, load_demo_data, train_sft

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import keypoint_probe  # noqa: E402

torch.set_num_threads(1)


def test_keypoint_probe_open_and_closed_loop(tmp_path: Path) -> None:
    ds = tmp_path / "demos"
    collect_demos("pick_place", 3, ds, noise=0.005, seed=0, image_size=(32, 32), colors="fixed")
    data = load_demo_data([ds], horizon=10, with_images=True)
    common = dict(datasets=[str(ds)], config="pi05-tiny", steps=3, seed=0, batch_size=4, checkpoint_every=3,
                  warmup=1)
    kp_flags = {"keypoint_tokens": 4, "keypoint_per_token": True, "patch_token_dropout": 0.5,
                "keypoint_prompt_queries": 2}
    train_sft(SFTConfig(out=str(tmp_path / "kp"), overrides=kp_flags, **common), data=data, progress=False)
    out = keypoint_probe.main(["--checkpoint", str(tmp_path / "kp"), "--dataset", str(ds), "--colors", "fixed",
                               "--episodes", "1", "--first-scene", "200000", "--out", str(tmp_path / "p.json")])
    assert json.loads((tmp_path / "p.json").read_text()) == out
    assert out["keypoint_tokens"] == 4 and out["keypoint_per_token"] and out["patch_token_dropout"] == 0.5
    assert out["keypoint_prompt_queries"] == 2
    ol = out["open_loop"]
    assert ol["frames"] == len(range(0, len(data), 3))
    for cam in ("front", "wrist"):
        s = ol[cam]
        assert s["coord_std"] > 0 and 0 <= s["max_abs_corr_target_xy"] <= 1
        assert len(s["linear_r2_target_xy"]) == 2 and all(r <= 1 for r in s["linear_r2_target_xy"])
        assert s["token_std_over_frames"] > 0 and s["token_norm"] > 0
        assert len(s["prompt_query_r2_target_xy"]) == 2  # the prompt-asked keypoints alone
    g = ol["front"]["prompt_query_grounding"]  # named cube or the other one, in the front image (and the wrist's)
    assert 0 < g["frames_both_inside"] <= ol["frames"]
    assert 0 <= ol["wrist"]["prompt_query_grounding"]["frames_both_inside"] <= ol["frames"]
    for j in (0, 1):
        q = g[f"query_{j}"]
        assert 0 <= q["nearer_named_cube"] <= 1 and 0 <= q["median_dist_named_cube"] <= 2 * 2 ** 0.5
        assert 0 <= q["median_dist_other_cube"] <= 2 * 2 ** 0.5
    rel = out["keypoint_reliance"]
    assert rel["flow_loss"] > 0 and rel["increase"] == pytest.approx(rel["flow_loss_keypoints_swapped"]
                                                                      - rel["flow_loss"], abs=2e-4)
    cl = out["closed_loop"]
    assert cl["scenes"] == "200000..200000" and len(cl["outcomes"]) == 1 and sum(cl["failure_modes"].values()) == 1
    assert cl["aim"]["episodes"] == 1
    # a checkpoint without keypoints is refused with a message
    train_sft(SFTConfig(out=str(tmp_path / "plain"), **common), data=data, progress=False)
    with pytest.raises(SystemExit, match="no keypoints"):
        keypoint_probe.main(["--checkpoint", str(tmp_path / "plain"), "--dataset", str(ds)])
