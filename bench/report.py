"""What every benchmark under bench/ does with its result: one JSON document on stdout, also written to --out.

`emit(out, path)` prints the document and, with a path, writes the same text atomically (a temporary file in the
same folder, then a rename), so a killed benchmark or a full disk never leaves a half-written result file; the
printed copy comes first, so a failed write loses nothing. `machine(threads)` is the record of the machine a
figure came from (these machines are shared: the 1-minute load average is part of it).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any


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
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            print(f"bench: could not write {path} (the result is printed above)", file=sys.stderr)
            raise
    return out
