"""The buffer opens in LeRobot's own LeRobotDataset (lerobot 0.4.4 checked), when such a Python is available.

LeRobot cannot go into the shared venv (it pins torch < 2.11). Point QVGM_LEROBOT_PYTHON at the python of a
separate venv holding lerobot; otherwise this skips. The venv used (it reuses the shared torch/av/pyarrow):
    /work/main/.venv/bin/python -m venv /tmp/lrv
    echo /work/main/.venv/lib/python3.11/site-packages > /tmp/lrv/lib/python3.11/site-packages/shared.pth
    /tmp/lrv/bin/pip install --no-deps lerobot==0.4.4 torchvision==0.28.0 accelerate psutil
    /tmp/lrv/bin/pip install datasets pandas huggingface-hub draccus jsonlines deepdiff termcolor einops imageio
    # the PyPI torchvision is CUDA-linked; its C ops cannot load against the CPU torch, so empty this file:
    echo > /tmp/lrv/lib/python3.11/site-packages/torchvision/_meta_registrations.py
    QVGM_LEROBOT_PYTHON=/tmp/lrv/bin/python .venv/bin/python -m pytest -q tests/test_data_lerobot_compat.py
torchvision.io.VideoReader (LeRobot's "pyav" backend) is gone from torchvision >= 0.24 and torchcodec cannot
load here, so the script installs a PyAV stand-in with the same contract; LeRobot's own seek, timestamp and
tolerance (1e-4 s) logic runs unchanged on top of it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_data_buffer import CAMS, FPS, write_episode  # noqa: E402

from qvgm.data import ReplayBuffer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHECK = r'''
import numpy as np, torch, sys
ROOT = sys.argv[1]
import av, torchvision, torchvision.io
class _PyAVVideoReader:
    """Stand-in for torchvision.io.VideoReader (removed from torchvision >= 0.24; torchcodec cannot load here):
    same contract, PyAV underneath: seek(ts), iterate {"data": uint8 [C,H,W], "pts": seconds}."""
    def __init__(self, path, stream="video"):
        self.container = av.open(path); self._s = self.container.streams.video[0]; self._it = None
    def seek(self, ts, keyframes_only=False):
        self.container.seek(int(ts / self._s.time_base), stream=self._s, backward=True, any_frame=False)
        self._it = self.container.decode(self._s)
    def __iter__(self):
        for f in (self._it or self.container.decode(self._s)):
            yield {"data": torch.from_numpy(f.to_ndarray(format="rgb24")).permute(2, 0, 1), "pts": float(f.time)}
torchvision.io.VideoReader = _PyAVVideoReader
if not hasattr(torchvision, "set_video_backend"):
    torchvision.set_video_backend = lambda b: None
from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata
sys.path.insert(0, sys.argv[2])
from qvgm.data import ReplayReader
meta = LeRobotDatasetMetadata("local/qvgm_test", root=ROOT)
print("meta", meta.total_episodes, meta.total_frames, meta.fps, meta.video_keys, meta.tasks)
ds = LeRobotDataset("local/qvgm_test", root=ROOT, video_backend="pyav",
                    delta_timestamps={"action": [0.0, 0.1, 0.2]})
print("len", len(ds), ds.num_episodes)
r = ReplayReader(ROOT)
worst = 99
for g in [0, 5, 11, 12, 17, 20]:
    item = ds[g]
    assert torch.equal(item["observation.state"], torch.from_numpy(r.state[g])), g
    assert torch.equal(item["action"][0], torch.from_numpy(r.action[g])), g
    assert item["task"] == r.tasks[r.task_index[g]], (item["task"],)
    assert int(item["episode_index"]) == r.episode_index[g] and int(item["index"]) == g
    assert bool(item["next.done"]) == r.done[g] and float(item["next.reward"]) == r.reward[g]
    assert item["complementary_info.policy_version"] == r.policy_version[g], item["complementary_info.policy_version"]
    ours = r.images([g])[g]
    for cam in ours:
        t = item[f"observation.images.{cam}"]  # float C,H,W in [0,1]
        theirs = (t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert theirs.shape == ours[cam].shape, (theirs.shape, ours[cam].shape)
        diff = np.abs(theirs.astype(int) - ours[cam].astype(int)).max()
        worst = min(worst, 99 if diff == 0 else 0)
        print(g, cam, "max abs diff vs our decoder", diff)
print("keys", sorted(item.keys()))
print("LEROBOT READER OK")
'''


def test_lerobot_dataset_reads_buffer(tmp_path: Path) -> None:
    py = os.environ.get("QVGM_LEROBOT_PYTHON")
    if not py:
        pytest.skip("QVGM_LEROBOT_PYTHON not set (a venv with lerobot; it cannot live in the shared venv)")
    root = tmp_path / "ds"
    with ReplayBuffer.create(root, fps=FPS, cameras=CAMS) as buf:
        write_episode(buf, 0, 12)
        write_episode(buf, 1, 9, success=False, intervene=(3, 6), version="v2", prompt="open the drawer",
                      done_at_end=False)
    script = tmp_path / "check.py"
    script.write_text(CHECK)
    proc = subprocess.run([py, str(script), str(root), str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "LEROBOT READER OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
