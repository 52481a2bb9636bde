"""qvgm_policy_node.loop: a tiny learn-from-experience loop runs every stage for real (MuJoCo sim, rclpy nodes over
DDS, real replay buffer, real CheckpointStore, real SFT and Q-VGM) and resumes without redoing finished stages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("rclpy")
pytest.importorskip("mujoco")

from critic_trainer.pipeline import load_buffer  # noqa: E402
from qvgm.checkpoints import CheckpointStore  # noqa: E402
from qvgm.data import ReplayReader  # noqa: E402
from qvgm_policy_node import loop  # noqa: E402

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
TINY = ["--demos", "3", "--sft-steps", "20", "--rollouts", "2", "--eval-episodes", "2", "--critic-steps", "20",
        "--actor-steps", "2", "--critic-hidden", "32", "32", "--episode-time", "4", "--no-progress"]


def check_round(work: Path, r: int, parent: str, demos: int, rollouts_before: int, rollouts: int,
                last: bool = True) -> str:
    """Round r left: a buffer with demos + all rollouts so far (privileged side files, loadable for Q-VGM), a
    store version whose parent is `parent`, eval episodes served by that version only. Returns the version."""
    state = json.loads((work / loop.STATE_FILE).read_text())["rounds"][str(r)]
    buf = work / "rounds" / f"r{r}" / "buffer"
    rd = ReplayReader(buf, decode_images=False)
    try:
        assert len(rd.episodes) == demos + rollouts_before + rollouts
        got = [str(v) for v in rd.policy_version]
    finally:
        rd.close()
    assert got.count("expert") > 0 and parent in got  # demos + the rollouts of the serving parent
    data = load_buffer(buf, horizon=10)
    assert data.demo.privileged is not None and len(data) == len(data.demo.privileged)
    rollout = data.rollout_frames()  # the critic's rollout emphasis: every frame of the policy's episodes, no demo
    assert rollout.any() and not rollout.all()
    assert set(np.unique(data.episode[rollout]).tolist()) == set(np.unique(data.episode[data.version != "expert"]))
    assert set(data.version[~rollout].tolist()) == {"expert"}
    store = CheckpointStore(work / "store")
    new = state["version"]
    info = {v.version: v for v in store.versions()}
    assert info[new].parent == parent and (store.current() == new or not last)
    assert state["from"] == parent and state["serving"] == new
    assert state["collect_noise_scale"] == 1.0  # the policy node sampled the rollouts as trained
    assert len(state["eval"]) == 2 and all(loop.served_only(e, new) for e in state["eval"])
    assert new in state["version_messages"]  # /qvgm/policy/version reported the hot-reloaded version
    return new


def check_round0(work: Path, v0: str) -> None:
    """Round 0 evaluated the SFT policy v0 itself (before any improvement) on the held-out seeds, through ROS."""
    r0 = json.loads((work / loop.STATE_FILE).read_text())["rounds"]["0"]
    assert r0["evaluated"] and r0["serving"] == v0 and r0["episodes"] == 2
    assert len(r0["eval"]) == 2 and all(loop.served_only(e, v0) for e in r0["eval"])
    assert [e["seed"] for e in r0["eval"]][0] == loop.EVAL_SEED  # the held-out seeds every round uses (seed 0)
    rd = ReplayReader(work / "rounds" / "r0" / "eval", decode_images=False, include_discarded=True)
    try:
        assert {str(v) for v in rd.policy_version} - {""} == {v0}
    finally:
        rd.close()


def check_png(path: Path) -> None:
    """A real PNG image (signature, IHDR with a plausible size)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert 200 <= w <= 2000 and 200 <= h <= 2000


def test_plot_is_a_png_with_one_point_per_round(tmp_path) -> None:
    rows = [{"round": r, "success_rate": k / 10, "ci95": [max(0.0, k / 10 - 0.2), min(1.0, k / 10 + 0.2)],
             "successes": k, "episodes": 10} for r, k in enumerate((5, 6, 8))]
    loop.write_plot(tmp_path / "loop.png", rows, "pick_place")
    check_png(tmp_path / "loop.png")
    assert not list(tmp_path.glob("*.tmp*"))


