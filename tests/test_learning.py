"""bench/learning.py (state tier) at toy sizes: the whole chain runs on real sim episodes, the JSON holds
success rates with Wilson CIs and seeds, and evaluation seeds are disjoint from demo / rollout seeds."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def bench():
    spec = importlib.util.spec_from_file_location("bench_learning", ROOT / "bench" / "learning.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TOY = ["--tasks", "push", "--demos", "1", "--sft-steps", "5", "--max-episode-steps", "10", "--n-exec", "5"]


def test_benchmark_mode_json(tmp_path):
    out = tmp_path / "res.json"
    res = bench().main([*TOY, "--rollouts", "2", "--eval-episodes", "3", "--methods", "sft", "--out", str(out),
                        "--work", str(tmp_path / "w")])
    assert json.loads(out.read_text())["bench"] == "learning"
    s = res["tasks"]["push"]["summary"]["sft"]
    assert s["episodes"] == 3 and 0.0 <= s["success_rate"] <= 1.0 and s["ci95"][0] <= s["success_rate"] <= s["ci95"][1]
    seed = res["tasks"]["push"]["seeds"][0]
    outcomes = seed["methods"]["sft"]["outcomes"]  # per scene, for paired comparisons between methods
    assert len(outcomes) == 3 and sum(outcomes) == round(3 * s["success_rate"])
    evals = set(range(900_000, 900_003))
    assert not evals & set(seed["rollouts"]["seeds"]) and not evals & set(seed["sft"]["demo_seeds"])
    assert seed["rollouts"]["episodes"] == 2 and res["seed_scheme"]["eval"] == "900000 + j"
    # the fixed rollout buffer is a real replay buffer on disk
    tag = bench().sft_tag(res["tasks"]["push"]["sft_settings"])  # the calibrated per-task config flags / EMA
    assert (tmp_path / "w" / f"buffer-sft-push-s0-n1-noise0.01-steps5{tag}-r2" / "meta" / "info.json").exists()
    # a rerun on the same --work reuses the SFT checkpoint and the buffer (same seeds and settings)
    again = bench().main([*TOY, "--rollouts", "2", "--eval-episodes", "3", "--methods", "sft", "--work",
                          str(tmp_path / "w")])
    seed2 = again["tasks"]["push"]["seeds"][0]
    assert seed2["sft"]["reused"] and seed2["rollouts"]["reused"]
    assert again["tasks"]["push"]["summary"]["sft"]["success_rate"] == s["success_rate"]
    assert again["settings"]["noise_scale"] == 1.0 and "@noise" not in seed2["methods"]["sft"]["evaluated"]
    # --noise-scale: the same SFT evaluated from x_1 = S * eps (ScaledNoisePolicy), recorded as such
    det = bench().main([*TOY, "--rollouts", "2", "--eval-episodes", "3", "--methods", "sft", "--noise-scale", "0",
                        "--work", str(tmp_path / "w")])
    assert det["settings"]["noise_scale"] == 0.0 and det["tasks"]["push"]["seeds"][0]["sft"]["reused"]
    assert det["tasks"]["push"]["seeds"][0]["methods"]["sft"]["evaluated"] == \
        seed2["methods"]["sft"]["evaluated"] + "@noise-0"


def test_critic_methods_refuse_a_buffer_without_successes(tmp_path):
    # a 5-step SFT policy with a 10-step time limit never succeeds: the critic has nothing to rank
    with pytest.raises(ValueError, match="no successful episodes"):
        bench().main([*TOY, "--rollouts", "2", "--eval-episodes", "1", "--methods", "qvgm", "--work",
                      str(tmp_path / "w")])


def test_calibrate_mode_uses_tuning_seeds(tmp_path):
    res = bench().main([*TOY, "--calibrate", "--tune-episodes", "2", "--work", str(tmp_path / "w")])
    row = res["rows"][0]
    assert row["demos"] == 1 and row["tuning"]["seeds"] == [200_000, 200_001] and row["tuning"]["episodes"] == 2


def test_critic_cache_key_follows_every_critic_setting(tmp_path):
    b = bench()
    from critic_trainer.pipeline import ImproveConfig

    base = ImproveConfig(seed=0, critic_steps=3000)
    d = b.critic_dir(tmp_path, "push", 0, tmp_path / "sft-a", tmp_path / "buf-a", base)
    assert d == b.critic_dir(tmp_path, "push", 0, tmp_path / "sft-a", tmp_path / "buf-a", ImproveConfig(seed=0,
                                                                                                        critic_steps=3000))
    # actor settings do not retrain the critic; critic settings, the SFT policy and the buffer do
    assert d == b.critic_dir(tmp_path, "push", 0, tmp_path / "sft-a", tmp_path / "buf-a",
                             ImproveConfig(seed=0, critic_steps=3000, actor_steps=7, method="dql"))
    others = [b.critic_dir(tmp_path, "push", 0, tmp_path / "sft-b", tmp_path / "buf-a", base),
              b.critic_dir(tmp_path, "push", 0, tmp_path / "sft-a", tmp_path / "buf-b", base)]
    others += [b.critic_dir(tmp_path, "push", 0, tmp_path / "sft-a", tmp_path / "buf-a",
                            ImproveConfig(**{**base.__dict__, k: v}))
               for k, v in [("critic_steps", 10), ("reg_weight", 1.0), ("critic_hidden", (64,)), ("seed", 1),
                            ("critic_features", "pooled"), ("ensemble", 4), ("critic_objective", "iql")]]
    assert len({d, *others}) == len(others) + 1


def test_branches_go_into_their_own_buffer(tmp_path):
    """--branches 2: a buffer of its own name (the critic cache keys on it), the branch counts in the JSON, and the
    branch episodes on disk next to the rollouts."""
    from critic_trainer.pipeline import load_buffer

    res = bench().main([*TOY, "--rollouts", "2", "--branches", "2", "--eval-episodes", "1", "--methods", "sft",
                        "--work", str(tmp_path / "w")])
    roll = res["tasks"]["push"]["seeds"][0]["rollouts"]
    assert roll["episodes"] == 2 and roll["branches"] == 2 and roll["branch_episodes"] == 4
    tag = bench().sft_tag(res["tasks"]["push"]["sft_settings"])
    buf_dir = tmp_path / "w" / f"buffer-sft-push-s0-n1-noise0.01-steps5{tag}-r2-b2f0.7"
    buf = load_buffer(buf_dir, 10)
    assert len(set(buf.episode.tolist())) == 6 and len(buf) == roll["frames"] + roll["branch_frames"]
    assert sorted(set(buf.root.tolist())) == [0, 3]  # each rollout and its two branches
    assert sorted(np.bincount(buf.branch_group[buf.branch_group >= 0]).tolist()) == [3, 3]  # the same-state groups
    # --branch-offset: explored branches go into a buffer of their own name
    res = bench().main([*TOY, "--rollouts", "2", "--branches", "2", "--branch-offset", "0.2", "--eval-episodes", "1",
                        "--methods", "sft", "--work", str(tmp_path / "w")])
    assert res["tasks"]["push"]["seeds"][0]["rollouts"]["branch_offset"] == 0.2
    assert (tmp_path / "w" / f"{buf_dir.name}o0.2" / "roll_info.json").exists()


def test_noise_scale_is_checked(capsys):
    for bad in (["--noise-scale", "-1"], ["--noise-scale", "nan"], ["--noise-scale", "0", "--methods", "best-of-n"]):
        with pytest.raises(SystemExit):
            bench().main([*TOY, *bad])
        assert "--noise-scale" in capsys.readouterr().err


def test_critic_contrast_needs_branches(capsys):
    for bad in (["--critic-contrast", "1"], ["--critic-contrast", "-1", "--branches", "2"]):
        with pytest.raises(SystemExit):
            bench().main([*TOY, "--methods", "qvgm", *bad])
        assert "--critic-contrast" in capsys.readouterr().err
    for bad in (["--branch-offset", "0.1"], ["--branch-offset", "-0.1", "--branches", "2"],
                ["--branch-offset", "0.1", "--branches", "2", "--tier", "pixels"]):
        with pytest.raises(SystemExit):
            bench().main([*TOY, "--methods", "sft", *bad])
        assert "--branch-offset" in capsys.readouterr().err


def test_sft_candidates_are_chosen_on_tuning_scenes(tmp_path):
    """--sft-candidates 2: two SFT policies of one training seed on the same demos, with other init seeds (other
    weights), each judged on tuning scenes; the most successful one (ties: the first) records the buffer and is
    evaluated. A rerun reuses the checkpoints and the cached tuning records, and the choice follows those records."""
    from safetensors.torch import load_file

    work = tmp_path / "w"
    args = [*TOY, "--rollouts", "1", "--eval-episodes", "1", "--methods", "sft", "--sft-candidates", "2",
            "--tune-episodes", "2", "--work", str(work)]
    res = bench().main(args)
    seed = res["tasks"]["push"]["seeds"][0]
    sel = seed["sft"]["selection"]
    assert sel["tuning_seeds"] == "200000..200001" and [c["init"] for c in sel["candidates"]] == [0, 1]
    assert [c["sft_seed"] for c in sel["candidates"]] == [0, 1_000_000]
    assert all(c["tuning"]["episodes"] == 2 for c in sel["candidates"])
    names = [c["checkpoint"] for c in sel["candidates"]]
    assert names[1] == names[0] + "-init1"
    w0, w1 = (load_file(work / n / "model.safetensors") for n in names)
    assert w0.keys() == w1.keys() and any(not torch.equal(w0[k], w1[k]) for k in w0)
    successes = [c["tuning"]["successes"] for c in sel["candidates"]]
    assert sel["chosen"] == (1 if successes[1] > successes[0] else 0)
    assert (work / f"buffer-{names[sel['chosen']]}-r1" / "meta" / "info.json").exists()
    # rerun: nothing retrained or re-evaluated; a tuning record that favours candidate 1 decides the choice
    record = work / f"{names[1]}.tuning2.json"
    r = json.loads(record.read_text())
    record.write_text(json.dumps({**r, "successes": successes[0] + 1}))
    again = bench().main(args)["tasks"]["push"]["seeds"][0]
    assert again["sft"]["reused"] and again["sft"]["selection"]["chosen"] == 1
    assert (work / f"buffer-{names[1]}-r1" / "meta" / "info.json").exists()
    with pytest.raises(SystemExit):
        bench().main([*TOY, "--calibrate", "--sft-candidates", "2"])


def test_keep_policies_saves_each_trained_method(tmp_path):
    """--keep-policies: each trained method's policy is a checkpoint in --work (its parent the SFT, its weights moved
    by the method), re-evaluated from disk on the same scenes it gives the same outcomes; without --work, refused."""
    from critic_trainer import pipeline as P
    from qvgm.policy import load_policy

    w = tmp_path / "w"
    res = bench().main([*TOY, "--rollouts", "2", "--eval-episodes", "2", "--methods", "sft", "qvgm", "--buffer-demos",
                        "--critic-steps", "20", "--critic-batch", "32", "--actor-steps", "2", "--actor-batch", "8",
                        "--keep-policies", "--work", str(w)])
    seed = res["tasks"]["push"]["seeds"][0]
    path = Path(seed["methods"]["qvgm"]["train"]["policy"])
    assert path.parent.parent == w and (path / "manifest.json").is_file() and "policy" not in seed["methods"]["sft"]
    sft_dir = next(p for p in w.iterdir() if p.name.startswith("sft-") and p.is_dir() and not p.name.endswith(".work"))
    pol, sft = load_policy(path), load_policy(sft_dir)
    assert pol.manifest["parent"] == sft.version and pol.manifest["summary"]["kind"] == "qvgm"
    assert pol.manifest["summary"]["improve"]["method"] == "qvgm"
    moved = [k for k, v in sft.state_dict().items() if not torch.equal(pol.state_dict()[k], v)]
    assert moved and all(torch.isfinite(v).all() for v in pol.state_dict().values())
    again = P.evaluate(pol, "push", [900_000, 900_001], n_exec=5, max_episode_steps=10)  # the run's eval scenes
    assert again["outcomes"] == seed["methods"]["qvgm"]["outcomes"]
    with pytest.raises(SystemExit):
        bench().main([*TOY, "--keep-policies"])
