"""Raw-topic recording to MCAP (a debugging option of recorder_node) and the MCAP -> dataset converter.

Recording (`McapTopicWriter`): raw CDR messages (what an rclpy `raw=True` subscription delivers) go through a
bounded queue to one writer thread that appends them to ONE MCAP file per recorder session
(`session-<UTC time>-<pid>.mcap`): per session, not per episode, because an episode's alignment needs context
from before its start (the latched task and policy version, the as-of joint state and images preceding the
first reference frame) and the reset/teleop phases between episodes are exactly what one debugs; the
episode boundaries are in the file anyway (the episode-manager status topic). Each channel carries a `ros2msg`
schema (the full .msg text with its dependencies, concatenated the way rosbag2 writes it, built from the
installed message packages' share directories) and `cdr` messages, with profile "ros2", so Foxglove and
`ros2 bag` (mcap storage plugin) open the files. log_time = reception time (ns, node clock), publish_time =
the DDS source timestamp when known. The writer finishes the current chunk and flushes the file every
`flush_period` s, so a killed recorder loses at most that much: the file then lacks its summary and footer
(a truncated file, see below). The recorder's parameters (topics, cameras, fps, joint names, frame checks)
are stored as MCAP metadata "qvgm.recorder" (`RecordingConfig`).

Conversion (`convert_mcap`): replays the file, in file (= reception) order, through the SAME recorder core as
the live node (qvgm.recording.EpisodeRecorder: Aligner + ChunkTracker + the frame checks + the writer thread),
with the message log_time as the arrival clock. So every stream is sampled "as-of" each reference-camera
frame (latest message with header stamp <= the frame's stamp and no older than max_age; never a message
stamped after it), the action is the setpoint of the trajectory executing at the frame's stamp, reference
frames become due `align_delay` s after their stamp (what arrives later is "late"), and the episodes are
written through qvgm.data's ReplayBuffer with the same quality notes as a live recording. Messages that do
not decode or convert are counted per topic in the report and skipped.

Truncated files (recorder killed, disk full): converted up to the last complete record (MCAP chunk); the
report says `truncated` and where reading stopped. Episodes whose end (label/discard) is in the readable part
are committed normally; an episode still running when the file ends is dropped, or, with
`recover_partial=True` (`--recover-partial`), committed flagged `discarded=True`, success None, label_source
None and end_reason "partial: ..." in its notes. Not an MCAP at all (bad magic/header): McapConvertError,
nothing written.

Partial episodes of the replay buffer itself (kill -9 of a process writing through qvgm.data) are discarded
on the next open (ReplayBuffer._repair): until finish() the frame columns live only in the writer's memory and
the staged mp4 files have no index (moov atom) yet, so nothing of a partial episode can be committed safely.
The MCAP recording is the recovery path for such episodes: convert it with `--recover-partial`.

CLI (the same module serves both): `critic_trainer mcap2dataset IN.mcap ROOT [options]` or
`python -m qvgm.data.mcap IN.mcap ROOT [options]`; prints the report as JSON; exit 0 when the file was read
(truncated files included, with a warning on stderr), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from qvgm.data.layout import DatasetError
from qvgm.data.video import PIX_FMTS
from qvgm.recording import EpisodeOutcome, EpisodeRecorder, QualityConfig
from qvgm.rosmsg import image_array, joint_vector, stamp_seconds, trajectory_arrays

SCHEMA_ENCODING = "ros2msg"
MESSAGE_ENCODING = "cdr"
METADATA_NAME = "qvgm.recorder"
DELIMITER = "=" * 80

# ------------------------------------------------------------------------------------------ message definitions

PRIMITIVES = frozenset({"bool", "byte", "char", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32",
                        "uint32", "int64", "uint64", "string", "wstring"})
# a field's type at the start of a line ("foo_msgs/Bar" in "foo_msgs/Bar[] bar"); comments start with '#'
_FIELD_TYPE = re.compile(r"(?:^|\n)\s*([a-zA-Z0-9_/]+)(?:\[[^\]]*\])?\s+")
_TYPE_NAME = re.compile(r"^([a-zA-Z][a-zA-Z0-9_]*)/(?:(msg)/)?([a-zA-Z][a-zA-Z0-9_]*)$")


class McapConvertError(ValueError):
    """A file or configuration the converter refuses (nothing was written)."""


def ament_prefixes() -> list[Path]:
    """Install prefixes holding ROS packages: $AMENT_PREFIX_PATH entries, then this interpreter's prefix (the
    ros-kilted-* wheels install an ament index under the venv's share/)."""
    out: list[Path] = []
    for p in [*os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep), sys.prefix]:
        if p and Path(p) not in out and (Path(p) / "share" / "ament_index" / "resource_index" / "packages").is_dir():
            out.append(Path(p))
    return out


