"""bench/sft_success.py: one process per training seed (--first-seed), pooling their outputs (--pool), and a time
limit's SIGTERM ending the evaluation early with the episodes done so far reported (bench/sft_success_gpu.sh)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_sft_success", ROOT / "bench" / "sft_success.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tmp: Path, name: str, *extra: str) -> tuple[dict, str]:
    out = tmp / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MUJOCO_GL": "egl"}
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "sft_success.py"), "--config", "state", "--tasks", "push",
                        "--demos", "2", "--seeds", "1", "--steps", "3", "--batch-size", "8", "--episodes", "1",
                        "--out", str(out), *extra], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(out.read_text()), p.stdout


def test_per_seed_processes_pool_into_one_row(tmp_path):
    bench = _bench()
    a, _ = _run(tmp_path, "s0", "--first-seed", "0")
    b, _ = _run(tmp_path, "s1", "--first-seed", "1")
    assert [p["seed"] for p in a["results"][0]["per_seed"]] == [0]
    assert [p["seed"] for p in b["results"][0]["per_seed"]] == [1]
    pooled = bench.main(["--pool", str(tmp_path / "s1.json"), str(tmp_path / "s0.json"),
                         "--out", str(tmp_path / "pooled.json")])
    row = pooled["results"][0]
    assert (row["task"], row["demos"], pooled["pooled_from"]) == ("push", 2, 2)
    assert [p["seed"] for p in row["per_seed"]] == [0, 1]  # sorted, both kept
    k = sum(p["success"] for p in row["per_seed"])
    assert row["success_mean"] == k / 2 and list(row["wilson95"]) == list(bench.wilson(k, 2))
    assert json.loads((tmp_path / "pooled.json").read_text())["results"] == json.loads(json.dumps(pooled["results"]))
    # the same seed twice, or runs of different settings, are refused with the reason
    with pytest.raises(ValueError, match="appear twice"):
        bench.pool([a, a])
    with pytest.raises(ValueError, match="different settings.*steps"):
        bench.pool([a, {**b, "steps": 4}])
    with pytest.raises(ValueError, match="different data"):
        bench.pool([a, {**b, "results": [{**b["results"][0], "frames": 1}]}])
    # a run recorded before a setting existed pools with one that has it at its default, not with another value
    older = {k: v for k, v in b.items() if k != "keypoint_aux"}
    assert bench.pool([a, older])["pooled_from"] == 2
    with pytest.raises(ValueError, match="different settings.*keypoint_aux"):
        bench.pool([{**a, "keypoint_aux": 1.0}, older])


def test_sigterm_stops_evaluation_after_the_episode_in_progress():
    bench = _bench()
    before = signal.getsignal(signal.SIGTERM)
    with bench._stop_after_episode() as stop:
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)  # would kill the test process without the handler
        for _ in range(100):
            if stop.is_set():
                break
            time.sleep(0.01)
        assert stop.is_set()
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_during_evaluation_reports_the_episodes_done(tmp_path):
    out = tmp_path / "stopped.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MUJOCO_GL": "egl", "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, str(ROOT / "bench" / "sft_success.py"), "--config", "state", "--tasks",
                          "push", "--demos", "2", "--seeds", "2", "--steps", "3", "--batch-size", "8",
                          "--episodes", "200", "--out", str(out)], env=env, stdout=subprocess.PIPE,
                         stderr=(tmp_path / "stderr.txt").open("w"), text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(p.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 240  # seed 0's training, then its 200 evaluation episodes start
    while time.monotonic() < deadline and p.poll() is None and not any('"evaluating"' in x for x in lines):
        time.sleep(0.2)
    time.sleep(1)
    assert p.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=120)
    reader.join(timeout=10)
    stdout, stderr = "".join(lines), (tmp_path / "stderr.txt").read_text()
    assert p.returncode == 0, stderr[-2000:]
    res = json.loads(out.read_text())
    seeds = res["results"][0]["per_seed"]
    assert [s["seed"] for s in seeds] == [0]  # seed 1 is never trained after the stop
    assert seeds[0]["stopped_early"] and 1 <= seeds[0]["episodes"] < 200
    assert "evaluation stopped early" in stdout


def test_gpu_script_runs_per_seed_processes_through_pixels_gpu_exec(tmp_path):
    """The device-machine path, here on the CPU with pi05-tiny: bench/pixels_gpu.sh exec checks the environment
    (EGL render of both cameras, pi05 acting), then bench/sft_success_gpu.sh runs one process per seed and pools."""
    out = tmp_path / "out"
    env = {**os.environ, "PY": sys.executable, "DEVICE": "cpu", "CONFIG": "pi05-tiny", "STEPS": "2", "EPISODES": "1",
           "TASKS": "push", "DEMOS": "2", "SEEDS": "0 1", "VARIANTS": "delta shift4", "JOB_LIMIT": "400",
           "LIMIT": "500", "EXTRA": "--max-episode-steps 20"}
    p = subprocess.run(["bash", "bench/pixels_gpu.sh", "exec", str(out), "bash", "bench/sft_success_gpu.sh", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:] + (out / "exec.log").read_text()[-3000:]
    check = (out / "env.txt").read_text()
    assert "render ok" in check and "pi05-tiny acts on cpu" in check and "[exec bash] rc=0" in check
    pooled = json.loads((out / "sft_pi05-tiny_delta.json").read_text())
    assert pooled["config"] == "pi05-tiny"
    assert pooled["policy"] == {"delta_actions": True, "image_size": 32, "privileged_dim": 0,
                                "ordinal_state_bins": False, "continuous_state": False, "state_film": False,
                                "zero_padded_actions": True, "camera_names": ["front", "wrist"],
                                "keypoint_tokens": 0, "keypoint_film": False, "keypoint_per_token": False,
                                "patch_token_dropout": 0.0, "keypoint_prompt_queries": 0}
    assert pooled["image_shift"] == 0 and pooled["render_size"] == [64, 64]
    shifted = json.loads((out / "sft_pi05-tiny_shift4.json").read_text())
    assert shifted["image_shift"] == 4 and shifted["pooled_from"] == 2
    assert pooled["device"] == "cpu" and pooled["pooled_from"] == 2
    row = pooled["results"][0]
    assert (row["task"], row["demos"]) == ("push", 2) and [s["seed"] for s in row["per_seed"]] == [0, 1]
    assert all(s["episodes"] == 1 for s in row["per_seed"]) and pooled["max_episode_steps"] == 20
    with tarfile.open(out / "sft_runs.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"delta-push-2-s0.json", "delta-push-2-s0.log", "delta-push-2-s1.json", "delta-push-2-s1.log"} <= names


def test_heldout_probe_reports_open_loop_losses(tmp_path):
    """--heldout-demos: flow loss on the training frames and on fresh demos; a model that reads the object state (the
    `state` backbone, pi05 told it) also gets the loss with those values shuffled across the fresh frames."""
    res, _ = _run(tmp_path, "probe", "--heldout-demos", "1")
    seed = res["results"][0]["per_seed"][0]
    assert res["heldout_demos"] == 1
    assert seed["train_loss"] > 0 and seed["heldout_loss"] > 0 and seed["heldout_loss_shuffled_privileged"] > 0
    out = tmp_path / "told.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MUJOCO_GL": "egl"}
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "sft_success.py"), "--config", "pi05-tiny", "--tasks",
                        "pick_place", "--demos", "2", "--seeds", "1", "--steps", "40", "--batch-size", "8",
                        "--lr", "2e-3", "--episodes", "1", "--image-size", "32", "32", "--device", "cpu",
                        "--override", "privileged_dim=21", "--override", "max_token_len=56", "--heldout-demos", "2",
                        "--failure-modes", "--image-ablation", "frozen", "blank:wrist", "--max-episode-steps", "40",
                        "--out", str(out)], env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-2000:]
    told = json.loads(out.read_text())
    s = told["results"][0]["per_seed"][0]
    assert told["policy"]["privileged_dim"] == 21 and told["policy"]["privileged_quantiles"] is True
    assert s["heldout_loss_shuffled_privileged"] > 0 and s["heldout_loss_shuffled_privileged"] != s["heldout_loss"]
    # a pixel policy: the images shuffled across the fresh frames, both cameras and each alone
    assert all(s[f"heldout_loss_shuffled_{k}"] > 0 for k in ("images", "front", "wrist"))
    # the closed loop again with the images altered: outcomes, classes and the aim per ablation
    assert set(s["image_ablation"]) == {"frozen", "blank:wrist"} and s["aim"]["episodes"] == 1
    for abl in s["image_ablation"].values():
        assert len(abl["outcomes"]) == 1 and sum(abl["failure_modes"].values()) == 1 and abl["aim"]["episodes"] == 1


def test_shuffled_variants_permute_one_input_and_the_loss_sees_it(tmp_path):
    """The held-out probe's shuffled inputs (shuffled_variants) on real rendered demos and a real pi05-tiny: each
    variant permutes exactly its camera(s) with one non-trivial permutation and leaves the rest alone; a constant
    camera shuffled gives back the plain loss exactly, a varying one changes it (unrounded: barely trained)."""
    import torch

    from critic_trainer.demos import collect_demos
    from critic_trainer.sft import SFTConfig, heldout_flow_loss, load_demo_data, train_sft

    torch.set_num_threads(1)
    collect_demos("push", 2, tmp_path / "d", noise=0.005, seed=0, image_size=(32, 32))
    data = load_demo_data([tmp_path / "d"], horizon=10, with_images=True)
    res = train_sft(SFTConfig(datasets=[str(tmp_path / "d")], out=str(tmp_path / "ck"), config="pi05-tiny", steps=2,
                              seed=0, batch_size=4, checkpoint_every=2, warmup=1), data=data, progress=False)
    held = data.subset(np.flatnonzero(data.episode == 1))
    held.images["front"][:] = held.images["front"][0]  # the front camera shows one frame throughout
    variants = dict(_bench().shuffled_variants(res["policy"], held, seed=0))
    assert list(variants) == ["images", "front", "wrist"]  # not told the poses: no "privileged"
    perm = np.random.default_rng(0).permutation(len(held))
    assert not np.array_equal(perm, np.arange(len(held)))
    for name, changed in (("images", {"front", "wrist"}), ("front", {"front"}), ("wrist", {"wrist"})):
        v = variants[name]
        for cam in ("front", "wrist"):
            want = held.images[cam][perm] if cam in changed else held.images[cam]
            assert np.array_equal(v.images[cam], want), (name, cam)
        assert np.array_equal(v.state, held.state) and np.array_equal(v.actions, held.actions)
    plain = heldout_flow_loss(res["policy"], held, seed=0)
    assert heldout_flow_loss(res["policy"], variants["front"], seed=0) == plain
    assert heldout_flow_loss(res["policy"], variants["wrist"], seed=0) != plain
    assert heldout_flow_loss(res["policy"], variants["images"], seed=0) != plain


def test_pose_offset_wrapper_shifts_told_positions_per_episode():
    """PoseOffset (--told-pose-noise): a constant x/y offset per object for a whole episode, reproducible from the
    scene seed, nothing else of the observation changed; sigma 0 is the identity."""
    from qvgm.sim import TabletopEnv

    bench = _bench()
    raw = TabletopEnv(task="push", render=False)
    env = bench.PoseOffset(TabletopEnv(task="push", render=False), 0.02)
    zero = bench.PoseOffset(TabletopEnv(task="push", render=False), 0.0)
    try:
        offsets = []
        for seed in (3, 3, 4):
            o_raw, _ = raw.reset(seed=seed)
            o, _ = env.reset(seed=seed)
            o0, _ = zero.reset(seed=seed)
            assert np.array_equal(o0["privileged"], o_raw["privileged"])
            d = (o["privileged"] - o_raw["privileged"]).reshape(-1, 7)
            assert np.allclose(d[:, 2:], 0) and np.abs(d[:, :2]).max() > 1e-4  # x, y only
            assert np.array_equal(o["state"], o_raw["state"]) and o["prompt"] == o_raw["prompt"]
            a = o_raw["state"]
            o_raw2 = raw.step(a)[0]
            o2 = env.step(a)[0]
            assert np.allclose((o2["privileged"] - o_raw2["privileged"]).reshape(-1, 7), d, atol=1e-6)  # constant
            offsets.append(d[:, :2])
        assert np.array_equal(offsets[0], offsets[1]) and not np.allclose(offsets[0], offsets[2])
    finally:
        for e in (raw, env, zero):
            e.close()


def test_failure_trace_classifies_real_episodes():
    """FailureTrace (--failure-modes) on real sim episodes: the expert succeeds; holding still never reaches the
    target; the expert stopped once the cube is up is 'lifted, not placed'."""
    from qvgm.sim import TabletopEnv, make_expert

    bench = _bench()
    env = bench.FailureTrace(TabletopEnv(task="pick_place", render=False))
    try:
        obs, _ = env.reset(seed=2)
        hold = obs["state"].copy()
        for _ in range(30):
            env.step(hold)
        assert env.classify(False) == "never reached the target"
        assert env.aim()["how"] == "lowest"  # no closing command: where the fingers were lowest

        expert = make_expert("pick_place", noise=0.0, seed=2)
        obs, _ = env.reset(seed=2)
        ok, lifted_at = False, None
        for _ in range(env.unwrapped.max_episode_steps):
            obs, _, ok, trunc, _ = env.step(expert.act(obs["state"], env.unwrapped.object_poses()))
            z = env.trace["target_cube.z"]
            if lifted_at is None and z[-1] - z[0] > 0.05:
                lifted_at = len(z)
            if ok or trunc:
                break
        assert ok and env.classify(True) == "success" and lifted_at is not None
        aim = env.aim()  # the expert closes the gripper over the target
        assert aim["how"] == "grasp" and np.linalg.norm(np.subtract(aim["aim_xy"], aim["target_xy"])) < 0.02
        # the same episode cut where the cube is in the air: lifted, not placed
        env.trace = {k: v[:lifted_at] for k, v in env.trace.items()}
        assert env.classify(False) == "lifted, not placed"
        assert min(env.trace["target_cube.dist"]) < bench.FailureTrace.REACH_M
        # the wrong-cube classes, on traces built by hand (closest approach m, heights m)
        far, near, rest, up = [0.2, 0.1], [0.2, 0.01], [0.02, 0.02], [0.02, 0.08]
        env.trace = {"target_cube.dist": far, "target_cube.z": rest, "distractor_0.dist": near, "distractor_0.z": up}
        assert env.classify(False) == "wrong cube lifted"
        env.trace["distractor_0.z"] = rest
        assert env.classify(False) == "went for the wrong cube"
        env.trace["target_cube.dist"] = near
        assert env.classify(False) == "reached, not lifted"
    finally:
        env.close()


def test_diagnostic_options_end_to_end(tmp_path):
    """--failure-modes, --action-error, --told-pose-noise and --recovery-demos in one tiny run (`state`, told poses):
    every episode is classed, the offset evaluation and the recovery round report per-scene outcomes."""
    out, _ = _run(tmp_path, "diag", "--episodes", "2", "--failure-modes", "--action-error", "--told-pose-noise",
                  "0.02", "--recovery-demos", "2", "--recovery-chunks", "2")
    row = out["results"][0]["per_seed"][0]
    assert sum(row["failure_modes"].values()) == 2 and len(row["min_target_dist_m"]) == 2
    assert all(d >= 0 for d in row["min_target_dist_m"]) and len(row["outcomes"]) == 2
    assert 0 < row["action_error_mean"] < 1  # --action-error alongside the traced environment
    off = row["success_with_pose_offset_m"]["0.02"]
    assert len(off["outcomes"]) == 2 and off["success"] == sum(off["outcomes"])
    rec = row["recovery"]
    assert rec["demos"]["episodes"] == 2 and len(rec["outcomes"]) == 2 and rec["frames"] > 0


def test_aim_summary_slope_follows_the_target_or_not():
    """aim_summary: an aim on the target has slope and correlation 1 and no error; a constant aim slope 0, and its
    error is the mean-target baseline's."""
    bench = _bench()
    rng = np.random.default_rng(0)
    targets = rng.uniform(-0.1, 0.1, (20, 2)) + [0.5, 0.0]
    on = bench.aim_summary([{"target_xy": list(t), "aim_xy": list(t), "how": "grasp"} for t in targets])
    assert on["slope_xy"] == [1.0, 1.0] and on["corr_xy"] == [1.0, 1.0] and on["aim_error_m_median"] == 0.0
    assert on["grasp_attempts"] == 20 and on["mean_target_error_m_median"] > 0.03
    mean = targets.mean(0)
    const = bench.aim_summary([{"target_xy": list(t), "aim_xy": list(mean), "how": "lowest"} for t in targets])
    assert const["slope_xy"] == [0.0, 0.0] and const["grasp_attempts"] == 0
    assert const["aim_error_m_median"] == pytest.approx(const["mean_target_error_m_median"], abs=1e-4)
    half = bench.aim_summary([{"target_xy": list(t), "aim_xy": list((t + mean) / 2), "how": "grasp"} for t in targets])
    assert half["slope_xy"] == pytest.approx([0.5, 0.5], abs=1e-3)


