"""bench/report.py: every benchmark's JSON goes to stdout and, with --out, to a file written atomically."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import emit, machine  # noqa: E402


def test_emit_prints_and_writes_the_same_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = {"bench": "x", "rate": np.float64(0.25), "outcomes": np.array([1, 0, 1]), "path": tmp_path,
           "machine": machine(2, note="test")}
    target = tmp_path / "result.json"
    assert emit(out, target) is out
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(target.read_text())
    assert printed["rate"] == 0.25 and printed["outcomes"] == [1, 0, 1] and printed["path"] == str(tmp_path)
    m = printed["machine"]
    assert m["threads"] == 2 and m["note"] == "test" and m["cpus"] >= 1 and isinstance(m["load_avg_1min"], float)
    assert m["torch"] and m["python"].count(".") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]  # no temporary file left behind
    # an existing result is replaced whole
    emit({"bench": "y"}, target, indent=None)
    assert json.loads(target.read_text()) == {"bench": "y"}
    assert json.loads(capsys.readouterr().out) == {"bench": "y"}


def test_emit_without_a_path_only_prints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    emit({"a": 1})
    assert json.loads(capsys.readouterr().out) == {"a": 1}
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_loses_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The old result stays intact, no temporary file is left, the error is raised, and the new result was printed."""
    target = tmp_path / "result.json"
    target.write_text('{"old": true}')
    with pytest.raises(FileNotFoundError):  # the folder does not exist: nothing can be written there
        emit({"new": 1}, tmp_path / "missing" / "result.json")
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"new": 1} and "could not write" in captured.err
    assert json.loads(target.read_text()) == {"old": True}
    with pytest.raises(TypeError):  # a value json cannot take and whose str() fails: nothing is printed or written

        class Bad:
            def __str__(self) -> str:
                raise TypeError("no text form")

        emit({"bad": Bad()}, target)
    assert json.loads(target.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_every_benchmark_starts_as_a_script(tmp_path: Path) -> None:
    """`python bench/X.py --help` from another folder, without PYTHONPATH, for every benchmark that imports from
    `bench`: it puts this checkout on sys.path itself (inside pytest another test may already have, which hid a
    missing one). Venv-installed packages resolve anyway, so the other scripts are not at risk here."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    texts = {p: p.read_text() for p in (ROOT / "bench").glob("*.py")}
    scripts = sorted(p for p, t in texts.items() if "__main__" in t and ("from bench" in t or "import bench" in t))
    assert {"learning.py", "sft_success.py", "critic_ground_truth.py"} <= {p.name for p in scripts}
    failed = {}
    for script in scripts:
        r = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
        if r.returncode != 0 or "usage" not in r.stdout.lower():
            failed[script.name] = r.stderr[-300:]
    assert not failed, failed
