"""What every benchmark under bench/ does with its result: one JSON document on stdout, also written to --out.

`emit(out, path)` prints the document and, with a path, writes the same text atomically
(qvgm.data.layout.atomic_write_bytes: a temporary file, fsync, rename), so a killed benchmark or a full disk never
leaves a half-written result file; the printed copy comes first, so a failed write loses nothing.
`machine(threads)` is the record of the machine a figure came from (these machines are shared: the 1-minute load
average is part of it).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from qvgm.data.layout import atomic_write_bytes


def machine(threads: int | None = None, **extra: Any) -> dict[str, Any]:
    """Platform, CPU count, Python and torch versions, torch threads used (None: not set), 1-min load average."""
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch_version, "threads": threads, "load_avg_1min": round(os.getloadavg()[0], 2), **extra}


def plain(value: Any) -> Any:
    """JSON fallback for what json cannot write: numpy arrays and scalars as lists / numbers, anything else str."""
    if hasattr(value, "tolist"):  # numpy arrays and numpy scalars (torch tensors too)
        return value.tolist()
    return str(value)


def emit(out: dict[str, Any], path: str | Path | None = None, indent: int | None = 1) -> dict[str, Any]:
    """Print `out` as JSON (flushed) and, with `path`, write the same text there atomically. Returns `out`."""
    text = json.dumps(out, indent=indent, default=plain)
    print(text, flush=True)
    if path:
        path = Path(path)
        try:
            if not path.parent.is_dir():  # a mistyped --out, not a folder to create
                raise FileNotFoundError(f"{path.parent}: no such folder")
            atomic_write_bytes(path, text.encode())
        except BaseException:
            print(f"bench: could not write {path} (the result is printed above)", file=sys.stderr)
            raise
    return out
