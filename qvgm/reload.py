"""Hot reload of checkpoints from a CheckpointStore, for a control loop that must never wait.

The policy node builds a `HotReloader(store, load_fn, validate_fn)`, calls `start()`, and between two control
ticks (at a chunk boundary) calls `poll_swap()`: it returns `(model, version)` when a new, validated model is
ready, else None, and never blocks on a load. Loading happens on a background thread:

    CURRENT changes (inotify on the store root via ctypes, or polling) / request_reload() / request_rollback()
      -> lease the version (retention cannot delete it meanwhile)
      -> verify_checkpoint_dir: manifest present, every sha256 matches, no pickle-format file
      -> load_fn(path, manifest) -> model          (safetensors only; may move to GPU)
      -> validate_fn(model, manifest)              (config vs robot profile, finite weights, dry-run latency;
                                                    the dry run also pre-warms the model on this thread)
      -> offered by poll_swap()
The loader thread pauses `yield_s` between stages and then waits for `pace()` (e.g. the next chunk boundary),
so the control thread gets the GIL at once rather than after the interpreter's switch interval and the heavy
stages run in the control loop's idle gaps; the swapped-out model is handed back with `retire()` and released
on the loader thread, never on the control thread (freeing a large model's tensors takes milliseconds).
A refused version (any exception above) is recorded with its reason (`last_error`, counters, `history`) and
never retried automatically; the model already serving keeps serving. No rclpy here: the node maps
`request_reload` / `request_rollback` onto its std_srvs/Trigger services and `diagnostic_values()` onto
/diagnostics. Flow-time conventions are the model's business (openpi: t=1 noise, t=0 clean).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import os
import select
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from qvgm.checkpoints import POINTER, CheckpointError, CheckpointStore, verify_checkpoint_dir

log = logging.getLogger("qvgm.reload")

M = TypeVar("M")
LoadFn = Callable[[Path, dict[str, Any]], M]
ValidateFn = Callable[[M, dict[str, Any]], None]


class ValidationError(RuntimeError):
    """A loaded model does not fit the robot (shapes, config, norm stats) or misbehaves (NaN, too slow)."""


# ---- validation helpers a node composes into its validate_fn --------------------------------------------------
def check_finite(tensors: Mapping[str, Any]) -> None:
    """Raise ValidationError naming the first tensor with a NaN/inf (torch tensors or numpy arrays)."""
    import numpy as np
    import torch

    for name, t in tensors.items():
        if isinstance(t, torch.Tensor):
            ok = bool(torch.isfinite(t).all()) if t.is_floating_point() else True
        else:
            arr = np.asarray(t)
            ok = bool(np.isfinite(arr).all()) if np.issubdtype(arr.dtype, np.floating) else True
        if not ok:
            raise ValidationError(f"non-finite values (NaN/inf) in weight {name}")


def check_shapes(tensors: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Raise ValidationError if a tensor in `expected` is missing or has another shape."""
    for name, shape in expected.items():
        if name not in tensors:
            raise ValidationError(f"weight {name} missing (expected shape {tuple(shape)})")
        got = tuple(tensors[name].shape)
        if got != tuple(shape):
            raise ValidationError(f"weight {name} has shape {got}, expected {tuple(shape)}")


def timed_dry_run(fn: Callable[[], Any], budget_s: float, warmup: int = 1, repeats: int = 1) -> float:
    """Run `fn` `warmup` times untimed, then `repeats` times; raise ValidationError if the best run exceeds
    `budget_s` seconds or the output has NaN/inf. Returns the best duration in seconds."""
    out = None
    for _ in range(warmup):
        out = fn()
    best = math.inf
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    if best > budget_s:
        raise ValidationError(f"dry-run inference took {best * 1e3:.1f} ms, over the {budget_s * 1e3:.1f} ms budget")
    if out is not None:
        try:
            check_finite({"dry-run output": out})
        except (TypeError, ValueError):
            pass  # not array-like: nothing to check
    return best