def test_recipe_defaults_and_cli_overrides() -> None:
    """The loop's SFT settings are the task's recipe (the learning benchmark's table) unless given on the CLI."""
    from critic_trainer.recipes import sft_recipe

    args = loop.build_parser().parse_args([])
    loop.resolve_recipe(args)
    r = sft_recipe("pick_place")
    assert args.task == "pick_place"
    assert (args.demos, args.demo_noise, args.sft_steps, args.ema, args.success_only) == \
        (r["demos"], r["demo_noise"], r["sft_steps"], r["ema"], r["success_only"])
    assert args.sft_overrides == r["state_flags"] and args.sft_batch == 64 and args.sft_lr == 1e-3
    # the loop's own sizes: sim time at 2x real time, 20 + 20 episodes per round, 1500 critic updates, uniform batches
    assert (args.real_time_factor, args.rollouts, args.eval_episodes, args.critic_steps) == (2.0, 20, 20, 1500)
    assert loop.improve_config(args).critic_rollout_fraction == 0.0
    assert loop.improve_config(loop.build_parser().parse_args(
        ["--critic-rollout-fraction", "0.5"])).critic_rollout_fraction == 0.5
    cfg = loop.improve_config(args)
    assert (cfg.critic_hidden, cfg.reg_weight, cfg.actor_steps, cfg.actor_lr, cfg.actor_batch, cfg.ascent_lr,
            cfg.gate_last_m, cfg.critic_batch) == ((256, 256), 0.1, 300, 1e-4, 64, 0.02, 5, 256)
    assert cfg.ascent_lr == type(cfg)().ascent_lr and cfg.action_box == "data"  # the loop runs the chosen defaults
    args = loop.build_parser().parse_args(["--task", "stack", "--demos", "7", "--sft-steps", "11",
                                           "--success-only", "0", "--backbone", "pi05-small"])
    loop.resolve_recipe(args)
    assert (args.demos, args.sft_steps, args.success_only) == (7, 11, False)
    assert args.demo_noise == sft_recipe("stack")["demo_noise"] and args.sft_overrides == {}  # flags: state only
    # the Q-VGM step is the task's (stack chose its own on tuning scenes) unless given
    assert args.ascent_lr == 0.005 and loop.improve_config(args).ascent_lr == 0.005
    args = loop.build_parser().parse_args(["--task", "stack", "--ascent-lr", "0.01"])
    loop.resolve_recipe(args)
    assert loop.improve_config(args).ascent_lr == 0.01


