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
    store = CheckpointStore(work / "store")
    new = state["version"]
    info = {v.version: v for v in store.versions()}
    assert info[new].parent == parent and (store.current() == new or not last)
    assert state["from"] == parent and state["serving"] == new
    assert len(state["eval"]) == 2 and all(e["versions"] == [new] for e in state["eval"])
    assert new in state["version_messages"]  # /qvgm/policy/version reported the hot-reloaded version
    return new


def test_tiny_loop_runs_every_stage_and_resumes(tmp_path, capsys) -> None:
    work = tmp_path / "loop"
    t0 = time.monotonic()
    assert loop.main(["--work", str(work), "--rounds", "1", *TINY]) == 0
    out = capsys.readouterr().out
    for stage in ("demos:", "sft:", "collect 2/2", "improve:", "reload:", "eval 2/2", "summary:"):
        assert stage in out, (stage, out)
    v0 = json.loads((work / loop.STATE_FILE).read_text())["v0"]
    v1 = check_round(work, 1, v0, demos=3, rollouts_before=0, rollouts=2)
    summary = json.loads((work / "summary.json").read_text())
    row = summary["rounds"][0]
    assert summary["v0"] == v0 and row["serving"] == v1 and row["episodes"] == 2
    lo, hi = row["ci95"]
    assert 0.0 <= lo <= row["success_rate"] <= hi <= 1.0
    assert f"{v1}" in out.split("serving version")[1]  # the table
    first = time.monotonic() - t0
    demos_stamp = (work / "demos.done").stat().st_mtime_ns
    sft_stamp = (work / "sft_v0" / "manifest.json").stat().st_mtime_ns

    # a second run with the same work dir resumes: nothing is redone, the same table comes out
    t1 = time.monotonic()
    assert loop.main(["--work", str(work), "--rounds", "1", *TINY]) == 0
    out = capsys.readouterr().out
    assert "demos: present" in out and "skipped" in out.split("sft:")[1].split("\n")[0]
    assert "rounds: all 1 rounds finished, skipped" in out
    assert (work / "demos.done").stat().st_mtime_ns == demos_stamp
    assert (work / "sft_v0" / "manifest.json").stat().st_mtime_ns == sft_stamp
    assert len(CheckpointStore(work / "store").versions()) == 2
    assert time.monotonic() - t1 < first / 2


def test_bad_sizes_are_refused(tmp_path) -> None:
    with pytest.raises(SystemExit):
        loop.main(["--work", str(tmp_path), "--rollouts", "0"])
    with pytest.raises(SystemExit):
        loop.main(["--work", str(tmp_path), "--image-size", "63"])
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
    v1 = check_round(work, 1, v0, demos=3, rollouts_before=0, rollouts=2, last=False)
    check_round(work, 2, v1, demos=3, rollouts_before=2, rollouts=2)
    summary = json.loads((work / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
