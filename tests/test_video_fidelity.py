"""Sim datasets keep the colour of small objects: at the model's own image size yuv420p halves the colour
resolution, so a policy trained on decoded frames would see sharper frames at run time. Sim recordings use
qvgm.data.video.SIM_VIDEO (yuv444p, crf 0); camera recordings keep yuv420p. Real renders, real mp4 files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from critic_trainer.demos import collect_demos
from critic_trainer.sft import load_demo_data
from qvgm.data import DatasetError, ReplayBuffer, ReplayReader
from qvgm.data.video import probe, sim_video
from qvgm.sim import TabletopEnv


def renders(n: int = 6) -> list[dict[str, np.ndarray]]:
    """First frames of n pick_place scenes, both cameras, 32 x 32 px (pi05-tiny's input size)."""
    env = TabletopEnv(task="pick_place", cameras=("front", "wrist"), image_size=(32, 32), render=True)
    try:
        return [env.reset(seed=s, options={"task": "pick_place"})[0]["images"] for s in range(n)]
    finally:
        env.close()


def record(root: Path, frames: list[dict[str, np.ndarray]], **video) -> list[dict[str, np.ndarray]]:
    """One episode of `frames` through ReplayBuffer (video settings `video`), decoded back by ReplayReader."""
    with ReplayBuffer.create(root, fps=10, cameras={"front": (32, 32), "wrist": (32, 32)}, **video) as buf:
        ep = buf.begin_episode(task="pick", start_stamp=0.0)
        for i, imgs in enumerate(frames):
            ep.add_frame({"images": imgs, "state": np.zeros(7, np.float32), "prompt": "pick", "stamp": i / 10},
                         np.zeros(7, np.float32))
        ep.finish(success=True, label_source="auto")
    back = ReplayReader(root).images(range(len(frames)))
    return [back[i] for i in range(len(frames))]


def error(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> tuple[float, int]:
    d = np.stack([np.abs(x[c].astype(int) - y[c].astype(int)) for x, y in zip(a, b, strict=True) for c in x])
    return float(d.mean()), int(d.max())


def test_sim_video_is_near_lossless_where_yuv420p_is_not(tmp_path: Path) -> None:
    frames = renders()
    mean444, max444 = error(frames, record(tmp_path / "sim", frames, **sim_video()))
    mean420, max420 = error(frames, record(tmp_path / "cam", frames))  # the camera default: yuv420p, crf 20
    assert max444 <= 3 and mean444 < 1.0
    assert mean420 > 3 * mean444 and max420 > 40  # why sim datasets do not use it
    info = json.loads((tmp_path / "sim" / "meta" / "info.json").read_text())
    assert info["features"]["observation.images.front"]["info"]["video.pix_fmt"] == "yuv444p"
    assert info["qvgm"]["pix_fmt"] == "yuv444p" and info["qvgm"]["crf"] == 0
    assert all(probe(p)["pix_fmt"] == "yuv444p" for p in (tmp_path / "sim").rglob("*.mp4"))
    # reopening for more episodes keeps the dataset's own settings
    with ReplayBuffer.open(tmp_path / "sim") as buf:
        assert (buf.pix_fmt, buf.crf) == ("yuv444p", 0)


def test_bad_video_settings_are_refused(tmp_path: Path) -> None:
    cams = {"front": (32, 32)}
    with pytest.raises(ValueError, match="pix_fmt 'rgb24' is not supported"):
        ReplayBuffer.create(tmp_path / "a", fps=10, cameras=cams, pix_fmt="rgb24")
    with pytest.raises(ValueError, match="crf must be 0..51"):
        ReplayBuffer.create(tmp_path / "b", fps=10, cameras=cams, crf=-1)
    ReplayBuffer.create(tmp_path / "c", fps=10, cameras=cams, pix_fmt="yuv444p").close()
    info_path = tmp_path / "c" / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    info["qvgm"]["pix_fmt"] = "yuv9000"  # a hand-edited or foreign info.json
    info_path.write_text(json.dumps(info))
    with pytest.raises(DatasetError, match="yuv9000"):
        ReplayBuffer.open(tmp_path / "c")


def test_sim_demos_train_on_the_frames_the_policy_will_see(tmp_path: Path) -> None:
    """collect_demos records with SIM_VIDEO by default: a demo's first decoded frame equals the env's render of
    the same scene at run time (to rounding); `video=` restores the camera settings."""
    collect_demos("pick_place", 1, tmp_path / "d", seed=0, image_size=(32, 32))
    data = load_demo_data([tmp_path / "d"], horizon=10, with_images=True)
    first = renders(1)[0]
    for cam, arr in data.images.items():
        d = np.abs(arr[0].astype(int) - first[cam].astype(int))
        assert d.max() <= 3, (cam, d.max())
    collect_demos("pick_place", 1, tmp_path / "lossy", seed=0, image_size=(32, 32),
                  video={"pix_fmt": "yuv420p", "crf": 20})
    lossy = load_demo_data([tmp_path / "lossy"], horizon=10, with_images=True)
    assert max(int(np.abs(lossy.images[c][0].astype(int) - first[c].astype(int)).max()) for c in first) > 40