def package_share(package: str) -> Path:
    """share/<package> of the first prefix whose ament index lists the package; LookupError if none does."""
    for prefix in ament_prefixes():
        if (prefix / "share" / "ament_index" / "resource_index" / "packages" / package).exists():
            return prefix / "share" / package
    raise LookupError(f"ROS package {package!r} not found in the ament index of {[str(p) for p in ament_prefixes()]}")


def _msg_file(type_name: str) -> tuple[str, str]:
    """'pkg/msg/Type' or 'pkg/Type' -> (text of share/pkg/msg/Type.msg, pkg)."""
    m = _TYPE_NAME.match(type_name)
    if m is None:
        raise LookupError(f"message type {type_name!r} is not 'package/msg/Type'")
    pkg, typ = m.group(1), m.group(3)
    path = package_share(pkg) / "msg" / f"{typ}.msg"
    if not path.is_file():
        raise LookupError(f"no definition {path} for {type_name}")
    return path.read_text(), pkg


def _dependencies(text: str, package: str) -> list[str]:
    """Sorted non-primitive field types of a .msg text; unqualified names resolve in `package`."""
    deps = set()
    for typ in _FIELD_TYPE.findall(text):
        if typ not in PRIMITIVES:
            deps.add(typ if "/" in typ else f"{package}/{typ}")
    return sorted(deps)


@lru_cache(maxsize=256)
def message_definition(type_name: str) -> str:
    """Complete `ros2msg` definition of a message type ('sensor_msgs/msg/Image'): its .msg text, then each
    dependency (recursively, each once, depth first, sorted per level) as "\\n" + 80 '=' + "\\nMSG: pkg/Type\\n"
    + its .msg text: the format rosbag2 stores. LookupError when a definition is not installed."""
    seen: set[str] = set()

    def rec(name: str, depth: int) -> str:
        if depth > 50:
            raise LookupError(f"definition of {type_name} nests too deep (a cycle?)")
        text, pkg = _msg_file(name)
        out = text
        for dep in _dependencies(text, pkg):
            if dep not in seen:
                seen.add(dep)
                out += f"\n{DELIMITER}\nMSG: {dep}\n" + rec(dep, depth + 1)
        return out

    return rec(type_name, 0)


# ------------------------------------------------------------------------------------------ recording config


@dataclass
class RecordingConfig:
    """What the converter needs to know about a recording: topic of each role ("image/<cam>", "joint_states",
    "trajectory", "task", "version", "status"), cameras {name: (height, width)} px, the reference camera,
    dataset fps, joint names (state/action order), frame checks and the alignment delay (s)."""

    topics: dict[str, str]
    cameras: dict[str, tuple[int, int]]
    reference: str
    fps: int
    joint_names: list[str]
    quality: QualityConfig = field(default_factory=QualityConfig)
    delay: float = 0.2
    default_task: str = ""

    def __post_init__(self) -> None:
        if self.reference not in self.cameras:
            raise McapConvertError(f"reference camera {self.reference!r} not in cameras {sorted(self.cameras)}")
        missing = [f"image/{c}" for c in self.cameras if f"image/{c}" not in self.topics]
        missing += [r for r in ("joint_states", "trajectory", "status") if r not in self.topics]
        if missing:
            raise McapConvertError(f"recording config lacks topics for {missing}")
        if int(self.fps) <= 0 or not self.joint_names:
            raise McapConvertError("recording config needs fps > 0 and joint names")

    def to_metadata(self) -> dict[str, str]:
        """MCAP metadata record content (string values only)."""
        d = asdict(self)
        d["cameras"] = {k: list(v) for k, v in self.cameras.items()}
        return {"config": json.dumps(d), "format": "1"}

    @classmethod
    def from_metadata(cls, md: dict[str, str]) -> RecordingConfig:
        try:
            d = json.loads(md["config"])
            d["cameras"] = {k: (int(v[0]), int(v[1])) for k, v in d["cameras"].items()}
            d["quality"] = QualityConfig(**d.get("quality", {}))
            return cls(**d)
        except McapConvertError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise McapConvertError(f"unreadable {METADATA_NAME} metadata: {type(exc).__name__}: {exc}") from exc


