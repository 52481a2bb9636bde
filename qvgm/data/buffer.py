"""Replay buffer writer: LeRobotDataset v3.0 + RL fields, crash safe.

Commit protocol for one episode (`EpisodeWriter.finish`):
  1. frames are encoded/collected into `.staging/ep-<pid>-<n>/` while the episode runs; finish() closes and
     fsyncs the staged parquet and mp4 files;
  2. new tasks: meta/tasks.parquet rewritten atomically (extra unreferenced tasks are harmless);
  3. staged files renamed into data/ and videos/ (invisible: nothing references them yet), dirs fsynced;
  4. COMMIT: the episode-index file that takes the new row (meta/episodes/chunk-CCC/file-FFF.parquet, a new
     file every EPISODES_PER_META_FILE episodes) rewritten atomically (tmp + fsync + rename) with the new row;
     an episode exists iff it has a row there;
  5. meta/info.json and meta/stats.json rewritten atomically (derived data, rebuilt on open if stale; stats.json
     is the running aggregate merged with the new episode's stats).
A commit costs the same at 10 or 10,000 episodes: it rewrites one index file of at most EPISODES_PER_META_FILE
rows and merges one episode into the stats (the rows of earlier index files are never rewritten by a commit;
relabelling rewrites the one file that holds the row).
Committed data/video files are never rewritten, so finished episodes stay bit-identical. `ReplayBuffer.open`
repairs after a crash: drops staging dirs (the partial episode is discarded), deletes unreferenced data/video
files, rebuilds info.json/stats.json from the episode rows. One writer per buffer (an flock on .qvgm.lock).
A full disk raises DiskFullError from add_frame/finish; the staged episode is removed, the buffer stays valid.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from qvgm.checkpoints import fsync_path
from qvgm.data import layout as L
from qvgm.data.video import VideoEncoder, check_pix_fmt, codec_family, pick_codec

DEFAULT_STATE_NAMES = ["joint_1", "joint_2", "joint_3", "joint_4", "joint_5", "joint_6", "gripper"]
LABEL_SOURCES = ("operator", "auto")
_STATS_EVERY = 10  # keep every 10th frame (spatially /4) for image stats
_STATS_MAX = 64
EPISODES_PER_META_FILE = 100  # episode rows per meta/episodes parquet file (each row records its file)


def _episode_schema_fixed(video_keys: list[str]) -> dict[str, pa.DataType]:
    fixed: dict[str, pa.DataType] = {
        "episode_index": pa.int64(), "tasks": pa.list_(pa.string()), "length": pa.int64(),
        "data/chunk_index": pa.int64(), "data/file_index": pa.int64(),
        "dataset_from_index": pa.int64(), "dataset_to_index": pa.int64(),
    }
    for key in video_keys:
        fixed[f"videos/{key}/chunk_index"] = pa.int64()
        fixed[f"videos/{key}/file_index"] = pa.int64()
        fixed[f"videos/{key}/from_timestamp"] = pa.float64()
        fixed[f"videos/{key}/to_timestamp"] = pa.float64()
    fixed.update({
        "meta/episodes/chunk_index": pa.int64(), "meta/episodes/file_index": pa.int64(),
        "success": pa.bool_(), "label_source": pa.string(), "duration_s": pa.float64(), "discarded": pa.bool_(),
        "start_stamp": pa.float64(), "policy_versions": pa.list_(pa.string()), "num_intervention_frames": pa.int64(),
        "notes": pa.string(),
    })
    return fixed


def episodes_table(rows: list[dict[str, Any]], video_keys: list[str]) -> pa.Table:
    """Episode rows -> the meta/episodes parquet table (fixed columns typed, stats/* inferred)."""
    fixed = _episode_schema_fixed(video_keys)
    names = list(fixed) + sorted({k for r in rows for k in r if k.startswith("stats/")})
    cols = {n: pa.array([r.get(n) for r in rows], type=fixed.get(n)) for n in names}
    return pa.table(cols)


def read_episode_rows(root: Path) -> list[dict[str, Any]]:
    """All committed episode rows sorted by episode_index; checks indices are 0..N-1."""
    ep_dir = root / L.EPISODES_DIR
    paths = sorted(p for p in ep_dir.glob("chunk-*/file-*.parquet")) if ep_dir.exists() else []
    rows: list[dict[str, Any]] = []
    for p in paths:
        try:
            rows.extend(L.read_parquet_snapshot(p).to_pylist())
        except (OSError, pa.ArrowException) as exc:
            raise L.DatasetError(f"{p}: unreadable episode index ({exc}); nothing was changed") from exc
    rows.sort(key=lambda r: r["episode_index"])
    if [r["episode_index"] for r in rows] != list(range(len(rows))):
        raise L.DatasetError(f"{root}: episode_index values are not 0..{len(rows) - 1}")
    return rows


def episode_stats_from_row(row: dict[str, Any]) -> dict[str, dict[str, list]]:
    out: dict[str, dict[str, list]] = {}
    for k, v in row.items():
        if k.startswith("stats/") and v is not None:
            _, feat, stat = k.split("/", 2)
            out.setdefault(feat, {})[stat] = v
    return out


class ReplayBuffer:
    """Writer side of the buffer. `create` a new one or `open` an existing one (repairs it); one per process."""

    def __init__(self, root: Path, info: dict[str, Any], codec: str, crf: int, gop: int,
                 preset: str = "ultrafast", threads: int = 2, pix_fmt: str = "yuv420p") -> None:
        self.root = Path(root)
        self.info = info
        self.codec, self.crf, self.gop, self.preset, self.threads = codec, crf, gop, preset, threads
        self.pix_fmt = pix_fmt
        self._lock_fd: int | None = None
        self._lock()
        self.tasks: list[str] = L.read_tasks(self.root)
        self.episodes: list[dict[str, Any]] = []
        self._stats: dict[str, dict[str, list]] = {}  # aggregate of every committed episode's stats
        self.repair_report: dict[str, Any] = {}
        self._active: EpisodeWriter | None = None
        self._staging_seq = 0

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, root: str | Path, fps: int, cameras: dict[str, tuple[int, int]],
               state_names: list[str] | None = None, action_names: list[str] | None = None,
               robot_type: str = "qvgm_tabletop", codec: str = "libx264", crf: int = 20, gop: int = 2,
               preset: str = "ultrafast", threads: int = 2,
               chunks_size: int = L.DEFAULT_CHUNK_SIZE, pix_fmt: str = "yuv420p") -> ReplayBuffer:
        """New empty buffer at `root` (must not hold a dataset). cameras: {name: (height, width)} in pixels.
        Video: `codec` encoder (libx264 -> h264), `pix_fmt` (yuv420p, or yuv444p for full-resolution colour:
        qvgm.data.video.SIM_VIDEO for sim renders at model size), `crf` quality (0 = lossless), `gop` key-frame
        interval in frames (short = cheap random access), x264 `preset` and encoder `threads` (ultrafast/2 keeps
        two 640x480 cameras at 30 Hz real time on 2 cores; slower presets give smaller files)."""
        root = Path(root)
        if (root / L.INFO_PATH).exists():
            raise FileExistsError(f"{root} already holds a dataset; use ReplayBuffer.open")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        for cam, (h, w) in cameras.items():
            if h % 2 or w % 2 or h <= 0 or w <= 0:
                raise ValueError(f"camera {cam!r}: height/width must be positive and even, got {h}x{w}")
        state_names = list(state_names or DEFAULT_STATE_NAMES)
        action_names = list(action_names or DEFAULT_STATE_NAMES)
        encoder = pick_codec(codec)
        check_pix_fmt(pix_fmt, encoder)
        if not 0 <= int(crf) <= 51:
            raise ValueError(f"crf must be 0..51 (0 = lossless), got {crf}")
        feats = L.make_features(cameras, state_names, action_names, fps, codec_family(encoder), pix_fmt)
        info = L.make_info(feats, fps, robot_type, chunks_size)
        info["qvgm"] = {"encoder": encoder, "crf": crf, "gop": gop, "preset": preset, "threads": threads,
                        "pix_fmt": pix_fmt}
        root.mkdir(parents=True, exist_ok=True)
        L.atomic_write_json(root / L.INFO_PATH, info)
        buf = cls(root, info, encoder, crf, gop, preset, threads, pix_fmt)
        buf._write_derived()
        return buf

    @classmethod
    def open(cls, root: str | Path) -> ReplayBuffer:
        """Open an existing buffer for writing and repair what a crash left (see module doc); report in
        `repair_report` = {"staging_removed": [...], "orphans_removed": [...], "info_rebuilt": bool}."""
        root = Path(root)
        if not (root / L.INFO_PATH).exists():
            raise L.DatasetError(f"{root}: no {L.INFO_PATH}; not a dataset (use ReplayBuffer.create)")
        info = _load_json(root / L.INFO_PATH)
        if info.get("codebase_version") != L.CODEBASE_VERSION:
            raise L.DatasetError(f"{root}: codebase_version {info.get('codebase_version')!r}, expected v3.0")
        q = info.get("qvgm", {})
        encoder = q.get("encoder", "libx264")
        if pick_codec(encoder) != encoder:
            raise L.DatasetError(f"{root} was written with encoder {encoder!r}, which this PyAV build lacks")
        pix_fmt = str(q.get("pix_fmt", "yuv420p"))
        try:
            check_pix_fmt(pix_fmt, encoder)
        except ValueError as exc:
            raise L.DatasetError(f"{root}: {exc}") from None
        buf = cls(root, info, encoder, int(q.get("crf", 20)), int(q.get("gop", 2)),
                  str(q.get("preset", "ultrafast")), int(q.get("threads", 2)), pix_fmt)
        try:
            buf._repair()
        except BaseException:
            buf.close()
            raise
        return buf

    @classmethod
    def open_or_create(cls, root: str | Path, **create_kwargs: Any) -> ReplayBuffer:
        root = Path(root)
        return cls.open(root) if (root / L.INFO_PATH).exists() else cls.create(root, **create_kwargs)

    def close(self) -> None:
        if self._active is not None:
            self._active.abort()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> ReplayBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _lock(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / L.LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"{self.root} is already open for writing by another process") from None
        self._lock_fd = fd

    # ------------------------------------------------------------------ properties
    @property
    def fps(self) -> int:
        return int(self.info["fps"])

    @property
    def features(self) -> dict[str, dict[str, Any]]:
        return self.info["features"]

    @property
    def cameras(self) -> dict[str, tuple[int, int]]:
        """{camera name: (height, width)}"""
        return {k[len(L.IMAGE_PREFIX):]: (f["shape"][0], f["shape"][1])
                for k, f in self.features.items() if f["dtype"] == "video"}

    @property
    def video_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f["dtype"] == "video"]

    @property
    def num_episodes(self) -> int:
        return len(self.episodes)

    @property
    def total_frames(self) -> int:
        return int(self.episodes[-1]["dataset_to_index"]) if self.episodes else 0

    # ------------------------------------------------------------------ repair / derived files
    def _repair(self) -> None:
        report: dict[str, Any] = {"staging_removed": [], "orphans_removed": [], "info_rebuilt": False}
        staging = self.root / L.STAGING_DIR
        if staging.exists():
            for d in sorted(staging.iterdir()):
                report["staging_removed"].append(d.name)
                shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
        for tmp in list((self.root / "meta").rglob(".*.tmp-*")):
            tmp.unlink(missing_ok=True)
        self.episodes = read_episode_rows(self.root)
        referenced = set()
        for row in self.episodes:
            paths = [self._data_path(row)] + [self._video_path(row, k) for k in self.video_keys]
            for p in paths:
                if not p.exists():
                    raise L.DatasetError(f"{self.root}: committed episode {row['episode_index']} lacks {p}")
                referenced.add(p.resolve())
        for top in ("data", "videos"):
            base = self.root / top
            if base.exists():
                for p in sorted(base.rglob("*")):
                    if p.is_file() and p.resolve() not in referenced:
                        report["orphans_removed"].append(str(p.relative_to(self.root)))
                        p.unlink()
        missing_tasks = {t for r in self.episodes for t in r["tasks"]} - set(self.tasks)
        if missing_tasks:
            raise L.DatasetError(f"{self.root}: tasks {sorted(missing_tasks)} missing from {L.TASKS_PATH}")
        before = (self.info.get("total_episodes"), self.info.get("total_frames"), self.info.get("total_tasks"))
        self._stats = L.aggregate_stats([episode_stats_from_row(r) for r in self.episodes]) if self.episodes else {}
        self._write_derived()
        report["info_rebuilt"] = before != (self.info["total_episodes"], self.info["total_frames"],
                                            self.info["total_tasks"])
        self.repair_report = report

    def _write_derived(self) -> None:
        """info.json totals/splits from the committed episode rows, and stats.json (the running aggregate)."""
        n = len(self.episodes)
        self.info["total_episodes"] = n
        self.info["total_frames"] = self.total_frames
        self.info["total_tasks"] = len(self.tasks)
        self.info["splits"] = {"train": f"0:{n}"} if n else {}
        L.atomic_write_json(self.root / L.INFO_PATH, self.info)
        L.atomic_write_json(self.root / L.STATS_PATH, self._stats)

    def _data_path(self, row: dict[str, Any]) -> Path:
        return self.root / self.info["data_path"].format(chunk_index=row["data/chunk_index"],
                                                         file_index=row["data/file_index"])

    def _video_path(self, row: dict[str, Any], key: str) -> Path:
        return self.root / self.info["video_path"].format(video_key=key,
                                                          chunk_index=row[f"videos/{key}/chunk_index"],
                                                          file_index=row[f"videos/{key}/file_index"])

    @staticmethod
    def _meta_location(row: dict[str, Any]) -> tuple[int, int]:
        return int(row["meta/episodes/chunk_index"]), int(row["meta/episodes/file_index"])

    def _write_episode_rows(self, rows: list[dict[str, Any]], location: tuple[int, int]) -> None:
        """Atomically rewrite the episode-index file at `location` (chunk, file) with the rows recorded there."""
        path = self.root / L.EPISODES_PATH.format(chunk_index=location[0], file_index=location[1])
        path.parent.mkdir(parents=True, exist_ok=True)
        mine = [r for r in rows if self._meta_location(r) == location]
        L.atomic_write_parquet(path, episodes_table(mine, self.video_keys))

    # ------------------------------------------------------------------ episodes
    def begin_episode(self, task: str | None = None, start_stamp: float | None = None) -> EpisodeWriter:
        """Start recording an episode (one at a time). `task` defaults to the first frame's prompt."""
        if self._lock_fd is None:
            raise RuntimeError("buffer is closed")
        if self._active is not None:
            raise RuntimeError("an episode is already being recorded; finish() or abort() it first")
        self._staging_seq += 1
        staging = self.root / L.STAGING_DIR / f"ep-{os.getpid()}-{self._staging_seq}"
        self._active = EpisodeWriter(self, staging, task, start_stamp)
        return self._active

    def set_label(self, episode_index: int, success: bool | None, source: str = "operator") -> None:
        """Relabel a committed episode (atomic rewrite of the episodes parquet)."""
        if source not in LABEL_SOURCES:
            raise ValueError(f"label source must be one of {LABEL_SOURCES}, got {source!r}")
        self._update_row(episode_index, success=None if success is None else bool(success),
                         label_source=None if success is None else source)

    def set_discarded(self, episode_index: int, discarded: bool = True) -> None:
        """Flag a committed episode as discarded (kept on disk, hidden from the reader by default)."""
        self._update_row(episode_index, discarded=bool(discarded))

    def _update_row(self, episode_index: int, **changes: Any) -> None:
        if not 0 <= episode_index < len(self.episodes):
            raise IndexError(f"episode {episode_index} does not exist ({len(self.episodes)} committed)")
        rows = list(self.episodes)
        rows[episode_index] = {**rows[episode_index], **changes}
        self._write_episode_rows(rows, self._meta_location(rows[episode_index]))
        self.episodes = rows

    def _commit(self, row: dict[str, Any], table: pa.Table, video_files: dict[str, Path],
                new_tasks: list[str]) -> int:
        index = len(self.episodes)
        chunk, file = L.chunk_file(index, int(self.info["chunks_size"]))
        meta_chunk, meta_file = L.chunk_file(index // EPISODES_PER_META_FILE, int(self.info["chunks_size"]))
        start = self.total_frames
        row.update({"episode_index": index, "data/chunk_index": chunk, "data/file_index": file,
                    "dataset_from_index": start, "dataset_to_index": start + row["length"],
                    "meta/episodes/chunk_index": meta_chunk, "meta/episodes/file_index": meta_file})
        for key in self.video_keys:
            row.update({f"videos/{key}/chunk_index": chunk, f"videos/{key}/file_index": file,
                        f"videos/{key}/from_timestamp": 0.0,
                        f"videos/{key}/to_timestamp": row["length"] / self.fps})
        # episode/global indices are only known now: fill them into the staged frame table
        n = table.num_rows
        table = table.set_column(table.schema.get_field_index("episode_index"), "episode_index",
                                 pa.array(np.full(n, index, np.int64)))
        table = table.set_column(table.schema.get_field_index("index"), "index",
                                 pa.array(np.arange(start, start + n, dtype=np.int64)))
        for key, values in (("episode_index", np.full(n, index)), ("index", np.arange(start, start + n))):
            for stat, val in L.vector_stats(values).items():
                row[f"stats/{key}/{stat}"] = val
        final_data = self._data_path(row)
        moves = [(final_data, None)] + [(self._video_path(row, k), video_files[k]) for k in self.video_keys]
        for dst, _ in moves:
            if dst.exists():  # left by a crash between rename and commit; never referenced
                dst.unlink()
        if new_tasks:
            L.atomic_write_parquet(self.root / L.TASKS_PATH, L.tasks_table(self.tasks + new_tasks))
        placed: list[Path] = []
        try:
            final_data.parent.mkdir(parents=True, exist_ok=True)
            L.atomic_write_bytes(final_data, _frames_parquet_bytes(table, self.features))
            placed.append(final_data)
            for dst, src in moves[1:]:
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
                placed.append(dst)
                fsync_path(dst.parent)
            self._write_episode_rows(self.episodes + [row], (meta_chunk, meta_file))  # COMMIT POINT
        except BaseException:
            for p in placed:
                p.unlink(missing_ok=True)
            raise
        self.episodes = self.episodes + [row]
        self.tasks = self.tasks + new_tasks
        self._stats = L.aggregate_stats([self._stats, episode_stats_from_row(row)] if self._stats
                                        else [episode_stats_from_row(row)])
        try:
            self._write_derived()
        except OSError:
            pass  # derived files are rebuilt on the next open; the episode itself is committed
        return index


def _load_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise L.DatasetError(f"{path}: unreadable ({exc})") from exc


def _frames_parquet_bytes(table: pa.Table, features: dict[str, dict[str, Any]]) -> bytes:
    meta = dict(table.schema.metadata or {})
    meta[b"huggingface"] = L.hf_features_metadata(features)
    return L.table_to_parquet_bytes(table.replace_schema_metadata(meta))


class EpisodeWriter:
    """Frames of one episode; obtained from `ReplayBuffer.begin_episode`. Use as a context manager or call
    finish()/abort(). Bad frames raise ValueError before anything is written (the episode is unaffected).
    Not thread-safe: feed one EpisodeWriter from one thread (e.g. the recorder's worker, not ROS callbacks)."""

    def __init__(self, buffer: ReplayBuffer, staging: Path, task: str | None, start_stamp: float | None) -> None:
        self.buffer = buffer
        self.staging = staging
        self.task = task
        self.start_stamp = start_stamp
        self.closed = False
        self.failed: BaseException | None = None
        self._cols: dict[str, list] = {k: [] for k in ("observation.state", "action", "observation.stamp",
                                                        "next.reward", "next.done", "is_intervention",
                                                        "policy_version", "prompt")}
        self._stats_frames: dict[str, list[np.ndarray]] = {k: [] for k in buffer.video_keys}
        self._encoders: dict[str, VideoEncoder] = {}
        self._t0 = time.monotonic()
        try:
            staging.mkdir(parents=True, exist_ok=False)
            for cam, (h, w) in buffer.cameras.items():
                self._encoders[cam] = VideoEncoder(staging / f"{cam}.mp4", w, h, buffer.fps, buffer.codec,
                                                   buffer.crf, buffer.gop, buffer.preset, buffer.threads,
                                                   buffer.pix_fmt)
        except BaseException as exc:
            self._fail(exc)

    def __len__(self) -> int:
        return len(self._cols["action"])

    def __enter__(self) -> EpisodeWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self.closed:
            self.abort()

    def _fail(self, exc: BaseException) -> None:
        """Tear the staged episode down and re-raise (DiskFullError for ENOSPC and friends)."""
        self.failed = exc
        self.abort()
        if L.is_disk_full(exc):
            raise L.DiskFullError(28, f"disk full while writing episode to {self.buffer.root}; episode refused, "
                                      f"buffer unchanged ({exc})") from exc
        raise exc

    def _validate(self, observation: dict[str, Any], action: Any) -> tuple[dict[str, np.ndarray], np.ndarray,
                                                                          np.ndarray]:
        if not isinstance(observation, dict):
            raise ValueError(f"observation must be a dict, got {type(observation).__name__}")
        images = observation.get("images")
        if not isinstance(images, dict):
            raise ValueError("observation['images'] must be a dict {camera: uint8[H, W, 3]}")
        out_imgs = {}
        for cam, (h, w) in self.buffer.cameras.items():
            if cam not in images:
                raise ValueError(f"observation lacks camera {cam!r} (has {sorted(images)})")
            img = np.asarray(images[cam])
            if img.dtype != np.uint8 or img.shape != (h, w, 3):
                raise ValueError(f"camera {cam!r}: expected uint8[{h}, {w}, 3], got {img.dtype}{list(img.shape)}")
            out_imgs[cam] = img
        sdim = self.buffer.features["observation.state"]["shape"][0]
        adim = self.buffer.features["action"]["shape"][0]
        try:
            state = np.asarray(observation.get("state"), dtype=np.float32)
            act = np.asarray(action, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"state/action must be numeric vectors ({exc})") from None
        if state.shape != (sdim,) or not np.all(np.isfinite(state)):
            raise ValueError(f"observation['state'] must be finite float32[{sdim}], got {state!r}")
        if act.shape != (adim,) or not np.all(np.isfinite(act)):
            raise ValueError(f"action must be finite float32[{adim}], got {act!r}")
        prompt = observation.get("prompt", self.task)
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("observation['prompt'] (or the episode task) must be a non-empty string")
        stamp = observation.get("stamp")
        if stamp is not None and not (isinstance(stamp, int | float | np.floating | np.integer)
                                      and math.isfinite(float(stamp))):
            raise ValueError(f"observation['stamp'] must be a finite number of seconds, got {stamp!r}")
        return out_imgs, state, act

    def add_frame(self, observation: dict[str, Any], action: Any, reward: float = 0.0, done: bool = False,
                  is_intervention: bool = False, policy_version: str = "") -> None:
        """Append frame i: observation o_i (interface dict), executed action a_i (robot units, float32[7]),
        next.reward r_i received after a_i, next.done (o_{i+1} is terminal), whether a human drove a_i, and
        the policy version that produced a_i. Encodes the camera frames immediately."""
        if self.closed:
            raise RuntimeError("episode already finished/aborted")
        imgs, state, act = self._validate(observation, action)
        try:
            reward = float(reward)
        except (TypeError, ValueError):
            raise ValueError(f"reward must be a number, got {reward!r}") from None
        if not math.isfinite(reward):
            raise ValueError(f"reward must be finite, got {reward}")
        i = len(self)
        try:
            for cam, enc in self._encoders.items():
                enc.add(imgs[cam])
        except BaseException as exc:
            self._fail(exc)
        stamp = observation.get("stamp")
        if self.start_stamp is None:
            self.start_stamp = float(stamp) if stamp is not None else time.time()
        c = self._cols
        c["observation.state"].append(state)
        c["action"].append(act)
        c["observation.stamp"].append(float(stamp) if stamp is not None else self.start_stamp + i / self.buffer.fps)
        c["next.reward"].append(float(reward))
        c["next.done"].append(bool(done))
        c["is_intervention"].append(bool(is_intervention))
        c["policy_version"].append(str(policy_version))
        c["prompt"].append(observation.get("prompt", self.task))
        if i % _STATS_EVERY == 0 and i // _STATS_EVERY < _STATS_MAX:
            for cam in self._encoders:
                self._stats_frames[L.IMAGE_PREFIX + cam].append(imgs[cam][::4, ::4].copy())

    def abort(self) -> None:
        """Drop the episode: close encoders, delete the staging directory."""
        for enc in self._encoders.values():
            enc.abort()
        self._encoders = {}
        shutil.rmtree(self.staging, ignore_errors=True)
        self.closed = True
        if self.buffer._active is self:
            self.buffer._active = None

    def finish(self, success: bool | None = None, label_source: str | None = None, discarded: bool = False,
               duration_s: float | None = None, notes: str | None = None) -> int:
        """Commit the episode atomically; returns its episode_index. success None = unlabeled (set later with
        ReplayBuffer.set_label); duration_s defaults to the wall time since begin_episode; notes is free text
        (e.g. JSON of recorder flags such as dropped frames). Raises DiskFullError (episode refused, buffer
        valid) when the disk is full."""
        if self.closed:
            raise RuntimeError("episode already finished/aborted")
        if len(self) == 0:
            self.abort()
            raise ValueError("cannot commit an episode with no frames")
        if success is not None and label_source not in LABEL_SOURCES:
            raise ValueError(f"label_source must be one of {LABEL_SOURCES} when success is given")
        buf = self.buffer
        try:
            for enc in self._encoders.values():
                enc.close()
            self._encoders = {}
            n = len(self)
            prompts = self._cols["prompt"]
            order: list[str] = []
            for p in prompts:
                if p not in order:
                    order.append(p)
            new_tasks = [t for t in order if t not in buf.tasks]
            all_tasks = buf.tasks + new_tasks
            task_index = np.array([all_tasks.index(p) for p in prompts], dtype=np.int64)
            table = self._frames_table(task_index)
            videos = {}
            for cam in buf.cameras:
                p = self.staging / f"{cam}.mp4"
                fsync_path(p)
                videos[L.IMAGE_PREFIX + cam] = p
            fsync_path(self.staging)
            row = {"tasks": order, "length": n, "success": success, "label_source": label_source,
                   "duration_s": float(duration_s) if duration_s is not None else time.monotonic() - self._t0,
                   "discarded": bool(discarded), "start_stamp": float(self.start_stamp),
                   "policy_versions": sorted(set(self._cols["policy_version"])),
                   "num_intervention_frames": int(sum(self._cols["is_intervention"])), "notes": notes}
            row.update(self._episode_stats(table))
            index = buf._commit(row, table, videos, new_tasks)
        except BaseException as exc:
            self._fail(exc)
        shutil.rmtree(self.staging, ignore_errors=True)
        self.closed = True
        buf._active = None
        return index

    def _frames_table(self, task_index: np.ndarray) -> pa.Table:
        c = self._cols
        n = len(self)
        feats = self.buffer.features
        sdim = feats["observation.state"]["shape"][0]
        adim = feats["action"]["shape"][0]
        state = np.stack(c["observation.state"]).astype(np.float32)
        act = np.stack(c["action"]).astype(np.float32)
        cols = {
            "observation.state": pa.FixedSizeListArray.from_arrays(pa.array(state.reshape(-1)), sdim),
            "observation.stamp": pa.array(np.asarray(c["observation.stamp"], np.float64)),
            "action": pa.FixedSizeListArray.from_arrays(pa.array(act.reshape(-1)), adim),
            "next.reward": pa.array(np.asarray(c["next.reward"], np.float32)),
            "next.done": pa.array(c["next.done"], pa.bool_()),
            "complementary_info.is_intervention": pa.array(c["is_intervention"], pa.bool_()),
            "complementary_info.policy_version": pa.array(c["policy_version"], pa.string()),
            "timestamp": pa.array((np.arange(n) / self.buffer.fps).astype(np.float32)),
            "frame_index": pa.array(np.arange(n, dtype=np.int64)),
            "episode_index": pa.array(np.full(n, -1, np.int64)),
            "index": pa.array(np.full(n, -1, np.int64)),
            "task_index": pa.array(task_index),
        }
        return pa.table(cols)

    def _episode_stats(self, table: pa.Table) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, ft in self.buffer.features.items():
            if ft["dtype"] in ("video", "string") or key in ("episode_index", "index") or key not in table.column_names:
                continue
            col = table.column(key).combine_chunks()
            if isinstance(col.type, pa.FixedSizeListType):
                arr = col.values.to_numpy(zero_copy_only=False).reshape(len(col), -1)
            else:
                arr = col.to_numpy(zero_copy_only=False).astype(np.float64)
            for stat, val in L.vector_stats(arr).items():
                out[f"stats/{key}/{stat}"] = val
        for key, frames in self._stats_frames.items():
            if frames:
                for stat, val in L.image_stats(np.stack(frames)).items():
                    out[f"stats/{key}/{stat}"] = val
        return out
