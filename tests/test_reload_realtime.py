"""Hot reload off the control thread's critical path (issue 6, 30 Hz): with real tiny `state` FlowPolicy
checkpoints in a real CheckpointStore, a StoreFlowBackend (the policy node's learned backend, no ROS needed) and
real inotify: the new model is pre-warmed by the dry run on the loader thread before it is offered, the old model
is released on the loader thread after the swap, each file is hashed once per reload, and a version whose
pre-warm / dry run fails (non-finite output, over the latency budget) is refused while the old weights serve."""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import wait_for
from safetensors.torch import load_file, save_file

import qvgm.checkpoints as checkpoints
from qvgm.checkpoints import CheckpointError, CheckpointStore
from qvgm.policy import NormStats, load_policy, make_policy
from qvgm.policy.checkpoint_io import write_policy_files
from qvgm_policy_node.backends import BackendConfig, StoreFlowBackend

torch.set_num_threads(1)
HOME = np.array([0.0, -0.4, 0.9, 0.0, 0.9, 0.0, 0.02])
JOINTS = [f"joint_{i}" for i in range(1, 7)] + ["gripper_finger_joint"]
LOADER = "qvgm-reload-load"


def write_checkpoint(directory: Path, seed: int, scale: float = 1.0) -> None:
    """A tiny untrained `state` FlowPolicy (7 joints, horizon 10); `scale` multiplies every weight matrix
    (1e30: finite weights whose outputs overflow to inf/NaN, which only the dry run can catch)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    stats = NormStats.compute(HOME + rng.normal(size=(64, 7)) * 0.05, HOME + rng.normal(size=(64, 7)) * 0.02)
    policy = make_policy("state", stats, state_dim=7, real_action_dim=7, horizon=10, hidden=32, embed_dim=16,
                         head_hidden=32, head_depth=1)
    write_policy_files(policy, directory)
    if scale != 1.0:
        tensors = load_file(str(directory / "model.safetensors"))
        save_file({k: v * scale if v.ndim == 2 else v for k, v in tensors.items()},
                  str(directory / "model.safetensors"))


def publish(store: CheckpointStore, seed: int, scale: float = 1.0) -> str:
    with store.writing() as staged:
        write_checkpoint(staged.path, seed, scale)
    assert staged.version is not None
    return staged.version


def observation() -> dict[str, Any]:
    return {"images": {}, "state": HOME.astype(np.float32), "prompt": "pick", "stamp": 1.0}


def make_backend(store: CheckpointStore, **options: Any) -> StoreFlowBackend:
    opts = {"checkpoint_store": str(store.root), "cameras": [], "num_steps": 3, "seed": 0, "reload_budget_s": 2.0,
            "reload_watch": "inotify", **options}
    backend = StoreFlowBackend(BackendConfig(list(JOINTS), horizon=10, dt=1 / 30, options=opts))
    backend.observation_source = observation
    return backend


@contextlib.contextmanager
def serving_first_version(store: CheckpointStore, **options: Any) -> Iterator[tuple[StoreFlowBackend, str]]:
    """Publish version 1, start a backend on the store and swap it in; yields (backend, v1), closes the backend."""
    publish(store, 1)
    backend = make_backend(store, **options)
    try:
        v1 = store.current()
        assert v1 is not None
        swap_to(backend, v1)
        yield backend, v1
    finally:
        backend.close()


def swap_to(backend: StoreFlowBackend, version: str, timeout: float = 30.0) -> float:
    """Call poll_swap() like the control loop does until `version` serves; returns the swap time (monotonic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = time.monotonic()
        if backend.poll_swap() == version:
            return t
        time.sleep(0.005)
    raise AssertionError(f"{version} never swapped in: {backend.reloader.status()}")


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "store", keep_last=None)


def test_old_model_is_released_on_the_loader_thread(store: CheckpointStore) -> None:
    with serving_first_version(store) as (backend, v1):
        freed: list[str] = []
        weakref.finalize(backend.current.policy, lambda: freed.append(threading.current_thread().name))
        v2 = publish(store, 2)
        swap_to(backend, v2)  # on this (the "control") thread
        wait_for(lambda: freed, what="the old model to be released")
        assert freed == [LOADER], freed  # not on the thread that swapped
        assert backend.reloader.released == 1
        chunk = backend.infer(observation())
        assert chunk.version == v2 and chunk.positions.shape == (10, 7) and np.isfinite(chunk.positions).all()


