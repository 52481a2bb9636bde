"""Replay buffer: LeRobotDataset v3.0 layout + RL fields; crash-safe writer, trainer-side reader."""

from qvgm.data.buffer import EpisodeWriter, ReplayBuffer
from qvgm.data.layout import CODEBASE_VERSION, DatasetError, DiskFullError
from qvgm.data.reader import ReplayReader, returns_to_go, stack_windows

__all__ = ["CODEBASE_VERSION", "DatasetError", "DiskFullError", "EpisodeWriter", "ReplayBuffer", "ReplayReader",
           "returns_to_go", "stack_windows"]