# ------------------------------------------------------------------------------------------ recording


class McapTopicWriter:
    """Appends raw CDR messages to one MCAP file from a writer thread (see the module doc).

    `add_channel(topic, type)` once per topic (raises LookupError at once for an unknown type), then
    `write(topic, cdr_bytes, log_time_ns, publish_time_ns)` from any thread: never blocks; returns False and
    counts the message in `dropped` when the queue is full (`queue_size` messages or `max_queue_bytes`).
    A write error (disk full) stops the recording (`failed` holds the reason); the file keeps what was
    flushed. `close()` drains the queue and writes the summary and footer.
    """

    def __init__(self, path: str | Path, metadata: dict[str, dict[str, str]] | None = None,
                 compression: str = "lz4", chunk_size: int = 1 << 20, flush_period: float = 1.0,
                 queue_size: int = 4096, max_queue_bytes: int = 256 << 20) -> None:
        from mcap.writer import CompressionType, Writer

        comp = {"zstd": CompressionType.ZSTD, "lz4": CompressionType.LZ4, "none": CompressionType.NONE}
        if compression not in comp:
            raise ValueError(f"mcap compression must be one of {sorted(comp)}, got {compression!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "xb")  # noqa: SIM115 - owned by the writer thread, closed in close()
        self._writer = Writer(self._file, chunk_size=chunk_size, compression=comp[compression])
        self._writer.start(profile="ros2", library="qvgm recorder_node (mcap python)")
        for name, data in (metadata or {}).items():
            self._writer.add_metadata(name, data)
        self._writer.flush()
        self.flush_period = flush_period
        self.queue_size, self.max_queue_bytes = queue_size, max_queue_bytes
        self.channels: dict[str, str] = {}  # topic -> type
        self.written: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        self.failed: str | None = None
        self._lock = threading.Lock()
        self._queued_bytes = 0
        self._closed = False
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="mcap-writer", daemon=True)
        self._thread.start()

    def add_channel(self, topic: str, type_name: str) -> None:
        """Register a topic of message type 'pkg/msg/Type' (schema built now; LookupError if not installed)."""
        if topic in self.channels:
            if self.channels[topic] != type_name:
                raise ValueError(f"{topic} already registered as {self.channels[topic]}")
            return
        definition = message_definition(type_name)
        self.channels[topic] = type_name
        self.written.setdefault(topic, 0)
        self._q.put(("channel", topic, type_name, definition))

    def write(self, topic: str, data: bytes, log_time_ns: int, publish_time_ns: int | None = None) -> bool:
        """Queue one serialized (CDR) message of a registered topic; False (counted dropped) if it cannot be."""
        n = len(data)
        with self._lock:
            if self._closed or self.failed is not None or topic not in self.channels or \
                    self._q.qsize() >= self.queue_size or self._queued_bytes + n > self.max_queue_bytes:
                self.dropped[topic] = self.dropped.get(topic, 0) + 1
                return False
            self._queued_bytes += n  # put under the lock: nothing can follow close()'s stop item
            self._q.put(("msg", topic, bytes(data), int(log_time_ns),
                         int(publish_time_ns if publish_time_ns else log_time_ns)))
        return True

    def pending(self) -> int:
        return self._q.qsize()

    def _run(self) -> None:
        ids: dict[str, int] = {}
        seq: dict[str, int] = {}
        last_flush = time.monotonic()
        while True:
            try:
                item = self._q.get(timeout=max(self.flush_period, 0.01))
            except queue.Empty:
                item = ("idle",)  # quiet topics: still flush the open chunk on time
            if item[0] == "stop":
                return
            try:
                if self.failed is not None:
                    pass
                elif item[0] == "idle":
                    pass
                elif item[0] == "channel":
                    _, topic, type_name, definition = item
                    sid = self._writer.register_schema(type_name, SCHEMA_ENCODING, definition.encode())
                    ids[topic] = self._writer.register_channel(topic, MESSAGE_ENCODING, sid)
                else:
                    _, topic, data, log_ns, pub_ns = item
                    seq[topic] = seq.get(topic, 0) + 1
                    self._writer.add_message(ids[topic], log_time=log_ns, data=data, publish_time=pub_ns,
                                             sequence=seq[topic] & 0xFFFFFFFF)
                    self.written[topic] += 1
                if self.failed is None and time.monotonic() - last_flush >= self.flush_period:
                    self._writer.flush()  # completes the chunk: a killed process loses at most flush_period
                    last_flush = time.monotonic()
            except Exception as exc:  # disk full, ...: stop recording, keep what is on disk
                self.failed = f"{type(exc).__name__}: {exc}"
            finally:
                if item[0] == "msg":
                    with self._lock:
                        self._queued_bytes -= len(item[2])

    def close(self, timeout: float = 30.0) -> None:
        """Drain the queue, write the summary/footer, fsync and close the file (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._q.put(("stop",))
        self._thread.join(timeout)
        try:
            if self.failed is None and not self._thread.is_alive():
                self._writer.finish()
                self._file.flush()
                os.fsync(self._file.fileno())
        except Exception as exc:
            self.failed = f"{type(exc).__name__}: {exc}"
        finally:
            if not self._thread.is_alive():
                try:
                    self._file.close()  # a failed flush of buffered bytes still closes the descriptor
                except OSError as exc:
                    self.failed = self.failed or f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------------------ reading


class _Truncated(Exception):
    """The file ends inside a record."""


class _StrictFile:
    """File wrapper for mcap's StreamReader: a short read (the file ends inside a record) raises _Truncated
    instead of handing the parser a partial record."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        if n is not None and n > 0 and len(data) < n:
            raise _Truncated(f"file ends inside a record at byte {self.count + len(data)}")
        self.count += len(data)
        return data


