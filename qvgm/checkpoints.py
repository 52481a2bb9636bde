"""Checkpoint directories (manifest with sha256 of every file, atomic writes, verification) and the
CheckpointStore (versions, atomic CURRENT pointer, rollback, retention, cross-process safety).

A checkpoint is a directory holding `config.json`, `model.safetensors`, tokenizer files, `norm_stats.json`
and `manifest.json` = {"format": 1, "version", "parent", "created", "files": {relpath: sha256}, "summary"}.
Loading code calls `verify_checkpoint_dir` first; nothing here ever unpickles. Readers of a store take a
`lease` on the version they load (retention never deletes a leased version); `qvgm.reload.HotReloader` does.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt"})


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, partial, corrupt or incompatible."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (after a rename or create in it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path, version: str, parent: str | None = None,
                   summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hash every file under `directory` (except the manifest) and write manifest.json, fsynced."""
    directory = Path(directory)
    files = {
        str(p.relative_to(directory)): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"format": MANIFEST_FORMAT, "version": version, "parent": parent,
                "created": time.time(), "files": files, "summary": summary or {}}
    tmp = directory / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)
    return manifest


def verify_checkpoint_dir(directory: Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check the manifest against the files on disk; returns the manifest or raises CheckpointError."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory")
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no {MANIFEST} (partial or foreign checkpoint)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{directory}/{MANIFEST}: unreadable ({e})") from None
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{directory}/{MANIFEST}: no 'files' table")
    for name in required:
        if name not in files:
            raise CheckpointError(f"{directory}: required file {name} missing from the manifest")
    for rel, want in files.items():
        path = directory / rel
        if not path.is_file():
            raise CheckpointError(f"{directory}: {rel} listed in the manifest but missing")
        got = sha256_file(path)
        if got != want:
            raise CheckpointError(f"{directory}: sha256 mismatch for {rel} (manifest {want[:12]}, file {got[:12]})")
    for path in directory.rglob("*"):
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{directory}: {path.name} is a pickle-format file; only safetensors load")
    return manifest


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success fsync everything and rename it into place.

    On an exception the temp dir is removed and `final` is untouched. `final` must not exist yet.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        raise FileExistsError(f"{final} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        fsync_path(tmp)
        os.rename(tmp, final)
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------------------------
# The checkpoint store: versions/<id>, an atomically switched CURRENT pointer, leases, retention.
# --------------------------------------------------------------------------------------------------------------

VERSION_RE = re.compile(r"^v(\d{6,})-([0-9a-f]{8})$")
POINTER = "CURRENT"


def parse_version(version: str) -> tuple[int, str]:
    """`v000042-1a2b3c4d` -> (42, "1a2b3c4d"); raises CheckpointError for anything else."""
    m = VERSION_RE.match(version)
    if not m:
        raise CheckpointError(f"{version!r} is not a store version id (v<seq 6+ digits>-<sha8>)")
    return int(m.group(1)), m.group(2)


def _write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temp file beside `path`, fsync it, rename over `path`, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def _fsync_tree(directory: Path) -> None:
    for p in directory.rglob("*"):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        fsync_path(d)
    fsync_path(directory)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class VersionInfo:
    """One kept version: id, sequence number, directory, manifest (None if unreadable), flags."""

    version: str
    seq: int
    path: Path
    manifest: dict[str, Any] | None
    current: bool
    pinned: bool

    @property
    def parent(self) -> str | None:
        return (self.manifest or {}).get("parent")


@dataclass
class StagedVersion:
    """A version being written by `CheckpointStore.writing()`: write files under `path`.

    After the `with` block `version` and `manifest` hold the published id and manifest.
    """

    path: Path
    version: str | None = None
    manifest: dict[str, Any] | None = None


class Lease:
    """A shared flock on `leases/<version>.lock`: while held, retention never deletes that version.

    Works across processes and across threads of one process (flock locks belong to the open file).
    """

    def __init__(self, store: CheckpointStore, version: str, path: Path, fd: int) -> None:
        self.store, self.version, self.path, self._fd = store, version, path, fd

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a forgotten lease must not pin a version forever
        with contextlib.suppress(Exception):
            self.release()


class CheckpointStore:
    """Versioned checkpoint directories with an atomic `current` pointer, safe across processes.

    Layout under `root`:
        versions/v000042-1a2b3c4d/   complete, immutable checkpoints (manifest.json with sha256 + parent)
        CURRENT                      JSON {"version", "previous", "switched_at"}: the serving pointer
        staging/<pid>-<rand>/        versions being written (never read by readers)
        leases/<version>.lock        readers' shared flocks; retention skips a leased version
        trash/                       versions being deleted (renamed out of versions/ first)
        PINNED, SEQ, .writer.lock    pinned ids, sequence high-water mark, the writers' exclusive flock

    Publishing: files are written into staging/, hashed into the manifest, fsynced, renamed into versions/
    (atomic: a reader sees the whole directory or nothing), then CURRENT is replaced by writing a temp file,
    fsyncing it and renaming it over CURRENT. Why a pointer file rather than a `current` symlink: a reader
    resolves it exactly once to an immutable versions/<id> directory (through a symlink, two opens could
    land in two different versions), it can be fsynced like any file, it carries the previous version and
    the switch time, and it works on filesystems without symlinks (some container volumes). Writers
    serialise on an exclusive flock; the expensive part (copying, hashing) happens outside the lock.
    Version ids are `v<seq>-<sha8>`: seq strictly increases (a high-water mark survives pruning), sha8 is
    the first 8 hex digits of the sha256 of the manifest's file table. Local filesystems only (flock and
    rename semantics on NFS are not relied upon).
    """

    def __init__(self, root: Path | str, keep_last: int | None = 5) -> None:
        """`keep_last`: retention after each publish keeps the newest N versions, the current one, its parent
        and pinned ones (None keeps everything)."""
        if keep_last is not None and keep_last < 1:
            raise ValueError("keep_last must be >= 1 or None")
        self.root = Path(root)
        self.keep_last = keep_last
        for sub in ("versions", "staging", "leases", "trash"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # ---- paths and reading (no lock needed: everything readers look at is replaced atomically) -----------
    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    @property
    def pointer_path(self) -> Path:
        return self.root / POINTER

    def path(self, version: str) -> Path:
        """Directory of `version` (validated id; it may not exist)."""
        parse_version(version)
        return self.versions_dir / version

    def read_pointer(self) -> dict[str, Any] | None:
        """The CURRENT record, or None before the first publish."""
        try:
            text = self.pointer_path.read_text()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
            parse_version(record["version"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{self.pointer_path}: unreadable pointer ({e})") from None
        return record

    def current(self) -> str | None:
        """The version CURRENT points at, or None before the first publish."""
        record = self.read_pointer()
        return None if record is None else record["version"]

    def current_path(self) -> Path | None:
        v = self.current()
        return None if v is None else self.versions_dir / v

    def manifest(self, version: str) -> dict[str, Any]:
        try:
            return json.loads((self.path(version) / MANIFEST).read_text())
        except FileNotFoundError:
            raise CheckpointError(f"version {version} not in the store (pruned or never published)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"version {version}: unreadable manifest ({e})") from None

    def pinned(self) -> set[str]:
        try:
            return set(json.loads((self.root / "PINNED").read_text()))
        except FileNotFoundError:
            return set()

    def versions(self) -> list[VersionInfo]:
        """Kept versions, oldest first (ordered by sequence number), each with its manifest."""
        cur, pins = self.current(), self.pinned()
        out = []
        for d in self.versions_dir.iterdir():
            m = VERSION_RE.match(d.name)
            if not m or not d.is_dir():
                continue
            try:
                manifest = json.loads((d / MANIFEST).read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                manifest = None
            out.append(VersionInfo(d.name, int(m.group(1)), d, manifest, d.name == cur, d.name in pins))
        return sorted(out, key=lambda v: v.seq)

    def verify(self, version: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
        """sha256-check one version against its manifest (raises CheckpointError)."""
        return verify_checkpoint_dir(self.path(version), required)

    # ---- leases ---------------------------------------------------------------------------------------
    def lease(self, version: str) -> Lease:
        """Hold `version` against retention (use as a context manager); raises CheckpointError if it is gone."""
        parse_version(version)
        lock_path = self.root / "leases" / f"{version}.lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
        lease = Lease(self, version, self.versions_dir / version, fd)
        if not lease.path.is_dir():
            lease.release()
            raise CheckpointError(f"version {version} not in the store (pruned or never published)")
        return lease

    def lease_current(self, attempts: int = 10) -> Lease:
        """Lease whatever CURRENT points at (retries if it is switched and pruned in between)."""
        for _ in range(attempts):
            v = self.current()
            if v is None:
                raise CheckpointError(f"{self.root}: no current version (nothing published yet)")
            try:
                return self.lease(v)
            except CheckpointError:
                continue
        raise CheckpointError(f"{self.root}: current version kept changing while leasing it")

    # ---- writing --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _writer_lock(self) -> Iterator[None]:
        fd = os.open(self.root / ".writer.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    @contextlib.contextmanager
    def writing(self, parent: str | None = None, summary: dict[str, Any] | None = None,
                make_current: bool = True) -> Iterator[StagedVersion]:
        """Write a new version in place, atomically: files go under `staged.path`; on a clean exit the
        version is hashed, fsynced, renamed into versions/ and (if make_current) made current.
        On an exception nothing is published. `parent` defaults to the current version at commit time."""
        staging = self.root / "staging" / f"{os.getpid()}-{secrets.token_hex(6)}"
        staging.mkdir(parents=True)
        staged = StagedVersion(staging)
        try:
            yield staged
            staged.version, staged.manifest = self._commit(staging, parent, summary, make_current)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def publish_dir(self, src: Path | str, parent: str | None = None, summary: dict[str, Any] | None = None,
                    make_current: bool = True) -> str:
        """Copy checkpoint directory `src` (its own manifest.json is ignored) into a new version; returns its id."""
        src = Path(src)
        if not src.is_dir():
            raise CheckpointError(f"{src}: not a directory")
        with self.writing(parent, summary, make_current) as staged:
            shutil.copytree(src, staged.path, dirs_exist_ok=True,
                            ignore=lambda d, names: [MANIFEST] if Path(d) == src and MANIFEST in names else [])
        assert staged.version is not None
        return staged.version

    def _commit(self, staging: Path, parent: str | None, summary: dict[str, Any] | None,
                make_current: bool) -> tuple[str, dict[str, Any]]:
        if not any(p.is_file() for p in staging.rglob("*")):
            raise CheckpointError("refusing to publish an empty checkpoint")
        for p in staging.rglob("*"):
            if p.suffix in PICKLE_SUFFIXES:
                raise CheckpointError(f"refusing to publish {p.name}: pickle-format file; use safetensors")
            if p.is_symlink():
                raise CheckpointError(f"refusing to publish {p.name}: symlink (versions must be self-contained)")
        manifest = write_manifest(staging, "pending", parent, summary)  # hashing: outside the lock
        sha8 = hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()[:8]
        _fsync_tree(staging)
        with self._writer_lock():
            self._recover_locked()
            if parent is None:
                parent = self.current()
            elif not (self.versions_dir / parent).is_dir():
                raise CheckpointError(f"parent {parent} is not in the store")
            seq = self._next_seq()
            version = f"v{seq:06d}-{sha8}"
            manifest.update(version=version, parent=parent, created=time.time())
            _write_json_atomic(staging / MANIFEST, manifest)
            _write_json_atomic(self.root / "SEQ", seq)
            os.rename(staging, self.versions_dir / version)
            fsync_path(self.versions_dir)
            if make_current:
                self._switch_locked(version)
            doomed = self._select_prunable_locked()
        self._delete(doomed)
        return version, manifest

    def _next_seq(self) -> int:
        try:
            high = int(json.loads((self.root / "SEQ").read_text()))
        except (FileNotFoundError, ValueError):
            high = 0
        existing = [v.seq for v in self.versions()]
        return max([high, *existing]) + 1

    def _switch_locked(self, version: str) -> None:
        previous = self.current()
        _write_json_atomic(self.pointer_path, {"version": version, "previous": previous,
                                               "switched_at": time.time()})

    def set_current(self, version: str) -> str:
        """Point CURRENT at any kept version (must have a readable manifest); returns it."""
        with self._writer_lock():
            self.manifest(version)
            self._switch_locked(version)
        return version

    def rollback(self, to: str | None = None) -> str:
        """Point CURRENT at `to`, or (None) at the current version's parent (the previous pointer value if the
        current manifest is unreadable); returns the new current. Raises CheckpointError, changing nothing,
        if the target is not kept or has no readable manifest."""
        with self._writer_lock():
            if to is None:
                cur = self.current()
                if cur is None:
                    raise CheckpointError("nothing to roll back: no current version")
                try:
                    to = self.manifest(cur).get("parent")
                except CheckpointError:  # current is damaged: go back to what CURRENT pointed at before it
                    to = (self.read_pointer() or {}).get("previous")
                if to is None:
                    raise CheckpointError(f"{cur} has no parent to roll back to")
            self.manifest(to)
            self._switch_locked(to)
        return to

    def pin(self, version: str) -> None:
        """Exempt `version` from retention."""
        with self._writer_lock():
            self.manifest(version)
            _write_json_atomic(self.root / "PINNED", sorted(self.pinned() | {version}))

    def unpin(self, version: str) -> None:
        with self._writer_lock():
            _write_json_atomic(self.root / "PINNED", sorted(self.pinned() - {version}))

    # ---- retention and recovery ----------------------------------------------------------------------
    def prune(self, keep_last: int | None = None) -> list[str]:
        """Apply retention now; returns the deleted ids (leased versions are skipped)."""
        with self._writer_lock():
            doomed = self._select_prunable_locked(keep_last)
        return self._delete(doomed)

    def _select_prunable_locked(self, keep_last: int | None = None) -> list[tuple[str, Path, int]]:
        """Under the writer lock: pick versions outside retention that no reader leases and move them out of
        versions/ into trash/ (atomic rename). Returns (id, trash path, lease fd held LOCK_EX)."""
        keep_last = self.keep_last if keep_last is None else keep_last
        if keep_last is None:
            return []
        infos = self.versions()
        keep = {v.version for v in infos[-keep_last:]} | self.pinned()
        cur = self.current()
        if cur is not None:
            keep.add(cur)
            with contextlib.suppress(CheckpointError):
                parent = self.manifest(cur).get("parent")
                if parent:
                    keep.add(parent)
        doomed = []
        for info in infos:
            if info.version in keep:
                continue
            lock_path = self.root / "leases" / f"{info.version}.lock"
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # a reader holds it: keep it for now
                continue
            trash = self.root / "trash" / f"{info.version}-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(info.path, trash)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock_path)
            doomed.append((info.version, trash, fd))
        if doomed:
            fsync_path(self.versions_dir)
        return doomed

    @staticmethod
    def _delete(doomed: list[tuple[str, Path, int]]) -> list[str]:
        for _, trash, fd in doomed:
            os.close(fd)
            shutil.rmtree(trash, ignore_errors=True)
        return [v for v, _, _ in doomed]

    def _recover_locked(self) -> None:
        """Remove what crashed writers left: staging dirs of dead processes, trash, temp pointer files."""
        for d in (self.root / "staging").iterdir():
            pid = d.name.split("-", 1)[0]
            if not pid.isdigit() or not _pid_alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)
        for d in (self.root / "trash").iterdir():
            shutil.rmtree(d, ignore_errors=True)
        for p in self.root.glob(".*.tmp-*"):
            pid = p.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
            if not pid.isdigit() or not _pid_alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def recover(self) -> None:
        """Clean up after crashed writers (also done at every publish). The store is valid without it."""
        with self._writer_lock():
            self._recover_locked()