# ---- watching the store's CURRENT pointer --------------------------------------------------------------------
_IN_CLOSE_WRITE = 0x008
_IN_MOVED_TO = 0x080
_IN_CREATE = 0x100
_IN_Q_OVERFLOW = 0x4000
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")


class _Inotify:
    """Minimal inotify on one directory through libc (ctypes); raises OSError where unavailable."""

    def __init__(self, directory: Path) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if not hasattr(libc, "inotify_init1"):
            raise OSError("libc has no inotify")
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        wd = libc.inotify_add_watch(fd, os.fsencode(str(directory)), _IN_MOVED_TO | _IN_CLOSE_WRITE | _IN_CREATE)
        if wd < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch({directory}) failed")
        self.fd = fd

    def read_names(self) -> list[str | None]:
        """Names from pending events (None for a queue overflow); [] if nothing is pending."""
        try:
            buf = os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return []
        names: list[str | None] = []
        off = 0
        while off + _EVENT.size <= len(buf):
            _wd, mask, _cookie, length = _EVENT.unpack_from(buf, off)
            raw = buf[off + _EVENT.size: off + _EVENT.size + length]
            names.append(None if mask & _IN_Q_OVERFLOW else raw.rstrip(b"\0").decode(errors="replace"))
            off += _EVENT.size + length
        return names

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class ReloadEvent:
    """One entry of `HotReloader.history`: event is ready | refused | swapped | superseded | fallback."""

    version: str
    event: str
    wall_time: float  # time.time() seconds
    detail: str = ""
    load_s: float = 0.0  # verify + load + validate duration, seconds


