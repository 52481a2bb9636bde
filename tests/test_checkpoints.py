"""CheckpointStore: atomic publish, manifest, rollback, retention, leases; real files and real processes.

Run as a script this file is also the worker the cross-process tests start:
    python tests/test_checkpoints.py writer ROOT COUNT SIZE KEEP     publish COUNT versions, print their ids
    python tests/test_checkpoints.py reader ROOT SECONDS             lease+verify CURRENT in a loop, print stats
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))

import pytest  # noqa: E402

from qvgm.checkpoints import (  # noqa: E402
    MANIFEST,
    CheckpointError,
    CheckpointStore,
    parse_version,
    sha256_file,
    verify_checkpoint_dir,
)


def write_fake_checkpoint(d: Path, fill: int, size: int = 1024) -> None:
    """config.json says which byte fills model.safetensors: a reader can check the pair is consistent."""
    rng = random.Random(fill)
    payload = bytes([fill % 256]) * (size // 2) + rng.randbytes(size - size // 2)
    (d / "model.safetensors").write_bytes(payload)
    (d / "config.json").write_text(json.dumps({"fill": fill, "size": size,
                                               "digest": hashlib.sha256(payload).hexdigest()}))
    (d / "tokenizer").mkdir(exist_ok=True)
    (d / "tokenizer" / "vocab.txt").write_text(f"vocab {fill}\n")


def check_consistent(path: Path) -> None:
    cfg = json.loads((path / "config.json").read_text())
    data = (path / "model.safetensors").read_bytes()
    assert len(data) == cfg["size"] and hashlib.sha256(data).hexdigest() == cfg["digest"], path


def run_worker(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)


# ---- script-mode workers ---------------------------------------------------------------------------------
def _writer(root: str, count: int, size: int, keep: int) -> None:
    store = CheckpointStore(root, keep_last=keep)
    for i in range(count):
        with store.writing(summary={"writer": os.getpid(), "i": i}) as staged:
            write_fake_checkpoint(staged.path, fill=os.getpid() + i, size=size)
        print(staged.version, flush=True)


def _reader(root: str, seconds: float) -> None:
    store = CheckpointStore(root, keep_last=None)
    stats = {"reads": 0, "errors": [], "versions_seen": []}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if store.current() is None:
            time.sleep(0.01)
            continue
        try:
            with store.lease_current() as lease:
                verify_checkpoint_dir(lease.path, ("config.json", "model.safetensors"))
                check_consistent(lease.path)
                if lease.version not in stats["versions_seen"]:
                    stats["versions_seen"].append(lease.version)
            for info in store.versions():  # every listed version is complete (or being deleted right now)
                if info.manifest is None and info.path.exists():
                    stats["errors"].append(f"{info.version} listed without a manifest")
            stats["reads"] += 1
        except Exception as e:  # noqa: BLE001 - reported to the test
            stats["errors"].append(f"{type(e).__name__}: {e}")
    print(json.dumps(stats), flush=True)


# ---- tests --------------------------------------------------------------------------------------------
def test_publish_manifest_current_and_ids(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "store", keep_last=None)
    assert store.current() is None and store.versions() == []
    ids = []
    for i in range(3):
        with store.writing(summary={"step": i}) as staged:
            write_fake_checkpoint(staged.path, fill=i)
            assert store.current() == (ids[-1] if ids else None)  # nothing visible before the commit
        ids.append(staged.version)
        assert store.current() == staged.version
    seqs = [parse_version(v)[0] for v in ids]
    assert seqs == [1, 2, 3] and ids == sorted(ids)
    infos = store.versions()
    assert [v.version for v in infos] == ids and [v.current for v in infos] == [False, False, True]
    assert [v.parent for v in infos] == [None, ids[0], ids[1]]
    m = store.verify(ids[2], ("config.json", "model.safetensors"))
    assert m["version"] == ids[2] and m["summary"] == {"step": 2}
    assert set(m["files"]) == {"config.json", "model.safetensors", "tokenizer/vocab.txt"}
    for rel, digest in m["files"].items():
        assert sha256_file(store.path(ids[2]) / rel) == digest
    assert ids[2].endswith(hashlib.sha256(json.dumps(m["files"], sort_keys=True).encode()).hexdigest()[:8])
    pointer = store.read_pointer()
    assert pointer["version"] == ids[2] and pointer["previous"] == ids[1]
    assert list((tmp_path / "store" / "staging").iterdir()) == []

    src = tmp_path / "src"
    src.mkdir()
    write_fake_checkpoint(src, fill=7)
    (src / MANIFEST).write_text("{not json")  # a stale manifest in the source is replaced, not copied
    v = store.publish_dir(src, parent=ids[0], summary={"from": "dir"}, make_current=False)
    assert store.current() == ids[2] and store.manifest(v)["parent"] == ids[0]
    store.verify(v)
    check_consistent(store.path(v))


def test_failed_or_bad_publish_leaves_nothing(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "store", keep_last=None)
    good = store.publish_dir(_src(tmp_path, 1))
    with pytest.raises(RuntimeError, match="trainer crashed"), store.writing() as staged:
        write_fake_checkpoint(staged.path, fill=2)
        raise RuntimeError("trainer crashed")
    with pytest.raises(CheckpointError, match="pickle-format"), store.writing() as staged:
        write_fake_checkpoint(staged.path, fill=3)
        (staged.path / "model.pt").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(CheckpointError, match="empty"), store.writing():
        pass
    with pytest.raises(CheckpointError, match="not in the store"):
        store.publish_dir(_src(tmp_path, 4), parent="v000099-deadbeef")
    assert [v.version for v in store.versions()] == [good] and store.current() == good
    assert list((tmp_path / "store" / "staging").iterdir()) == []


def _src(tmp_path: Path, fill: int) -> Path:
    d = tmp_path / f"src{fill}"
    d.mkdir(exist_ok=True)
    write_fake_checkpoint(d, fill)
    return d


def test_rollback_to_parent_and_any_version(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "store", keep_last=None)
    with pytest.raises(CheckpointError, match="no current"):
        store.rollback()
    a, b, c = (store.publish_dir(_src(tmp_path, i)) for i in range(3))
    assert store.rollback(to=a) == a
    with pytest.raises(CheckpointError, match="no parent"):
        store.rollback()
    assert store.current() == a
    assert store.rollback(to=c) == c
    assert store.rollback() == b and store.current() == b
    d = store.publish_dir(_src(tmp_path, 3))  # published while b is current: its parent is b
    assert store.manifest(d)["parent"] == b
    with pytest.raises(CheckpointError, match="not in the store"):
        store.rollback(to="v000042-00000000")
    with pytest.raises(CheckpointError, match="not a store version"):
        store.rollback(to="../../etc")
    assert store.current() == d
    (store.path(d) / MANIFEST).write_text("{damaged")  # current damaged: back to the previous pointer value
    assert store.rollback() == b
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        store.set_current(d)
    assert store.current() == b


def test_retention_keeps_last_current_parent_pinned_and_leased(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "store", keep_last=2)
    ids = [store.publish_dir(_src(tmp_path, i)) for i in range(4)]
    assert [v.version for v in store.versions()] == ids[2:]
    store.pin(ids[2])
    lease = store.lease(ids[3])  # a reader is loading ids[3]
    store.rollback(to=ids[2])  # current = ids[2], its parent ids[1] is gone already
    ids += [store.publish_dir(_src(tmp_path, i)) for i in range(4, 7)]
    kept = [v.version for v in store.versions()]
    # newest 2 (ids 5, 6) + current (6) + parent of current (5) + pinned (2) + leased (3)
    assert kept == [ids[2], ids[3], ids[5], ids[6]]
    lease.release()
    store.unpin(ids[2])
    assert store.prune() == [ids[2], ids[3]]
    assert [v.version for v in store.versions()] == ids[5:]
    with pytest.raises(CheckpointError, match="pruned"):
        store.lease(ids[3])
    # sequence numbers are never reused, even after pruning everything older
    nxt = store.publish_dir(_src(tmp_path, 9))
    assert parse_version(nxt)[0] == 8 and list((tmp_path / "store" / "trash").iterdir()) == []


def test_writers_and_readers_in_separate_processes(tmp_path: Path) -> None:
    """Two writer processes (with pruning) and two reader processes: readers always lease and verify a
    complete, self-consistent current version; no publish is lost; ids stay unique and ordered."""
    root = tmp_path / "store"
    CheckpointStore(root)
    readers = [run_worker("reader", str(root), "6") for _ in range(2)]
    writers = [run_worker("writer", str(root), "12", str(256 * 1024), "2") for _ in range(2)]
    published = []
    for w in writers:
        out, err = w.communicate(timeout=120)
        assert w.returncode == 0, err
        published += out.split()
    stats = []
    for r in readers:
        out, err = r.communicate(timeout=120)
        assert r.returncode == 0, err
        stats.append(json.loads(out))
    for s in stats:
        assert s["errors"] == [], s["errors"][:5]
        assert s["reads"] > 10 and len(s["versions_seen"]) >= 2
    assert len(set(published)) == 24
    assert sorted(parse_version(v)[0] for v in published) == list(range(1, 25))
    store = CheckpointStore(root, keep_last=2)
    kept = store.versions()
    assert kept[-1].version == store.current() == max(published, key=lambda v: parse_version(v)[0])
    for info in kept:
        store.verify(info.version)


def test_kill9_during_publish_leaves_a_valid_store(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = CheckpointStore(root, keep_last=3)
    first = store.publish_dir(_src(tmp_path, 0))
    rng = random.Random(0)
    interrupted = kills = 0
    while kills < 4 or (interrupted < 2 and kills < 12):
        proc = run_worker("writer", str(root), "1000", str(3 * 1024 * 1024), "3")
        assert proc.stdout is not None
        proc.stdout.readline()  # it has published once: it is in its publish loop now
        time.sleep(rng.random() * 0.3)
        proc.send_signal(signal.SIGKILL)
        kills += 1
        proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        interrupted += any((root / "staging").iterdir())
        # the store is valid right now, before any cleanup
        cur = store.current()
        assert cur is not None
        store.verify(cur, ("config.json", "model.safetensors"))
        check_consistent(store.path(cur))
        for info in store.versions():
            assert info.manifest is not None
            store.verify(info.version)
    assert interrupted >= 1  # at least one kill landed in the middle of writing a version
    store.recover()
    assert list((root / "staging").iterdir()) == [] and not list(root.glob(".*.tmp-*"))
    after = store.publish_dir(_src(tmp_path, 1))
    assert store.current() == after and parse_version(after)[0] > parse_version(first)[0]


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "writer":
        _writer(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    elif mode == "reader":
        _reader(sys.argv[2], float(sys.argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode}")
