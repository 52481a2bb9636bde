"""LeRobotDataset v3.0 on-disk layout: paths, info.json, tasks.parquet, stats, atomic file writes.

Layout (root = dataset directory):
    meta/info.json                                  codebase_version "v3.0", fps, features, totals, path templates
    meta/stats.json                                 aggregated stats per feature (min/max/mean/std/count/q01/q99)
    meta/tasks.parquet                              index "task" (str) -> column task_index (int64), pandas metadata
    meta/episodes/chunk-{c:03d}/file-{f:03d}.parquet  one row per episode (file indices, timestamps, stats, labels);
                                                    the writer starts a new file every 100 episodes
    data/chunk-{c:03d}/file-{f:03d}.parquet         frames; this writer puts one episode per file
    videos/<video_key>/chunk-{c:03d}/file-{f:03d}.mp4  one stream per camera, one episode per file
The episodes parquet files are the commit record: an episode exists iff it has a row in one of them.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qvgm.checkpoints import fsync_path

CODEBASE_VERSION = "v3.0"
DEFAULT_CHUNK_SIZE = 1000
DEFAULT_DATA_FILE_SIZE_IN_MB = 100
DEFAULT_VIDEO_FILE_SIZE_IN_MB = 500
INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
EPISODES_DIR = "meta/episodes"
EPISODES_PATH = EPISODES_DIR + "/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
STAGING_DIR = ".staging"
LOCK_FILE = ".qvgm.lock"
IMAGE_PREFIX = "observation.images."

#: errnos that mean "the disk (or quota) is full"
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

DEFAULT_FEATURES: dict[str, dict[str, Any]] = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}


class DatasetError(RuntimeError):
    """The dataset on disk is missing, inconsistent or not a v3.0 LeRobot dataset."""


class DiskFullError(OSError):
    """The disk filled up while writing an episode; the episode was refused and the buffer left valid."""


def is_disk_full(exc: BaseException) -> bool:
    """True if `exc` (or its cause chain) is an OSError with a disk-full errno (ENOSPC/EDQUOT/EFBIG)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(exc, OSError) and "No space left" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def chunk_file(episode_index: int, chunks_size: int) -> tuple[int, int]:
    """(chunk_index, file_index) of the data/video files of an episode (one episode per file)."""
    return episode_index // chunks_size, episode_index % chunks_size


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via tmp file + fsync + rename + directory fsync; the old file survives failures."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is None:  # say which file could not be written
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=4, ensure_ascii=False) + "\n").encode())


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="snappy")
    return sink.getvalue().to_pybytes()


def atomic_write_parquet(path: Path, table: pa.Table) -> None:
    atomic_write_bytes(path, table_to_parquet_bytes(table))


# ---------------------------------------------------------------------------------------------- features / info


def make_features(cameras: dict[str, tuple[int, int]], state_names: list[str], action_names: list[str],
                  fps: int, codec_name: str, pix_fmt: str) -> dict[str, dict[str, Any]]:
    """info.json `features`: cameras {name: (H, W)} -> video features; state/action float32 vectors; RL fields."""
    feats: dict[str, dict[str, Any]] = {}
    for cam, (h, w) in cameras.items():
        feats[IMAGE_PREFIX + cam] = {
            "dtype": "video", "shape": [int(h), int(w), 3], "names": ["height", "width", "channels"],
            "info": {"video.height": int(h), "video.width": int(w), "video.codec": codec_name,
                     "video.pix_fmt": pix_fmt, "video.is_depth_map": False, "video.fps": int(fps),
                     "video.channels": 3, "has_audio": False},
        }
    feats["observation.state"] = {"dtype": "float32", "shape": [len(state_names)], "names": list(state_names)}
    feats["observation.stamp"] = {"dtype": "float64", "shape": [1], "names": None}
    feats["action"] = {"dtype": "float32", "shape": [len(action_names)], "names": list(action_names)}
    feats["next.reward"] = {"dtype": "float32", "shape": [1], "names": None}
    feats["next.done"] = {"dtype": "bool", "shape": [1], "names": None}
    feats["complementary_info.is_intervention"] = {"dtype": "bool", "shape": [1], "names": None}
    feats["complementary_info.policy_version"] = {"dtype": "string", "shape": [1], "names": None}
    feats.update({k: dict(v) for k, v in DEFAULT_FEATURES.items()})
    return feats


def make_info(features: dict[str, dict[str, Any]], fps: int, robot_type: str,
              chunks_size: int = DEFAULT_CHUNK_SIZE) -> dict[str, Any]:
    return {
        "codebase_version": CODEBASE_VERSION,
        "robot_type": robot_type,
        "total_episodes": 0,
        "total_frames": 0,
        "total_tasks": 0,
        "chunks_size": int(chunks_size),
        "data_files_size_in_mb": DEFAULT_DATA_FILE_SIZE_IN_MB,
        "video_files_size_in_mb": DEFAULT_VIDEO_FILE_SIZE_IN_MB,
        "fps": int(fps),
        "splits": {},
        "data_path": DATA_PATH,
        "video_path": VIDEO_PATH if any(f["dtype"] == "video" for f in features.values()) else None,
        "features": features,
    }


_ARROW_SCALAR = {"float32": pa.float32(), "float64": pa.float64(), "int64": pa.int64(), "int32": pa.int32(),
                 "bool": pa.bool_(), "string": pa.string()}