@dataclass
class ReadState:
    """Where reading an MCAP file stopped: complete (footer reached) or truncated/corrupt, with the reason."""

    complete: bool = False
    stopped: str | None = None
    bytes_read: int = 0
    size: int = 0


def iter_records(path: str | Path, state: ReadState) -> Any:
    """Yield the file's records in order (chunks opened, CRCs checked); stops quietly at a truncated or corrupt
    record, noting it in `state`. McapConvertError when the file does not start like an MCAP."""
    from mcap.records import Footer
    from mcap.stream_reader import StreamReader

    path = Path(path)
    state.size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(8) != b"\x89MCAP0\r\n":
            raise McapConvertError(f"{path}: not an MCAP file (bad magic)")
        f.seek(0)
        sf = _StrictFile(f)
        reader = StreamReader(sf, validate_crcs=True)  # type: ignore[arg-type]
        it = reader.records
        first = True
        while True:
            try:
                rec = next(it)
            except StopIteration:
                state.complete = True
                break
            except Exception as exc:  # _Truncated, McapError, CRC mismatch, struct/zstd errors: stop here
                if first:
                    raise McapConvertError(f"{path}: unreadable MCAP header ({type(exc).__name__}: {exc})") from exc
                state.stopped = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                break
            finally:
                state.bytes_read = sf.count
            first = False
            yield rec
            if isinstance(rec, Footer):
                state.complete = True


# ------------------------------------------------------------------------------------------ conversion


@dataclass
class ConvertReport:
    """Outcome of one conversion. episodes: one dict per finished/refused episode as EpisodeRecorder reports it
    ({"episode", "index", "status", "notes"}); incomplete: manager episode ids still running at the end of the
    file and dropped; messages/bad: per-topic counts of messages read / rejected (first reasons in errors)."""

    source: str
    root: str
    complete: bool
    truncated: bool
    stopped: str | None
    bytes_read: int
    size: int
    messages: dict[str, int] = field(default_factory=dict)
    bad: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    episodes: list[dict[str, Any]] = field(default_factory=list)
    incomplete: list[int] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, default=str)


