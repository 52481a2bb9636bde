"""bench/learning.py --tier pixels at toy sizes (pi05-tiny, 32 px, CPU): rendered demos -> pixel SFT -> a rollout
buffer that really holds camera frames -> pooled critic features -> sft / qvgm / best-of-n evaluated on rendered
episodes; the JSON records the tier's settings, and a second run on the same --work reuses every stage."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
PREFIX = "pixels-pi05-tiny-32x32-front+wrist-"
# 2 noisy demos (the expert succeeds: with --buffer-demos the buffer holds both outcomes, so the critic can rank),
# 3 SFT steps, 2 rollouts and 2 evaluation episodes cut at 10 control steps
TOY = ["--tier", "pixels", "--config", "pi05-tiny", "--device", "cpu", "--tasks", "push", "--demos", "2",
       "--sft-steps", "3", "--sft-batch", "8", "--max-episode-steps", "10", "--n-exec", "5", "--rollouts", "2",
       "--eval-episodes", "2", "--methods", "sft", "qvgm", "best-of-n", "--buffer-demos", "--critic-steps", "20",
       "--critic-batch", "32", "--actor-steps", "2", "--actor-batch", "8", "--best-of", "2", "--delta-actions",
       "--critic-features", "pooled"]  # the tier's default trains a 1000-step RL token


def bench():
    spec = importlib.util.spec_from_file_location("bench_learning", ROOT / "bench" / "learning.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pixels")
    out = tmp / "res.json"
    res = bench().main([*TOY, "--work", str(tmp / "w"), "--out", str(out)])
    return tmp, res, json.loads(out.read_text())


def test_json_records_the_tier(run):
    _, res, disk = run
    assert disk["tier"] == res["tier"] == "pixels"
    assert (disk["config"], disk["device"], disk["image_size"], disk["cameras"]) == ("pi05-tiny", "cpu", [32, 32],
                                                                                     ["front", "wrist"])
    assert disk["critic_features"] == "pooled" and disk["settings"]["sft_batch"] == 8
    seed = disk["tasks"]["push"]["seeds"][0]
    assert seed["sft"]["delta_actions"] is True  # pi05 on delta actions through the whole stack
    assert seed["sft"]["config"] == "pi05-tiny" and seed["sft"]["images"] == {"front": [32, 32, 3],
                                                                              "wrist": [32, 32, 3]}
    # the critic reads pooled prefix features (pi05-tiny width 128): no RL token is trained by the bench
    assert seed["features"]["kind"] == "pooled" and seed["features"]["dim"] == 128
    assert seed["buffer"]["images"] == {"front": [32, 32, 3], "wrist": [32, 32, 3]}
    assert seed["buffer"]["episodes"] == 4 and seed["buffer"]["successful_episodes"] >= 1  # 2 demos + 2 rollouts
    evals = set(range(900_000, 900_002))  # held out from demos and rollouts
    assert not evals & set(seed["rollouts"]["seeds"]) and not evals & set(seed["sft"]["demo_seeds"])
    for m in ("sft", "qvgm", "best-of-n"):
        s = disk["tasks"]["push"]["summary"][m]
        assert s["episodes"] == 2 and s["ci95"][0] <= s["success_rate"] <= s["ci95"][1]
        # every inference of every evaluation episode saw a rendered, non-blank frame of both cameras
        ev = seed["methods"][m]["eval_images"]
        assert ev["cameras"] == ["front", "wrist"] and ev["frame_shape"] == [32, 32, 3]
        assert ev["inferences"] >= 2 and ev["frames_checked"] == {"front": ev["inferences"],
                                                                  "wrist": ev["inferences"]}
    assert seed["rollouts"]["images_checked"]["inferences"] >= 2
    assert "vs_sft_paired" in disk["tasks"]["push"]["summary"]["qvgm"]  # same scenes: paired with SFT


def test_buffer_holds_rollout_camera_frames(run):
    tmp, res, _ = run
    from qvgm.data import ReplayReader

    names = sorted(p.name for p in (tmp / "w").iterdir())
    assert names and all(n.startswith((PREFIX, "buffer-" + PREFIX)) for n in names)  # never a state-tier name
    buf = tmp / "w" / next(n for n in names if n.startswith("buffer-"))
    r = ReplayReader(buf, decode_images=True)
    try:
        assert sorted(k.split(".")[-1] for k in r.video_keys) == ["front", "wrist"]
        versions = np.asarray([str(v) for v in r.policy_version])
        g = int(np.flatnonzero(versions != "expert")[-1])  # a frame of an SFT-policy rollout
        frame = r.images([g])[g]
        for cam in ("front", "wrist"):
            img = frame[cam]
            assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and int(img.max()) > int(img.min())
        assert (versions != "expert").sum() == res["tasks"]["push"]["seeds"][0]["rollouts"]["frames"]
    finally:
        r.close()


def test_second_run_reuses_every_stage(run):
    tmp, res, _ = run
    again = bench().main([*TOY, "--work", str(tmp / "w")])
    seed = again["tasks"]["push"]["seeds"][0]
    assert seed["sft"]["reused"] and seed["rollouts"]["reused"] and seed["critic"]["reused"]
    assert seed["features"]["reused"]
    first = res["tasks"]["push"]["seeds"][0]
    for m in ("sft", "best-of-n"):  # same weights, critic, scenes and noise: same outcomes
        assert seed["methods"][m]["outcomes"] == first["methods"][m]["outcomes"]


def test_calibrate_mode_renders_on_tuning_seeds(run):
    tmp, _, _ = run
    argv = [a for a in TOY if a != "--buffer-demos"]
    res = bench().main([*argv, "--calibrate", "--tune-episodes", "1", "--work", str(tmp / "w")])
    row = res["rows"][0]
    assert row["sft"]["reused"] and row["sft"]["config"] == "pi05-tiny"  # the same SFT checkpoint as the run
    assert row["tuning"]["seeds"] == [200_000] and row["tuning"]["episodes"] == 1


def test_camera_check_refuses_a_policy_run_blind(run):
    tmp, _, _ = run
    from critic_trainer.pipeline import evaluate
    from qvgm.policy import load_policy

    ck = next(p for p in (tmp / "w").iterdir() if p.name.startswith(PREFIX + "sft-") and p.is_dir()
              and not p.name.endswith(".work"))
    pol = load_policy(ck)
    assert ck.name.endswith("-delta-wu100") and pol.config.delta_actions and pol.delta_dims == 6
    # an env that renders nothing: pi05 would mask the missing cameras and act blind; the tier's check refuses
    with pytest.raises(RuntimeError, match="no 'front' image"):
        evaluate(bench().CameraCheck(pol, (32, 32)), "push", [900_000], render=False, max_episode_steps=5)
    with pytest.raises(RuntimeError, match="expected uint8"):  # rendered, but not at the tier's image size
        evaluate(bench().CameraCheck(pol, (32, 32)), "push", [900_000], render=True, image_size=(16, 16),
                 max_episode_steps=5)


def test_collect_rollouts_append_refuses_other_cameras(run, tmp_path):
    tmp, _, _ = run
    from critic_trainer.pipeline import collect_rollouts
    from qvgm.policy import load_policy

    ck = next(p for p in (tmp / "w").iterdir() if p.name.startswith(PREFIX + "sft-") and p.is_dir()
              and not p.name.endswith(".work"))
    pol = load_policy(ck)
    out = tmp_path / "buf"
    r = collect_rollouts(pol, "push", [300_000], out, render=True, cameras=("front", "wrist"), image_size=(32, 32),
                         max_episode_steps=3)
    assert r["frames"] == 3
    with pytest.raises(ValueError, match="existing dataset has cameras"):
        collect_rollouts(pol, "push", [300_001], out, render=True, cameras=("front",), image_size=(32, 32),
                         max_episode_steps=3, append=True)
    with pytest.raises(ValueError, match="even"):
        collect_rollouts(pol, "push", [300_001], tmp_path / "odd", render=True, image_size=(31, 32))


@pytest.mark.parametrize("argv, msg", [
    (["--config", "pi05-tiny"], "apply to --tier pixels only"),
    (["--delta-actions"], "apply to --tier pixels only"),
    (["--tier", "pixels", "--config", "state"], "needs a pi05 config"),
    (["--tier", "pixels", "--config", "nope"], "unknown policy config"),
    (["--tier", "pixels", "--image-size", "33"], "even numbers"),
    (["--tier", "pixels", "--cameras", "top"], "unknown or repeated"),
    (["--tier", "pixels", "--state-flags", "delta_actions=1"], "`state` backbone flags"),
])
def test_bad_tier_options_exit_with_a_message(argv, msg, capsys):
    with pytest.raises(SystemExit):
        bench().main(argv)
    assert msg in capsys.readouterr().err


def test_cuda_asked_without_cuda_is_refused(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit):
        bench().main(["--tier", "pixels", "--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err


def test_state_tier_unchanged_and_buffer_demos(tmp_path):
    # the state tier's JSON settings hold no pixel options unless given (its output stays as before the pixel tier);
    # --buffer-demos works there too: the demos' successes let the critic methods train on a buffer of failures
    res = bench().main(["--tasks", "push", "--demos", "2", "--sft-steps", "5", "--max-episode-steps", "10",
                        "--rollouts", "2", "--eval-episodes", "1", "--methods", "sft", "qvgm", "--buffer-demos",
                        "--critic-steps", "10", "--actor-steps", "1", "--work", str(tmp_path / "w")])
    assert res["tier"] == "state" and "config" not in res and "device" not in res
    assert not {"config", "device", "image_size", "cameras", "sft_batch", "sft_lr", "critic_features"} & set(
        res["settings"]) and res["settings"]["buffer_demos"] is True
    seed = res["tasks"]["push"]["seeds"][0]
    assert seed["rollouts"]["successes"] == 0 and seed["critic"]["transitions"] > 0
    assert (tmp_path / "w" / "buffer-sft-push-s0-n2-noise0.01-steps5-delta_actions1-privileged_norm1-tool_features1"
            "-r2-demos" / "roll_info.json").exists()


def test_fixed_colours_and_policy_overrides_reach_every_stage(tmp_path):
    """--colors fixed and --policy-override: the demos, the SFT (its config), the rollouts (their frames are the
    fixed-colour scene) and the work names all follow them; a bad override is refused with its name."""
    from qvgm.data import ReplayReader
    from qvgm.policy import load_policy
    from qvgm.sim import TabletopEnv

    work = tmp_path / "w"
    res = bench().main(["--tier", "pixels", "--config", "pi05-tiny", "--device", "cpu", "--tasks", "push",
                        "--demos", "2", "--sft-steps", "2", "--sft-batch", "8", "--max-episode-steps", "5",
                        "--rollouts", "1", "--eval-episodes", "1", "--methods", "sft", "--critic-steps", "2",
                        "--critic-batch", "8", "--colors", "fixed", "--policy-override", "keypoint_tokens=2",
                        "--first-seed", "1", "--work", str(work)])  # seed 1: rollout scene 301000, whose
    # random colours (target blue, goal red) differ from the fixed ones (seed 0's scene happens to match them)
    seed = res["tasks"]["push"]["seeds"][0]
    assert seed["rollouts"]["seeds"] == [301_000]
    assert seed["sft"]["colors"] == "fixed" and seed["sft"]["policy_override"] == {"keypoint_tokens": 2}
    assert res["settings"]["colors"] == "fixed"
    names = sorted(p.name for p in work.iterdir())
    prefix = "pixels-pi05-tiny-32x32-front+wrist-fixedcolors-"
    assert names and all(n.startswith((prefix, "buffer-" + prefix)) for n in names)
    ck = next(work / n for n in names if n.startswith(prefix + "sft-") and n.endswith("-wu100-keypoint_tokens2"))
    assert seed["sft"]["warmup"] == 100  # the pixel tier's default lr warm-up
    assert load_policy(ck).config.keypoint_tokens == 2
    buf = next(work / n for n in names if n.startswith("buffer-"))
    r = ReplayReader(buf, decode_images=True)
    try:
        first = r.images([0])[0]["front"].astype(int)  # the rollout's first frame, scene rollouts.seeds[0]
    finally:
        r.close()
    scene = seed["rollouts"]["seeds"][0]
    renders = {}
    for colors in ("fixed", "random"):
        env = TabletopEnv(task="push", cameras=("front", "wrist"), image_size=(32, 32), colors=colors)
        try:
            renders[colors] = env.reset(seed=scene)[0]["images"]["front"].astype(int)
        finally:
            env.close()
    # lossless video: the fixed-colour scene to a few levels; the random-colour one differs at the objects
    assert np.abs(first - renders["fixed"]).max() <= 4
    assert (np.abs(first - renders["random"]).max(axis=-1) > 40).sum() >= 3


def test_bad_policy_override_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench().main(["--tier", "pixels", "--config", "pi05-tiny", "--policy-override", "nope=1"])
    assert "--policy-override 'nope=1'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench().main(["--colors", "fixed"])
    assert "apply to --tier pixels only" in capsys.readouterr().err


def test_sft_option_reaches_the_sft_and_names_its_checkpoint(tmp_path, capsys):
    """--sft-option keypoint_aux=1 (with prompt-query keypoints): the pixel SFT trains with the grounding aid (its
    manifest says so), the option is part of the checkpoint's name (a run without it never reuses it), and a field
    that is not a training aid is refused with its name."""
    from qvgm.policy import load_policy

    work = tmp_path / "w"
    common = ["--tier", "pixels", "--config", "pi05-tiny", "--device", "cpu", "--tasks", "pick_place", "--demos", "1",
              "--sft-steps", "2", "--sft-batch", "4", "--max-episode-steps", "5", "--rollouts", "1",
              "--eval-episodes", "1", "--methods", "sft", "--policy-override", "keypoint_tokens=2",
              "--policy-override", "keypoint_prompt_queries=1", "--work", str(work)]
    res = bench().main([*common, "--sft-option", "keypoint_aux=1"])
    seed = res["tasks"]["pick_place"]["seeds"][0]
    assert seed["sft"]["sft_option"] == {"keypoint_aux": 1} and res["settings"]["sft_option"] == {"keypoint_aux": 1}
    ck = next(p for p in work.iterdir() if p.name.endswith("-sft-keypoint_aux1") and p.is_dir())
    summary = json.loads((ck / "manifest.json").read_text())["summary"]
    assert summary["keypoint_aux"] == 1 and summary["final_keypoint_aux_loss"] >= 0
    assert load_policy(ck).config.keypoint_prompt_queries == 1
    plain = bench().main(common)["tasks"]["pick_place"]["seeds"][0]
    assert not plain["sft"].get("reused") and plain["sft"]["sft_option"] == {}
    for bad in ("lr=1", "nope=1", "keypoint_aux"):
        with pytest.raises(SystemExit):
            bench().main([*common, "--sft-option", bad])
        assert f"--sft-option '{bad}'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench().main(["--sft-option", "keypoint_aux=1"])
    assert "apply to --tier pixels only" in capsys.readouterr().err


def test_critic_methods_train_the_actor_as_deployed(run, tmp_path):
    """patch_token_dropout is training-time input noise. The critic methods' actor trains without it (eval mode), so
    Q-VGM with max_shift 0 (its target is then the frozen reference's own velocity) starts at loss exactly 0; with
    the masking on, the actor's rollout and velocities would differ from the reference's on the same inputs."""
    import copy
    import dataclasses

    from critic_trainer import pipeline as P
    from critic_trainer.qvgm import qvgm_loss
    from qvgm.policy import load_policy
    from qvgm.policy.checkpoint_io import build_policy

    tmp, _, _ = run
    ck = next(p for p in (tmp / "w").iterdir() if p.name.startswith(PREFIX + "sft-") and p.is_dir()
              and not p.name.endswith(".work"))
    sft = load_policy(ck)
    torch.manual_seed(0)
    pol = build_policy(dataclasses.replace(sft.config, keypoint_tokens=2, patch_token_dropout=0.5),
                       sft.processor.norm_stats, sft.processor.tokenizer).eval()
    missing, unexpected = pol.load_state_dict(sft.state_dict(), strict=False)  # the SFT weights + new keypoint net
    assert not unexpected and missing and all(".keypoints." in k for k in missing)
    buf = P.load_buffer(next(p for p in (tmp / "w").iterdir() if p.name.startswith("buffer-")), pol.horizon,
                        with_images=True)
    feats, _ = P.extract_features(pol, buf, tmp_path / "feat", 5, num_ref=2, features="pooled")
    cfg = P.ImproveConfig(method="qvgm", n_exec=5, critic_steps=5, critic_batch=16, critic_hidden=(16, 16),
                          critic_features="pooled", actor_steps=1, actor_batch=8, num_ref=2, max_shift=0.0)
    critic, _ = P.train_critic(pol, feats, P.buffer_transitions(pol, buf, 5, 0.99), cfg)
    _, summ = P.train_actor(pol, buf, cfg, critic, feats)
    assert summ["actor_first"]["loss"] == 0.0 and summ["actor_first"]["h_norm"] == 0.0
    # the same loss with the masking on (what training mode would do) is not 0
    inputs = P.batch_inputs(P.encode_inputs(pol, buf.demo), torch.arange(8), pol.device)
    actor = copy.deepcopy(pol).train()
    torch.manual_seed(1)
    loss, _ = qvgm_loss(actor, pol, actor.encode(inputs), pol.encode(inputs), lambda a: a.sum(-1), cfg.qvgm())
    assert loss.item() > 0.0  # small (3 SFT steps barely use the images), but not the exact 0 above


def test_rl_token_is_trained_on_the_buffer_and_read_by_the_critic(run, capsys):
    """--rl-token-steps N (METHOD.md §2): an RL token trained on the run's own buffer, VLA frozen, saved as a
    checkpoint whose parent is the SFT; the critic reads its z_rl (dim 256) through a feature cache and a critic of
    their own; SFT acts exactly as without the token; a second run reuses the token, features and critic."""
    from qvgm.policy import load_policy

    tmp, first, _ = run
    argv = [*TOY[:TOY.index("--methods")], "--methods", "sft", "qvgm", *TOY[TOY.index("--methods") + 4:-2],
            "--rl-token-steps", "5", "--work", str(tmp / "w")]
    res = bench().main(argv)
    assert res["critic_features"] == "rl-token" and res["settings"]["rl_token_steps"] == 5
    seed = res["tasks"]["push"]["seeds"][0]
    tok = seed["rl_token"]
    assert tok["steps"] == 5 and tok["frames"] == seed["buffer"]["frames"] and tok["heldout_frames"] > 0
    assert -1.0 <= tok["heldout_cosine"] <= 1.0 and not tok.get("reused")
    assert seed["features"] == {**seed["features"], "kind": "rl-token", "dim": 256, "reused": False}
    assert seed["sft"]["reused"] and seed["rollouts"]["reused"] and not seed["critic"].get("reused")
    assert seed["methods"]["sft"]["outcomes"] == first["tasks"]["push"]["seeds"][0]["methods"]["sft"]["outcomes"]
    ck = next(p for p in (tmp / "w").iterdir() if p.name.startswith(PREFIX + "rltoken-push-s0-") and p.is_dir())
    sft_ck = next(p for p in (tmp / "w").iterdir() if p.name.startswith(PREFIX + "sft-") and p.is_dir()
                  and not p.name.endswith(".work"))
    pol, sft = load_policy(ck), load_policy(sft_ck)
    assert pol.config.rl_token is not None and pol.manifest["parent"] == sft.version
    # the VLA is the SFT's, bit for bit: only the rl_token.* weights are new
    sd, base = pol.state_dict(), sft.state_dict()
    assert set(sd) - set(base) and all(k.startswith("rl_token.") for k in set(sd) - set(base))
    assert all(torch.equal(sd[k], v) for k, v in base.items())
    again = bench().main(argv)["tasks"]["push"]["seeds"][0]
    assert again["rl_token"]["reused"] and again["features"]["reused"] and again["critic"]["reused"]
    assert again["methods"]["sft"]["outcomes"] == seed["methods"]["sft"]["outcomes"]
    for bad, msg in ((["--rl-token-steps", "0"], "must be >= 1"),
                     (["--rl-token-steps", "5", "--critic-features", "pooled"], "drop --critic-features pooled")):
        with pytest.raises(SystemExit):
            bench().main(["--tier", "pixels", "--config", "pi05-tiny", *bad])
        assert msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench().main(["--rl-token-steps", "5"])
    assert "apply to --tier pixels only" in capsys.readouterr().err


def test_sft_init_fine_tunes_a_base_and_names_it(run, capsys):
    """--sft-init CKPT: the pixel SFT fine-tunes a checkpoint (here the run's own SFT as the base) instead of fresh
    weights: its own checkpoint (never the scratch one), named by the base's weight hash, the base as parent."""
    tmp, _, _ = run
    base = next(p for p in (tmp / "w").iterdir() if p.name.startswith(PREFIX + "sft-") and p.is_dir()
                and not p.name.endswith(".work") and "-from" not in p.name)
    sha = json.loads((base / "manifest.json").read_text())["files"]["model.safetensors"]
    argv = [*TOY[:TOY.index("--methods")], "--methods", "sft", *TOY[TOY.index("--methods") + 4:],
            "--sft-init", str(base), "--work", str(tmp / "w")]
    seed = bench().main(argv)["tasks"]["push"]["seeds"][0]
    assert not seed["sft"].get("reused") and seed["sft"]["init"] == str(base)
    ck = next(p for p in (tmp / "w").iterdir() if p.name.endswith(f"-from{sha[:10]}") and p.is_dir())
    m = json.loads((ck / "manifest.json").read_text())
    assert m["parent"] == seed["sft"]["init_version"] == json.loads((base / "manifest.json").read_text())["version"]
    assert bench().main(argv)["tasks"]["push"]["seeds"][0]["sft"]["reused"]
    with pytest.raises(SystemExit):
        bench().main(["--tier", "pixels", "--config", "pi05-tiny", "--sft-init", str(tmp / "nowhere")])
    assert "not a checkpoint directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench().main(["--sft-init", str(base)])
    assert "apply to --tier pixels only" in capsys.readouterr().err


@pytest.mark.parametrize("given, steps, features", [
    ([], 1000, "rl-token"),  # the tier's default: the critic reads z_rl of a 1000-step token (RESULTS, 2026-11-28)
    (["--critic-features", "rl-token"], 1000, "rl-token"),
    (["--rl-token-steps", "7"], 7, "rl-token"),
    (["--critic-features", "pooled"], None, "pooled"),  # mean-pooled prefix features, no token trained
])
def test_pixel_critic_reads_the_rl_token_by_default(given, steps, features):
    mod = bench()
    ap = mod.build_parser()
    args = ap.parse_args(["--tier", "pixels", "--config", "pi05-tiny", "--device", "cpu", *given])
    mod.check_tier_args(ap, args)
    assert (args.rl_token_steps, args.critic_features) == (steps, features)
    state = ap.parse_args(["--tier", "state"])
    mod.check_tier_args(ap, state)
    assert state.rl_token_steps is None  # the state tier's token is its encoder: nothing to train
