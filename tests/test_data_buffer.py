"""Replay buffer round trip against the LeRobotDataset v3.0 format, field by field; reader semantics."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qvgm.data import DatasetError, ReplayBuffer, ReplayReader, returns_to_go, stack_windows
from qvgm.data.video import probe

CAMS = {"front": (64, 80), "wrist": (48, 64)}
FPS = 10


def frame_image(h: int, w: int, i: int, seed: int) -> np.ndarray:
    """Smooth moving pattern (compresses like a real scene, unlike noise)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 127 + 100 * np.sin((xx + 3 * i + seed) / 9.0)
    g = 127 + 100 * np.cos((yy + 2 * i) / 7.0)
    b = np.full_like(xx, (40 + 9 * i + 13 * seed) % 200)
    return np.stack([r, g, b], -1).astype(np.uint8)


def make_obs(i: int, seed: int, prompt: str = "put the red cube in the bowl") -> dict:
    rng = np.random.default_rng(seed * 1000 + i)
    return {"images": {c: frame_image(h, w, i, seed) for c, (h, w) in CAMS.items()},
            "state": rng.normal(size=7).astype(np.float32), "prompt": prompt, "stamp": 100.0 + seed + i / FPS}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def write_episode(buf: ReplayBuffer, seed: int, length: int, success: bool | None = True,
                  intervene: tuple[int, int] = (-1, -1), version: str = "v1", prompt: str | None = None,
                  done_at_end: bool = True) -> tuple[int, dict]:
    rng = np.random.default_rng(seed)
    rec = {"state": [], "action": [], "reward": [], "done": [], "interv": [], "version": []}
    ep = buf.begin_episode()
    for i in range(length):
        obs = make_obs(i, seed) if prompt is None else make_obs(i, seed, prompt)
        act = rng.normal(size=7).astype(np.float32)
        rew = float(rng.random() < 0.2)
        done = done_at_end and i == length - 1
        interv = intervene[0] <= i < intervene[1]
        ver = "human" if interv else version
        ep.add_frame(obs, act, reward=rew, done=done, is_intervention=interv, policy_version=ver)
        for k, v in zip(rec, (obs["state"], act, rew, done, interv, ver), strict=True):
            rec[k].append(v)
    idx = ep.finish(success=success, label_source=None if success is None else "auto", duration_s=length / FPS,
                    notes=json.dumps({"seed": seed}))
    return idx, rec


@pytest.fixture()
def dataset(tmp_path: Path) -> tuple[Path, list[dict]]:
    root = tmp_path / "buf"
    with ReplayBuffer.create(root, fps=FPS, cameras=CAMS) as buf:
        recs = [write_episode(buf, seed=0, length=12)[1],
                write_episode(buf, seed=1, length=9, success=False, intervene=(3, 6), version="v2",
                              prompt="open the drawer", done_at_end=False)[1],
                write_episode(buf, seed=2, length=15, success=None)[1]]
    return root, recs