def arrow_type(feature: dict[str, Any]) -> pa.DataType:
    """Arrow type HF `datasets` uses for a feature: shape [1] -> scalar, [n] -> fixed_size_list<n>."""
    base = _ARROW_SCALAR[feature["dtype"]]
    shape = list(feature["shape"])
    if shape == [1]:
        return base
    if len(shape) == 1:
        return pa.list_(base, shape[0])
    raise DatasetError(f"unsupported non-video feature shape {shape}")


def hf_features_metadata(features: dict[str, dict[str, Any]]) -> bytes:
    """The `huggingface` parquet schema metadata (datasets.Features) for the non-video features."""
    out: dict[str, Any] = {}
    for key, ft in features.items():
        if ft["dtype"] == "video":
            continue
        value = {"dtype": ft["dtype"], "_type": "Value"}
        if list(ft["shape"]) == [1]:
            out[key] = value
        else:
            out[key] = {"feature": value, "length": int(ft["shape"][0]), "_type": "Sequence"}
    return json.dumps({"info": {"features": out}}).encode()


# ---------------------------------------------------------------------------------------------- tasks


def tasks_table(tasks: list[str]) -> pa.Table:
    """tasks.parquet as pandas writes DataFrame({"task_index": ...}, index=pd.Index(tasks, name="task"))."""
    pandas_meta = {
        "index_columns": ["task"],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                            "metadata": {"encoding": "UTF-8"}}],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
             "metadata": None},
            {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object",
             "metadata": None},
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.3",
    }
    schema = pa.schema([("task_index", pa.int64()), ("task", pa.string())],
                       metadata={b"pandas": json.dumps(pandas_meta).encode()})
    return pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()), "task": pa.array(tasks, pa.string())},
                    schema=schema)


def read_parquet_snapshot(path: Path) -> pa.Table:
    """A parquet file that writers replace atomically (the episode index, tasks), read through one open: the bytes
    first, then parsed. pq.read_table(path) may open the path more than once (footer, then pages), and a rename
    in between mixes two versions ("Page was smaller than expected")."""
    return pq.read_table(pa.BufferReader(Path(path).read_bytes()))


def read_tasks(root: Path) -> list[str]:
    """Task strings ordered by task_index ([] when tasks.parquet does not exist)."""
    path = root / TASKS_PATH
    if not path.exists():
        return []
    table = read_parquet_snapshot(path)
    names = "task" if "task" in table.column_names else "__index_level_0__"
    pairs = sorted(zip(table.column("task_index").to_pylist(), table.column(names).to_pylist(), strict=True))
    if [i for i, _ in pairs] != list(range(len(pairs))):
        raise DatasetError(f"{path}: task_index is not 0..{len(pairs) - 1}")
    return [t for _, t in pairs]


# ---------------------------------------------------------------------------------------------- stats

QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)


def vector_stats(x: np.ndarray) -> dict[str, list]:
    """Stats of x [N, d] (or [N]) per dimension: min, max, mean, std, count, q01..q99 (float lists)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    out: dict[str, list] = {
        "min": x.min(0).tolist(), "max": x.max(0).tolist(), "mean": x.mean(0).tolist(),
        "std": x.std(0).tolist(), "count": [int(x.shape[0])],
    }
    for q in QUANTILES:
        out[f"q{int(round(q * 100)):02d}"] = np.quantile(x, q, axis=0).tolist()
    return out


def image_stats(frames: np.ndarray) -> dict[str, list]:
    """Per-channel stats of uint8 frames [N, H, W, 3] scaled to [0, 1], each of shape [3, 1, 1] like LeRobot."""
    x = frames.astype(np.float64).reshape(-1, 3) / 255.0
    flat = vector_stats(x)
    out = {k: [[[v]] for v in vals] for k, vals in flat.items() if k != "count"}
    out["count"] = [int(frames.shape[0])]
    return out


def aggregate_stats(per_episode: list[dict[str, dict[str, list]]]) -> dict[str, dict[str, list]]:
    """Combine episode stats: exact min/max/mean/std/count, count-weighted mean for quantiles (approximate)."""
    out: dict[str, dict[str, list]] = {}
    keys = {k for ep in per_episode for k in ep}
    for key in sorted(keys):
        eps = [ep[key] for ep in per_episode if key in ep]
        counts = np.array([float(e["count"][0]) for e in eps])
        w = counts / counts.sum()
        stacked = {s: np.array([e[s] for e in eps], dtype=np.float64) for s in eps[0] if s != "count"}
        wshape = (-1,) + (1,) * (stacked["mean"].ndim - 1)
        mean = (stacked["mean"] * w.reshape(wshape)).sum(0)
        var = ((stacked["std"] ** 2 + (stacked["mean"] - mean) ** 2) * w.reshape(wshape)).sum(0)
        agg = {"min": stacked["min"].min(0), "max": stacked["max"].max(0), "mean": mean, "std": np.sqrt(var)}
        for s, arr in stacked.items():
            if s.startswith("q"):
                agg[s] = (arr * w.reshape(wshape)).sum(0)
        out[key] = {s: v.tolist() for s, v in agg.items()}
        out[key]["count"] = [int(counts.sum())]
    return out