class HotReloader(Generic[M]):
    """Background loading, validation and swap-at-a-boundary of store versions. Thread-safe.

    load_fn(path, manifest) -> model: build the model from the version directory (safetensors only).
    validate_fn(model, manifest): raise (ValidationError or anything) to refuse the model.
    watch: "auto" (inotify, else polling), "inotify" or "poll". With inotify a slow backup poll
    (`backup_poll_s`) still runs in case an event is lost; polling reads CURRENT every `poll_interval_s`.
    keep_previous: keep the model swapped out last, so rolling back to it is instant (costs its memory).
    startup_fallback: while nothing serves yet (node start), a refused version makes the reloader try its
    parent (then the parent's parent...) without moving the store's CURRENT, so a node restarted on a bad
    CURRENT still gets the last good model; the refusal stays in last_error / refused_versions.
    yield_s: seconds the loader thread sleeps between its stages (verify, load, validate), releasing the GIL.
    pace: called on the loader thread after that sleep; may block (bounded) until the control loop is idle, e.g.
    until it has just published a chunk, so the next stage runs in the gap before the next inference.
    The caller owns the swapped-in model; it hands the old one to `retire()` after poll_swap() gave it a new one,
    so the old model is released on the loader thread. Do not lower the loader thread's OS priority (nice):
    a descheduled low-priority thread that holds the GIL stalls the control thread (priority inversion).
    """

    def __init__(self, store: CheckpointStore, load_fn: LoadFn, validate_fn: ValidateFn | None = None, *,
                 required_files: Iterable[str] = (), watch: str = "auto", poll_interval_s: float = 0.5,
                 backup_poll_s: float = 5.0, keep_previous: bool = False, startup_fallback: bool = True,
                 history_len: int = 100, yield_s: float = 0.002,
                 pace: Callable[[], None] | None = None) -> None:
        if watch not in ("auto", "inotify", "poll"):
            raise ValueError(f"watch must be auto, inotify or poll, not {watch!r}")
        self.store = store
        self.load_fn = load_fn
        self.validate_fn = validate_fn
        self.required_files = tuple(required_files)
        self.poll_interval_s = poll_interval_s
        self.backup_poll_s = backup_poll_s
        self.keep_previous = keep_previous
        self.startup_fallback = startup_fallback
        self.yield_s = max(0.0, float(yield_s))
        self.pace = pace
        self._watch = watch
        self.watch_mode: str | None = None  # "inotify" or "poll" once started
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._want: str | None = None  # version the worker should make ready
        self._want_gen = 0  # bumps on every request so the worker notices
        self._force = False
        self._seen: str | None = None  # last CURRENT value the watcher saw
        self._pending: tuple[M, str] | None = None
        self._previous: tuple[M, str] | None = None
        self._serving_model: M | None = None  # only with keep_previous
        self._loading: str | None = None
        self.serving: str | None = None
        self.refused: dict[str, str] = {}
        self.last_error: str | None = None
        self.last_load_s: float | None = None
        self.counters = {"loads": 0, "ready": 0, "refused": 0, "swaps": 0, "superseded": 0,
                         "rollbacks": 0, "watch_events": 0}
        self.history: deque[ReloadEvent] = deque(maxlen=history_len)
        self._retired: deque[Any] = deque()  # swapped-out models the loader thread releases
        self.released = 0  # retired models released so far
        self._threads: list[threading.Thread] = []
        self._inotify: _Inotify | None = None
        self._wake_r, self._wake_w = -1, -1

    # ---- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> HotReloader[M]:
        """Start the watcher and the loader threads; the current version (if any) starts loading at once."""
        if self._threads:
            return self
        self._stop.clear()
        if self._watch in ("auto", "inotify"):
            try:
                self._inotify = _Inotify(self.store.root)
                self.watch_mode = "inotify"
            except OSError as e:
                if self._watch == "inotify":
                    raise
                log.warning("inotify unavailable (%s): polling %s every %.2f s", e, self.store.root,
                            self.poll_interval_s)
        if self._inotify is None:
            self.watch_mode = "poll"
        self._wake_r, self._wake_w = os.pipe()
        self._check_pointer()
        for target, name in ((self._watch_loop, "qvgm-reload-watch"), (self._worker_loop, "qvgm-reload-load")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop both threads (a load in progress finishes first, up to `timeout` seconds)."""
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> HotReloader[M]:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- the control loop's side (never blocks on a load) --------------------------------------------
    def poll_swap(self) -> tuple[M, str] | None:
        """Call between ticks: the newly ready (model, version) to swap in now, else None. Non-blocking."""
        if not self._lock.acquire(blocking=False):
            return None  # the worker is updating its bookkeeping this instant: try at the next boundary
        try:
            if self._pending is None:
                return None
            model, version = self._pending
            self._pending = None
            if self.keep_previous and self._serving_model is not None and self.serving is not None:
                if self._previous is not None:
                    self._retired.append(self._previous[0])  # released on the loader thread
                self._previous = (self._serving_model, self.serving)
            self._serving_model = model if self.keep_previous else None
            self.serving = version
            self.counters["swaps"] += 1
            self.history.append(ReloadEvent(version, "swapped", time.time()))
            return model, version
        finally:
            self._lock.release()

    def wait_for_swap(self, timeout: float) -> tuple[M, str] | None:
        """Startup helper (never in the control loop): block until poll_swap() has something, or timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.poll_swap()
            if got is not None:
                return got
            time.sleep(0.01)
        return None

    def retire(self, model: Any) -> None:
        """Hand over a swapped-out model: the loader thread releases it (drops the last reference there), so
        freeing its tensors never runs on the control thread. Non-blocking; the caller must keep no reference."""
        if model is None:
            return
        self._retired.append(model)  # deque.append is atomic: no lock on the control thread
        if self._lock.acquire(blocking=False):  # else the worker holds it: it drains the deque before waiting
            try:
                self._cv.notify_all()
            finally:
                self._lock.release()

    def _release_retired(self) -> None:
        """Loader thread: drop every retired model (their memory is freed here)."""
        while True:
            try:
                model = self._retired.popleft()
            except IndexError:
                return
            del model
            self.released += 1

    # ---- service handlers (return (success, message) like std_srvs/Trigger) -------------------------
    def request_reload(self) -> tuple[bool, str]:
        """~/reload: (re)load the store's current version now, retrying it even if it was refused before."""
        try:
            v = self.store.current()
        except CheckpointError as e:
            return False, str(e)
        if v is None:
            return False, f"store {self.store.root} has no current version"
        with self._cv:
            self._seen = v
            if v == self.serving:
                self._request_locked(v, force=False)  # drops a pending other version; nothing to load
                return True, f"already serving {v}"
            self._request_locked(v, force=True)
        return True, f"loading {v} in the background"

    def request_rollback(self, to: str | None = None) -> tuple[bool, str]:
        """~/rollback: point the store back at `to` (default: the parent of its current version) and load it.

        The rollback target goes through the same verification and validation as any version."""
        try:
            target = self.store.rollback(to)
        except CheckpointError as e:
            return False, f"rollback refused: {e}"
        with self._cv:
            self.counters["rollbacks"] += 1
            self._seen = target
            if target == self.serving:
                self._request_locked(target, force=False)  # drops a pending other version; nothing to load
                return True, f"store rolled back to {target}, already serving it"
            if self._previous is not None and self._previous[1] == target:
                self._request_locked(target, force=False)  # worker skips it: it is pending already
                self._pending = self._previous
                self._previous = None
                self.history.append(ReloadEvent(target, "ready", time.time(), "kept in memory"))
                return True, f"rolled back to {target} (kept in memory, swaps at the next chunk boundary)"
            self._request_locked(target, force=True)
        return True, f"store rolled back to {target}; loading it in the background"

    # ---- diagnostics ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Snapshot for /diagnostics: serving/pending/loading versions, last error, counters."""
        with self._lock:
            return {"serving": self.serving, "pending": self._pending[1] if self._pending else None,
                    "loading": self._loading, "store_current": self._seen, "watch": self.watch_mode,
                    "last_error": self.last_error, "last_load_s": self.last_load_s,
                    "refused_versions": dict(self.refused), **self.counters}

    def diagnostic_values(self) -> dict[str, str]:
        """status() flattened to strings (DiagnosticStatus key/values)."""
        s = self.status()
        s.pop("refused_versions")
        return {k: "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v)) for k, v in s.items()}

    # ---- internals ------------------------------------------------------------------------------------
    def _request_locked(self, version: str, force: bool) -> None:
        if self._pending is not None and self._pending[1] != version:
            self.history.append(ReloadEvent(self._pending[1], "superseded", time.time(), f"{version} requested"))
            self.counters["superseded"] += 1
            self._retired.append(self._pending[0])  # released on the loader thread, not the caller's
            self._pending = None  # never offer a version that is no longer wanted
        self._want = version
        self._want_gen += 1
        self._force = self._force or force
        self._cv.notify_all()

    def _check_pointer(self) -> None:
        try:
            v = self.store.current()
        except CheckpointError as e:  # cannot happen with our own writers; keep serving regardless
            with self._lock:
                self.last_error = str(e)
            return
        with self._cv:
            if v is not None and v != self._seen:
                self._seen = v
                self.counters["watch_events"] += 1
                self._request_locked(v, force=False)

    def _watch_loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self._inotify is not None:
                    ready, _, _ = select.select([self._inotify.fd, self._wake_r], [], [], self.backup_poll_s)
                    if self._inotify.fd in ready:
                        names = self._inotify.read_names()
                        if any(n is None or n == POINTER for n in names):
                            self._check_pointer()
                    elif not ready:
                        self._check_pointer()  # backup poll
                else:
                    self._check_pointer()
                    self._stop.wait(self.poll_interval_s)
            except Exception as e:  # the watcher must outlive any surprise
                log.exception("reload watcher: %s", e)
                self._stop.wait(self.poll_interval_s)

    def _worker_loop(self) -> None:
        done_gen = 0
        while True:
            self._release_retired()
            with self._cv:
                while not self._stop.is_set() and self._want_gen == done_gen and not self._retired:
                    self._cv.wait(timeout=1.0)  # timeout: a retire() that could not notify is picked up anyway
                if self._stop.is_set():
                    self._release_retired()
                    return
                if self._retired:
                    continue  # release them outside the lock, then look again
                version, gen, force = self._want, self._want_gen, self._force
                self._force = False
                done_gen = gen
                pending_v = self._pending[1] if self._pending else None
                skip = (version is None or version == pending_v or version == self.serving
                        or (version in self.refused and not force))
                if not skip:
                    self._loading = version
            if skip:
                continue
            assert version is not None
            self._load_one(version, gen)

    def _load_one(self, version: str, gen: int) -> None:
        t0 = time.perf_counter()
        stage = "verify"
        try:
            with self.store.lease(version) as lease:
                manifest = verify_checkpoint_dir(lease.path, self.required_files)
                if manifest.get("version") != version:
                    raise CheckpointError(f"manifest says version {manifest.get('version')!r}, directory is {version}")
                stage = "load"
                with self._lock:
                    self.counters["loads"] += 1
                self._pause()
                model = self.load_fn(lease.path, manifest)
            stage = "validate"
            if self.validate_fn is not None:
                self._pause()
                self.validate_fn(model, manifest)
        except Exception as e:
            dt = time.perf_counter() - t0
            reason = f"{version} refused at {stage}: {type(e).__name__}: {e}"
            log.error("checkpoint %s", reason)
            with self._lock:
                self.refused[version] = reason
                self.last_error = reason
                self.last_load_s = dt
                self.counters["refused"] += 1
                self._loading = None
                self.history.append(ReloadEvent(version, "refused", time.time(), reason, dt))
            if self.startup_fallback:
                self._fall_back_from(version)
            return
        dt = time.perf_counter() - t0
        self._pause(pace=False)  # offered right away: the swap itself waits for the next chunk boundary
        with self._lock:
            self._loading = None
            self.last_load_s = dt
            self.refused.pop(version, None)
            if self._want_gen != gen and self._want != version:
                self.counters["superseded"] += 1  # a newer request arrived meanwhile: the worker loads that
                self.history.append(ReloadEvent(version, "superseded", time.time(), "", dt))
                self._retired.append(model)
                return
            self._pending = (model, version)
            self.counters["ready"] += 1
            self.history.append(ReloadEvent(version, "ready", time.time(), "", dt))
        log.info("checkpoint %s ready for swap (verify+load+validate %.3f s)", version, dt)

    def _pause(self, pace: bool = True) -> None:
        """Between loader stages: sleep `yield_s` (releases the GIL, lets the control thread run first), then
        `pace()` (wait for the control loop's next idle gap)."""
        if self.yield_s > 0:
            time.sleep(self.yield_s)
        if pace and self.pace is not None:
            self.pace()

    def _fall_back_from(self, version: str) -> None:
        """Nothing serves and `version` was refused: request its parent (manifest, else the previous pointer)."""
        try:
            parent = self.store.manifest(version).get("parent")
        except CheckpointError:
            pointer = self.store.read_pointer() or {}
            parent = pointer.get("previous") if pointer.get("version") == version else None
        with self._cv:
            if self.serving is not None or self._pending is not None or self._want != version:
                return
            if parent is None or parent in self.refused:
                log.error("no fallback for refused %s: nothing to serve, the robot holds", version)
                return
            log.warning("startup: %s refused, falling back to its parent %s", version, parent)
            self.history.append(ReloadEvent(parent, "fallback", time.time(), f"{version} refused"))
            self._request_locked(parent, force=False)