def test_layout_matches_lerobot_v30_field_by_field(dataset: tuple[Path, list[dict]]) -> None:
    root, recs = dataset
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0"
    assert info["robot_type"] == "qvgm_tabletop"
    assert (info["total_episodes"], info["total_frames"], info["total_tasks"]) == (3, 36, 2)
    assert info["chunks_size"] == 1000 and info["fps"] == FPS
    assert info["data_files_size_in_mb"] > 0 and info["video_files_size_in_mb"] > 0
    assert info["splits"] == {"train": "0:3"}
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    feats = info["features"]
    for key in ("timestamp", "frame_index", "episode_index", "index", "task_index", "observation.state", "action",
                "next.reward", "next.done", "complementary_info.is_intervention",
                "complementary_info.policy_version"):
        assert {"dtype", "shape", "names"} <= set(feats[key]), key
    assert feats["observation.state"] == {"dtype": "float32", "shape": [7], "names": feats["action"]["names"]}
    assert feats["timestamp"]["dtype"] == "float32" and feats["index"]["dtype"] == "int64"
    for cam, (h, w) in CAMS.items():
        f = feats[f"observation.images.{cam}"]
        assert f["dtype"] == "video" and f["shape"] == [h, w, 3] and f["names"] == ["height", "width", "channels"]
        assert f["info"]["video.codec"] == "h264" and f["info"]["video.pix_fmt"] == "yuv420p"
        assert (f["info"]["video.height"], f["info"]["video.width"], f["info"]["video.fps"]) == (h, w, FPS)

    # frames parquet: one episode per file, types as HF datasets would write them
    t = pq.read_table(root / "data/chunk-000/file-001.parquet")
    assert t.schema.field("observation.state").type == pa.list_(pa.float32(), 7)
    assert t.schema.field("action").type == pa.list_(pa.float32(), 7)
    assert t.schema.field("timestamp").type == pa.float32()
    assert t.schema.field("next.done").type == pa.bool_()
    assert t.schema.field("complementary_info.policy_version").type == pa.string()
    assert b"huggingface" in t.schema.metadata
    assert t.column("episode_index").to_pylist() == [1] * 9
    assert t.column("index").to_pylist() == list(range(12, 21))
    np.testing.assert_allclose(t.column("timestamp").to_numpy(), np.arange(9) / FPS, atol=1e-6)
    assert t.column("task_index").to_pylist() == [1] * 9

    # episodes metadata
    ep = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [e["episode_index"] for e in ep] == [0, 1, 2] and [e["length"] for e in ep] == [12, 9, 15]
    assert [(e["dataset_from_index"], e["dataset_to_index"]) for e in ep] == [(0, 12), (12, 21), (21, 36)]
    assert ep[1]["tasks"] == ["open the drawer"]
    assert [e["data/file_index"] for e in ep] == [0, 1, 2] and all(e["data/chunk_index"] == 0 for e in ep)
    for cam in CAMS:
        k = f"videos/observation.images.{cam}"
        assert [e[f"{k}/file_index"] for e in ep] == [0, 1, 2]
        assert ep[1][f"{k}/from_timestamp"] == 0.0 and ep[1][f"{k}/to_timestamp"] == pytest.approx(0.9)
    assert [(e["success"], e["label_source"]) for e in ep] == [(True, "auto"), (False, "auto"), (None, None)]
    assert [e["discarded"] for e in ep] == [False] * 3 and ep[1]["num_intervention_frames"] == 3
    assert ep[0]["duration_s"] == pytest.approx(1.2) and ep[1]["policy_versions"] == ["human", "v2"]
    assert ep[0]["stats/action/mean"] == pytest.approx(np.mean(recs[0]["action"], 0).tolist(), abs=1e-6)
    assert ep[0]["meta/episodes/chunk_index"] == 0 and ep[0]["meta/episodes/file_index"] == 0
    assert json.loads(ep[2]["notes"]) == {"seed": 2}

    # tasks: pandas-style index "task" -> task_index
    tt = pq.read_table(root / "meta/tasks.parquet")
    assert tt.to_pydict() == {"task_index": [0, 1], "task": ["put the red cube in the bowl", "open the drawer"]}
    assert json.loads(tt.schema.metadata[b"pandas"])["index_columns"] == ["task"]

    # stats.json aggregates every numeric feature and the cameras ([3,1,1] like LeRobot)
    stats = json.loads((root / "meta/stats.json").read_text())
    allact = np.concatenate([np.stack(r["action"]) for r in recs])
    np.testing.assert_allclose(stats["action"]["mean"], allact.mean(0), atol=1e-5)
    np.testing.assert_allclose(stats["action"]["std"], allact.std(0), atol=1e-5)
    np.testing.assert_allclose(stats["action"]["min"], allact.min(0), atol=1e-6)
    assert stats["action"]["count"] == [36]
    assert np.asarray(stats["observation.images.front"]["mean"]).shape == (3, 1, 1)
    assert {"q01", "q99"} <= set(stats["observation.state"])

    # videos: h264 yuv420p, one frame per row
    for cam, (h, w) in CAMS.items():
        p = probe(root / f"videos/observation.images.{cam}/chunk-000/file-002.mp4")
        assert (p["codec"], p["pix_fmt"], p["height"], p["width"], p["frames"]) == ("h264", "yuv420p", h, w, 15)