def test_tiny_loop_runs_every_stage_and_resumes(tmp_path, capsys) -> None:
    work = tmp_path / "loop"
    t0 = time.monotonic()
    assert loop.main(["--work", str(work), "--rounds", "1", *TINY, "--eval-noise-scale", "0"]) == 0
    out = capsys.readouterr().out
    for stage in ("demos:", "sft:", "collect 2/2", "improve:", "reload:", "eval 2/2", "summary:", "noise scale 0;"):
        assert stage in out, (stage, out)
    v0 = json.loads((work / loop.STATE_FILE).read_text())["v0"]
    check_round0(work, v0)
    v1 = check_round(work, 1, v0, demos=3, rollouts_before=0, rollouts=2)
    summary = json.loads((work / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    row0, row = summary["rounds"]
    assert summary["v0"] == v0 and row0["serving"] == v0 and row["serving"] == v1 and row["episodes"] == 2
    assert row0["eval_noise_scale"] == row["eval_noise_scale"] == 0.0  # both evaluated deterministically
    for r in (row0, row):
        lo, hi = r["ci95"]
        assert 0.0 <= lo <= r["success_rate"] <= hi <= 1.0
    assert row0["delta_vs_round0"] == 0.0
    assert row["delta_vs_round0"] == pytest.approx(row["success_rate"] - row0["success_rate"])
    table = out.split("serving version")[1]
    assert v0 in table.split("\n")[1] and "SFT" in table.split("\n")[1] and v1 in table.split("\n")[2]
    # per-stage wall times, control-loop health of the ROS stages, critic quality / actor Q of the round
    t = summary["timing_s"]
    assert t["demos"] > 0 and t["sft"] > 0 and t["rounds"]["0"]["eval"] > 0
    assert all(t["rounds"]["1"][k] > 0 for k in ("collect", "critic", "actor", "eval"))
    assert row["collect_health"]["robot_s"] > 0 and row["eval_health"]["missed_ticks"] >= 0
    assert set(row["improve"]) >= {"critic_mc_corr", "q_policy_before", "q_policy_after"}
    check_png(work / "loop.png")
    first = time.monotonic() - t0
    demos_stamp = (work / "demos.done").stat().st_mtime_ns
    sft_stamp = (work / "sft_v0" / "manifest.json").stat().st_mtime_ns

    # a second run with the same work dir resumes: nothing is redone, the same table comes out
    t1 = time.monotonic()
    assert loop.main(["--work", str(work), "--rounds", "1", *TINY, "--eval-noise-scale", "0"]) == 0
    out = capsys.readouterr().out
    assert "demos: present" in out and "skipped" in out.split("sft:")[1].split("\n")[0]
    assert "rounds: all 1 rounds finished, skipped" in out
    assert (work / "demos.done").stat().st_mtime_ns == demos_stamp
    assert (work / "sft_v0" / "manifest.json").stat().st_mtime_ns == sft_stamp
    assert len(CheckpointStore(work / "store").versions()) == 2
    assert time.monotonic() - t1 < first / 2
    # another noise scale on the same work dir would mix two scales in one table: refused, nothing touched
    with pytest.raises(SystemExit, match="evaluated at noise scale 0"):
        loop.main(["--work", str(work), "--rounds", "2", *TINY])
    assert len(CheckpointStore(work / "store").versions()) == 2


def test_sft_stage_fine_tunes_a_pretrained_checkpoint(tmp_path) -> None:
    """--sft-init CKPT: v0 starts from the checkpoint's weights (one step moves them little), names it as its parent,
    takes its architecture (no recipe flags on top); a non-checkpoint or a contradicting --backbone is refused."""
    from qvgm.policy import load_policy

    log = loop.Progress()
    base_work = tmp_path / "base"
    base_work.mkdir()
    args = loop.build_parser().parse_args(["--work", str(base_work), *TINY])
    loop.resolve_recipe(args)
    demos = loop.stage_demos(args, base_work, log)
    loop.stage_sft(args, base_work, demos, loop.LoopState(base_work), log)
    base_dir = base_work / "sft_v0"
    args = loop.build_parser().parse_args(["--work", str(tmp_path / "ft"), *TINY, "--sft-steps", "1",
                                           "--sft-init", str(base_dir)])
    loop.resolve_recipe(args)
    assert args.backbone == "state" and args.sft_overrides == {}
    (tmp_path / "ft").mkdir()
    v0 = loop.stage_sft(args, tmp_path / "ft", demos, loop.LoopState(tmp_path / "ft"), log)
    assert CheckpointStore(tmp_path / "ft" / "store").current() == v0
    base, tuned = load_policy(base_dir), load_policy(tmp_path / "ft" / "sft_v0")
    assert tuned.manifest["parent"] == base.version and tuned.manifest["summary"]["init"] == str(base_dir)
    sb, st = base.state_dict(), tuned.state_dict()
    assert set(sb) == set(st)
    moved = sum(float((st[k] - v).abs().sum()) for k, v in sb.items() if v.is_floating_point())
    scale = sum(float(v.abs().sum()) for v in sb.values() if v.is_floating_point())
    assert 0 < moved < 0.01 * scale, (moved, scale)  # fine-tuned from the base, not fresh weights
    with pytest.raises(SystemExit):
        loop.main(["--work", str(tmp_path / "x"), "--sft-init", str(tmp_path / "nowhere")])
    args = loop.build_parser().parse_args(["--work", str(tmp_path / "y"), *TINY, "--sft-init", str(base_dir),
                                           "--backbone", "pi05-tiny"])
    loop.resolve_recipe(args)
    (tmp_path / "y").mkdir()
    with pytest.raises(ValueError, match="is a state policy"):
        loop.stage_sft(args, tmp_path / "y", demos, loop.LoopState(tmp_path / "y"), log)


def test_bad_sizes_are_refused(tmp_path) -> None:
    with pytest.raises(SystemExit):
        loop.main(["--work", str(tmp_path), "--rollouts", "0"])
    with pytest.raises(SystemExit):
        loop.main(["--work", str(tmp_path), "--image-size", "63"])
    with pytest.raises(SystemExit):  # sim seconds per wall second must be positive (any factor > 0 runs on sim time)
        loop.main(["--work", str(tmp_path), "--real-time-factor", "0"])
    with pytest.raises(SystemExit):  # a batch cannot be all rollouts (nor a negative share)
        loop.main(["--work", str(tmp_path), "--critic-rollout-fraction", "1"])
    for bad in ("-1", "nan"):
        with pytest.raises(SystemExit):
            loop.main(["--work", str(tmp_path), "--eval-noise-scale", bad])
    assert not (tmp_path / "demos").exists()


@pytest.mark.slow
def test_sigint_stops_cleanly_and_the_rerun_finishes_two_rounds(tmp_path) -> None:
    """Ctrl-C during round 1's collection: exit 130, store and demos valid; the rerun finishes 2 rounds."""
    work = tmp_path / "loop"
    cmd = [sys.executable, "-m", "qvgm_policy_node.loop", "--work", str(work), "--rounds", "2", *TINY]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ.copy())
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "collect 1/2" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(lines) + rest
    assert "interrupted" in rest
    store = CheckpointStore(work / "store")
    v0 = store.current()
    assert v0 is not None and len(store.versions()) == 1
    store.verify(v0)
    assert loop.main(["--work", str(work), "--rounds", "2", *TINY]) == 0
    check_round0(work, v0)
    v1 = check_round(work, 1, v0, demos=3, rollouts_before=0, rollouts=2, last=False)
    check_round(work, 2, v1, demos=3, rollouts_before=2, rollouts=2)
    summary = json.loads((work / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    check_png(work / "loop.png")
