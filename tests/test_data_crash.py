"""Crash safety of the replay buffer with real processes: SIGKILL at random moments, and a real full disk.

Run as a script (`python tests/test_data_crash.py writer ROOT` / `diskfull DIR`) it is the child process.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CAMS = {"front": (64, 64), "wrist": (48, 64)}
FPS = 15


def content(k: int) -> dict:
    """Deterministic content of episode k: length, states, actions, rewards and a smooth image pattern seed."""
    rng = np.random.default_rng(1000 + k)
    n = int(rng.integers(8, 30))
    return {"n": n, "state": rng.normal(size=(n, 7)).astype(np.float32),
            "action": rng.normal(size=(n, 7)).astype(np.float32),
            "reward": (rng.random(n) < 0.1).astype(np.float32)}


def image(h: int, w: int, i: int, k: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 127 + 100 * np.sin((xx + 4 * i + 7 * k) / 8.0)
    g = 127 + 100 * np.cos((yy + 3 * i) / 6.0)
    return np.stack([r, g, np.full_like(xx, (31 * k + 5 * i) % 220)], -1).astype(np.uint8)


def write_content(buf, k: int, cams: dict = CAMS, announce: bool = False) -> int:  # noqa: ANN001 - ReplayBuffer
    c = content(k)
    ep = buf.begin_episode()
    for i in range(c["n"]):
        obs = {"images": {cam: image(h, w, i, k) for cam, (h, w) in cams.items()}, "state": c["state"][i],
               "prompt": f"task {k % 3}", "stamp": 10.0 * k + i / FPS}
        ep.add_frame(obs, c["action"][i], reward=float(c["reward"][i]), done=i == c["n"] - 1,
                     policy_version=f"v{k % 2}")
    if announce:
        print("FINISHING", k, flush=True)
    return ep.finish(success=bool(k % 2), label_source="auto")


def child_writer(root: str) -> None:
    from qvgm.data import ReplayBuffer

    buf = ReplayBuffer.open_or_create(root, fps=FPS, cameras=CAMS)
    print("READY", json.dumps(buf.repair_report), flush=True)
    while True:
        k = buf.num_episodes
        assert write_content(buf, k, announce=True) == k
        print("COMMITTED", k, flush=True)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def committed_files(root: Path) -> dict[str, str]:
    """sha256 of every data/video file (after a repair these are exactly the committed episodes' files)."""
    return {str(p.relative_to(root)): sha(p) for top in ("data", "videos") for p in sorted((root / top).rglob("*"))
            if p.is_file()}


def kill_rounds(tmp_path: Path, rounds: int, seed: int) -> None:
    from qvgm.data import ReplayBuffer, ReplayReader

    root = tmp_path / "buf"
    rnd = random.Random(seed)
    files_before: dict[str, str] = {}
    printed: set[int] = set()
    partial_seen = orphans_seen = 0
    for rnd_i in range(rounds):
        proc = subprocess.Popen([sys.executable, __file__, "writer", str(root)], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            line = proc.stdout.readline()
            assert line.startswith("READY"), (line, proc.stderr.read() if proc.poll() is not None else "")
            early = ""
            if rnd_i % 2:  # odd rounds: kill while finish() commits (tmp files, renames, index rewrite)
                while not (line := proc.stdout.readline()).startswith("FINISHING"):
                    assert line, proc.stderr.read()
                    early += line
                time.sleep(rnd.uniform(0.0, 0.03))
            else:  # even rounds: kill at a random moment
                time.sleep(rnd.uniform(0.05, 0.9))
        finally:
            proc.send_signal(signal.SIGKILL)
            out, _ = proc.communicate(timeout=30)
        out = early + out
        assert proc.returncode == -signal.SIGKILL
        printed |= {int(x.split()[1]) for x in out.splitlines() if x.startswith("COMMITTED")}

        with ReplayBuffer.open(root) as buf:  # repairs
            rep = buf.repair_report
            partial_seen += len(rep["staging_removed"])
            orphans_seen += len(rep["orphans_removed"])
            n = buf.num_episodes
            assert printed <= set(range(n)), "an episode reported committed was lost"
            assert not any((root / ".staging").iterdir())
            info = json.loads((root / "meta/info.json").read_text())
            assert (info["total_episodes"], info["total_frames"]) == (n, buf.total_frames)
        files_now = committed_files(root)
        # every earlier committed file is still there, bit for bit; nothing unreferenced is left
        assert {k: files_now.get(k) for k in files_before} == files_before
        assert len(files_now) == n * (1 + len(CAMS))
        files_before = files_now

    r = ReplayReader(root)
    try:
        assert r.num_frames == sum(content(k)["n"] for k in range(len(r.episodes)))
        assert len(r.episodes) >= 1
        for k, row in enumerate(r.episodes):
            c = content(k)
            s, e = r.ep_start[k], r.ep_end[k]
            assert row["length"] == c["n"] and row["success"] == bool(k % 2)
            np.testing.assert_array_equal(r.state[s:e], c["state"])
            np.testing.assert_array_equal(r.action[s:e], c["action"])
            np.testing.assert_array_equal(r.reward[s:e], c["reward"])
            last = int(e - 1)
            img = r.images([last])[last]["front"]
            err = np.mean((img.astype(float) - image(64, 64, c["n"] - 1, k).astype(float)) ** 2)
            assert 10 * np.log10(255**2 / max(err, 1e-9)) > 30
    finally:
        r.close()
    print(f"kill -9 rounds={rounds}: {len(r.episodes)} episodes committed, {partial_seen} partial episodes "
          f"discarded, {orphans_seen} uncommitted data/video files removed")


def test_sigkill_writer_keeps_finished_episodes(tmp_path: Path) -> None:
    kill_rounds(tmp_path, rounds=5, seed=7)


@pytest.mark.slow
def test_sigkill_writer_many_rounds(tmp_path: Path) -> None:
    kill_rounds(tmp_path, rounds=40, seed=11)


# ---------------------------------------------------------------------------------------------- disk full


def child_diskfull(mount_dir: str) -> None:
    """Inside a private mount namespace: a 1 MiB tmpfs, one small episode, then one that cannot fit."""
    from qvgm.data import DiskFullError, ReplayBuffer, ReplayReader

    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mount_dir], check=True)
    root = Path(mount_dir) / "buf"
    result: dict = {}
    buf = ReplayBuffer.create(root, fps=FPS, cameras={"front": (64, 64)})
    write_content(buf, 0, {"front": (64, 64)})
    before = committed_files(root)
    meta_before = (root / "meta/episodes/chunk-000/file-000.parquet").read_bytes()
    rng = np.random.default_rng(0)
    ep = buf.begin_episode("noise")
    try:
        for _ in range(2000):  # ~2000 noise frames of 64x64 (~12 kB each in h264) cannot fit in 1 MiB
            ep.add_frame({"images": {"front": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)},
                          "state": np.zeros(7, np.float32), "prompt": "noise"}, np.zeros(7))
        ep.finish(success=True, label_source="auto")
        result["raised"] = None
    except DiskFullError as exc:
        result["raised"] = f"DiskFullError: {exc}"
    result["frames_when_refused"] = len(ep)
    result["staging_left"] = sorted(os.listdir(root / ".staging")) if (root / ".staging").exists() else []
    result["num_episodes_after"] = buf.num_episodes
    result["files_unchanged"] = committed_files(root) == before
    result["meta_unchanged"] = (root / "meta/episodes/chunk-000/file-000.parquet").read_bytes() == meta_before
    result["free_bytes"] = shutil.disk_usage(root).free
    # the buffer stays usable: another small episode commits
    result["next_index"] = write_content(buf, 1, {"front": (64, 64)})
    # leave only `budget` bytes free so that finish() fails at different points (mp4 trailer, frames parquet,
    # episodes parquet commit, derived files); each attempt either commits or is refused with the buffer valid
    outcomes = []
    for budget in (0, 4096, 8192, 12288, 16384, 24576, 32768, 49152, 65536, 98304):
        n_before = buf.num_episodes
        files_before = committed_files(root)
        filler = Path(mount_dir) / "filler"
        free = shutil.disk_usage(root).free
        with open(filler, "wb") as f:
            try:
                f.write(b"\0" * max(free - budget, 0))
            except OSError:
                pass
        try:
            write_content(buf, n_before, {"front": (64, 64)})
            outcome = "committed"
        except DiskFullError as exc:
            outcome = "refused:" + str(exc).split("(", 1)[-1][:160]
        filler.unlink()
        files_after = committed_files(root)
        ok = all(files_after.get(k) == v for k, v in files_before.items())
        ok &= buf.num_episodes == n_before + (outcome == "committed")
        ok &= len(files_after) == 2 * buf.num_episodes  # frames parquet + front mp4 per episode
        outcomes.append({"budget": budget, "outcome": outcome, "ok": bool(ok)})
    result["budget_outcomes"] = outcomes
    buf.close()
    with ReplayBuffer.open(root) as b2:
        result["repair"] = b2.repair_report
    r = ReplayReader(root)
    result["reader_lengths"] = [row["length"] for row in r.episodes][:2]
    result["reader_total"] = [r.num_frames, sum(content(k)["n"] for k in range(len(r.episodes)))]
    result["states_equal"] = bool(np.array_equal(r.state[: content(0)["n"]], content(0)["state"]))
    r.close()
    print("RESULT", json.dumps(result), flush=True)