def test_round_trip_values_and_images(dataset: tuple[Path, list[dict]]) -> None:
    root, recs = dataset
    r = ReplayReader(root)
    try:
        assert r.num_frames == 36 and len(r) == 36
        for e, rec in enumerate(recs):
            s, t = r.ep_start[e], r.ep_end[e]
            np.testing.assert_array_equal(r.state[s:t], np.stack(rec["state"]))
            np.testing.assert_array_equal(r.action[s:t], np.stack(rec["action"]))
            np.testing.assert_array_equal(r.reward[s:t], np.asarray(rec["reward"], np.float32))
            np.testing.assert_array_equal(r.done[s:t], rec["done"])
            np.testing.assert_array_equal(r.is_intervention[s:t], rec["interv"])
            assert list(r.policy_version[s:t]) == rec["version"]
        seed_of = {0: 0, 1: 1, 2: 2}
        picks = [0, 5, 11, 12, 20, 35, 23]
        imgs = r.images(picks)
        for g in picks:
            e, i = int(r.episode_index[g]), int(r.frame_index[g])
            for cam, (h, w) in CAMS.items():
                got = imgs[g][cam]
                assert got.dtype == np.uint8 and got.shape == (h, w, 3)
                assert psnr(got, frame_image(h, w, i, seed_of[e])) > 30.0
        obs = r.observation(13)
        assert obs["prompt"] == "open the drawer" and obs["stamp"] == pytest.approx(101.1)
        assert set(obs["images"]) == set(CAMS)
    finally:
        r.close()


def test_chunk_windows_returns_and_filters(dataset: tuple[Path, list[dict]]) -> None:
    root, recs = dataset
    gamma = 0.9
    r = ReplayReader(root, gamma=gamma, decode_images=False)
    n = 4
    starts = set(r.window_starts(n).tolist())
    # ep0 (len 12, done at end): every start valid; ep1 (len 9, no done): only i + n <= 8; ep2 all valid
    assert starts == set(range(0, 12)) | set(range(12, 12 + 5)) | set(range(21, 36))
    rew0 = np.asarray(recs[0]["reward"], np.float64)
    np.testing.assert_allclose(r.episode_returns_to_go(0), [sum(gamma**k * rew0[j + k] for k in range(12 - j))
                                                            for j in range(12)])
    w = r.chunk_window(3, n)
    assert w["n_step_return"] == pytest.approx(sum(gamma**k * rew0[3 + k] for k in range(n)))
    assert not w["done"] and w["discount"] == pytest.approx(gamma**n)
    np.testing.assert_array_equal(w["actions"], np.stack(recs[0]["action"][3:7]))
    np.testing.assert_array_equal(w["next_obs"]["state"], recs[0]["state"][7])
    w = r.chunk_window(10, n)  # reaches the terminal frame 11: 2 valid steps, padded
    assert w["done"] and w["discount"] == 0.0
    assert w["action_is_pad"].tolist() == [False, False, True, True]
    assert w["n_step_return"] == pytest.approx(rew0[10] + gamma * rew0[11])
    np.testing.assert_array_equal(w["actions"][2:], np.stack([recs[0]["action"][11]] * 2))
    w = r.chunk_window(14, n)  # ep1 frames 2..5: steps 3, 4, 5 are human takeover
    assert w["is_intervention"].tolist() == [False, True, True, True] and w["policy_version"] == "v2"
    with pytest.raises(IndexError):
        r.chunk_window(12 + 6, n)  # runs past the non-terminal end of episode 1
    r.close()

    rs = ReplayReader(root, success=True, decode_images=False)
    assert set(rs.episode_index[rs.frame_mask].tolist()) == {0}
    rv = ReplayReader(root, policy_versions=["v2"], decode_images=False)
    assert rv.window_starts(1).tolist() == [12, 13, 14, 18, 19]  # 20: last frame, no done, no o_{i+1}
    ri = ReplayReader(root, intervention="only", decode_images=False)
    assert np.nonzero(ri.frame_mask)[0].tolist() == [15, 16, 17]
    rx = ReplayReader(root, intervention="exclude", decode_images=False)
    assert len(rx) == 33
    assert rx.sample_windows(5, 3, np.random.default_rng(0))[0]["actions"].shape == (3, 7)
    assert returns_to_go(np.array([0.0, 0.0, 1.0]), 0.5).tolist() == [0.25, 0.5, 1.0]
    # vectorised window_starts == the definition, checked by brute force for several n
    for m in (1, 2, 3, 5, 9, 20):
        brute = [g for g in range(r.num_frames) if (g + m <= r.ep_end[r.episode_index[g]] - 1)
                 or r.done[g:min(g + m, r.ep_end[r.episode_index[g]])].any()]
        assert r.window_starts(m).tolist() == brute, m
    # batches for the trainer, images decoded for obs and next obs
    rb = ReplayReader(root, gamma=gamma)
    b = stack_windows(rb.sample_windows(6, n, np.random.default_rng(3)))
    rb.close()
    assert b["actions"].shape == (6, n, 7) and b["rewards"].shape == (6, n) and b["state"].shape == (6, 7)
    assert b["images"]["front"].shape == (6, 64, 80, 3) and b["next_images"]["wrist"].shape == (6, 48, 64, 3)
    assert b["discount"].dtype == np.float32 and len(b["prompts"]) == 6


