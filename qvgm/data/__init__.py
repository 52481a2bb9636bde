"""Replay buffer: LeRobotDataset v3.0 layout + RL fields; crash-safe writer, trainer-side reader.

Writer (recorder; one process per buffer, flock):
    buf = ReplayBuffer.open_or_create(root, fps=30, cameras={"front": (480, 640), "wrist": (480, 640)})
    ep = buf.begin_episode(task="put the cube in the bowl")
    ep.add_frame(observation, action, reward=0.0, done=False, is_intervention=False, policy_version="v3")
    index = ep.finish(success=None)            # atomic commit; DiskFullError if refused
    buf.set_label(index, True, "operator")     # later, from the LABEL state; or set_discarded(index)
Reader (trainer; any number, read a committed snapshot):
    r = ReplayReader(root, gamma=0.99, success=None, policy_versions=None, intervention=None)
    batch = stack_windows(r.sample_windows(256, n=5, rng=np.random.default_rng(0)))
Files: meta/info.json, meta/stats.json, meta/tasks.parquet, meta/episodes/chunk-CCC/file-FFF.parquet (100 episode
rows per file), data/chunk-CCC/file-FFF.parquet, videos/observation.images.<cam>/chunk-CCC/file-FFF.mp4 (h264, yuv420p);
one episode per data/video file. Actions/states are stored in robot units (rad, m), not normalised.
"""

from qvgm.data.buffer import EpisodeWriter, ReplayBuffer
from qvgm.data.layout import CODEBASE_VERSION, DatasetError, DiskFullError
from qvgm.data.reader import ReplayReader, returns_to_go, stack_windows

__all__ = ["CODEBASE_VERSION", "DatasetError", "DiskFullError", "EpisodeWriter", "ReplayBuffer", "ReplayReader",
           "returns_to_go", "stack_windows"]