def test_disk_full_refuses_episode_and_keeps_buffer_valid(tmp_path: Path) -> None:
    """A real full disk: 1 MiB tmpfs in a private mount namespace (`unshare -m`, or `-rm` when not root)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) not available: cannot mount a private tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cmd = ["unshare", "-m" if os.geteuid() == 0 else "-rm", sys.executable, __file__, "diskfull", str(mnt)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0 and "mount" in proc.stderr and "RESULT" not in proc.stdout:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert res["raised"] and res["raised"].startswith("DiskFullError") and "disk full" in res["raised"], res
    assert res["staging_left"] == [] and res["num_episodes_after"] == 1
    assert res["files_unchanged"] and res["meta_unchanged"]
    assert res["free_bytes"] > 500_000  # the refused episode's staged files were removed
    assert res["next_index"] == 1 and res["reader_lengths"] == [content(0)["n"], content(1)["n"]]
    assert res["states_equal"]
    assert res["repair"]["staging_removed"] == [] and res["repair"]["orphans_removed"] == []
    assert res["reader_total"][0] == res["reader_total"][1]
    outs = res["budget_outcomes"]
    assert all(o["ok"] for o in outs), outs
    assert any(o["outcome"] == "committed" for o in outs) and any(o["outcome"] != "committed" for o in outs), outs


if __name__ == "__main__":
    {"writer": child_writer, "diskfull": child_diskfull}[sys.argv[1]](sys.argv[2])