def test_labels_discard_reopen_and_bad_input(dataset: tuple[Path, list[dict]]) -> None:
    root, _ = dataset
    with ReplayBuffer.open(root) as buf:
        assert buf.repair_report == {"staging_removed": [], "orphans_removed": [], "info_rebuilt": False}
        with pytest.raises(RuntimeError, match="already open"):
            ReplayBuffer.open(root)
        buf.set_label(2, True, "operator")
        buf.set_discarded(1)
        with pytest.raises(ValueError):
            buf.set_label(0, True, "robot")
        with pytest.raises(IndexError):
            buf.set_discarded(7)
        ep = buf.begin_episode()
        good = make_obs(0, 5)
        bad_shape = make_obs(0, 5) | {"images": {"front": np.zeros((64, 80, 3), np.uint8)}}
        bad_dtype = make_obs(0, 5)
        bad_dtype["images"]["wrist"] = bad_dtype["images"]["wrist"].astype(np.float32)
        nan_state = make_obs(0, 5) | {"state": np.full(7, np.nan, np.float32)}
        for obs, act in ((bad_shape, np.zeros(7)), (bad_dtype, np.zeros(7)), (nan_state, np.zeros(7)),
                         (good, np.zeros(6)), ("not a dict", np.zeros(7)), (good, ["a"] * 7),
                         (make_obs(0, 5) | {"state": None}, np.zeros(7))):
            with pytest.raises(ValueError):
                ep.add_frame(obs, act)
        with pytest.raises(ValueError, match="stamp"):
            ep.add_frame(make_obs(0, 5) | {"stamp": float("nan")}, np.zeros(7))
        with pytest.raises(ValueError, match="reward"):
            ep.add_frame(good, np.zeros(7), reward="high")
        ep.add_frame(good, np.zeros(7))
        ep.add_frame(make_obs(1, 5), np.ones(7), done=True)
        with pytest.raises(ValueError, match="label_source"):
            ep.finish(success=True, label_source="robot")  # refused, the episode stays open
        assert len(ep) == 2 and ep.finish(success=True, label_source="operator") == 3
        with pytest.raises(ValueError, match="no frames"):
            buf.begin_episode("x").finish()
        aborted = buf.begin_episode()
        aborted.add_frame(good, np.zeros(7))
        aborted.abort()
    with pytest.raises(ValueError, match="even"):
        ReplayBuffer.create(root.parent / "odd", fps=10, cameras={"c": (63, 64)})
    with pytest.raises(FileExistsError):
        ReplayBuffer.create(root, fps=10, cameras=CAMS)
    with pytest.raises(DatasetError):
        ReplayBuffer.open(root.parent / "nothing")
    # a corrupt episode index is reported, and nothing is deleted
    broken = root.parent / "broken"
    shutil.copytree(root, broken)
    (broken / ".qvgm.lock").unlink()
    (broken / "meta/episodes/chunk-000/file-000.parquet").write_bytes(b"PAR1 garbage")
    files = sorted(p for p in broken.rglob("*") if p.is_file())
    for _ in range(2):  # the failed open releases its lock
        with pytest.raises(DatasetError, match="unreadable episode index"):
            ReplayBuffer.open(broken)
    assert sorted(p for p in broken.rglob("*") if p.is_file() and p.name != ".qvgm.lock") == files
    r = ReplayReader(root, decode_images=False)
    assert r.episodes[2]["success"] is True and r.episodes[2]["label_source"] == "operator"
    assert r.episodes[1]["discarded"] and not r.episode_mask[1] and r.episode_mask[3]
    assert r.episodes[3]["length"] == 2 and r.num_frames == 38
    info = json.loads((root / "meta/info.json").read_text())
    assert info["total_episodes"] == 4 and info["total_frames"] == 38
    assert not (root / ".staging").exists() or not any((root / ".staging").iterdir())


