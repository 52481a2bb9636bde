"""Checkpoint directories: manifest with sha256 of every file, atomic writes, verification.

A checkpoint is a directory holding `config.json`, `model.safetensors`, tokenizer files, `norm_stats.json`
and `manifest.json` = {"format": 1, "version", "parent", "created", "files": {relpath: sha256}, "summary"}.
Loading code calls `verify_checkpoint_dir` first; nothing here ever unpickles.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, partial, corrupt or incompatible."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
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
        if path.suffix in {".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt"}:
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
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