class _Replay:
    """Feeds decoded messages into an EpisodeRecorder with log_time as the arrival clock."""

    def __init__(self, cfg: RecordingConfig, core: EpisodeRecorder, report: ConvertReport) -> None:
        self.cfg, self.core, self.report = cfg, core, report
        self.roles = {topic: role for role, topic in cfg.topics.items()}
        self.now = -math.inf
        self.last_stamp = -math.inf

    def bad(self, topic: str, exc: BaseException) -> None:
        self.report.bad[topic] = self.report.bad.get(topic, 0) + 1
        if len(self.report.errors) < 50:
            self.report.errors.append(f"{topic} at log time {self.now:.3f}: {type(exc).__name__}: {exc}")

    def message(self, topic: str, msg: Any, log_time_ns: int) -> None:
        self.now = max(self.now, log_time_ns * 1e-9)
        self.core.poll(self.now)
        while self.core.pending() > 8 and self.core._worker.is_alive():  # backpressure: never overflow the queue
            time.sleep(0.002)
        role = self.roles.get(topic)
        if role is None:
            return
        core, now = self.core, self.now
        if role.startswith("image/"):
            cam = role[len("image/"):]
            img = image_array(msg)
            h, w = self.cfg.cameras[cam]
            if img.shape != (h, w, 3):
                raise ValueError(f"{img.shape[1]}x{img.shape[0]} image, dataset expects {w}x{h}")
            stamp = stamp_seconds(msg.header.stamp) or now
            core.add_image(cam, stamp, img, now)
        elif role == "joint_states":
            core.add_state(stamp_seconds(msg.header.stamp) or now, joint_vector(msg, self.cfg.joint_names))
            return
        elif role == "trajectory":
            stamp, times, pos = trajectory_arrays(msg, self.cfg.joint_names)
            core.add_chunk(stamp if stamp > 0 else now, times, pos)
            stamp = stamp if stamp > 0 else now
        elif role == "task":
            core.set_task(str(msg.data))
            return
        elif role == "version":
            core.set_version(str(msg.data))
            return
        elif role == "status":
            st = json.loads(msg.data)
            if not isinstance(st, dict) or "state" not in st or "episode" not in st:
                raise ValueError("status needs state and episode")
            core.on_status(st)
            return
        else:
            return
        self.last_stamp = max(self.last_stamp, stamp)


def convert_mcap(path: str | Path, root: str | Path, config: RecordingConfig | None = None, *,
                 recover_partial: bool = False, codec: str = "libx264", crf: int = 20,
                 pix_fmt: str = "yuv420p") -> ConvertReport:
    """Convert a recorder MCAP into episodes of the dataset at `root` (created if absent; appended to if it
    exists with the same fps/cameras/joints). `config` defaults to the file's "qvgm.recorder" metadata. See the
    module doc for alignment, truncated files and `recover_partial`. Raises McapConvertError (nothing written)
    for a non-MCAP file, a missing/unknown config or an incompatible dataset."""
    from mcap.records import Channel, Message, Metadata, Schema
    from mcap_ros2.decoder import DecoderFactory

    path = Path(path)
    if not path.is_file():
        raise McapConvertError(f"{path}: no such file")
    state = ReadState()
    report = ConvertReport(str(path), str(root), False, False, None, 0, 0)
    schemas: dict[int, Any] = {}
    channels: dict[int, Any] = {}
    decoders: dict[int, Any] = {}
    factory = DecoderFactory()
    replay: _Replay | None = None
    core: EpisodeRecorder | None = None
    try:
        for rec in iter_records(path, state):
            if isinstance(rec, Schema):
                schemas[rec.id] = rec
            elif isinstance(rec, Channel):
                channels[rec.id] = rec
            elif isinstance(rec, Metadata) and rec.name == METADATA_NAME and config is None:
                config = RecordingConfig.from_metadata(dict(rec.metadata))
            elif isinstance(rec, Message):
                ch = channels.get(rec.channel_id)
                if ch is None:
                    continue
                topic = ch.topic
                report.messages[topic] = report.messages.get(topic, 0) + 1
                if replay is None:
                    if config is None:
                        raise McapConvertError(f"{path}: no {METADATA_NAME} metadata before the first message; "
                                               f"pass a recording config (--config JSON)")
                    core = _open_core(root, config, codec, crf, pix_fmt)
                    replay = _Replay(config, core, report)
                if topic not in replay.roles:
                    continue
                try:
                    dec = decoders.get(ch.id)
                    if dec is None:
                        dec = factory.decoder_for(ch.message_encoding, schemas.get(ch.schema_id))
                        if dec is None:
                            raise ValueError(f"no ros2msg/cdr decoder for channel {topic} "
                                             f"({ch.message_encoding}, schema {ch.schema_id})")
                        decoders[ch.id] = dec
                    replay.message(topic, dec(rec.data), rec.log_time)
                except McapConvertError:
                    raise
                except Exception as exc:  # one bad message never stops the conversion
                    replay.bad(topic, exc)
        report.complete, report.stopped = state.complete, state.stopped
        report.truncated = not state.complete
        report.bytes_read, report.size = state.bytes_read, state.size
        if core is not None and replay is not None:
            _finish(core, replay, report, recover_partial)
    finally:
        if core is not None:
            _drain(core)
            core.close(timeout=600.0)
    if core is not None:
        report.episodes = list(core.results)
        report.errors += core.errors
    return report