@pytest.mark.parametrize("cams", [{"top": (16, 16)}, {}])
def test_chunk_rollover_and_camera_less_buffer(tmp_path: Path, cams: dict) -> None:
    root = tmp_path / "small"
    with ReplayBuffer.create(root, fps=5, cameras=cams, chunks_size=2) as buf:
        for e in range(3):
            ep = buf.begin_episode("reach")
            for i in range(4):
                img = {c: np.full((h, w, 3), 40 * i + e, np.uint8) for c, (h, w) in cams.items()}
                ep.add_frame({"images": img, "state": np.full(7, e + i, np.float32)}, np.zeros(7), done=i == 3)
            assert ep.finish() == e
    assert (root / "data/chunk-001/file-000.parquet").exists()
    assert (root / "videos/observation.images.top/chunk-001/file-000.mp4").exists() == bool(cams)
    info = json.loads((root / "meta/info.json").read_text())
    assert (info["video_path"] is None) == (not cams) and info["total_frames"] == 12
    with ReplayBuffer.open(root) as buf:
        assert buf.repair_report["orphans_removed"] == [] and buf.num_episodes == 3
    r = ReplayReader(root)
    assert r.episodes[2]["data/chunk_index"] == 1 and r.episodes[2]["data/file_index"] == 0
    np.testing.assert_array_equal(r.state[8:12, 0], [2, 3, 4, 5])
    obs = r.observation(9)
    assert obs["prompt"] == "reach" and set(obs["images"]) == set(cams)
    if cams:
        assert abs(int(obs["images"]["top"].mean()) - 42) <= 2
    r.close()


def test_episode_index_reads_one_version_while_a_writer_replaces_it(tmp_path):
    """read_parquet_snapshot (the episode index, tasks): a reader racing a writer that atomically replaces the file
    sees whole versions only, never a footer of one and pages of another."""
    import threading

    import pyarrow as pa

    from qvgm.data import layout as L

    path = tmp_path / "file-000.parquet"
    versions = [pa.table({"episode_index": list(range(n)), "task": [f"t{i}" * n for i in range(n)]})
                for n in (3, 40)]
    L.atomic_write_parquet(path, versions[0])
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            L.atomic_write_parquet(path, versions[i % 2])

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(300):
            assert L.read_parquet_snapshot(path).num_rows in (3, 40)
    finally:
        stop.set()
        t.join()