def test_image_ablation_freezes_or_blanks_the_chosen_cameras():
    """ImageAblation (--image-ablation) on the real renderer: frozen holds the reset frame while the arm moves,
    blank is mid grey, MODE:CAM touches one camera only; state and prompt pass unchanged; bad specs are refused."""
    from qvgm.sim import TabletopEnv

    def make():
        return TabletopEnv(task="pick_place", cameras=("front", "wrist"), image_size=(32, 32))

    bench = _bench()
    raw = make()
    frozen, blank_wrist = bench.ImageAblation(make(), "frozen"), bench.ImageAblation(make(), "blank:wrist")
    try:
        o_raw, _ = raw.reset(seed=1)
        o_f, _ = frozen.reset(seed=1)
        o_b, _ = blank_wrist.reset(seed=1)
        assert all(np.array_equal(o_f["images"][c], o_raw["images"][c]) for c in ("front", "wrist"))
        assert np.all(o_b["images"]["wrist"] == 128)
        assert np.array_equal(o_b["images"]["front"], o_raw["images"]["front"])
        first = {c: o_raw["images"][c].copy() for c in ("front", "wrist")}
        target = o_raw["state"].copy()
        target[1] -= 0.4  # swing the shoulder: both views change
        for _ in range(15):
            o_raw = raw.step(target)[0]
            o_f = frozen.step(target)[0]
            o_b = blank_wrist.step(target)[0]
        assert not np.array_equal(o_raw["images"]["wrist"], first["wrist"])
        assert all(np.array_equal(o_f["images"][c], first[c]) for c in ("front", "wrist"))
        assert np.array_equal(o_f["state"], o_raw["state"]) and o_f["prompt"] == o_raw["prompt"]
        assert np.all(o_b["images"]["wrist"] == 128)
        assert np.array_equal(o_b["images"]["front"], o_raw["images"]["front"])
        o_f2, _ = frozen.reset(seed=2)  # a new episode freezes its own first frame
        assert not np.array_equal(o_f2["images"]["front"], first["front"])
    finally:
        for e in (raw, frozen, blank_wrist):
            e.close()
    env = make()
    try:
        with pytest.raises(ValueError, match="mode must be one of"):
            bench.ImageAblation(env, "shuffle")
        with pytest.raises(ValueError, match="no camera 'top'"):
            bench.ImageAblation(env, "blank:top")
    finally:
        env.close()


