"""`critic_trainer demos`: real sim rollouts of the noisy expert written as a replay-buffer dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from critic_trainer.cli import main
from critic_trainer.demos import load_privileged
from qvgm.data import ReplayReader


def test_demos_cli_writes_a_valid_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "push"
    rc = main(["demos", "--task", "push", "--episodes", "2", "--noise", "0.005", "--seed", "7", "--out", str(out),
               "--image-size", "32", "48"])
    assert rc == 0
    assert '"successes"' in capsys.readouterr().out
    r = ReplayReader(out)
    try:
        assert r.fps == 10 and len(r.episodes) == 2
        assert sorted(r.video_keys) == ["observation.images.front", "observation.images.wrist"]
        for row in r.episodes:
            assert row["label_source"] == "auto" and isinstance(row["success"], bool)
            assert row["policy_versions"] == ["expert"]
            s, e = int(r.ep_start[row["episode_index"]]), int(r.ep_end[row["episode_index"]])
            # reward / done follow the sim: done (and reward 1) only on the last frame of a successful episode
            assert r.done[s:e - 1].sum() == 0 and bool(r.done[e - 1]) == row["success"]
            assert float(r.reward[s:e].sum()) == float(row["success"])
        assert set(r.policy_version) == {"expert"}
        assert r.tasks and all("cube" in t for t in r.tasks)
        obs = r.observation(3)
        assert obs["images"]["front"].shape == (32, 48, 3) and obs["images"]["wrist"].dtype == np.uint8
        assert obs["images"]["front"].std() > 5  # a rendered scene, not a blank frame
        assert obs["state"].shape == (7,) and np.isfinite(r.action).all()
        priv = load_privileged(r)
        assert priv is not None and priv.shape == (r.num_frames, 21)  # 3 roles x (xyz + quat)
        # the target cube starts on the table (z = cube half size) in every episode
        assert np.allclose(priv[r.ep_start, 2], 0.02, atol=2e-3)
        # executed actions move the arm
        assert np.abs(np.diff(r.state[: r.ep_end[0]], axis=0)).sum() > 0.05
    finally:
        r.close()
    # same seed -> the same scenes and actions (reproducible demos)
    out2 = tmp_path / "push2"
    assert main(["demos", "--task", "push", "--episodes", "1", "--noise", "0.005", "--seed", "7", "--out", str(out2),
                 "--no-render"]) == 0
    r2 = ReplayReader(out2)
    n = int(r2.ep_end[0])
    assert np.array_equal(r2.action[:n], ReplayReader(out, decode_images=False).action[:n])
    assert r2.video_keys == []


def test_demos_cli_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demos", "--task", "juggle", "--episodes", "1", "--out", str(tmp_path / "x")]) == 2
    assert "unknown task 'juggle'" in capsys.readouterr().err
    assert main(["demos", "--task", "push", "--episodes", "1", "--out", str(tmp_path / "y"),
                 "--image-size", "31", "32"]) == 2
    assert "even" in capsys.readouterr().err
    assert not (tmp_path / "y").exists() or not any((tmp_path / "y").iterdir())
    out = tmp_path / "z"
    assert main(["demos", "--task", "stack", "--episodes", "1", "--out", str(out), "--no-render"]) == 0
    assert main(["demos", "--task", "stack", "--episodes", "1", "--out", str(out), "--no-render"]) == 2
    assert "already holds a dataset" in capsys.readouterr().err
    assert main(["demos", "--task", "stack", "--episodes", "1", "--seed", "5", "--out", str(out), "--no-render",
                 "--append"]) == 0
    assert len(ReplayReader(out, decode_images=False).episodes) == 2


def test_demos_cli_takes_cameras_from_a_profile(tmp_path: Path) -> None:
    prof = tmp_path / "profile.yaml"
    prof.write_text("cameras: [front, wrist]\nnodes:\n  sim_node:\n    parameters:\n      cameras: [wrist]\n"
                    "      image_width: 40\n      image_height: 24\n      control_hz: 10.0\n")
    out = tmp_path / "d"
    assert main(["demos", "--task", "push", "--episodes", "1", "--out", str(out), "--profile", str(prof)]) == 0
    r = ReplayReader(out)
    assert r.video_keys == ["observation.images.wrist"] and r.fps == 10
    assert r.observation(0)["images"]["wrist"].shape == (24, 40, 3)


def test_demos_cli_fixed_colors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--colors fixed records the no-grounding variant: one prompt for every episode, the random variant's layouts."""
    out = tmp_path / "fixed"
    assert main(["demos", "--task", "pick_place", "--episodes", "3", "--seed", "4", "--out", str(out), "--no-render",
                 "--colors", "fixed"]) == 0
    assert '"colors": "fixed"' in capsys.readouterr().out
    r = ReplayReader(out, decode_images=False)
    assert r.tasks == ["pick up the red cube and put it in the bowl"]
    rand = tmp_path / "random"
    assert main(["demos", "--task", "pick_place", "--episodes", "3", "--seed", "4", "--out", str(rand),
                 "--no-render"]) == 0
    assert np.array_equal(load_privileged(r), load_privileged(ReplayReader(rand, decode_images=False)))
    with pytest.raises(SystemExit):  # argparse: invalid choice, named in the message
        main(["demos", "--task", "pick_place", "--episodes", "1", "--out", str(tmp_path / "x"), "--colors", "sepia"])
    assert "invalid choice: 'sepia'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_recovery_demos_start_where_the_policy_left_the_arm(tmp_path: Path) -> None:
    """collect_demos(lead_policy=...): the policy runs 1..K chunks unrecorded, then a fresh expert takes over from
    that arm pose; only the expert's part is recorded (a `state` policy, untrained: it moves the arm somewhere)."""
    import torch

    from critic_trainer.demos import collect_demos
    from critic_trainer.sft import SFTConfig, build_policy_for, load_demo_data

    base = tmp_path / "base"
    collect_demos("pick_place", 2, base, seed=0, render=False)
    data = load_demo_data([base], 10, with_images=False)
    torch.manual_seed(0)
    policy = build_policy_for(data, SFTConfig(datasets=[str(base)], config="state")).eval()
    rec = tmp_path / "rec"
    summary = collect_demos("pick_place", 3, rec, seed=700, render=False, lead_policy=policy, lead_chunks=3)
    r = ReplayReader(rec, decode_images=False)
    plain = ReplayReader(base, decode_images=False)
    assert summary["episodes"] == 3 and len(r.episodes) + summary.get("skipped", 0) == 3 and len(r.episodes) >= 1
    for row in r.episodes:
        s = int(r.ep_start[row["episode_index"]])
        assert r.stamp[s] > 0  # the recording starts after the policy's chunks (sim time > 0)
        assert set(r.policy_version) == {"expert"}
    # the first recorded state is not a reset pose: the policy moved the arm away from home first
    assert np.abs(r.state[int(r.ep_start[0])] - plain.state[0]).max() > 1e-3
    # reproducible: same seeds, same policy -> same recovery demos
    rec2 = tmp_path / "rec2"
    collect_demos("pick_place", 3, rec2, seed=700, render=False, lead_policy=policy, lead_chunks=3)
    assert np.array_equal(ReplayReader(rec2, decode_images=False).action, r.action)