def test_episode_index_rolls_over_files_and_stats_stay_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit rewrites one episode-index file (EPISODES_PER_META_FILE rows at most) and merges one episode into
    the stats, so its cost does not grow with the buffer; the running stats equal the full aggregate; relabelling
    rewrites only the file holding the row; a buffer whose rows all sit in file-000 (written before the roll-over)
    keeps them there and continues in new files."""
    import qvgm.data.buffer as B
    from qvgm.data import layout as L

    def tiny(buf: ReplayBuffer, e: int, length: int = 3) -> int:
        ep = buf.begin_episode("reach")
        rng = np.random.default_rng(e)
        for i in range(length):
            ep.add_frame({"images": {}, "state": rng.normal(size=7).astype(np.float32) * (1 + e)}, rng.normal(size=7),
                         done=i == length - 1)
        return ep.finish(success=bool(e % 2), label_source="auto")

    def meta_files(root: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted((root / "meta/episodes/chunk-000").glob("file-*.parquet"))}

    monkeypatch.setattr(B, "EPISODES_PER_META_FILE", 3)
    root = tmp_path / "roll"
    with ReplayBuffer.create(root, fps=5, cameras={}) as buf:
        assert [tiny(buf, e, 2 + e % 3) for e in range(7)] == list(range(7))
    files = meta_files(root)
    assert list(files) == ["file-000.parquet", "file-001.parquet", "file-002.parquet"]
    rows_per_file = [pq.read_table(root / "meta/episodes/chunk-000" / f).num_rows for f in files]
    assert rows_per_file == [3, 3, 1]
    r = ReplayReader(root, decode_images=False)
    assert [e["episode_index"] for e in r.episodes] == list(range(7))
    assert [e["meta/episodes/file_index"] for e in r.episodes] == [0, 0, 0, 1, 1, 1, 2]
    np.testing.assert_array_equal(r.episode_index, np.repeat(np.arange(7), [2 + e % 3 for e in range(7)]))
    full = L.aggregate_stats([B.episode_stats_from_row(e) for e in r.episodes])
    running = json.loads((root / "meta/stats.json").read_text())
    assert set(running) == set(full)
    for feat in full:
        for stat in full[feat]:
            # equal up to float rounding (the std of wall-clock stamps ~1.8e9 s loses ~1e-7 to the order of sums)
            np.testing.assert_allclose(running[feat][stat], full[feat][stat], rtol=1e-6, atol=1e-12,
                                       err_msg=f"{feat} {stat}")
    assert running["observation.state"]["count"] == [sum(2 + e % 3 for e in range(7))]
    np.testing.assert_allclose(running["observation.state"]["mean"], r.state.mean(0), rtol=1e-5, atol=1e-6)

    with ReplayBuffer.open(root) as buf:  # relabel episode 4: only file-001 changes
        assert buf.repair_report["orphans_removed"] == [] and buf.num_episodes == 7
        buf.set_label(4, None)
        assert tiny(buf, 7) == 7 and tiny(buf, 8) == 8  # continues file-002
    after = meta_files(root)
    assert after["file-000.parquet"] == files["file-000.parquet"]
    assert after["file-001.parquet"] != files["file-001.parquet"] and len(after) == 3
    r = ReplayReader(root, decode_images=False)
    assert r.episodes[4]["success"] is None and r.episodes[5]["success"] is True and r.episodes[2]["success"] is False
    assert [e["meta/episodes/file_index"] for e in r.episodes][6:] == [2, 2, 2]

    monkeypatch.setattr(B, "EPISODES_PER_META_FILE", 1000)  # the layout before roll-over: one file for all rows
    legacy = tmp_path / "legacy"
    with ReplayBuffer.create(legacy, fps=5, cameras={}) as buf:
        for e in range(5):
            tiny(buf, e)
    one = meta_files(legacy)
    monkeypatch.setattr(B, "EPISODES_PER_META_FILE", 2)
    with ReplayBuffer.open(legacy) as buf:
        assert tiny(buf, 5) == 5 and tiny(buf, 6) == 6
        buf.set_label(1, None)  # a legacy row: rewrites file-000 with its five rows
    files = meta_files(legacy)
    assert list(files) == ["file-000.parquet", "file-002.parquet", "file-003.parquet"]
    assert files["file-000.parquet"] != one["file-000.parquet"]
    assert pq.read_table(legacy / "meta/episodes/chunk-000/file-000.parquet").num_rows == 5
    r = ReplayReader(legacy, decode_images=False)
    assert [e["episode_index"] for e in r.episodes] == list(range(7)) and r.episodes[1]["success"] is None
    assert json.loads((legacy / "meta/info.json").read_text())["total_episodes"] == 7