def _open_core(root: str | Path, cfg: RecordingConfig, codec: str, crf: int, pix_fmt: str) -> EpisodeRecorder:
    from qvgm.data.buffer import ReplayBuffer

    try:
        buf = ReplayBuffer.open_or_create(root, fps=int(cfg.fps), cameras=dict(cfg.cameras),
                                          state_names=list(cfg.joint_names), action_names=list(cfg.joint_names),
                                          codec=codec, crf=crf, pix_fmt=pix_fmt)
    except RuntimeError as exc:  # another process holds the buffer's writer lock
        raise McapConvertError(str(exc)) from exc
    try:
        if buf.fps != int(cfg.fps) or buf.cameras != dict(cfg.cameras) or \
                buf.features["observation.state"]["shape"][0] != len(cfg.joint_names):
            raise McapConvertError(f"{root}: dataset has fps {buf.fps}, cameras {buf.cameras}, state dim "
                                   f"{buf.features['observation.state']['shape'][0]}; the recording has fps "
                                   f"{cfg.fps}, cameras {dict(cfg.cameras)}, {len(cfg.joint_names)} joints")
    except BaseException:
        buf.close()
        raise
    return EpisodeRecorder(buf, cfg.reference, cfg.quality, delay=cfg.delay, queue_size=64,
                           default_task=cfg.default_task)


def _drain(core: EpisodeRecorder) -> None:
    while core.pending() > 0 and core._worker.is_alive():
        time.sleep(0.005)


def _finish(core: EpisodeRecorder, replay: _Replay, report: ConvertReport, recover_partial: bool) -> None:
    """End of the readable file: finalise what can be, recover or drop a still-running episode."""
    with core.lock:
        core.poll(replay.now)
        if core.episode is not None and core.outcome is None:
            why = "recording ended before the episode was labelled" if core.t_end is not None else \
                "recording ended while the episode was running"
            if recover_partial:
                core.t_end = core.t_end if core.t_end is not None else max(replay.last_stamp, core.t_start or 0.0)
                core.outcome = EpisodeOutcome(None, None, True, False, f"partial: {why}")
            else:
                report.incomplete.append(int(core.episode))
                report.errors.append(f"episode {core.episode}: {why}; dropped (use recover_partial to keep it "
                                     f"flagged discarded)")
        core.poll(math.inf)  # an episode without outcome stays open; close() aborts it (no result entry)
    _drain(core)


# ------------------------------------------------------------------------------------------ CLI

HELP = "convert a recorder_node MCAP recording into replay-buffer episodes (as-of alignment, no future leakage)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mcap", help="input .mcap file (recorder_node mcap_dir output)")
    p.add_argument("root", help="dataset directory (created, or appended to when compatible)")
    p.add_argument("--config", default=None,
                   help="recording config JSON (RecordingConfig fields) for files without qvgm.recorder metadata")
    p.add_argument("--recover-partial", action="store_true",
                   help="commit an episode still running at the end of the file, flagged discarded")
    p.add_argument("--codec", default="libx264", help="video encoder (default libx264)")
    p.add_argument("--crf", type=int, default=20, help="video quality (default 20)")
    p.add_argument("--pix-fmt", choices=PIX_FMTS, default="yuv420p",
                   help="video pixel format of a new dataset (yuv444p: full-resolution colour, for small images)")


def run(args: argparse.Namespace) -> int:
    cfg = None
    if args.config:
        text = Path(args.config).read_text() if Path(args.config).is_file() else args.config
        cfg = RecordingConfig.from_metadata({"config": text})
    rep = convert_mcap(args.mcap, args.root, cfg, recover_partial=args.recover_partial, codec=args.codec,
                       crf=args.crf, pix_fmt=args.pix_fmt)
    print(rep.to_json())
    if rep.truncated:
        print(f"warning: {args.mcap} is truncated ({rep.stopped or 'no footer'}); converted the "
              f"{rep.bytes_read} of {rep.size} bytes that were complete", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qvgm.data.mcap", description=HELP)
    add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        return run(args)
    except (McapConvertError, DatasetError, FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"mcap2dataset: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ConvertReport", "McapConvertError", "McapTopicWriter", "RecordingConfig", "ament_prefixes",
           "convert_mcap", "iter_records", "message_definition"]
