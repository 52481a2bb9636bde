"""The env-spec contract (qvgm.envs, docs/gym_envs.md) on environments this repository does not define:
Gymnasium's MuJoCo Reacher-v5 (the example spec examples/reacher_v5.yaml and its scripted expert), a pixel
variant of it (AddRenderObservation -> Dict observation with a real MuJoCo camera image) and CartPole (discrete
actions, refused). End to end: spec file -> demos CLI -> SFT -> SFT rollouts into a replay buffer -> critic +
Q-VGM -> published checkpoint -> loaded and evaluated in the env; and bench/learning.py --env-spec."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
import yaml

from critic_trainer import pipeline as P
from critic_trainer.cli import main as cli
from critic_trainer.demos import load_privileged
from critic_trainer.env_demos import collect_env_demos
from critic_trainer.sft import SFTConfig, load_demo_data, train_sft
from qvgm.data import ReplayReader
from qvgm.envs import EnvSpecError, env_spec_from_dict, load_env_spec
from qvgm.policy import load_policy

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "examples" / "reacher_v5.yaml"
TINY = {"hidden": 64, "embed_dim": 32, "head_hidden": 128, "head_depth": 2, "time_dim": 16}
PIXELS_ID = "qvgm_test/ReacherPixels-v0"


def _reacher_pixels(**kw):
    """Reacher-v5 whose observation is a Dict {state: float64[10], pixels: uint8[64, 64, 3]} (MuJoCo render)."""
    from gymnasium.wrappers import AddRenderObservation

    return AddRenderObservation(gym.make("Reacher-v5", render_mode="rgb_array", width=64, height=64, **kw),
                                render_only=False)


if PIXELS_ID not in gym.registry:
    gym.register(PIXELS_ID, entry_point=_reacher_pixels, max_episode_steps=50)


def reacher_doc(**over) -> dict:
    doc = yaml.safe_load(SPEC.read_text())
    doc.update(over)
    return doc


def spec_file(tmp: Path, doc: dict, name: str = "spec.yaml") -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump(doc))
    return p


# ---------------------------------------------------------------------------------------------------- contract
def test_example_spec_adapter_observation_action_and_success() -> None:
    spec = load_env_spec(SPEC)
    assert spec.name == "reach" and spec.success_kind == "info_key" and spec.demos["noise"] == 0.1
    env = spec.make()
    try:
        assert env.state_dim == 6 and env.privileged_dim == 4 and env.real_action_dim == 2
        assert env.control_hz == 50 and env.max_episode_steps == 50 and env.action_names == ["action_0", "action_1"]
        obs, info = env.reset(seed=3, options={"task": "reach"})
        raw = env.raw_obs
        assert set(obs) == {"state", "privileged", "prompt", "stamp"} and obs["prompt"] == "reach the target"
        assert obs["state"].dtype == np.float32 and obs["privileged"].shape == (4,)
        np.testing.assert_allclose(obs["state"], np.r_[raw[0:4], raw[6:8]], rtol=1e-6)
        np.testing.assert_allclose(obs["privileged"], np.r_[raw[4:6], raw[8:10]], rtol=1e-6)
        again, _ = env.reset(seed=3)
        np.testing.assert_array_equal(again["state"], obs["state"])  # same seed, same episode
        with pytest.raises(ValueError, match="task 'reach'"):
            env.reset(seed=3, options={"task": "push"})
        # bad actions are refused before anything moves
        for bad in (np.zeros(3), np.array([np.nan, 0.0])):
            with pytest.raises(ValueError):
                env.step(bad)
        assert env.elapsed_steps == 0
        # out-of-range actions are clipped to the spec bounds
        np.testing.assert_array_equal(env.env_action(np.array([5.0, -7.0])), [1.0, -1.0])
        # the scripted expert (examples/gym_reacher.py) reaches: sparse reward 1 + terminated on the success step
        expert = env.make_expert(3)
        env.reset(seed=3)
        for _ in range(50):
            obs, r, term, trunc, info = env.step(expert(env.raw_obs))
            if term or trunc:
                break
        assert term and not trunc and r == 1.0 and info["success"] and info["env_reward"] < 0
        assert np.linalg.norm(env.raw_obs[8:10]) < 0.02 and obs["stamp"] == pytest.approx(env.elapsed_steps * 0.02)
        # a policy that does nothing times out: truncated, reward 0
        env.reset(seed=4)
        for _ in range(60):
            obs, r, term, trunc, _ = env.step(np.zeros(2))
            if term or trunc:
                break
        assert trunc and not term and r == 0.0 and env.elapsed_steps == 50
    finally:
        env.close()


def test_success_definitions_agree(tmp_path: Path) -> None:
    """info_key threshold, a `file.py:function` predicate and a return threshold on the same expert episode."""
    pred = reacher_doc(success={"predicate": "gym_reacher.py:reached"})
    pred_spec = env_spec_from_dict(pred, base_dir=ROOT / "examples")
    ends = []
    for spec in (load_env_spec(SPEC), pred_spec):
        env = spec.make()
        env.reset(seed=11)
        expert = env.make_expert(11)
        while True:
            _, _, term, trunc, _ = env.step(expert(env.raw_obs))
            if term or trunc:
                break
        ends.append((term, env.elapsed_steps))
        env.close()
    assert ends[0] == ends[1] and ends[0][0]
    # return threshold: success once the cumulative env reward reaches R (Reacher's reward is <= 0)
    env = env_spec_from_dict(reacher_doc(success={"return_threshold": -1e9}), ROOT / "examples").make()
    env.reset(seed=0)
    assert env.step(np.zeros(2))[2]
    env.close()


@pytest.mark.parametrize("over, match", [
    ({"env_id": "Reachr-v5"}, "unknown Gymnasium env id 'Reachr-v5'; similar: \\['Reacher-v5'"),
    ({"env_id": "CartPole-v1", "observation": {"state": ["[0:4]"]}}, "not a 1-D Box"),
    ({"observation": {"state": ["[0:4]", "[6:12]"]}}, "out of range|bad index"),
    ({"observation": {"state": ["qpos[0:2]"]}}, "names key 'qpos'.*not a Dict"),
    ({"observation": {"state": ["[0:2"]}}, "expected 'KEY'"),
    ({"success": {}}, "exactly one of"),
    ({"success": {"info_key": "x", "predicate": "m:f"}}, "exactly one of"),
    ({"success": {"predicate": f"{ROOT}/examples/gym_reacher.py:nope"}}, "no callable 'nope'"),
    ({"success": {"predicate": "gym_reacher.py:reached"}}, "gym_reacher.py does not exist"),  # relative to spec
    ({"success": {"predicate": "no_such_module:f"}}, "cannot import no_such_module"),
    ({"demos": {"expert": "a:b", "dataset": "d"}}, "exactly one of 'expert'"),
    ({"action": {"low": [-1.0], "high": [1.0]}}, "need 2 values"),
    ({"action": {"dims": [0, 2]}}, "distinct indices"),
    ({"observation": {"state": ["[0:4]"], "images": {"top": "render"}}}, "render_mode: rgb_array"),
    ({"max_episode_steps": 0}, "max_episode_steps"),
    ({"colour": "red"}, "unknown env spec fields"),
    ({"imports": ["no_such_suite"]}, "imports: cannot import 'no_such_suite'"),
    ({"max_episode_steps": "ten"}, "max_episode_steps must be >= 1"),
    ({"success": {"info_key": "reward_dist", "above": "close"}}, "success.above must be a number"),
    ({"env_kwargs": ["render_mode"]}, "env_kwargs must be a mapping"),
])
def test_bad_specs_are_refused_with_clear_errors(tmp_path: Path, over: dict, match: str) -> None:
    doc = reacher_doc(**over)
    path = spec_file(tmp_path, doc)
    with pytest.raises(EnvSpecError, match=match):
        load_env_spec(path).make()


def test_dict_observations_and_images(tmp_path: Path) -> None:
    """A Dict observation (real MuJoCo render under `pixels`): keyed parts, a camera, wrong keys / ranks refused."""
    doc = reacher_doc(env_id=PIXELS_ID, observation={"state": ["state[0:4]", "state[6:8]"],
                                                     "privileged": ["state[4:6]", "state[8:10]"],
                                                     "images": {"top": "pixels"}})
    with pytest.raises(EnvSpecError, match="key 'pos' is not in the observation space; keys: \\['pixels', 'state'\\]"):
        env_spec_from_dict({**doc, "observation": {"state": ["pos[0:2]"]}}, ROOT / "examples").make()
    with pytest.raises(EnvSpecError, match="not a uint8 \\[H, W, 3\\] image"):
        env_spec_from_dict({**doc, "observation": {"state": ["state[0:4]"], "images": {"top": "state"}}},
                           ROOT / "examples").make()
    with pytest.raises(EnvSpecError, match="needs a key"):
        env_spec_from_dict({**doc, "observation": {"state": ["[0:4]"]}}, ROOT / "examples").make()
    spec = env_spec_from_dict(doc, ROOT / "examples")
    summary = collect_env_demos(spec, 2, tmp_path / "pix", seed=5)
    assert summary["successes"] == 2
    r = ReplayReader(tmp_path / "pix")
    try:
        assert r.video_keys == ["observation.images.top"] and r.state.shape[1] == 6 and r.action.shape[1] == 2
        img = r.observation(2)["images"]["top"] if r.observation(2)["images"] else r.images([2])[2]["top"]
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and img.std() > 5  # a rendered scene
    finally:
        r.close()
    data = load_demo_data([tmp_path / "pix"], 10, with_images=True)
    assert data.images["top"].shape == (summary["frames"], 64, 64, 3) and data.privileged.shape[1] == 4
    # a pixel policy (pi05-tiny: SigLIP-style image tokens + prompt) trains on it and acts in the env from images
    res = train_sft(SFTConfig(datasets=[str(tmp_path / "pix")], config="pi05-tiny", out=str(tmp_path / "pi"),
                              steps=3, batch_size=4, checkpoint_every=3), data=data, progress=False)
    assert np.isfinite(res["final_loss"])
    pol = load_policy(tmp_path / "pi", expect={"camera_names": ["top"], "real_action_dim": 2})
    env = spec.make(max_episode_steps=6)
    try:
        r = P.evaluate(pol, spec.name, [7], n_exec=5, env=env)
        assert r["episodes"] == 1 and r["mean_steps"] == 6
    finally:
        env.close()


def test_render_camera() -> None:
    """images: {cam: render} -> env.render() of the MuJoCo env (render_mode rgb_array) every step."""
    doc = reacher_doc(env_kwargs={"render_mode": "rgb_array", "width": 48, "height": 32},
                      observation={"state": ["[0:4]", "[6:8]"], "privileged": ["[4:10]"], "images": {"top": "render"}})
    env = env_spec_from_dict(doc, ROOT / "examples").make()
    try:
        assert env.cameras == ("top",) and env.privileged_dim == 6
        obs, _ = env.reset(seed=1)
        img0 = obs["images"]["top"]
        assert img0.shape == (32, 48, 3) and img0.dtype == np.uint8 and img0.std() > 5
        for _ in range(5):
            obs, *_ = env.step(np.array([1.0, -1.0]))
        assert np.abs(obs["images"]["top"].astype(int) - img0).sum() > 0  # the arm moved in the picture
    finally:
        env.close()


# ---------------------------------------------------------------------------------------------------- cli
def test_demos_cli_env_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reach"
    assert cli(["demos", "--env-spec", str(SPEC), "--episodes", "4", "--seed", "0", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["successes"] >= 3 and summary["noise"] == 0.1 and summary["env_id"] == "Reacher-v5"
    r = ReplayReader(out)
    try:
        assert r.fps == 50 and len(r.episodes) == 4 and not r.video_keys
        assert r.state.shape == (r.num_frames, 6) and r.action.shape == (r.num_frames, 2)
        assert np.abs(r.action).max() <= 1.0 and r.tasks == ["reach the target"]
        priv = load_privileged(r)
        assert priv is not None and priv.shape == (r.num_frames, 4)
        for row in r.episodes:
            s, e = int(r.ep_start[row["episode_index"]]), int(r.ep_end[row["episode_index"]])
            assert bool(r.done[e - 1]) == row["success"] and float(r.reward[s:e].sum()) == float(row["success"])
    finally:
        r.close()
    assert cli(["demos", "--env-spec", str(SPEC), "--episodes", "1", "--out", str(out)]) == 2  # exists
    assert cli(["demos", "--env-spec", str(SPEC), "--task", "push", "--episodes", "1",
                "--out", str(tmp_path / "x")]) == 2
    assert "exactly one of --task" in capsys.readouterr().err
    bad = spec_file(tmp_path, reacher_doc(env_id="NoSuchEnv-v0"))
    assert cli(["demos", "--env-spec", str(bad), "--episodes", "1", "--out", str(tmp_path / "y")]) == 2
    assert "unknown Gymnasium env id 'NoSuchEnv-v0'" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


# ---------------------------------------------------------------------------------------------------- end to end
def test_end_to_end_spec_demos_sft_rollouts_qvgm_evaluate(tmp_path: Path) -> None:
    spec = load_env_spec(SPEC)
    demo = collect_env_demos(spec, 12, tmp_path / "demos", seed=0)
    assert demo["successes"] >= 11 and demo["state_dim"] == 6 and demo["action_dim"] == 2
    data = load_demo_data([tmp_path / "demos"], 10, with_images=False)
    assert data.state.shape[1] == 6 and data.actions.shape[1:] == (10, 2) and data.privileged.shape[1] == 4
    res = train_sft(SFTConfig(datasets=[str(tmp_path / "demos")], config="state", out=str(tmp_path / "sft"),
                              steps=100, batch_size=64, lr=1e-3, checkpoint_every=100,
                              overrides={**TINY, **spec.policy}),
                    data=data, progress=False)
    assert np.isfinite(res["final_loss"])
    sft = load_policy(tmp_path / "sft")
    assert sft.real_action_dim == 2 and sft.config.state_dim == 6 and sft.config.privileged_dim == 4
    assert sft.config.privileged_norm  # the spec's policy overrides
    env = spec.make()
    try:
        roll = P.collect_rollouts(sft, spec.name, range(100, 124), tmp_path / "buf", n_exec=5, env=env)
        assert 0 < roll["successes"] < roll["episodes"]  # both outcomes: the critic has something to rank
        buf = P.load_buffer(tmp_path / "buf", sft.horizon)
        assert buf.action.shape == (roll["frames"], 2) and buf.demo.privileged.shape == (roll["frames"], 4)
        # critic + Q-VGM through the unchanged `critic_trainer qvgm` command (it reads only the buffer)
        assert cli(["qvgm", "--dataset", str(tmp_path / "buf"), "--policy", str(tmp_path / "sft"), "--out",
                    str(tmp_path / "qvgm"), "--critic-steps", "100", "--critic-batch", "128", "--critic-hidden", "64",
                    "64", "--actor-steps", "10", "--no-progress", "--threads", "1"]) == 0
        summ = json.loads((tmp_path / "qvgm.work" / "summary.json").read_text())
        assert summ["transitions"] > 0 and np.isfinite(summ["critic"]["eval"]["q_data"])
        assert summ["actor"]["action_shift"] > 0  # Q-VGM moved the policy
        man = json.loads((tmp_path / "qvgm" / "manifest.json").read_text())
        assert man["parent"] == sft.manifest["version"] and man["summary"]["method"] == "qvgm"
        new = load_policy(tmp_path / "qvgm")
        crit, _ = P.load_critic(tmp_path / "qvgm")
        assert crit.cfg.real_action_dim == 2 and crit.cfg.n_exec == 5
        r = P.evaluate(new, spec.name, range(900, 910), n_exec=5, env=env)
        assert r["episodes"] == 10 and 0.0 <= r["success_rate"] <= 1.0 and r["mean_steps"] > 0
        b = P.evaluate(P.BestOfNPolicy(sft, crit, n=4, n_exec=5), spec.name, range(900, 903), n_exec=5, env=env)
        assert b["episodes"] == 3
    finally:
        env.close()


def test_learning_bench_env_spec(tmp_path: Path) -> None:
    mod_spec = importlib.util.spec_from_file_location("bench_learning_gym", ROOT / "bench" / "learning.py")
    bench = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(bench)
    res = bench.main(["--env-spec", str(SPEC), "--demos", "3", "--sft-steps", "20", "--rollouts", "3",
                      "--eval-episodes", "3", "--methods", "sft", "--max-episode-steps", "30", "--work",
                      str(tmp_path / "w")])
    s = res["tasks"]["reach"]["summary"]["sft"]
    seed = res["tasks"]["reach"]["seeds"][0]
    assert s["episodes"] == 3 and seed["rollouts"]["episodes"] == 3 and seed["sft"]["demo_successes"] >= 2
    assert res["settings"]["demo_noise"] == [0.1]  # the spec's demos.noise
    r = ReplayReader(next((tmp_path / "w").glob("buffer-*")))
    try:
        assert r.state.shape[1] == 6 and r.action.shape[1] == 2 and r.fps == 50
        assert max(int(e["length"]) for e in r.episodes) <= 30  # --max-episode-steps reached the env
    finally:
        r.close()


def test_learning_bench_env_spec_with_a_demo_dataset(tmp_path: Path) -> None:
    """demos: {dataset: ...}: the benchmark trains SFT on the dataset's first --demos episodes, records nothing."""
    collect_env_demos(load_env_spec(SPEC), 3, tmp_path / "given", seed=50)
    doc = reacher_doc(demos={"dataset": "given"})  # relative to the spec file's folder
    spec = spec_file(tmp_path, doc)
    mod_spec = importlib.util.spec_from_file_location("bench_learning_gym2", ROOT / "bench" / "learning.py")
    bench = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(bench)
    res = bench.main(["--env-spec", str(spec), "--demos", "2", "--sft-steps", "10", "--rollouts", "2",
                      "--eval-episodes", "2", "--methods", "sft", "--max-episode-steps", "10", "--work",
                      str(tmp_path / "w")])
    seed = res["tasks"]["reach"]["seeds"][0]
    r = ReplayReader(tmp_path / "given")
    try:
        first_two = int(r.ep_end[1])  # frames of the dataset's first 2 episodes
    finally:
        r.close()
    assert seed["sft"]["demo_seeds"] == [] and seed["sft"]["frames"] == first_two
    assert not list((tmp_path / "w").glob("demos-*"))  # nothing recorded
    with pytest.raises(EnvSpecError, match="no demos.expert"):
        collect_env_demos(spec, 1, tmp_path / "x")
