"""`critic_trainer qvgm --watch` through the real CLI in a subprocess: a round on the buffer as found, a new round
when enough new labelled episodes land (from the store's current version, published as its child), a buffer it
cannot learn from publishes nothing, SIGTERM ends the watch with the store valid."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from helpers import wait_for
from test_pipeline import FAST, tiny_policy, write_buffer

from critic_trainer.demos import write_privileged
from critic_trainer.watch import labelled_episodes
from qvgm.checkpoints import CheckpointStore
from qvgm.data import ReplayBuffer

ROOT = Path(__file__).resolve().parents[1]


def append_episodes(root: Path, outcomes: list[bool], length: int = 24, seed: int = 1) -> None:
    """Append episodes to an existing buffer like a recorder would (same layout as test_pipeline.write_buffer)."""
    rng = np.random.default_rng(seed)
    buf = ReplayBuffer.open(root)
    try:
        for ok in outcomes:
            ep = buf.begin_episode(task="push the red cube", start_stamp=0.0)
            goal = rng.uniform(-0.5, 0.5, 7)
            for i in range(length):
                last = i == length - 1
                obs = {"images": {}, "state": (goal * i / length).astype(np.float32), "prompt": "push the red cube",
                       "stamp": i * 0.1}
                ep.add_frame(obs, (goal + (0.0 if ok else 0.3)).astype(np.float32),
                             reward=float(ok and last), done=bool(ok and last), policy_version="sft")
            idx = ep.finish(success=ok, label_source="auto")
            write_privileged(root, idx, rng.normal(size=(length, 21)).astype(np.float32))
    finally:
        buf.close()


def start_watch(buffer: Path, policy: Path, store: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "critic_trainer.cli", "qvgm", "--dataset", str(buffer), "--policy", str(policy),
           "--store", str(store), "--watch", "--watch-min-episodes", "2", "--watch-poll", "0.2", "--n-exec", "3",
           *FAST, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_watch_improves_again_when_new_episodes_land(tmp_path: Path) -> None:
    buf = write_buffer(tmp_path / "buf", [True, False, True, False])
    pol = tiny_policy(tmp_path)
    store = tmp_path / "store"
    proc = start_watch(buf, pol, store, "--watch-rounds", "2")
    try:
        st = CheckpointStore(store)
        wait_for(lambda: st.current() is not None and len(st.versions()) >= 2, 120, interval=0.2)  # init + round 1
        append_episodes(buf, [False])
        time.sleep(1.0)  # one new episode < --watch-min-episodes 2: no round
        assert len(st.versions()) == 2
        append_episodes(buf, [True], seed=2)
        out, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    rounds = json.loads(out.strip().splitlines()[-1])["watch_rounds"]
    assert [r["episodes"] for r in rounds] == [4, 6]
    v0 = st.versions()[0].version
    assert rounds[0]["parent"] == v0 and rounds[1]["parent"] == rounds[0]["version"]  # each from what served
    assert st.current() == rounds[1]["version"]
    assert st.manifest(rounds[1]["version"])["summary"]["episodes"] == 6  # trained on the whole grown buffer
    lines = (store / "work" / "watch.jsonl").read_text().splitlines()
    assert [json.loads(ln)["version"] for ln in lines] == [r["version"] for r in rounds]


def test_watch_waits_without_outcomes_and_stops_on_sigterm(tmp_path: Path) -> None:
    buf = write_buffer(tmp_path / "buf", [False, False])  # nothing to rank yet
    pol = tiny_policy(tmp_path)
    store = tmp_path / "store"
    proc = start_watch(buf, pol, store)
    try:
        st = CheckpointStore(store)
        wait_for(lambda: (store / "work").exists() or proc.poll() is not None, 120, interval=0.2)
        time.sleep(2.0)
        assert proc.poll() is None and len(st.versions()) == 1  # only the init: nothing published
        append_episodes(buf, [True, False])
        wait_for(lambda: len(st.versions()) == 2, 120, interval=0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "nothing published" in out and "stopped by SIGTERM" in out
    assert st.current() == st.versions()[-1].version  # a whole, current version
    assert labelled_episodes(buf) == 4


def test_watch_needs_a_store(tmp_path: Path) -> None:
    from critic_trainer import cli

    buf = write_buffer(tmp_path / "buf", [True, False])
    pol = tiny_policy(tmp_path)
    assert cli.main(["qvgm", "--dataset", str(buf), "--policy", str(pol), "--out", str(tmp_path / "o"), "--watch",
                     *FAST]) == 2
    assert labelled_episodes(tmp_path / "missing") == 0
