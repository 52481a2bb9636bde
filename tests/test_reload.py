"""HotReloader: background load + validation + swap at a boundary, with real safetensors, real torch models,
real inotify / polling on a real store, and a separate publisher process.

Run as a script this file is also the publisher process:
    python tests/test_reload.py publish ROOT COUNT INTERVAL_S      publish COUNT good checkpoints, print ids
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path.insert(0, str(REPO))

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import wait_for  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from qvgm.checkpoints import MANIFEST, CheckpointStore, write_manifest  # noqa: E402
from qvgm.reload import HotReloader, ValidationError, check_finite, check_shapes, timed_dry_run  # noqa: E402

ROBOT = {"obs_dim": 16, "action_dim": 7}  # what the "robot profile" accepts
torch.set_num_threads(1)


def build(cfg: dict[str, Any]) -> torch.nn.Sequential:
    """obs [B, obs_dim] -> action [B, action_dim]; `depth` hidden layers of width `hidden`."""
    layers: list[torch.nn.Module] = [torch.nn.Linear(cfg["obs_dim"], cfg["hidden"]), torch.nn.Tanh()]
    for _ in range(cfg.get("depth", 0)):
        layers += [torch.nn.Linear(cfg["hidden"], cfg["hidden"]), torch.nn.Tanh()]
    layers.append(torch.nn.Linear(cfg["hidden"], cfg["action_dim"]))
    return torch.nn.Sequential(*layers)


def write_checkpoint(d: Path, seed: int, **overrides: Any) -> dict[str, Any]:
    cfg = {"obs_dim": 16, "hidden": 32, "depth": 0, "action_dim": 7, "seed": seed, **overrides}
    torch.manual_seed(seed)
    net = build(cfg)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg))
    return cfg


@dataclass
class Model:
    net: torch.nn.Sequential
    cfg: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.net(obs)


def load_fn(path: Path, manifest: dict[str, Any]) -> Model:
    cfg = json.loads((path / "config.json").read_text())
    tensors = load_file(str(path / "model.safetensors"))
    net = build(cfg)
    net.load_state_dict(tensors)
    return Model(net.eval(), cfg, tensors)


def make_validate(budget_s: float = 0.05):
    def validate(model: Model, manifest: dict[str, Any]) -> None:
        for key in ("obs_dim", "action_dim"):
            if model.cfg[key] != ROBOT[key]:
                raise ValidationError(f"config {key}={model.cfg[key]} but the robot profile has {ROBOT[key]}")
        last = len(model.net) - 1
        check_shapes(model.tensors, {f"{last}.weight": (ROBOT["action_dim"], model.cfg["hidden"])})
        check_finite(model.tensors)
        timed_dry_run(lambda: model.act(torch.zeros(1, ROBOT["obs_dim"])), budget_s, warmup=1, repeats=5)
    return validate


def publish(store: CheckpointStore, seed: int, **overrides: Any) -> str:
    with store.writing(summary={"seed": seed}) as staged:
        write_checkpoint(staged.path, seed, **overrides)
    assert staged.version is not None
    return staged.version


def swap_within(reloader: HotReloader, timeout: float = 10.0) -> tuple[Model, str]:
    got = reloader.wait_for_swap(timeout)
    assert got is not None, reloader.status()
    return got


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "store", keep_last=4)


@pytest.mark.parametrize("watch", ["inotify", "poll"])
def test_new_version_is_noticed_loaded_and_swapped(store: CheckpointStore, watch: str) -> None:
    v1 = publish(store, 1)
    with HotReloader(store, load_fn, make_validate(), watch=watch, poll_interval_s=0.05,
                     backup_poll_s=30.0) as rl:
        assert rl.watch_mode == watch
        model, version = swap_within(rl)
        assert version == v1 and rl.serving == v1 and model.cfg["seed"] == 1
        assert rl.poll_swap() is None
        t0 = time.monotonic()
        v2 = publish(store, 2)
        model2, version2 = swap_within(rl)
        latency = time.monotonic() - t0
        assert version2 == v2 and model2.cfg["seed"] == 2
        assert not torch.equal(model.act(torch.ones(1, 16)), model2.act(torch.ones(1, 16)))
        # with inotify the change is seen without waiting for the (30 s) backup poll
        assert latency < (5.0 if watch == "inotify" else 10.0)
        s = rl.status()
        assert s["serving"] == v2 and s["swaps"] == 2 and s["refused"] == 0 and s["last_error"] is None
        assert rl.diagnostic_values()["serving"] == v2


def test_auto_falls_back_to_polling_without_inotify(store: CheckpointStore, monkeypatch) -> None:
    import qvgm.reload

    def no_inotify(directory: Path) -> None:
        raise OSError(38, "inotify_init1 failed (simulated: no inotify on this kernel/filesystem)")

    monkeypatch.setattr(qvgm.reload, "_Inotify", no_inotify)
    publish(store, 1)
    with HotReloader(store, load_fn, make_validate(), watch="auto", poll_interval_s=0.05) as rl:
        assert rl.watch_mode == "poll"
        swap_within(rl)
        v2 = publish(store, 2)
        assert swap_within(rl)[1] == v2
    with pytest.raises(OSError, match="simulated"):
        HotReloader(store, load_fn, watch="inotify").start()


def _hash_mismatch(d: Path) -> None:
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(data))


def _partial(d: Path) -> None:
    (d / "model.safetensors").unlink()


def _truncated(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _no_manifest(d: Path) -> None:
    (d / MANIFEST).unlink()


def _pickle(d: Path) -> None:
    torch.save({"w": torch.zeros(2)}, d / "model.pt")  # written, never loaded


def _garbage_safetensors(d: Path) -> None:  # corrupt file whose manifest hashes match
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    write_manifest(d, d.name, None)


# name -> (checkpoint overrides, mutation of the published directory, words the refusal must contain)
BAD_CASES: dict[str, tuple[dict[str, Any], Any, str]] = {
    "hash_mismatch": ({}, _hash_mismatch, "sha256 mismatch"),
    "partial_missing_file": ({}, _partial, "listed in the manifest but missing"),
    "partial_truncated": ({}, _truncated, "sha256 mismatch"),
    "no_manifest": ({}, _no_manifest, "no manifest.json"),
    "pickle_file": ({}, _pickle, "pickle-format"),
    "corrupt_safetensors": ({}, _garbage_safetensors, "refused at load"),
    "nan_weights": ({"nan": True}, None, "non-finite"),
    "wrong_action_dim": ({"action_dim": 6}, None, "action_dim=6"),
    "too_slow_dry_run": ({"hidden": 512, "depth": 24}, None, "budget"),
}


def inject_bad_version(store: CheckpointStore, seed: int, overrides: dict[str, Any], mutate) -> str:
    """Publish a version as a foreign or faulty writer would leave it, then point CURRENT at it."""
    nan = overrides.pop("nan", False)
    with store.writing(make_current=False) as staged:
        write_checkpoint(staged.path, seed, **overrides)
        if nan:
            tensors = load_file(str(staged.path / "model.safetensors"))
            tensors["0.weight"][0, 0] = float("nan")
            save_file(tensors, str(staged.path / "model.safetensors"))
    version = staged.version
    assert version is not None
    if mutate is not None:
        mutate(store.path(version))
    with store._writer_lock():  # switch like a foreign writer: no manifest check
        store._switch_locked(version)
    return version


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_checkpoint_is_refused_and_old_model_keeps_serving(store: CheckpointStore, case: str) -> None:
    overrides, mutate, words = BAD_CASES[case]
    v1 = publish(store, 1)
    with HotReloader(store, load_fn, make_validate(budget_s=0.5e-3), watch="inotify",
                     required_files=("config.json", "model.safetensors")) as rl:
        model, _ = swap_within(rl)
        bad = inject_bad_version(store, 2, dict(overrides), mutate)
        wait_for(lambda: rl.status()["refused"] >= 1, what=f"refusal of {case}")
        s = rl.status()
        assert bad in s["last_error"] and words in s["last_error"], s["last_error"]
        assert s["refused_versions"] == {bad: s["last_error"]}
        assert rl.poll_swap() is None and rl.serving == v1
        model.act(torch.zeros(1, 16))  # the old model is intact and serving
        assert rl.history[-1].event == "refused" and rl.history[-1].version == bad
        # not retried on its own; an explicit ~/reload retries it and refuses it again
        time.sleep(0.1)
        assert rl.status()["loads"] <= 2
        ok, msg = rl.request_reload()
        assert ok and bad in msg
        wait_for(lambda: rl.status()["refused"] >= 2, what="second refusal")
        # the reloader is alive: a good version after the bad one swaps in
        v3 = publish(store, 3)
        assert swap_within(rl)[1] == v3


@pytest.mark.parametrize("fallback", [True, False])
def test_start_on_a_bad_current_falls_back_to_its_parent(store: CheckpointStore, fallback: bool) -> None:
    v1 = publish(store, 1)
    publish(store, 2)
    v2 = store.current()
    v3 = inject_bad_version(store, 3, {}, _hash_mismatch)
    _hash_mismatch(store.path(v2))  # v3's parent v2 is bad too: the fallback walks on to v1
    with HotReloader(store, load_fn, make_validate(), watch="inotify", startup_fallback=fallback) as rl:
        if fallback:
            assert swap_within(rl)[1] == v1
            assert set(rl.refused) == {v2, v3} and store.current() == v3  # CURRENT is not moved
            assert [e.event for e in rl.history if e.event == "fallback"] == ["fallback", "fallback"]
        else:
            wait_for(lambda: rl.status()["refused"] == 1, what="refusal")
            assert rl.wait_for_swap(0.5) is None and rl.serving is None
        v4 = publish(store, 4)  # a good publish is picked up either way
        assert swap_within(rl)[1] == v4


def test_control_loop_never_waits_for_a_load(store: CheckpointStore) -> None:
    """50 Hz ticks keep running while a slow (1 s) load of a 25 MB checkpoint runs in the background."""
    publish(store, 1)
    loading = threading.Event()

    def slow_load(path: Path, manifest: dict[str, Any]) -> Model:
        loading.set()
        model = load_fn(path, manifest)
        time.sleep(1.0)  # e.g. moving weights to the GPU
        loading.clear()
        return model

    with HotReloader(store, slow_load, make_validate(budget_s=1.0), watch="inotify") as rl:
        model, version = swap_within(rl, 20)
        publish(store, 2, hidden=512, depth=24)
        wait_for(loading.is_set, what="the slow load to start")
        period, durations, starts, during_load = 0.02, [], [], 0
        next_t = time.monotonic()
        deadline = next_t + 8.0
        new = None
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            starts.append(t0)
            got = rl.poll_swap()  # the control loop's only contact with the reloader
            model.act(torch.zeros(1, 16))  # the tick's own work with the serving model
            durations.append(time.monotonic() - t0)
            during_load += loading.is_set()
            if got is not None:
                new = got
                break
            next_t += period
            time.sleep(max(0.0, next_t - time.monotonic()))
        assert new is not None and new[0].cfg["hidden"] == 512
        assert during_load >= 20  # ticks really ran while the load was in progress
        gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        # No tick waited for the 1 s load. The bounds are loose on purpose (a shared 2-core CI machine at load 10
        # stalls threads for ~100 ms); timing targets live in bench/reload.py, this only proves "never waits".
        assert max(durations) < 0.5, max(durations)
        assert max(gaps) < 0.8, max(gaps)


def test_rollback_and_reload_services(store: CheckpointStore) -> None:
    v1 = publish(store, 1)
    with HotReloader(store, load_fn, make_validate(), watch="inotify", keep_previous=True) as rl:
        swap_within(rl)
        assert rl.request_reload() == (True, f"already serving {v1}")
        v2 = publish(store, 2)
        assert swap_within(rl)[1] == v2
        ok, msg = rl.request_rollback()  # to v2's parent, v1: kept in memory, instant
        assert ok and "kept in memory" in msg and store.current() == v1
        # the kept model is offered at once; under load the inotify watcher may re-offer the same version a
        # moment later, so wait rather than poll exactly once
        model, version = swap_within(rl)
        assert version == v1 and model.cfg["seed"] == 1 and rl.status()["rollbacks"] == 1
        ok, msg = rl.request_rollback()
        assert not ok and "no parent" in msg and rl.serving == v1
        ok, msg = rl.request_rollback(to=v2)  # forward again, v2 is the kept previous model
        assert ok and swap_within(rl)[1] == v2
    with HotReloader(store, load_fn, make_validate(), watch="poll", poll_interval_s=0.05) as rl:
        assert swap_within(rl)[1] == v2
        ok, msg = rl.request_rollback(to=v1)  # not in memory: loaded and validated in the background
        assert ok and "loading" in msg
        assert swap_within(rl)[1] == v1
        ok, msg = rl.request_rollback(to="v000099-00000000")
        assert not ok and "not in the store" in msg and rl.serving == v1


def test_reload_with_a_publisher_process(store: CheckpointStore) -> None:
    """A separate process publishes 6 versions while the control loop ticks; every swap is a complete,
    valid version, the last one ends up serving, nothing is refused."""
    publish(store, 100)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with HotReloader(store, load_fn, make_validate(), watch="auto") as rl:
        served = [swap_within(rl)[1]]
        proc = subprocess.Popen([sys.executable, __file__, "publish", str(store.root), "6", "0.15"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        deadline = time.monotonic() + 60
        while proc.poll() is None or rl.serving != store.current() or rl.status()["loading"]:
            assert time.monotonic() < deadline, rl.status()
            got = rl.poll_swap()
            if got is not None:
                served.append(got[1])
            time.sleep(0.02)
        out, err = proc.communicate()
        assert proc.returncode == 0, err
        published = out.split()
        assert len(published) == 6 and rl.serving == published[-1]
        assert set(served[1:]) <= set(published) and served == sorted(served)
        assert rl.status()["refused"] == 0


def _publisher(root: str, count: int, interval: float) -> None:
    store = CheckpointStore(root, keep_last=4)
    for i in range(count):
        print(publish(store, 1000 + i), flush=True)
        time.sleep(interval)


if __name__ == "__main__":
    if sys.argv[1] == "publish":
        _publisher(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]}")
