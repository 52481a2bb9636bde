"""Camera streams <-> mp4 with PyAV: H.264 (libx264, yuv420p) by default, frame i at pts i / fps.

yuv420p stores colour at half resolution: harmless for 640x480 camera streams, but at the model's own size
(32-128 px sim renders) a few-pixel object loses its colour (mean |error| ~6 / 255 at 32 px, up to 178), so a
policy trained on decoded frames sees sharper frames at run time than it trained on. Sim datasets are therefore
recorded with `SIM_VIDEO` (libx264 yuv444p, crf 0: within 2 / 255 of the render).

The encoder writes frames as they arrive (so finishing an episode only flushes the codec); the decoder seeks
to the key frame at or before the wanted frame, which is cheap because the GOP is short (default 2, like
LeRobot's encoder, for random access by the trainer).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

DEFAULT_CODEC = "libx264"
PIX_FMT = "yuv420p"
PIX_FMTS = ("yuv420p", "yuv444p")  # yuv444p: full-resolution colour, libx264 only
SIM_VIDEO = {"pix_fmt": "yuv444p", "crf": 0}  # ReplayBuffer.create settings for datasets rendered by the sim


def pick_codec(preferred: str = DEFAULT_CODEC) -> str:
    """`preferred` if this PyAV build can encode it, else the first of libx264 / libsvtav1 / libopenh264 / mpeg4."""
    for name in (preferred, "libx264", "libsvtav1", "libopenh264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - codec not in this build
            continue
    raise RuntimeError("no usable video encoder in this PyAV build")


def check_pix_fmt(pix_fmt: str, encoder: str) -> None:
    """Refuse a pixel format the encoder cannot write (ValueError naming both)."""
    if pix_fmt not in PIX_FMTS:
        raise ValueError(f"pix_fmt {pix_fmt!r} is not supported; use one of {PIX_FMTS}")
    if pix_fmt != "yuv420p" and encoder != "libx264":
        raise ValueError(f"pix_fmt {pix_fmt!r} needs the libx264 encoder; this one is {encoder!r} (use yuv420p)")


def sim_video(encoder: str | None = None) -> dict[str, object]:
    """SIM_VIDEO when the encoder (default: pick_codec()) is libx264, else yuv420p at crf 0 (the best it has)."""
    return dict(SIM_VIDEO) if (encoder or pick_codec()) == "libx264" else {"pix_fmt": "yuv420p", "crf": 0}


def codec_family(encoder: str) -> str:
    """Name LeRobot stores in `video.codec` (the bitstream, not the encoder library)."""
    return {"libx264": "h264", "libopenh264": "h264", "libsvtav1": "av1", "libaom-av1": "av1"}.get(encoder, encoder)


class VideoEncoder:
    """Encode uint8 RGB frames [H, W, 3] into one mp4 file; H and W must be even. `pix_fmt` in PIX_FMTS
    (yuv444p with libx264 only); `crf` quality (0 = lossless in YUV)."""

    def __init__(self, path: Path, width: int, height: int, fps: int, codec: str = DEFAULT_CODEC,
                 crf: int = 20, gop: int = 2, preset: str = "veryfast", threads: int = 1,
                 pix_fmt: str = PIX_FMT) -> None:
        check_pix_fmt(pix_fmt, codec)
        if width % 2 or height % 2:
            raise ValueError(f"{pix_fmt} video needs even width/height, got {width}x{height}")
        self.path = Path(path)
        self.width, self.height, self.fps = int(width), int(height), int(fps)
        self.count = 0
        self._container = av.open(str(self.path), mode="w", format="mp4")
        try:
            stream = self._container.add_stream(codec, rate=self.fps)
            stream.width, stream.height, stream.pix_fmt = self.width, self.height, pix_fmt
            stream.codec_context.time_base = Fraction(1, self.fps)
            stream.codec_context.gop_size = int(gop)
            stream.thread_count = int(threads)
            opts = {"g": str(int(gop)), "bf": "0"}
            if codec == "libx264":
                opts.update({"crf": str(int(crf)), "preset": preset})
            elif codec == "libsvtav1":
                opts.update({"crf": str(int(crf)), "preset": "12"})
            stream.options = opts
        except BaseException:
            self._container.close()
            raise
        self._stream = stream

    def add(self, image: np.ndarray) -> None:
        """Append one frame (uint8 [H, W, 3] RGB)."""
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts = self.count
        frame.time_base = Fraction(1, self.fps)
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.count += 1

    def close(self) -> None:
        """Flush the codec and write the mp4 index (moov); the file is complete after this returns."""
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
        finally:
            self._container.close()

    def abort(self) -> None:
        try:
            self._container.close()
        except Exception:  # noqa: BLE001 - best effort on a broken/failed file
            pass


def probe(path: Path) -> dict:
    """Codec name, pix_fmt, size, frame count and fps of the first video stream."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return {"codec": s.codec_context.name, "pix_fmt": s.codec_context.pix_fmt, "width": s.width,
                "height": s.height, "frames": s.frames, "fps": float(s.average_rate or 0)}


class VideoDecoder:
    """Random access to frames of one mp4 by frame index (timestamp = from_timestamp + index / fps)."""

    def __init__(self, path: Path, fps: int) -> None:
        self.path = Path(path)
        self.fps = int(fps)
        self._container = av.open(str(self.path))
        self._stream = self._container.streams.video[0]
        self._stream.thread_count = 1  # frame threading makes every seek slow (~4x); parallelise across workers
        self._iter = None
        self._next_index = None  # index the sequential decoder will produce next, if positioned

    def _frame_index(self, frame: av.VideoFrame) -> int:
        return int(round(float(frame.pts * frame.time_base) * self.fps))

    def _seek(self, index: int) -> None:
        pts = int(round(index / self.fps / self._stream.time_base))
        self._container.seek(pts, stream=self._stream, backward=True, any_frame=False)
        self._iter = self._container.decode(self._stream)
        self._next_index = None

    def get(self, indices: list[int], offset_s: float = 0.0) -> dict[int, np.ndarray]:
        """Decode the frames at `indices` (file-relative after adding offset_s * fps) -> {index: uint8 [H, W, 3]}."""
        shift = int(round(offset_s * self.fps))
        out: dict[int, np.ndarray] = {}
        for want in sorted(set(indices)):
            target = want + shift
            if self._next_index is None or not (self._next_index <= target <= self._next_index + 8):
                self._seek(target)
            for frame in self._iter:
                fi = self._frame_index(frame)
                self._next_index = fi + 1
                if fi == target:
                    out[want] = frame.to_ndarray(format="rgb24")
                    break
                if fi > target:
                    raise RuntimeError(f"{self.path}: frame {target} not found (decoder jumped to {fi})")
            else:
                raise IndexError(f"{self.path}: frame {target} is past the end of the video")
        return out

    def close(self) -> None:
        self._container.close()


class DecoderCache:
    """A few open VideoDecoders, least recently used closed first."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._open: OrderedDict[str, VideoDecoder] = OrderedDict()
        self._pid = os.getpid()

    def get(self, path: Path, fps: int) -> VideoDecoder:
        if os.getpid() != self._pid:  # forked (DataLoader worker): never share the parent's open decoders
            self._open = OrderedDict()
            self._pid = os.getpid()
        key = str(path)
        dec = self._open.pop(key, None)
        if dec is None:
            dec = VideoDecoder(path, fps)
        self._open[key] = dec
        while len(self._open) > self.size:
            self._open.popitem(last=False)[1].close()
        return dec

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()