def test_base_policy_pretrained_on_other_tasks_is_fine_tuned_and_reused(tmp_path, capsys):
    """--base-tasks: a base pretrained on push demos (scene seeds 800000+), then every stack SFT fine-tunes it (its
    checkpoint names the base as parent); a later run fine-tunes the kept base by --init, and the two runs pool
    (not with a from-scratch run). A base that saw the evaluated task, or two bases at once, are refused."""
    keep = tmp_path / "keep"
    base_args = ["--tasks", "stack", "--base-tasks", "push", "--base-demos", "2", "--base-steps", "3", "--keep",
                 str(keep)]
    out, _ = _run(tmp_path, "s0", *base_args)
    assert (out["base_tasks"], out["base_demos"], out["base_steps"], out["base_seed"]) == (["push"], 2, 3, 0)
    assert out["base_demo_seeds"] == "800000+k" and out["base_final_loss"] > 0
    assert out["init"] == str(keep / "base-push-n2-steps3-s0")
    base = keep / "base-push-n2-steps3-s0"
    m_base = json.loads((base / "manifest.json").read_text())
    m = json.loads((keep / "ck-stack-2-0" / "manifest.json").read_text())
    assert m_base["version"] == "base-push" and m["parent"] == "base-push" and m["summary"]["init"] == str(base)
    assert m_base["summary"]["datasets"] == [str(keep / "base-push-demos")]
    again, _ = _run(tmp_path, "s1", "--tasks", "stack", "--init", str(base), "--first-seed", "1", "--keep",
                    str(tmp_path / "keep1"))
    assert again["init"] == str(base)
    assert json.loads((tmp_path / "keep1" / "ck-stack-2-1" / "manifest.json").read_text())["parent"] == "base-push"
    pooled = _bench().pool([out, again])  # the same base: one setting
    assert [s["seed"] for s in pooled["results"][0]["per_seed"]] == [0, 1]
    scratch, _ = _run(tmp_path, "scratch", "--tasks", "stack", "--first-seed", "1")
    with pytest.raises(ValueError, match=r"different settings: \['init'\]"):  # not with from-scratch SFT
        _bench().pool([out, scratch])
    for argv, msg in ((["--tasks", "push", "--base-tasks", "push"], "must not have seen the task"),
                      (["--base-tasks", "push", "--init", str(base)], "give one")):
        with pytest.raises(SystemExit):
            _bench().main(argv)
        assert msg in capsys.readouterr().err