def test_new_model_is_prewarmed_on_the_loader_thread_before_the_swap(store: CheckpointStore) -> None:
    calls: list[tuple[float, str, int]] = []  # (monotonic, thread, id(module)) of every module forward

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        calls.append((time.monotonic(), threading.current_thread().name, id(module)))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    publish(store, 1)
    backend = make_backend(store)
    try:
        v1 = store.current()
        assert v1 is not None
        swap_to(backend, v1)
        v2 = publish(store, 2)
        wait_for(lambda: backend.reloader.status()["pending"] == v2, 30, "v2 to be validated")
        time.sleep(0.05)
        t_swap = swap_to(backend, v2)
        new_ids = {id(m) for m in backend.current.policy.modules()}
        before = [(t, th) for t, th, i in calls if i in new_ids and t < t_swap]
        assert before, "the new model never ran before the swap"
        assert {th for _, th in before} == {LOADER}  # the pre-warm (dry run) ran on the loader thread only
        assert backend.warm_thread == LOADER and backend.last_dry_run_s is not None
        assert backend.infer(observation()).version == v2
    finally:
        handle.remove()
        backend.close()


@pytest.mark.parametrize("case", ["non_finite_output", "over_budget"])
def test_failing_prewarm_refuses_the_version_and_keeps_the_old_weights(store: CheckpointStore, case: str) -> None:
    with serving_first_version(store) as (backend, v1):
        before = backend.infer(observation())
        if case == "over_budget":
            backend.budget_s = 1e-7  # no real inference is that fast
            v2 = publish(store, 2)
            words = "over the"
        else:
            v2 = publish(store, 2, scale=1e30)  # finite weights: passes hashing, load and the finite-weight check
            words = "non-finite"
        wait_for(lambda: v2 in backend.reloader.refused, 30, "the refusal")
        reason = backend.reloader.refused[v2]
        assert "refused at validate" in reason and words in reason, reason
        assert backend.diagnostic_values()["reload.last_error"] == reason
        for _ in range(20):  # the control loop keeps polling: nothing to swap, v1 keeps serving
            assert backend.poll_swap() is None
            time.sleep(0.005)
        after = backend.infer(observation())
        assert backend.version == v1 and after.version == v1 and np.isfinite(after.positions).all()
        assert before.positions.shape == after.positions.shape


def test_each_file_is_hashed_once_per_reload(store: CheckpointStore, monkeypatch: pytest.MonkeyPatch) -> None:
    publish(store, 1)
    real = checkpoints.sha256_file
    hashed: list[tuple[str, str]] = []

    def counting(path: Path, *args: Any, **kwargs: Any) -> str:
        hashed.append((Path(path).name, threading.current_thread().name))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "sha256_file", counting)  # the real hash, counted
    backend = make_backend(store)
    try:
        v1 = store.current()
        assert v1 is not None
        swap_to(backend, v1)
        files = set(store.manifest(v1)["files"])
        assert Counter(name for name, _ in hashed) == Counter(files)  # every file exactly once
        assert {th for _, th in hashed} == {LOADER}
    finally:
        backend.close()


def test_load_policy_with_a_verified_manifest(store: CheckpointStore) -> None:
    """Reusing the reloader's verified manifest loads the same weights; a manifest without the model is refused."""
    v = publish(store, 3)
    manifest = checkpoints.verify_checkpoint_dir(store.path(v))
    a, b = load_policy(store.path(v)), load_policy(store.path(v), verified_manifest=manifest)
    assert b.version == v and b.manifest["files"] == manifest["files"]
    for (ka, ta), (kb, tb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(ta, tb)
    partial = {**manifest, "files": {k: h for k, h in manifest["files"].items() if k != "model.safetensors"}}
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_policy(store.path(v), verified_manifest=partial)


def test_loader_stages_wait_for_chunk_boundaries_only_while_chunks_flow(store: CheckpointStore) -> None:
    """While the control loop reports chunk boundaries the loader runs load and dry run right after one (bounded
    by reload_pace_s); with no boundaries (robot idle, start-up) it loads without waiting."""
    with serving_first_version(store, reload_pace_s=0.5) as (backend, v1):
        assert backend.paced == 0  # start-up: nothing served, no wait
        v2 = publish(store, 2)
        deadline = time.monotonic() + 30
        while backend.reloader.status()["pending"] != v2:  # a 10 Hz "control loop" publishing chunks
            assert time.monotonic() < deadline, backend.reloader.status()
            backend.note_boundary()
            time.sleep(0.1)
        # before load_fn and before the dry run; a stage whose wait timed out (a boundary more than 2 periods
        # late on a loaded machine) goes ahead without counting
        assert backend.paced >= 1
        swap_to(backend, v2)
        paced = backend.paced
        time.sleep(0.5)  # boundaries stop (robot idle): waits are capped at 2 boundary periods (about 0.2 s)
        v3 = publish(store, 3)
        t0 = time.monotonic()
        swap_to(backend, v3)
        assert backend.paced == paced and time.monotonic() - t0 < 20
